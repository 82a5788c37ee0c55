"""Swin window attention kernels at the shapes of VoCo's official geometry: fused (Triton) against SDPA.

    python benchmarks/window_attention_kernels.py [--sweep] [--json OUT.json]

For each Swin stage of SwinUNETR-B on 36 crops of 64^3 (stage 1: 36 x 125 windows x 3 heads of 343
tokens, shifted-window mask; ...; stage 4: 36 windows x 24 heads of 64 tokens, no mask) it prints the
median time of a forward (no grad) and of a forward + backward (gradients to qkv and the bias) of
``sslbench.speed.window_attention`` and of ``scaled_dot_product_attention`` with the bias + mask materialised as
the ``sdpa`` form of sslbench/methods/voco.py computes it. ``--sweep`` first tries launch configurations of
the three fused kernels on the stage-1 shape and keeps the fastest of each (to re-tune on another card;
copy the winners into FWD_CONFIG / DQ_CONFIG / DKV_CONFIG). ``fused-atomic`` rows time the backward whose dK/dV
kernel also accumulates dQ with atomics (``backward_forms(dq="atomic")``) instead of a dQ kernel of its own;
``fused-deltatorch`` rows the backward whose delta = rowsum(dO O) comes from torch ops
(``backward_forms(delta="torch")``) instead of its Triton kernel (the default); ``fused-dbias-atomic`` rows the backward that adds the bias
gradient with atomics (``backward_forms(dbias="atomic")``) instead of per-group slabs. Needs CUDA + Triton.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F

from sslbench.speed import window_attention as W

#: (windows, heads, windows per crop, tokens) of the four stages for 36 crops of 64^3, head dim 16
STAGES = {"stage1": (36 * 125, 3, 125, 343), "stage2": (36 * 27, 6, 27, 343),
          "stage3": (36 * 8, 12, 8, 343), "stage4": (36, 24, 1, 64)}


def median_ms(fn, steps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


#: the fused rows: the backward's default forms, then each optional form on its own
DEFAULT_MODES = {key: choices[0] for key, choices in W.BACKWARD_CHOICES.items()}
FUSED_FORMS = {"fused": {}, "fused-atomic": {"dq": "atomic"}, "fused-deltatorch": {"delta": "torch"},
               "fused-dbias-atomic": {"dbias": "atomic"}}


def case(b: int, h: int, nw: int, n: int, kernel: str, seed: int = 0):
    """(forward, forward + backward) closures of one kernel on random inputs of one stage."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    d, c = 16, 16 * h
    qkv = torch.randn(b, n, 3 * c, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    table = torch.randn(h, n, n, device="cuda", generator=g, requires_grad=True)
    region = torch.randint(0, 4, (nw, n), device="cuda", generator=g, dtype=torch.int32) if nw > 1 else None
    grad = torch.randn(b, n, c, device="cuda", generator=g).to(torch.bfloat16)

    def run(bias):
        if kernel.startswith("fused"):
            return W.window_attention(qkv, bias, region, h, d ** -0.5)
        q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        if region is not None:
            mask = torch.where(region[:, :, None] == region[:, None, :], 0.0, W.MASK_VALUE)
            full = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, nw * h, n, n)
            q, k, v = (t.reshape(b // nw, nw * h, n, d) for t in (q, k, v))
        else:
            full = bias.unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=full.to(q.dtype).contiguous(), scale=d ** -0.5)
        return out.reshape(b, h, n, d).transpose(1, 2).reshape(b, n, c)

    forms = {**DEFAULT_MODES, **FUSED_FORMS.get(kernel, {})}   # the fused backward's forms, for this row only

    def forward():
        with torch.no_grad():
            run(table)

    def forward_backward():
        qkv.grad, table.grad = None, None
        with W.backward_forms(**forms):
            run(table * 1.0).backward(grad)

    return forward, forward_backward


def sweep() -> dict:
    """Try launch configurations of the three fused kernels on the stage-1 shape; keep the fastest."""
    _, fb = case(*STAGES["stage1"], "fused")
    found = {}
    spaces = {"FWD_CONFIG": ((2, 4, 8), (16, 32, 64), (16, 32, 64)),
              "DQ_CONFIG": ((2, 4, 8), (16, 32, 64), (16, 32, 64)),
              "DKV_CONFIG": ((2, 4, 8, 16), (16, 32, 64), (16, 32, 64))}
    for name, (gs, bms, bns) in spaces.items():
        cfg = getattr(W, name)
        best = (median_ms(fb), dict(cfg))
        for g, bm, bn, warps in itertools.product(gs, bms, bns, (4, 8)):
            if not 2048 <= g * bm * bn <= 8192:
                continue
            cfg.update(G=g, BM=bm, BN=bn, num_warps=warps, num_stages=2)
            try:
                t = median_ms(fb, steps=6, warmup=2)
            except Exception as exc:   # a configuration the compiler rejects (registers, shared memory)
                print(f"{name} {cfg}: {type(exc).__name__}")
                continue
            if t < best[0]:
                best = (t, dict(cfg))
        cfg.clear()
        cfg.update(best[1])
        found[name] = best[1]
        print(f"{name} = {best[1]}  (stage-1 forward + backward {best[0]:.2f} ms)", flush=True)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="re-tune the fused kernels' launch configurations first")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if not (torch.cuda.is_available() and W.triton is not None):
        raise SystemExit("window_attention_kernels: needs CUDA and Triton")
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.sweep:
        result["configs"] = sweep()
    result["configs_used"] = {k: dict(getattr(W, k)) for k in ("FWD_CONFIG", "DQ_CONFIG", "DKV_CONFIG")}
    result["configs_used"]["DELTA_CONFIG"] = dict(W.DELTA_CONFIG)
    result["configs_used"]["backward_modes"] = {k: {**DEFAULT_MODES, **v} for k, v in FUSED_FORMS.items()}
    print(f"{'stage':8} {'kernel':18} {'fwd ms':>8} {'fwd+bwd ms':>11}")
    for stage, shape in STAGES.items():
        for kernel in (*FUSED_FORMS, "sdpa"):
            f, fb = case(*shape, kernel)
            row = {"fwd_ms": round(median_ms(f), 3), "fwd_bwd_ms": round(median_ms(fb), 3)}
            result[f"{stage} {kernel}"] = row
            print(f"{stage:8} {kernel:18} {row['fwd_ms']:8.2f} {row['fwd_bwd_ms']:11.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
