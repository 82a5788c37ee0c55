"""How many threads prepare data: the preprocessing of cases (:mod:`sslbench.data.cases`) and the synthesis of
phantom cases (:mod:`sslbench.data.phantoms`). A leaf module, so both can ask without importing each other."""
from __future__ import annotations

import os

from sslbench.errors import DataError


def load_workers() -> int:
    """Threads that preprocess (or synthesise) cases: ``$SSLBENCH_LOAD_WORKERS``, else the usable cores, at most 8.

    A value that is not a whole number >= 1 is refused in one line naming the variable."""
    env = os.environ.get("SSLBENCH_LOAD_WORKERS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise DataError(f"$SSLBENCH_LOAD_WORKERS: expected a whole number of threads >= 1, got {env!r}")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))
