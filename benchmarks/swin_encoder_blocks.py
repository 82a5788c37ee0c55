"""SwinUNETR's encoder1 / encoder2 residual blocks and InstanceNorm3d at VoCo's batch (36 crops), on a GPU.

    python benchmarks/swin_encoder_blocks.py eager compiled cl-eager cl-compiled compiled-force

Prints the mean milliseconds (10 calls after 3 warm-up calls) of forward + backward and of a no-grad
forward per block and mode, under bf16 autocast with cuDNN benchmark mode: ``eager``, ``compiled``
(torch.compile, static shapes), ``cl-*`` (the block and its input in channels_last_3d), ``compiled-force``
(Inductor's layout optimisation forced on). encoder1 takes the crops [36, 1, 64^3] (its 1-channel
convolution switched to sslbench's matmul form, as the teacher-student variant does), encoder2 the
stage-0 map [36, 48, 32^3]. Figures: BENCHMARKS.md, section "VoCo pre-training".
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch._inductor.config as inductor_config


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
    if "cl" in mode.split("-"):
        block = block.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    fn = torch.compile(block, dynamic=False) if "compiled" in mode else block

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

    from sslbench.methods import voco as V

    torch.backends.cudnn.benchmark = True
    net = SwinUNETR(in_channels=1, out_channels=1, feature_size=48, use_v2=True).cuda()
    V.use_single_channel_convs(net.encoder1)
    inputs = {"encoder1": (net.encoder1, torch.rand(36, 1, 64, 64, 64, device="cuda")),
              "encoder2": (net.encoder2, torch.randn(36, 48, 32, 32, 32, device="cuda"))}
    result = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name, (block, x) in inputs.items():
        for mode in modes:
            inductor_config.force_layout_optimization = "force" in mode
            torch._dynamo.reset()
            train, forward = closures(block, x, mode)
            result[f"{name} {mode} fwd+bwd ms"] = round(mean_ms(train), 2)
            result[f"{name} {mode} fwd (no grad) ms"] = round(mean_ms(forward), 2)
            inductor_config.force_layout_optimization = False
            print(f"{name:9} {mode:15} fwd+bwd {result[f'{name} {mode} fwd+bwd ms']:8.2f} ms   "
                  f"fwd {result[f'{name} {mode} fwd (no grad) ms']:7.2f} ms", flush=True)
    x = torch.randn(36, 48, 64, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    norm = torch.nn.InstanceNorm3d(48)
    for mode, fn in (("eager", norm), ("compiled", torch.compile(norm, dynamic=False))):
        def step(fn=fn):
            fn(x).float().mean().backward()
        result[f"InstanceNorm3d 36x48x64^3 bf16 {mode} fwd+bwd ms"] = round(mean_ms(step), 2)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or ["eager", "compiled"]))
