"""Compiled against eager, piece by piece, for VoCo's teacher-student backbone (SwinUNETR encoder, fs 48).

    python benchmarks/compile_agreement.py [--inductor comprehensive_padding=true] [--fp32] [--grad]
        [--steps K] [--json PATH] [--device cuda] [--feature-size 48]

One batch of VoCo views (2 volumes x (2 crops + 16 bases) = 36 crops of 64^3, bf16 autocast unless --fp32, no
autograd unless --grad). Every piece (patch embedding, each Swin stage and its v2 residual block, the output
norms, encoder1 in its pooled form, encoders 2-4 and 10, the whole backbone) is compiled on its own through
sslbench.speed.inductor.compile (sslbench's Inductor settings, then the --inductor overrides) and run on the eager
pipeline's input; each line prints max |compiled - eager| / max |eager| of its output (nan: the compiled
output is not finite). In bf16 a faithful compile differs by under ~1 %; a piece far above that computes a
different function. For the Swin stages it also prints whether the stage's qkv rows are 128-byte aligned
(Inductor's comprehensive padding pads misaligned strides; see sslbench/speed/inductor.py).

--steps K then trains an eager and a compiled copy (backbones and heads compiled as ``run.compile`` does) in
lockstep for K steps on the same crops and prints both losses per step. The JSON is rewritten after every
piece and step (``complete`` says whether the run ended). Figures: BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
import torch._dynamo
import torch._inductor.config as inductor_config

from sslbench import speed
from sslbench.bench import build_method, parse_inductor_options, phantom_volumes
from sslbench.methods import voco as V
from sslbench.speed import inductor
from sslbench.speed.compile import max_relative_difference
from sslbench.speed.pooled_stem import pooled_input_block


def pieces(model: V.VoCo, views: torch.Tensor, grad: bool, autocast, element_bytes: int, rows: list,
           save=lambda: None) -> list[dict]:
    """Each piece compiled alone on the eager pipeline's input, appended to ``rows`` as {piece, rel_diff, ...}
    (``save()`` after each, so that a run stopped by a time limit keeps what it measured)."""
    from sslbench.speed.fast_swin import keep_sdpa_out_of_compile

    keep_sdpa_out_of_compile(model)
    backbone = model.backbone
    swin = backbone.swinViT

    def check(name: str, fn, *inputs, **extra) -> torch.Tensor:
        with torch.set_grad_enabled(grad), autocast:
            eager = fn(*inputs)
            compiled = inductor.compile(fn)(*inputs)
        rows.append({"piece": name, "rel_diff": max_relative_difference(compiled, eager), **extra})
        save()
        print(f"{name:18} {rows[-1]['rel_diff']:10.3g}" + "".join(f"   {k} {v}" for k, v in extra.items()), flush=True)
        return eager.detach()

    h = check("patch_embed", lambda v: swin.pos_drop(swin.patch_embed(v)), views)
    stages = [h]
    for i in range(1, 5):
        if swin.use_v2:
            h = check(f"layers{i}c", getattr(swin, f"layers{i}c")[0], h.contiguous())
        layer = getattr(swin, f"layers{i}")[0]
        b, c, *spatial = h.shape
        windows = [min(7, s) for s in spatial]
        tokens = math.prod(windows)
        row_bytes = tokens * 3 * c * element_bytes       # one window's qkv rows: its stride in the [windows, n, 3c] tensor
        h = check(f"layers{i}", layer, h.contiguous(), qkv_window_bytes=row_bytes, aligned_128=row_bytes % 128 == 0)
        stages.append(h)
    hs = [check(f"proj_out{i}", lambda t: swin.proj_out(t, True), stages[i]) for i in (0, 1, 2, 4)]
    if hasattr(backbone.encoder1, "pooled_forward"):
        check("encoder1 (pooled)", lambda v: pooled_input_block(backbone.encoder1, v), views)
    else:
        check("encoder1", lambda v: backbone.encoder1(v).mean(dim=(2, 3, 4)), views)
    for name, x in zip(("encoder2", "encoder3", "encoder4", "encoder10"), hs):
        check(name, getattr(backbone, name), x)
    check("backbone", backbone.forward, views)
    return rows


def lockstep(model: V.VoCo, volumes: torch.Tensor, steps: int, autocast, rows: list, save=lambda: None) -> list[dict]:
    """Eager and compiled copies trained side by side on the same crops (AdamW 1e-4): their losses per step,
    appended to ``rows`` (``save()`` after each step)."""
    eager, comp = model, copy.deepcopy(model)
    speed.compile_method(comp)
    fused = {"fused": True} if volumes.is_cuda else {}
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, **fused) for m in (eager, comp)]
    for step in range(steps):
        losses = []
        for m, opt in zip((eager, comp), opts):
            torch.manual_seed(1000 + step)
            with autocast:
                loss, _ = m(volumes, step)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            m.after_step(step)
            losses.append(float(loss.detach()))
        rel = abs(losses[1] - losses[0]) / max(abs(losses[0]), 1e-12) if math.isfinite(losses[1]) else float("nan")
        rows.append({"step": step, "eager_loss": losses[0], "compiled_loss": losses[1], "rel_diff": rel})
        print(f"step {step}: loss eager {losses[0]:.6f} compiled {losses[1]:.6f} (relative {rel:.3g})", flush=True)
        save()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="torch._inductor.config entries over sslbench's settings")
    ap.add_argument("--fp32", action="store_true", help="no autocast, no TF32")
    ap.add_argument("--grad", action="store_true", help="run the pieces with autograd on")
    ap.add_argument("--steps", type=int, default=0, help="then K lockstep training steps, eager against compiled")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--feature-size", type=int, default=48)
    args = ap.parse_args()
    options = parse_inductor_options(args.inductor)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.fp32
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    inductor.configure()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not args.fp32)
    torch.manual_seed(0)
    model, _, size = build_method("voco", variant="teacher-student", feature_size=args.feature_size)
    model = model.to(dev).train()
    volumes = phantom_volumes(2, size, dev, seed=0)          # the official geometry, as bench pretrain times it
    model.prepare(phantom_volumes(8, size, dev, seed=1), 0)
    torch.manual_seed(5)
    views, _ = model.make_views(volumes)
    t0 = time.perf_counter()
    with inductor_config.patch(options):
        settings = inductor.current()
        print(f"Inductor settings {settings}  overrides {options}  precision {'fp32' if args.fp32 else 'bf16'}  "
              f"autograd {args.grad}", flush=True)
        result = {"card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "inductor_settings": settings,
                  "inductor_overrides": options, "precision": "fp32" if args.fp32 else "bf16", "grad": args.grad,
                  "feature_size": args.feature_size, "pieces": [], "lockstep": [], "complete": False}

        def save() -> None:
            result["seconds"] = round(time.perf_counter() - t0, 1)
            if args.json:
                with open(args.json + ".tmp", "w") as f:
                    json.dump(result, f, indent=1)
                os.replace(args.json + ".tmp", args.json)

        pieces(model, views, args.grad, autocast, 4 if args.fp32 else 2, result["pieces"], save)
        if args.steps:
            lockstep(model, volumes, args.steps, autocast, result["lockstep"], save)
        result["complete"] = True
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
