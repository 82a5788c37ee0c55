"""Fused window attention for Swin (Triton, CUDA): softmax(q k^T * scale + B + M) v with gradients to B.

The function is MONAI's ``WindowAttention`` (Liu et al., Swin Transformer, ICCV 2021, Eq. 4:
Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V) for windows of n <= 343 tokens, where B is the
relative position bias of each head (learnable: its gradient is returned) and M the shifted-window mask of
MONAI's ``compute_mask`` (0 between tokens of the same region, -100 between regions).

Why a kernel of its own: Swin at feature size 48 has head dimension 16 and 343-token windows; PyTorch's
memory-efficient SDPA kernel pads the head dimension to 32 in its backward and writes the bias gradient of
every window before reducing it, and it was 40 % of a VoCo teacher-student step on an H100/H200
(BENCHMARKS.md). Here every program takes a group of G consecutive windows of one head at once (tiles
[G, rows, cols], batched ``tl.dot``), because the bias tile is the same for all windows of a head: it is
read once per group, and the bias gradient of the group is summed in registers before it is written.

* forward, one program per (window group, head, query block): q k^T, bias, mask, online softmax (base 2),
  p v; the output is written straight into the [windows, tokens, heads * d] layout the projection reads,
  and q, k, v are read from the qkv projection's output in place (no permute copies);
* backward in two kernels (FlashAttention-2's recurrences, no atomics, deterministic), after delta =
  rowsum(dO O) (torch ops, or a small kernel of its own: the ``delta`` form): one per
  (window group, head, key block) walks the query blocks for dV += P^T dO, dS = P (dP - rowsum(dO O)),
  dK += dS^T Q and the group's bias gradient sum_g dS (fp32); one per (window group, head, query block)
  walks the key blocks for dQ += dS K (S and P recomputed: cheap at head dim 16, and it keeps dQ in
  registers instead of a read-modify-write of a scratch buffer);
* the mask enters as region ids (2 small integer vectors per window instead of an [n, n] matrix);
* the bias read in fp32 (SDPA reads it rounded to bf16); the per-group bias gradients (one [h, n, n] fp32
  slab per G windows) are summed over the groups at the end (or added with atomics: the ``dbias`` form).

Stage-1 shape of VoCo at the official geometry (4500 windows x 3 heads, 343 tokens, head dim 16, shift
mask), one H100, 2026-11-27 03:55 UTC: forward 2.26 ms, forward + backward 11.6 ms; the previous one-window-per-
program form of this file 3.54 / 15.6 ms; SDPA's memory-efficient kernel about 1.5x / 1.7x that (H200).

``window_attention(qkv, bias, region, num_heads, scale)`` takes the qkv projection's output [b, n, 3c],
the bias [h, n, n] (fp32, any autograd history: its gradient flows back to the relative position table)
and optional region ids [nw, n] (windows of one image are consecutive, window w uses row w % nw); it
returns [b, n, c]. Needs CUDA + Triton; ``available(x)`` says whether it can run on x.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

try:   # Triton ships with CUDA builds of torch; CPU-only installs lack it
    import triton
    import triton.language as tl
except ImportError:   # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None

#: launch configurations: G windows per program (a power of two), BM / BN query / key block sizes in
#: tokens; tuned on an H100 (2026-11-27) for 343-token windows at head dim 16 with
#: ``python benchmarks/window_attention_kernels.py --sweep`` (figures: module docstring, BENCHMARKS.md)
FWD_CONFIG = {"G": 4, "BM": 32, "BN": 16, "num_warps": 4, "num_stages": 2}
DQ_CONFIG = {"G": 4, "BM": 32, "BN": 32, "num_warps": 4, "num_stages": 2}
DKV_CONFIG = {"G": 8, "BM": 16, "BN": 32, "num_warps": 4, "num_stages": 2}
# the backward forms (``backward_forms``). ``dq``, how the backward computes dQ: "kernel" = its own kernel, which recomputes S and P (deterministic);
# "atomic" = the dK/dV kernel adds dS K for each key block into an fp32 buffer with atomics (S and P once;
# the summation order, hence the last bits of dQ, may vary run to run). Chosen by measurement:
# ``python benchmarks/window_attention_kernels.py`` times both.
# ``delta``, how the backward computes delta = rowsum(dO * O) per (window, head, token): "torch" = fp32 copies of dO and
# O, a product, a sum and a transposing copy (~2 GB of memory traffic for a stage-1 call at VoCo's geometry);
# "kernel" = one Triton kernel reading dO and O once in their own dtype (~0.3 GB) and writing delta in the
# [windows * heads, tokens] layout the backward kernels read: the default, chosen by measurement (NVIDIA H100,
# 2026-11-27 16:32 UTC, ``benchmarks/window_attention_kernels.py`` at VoCo's geometry, fwd + bwd ms of one call
# per stage, torch / kernel: 11.91 / 10.78, 5.07 / 4.83, 3.26 / 2.96, 1.38 / 1.12; the compiled
# teacher-student step 12.96 -> 13.35 volumes/s, two runs on two H100 machines)
DELTA_CONFIG = {"BLOCK": 128, "num_warps": 4}
# ``dbias``, how the dK/dV kernel returns the bias gradient: "slabs" = each window group writes its sum_g dS to a slab of
# its own ([groups, h, n, n] fp32, ~0.8 GB for a stage-1 call at VoCo's geometry) and torch sums the slabs
# (deterministic); "atomic" = every group adds into one [h, n, n] fp32 buffer with atomics (no slabs; the
# summation order, hence the last bits, may vary run to run). "slabs" is the default by measurement (H100,
# 2026-11-27 16:32 UTC, fwd + bwd ms of one call per stage, slabs / atomic: 11.91 / 15.21, 5.07 / 6.88,
# 3.26 / 4.22, 1.38 / 1.29, both with delta by torch ops; BENCHMARKS.md).
#: the choices of each backward form (``backward_forms``), the first being the default: dq "kernel", delta
#: "kernel", dbias "slabs"
BACKWARD_CHOICES = {"dq": ("kernel", "atomic"), "delta": ("kernel", "torch"), "dbias": ("slabs", "atomic")}
#: the backward forms in force: the defaults, changed only inside ``backward_forms`` (the benchmarks' knob; no
#: run sets them). Not a contextvar: autograd runs a CUDA backward on its own device thread, which does not see
#: the caller's context variables; the scope restores this table on exit instead.
_FORMS = {key: choices[0] for key, choices in BACKWARD_CHOICES.items()}
#: the additive mask between tokens of different regions in MONAI's ``compute_mask``
MASK_VALUE = -100.0


def backward_modes() -> dict[str, str]:
    """The backward forms in force: {"dq": ..., "delta": ..., "dbias": ...}."""
    return dict(_FORMS)


@contextlib.contextmanager
def backward_forms(dq: str | None = None, delta: str | None = None, dbias: str | None = None) -> Iterator[dict[str, str]]:
    """The fused backward's forms (None keeps one as it is) for the ``with`` block, the previous ones restored on
    exit, errors included; yields the forms in force. The forms are read when a backward launches, so a backward
    must run inside the block. An unknown choice is a one-line ValueError (nothing changed)."""
    for key, value in (("dq", dq), ("delta", delta), ("dbias", dbias)):
        if value is not None and value not in BACKWARD_CHOICES[key]:
            raise ValueError(f"window attention {key} mode: {value!r}; expected one of {', '.join(BACKWARD_CHOICES[key])}")
    previous = dict(_FORMS)
    _FORMS.update({k: v for k, v in (("dq", dq), ("delta", delta), ("dbias", dbias)) if v is not None})
    try:
        yield dict(_FORMS)
    finally:
        _FORMS.clear()
        _FORMS.update(previous)


def available(x: torch.Tensor) -> bool:
    """True when the fused kernel can run on x (a CUDA tensor and Triton importable)."""
    return triton is not None and x.is_cuda


def regions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Region id of every token of every window from MONAI's shift mask [nw, n, n] (0 = same region):
    the smallest token index of its region, Tensor[nw, n] int32. Exact for masks of the form
    -100 * [region_i != region_j], which is how ``compute_mask`` builds them. A minimum over token indices,
    not an argmax: argmax's first-of-equal-maxima rule is one a compiler's split reduction need not keep."""
    n = mask.shape[-1]
    index = torch.arange(n, device=mask.device, dtype=torch.int32).view(1, n, 1)
    return torch.where(mask == 0, index, n).amin(dim=1).to(torch.int32)


