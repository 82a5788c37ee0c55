"""SwinUNETR's encoder1 / encoder2 residual blocks and InstanceNorm3d at VoCo's batch (36 crops), on a GPU.

    python benchmarks/swin_encoder_blocks.py eager compiled cl-eager cl-compiled compiled-force pooled-compiled

Prints the mean milliseconds (10 calls after 3 warm-up calls) of forward + backward and of a no-grad
forward per block and mode, under bf16 autocast with cuDNN benchmark mode: ``eager``, ``compiled``
(torch.compile, static shapes), ``cl-*`` (the block and its input in channels_last_3d), ``compiled-force``
(Inductor's layout optimisation forced on), ``pooled-*`` (encoder1 only: sslbench's ``pooled_input_block``, the
pooled output from the crop's statistics, as the teacher-student variant computes it; the JSON also gives its
difference from the module, both in bf16, against the module in fp32). PROFILE=1 prints a kernel table
of one forward + backward per block and mode. encoder1 takes the crops [36, 1, 64^3] (its 1-channel
convolution switched to sslbench's matmul form, as the teacher-student variant does), encoder2 the
stage-0 map [36, 48, 32^3]. Figures: BENCHMARKS.md, section "VoCo pre-training".
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch._inductor.config as inductor_config

from sslbench.speed import inductor


def mean_ms(fn, steps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def closures(block: torch.nn.Module, x: torch.Tensor, mode: str):
    """(forward + backward, no-grad forward) of ``block`` on ``x`` in ``mode``."""
    from sslbench.speed import pooled_stem as V

    if "cl" in mode.split("-"):
        block = block.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    if "pooled" in mode.split("-"):
        def fn(t, block=block):
            return V.pooled_input_block(block, t)
    else:
        fn = block
    fn = inductor.compile(fn) if "compiled" in mode else fn

    def train():
        with torch.autocast("cuda", torch.bfloat16):
            y = fn(x)
        y.float().mean().backward()

    def forward():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            fn(x)

    return train, forward


def main(modes: list[str]) -> int:
    from monai.networks.nets import SwinUNETR

    from sslbench.speed import pooled_stem as V

    torch.backends.cudnn.benchmark = True
    net = SwinUNETR(in_channels=1, out_channels=1, feature_size=48, use_v2=True).cuda()
    V.use_single_channel_convs(net.encoder1)
    inputs = {"encoder1": (net.encoder1, torch.rand(36, 1, 64, 64, 64, device="cuda")),
              "encoder2": (net.encoder2, torch.randn(36, 48, 32, 32, 32, device="cuda"))}
    result = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name, (block, x) in inputs.items():
        for mode in modes:
            inductor_config.force_layout_optimization = "force" in mode
            if "pooled" in mode and not V.is_pooled_input_block(block):
                continue
            torch._dynamo.reset()
            train, forward = closures(block, x, mode)
            result[f"{name} {mode} fwd+bwd ms"] = round(mean_ms(train), 2)
            result[f"{name} {mode} fwd (no grad) ms"] = round(mean_ms(forward), 2)
            if os.environ.get("PROFILE"):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    train()
                    torch.cuda.synchronize()
                print(f"== {name} {mode} fwd+bwd")
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=90))
            inductor_config.force_layout_optimization = False
            print(f"{name:9} {mode:15} fwd+bwd {result[f'{name} {mode} fwd+bwd ms']:8.2f} ms   "
                  f"fwd {result[f'{name} {mode} fwd (no grad) ms']:7.2f} ms", flush=True)
    block, x = inputs["encoder1"]
    with torch.autocast("cuda", torch.bfloat16):
        ref, fast = block(x).float().mean(dim=(2, 3, 4)), V.pooled_input_block(block, x)
    with torch.no_grad():
        ref32 = block(x).mean(dim=(2, 3, 4))
    result["encoder1 pooled vs module, bf16: max |diff| / max |fp32|"] = float((fast - ref).abs().max() / ref32.abs().max())
    result["encoder1 module bf16 vs fp32: max |diff| / max |fp32|"] = float((ref - ref32).abs().max() / ref32.abs().max())
    result["encoder1 pooled bf16 vs fp32: max |diff| / max |fp32|"] = float((fast - ref32).abs().max() / ref32.abs().max())
    del ref, fast, ref32
    x = torch.randn(36, 48, 64, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    norm = torch.nn.InstanceNorm3d(48)
    for mode, fn in (("eager", norm), ("compiled", inductor.compile(norm))):
        def step(fn=fn):
            fn(x).float().mean().backward()
        result[f"InstanceNorm3d 36x48x64^3 bf16 {mode} fwd+bwd ms"] = round(mean_ms(step), 2)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or ["eager", "compiled"]))
