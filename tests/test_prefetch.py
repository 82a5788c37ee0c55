"""The fine-tuning prefetcher's page-locked batches (sslbench/data/prefetch.py)."""
from __future__ import annotations

import threading

import torch

from sslbench.data.prefetch import Prefetcher, pinned, upload


class _Tensor:
    """Stands for a CPU tensor: pinning needs CUDA, which the test machine lacks."""

    def __init__(self, v):
        self.v, self.pinned_in = v, None

    def pin_memory(self):
        out = _Tensor(self.v)
        out.pinned_in = threading.current_thread().name
        return out


def test_pinned_batches_are_pinned_in_the_worker_thread_and_keep_their_shape():
    made = []

    def make(step):
        made.append(step)
        return _Tensor(step), [_Tensor(10 * step), "label"]

    fetch = Prefetcher(pinned(make), 0, 3, depth=2, workers=1)
    try:
        for step in range(3):
            x, (y, name) = fetch.get(step)
            assert (x.v, y.v, name) == (step, 10 * step, "label")
            # pinned where it was made (the pool's thread), never on the training loop's thread
            assert x.pinned_in == y.pinned_in != threading.current_thread().name
    finally:
        fetch.close()
    assert made == [0, 1, 2]


def test_upload_off_cuda_is_a_plain_copy_to_the_device():
    t = torch.arange(6).reshape(2, 3)
    for device in ("cpu", torch.device("cpu")):
        out = upload(t, device)
        assert out.device.type == "cpu" and torch.equal(out, t)
