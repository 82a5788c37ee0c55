"""Background preparation of the next steps' batches (threads; each batch depends only on its step)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


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
