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


#: Test files made of end-to-end runs (CLI trainings, torchrun / sweep subprocesses: a minute or more of CPU each
#: on 2 cores), the longest first (CPU seconds per file measured on the dev machine, 2026-12-03; the files of
#: others' end-to-end runs read, not measured); ``pytest_collection_modifyitems`` runs them before the rest.
LONG_FIRST = ("test_distributed.py", "test_protocol.py", "test_sweep.py", "test_methods_run.py",
              "test_stream.py", "test_predict.py", "test_runkey.py", "test_supervised.py", "test_ct_tasks.py",
              "test_tensorboard.py", "test_golden.py")


@pytest.hookimpl(trylast=True)                   # after pytest's own reordering by fixture scope
def pytest_collection_modifyitems(session, config, items):
    """The files of LONG_FIRST first, in that order, each file's tests kept together and in their order (so a
    module-scoped fixture is still set up once), the others after them as collected. Under ``-n auto`` the
    workers then draw the long tests first and end on short ones, instead of one worker running a long test
    at the end while the other has nothing left (the alphabetical order ends on test_voco and
    test_window_attention)."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1], len(rank)))


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
