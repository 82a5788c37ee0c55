"""How many threads prepare data: the preprocessing of cases (:mod:`sslbench.data.cases`) and the synthesis of
phantom cases (:mod:`sslbench.data.phantoms`). A leaf module, so both can ask without importing each other."""
from __future__ import annotations

import os


def load_workers() -> int:
    """Threads that preprocess (or synthesise) cases: ``$SSLBENCH_LOAD_WORKERS``, else the usable cores, at most 8."""
    env = os.environ.get("SSLBENCH_LOAD_WORKERS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))
