"""Shared fixtures, and the worker set-up of the parallel suite (`python -m pytest -q -n auto`, pytest-xdist)."""
import os

import pytest

#: At most this many xdist workers for ``-n auto``: each holds torch and a few tiny networks (1-4 GiB), and the
#: suite's longest tests (the end-to-end runs, the 2-process torchrun runs) set its length beyond 4 workers.
MAX_WORKERS = 4

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One core per worker: torch's intra-op pool would otherwise oversubscribe the machine (workers x cores
    # threads spinning against each other). Subprocesses (the CLI runs, torchrun) inherit the setting.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)             # a pytest-xdist hook: without xdist installed, never called
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core this process may run on, at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_WORKERS))


@pytest.fixture(scope="session")
def phantom_home(tmp_path_factory):
    """One phantom data folder for the whole session (phantom tasks synthesise into it on first use)."""
    home = tmp_path_factory.mktemp("sslbench-data")
    old = os.environ.get("SSLBENCH_DATA")
    os.environ["SSLBENCH_DATA"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SSLBENCH_DATA", None)
    else:
        os.environ["SSLBENCH_DATA"] = old
