"""Background preparation of the next steps' batches (threads; each batch depends only on its step), and their
upload to the GPU without waiting for it (:func:`pinned`, :func:`upload`)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


def pinned(make: Callable[[int], Any]) -> Callable[[int], Any]:
    """``make`` whose batch (a tensor or a tuple / list of them) comes back in page-locked host memory.

    Pinned in the thread that makes the batch, so a step's ``.to(device, non_blocking=True)`` is a true
    asynchronous copy. From pageable memory the same call first waits for the GPU to finish the work queued before
    it (the previous step): the host stalls, cannot queue the next step's kernels ahead, and the loop's data wait
    (protocol/loop.py DataWait) counts GPU time as waiting for data. The caching host allocator keeps a pinned
    buffer alive until the copy that reads it is done."""
    def pin(x):
        if isinstance(x, (tuple, list)):
            return type(x)(pin(v) for v in x)
        return x.pin_memory() if hasattr(x, "pin_memory") else x

    def make_pinned(step: int):
        return pin(make(step))

    return make_pinned


def upload(t, device):
    """``t`` (a CPU tensor) on ``device``: on a CUDA device from page-locked memory without waiting, since a
    pageable upload first waits for the GPU work queued before it (see :func:`pinned`); elsewhere ``t.to``."""
    dev = getattr(device, "type", str(device).split(":")[0])
    if dev == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Prefetcher:
    """Builds the batches of the next steps in background threads (each batch depends only on its step)."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2, workers: int = 1):
        self.make, self.stop = make, stop
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        self.pending: dict[int, Any] = {}
        self.depth = depth
        self._fill(start)

    def _fill(self, step: int) -> None:
        if self.pool is None:
            return
        for s in range(step, min(step + self.depth, self.stop)):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self.make, s)

    def get(self, step: int):
        fut = self.pending.pop(step, None)
        self._fill(step + 1)
        return fut.result() if fut is not None else self.make(step)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
