"""Momentum (EMA) encoders: the key encoder of MoCo-style methods (PCRL, C2L) and VoCo's teacher."""
from __future__ import annotations

import torch


@torch.no_grad()
def momentum_update(key_params, query_params, m: float) -> None:
    """param_k <- m param_k + (1 - m) param_q: the momentum (key / target / teacher) encoder (PCRL's and C2L's
    official ``moment_update``, VoCo's teacher), one foreach kernel group; buffers stay the key encoder's own."""
    torch._foreach_lerp_(list(key_params), list(query_params), 1.0 - m)
