"""The Inductor settings under which sslbench compiles (``run.compile``, VoCo's compiled encoders, the benchmarks).

Every torch.compile in sslbench goes through ``compile()``, which first calls ``configure()``: once per
process, it sets ``SETTINGS`` in ``torch._inductor.config``. A later explicit change (``sslbench bench
pretrain --inductor comprehensive_padding=true``, a ``torch._inductor.config.patch``) is left alone.

The latch (``_configured``) is the one process-wide setting that the runtime's scope
(``sslbench.protocol.runtime.Runtime.applied``) does not restore, on purpose: it is a correctness fix, applied
once per process before the first compile, so that no compile (a run's, a benchmark's, one outside any run)
can miss it; it is not a mode a run chooses, and undoing it at a run's end would expose the next compile of
the process to the bug below.

Why comprehensive padding is off: on torch 2.11.0+cu130 (the GPU machines' build), Inductor pads the
strides of intermediate buffers to 128-byte multiples and can then index a buffer with a stale layout,
reading padding or uninitialised memory: wrong, run-to-run different results, NaN in bf16 (pytorch/pytorch
issue #194281, a Conv3d decoder at misaligned strides; fixed on PyTorch's main by #192575 after 2.11).
sslbench's compiled VoCo teacher-student backbone showed the same signs on an H100 (2026-11-27, with
padding on; figures in BENCHMARKS.md): compiled against eager in bf16 without autograd, the two Swin stages
whose windows' qkv rows are not 128-byte multiples (343 tokens x 144 or 288 bf16 channels) differed by 78 %
and 40 % of their largest value, the aligned stages by under 1 %; with the backbones and heads compiled,
training losses were NaN from the second step; earlier runs of the same step had been finite. With padding
off (H100, that night): every compiled step finite, and every stage's compiled output as close to the
fp32 computation as eager bf16's (tests/test_window_attention.py's GPU test; the bench's compile check).
And the A/B on one H100 (``benchmarks/compile_agreement.py`` with and without ``--inductor
comprehensive_padding=true``, 2026-11-27 17:26-17:30 UTC): Swin stage 1 0.007 off / 0.775 on, stage 2
0.006 / 0.400, every other piece the same both ways.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

#: torch._inductor.config entries that sslbench compiles with (see the module docstring)
SETTINGS: dict[str, Any] = {"comprehensive_padding": False}

_configured = False


def configure() -> dict[str, Any]:
    """Apply ``SETTINGS`` to torch._inductor.config, the first time only (once per process: a correctness fix, not a
    run's mode; see the module docstring); returns the values now in force."""
    global _configured
    import torch._inductor.config as config

    if not _configured:
        for key, value in SETTINGS.items():
            setattr(config, key, value)
        _configured = True
    return current()


def current() -> dict[str, Any]:
    """The values of ``SETTINGS``' keys in torch._inductor.config now (what a compiled run records)."""
    import torch._inductor.config as config

    return {key: getattr(config, key) for key in SETTINGS}


def compile(fn: Callable, **kwargs: Any) -> Callable:   # noqa: A001 - torch.compile's name, on purpose
    """torch.compile(fn, dynamic=False unless given, **kwargs) under sslbench's Inductor settings."""
    configure()
    kwargs.setdefault("dynamic", False)
    return torch.compile(fn, **kwargs)
