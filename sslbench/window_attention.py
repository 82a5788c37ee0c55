"""Fused window attention for Swin (Triton, CUDA): softmax(q k^T * scale + B + M) v with gradients to B.

The function is MONAI's ``WindowAttention`` (Liu et al., Swin Transformer, ICCV 2021, Eq. 4:
Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V) for windows of n <= 343 tokens, where B is the
relative position bias of each head (learnable: its gradient is returned) and M the shifted-window mask of
MONAI's ``compute_mask`` (0 between tokens of the same region, -100 between regions).

Why a kernel of its own: Swin at feature size 48 has head dimension 16 and 343-token windows; PyTorch's
memory-efficient SDPA kernel pads the head dimension to 32 in its backward and writes the bias gradient of
every window before reducing it, and it was 40 % of a VoCo teacher-student step on an H100/H200
(BENCHMARKS.md). Here:

* one fused forward per (query block, window x head): q k^T, bias, mask, online softmax (base 2), p v;
  the output is written straight into the [windows, tokens, heads * d] layout the projection reads, and
  q, k, v are read from the qkv projection's output in place (no permute copies);
* one backward program per (window, head) that walks all key blocks and, inside, all query blocks
  (FlashAttention-2's recurrences: dV += P^T dO, dS = P (dP - rowsum(dO O)), dK += dS^T Q, dQ += dS K),
  with dQ accumulated in an fp32 scratch that only this program touches (no atomics: deterministic);
* the mask enters as region ids (2 small integer vectors per window instead of an [n, n] matrix);
* the bias read in fp32 (SDPA reads it rounded to bf16);
* the bias gradient: dS of every window written once in bf16 and summed over windows in fp32.

``window_attention(qkv, bias, region, num_heads, scale)`` takes the qkv projection's output [b, n, 3c],
the bias [h, n, n] (fp32, any autograd history: its gradient flows back to the relative position table)
and optional region ids [nw, n] (windows of one image are consecutive, window w uses row w % nw); it
returns [b, n, c]. Needs CUDA + Triton; ``available(x)`` says whether it can run on x.
"""
from __future__ import annotations

import torch

try:   # Triton ships with CUDA builds of torch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:   # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None

#: launch configurations (block sizes in tokens: windows of 343 tokens take 6 x 6 blocks of 64)
#: (tuned on an H200 for 343-token windows, head dim 16: forward 3.4 ms, forward + backward 15.1 ms for
#: 4500 windows x 3 heads with the shift mask, against 5.2 / 25.4 ms for SDPA's memory-efficient kernel)
FWD_CONFIG = {"BM": 128, "BN": 32, "num_warps": 4, "num_stages": 3}
BWD_CONFIG = {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 2}
#: the additive mask between tokens of different regions in MONAI's ``compute_mask``
MASK_VALUE = -100.0


def available(x: torch.Tensor) -> bool:
    """True when the fused kernel can run on x (a CUDA tensor and Triton importable)."""
    return triton is not None and x.is_cuda


