"""The result store: run folders and their records (records), a run's identity (run_key) and the lock that lets
one process at a time write a run folder (lock). Below the protocol, the sweep and the report; imports no torch
at import time."""
