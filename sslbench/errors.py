"""Errors that sslbench reports to the user as one line (no traceback).

Every message names the file or key at fault and what was expected.
"""


class SSLBenchError(Exception):
    """Base class: the CLI prints str(error) on one line and exits with status 2."""


class RecipeError(SSLBenchError):
    """A recipe file or a --set override is wrong (unknown key, wrong type, unknown method/task)."""


class DataError(SSLBenchError):
    """A dataset on disk is missing, corrupt or inconsistent with its task recipe."""


class CheckpointError(SSLBenchError):
    """A checkpoint cannot be read or matches no backbone tensor."""


class RunError(SSLBenchError):
    """A run folder is in a state that forbids the requested action (finished, foreign, unfinished)."""