def regions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Region id of every token of every window from MONAI's shift mask [nw, n, n] (0 = same region):
    the smallest token index of its region, Tensor[nw, n] int32. Exact for masks of the form
    -100 * [region_i != region_j], which is how ``compute_mask`` builds them."""
    same = mask == 0
    return same.to(torch.uint8).argmax(dim=1).to(torch.int32)


if triton is not None:

    @triton.jit
    def _fwd_kernel(QKV, BIAS, RID, OUT, LSE, N, H, NW, scale,
                    HAS_MASK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_bh = tl.program_id(0)                     # axis 0: up to 2^31 - 1 (windows x heads)
        pid_m = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        C = H * D
        row = 3 * C                                   # qkv row stride (tokens)
        base = QKV + b.to(tl.int64) * N * row + h * D
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < N
        q = tl.load(base + offs_m[:, None] * row + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        if HAS_MASK:
            w = b % NW
            r_q = tl.load(RID + w * N + offs_m, mask=m_ok, other=-1)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        LOG2E: tl.constexpr = 1.4426950408889634
        for start in range(0, N, BN):
            offs_n = start + tl.arange(0, BN)
            n_ok = offs_n < N
            k = tl.load(base + C + offs_n[:, None] * row + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(base + 2 * C + offs_n[:, None] * row + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s += tl.load(BIAS + h * N * N + offs_m[:, None] * N + offs_n[None, :],
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            if HAS_MASK:
                r_k = tl.load(RID + w * N + offs_n, mask=n_ok, other=-2)
                s = tl.where(r_q[:, None] == r_k[None, :], s, s + (-100.0))
            s = tl.where(n_ok[None, :], s * LOG2E, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        out = OUT + b.to(tl.int64) * N * C + h * D
        tl.store(out + offs_m[:, None] * C + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=m_ok[:, None])
        tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=m_ok)

    @triton.jit
    def _bwd_kernel(QKV, BIAS, RID, DOUT, LSE, DELTA, DQKV, DQ32, DBIAS, N, H, NW, scale,
                    HAS_MASK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        C = H * D
        row = 3 * C
        base = QKV + b.to(tl.int64) * N * row + h * D
        dbase = DQKV + b.to(tl.int64) * N * row + h * D
        obase = DOUT + b.to(tl.int64) * N * C + h * D
        dq32 = DQ32 + pid_bh.to(tl.int64) * N * D
        dbias = DBIAS + pid_bh.to(tl.int64) * N * N
        offs_d = tl.arange(0, D)
        LOG2E: tl.constexpr = 1.4426950408889634
        if HAS_MASK:
            w = b % NW
        for start_n in range(0, N, BN):
            offs_n = start_n + tl.arange(0, BN)
            n_ok = offs_n < N
            k = tl.load(base + C + offs_n[:, None] * row + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(base + 2 * C + offs_n[:, None] * row + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            if HAS_MASK:
                r_k = tl.load(RID + w * N + offs_n, mask=n_ok, other=-2)
            dk = tl.zeros([BN, D], tl.float32)
            dv = tl.zeros([BN, D], tl.float32)
            tl.debug_barrier()                        # dq32 written by the previous key block is visible
            for start_m in range(0, N, BM):
                offs_m = start_m + tl.arange(0, BM)
                m_ok = offs_m < N
                both = m_ok[:, None] & n_ok[None, :]
                q = tl.load(base + offs_m[:, None] * row + offs_d[None, :], mask=m_ok[:, None], other=0.0)
                do = tl.load(obase + offs_m[:, None] * C + offs_d[None, :], mask=m_ok[:, None], other=0.0)
                lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
                s = tl.dot(q, tl.trans(k)) * scale
                s += tl.load(BIAS + h * N * N + offs_m[:, None] * N + offs_n[None, :], mask=both, other=0.0)
                if HAS_MASK:
                    r_q = tl.load(RID + w * N + offs_m, mask=m_ok, other=-1)
                    s = tl.where(r_q[:, None] == r_k[None, :], s, s + (-100.0))
                p = tl.exp2(s * LOG2E - lse[:, None])
                p = tl.where(both, p, 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                ds_lo = ds.to(q.dtype)
                dk += tl.dot(tl.trans(ds_lo), q)
                tl.store(dbias + offs_m[:, None] * N + offs_n[None, :], ds_lo, mask=both)
                dq_part = tl.dot(ds_lo, k)
                dq_ptr = dq32 + offs_m[:, None] * D + offs_d[None, :]
                tl.store(dq_ptr, tl.load(dq_ptr, mask=m_ok[:, None], other=0.0) + dq_part, mask=m_ok[:, None])
            tl.store(dbase + C + offs_n[:, None] * row + offs_d[None, :], (dk * scale).to(DQKV.dtype.element_ty),
                     mask=n_ok[:, None])
            tl.store(dbase + 2 * C + offs_n[:, None] * row + offs_d[None, :], dv.to(DQKV.dtype.element_ty),
                     mask=n_ok[:, None])
        tl.debug_barrier()
        for start_m in range(0, N, BM):
            offs_m = start_m + tl.arange(0, BM)
            m_ok = offs_m < N
            dq = tl.load(dq32 + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            tl.store(dbase + offs_m[:, None] * row + offs_d[None, :], (dq * scale).to(DQKV.dtype.element_ty),
                     mask=m_ok[:, None])


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, region, num_heads, scale):
        b, n, c3 = qkv.shape
        c = c3 // 3
        d = c // num_heads
        qkv = qkv.contiguous()
        bias_c = bias.detach().float().contiguous()
        out = torch.empty(b, n, c, device=qkv.device, dtype=qkv.dtype)
        lse = torch.empty(b * num_heads, n, device=qkv.device, dtype=torch.float32)
        has_mask = region is not None
        rid = region.contiguous() if has_mask else lse            # placeholder pointer when unused
        nw = region.shape[0] if has_mask else 1
        grid = (b * num_heads, triton.cdiv(n, FWD_CONFIG["BM"]))
        _fwd_kernel[grid](qkv, bias_c, rid, out, lse, n, num_heads, nw, scale,
                          HAS_MASK=has_mask, D=d, **FWD_CONFIG)
        ctx.save_for_backward(qkv, bias_c, region if has_mask else None, out, lse)
        ctx.num_heads, ctx.scale = num_heads, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, bias_c, region, out, lse = ctx.saved_tensors
        h, scale = ctx.num_heads, ctx.scale
        b, n, c3 = qkv.shape
        c = c3 // 3
        d = c // h
        dout = dout.contiguous()
        # rowsum(dO * O) per (window, head, token): [b * h, n]
        delta = (dout.float() * out.float()).view(b, n, h, d).sum(-1).transpose(1, 2).reshape(b * h, n).contiguous()
        dqkv = torch.empty_like(qkv)
        dq32 = torch.zeros(b * h, n, d, device=qkv.device, dtype=torch.float32)
        dbias_all = torch.empty(b, h, n, n, device=qkv.device, dtype=qkv.dtype)
        has_mask = region is not None
        rid = region if has_mask else lse
        nw = region.shape[0] if has_mask else 1
        _bwd_kernel[(b * h,)](qkv, bias_c, rid, dout, lse, delta, dqkv, dq32, dbias_all, n, h, nw, scale,
                              HAS_MASK=has_mask, D=d, **BWD_CONFIG)
        dbias = dbias_all.sum(0, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        return dqkv, dbias, None, None, None


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, region: torch.Tensor | None, num_heads: int,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias + mask(region)) v for qkv [b, n, 3c] (q, k, v each [b, n, heads, d]).

    bias [heads, n, n]; region [nw, n] int32 or None (no mask). Returns [b, n, c] in qkv's dtype.
    """
    b, n, c3 = qkv.shape
    d = c3 // 3 // num_heads
    if d < 16 or d & (d - 1):
        raise ValueError(f"fused window attention needs a power-of-two head dimension >= 16, got {d}")
    if region is not None and b % region.shape[0]:
        raise ValueError(f"{b} windows are not a multiple of the mask's {region.shape[0]} windows per image")
    return _WindowAttention.apply(qkv, bias, region, num_heads, float(scale))


def reference(qkv: torch.Tensor, bias: torch.Tensor, region: torch.Tensor | None, num_heads: int,
              scale: float) -> torch.Tensor:
    """The same function in plain torch (fp32 math), for tests."""
    b, n, c3 = qkv.shape
    c = c3 // 3
    q, k, v = qkv.float().reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    s = (q * scale) @ k.transpose(-1, -2) + bias.float()
    if region is not None:
        nw = region.shape[0]
        m = torch.where(region[:, :, None] == region[:, None, :], 0.0, MASK_VALUE).to(s)
        s = (s.view(b // nw, nw, num_heads, n, n) + m.view(1, nw, 1, n, n)).view(b, num_heads, n, n)
    return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, c)


__all__ = ["available", "regions_from_mask", "window_attention", "reference", "FWD_CONFIG", "BWD_CONFIG", "MASK_VALUE"]