if triton is not None:

    @triton.jit
    def _rows(ptr, offs, offs_d, stride, ok):
        """Rows ``offs`` (d-vectors with row stride ``stride``) of each window: [G, len(offs), D]."""
        return tl.load(ptr + offs[None, :, None] * stride + offs_d[None, None, :], mask=ok, other=0.0)

    @triton.jit
    def _regions(RID, offs_g, g_ok, offs, ok, NW, N, other, HAS_MASK: tl.constexpr):
        """Region ids [G, len(offs)] of tokens ``offs`` of windows ``offs_g`` (zeros, unused, without a mask)."""
        if HAS_MASK:
            r = tl.load(RID + ((offs_g % NW) * N)[:, None] + offs[None, :], mask=g_ok[:, None] & ok[None, :],
                        other=other)
        else:
            r = offs_g[:, None] * 0 + offs[None, :] * 0
        return r

    @triton.jit
    def _scores(q, k, BIAS, h, N, offs_m, offs_n, m_ok, n_ok, r_q, r_k, scale, HAS_MASK: tl.constexpr):
        """q k^T * scale + B (+ M): [G, BM, BN] fp32; the bias tile is read once for the G windows."""
        s = tl.dot(q, tl.permute(k, (0, 2, 1))) * scale
        s += tl.load(BIAS + h * N * N + offs_m[:, None] * N + offs_n[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)[None, :, :]
        if HAS_MASK:
            s = tl.where(r_q[:, :, None] == r_k[:, None, :], s, s + (-100.0))
        return s

    @triton.jit
    def _probabilities(s, lse, gm_ok, n_ok):
        """P = softmax(S) from the forward's log2-sum-exp, zero outside the valid rows and columns."""
        p = tl.exp2(s * 1.4426950408889634 - lse[:, :, None])
        return tl.where(gm_ok[:, :, None] & n_ok[None, None, :], p, 0.0)

    @triton.jit
    def _fwd_kernel(QKV, BIAS, RID, OUT, LSE, B, N, H, NW, scale,
                    HAS_MASK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    G: tl.constexpr):
        # program: (group of G consecutive windows, head) x query block; tiles are [G, rows, cols]
        pid_gh = tl.program_id(0)
        pid_m = tl.program_id(1)
        grp = pid_gh // H
        h = pid_gh % H
        C = H * D
        row = 3 * C                                   # qkv row stride (tokens)
        offs_g = grp * G + tl.arange(0, G)
        g_ok = offs_g < B
        g64 = offs_g.to(tl.int64)
        base = QKV + (g64 * N * row + h * D)[:, None, None]
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < N
        q_ok = g_ok[:, None, None] & m_ok[None, :, None]
        q = _rows(base, offs_m, offs_d, row, q_ok)
        r_q = _regions(RID, offs_g, g_ok, offs_m, m_ok, NW, N, -1, HAS_MASK)
        m_i = tl.full([G, BM], float("-inf"), tl.float32)
        l_i = tl.zeros([G, BM], tl.float32)
        acc = tl.zeros([G, BM, D], tl.float32)
        LOG2E: tl.constexpr = 1.4426950408889634
        for start in range(0, N, BN):
            offs_n = start + tl.arange(0, BN)
            n_ok = offs_n < N
            kv_ok = g_ok[:, None, None] & n_ok[None, :, None]
            k = _rows(base + C, offs_n, offs_d, row, kv_ok)
            v = _rows(base + 2 * C, offs_n, offs_d, row, kv_ok)
            r_k = _regions(RID, offs_g, g_ok, offs_n, n_ok, NW, N, -2, HAS_MASK)
            s = _scores(q, k, BIAS, h, N, offs_m, offs_n, m_ok, n_ok, r_q, r_k, scale, HAS_MASK)
            s = tl.where(n_ok[None, None, :], s * LOG2E, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 2))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, :, None])
            l_i = l_i * alpha + tl.sum(p, 2)
            acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, :, None]
        out = OUT + (g64 * N * C + h * D)[:, None, None]
        tl.store(out + offs_m[None, :, None] * C + offs_d[None, None, :], acc.to(OUT.dtype.element_ty), mask=q_ok)
        tl.store(LSE + ((g64 * H + h) * N)[:, None] + offs_m[None, :], m_i + tl.log2(l_i),
                 mask=g_ok[:, None] & m_ok[None, :])

    @triton.jit
    def _delta_kernel(DOUT, OUT, DELTA, TOTAL, N, H, D: tl.constexpr, BLOCK: tl.constexpr):
        # dO and O viewed as rows [windows * N * H, D] (row r = (window * N + token) * H + head, each D
        # contiguous values); delta[(window * H + head) * N + token] = sum_d dO O, accumulated in fp32
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < TOTAL
        ptrs = offs[:, None] * D + tl.arange(0, D)[None, :]
        do = tl.load(DOUT + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
        o = tl.load(OUT + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
        head = offs % H
        window_token = offs // H
        dst = ((window_token // N) * H + head) * N + window_token % N
        tl.store(DELTA + dst, tl.sum(do * o, axis=1), mask=ok)

    @triton.jit
    def _bwd_dq_kernel(QKV, BIAS, RID, DOUT, LSE, DELTA, DQKV, B, N, H, NW, scale,
                       HAS_MASK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       G: tl.constexpr):
        # program: (group of G windows, head) x query block; walks the key blocks: dQ = dS K (in registers)
        pid_gh = tl.program_id(0)
        pid_m = tl.program_id(1)
        grp = pid_gh // H
        h = pid_gh % H
        C = H * D
        row = 3 * C
        offs_g = grp * G + tl.arange(0, G)
        g_ok = offs_g < B
        g64 = offs_g.to(tl.int64)
        base = QKV + (g64 * N * row + h * D)[:, None, None]
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < N
        q_ok = g_ok[:, None, None] & m_ok[None, :, None]
        gm_ok = g_ok[:, None] & m_ok[None, :]
        rows_gh = (g64 * H + h) * N
        q = _rows(base, offs_m, offs_d, row, q_ok)
        do = _rows(DOUT + (g64 * N * C + h * D)[:, None, None], offs_m, offs_d, C, q_ok)
        lse = tl.load(LSE + rows_gh[:, None] + offs_m[None, :], mask=gm_ok, other=0.0)
        delta = tl.load(DELTA + rows_gh[:, None] + offs_m[None, :], mask=gm_ok, other=0.0)
        r_q = _regions(RID, offs_g, g_ok, offs_m, m_ok, NW, N, -1, HAS_MASK)
        dq = tl.zeros([G, BM, D], tl.float32)
        for start_n in range(0, N, BN):
            offs_n = start_n + tl.arange(0, BN)
            n_ok = offs_n < N
            kv_ok = g_ok[:, None, None] & n_ok[None, :, None]
            k = _rows(base + C, offs_n, offs_d, row, kv_ok)
            v = _rows(base + 2 * C, offs_n, offs_d, row, kv_ok)
            r_k = _regions(RID, offs_g, g_ok, offs_n, n_ok, NW, N, -2, HAS_MASK)
            s = _scores(q, k, BIAS, h, N, offs_m, offs_n, m_ok, n_ok, r_q, r_k, scale, HAS_MASK)
            p = _probabilities(s, lse, gm_ok, n_ok)
            ds = p * (tl.dot(do, tl.permute(v, (0, 2, 1))) - delta[:, :, None])
            dq += tl.dot(ds.to(k.dtype), k)
        dbase = DQKV + (g64 * N * row + h * D)[:, None, None]
        tl.store(dbase + offs_m[None, :, None] * row + offs_d[None, None, :], (dq * scale).to(DQKV.dtype.element_ty),
                 mask=q_ok)

    @triton.jit
    def _bwd_dkv_kernel(QKV, BIAS, RID, DOUT, LSE, DELTA, DQKV, DBIAS, DQ32, B, N, H, NW, scale,
                        HAS_MASK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        G: tl.constexpr, ATOMIC_DQ: tl.constexpr, ATOMIC_DBIAS: tl.constexpr):
        # program: (group of G windows, head) x key block; walks the query blocks:
        # dV = P^T dO, dK = dS^T Q (in registers), and the bias gradient of the group, sum_g dS (fp32);
        # with ATOMIC_DQ also dQ += dS K, added atomically into the fp32 buffer DQ32 [b, n, c]; with ATOMIC_DBIAS
        # the group's bias gradient is added atomically into DBIAS [h, n, n] instead of written to its own slab
        pid_gh = tl.program_id(0)
        pid_n = tl.program_id(1)
        grp = pid_gh // H
        h = pid_gh % H
        C = H * D
        row = 3 * C
        offs_g = grp * G + tl.arange(0, G)
        g_ok = offs_g < B
        g64 = offs_g.to(tl.int64)
        base = QKV + (g64 * N * row + h * D)[:, None, None]
        obase = DOUT + (g64 * N * C + h * D)[:, None, None]
        rows_gh = (g64 * H + h) * N
        if ATOMIC_DBIAS:
            dbias = DBIAS + h.to(tl.int64) * N * N
        else:
            dbias = DBIAS + pid_gh.to(tl.int64) * N * N
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        n_ok = offs_n < N
        kv_ok = g_ok[:, None, None] & n_ok[None, :, None]
        k = _rows(base + C, offs_n, offs_d, row, kv_ok)
        v = _rows(base + 2 * C, offs_n, offs_d, row, kv_ok)
        r_k = _regions(RID, offs_g, g_ok, offs_n, n_ok, NW, N, -2, HAS_MASK)
        dk = tl.zeros([G, BN, D], tl.float32)
        dv = tl.zeros([G, BN, D], tl.float32)
        for start_m in range(0, N, BM):
            offs_m = start_m + tl.arange(0, BM)
            m_ok = offs_m < N
            q_ok = g_ok[:, None, None] & m_ok[None, :, None]
            gm_ok = g_ok[:, None] & m_ok[None, :]
            q = _rows(base, offs_m, offs_d, row, q_ok)
            do = _rows(obase, offs_m, offs_d, C, q_ok)
            lse = tl.load(LSE + rows_gh[:, None] + offs_m[None, :], mask=gm_ok, other=0.0)
            delta = tl.load(DELTA + rows_gh[:, None] + offs_m[None, :], mask=gm_ok, other=0.0)
            r_q = _regions(RID, offs_g, g_ok, offs_m, m_ok, NW, N, -1, HAS_MASK)
            s = _scores(q, k, BIAS, h, N, offs_m, offs_n, m_ok, n_ok, r_q, r_k, scale, HAS_MASK)
            p = _probabilities(s, lse, gm_ok, n_ok)
            dv += tl.dot(tl.permute(p.to(do.dtype), (0, 2, 1)), do)
            ds = p * (tl.dot(do, tl.permute(v, (0, 2, 1))) - delta[:, :, None])
            dk += tl.dot(tl.permute(ds.to(q.dtype), (0, 2, 1)), q)
            if ATOMIC_DQ:
                dq = tl.dot(ds.to(k.dtype), k) * scale
                tl.atomic_add(DQ32 + (g64 * N * C + h * D)[:, None, None] + offs_m[None, :, None] * C
                              + offs_d[None, None, :], dq, mask=q_ok)
            if ATOMIC_DBIAS:
                tl.atomic_add(dbias + offs_m[:, None] * N + offs_n[None, :], tl.sum(ds, 0),
                              mask=m_ok[:, None] & n_ok[None, :])
            else:
                tl.store(dbias + offs_m[:, None] * N + offs_n[None, :], tl.sum(ds, 0),
                         mask=m_ok[:, None] & n_ok[None, :])
        dbase = DQKV + (g64 * N * row + h * D)[:, None, None]
        tl.store(dbase + C + offs_n[None, :, None] * row + offs_d[None, None, :],
                 (dk * scale).to(DQKV.dtype.element_ty), mask=kv_ok)
        tl.store(dbase + 2 * C + offs_n[None, :, None] * row + offs_d[None, None, :],
                 dv.to(DQKV.dtype.element_ty), mask=kv_ok)


def _launch_fwd(qkv: torch.Tensor, bias: torch.Tensor, region: torch.Tensor | None, num_heads: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    qkv = qkv.contiguous()
    bias_c = bias.float().contiguous()
    out = torch.empty(b, n, c, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(b * num_heads, n, device=qkv.device, dtype=torch.float32)
    has_mask = region is not None
    rid = region.contiguous() if has_mask else lse            # placeholder pointer when unused
    nw = region.shape[0] if has_mask else 1
    grid = (triton.cdiv(b, FWD_CONFIG["G"]) * num_heads, triton.cdiv(n, FWD_CONFIG["BM"]))
    _fwd_kernel[grid](qkv, bias_c, rid, out, lse, b, n, num_heads, nw, scale,
                      HAS_MASK=has_mask, D=d, **FWD_CONFIG)
    return out, lse


def _launch_bwd(dout: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, region: torch.Tensor | None,
                out: torch.Tensor, lse: torch.Tensor, num_heads: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = num_heads
    b, n, c3 = qkv.shape
    d = c3 // 3 // h
    qkv, out, lse = qkv.contiguous(), out.contiguous(), lse.contiguous()
    bias_c = bias.float().contiguous()
    dout = dout.contiguous()
    # rowsum(dO * O) per (window, head, token): [b * h, n]
    forms = backward_modes()
    if forms["delta"] == "torch":
        delta = (dout.float() * out.float()).view(b, n, h, d).sum(-1).transpose(1, 2).reshape(b * h, n).contiguous()
    else:
        delta = torch.empty(b * h, n, device=qkv.device, dtype=torch.float32)
        total = b * n * h
        _delta_kernel[(triton.cdiv(total, DELTA_CONFIG["BLOCK"]),)](dout, out, delta, total, n, h, D=d, **DELTA_CONFIG)
    dqkv = torch.empty_like(qkv)
    has_mask = region is not None
    rid = region.contiguous() if has_mask else lse
    nw = region.shape[0] if has_mask else 1
    atomic = forms["dq"] == "atomic"
    if atomic:
        dq32 = torch.zeros(b, n, c3 // 3, device=qkv.device, dtype=torch.float32)
    else:
        dq32 = lse                                                # placeholder pointer when unused
        cfg = DQ_CONFIG
        _bwd_dq_kernel[(triton.cdiv(b, cfg["G"]) * h, triton.cdiv(n, cfg["BM"]))](
            qkv, bias_c, rid, dout, lse, delta, dqkv, b, n, h, nw, scale, HAS_MASK=has_mask, D=d, **cfg)
    cfg = DKV_CONFIG
    groups = triton.cdiv(b, cfg["G"])
    atomic_dbias = forms["dbias"] == "atomic"
    if atomic_dbias:
        dbias = torch.zeros(h, n, n, device=qkv.device, dtype=torch.float32)
    else:
        dbias = torch.empty(groups, h, n, n, device=qkv.device, dtype=torch.float32)   # one slab per group
    _bwd_dkv_kernel[(groups * h, triton.cdiv(n, cfg["BN"]))](
        qkv, bias_c, rid, dout, lse, delta, dqkv, dbias, dq32, b, n, h, nw, scale, HAS_MASK=has_mask, D=d,
        ATOMIC_DQ=atomic, ATOMIC_DBIAS=atomic_dbias, **cfg)
    if atomic:
        dqkv[:, :, : c3 // 3] = dq32
    return dqkv, dbias if atomic_dbias else dbias.sum(0, dtype=torch.float32)


# The kernels as two PyTorch operators (torch.library), so that torch.compile keeps a Swin block in one
# graph around them instead of breaking the graph at every attention call; their backward is registered
# as the forward operator's autograd formula.
@torch.library.custom_op("sslbench::window_attention_fwd", mutates_args=(), device_types="cuda")
def _fwd_op(qkv: torch.Tensor, bias: torch.Tensor, region: torch.Tensor | None, num_heads: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(qkv, bias, region, num_heads, scale)


@_fwd_op.register_fake
def _fwd_fake(qkv, bias, region, num_heads, scale):
    b, n, c3 = qkv.shape
    return qkv.new_empty(b, n, c3 // 3), qkv.new_empty(b * num_heads, n, dtype=torch.float32)


@torch.library.custom_op("sslbench::window_attention_bwd", mutates_args=(), device_types="cuda")
def _bwd_op(dout: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, region: torch.Tensor | None,
            out: torch.Tensor, lse: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(dout, qkv, bias, region, out, lse, num_heads, scale)


@_bwd_op.register_fake
def _bwd_fake(dout, qkv, bias, region, out, lse, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), bias.new_empty(bias.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    qkv, bias, region, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, bias, region, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, bias, region, out, lse = ctx.saved_tensors
    dqkv, dbias = _bwd_op(dout, qkv, bias, region, out, lse, ctx.num_heads, ctx.scale)
    return dqkv, dbias.to(bias.dtype), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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
    return _fwd_op(qkv, bias, region, num_heads, float(scale))[0]


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


__all__ = ["available", "regions_from_mask", "window_attention", "reference", "FWD_CONFIG", "DQ_CONFIG", "DKV_CONFIG",
           "DELTA_CONFIG", "BACKWARD_CHOICES", "backward_modes", "backward_forms", "MASK_VALUE"]
