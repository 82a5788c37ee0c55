"""Fast forms of MONAI's Swin window attention, shared by pre-training methods and fine-tuning.

MONAI's ``WindowAttention`` (SwinUNETR, 2D and 3D) computes softmax(q k^T * scale + relative position bias
+ shifted-window mask) v with explicit matrices, and its ``use_flash_attention`` path (MONAI 1.6.1) only runs
when autograd is off. ``use_sdpa_window_attention(module, kernel)`` switches every ``WindowAttention`` inside
``module`` to a subclass computing the same function, in training too, with the same parameters, buffers
and state-dict keys:

* ``"fused"``: sslbench/speed/window_attention.py's Triton kernels (CUDA + Triton, power-of-two head dim >= 16, no
  attention dropout in training); otherwise SDPA on CUDA and MONAI's own computation on a CPU;
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with the bias + mask materialised.

The Swin LayerNorms become ``_LowPrecisionLayerNorm`` (bf16 outputs under autocast; their outputs only feed
Linears, which autocast casts to bf16 anyway). ``ATTENTIONS`` adds ``"monai"``: leave MONAI's modules as
they are. ``apply_attention(model, attention)`` is what fine-tuning calls (``run.attention``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .names import ATTENTIONS
from . import window_attention as _wa


def _window_attention_class():
    from monai.networks.nets.swin_unetr import WindowAttention

    return WindowAttention


def _window_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                 mask: torch.Tensor | None, scale: float, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T * scale + relative position bias (+ shift mask)) v for q, k, v [b, h, n, d]."""
    b, h, n, d = q.shape
    # contiguous: the fused kernels need a unit-stride last dim of the bias, else SDPA silently falls
    # back to its fp32 math path
    bias = table[index[:n, :n].reshape(-1)].reshape(n, n, h).permute(2, 0, 1).contiguous()   # [h, n, n]
    if mask is not None:
        nw = mask.shape[0]
        # windows of one sample are consecutive in the batch: [b, h] -> [b / nw, nw * h], so the bias is
        # [nw * h, n, n] broadcast over samples instead of a [b, h, n, n] copy
        bias = (bias.unsqueeze(0) + mask.to(bias.dtype).unsqueeze(1)).reshape(1, nw * h, n, n)
        q, k, v = (t.reshape(b // nw, nw * h, n, d) for t in (q, k, v))
    else:
        bias = bias.unsqueeze(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).contiguous(),
                                         dropout_p=dropout_p, scale=scale)
    return out.reshape(b, h, n, d)


#: the same function hidden from torch.compile: inductor (torch 2.11) may lay the bias out with a
#: non-unit last stride, which the efficient-attention kernel rejects; eager SDPA inside the compiled
#: model costs a graph break per block and nothing else.
_window_sdpa_opaque = torch.compiler.disable(_window_sdpa, recursive=True)


def _fused(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """qkv projection + sslbench.speed.window_attention's fused kernel: [b, n, c] before the output projection."""
    n = x.shape[1]
    h = attn.num_heads
    bias = attn.relative_position_bias_table[attn.relative_position_index[:n, :n].reshape(-1)]
    bias = bias.reshape(n, n, h).permute(2, 0, 1).float()                                  # [h, n, n]
    region = _wa.regions_from_mask(mask) if mask is not None else None
    return _wa.window_attention(attn.qkv(x), bias, region, h, attn.scale)


class _SDPAWindowAttention(_window_attention_class()):
    """MONAI's WindowAttention computed by scaled_dot_product_attention, with autograd on too.

    Same parameters, buffers and function (softmax(q k^T * scale + relative bias + shift mask) v), exact
    to fp64 rounding in values and gradients (tests/test_voco.py).
    """

    opaque_to_compile = False
    #: "fused": sslbench.speed.window_attention's Triton kernel where it can run (CUDA, head dim a power of
    #: two >= 16, no attention dropout in training), else SDPA; "sdpa": always SDPA
    kernel = "fused"

    def _fused_ok(self, x: torch.Tensor) -> bool:
        d = x.shape[-1] // self.num_heads
        return (self.kernel == "fused" and _wa.available(x) and d >= 16 and not d & (d - 1)
                and not (self.training and self.attn_drop.p > 0))

    def forward(self, x, mask):
        b, n, c = x.shape
        h = self.num_heads
        if self._fused_ok(x):
            return self.proj_drop(self.proj(_fused(self, x, mask)))
        if self.kernel == "fused" and not x.is_cuda and torch.is_grad_enabled():
            # off CUDA, in training, MONAI's own computation: faster than SDPA on a CPU (`sslbench bench finetune
            # --device cpu --feature-size 12 --roi 64 --batch 2 --classes 8 --precision fp32`, 2 cores,
            # 2026-11-27: 4.52 / 4.53 s a step against 4.76 / 4.82 s with SDPA, two runs each). Without autograd
            # (evaluation, a teacher) SDPA is the faster one there: `sslbench bench infer --device cpu --size 96
            # 96 64 --roi 64 --precision fp32 --no-agreement --attention sdpa fused --feature-size 12` (and 48),
            # same machine and day: 2.48 s against 5.94 s a volume at feature size 12, 8.96 s against 11.41 s
            # at 48 (measured before this branch existed, 'fused' then being MONAI's computation).
            return super().forward(x, mask)
        q, k, v = self.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)   # [b, h, n, d]
        fn = _window_sdpa_opaque if self.opaque_to_compile else _window_sdpa
        out = fn(q, k, v, self.relative_position_bias_table, self.relative_position_index, mask, self.scale,
                 self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class _LowPrecisionLayerNorm(nn.LayerNorm):
    """LayerNorm that, under autocast, returns the input's dtype (bf16) instead of fp32.

    Inside a Swin block every LayerNorm output feeds a Linear (after a roll and a window partition for
    norm1), which autocast casts to bf16 anyway; rounding right after the norm gives the Linear the same
    operand but moves the roll, the partition copies and the saved activation in bf16, not fp32. The
    statistics are still accumulated in fp32 by the kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                w = self.weight.to(x.dtype) if self.weight is not None else None
                b = self.bias.to(x.dtype) if self.bias is not None else None
                return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        return super().forward(x)


@contextlib.contextmanager
def full_precision(module: nn.Module) -> Iterator[None]:
    """Inside: ``module`` computes in plain fp32: autocast off, TF32 off for matrix products and cuDNN
    convolutions, and fused window attention computed by SDPA (Triton's fp32 ``tl.dot`` rounds to TF32). The
    reference that a bf16 computation, eager or compiled, is measured against (``compile_agreement``)."""
    fused = [m for m in module.modules() if getattr(m, "kernel", None) == "fused"]
    matmul_precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    devices = {p.device.type for p in module.parameters()} or {"cpu"}
    try:
        for m in fused:
            m.kernel = "sdpa"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        with contextlib.ExitStack() as stack:
            for dev in devices:
                stack.enter_context(torch.autocast(dev, enabled=False))
            yield
    finally:
        for m in fused:
            m.kernel = "fused"
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def keep_sdpa_out_of_compile(module: nn.Module) -> int:
    """Mark every swapped window attention of ``module`` so that its SDPA branch runs eagerly inside a
    torch.compile'd model (the fused kernel is a custom operator and compiles either way); returns how many."""
    found = [m for m in module.modules() if isinstance(m, _SDPAWindowAttention)]
    for m in found:
        m.opaque_to_compile = True
    return len(found)


def use_sdpa_window_attention(module: nn.Module, kernel: str = "fused") -> int:
    """Switch every MONAI WindowAttention inside ``module`` to the fast form (``kernel``: "fused" = the
    Triton kernel of sslbench.speed.window_attention where it can run, else SDPA; "sdpa" = SDPA always) and its
    LayerNorms to ``_LowPrecisionLayerNorm`` (same parameters and keys); returns how many attention
    modules."""
    if kernel not in ("fused", "sdpa"):
        raise ValueError(f"window attention kernel: {kernel!r}; expected fused or sdpa")
    base_cls = _window_attention_class()
    count = 0
    for m in module.modules():
        if isinstance(m, base_cls):       # MONAI's, or one switched before (then only the kernel changes)
            m.__class__ = _SDPAWindowAttention
            m.kernel = kernel
            count += 1
        elif type(m) is nn.LayerNorm:
            m.__class__ = _LowPrecisionLayerNorm
    return count


def use_monai_sdpa(module: nn.Module, self_attention_only: bool = False) -> int:
    """MONAI's own SDPA path (``use_flash_attention = True``, same function) in every attention block of ``module``
    that has one; returns how many. ``self_attention_only``: MONAI's ViT blocks (SABlock, cross-attention), not
    Swin's WindowAttention, whose MONAI path runs only without autograd (what a teacher may use); blocks that keep
    their attention maps (``save_attn``) are left alone."""
    window_attention = _window_attention_class()
    count = 0
    for m in module.modules():
        if not hasattr(m, "use_flash_attention") or getattr(m, "save_attn", False):
            continue
        if self_attention_only and isinstance(m, window_attention):
            continue
        m.use_flash_attention = True
        count += 1
    return count


def apply_attention(model: nn.Module, attention: str = "fused") -> int:
    """``run.attention`` for a network to fine-tune or evaluate: switch its Swin window attention to
    ``fused`` / ``sdpa`` (``monai``: unchanged). Returns how many attention modules were switched (0 for
    networks without Swin blocks)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"run.attention: unknown value {attention!r}; expected one of {', '.join(ATTENTIONS)}")
    if attention == "monai":
        return 0
    return use_sdpa_window_attention(model, kernel=attention)
