"""GPU benchmarks: pre-training steps, fine-tuning steps and sliding-window inference on synthetic data.

    python -m sslbench.bench pretrain --method voco --variant paper teacher-student --steps 10
    python -m sslbench.bench finetune --attention fused sdpa monai      # SwinUNETR-B, 4 x 96^3, 14 classes
    python -m sslbench.bench infer --attention fused monai              # one 256 x 256 x 160 volume, ROI 96

One step = the method's forward (crops, backbone, loss), backward, the AdamW step (fused on CUDA,
foreach on CPU) and ``after_step`` (e.g. the EMA teacher). Timing: host clock around each step with a
device synchronisation after it (never inside it), median over ``steps`` after ``warmup`` steps. FLOPs:
``torch.utils.flop_counter.FlopCounterMode`` over one extra eager step (matrix products, convolutions and
attention; element-wise work is not counted), so TFLOP/s = counted FLOPs / median step time.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import speed
from .speed import inductor as _inductor

PRECISIONS = ("bf16", "fp32")


# torch.compile modes that capture CUDA graphs (their memory sits in a private pool)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _recipe_params(method: str) -> dict[str, Any]:
    """The ``params`` of methods/<method>.yaml (validated; found in a checkout or an installed wheel)."""
    from . import recipes

    return dict(recipes.load_method(method).get("params") or {})


def phantom_volumes(batch: int, size: Sequence[int], device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic volumes [batch, 1, *size] in [0, 1]: an ellipsoid body with a few blobs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    axes = [torch.linspace(-1, 1, int(s), device=device) for s in size]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    vols = []
    for _ in range(batch):
        r = torch.rand(4, 5, generator=g).tolist()
        body = ((x / 0.9) ** 2 + (y / 0.7) ** 2 + (z / 1.2) ** 2 < 1).float() * 0.3
        for cx, cy, cz, rad, val in r:
            d2 = (x - (cx * 1.2 - 0.6)) ** 2 + (y - (cy * 1.0 - 0.5)) ** 2 + (z - (cz - 0.5)) ** 2
            body = body + (0.3 + 0.5 * val) * torch.exp(-d2 / (2 * (0.05 + 0.15 * rad) ** 2))
        vols.append(body.clamp(0, 1))
    return torch.stack(vols).unsqueeze(1).contiguous()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run, warmup: int, repeats: int, dev: torch.device, reset_peak: bool = False):
    """(times, results, warmup seconds) of ``run(i)``: ``warmup`` calls, then ``repeats`` calls each timed to the
    device's completion (``reset_peak``: the peak-memory counter restarts after the warm-up)."""
    t0 = time.perf_counter()
    for i in range(warmup):
        run(i)
    _sync(dev)
    warmup_s = time.perf_counter() - t0
    if reset_peak and dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, results = [], []
    for i in range(warmup, warmup + repeats):
        t = time.perf_counter()
        results.append(run(i))
        _sync(dev)
        times.append(time.perf_counter() - t)
    return times, results, warmup_s


def top_generated_kernels(averages, limit: int = 12) -> list[tuple[str, float]]:
    """(name, device ms) of the Triton kernels that torch.compile generated (``triton_*``), most time first."""
    rows = []
    for ev in averages:
        ms = getattr(ev, "self_device_time_total", getattr(ev, "self_cuda_time_total", 0.0)) / 1e3
        if ev.key.startswith("triton_") and ms > 0:
            rows.append((ev.key, round(ms, 3)))
    return sorted(set(rows), key=lambda r: -r[1])[:limit]


def inductor_cache_dir() -> Path:
    """Where Inductor writes the source of the kernels it generates."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        return Path(cache_dir())
    except ImportError:   # older torch
        import getpass
        import os
        import tempfile

        return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                    or Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}")


def save_kernel_sources(kernels: Sequence[tuple[str, float]], out_dir: Path, cache: Path | None = None) -> list[Path]:
    """Copy the generated source of each (name, ms) kernel from Inductor's cache into ``out_dir`` as
    ``NN-<ms>ms-<name>.py`` (the newest file that defines it; none found: skipped). Returns the files written."""
    cache = Path(cache) if cache is not None else inductor_cache_dir()
    sources = sorted(cache.rglob("*.py"), key=lambda f: f.stat().st_mtime, reverse=True) if cache.is_dir() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (name, ms) in enumerate(kernels):
        pattern = f"def {name}("
        for src in sources:
            try:
                text = src.read_text(errors="replace")
            except OSError:
                continue
            if pattern in text:
                dest = out_dir / f"{i:02d}-{ms:.2f}ms-{name[:120]}.py"
                dest.write_text(f"# {name}: {ms} ms of device time in the profiled step; source {src}\n" + text)
                written.append(dest)
                break
    return written


def parse_inductor_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs -> torch._inductor.config entries (values read as JSON where they parse: true,
    64, "x"; else kept as text); a key that torch._inductor.config lacks is a one-line error."""
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"sslbench bench: --inductor {pair!r}: expected KEY=VALUE")
        if key not in known:
            raise SystemExit(f"sslbench bench: --inductor {key}: not a torch._inductor.config key")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


def build_method(method: str = "voco", variant: str = "paper", feature_size: int = 48, sw: int = 2, n: int = 4,
                 crop: int = 64, attention: str = "fused", size: Sequence[int] | None = None,
                 use_checkpoint: bool = False, augment: bool = True,
                 model_name: str = "swinunetr") -> tuple[torch.nn.Module, dict[str, Any], tuple[int, ...]]:
    """The pre-training method a benchmark times, at the benchmark geometry: (module on the CPU, its params,
    the input volume size). VoCo: ``sw`` random crops + n*n bases of ``crop``^3 from volumes of ``size``
    (default n * 1.5 * crop in x-y and crop in z); another method: its recipe's paper params, where
    ``variant`` / ``attention`` apply where it has them."""
    from . import recipes
    from .methods import get_method_class

    cls = get_method_class(method)
    if cls is None:
        raise ValueError(f"unknown method {method!r}")
    params = _recipe_params(method)
    if method == "voco":
        params.update(variant=variant, n=n, sw_batch_size=sw, crop_size=crop, attention=attention, augment=augment)
        if size is None:
            side = n * int(round(1.5 * crop))
            size = (side, side, crop)
        params["resize"] = list(size)
    else:
        params.update({k: v for k, v in dict(variant=variant, attention=attention).items() if k in params})
        if size is not None and "resize" in params:
            params["resize"] = list(size)
        size = cls.input_size(params) if size is None else size
        if size is None:
            raise ValueError(f"method {method!r}: input_size is None; pass --size X Y Z")
    model_cfg = {**recipes.load_defaults()["model"], "name": model_name, "feature_size": feature_size,
                 "use_v2": True, "use_checkpoint": use_checkpoint}
    model = cls(params, model_cfg)
    speed.apply(model)                 # as the protocol does once it has built a method
    return model, params, tuple(int(s) for s in size)


def disk_stream(spec: Mapping[str, Any], size: Sequence[int], batch: int, seed: int, dist, dev: torch.device):
    """The streaming loader ``bench pretrain --from-disk`` times: ``spec`` {corpus, root, cases, workers,
    memory_mb} names a corpus recipe (at its paper values; ``cases``: its phantom count) and the loader settings."""
    from . import protocol, recipes
    from .data.corpus import corpus_items

    corpus = recipes.load_task(str(spec.get("corpus") or "phantom-corpus"))
    if spec.get("cases"):
        corpus["data"]["phantom_cases"] = int(spec["cases"])
    _, _, items = corpus_items(corpus, spec.get("root"), log=lambda *_: None)
    cfg = {"run": {"seed": seed, "cache": "read", "loader_workers": int(spec.get("workers") or 0),
                   "loader_memory_mb": float(spec.get("memory_mb") or 2048)},
           "corpus": corpus, "method": {"name": "bench", "pretrain": {"batch_size": batch}}}
    stream = protocol.pretrain_stream(cfg, None, items, size, False, dist, dev, log=print)
    if dist.is_main:
        print(stream.plan.describe(), flush=True)
    return stream


def restores_torch_switches(fn):
    """``fn`` with torch's process-wide switches that a benchmark sets (cuDNN autotuning, TF32 matmuls and
    convolutions) restored when it returns or raises: a benchmark run in-process (a test, a notebook) leaves the
    process as it found it."""
    import functools

    @functools.wraps(fn)
    def restoring(*args, **kwargs):
        before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        try:
            return fn(*args, **kwargs)
        finally:
            (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32) = before

    return restoring


@restores_torch_switches
def bench_pretrain(method: str = "voco", variant: str = "paper", feature_size: int = 48, batch: int = 2,
                   sw: int = 2, n: int = 4, crop: int = 64, steps: int = 10, warmup: int = 3,
                   precision: str = "bf16", compile: bool = False, device: str = "cuda",
                   attention: str = "fused", size: Sequence[int] | None = None, use_checkpoint: bool = False,
                   augment: bool = True, lr: float = 1e-4, seed: int = 0, profile: bool = False,
                   compile_mode: str | None = None, model_name: str = "swinunetr",
                   inductor: Mapping[str, Any] | None = None,
                   from_disk: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Time real pre-training steps of ``method`` and return the figures as a dict.

    Geometry: ``batch`` volumes of ``size`` (default n * 1.5 * crop in x-y and crop in z: 384x384x64 for
    n=4, crop=64), ``sw`` random crops + n*n bases each, every crop resized to crop^3.

    ``from_disk`` ({corpus, root, cases, workers, memory_mb}): every step takes a new batch from the streaming
    loader over that corpus's case cache (built on first use), as ``method.pretrain.loader=stream`` does; the
    step time then includes waiting for it, reported as ``data_wait`` (fraction of step time), beside the
    loader's own rate without training (``loader_volumes_per_s``).
    """
    if inductor:   # torch._inductor.config entries for this run (compilation happens in the warm-up steps)
        args = dict(locals(), inductor=None)           # the parameters: nothing else is bound yet
        import torch._inductor.config as inductor_config

        _inductor.configure()                          # sslbench's settings first, so that these override them
        with inductor_config.patch(dict(inductor)):
            out = bench_pretrain(**args)
        out["inductor"] = dict(inductor)
        return out
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS} (fp16 would need a GradScaler)")
    from . import distributed
    from .protocol.runtime import plain_float

    dist = distributed.setup(device)
    dev = distributed.device_for(dist, torch.device(device))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    model, params, size = build_method(method, variant=variant, feature_size=feature_size, sw=sw, n=n, crop=crop,
                                       attention=attention, size=size, use_checkpoint=use_checkpoint,
                                       augment=augment, model_name=model_name)
    model = model.to(dev).train()
    if compile:
        from .speed.compile import channels_last

        channels_last(model)           # what speed.compile_method does, done before the optimizer and DDP see them
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_kw = {"fused": True} if dev.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(trainable, lr=lr, **opt_kw)
    stream = batches = None
    if from_disk is not None:
        stream = disk_stream(from_disk, size, batch, seed, dist, dev)
        batches = stream.batches(0, 10 ** 9)
        volumes = plain_float(next(batches)).to(dev)   # as the protocol hands batches to a method
    else:
        volumes = phantom_volumes(batch, size, dev, seed=seed + dist.rank)
    current = {"volumes": volumes}
    model.prepare(phantom_volumes(max(batch, 8), size, dev, seed=seed + 1), seed)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    run_model = distributed.wrap(model, dist, dev)   # DDP under torchrun (gradients all-reduced every step)

    def step(i: int) -> torch.Tensor:
        with autocast:
            loss, _ = run_model(current["volumes"], i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(i)
        return loss.detach()

    from torch.utils.flop_counter import FlopCounterMode

    # FLOPs are counted with SDPA window attention (FlopCounterMode does not see inside Triton kernels), so
    # that TFLOP/s of the fused and SDPA forms divide the same work
    fused = [m for m in model.modules() if getattr(m, "kernel", None) == "fused"]
    for m in fused:
        m.kernel = "sdpa"
    counter = FlopCounterMode(display=False)
    with counter:
        step(0)
    for m in fused:
        m.kernel = "fused"
    flops = float(counter.get_total_flops())
    _sync(dev)

    compile_check = None
    t_start = time.perf_counter()       # warm-up time includes compiling (in the compiled probe step)
    if compile:
        # the compiled step must compute the eager step's loss: the same weights, batch and random crops
        # through both (forward only), before any compiled step runs
        from .protocol import seeded_probe

        bf16 = precision == "bf16"
        eager_loss = seeded_probe(lambda: float(model(volumes, 0)[0].detach()), bf16, dev, seed + 7919)
        # compile_parts: its backbones went channels-last before the optimizer held any state (above)
        encoders_only = bool(getattr(model, "compile_parts", ()))
        speed.compile_method(model, mode=compile_mode)
        compiled_loss = seeded_probe(lambda: float(model(volumes, 0)[0].detach()), bf16, dev, seed + 7919)
        compile_check = {"eager_loss": eager_loss, "compiled_loss": compiled_loss,
                         "rel_diff": abs(compiled_loss - eager_loss) / max(abs(eager_loss), 1e-12),
                         # a compiled forward draws its random crops / masks with Inductor's generator, not
                         # eager's: then the two losses score different samples and only inform
                         "loss_check_applies": encoders_only}
        if getattr(model, "feature_encoders", None):
            compile_check["feature_rel_diff"] = seeded_probe(lambda: speed.compile_agreement(model, volumes), bf16,
                                                             dev, seed + 7919)
    for i in range(warmup):
        if batches is not None:
            current["volumes"] = plain_float(next(batches)).to(dev, non_blocking=True)
        step(1 + i)
    _sync(dev)
    warmup_s = time.perf_counter() - t_start
    if dev.type == "cuda":
        torch.cuda.empty_cache()       # a CUDA-graph row reports reserved memory: not the probe's cached blocks
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses, waits = [], [], []
    for i in range(steps):
        t0 = time.perf_counter()
        if batches is not None:
            current["volumes"] = plain_float(next(batches)).to(dev, non_blocking=True)
            waits.append(time.perf_counter() - t0)
        losses.append(step(1 + warmup + i))
        _sync(dev)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times) if times else float("nan")
    disk: dict[str, Any] = {}
    if stream is not None:
        drain = stream.batches(0, max(steps, 4) + 1)
        next(drain)                                   # workers started: time the steady rate
        t0 = time.perf_counter()
        drained = sum(1 for _ in drain)
        loader_s = time.perf_counter() - t0
        disk = {"from_disk": dict(from_disk), "corpus_volumes": len(stream),
                "data_wait": sum(waits) / sum(times) if times else float("nan"),
                "loader_workers": stream.plan.workers, "loader_prefetch": stream.plan.prefetch,
                "loader_bound_mb": stream.plan.bound_bytes / 2 ** 20,
                "loader_volumes_per_s": drained * batch / loader_s if loader_s > 0 else float("nan")}
    profile_table = None
    profile_kernels: list[tuple[str, float]] = []
    if profile:   # one more step under the profiler: where the device time goes, by kernel / operator
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as _profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with _profile(activities=acts) as prof:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")   # any host sync inside the step is printed
            step(1 + warmup + steps)
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
            _sync(dev)
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        profile_table = averages.table(sort_by=key, row_limit=40, max_name_column_width=70)
        if dev.type == "cuda":   # the generated kernels that took the most device time, for reading
            profile_kernels = top_generated_kernels(averages)
    if dev.type == "cuda":
        card = torch.cuda.get_device_name(dev)
        if compile and compile_mode in CUDA_GRAPH_MODES:
            # CUDA graphs keep the step's tensors in a private pool filled during warm-up; replays allocate
            # nothing, so the allocated peak after warm-up would miss them: report what the process holds.
            peak_gib = torch.cuda.max_memory_reserved(dev) / 2**30
            peak_kind = "torch.cuda.max_memory_reserved (CUDA graph pool)"
        else:
            peak_gib = torch.cuda.max_memory_allocated(dev) / 2**30
            peak_kind = "torch.cuda.max_memory_allocated"
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
        card = platform.processor() or platform.machine() or "cpu"
        peak_kind = "host max RSS"
    try:
        import monai

        monai_version = monai.__version__
    except ImportError:
        monai_version = None
    crops_per_step = batch * (sw + n * n) if method == "voco" else batch
    return {
        "method": method, "model": model_name, "variant": variant if method == "voco" or "variant" in params else None, "attention": attention, "precision": precision,
        **(_backward_modes() if attention == "fused" else {}),
        "compile": (compile_mode or "default") if compile else False,
        **({"inductor_settings": _inductor.current()} if compile else {}),
        "use_checkpoint": bool(use_checkpoint), "augment": bool(augment),
        "feature_size": feature_size, "batch": batch, **({"sw": sw, "n": n, "crop": crop} if method == "voco" else {}), "size": list(size),
        "crops_per_step": crops_per_step, "steps": steps, "warmup": warmup,
        "step_s": step_s, "step_s_min": min(times) if times else float("nan"),
        "step_s_max": max(times) if times else float("nan"),
        "world_size": dist.world_size, "volumes_per_s": dist.world_size * batch / step_s, "tflop_per_step": flops / 1e12, "tflops": flops / step_s / 1e12,
        "peak_gib": peak_gib, "peak_kind": peak_kind, "warmup_s": warmup_s,
        "loss_first": float(losses[0]) if losses else None, "loss_last": float(losses[-1]) if losses else None,
        **_validity(losses, compile_check),
        "params_trainable": sum(p.numel() for p in trainable),
        "device": str(dev), "card": card, "torch": torch.__version__, "monai": monai_version,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **disk,
        **({"profile": profile_table} if profile_table is not None else {}),
        **({"profile_kernels": profile_kernels} if profile_kernels else {}),
    }


def chest_images(batch: int, size: Sequence[int], device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """``batch`` smooth grey images ``[B, 1, H, W]`` in [0, 1] (a blurred random field: what the 2D
    track's stack holds, without a dataset), generated on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    low = torch.rand(batch, 1, max(size[0] // 16, 2), max(size[1] // 16, 2), generator=g)
    img = torch.nn.functional.interpolate(low, size=tuple(size), mode="bilinear", align_corners=False)
    return img.clamp_(0, 1).to(device)


@restores_torch_switches
def bench_pretrain2d(method: str = "c2l", batch: int = 64, size: Sequence[int] = (224, 224), steps: int = 20,
                     warmup: int = 5, precision: str = "bf16", device: str = "cuda", seed: int = 0,
                     task: str = "chestxray14") -> dict[str, Any]:
    """Time real 2D pre-training steps of ``method`` (the ChestX-ray14 track, Table 4) and return the figures.

    The method is built as ``sslbench run --method M --task chestxray14 --preset paper`` builds it (its recipe's
    ``two_d`` form, PCRL's ResNet-18 U-Net, the protocol's optimizer), then every step takes ``batch`` images of
    ``size`` through it (forward, backward, optimizer step, after_step), timed with device synchronisation.
    images/s = batch / median step time; the data path is the protocol's GPU-resident image stack, so no
    loader time is included (there is none in the protocol's 2D pre-training either)."""
    from . import recipes
    from .protocol import track2d
    from .protocol.optim import pretrain_optimizer

    dev = _bench_device(precision, device, seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = recipes.resolve(method, task=task, preset="paper",
                          overrides=[f"method.pretrain.batch_size={batch}",
                                     f"corpus.preprocess.size=[{size[0]}, {size[1]}]"])
    cls = track2d.method_class(cfg)
    model = cls(dict(cfg["method"].get("params") or {}), cfg["model"])
    speed.apply(model)
    model = model.to(dev).train()
    model.prepare(chest_images(max(batch, 64), size, dev, seed=seed + 1), seed)   # e.g. TransVW's visual words
    opt = pretrain_optimizer(model, cfg["method"]["pretrain"], dev)
    images = chest_images(batch, size, dev, seed=seed)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(i: int) -> torch.Tensor:
        with autocast:
            loss, _ = model(images, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(i)
        return loss.detach()

    times, losses, warmup_s = _timed(step, warmup, steps, dev, reset_peak=True)
    step_s = statistics.median(times)
    return {"method": method, "form": cls.__name__, "model": cfg["model"]["name"], "precision": precision,
            "batch": batch, "size": list(size), "steps": steps, "warmup": warmup,
            "step_s": step_s, "step_s_min": min(times), "step_s_max": max(times), "images_per_s": batch / step_s,
            "warmup_s": warmup_s, "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
            **_validity(losses, None),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **_env_fields(dev)}


#: largest relative difference between the compiled and the eager loss of the same step that still counts as
#: the same computation (bf16: the projection head's BatchNorm amplifies rounding where a unit varies little)
COMPILE_LOSS_TOLERANCE = 0.05


def _backward_modes() -> dict[str, str]:
    """How the fused attention's backward computes dQ, delta and the bias gradient, as row fields."""
    from .speed import window_attention

    return {f"{key}_mode": mode for key, mode in window_attention.backward_modes().items()}


def _validity(losses: Sequence[torch.Tensor], compile_check: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fields that say whether a timing row measured a sound computation: every timed loss finite and, when
    compiled, the compiled probe step's loss within COMPILE_LOSS_TOLERANCE of the eager one (methods that
    compile their encoders only) and its backbone features as close to the eager (or fp32) computation as
    ``protocol.compiled_feature_problems`` asks (the same judgement ``run.compile`` pre-training makes before
    its first step)."""
    from .protocol import compiled_feature_problems

    problems = []
    out: dict[str, Any] = {"loss_finite": all(math.isfinite(float(v)) for v in losses) if losses else None}
    if out["loss_finite"] is False:
        problems.append("a timed loss is not finite")
    if compile_check is not None:
        out["compile_check"] = dict(compile_check)
        rel = compile_check["rel_diff"]
        if not math.isfinite(rel) or (compile_check.get("loss_check_applies", True) and rel > COMPILE_LOSS_TOLERANCE):
            problems.append(f"compiled loss {compile_check['compiled_loss']:.6g} differs from the eager "
                            f"{compile_check['eager_loss']:.6g} (relative {rel:.3g} > {COMPILE_LOSS_TOLERANCE})")
        problems += compiled_feature_problems(compile_check.get("feature_rel_diff") or {})
    out["valid"] = not problems
    if problems:
        out["invalid_because"] = "; ".join(problems)
    return out


def _env_fields(dev: torch.device) -> dict[str, Any]:
    """Card / software fields of a benchmark row (peak memory: device allocator, or host RSS on CPU)."""
    if dev.type == "cuda":
        peak, card, kind = torch.cuda.max_memory_allocated(dev) / 2**30, torch.cuda.get_device_name(dev), \
            "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        card, kind = platform.processor() or platform.machine() or "cpu", "host max RSS"
    try:
        import monai
        monai_version = monai.__version__
    except ImportError:
        monai_version = None
    return {"peak_gib": peak, "peak_kind": kind, "device": dev.type, "card": card, "torch": torch.__version__,
            "monai": monai_version, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _bench_device(precision: str, device: str, seed: int) -> torch.device:
    """Check ``precision``, seed, and set up the device of a fine-tuning / inference benchmark."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r}; expected one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    return dev


def _swinunetr(feature_size: int, classes: int, attention: str, dev: torch.device) -> torch.nn.Module:
    from .models.backbones import build_model
    from .protocol import use_run_attention

    net = build_model({"name": "swinunetr", "feature_size": feature_size, "use_v2": True}, 1, classes)
    use_run_attention(net, {"attention": attention})
    return net.to(dev)


@restores_torch_switches
def bench_finetune(feature_size: int = 48, batch: int = 4, roi: int = 96, classes: int = 14, steps: int = 10,
                   warmup: int = 3, precision: str = "bf16", attention: str = "fused", device: str = "cuda",
                   compile: bool = False, seed: int = 0) -> dict[str, Any]:
    """Time fine-tuning steps as the protocol takes them: SwinUNETR (use_v2) on ``batch`` random crops of
    roi^3 with random labels of ``classes`` classes, DiceCE (MONAI, softmax, one-hot labels), AdamW (fused on
    CUDA) and autocast as ``precision`` says; median of ``steps`` after ``warmup``."""
    from monai.losses import DiceCELoss

    from .protocol import autocast, compiled, make_optimizer

    dev = _bench_device(precision, device, seed)
    net = _swinunetr(feature_size, classes, attention, dev)
    forward = compiled(net, {"compile": compile})     # as run.compile does in the protocol
    opt = make_optimizer(net.parameters(), 1e-4, 1e-5, dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.rand(batch, 1, roi, roi, roi, device=dev)
    y = torch.randint(0, classes, (batch, 1, roi, roi, roi), device=dev)
    bf16 = precision == "bf16"

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast(bf16, dev):
            loss = loss_fn(forward(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    times, losses, warmup_s = _timed(lambda _: step(), warmup, steps, dev)
    loss = losses[-1]
    step_s = statistics.median(times)
    return {"bench": "finetune", "model": "swinunetr", "feature_size": feature_size, "batch": batch, "roi": roi,
            "classes": classes, "precision": precision, "attention": attention,
            "compile": bool(compile),
            **({"inductor_settings": _inductor.current()} if compile else {}), "steps": steps, "warmup": warmup, "step_s": step_s,
            "step_s_min": min(times), "step_s_max": max(times), "warmup_s": warmup_s, "loss_last": float(loss),
            **_env_fields(dev)}


@restores_torch_switches
def bench_infer(feature_size: int = 48, size: Sequence[int] = (256, 256, 160), roi: int = 96, classes: int = 14,
                overlap: float = 0.5, sw_batch_size: int = 4, mode: str = "gaussian", repeats: int = 3,
                precision: str = "bf16", attention: str = "fused", device: str = "cuda", compile: bool = False,
                agreement: bool = True, seed: int = 0) -> dict[str, Any]:
    """Time MONAI's sliding-window inference of one synthetic volume of ``size`` (``phantom_volumes``) through
    SwinUNETR (eval, no grad) as the protocol's evaluation runs it; median of ``repeats`` after one warm-up
    pass (which also compiles, with ``compile``).

    With ``agreement``, the same weights are also run the reference way (MONAI's attention, fp32, no compile)
    and the label maps (argmax over classes) are compared: ``agreement_dice`` is the mean over classes of the
    Dice (%) between this configuration's labels and the reference's, ``agreement_voxels`` the fraction of
    voxels with the same label. The weights are random (no trained model ships with the benchmark), which
    makes this a strict check: untrained logits sit close together, so rounding flips labels more easily
    than in a trained network."""
    from monai.inferers import sliding_window_inference

    from .protocol import autocast, compiled

    dev = _bench_device(precision, device, seed)
    net = _swinunetr(feature_size, classes, attention, dev).eval()
    forward = compiled(net, {"compile": compile})     # as run.compile does in the protocol
    image = phantom_volumes(1, size, dev, seed=seed)
    bf16 = precision == "bf16"

    @torch.no_grad()
    def run(model=forward, low_precision=bf16) -> torch.Tensor:
        with autocast(low_precision, dev):
            return sliding_window_inference(image, (roi,) * 3, sw_batch_size, model, overlap=overlap, mode=mode)

    last: dict[str, torch.Tensor] = {}   # one output held at a time, as a plain loop would

    def timed_run(_: int) -> None:
        last["out"] = run()

    times, _, warmup_s = _timed(timed_run, 1, repeats, dev)
    out = last.pop("out")
    row = {"bench": "infer", "model": "swinunetr", "feature_size": feature_size, "size": list(size), "roi": roi,
           "classes": classes, "overlap": overlap, "sw_batch_size": sw_batch_size, "mode": mode,
           "precision": precision, "attention": attention, "compile": bool(compile),
           **({"inductor_settings": _inductor.current()} if compile else {}), "repeats": repeats,
           "volume_s": statistics.median(times), "volume_s_min": min(times), "volume_s_max": max(times),
           "warmup_s": warmup_s, "output_shape": list(out.shape), **_env_fields(dev)}
    if agreement:
        labels = out.argmax(1)
        del out
        reference_net = _swinunetr(feature_size, classes, "monai", dev).eval()
        reference_net.load_state_dict(net.state_dict())
        reference = run(reference_net, False).argmax(1)
        row.update(label_agreement(labels, reference, classes))
    return row


def label_agreement(labels: torch.Tensor, reference: torch.Tensor, classes: int) -> dict[str, float]:
    """How far label map ``labels`` is from ``reference`` (same shape, integer classes): the mean over the
    classes present in either map of Dice 2|A∩B|/(|A|+|B|) in %, and the fraction of equal voxels."""
    if labels.shape != reference.shape:
        raise ValueError(f"label maps differ in shape: {tuple(labels.shape)} vs {tuple(reference.shape)}")
    dices = []
    for c in range(classes):
        a, b = labels == c, reference == c
        total = int(a.sum()) + int(b.sum())
        if total:
            dices.append(200.0 * int((a & b).sum()) / total)
    return {"agreement_dice": float(sum(dices) / len(dices)) if dices else 100.0,
            "agreement_voxels": float((labels == reference).float().mean())}


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [("method", "method"), ("model", "model"), ("world_size", "procs"), ("variant", "variant"), ("attention", "attn"), ("precision", "prec"), ("compile", "compile"),
            ("use_checkpoint", "ckpt"), ("volumes_per_s", "vol/s"), ("step_s", "s/step"),
            ("tflop_per_step", "TFLOP/step"), ("tflops", "TFLOP/s"), ("peak_gib", "peak GiB"), ("valid", "valid")]
    if any("data_wait" in r for r in rows):   # --from-disk
        cols += [("data_wait", "data wait"), ("loader_volumes_per_s", "loader vol/s")]
    lines = [[h for _, h in cols]]
    for r in rows:
        if "error" in r:
            lines.append([str(r.get("variant")), str(r.get("attention")), str(r.get("precision")),
                          str(r.get("compile")), "", "ERROR: " + r["error"][:80]])
            continue
        line = []
        for key, _ in cols:
            v = r.get(key)
            line.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append(line)
    widths = [max(len(l[i]) for l in lines if i < len(l)) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(l)) for l in lines)


def _main_finetune_infer(args: argparse.Namespace) -> int:
    """``bench finetune`` / ``bench infer``: one row per attention x precision, a table and the JSON."""
    rows: list[dict[str, Any]] = []
    for attention in args.attention:
        for precision in args.precision:
            common = {"feature_size": args.feature_size, "roi": args.roi, "classes": args.classes,
                      "precision": precision, "attention": attention, "device": args.device}
            try:
                if args.what == "finetune":
                    row = bench_finetune(batch=args.batch, steps=args.steps, warmup=args.warmup,
                                         compile=args.compile, **common)
                else:
                    row = bench_infer(size=args.size, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                      repeats=args.repeats, compile=args.compile,
                                      agreement=not args.no_agreement, **common)
            except Exception as exc:  # keep the other configurations (an OOM must not end the table)
                traceback.print_exc()
                row = {"bench": args.what, "attention": attention, "precision": precision,
                       "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            rows.append(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    key = "step_s" if args.what == "finetune" else "volume_s"
    for r in rows:
        figure = f"{r[key]:.4f} s" if key in r else r.get("error", "")
        peak = f"{r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
        agree = f"  agreement_dice={r['agreement_dice']:.3f}%" if "agreement_dice" in r else ""
        print(f"{args.what}  attention={r['attention']}  precision={r['precision']}  compile={r.get('compile')}  "
              f"{key}={figure}  peak={peak}{agree}")
    text = json.dumps(rows, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if any("error" in r for r in rows) else 0


def _main_pretrain2d(args: argparse.Namespace) -> int:
    """`sslbench bench pretrain2d`: one row per method (an error row where one fails), a table and JSON."""
    rows = []
    for method in args.method:
        try:
            row = bench_pretrain2d(method, batch=args.batch, size=args.size, steps=args.steps, warmup=args.warmup,
                                   precision=args.precision, device=args.device)
        except Exception as exc:  # keep the other methods' rows (an OOM must not end the table)
            traceback.print_exc()
            row = {"method": method, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    from tabulate import tabulate

    cols = ("method", "form", "batch", "size", "step_s", "images_per_s", "peak_gib", "loss_first", "loss_last", "error")
    print(tabulate([[r.get(c, "") for c in cols] for r in rows], headers=cols, floatfmt=".4g"))
    text = json.dumps(rows, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if any("error" in r or r.get("valid") is False for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sslbench bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    raw = list(argv) if argv is not None else sys.argv[1:]
    return run(ap.parse_args(raw), raw)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The sub-commands and options of `sslbench bench` (its own parser, or the sub-command of sslbench's)."""
    from .speed import window_attention

    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pretrain", help="time pre-training steps of a method")
    p.add_argument("--method", default="voco")
    p.add_argument("--variant", nargs="+", default=["paper"], help="one or more variants to time")
    p.add_argument("--attention", nargs="+", default=["fused"], choices=["fused", "sdpa", "monai"])
    forms = window_attention.BACKWARD_CHOICES
    p.add_argument("--dq-mode", default=None, choices=forms["dq"],
                   help="fused attention backward: dQ by its own kernel or by atomics (window_attention.backward_forms' dq)")
    p.add_argument("--delta-mode", default=None, choices=forms["delta"],
                   help="fused attention backward: rowsum(dO O) by its Triton kernel or by torch ops "
                        "(window_attention.backward_forms' delta)")
    p.add_argument("--dbias-mode", default=None, choices=forms["dbias"],
                   help="fused attention backward: the bias gradient as per-group slabs summed by torch or added "
                        "with atomics (window_attention.backward_forms' dbias)")
    p.add_argument("--precision", nargs="+", default=["bf16"], choices=list(PRECISIONS))
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone + head")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                   help="torch._inductor.config entries for --compile runs, e.g. coordinate_descent_tuning=true")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the Swin blocks")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--model", default="swinunetr", choices=["swinunetr", "unet3d", "unetr"],
                   help="backbone family (methods/<m>.yaml says which ones a method supports)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--sw", type=int, default=2)
    p.add_argument("--grid", "--n", dest="n", type=int, default=4, help="VoCo: n x n base crops")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--size", type=int, nargs=3, default=None, help="volume size X Y Z")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="print a profiler table of one more step")
    p.add_argument("--kernels-out", type=Path, default=None, metavar="DIR",
                   help="with --profile --compile: copy the source of the slowest generated kernels here")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="time DistributedDataParallel steps on N local GPUs (torchrun); vol/s is then global")
    p.add_argument("--from-disk", action="store_true",
                   help="each step reads a new batch through the streaming loader (method.pretrain.loader=stream) "
                        "from the case cache of --corpus (built on first use): data_wait, loader_volumes_per_s")
    p.add_argument("--corpus", default="phantom-corpus", help="--from-disk: the corpus recipe")
    p.add_argument("--corpus-root", default=None, help="--from-disk: the corpus root (phantoms: written on first use)")
    p.add_argument("--corpus-cases", type=int, default=None, help="--from-disk: phantom volumes (data.phantom_cases)")
    p.add_argument("--loader-workers", type=int, default=0, help="--from-disk: run.loader_workers (0: cores - 1)")
    p.add_argument("--loader-memory-mb", type=float, default=2048, help="--from-disk: run.loader_memory_mb")
    q = sub.add_parser("pretrain2d", help="time 2D pre-training steps of methods (the ChestX-ray14 track, Table 4)")
    q.add_argument("--method", nargs="+", default=["mg", "transvw", "c2l", "simsiam", "pcrlv1", "pcrlv2", "voco"],
                   help="one or more methods with a 2D form (default: Table 4's pre-trained rows)")
    q.add_argument("--batch", type=int, default=64, help="images per step (PCRL's 2D setting: 64)")
    q.add_argument("--size", type=int, nargs=2, default=[224, 224], help="image size H W (PCRL's: 224 224)")
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--warmup", type=int, default=5)
    q.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.add_argument("--json", type=Path, default=None, help="also write the results here")
    for what, help_text in (("finetune", "time fine-tuning steps of SwinUNETR (the protocol's step)"),
                            ("infer", "time sliding-window inference of one volume")):
        q = sub.add_parser(what, help=help_text)
        q.add_argument("--attention", nargs="+", default=["fused"], choices=["fused", "sdpa", "monai"])
        q.add_argument("--precision", nargs="+", default=["bf16"], choices=list(PRECISIONS))
        q.add_argument("--feature-size", type=int, default=48)
        q.add_argument("--roi", type=int, default=96)
        q.add_argument("--classes", type=int, default=14)
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--json", type=Path, default=None, help="also write the results here")
        q.add_argument("--compile", action="store_true", help="torch.compile the network")
        if what == "finetune":
            q.add_argument("--batch", type=int, default=4)
            q.add_argument("--steps", type=int, default=10)
            q.add_argument("--warmup", type=int, default=3)
        else:
            q.add_argument("--no-agreement", action="store_true",
                           help="skip the label-map comparison with the fp32 MONAI-attention reference")
            q.add_argument("--size", type=int, nargs=3, default=[256, 256, 160], help="volume size X Y Z")
            q.add_argument("--overlap", type=float, default=0.5)
            q.add_argument("--sw-batch-size", type=int, default=4)
            q.add_argument("--repeats", type=int, default=3)


def _pretrain_rows(args: argparse.Namespace, inductor: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``bench_pretrain`` row per variant x attention x precision (an error row where one fails)."""
    from . import distributed

    rows: list[dict[str, Any]] = []
    for variant in args.variant:
        for attention in args.attention:
            for precision in args.precision:
                try:
                    row = bench_pretrain(method=args.method, variant=variant, feature_size=args.feature_size,
                                         batch=args.batch, sw=args.sw, n=args.n, crop=args.crop,
                                         steps=args.steps, warmup=args.warmup, precision=precision,
                                         compile=args.compile, device=args.device, attention=attention,
                                         size=args.size, use_checkpoint=args.checkpointing,
                                         augment=not args.no_augment, profile=args.profile,
                                         compile_mode=args.compile_mode, model_name=args.model,
                                         inductor=inductor,
                                         from_disk={"corpus": args.corpus, "root": args.corpus_root,
                                                    "cases": args.corpus_cases, "workers": args.loader_workers,
                                                    "memory_mb": args.loader_memory_mb} if args.from_disk else None)
                except Exception as exc:  # keep the other configurations (an OOM must not end the table)
                    traceback.print_exc()
                    row = {"variant": variant, "attention": attention, "precision": precision,
                           "compile": args.compile, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                table = row.pop("profile", None)
                if table:
                    print(f"== profile: {variant} / {attention} / {precision}\n{table}", flush=True)
                if args.kernels_out and row.get("profile_kernels"):
                    where = args.kernels_out / f"{variant}-{attention}-{precision}"
                    for f in save_kernel_sources(row["profile_kernels"], where):
                        print(f"kernel source: {f}", flush=True)
                rows.append(row)
                if distributed.current().is_main:
                    print(json.dumps(row), file=sys.stderr, flush=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return rows


def run(args: argparse.Namespace, raw: Sequence[str]) -> int:
    """The benchmark of parsed options (``raw``: the command's own arguments, for the torchrun re-launch)."""
    if args.what in ("finetune", "infer"):
        return _main_finetune_infer(args)
    if args.what == "pretrain2d":
        return _main_pretrain2d(args)
    if args.gpus and int(__import__("os").environ.get("WORLD_SIZE", "1")) <= 1:
        from .distributed import launch

        return launch(args.gpus, ["bench", *list(raw)])
    from . import distributed
    from .speed import window_attention

    inductor = parse_inductor_options(args.inductor)
    # the fused attention's backward forms for these rows only (restored afterwards)
    with window_attention.backward_forms(dq=args.dq_mode, delta=args.delta_mode, dbias=args.dbias_mode):
        rows = _pretrain_rows(args, inductor)
    if not distributed.current().is_main:
        distributed.cleanup()
        return 1 if any("error" in r for r in rows) else 0
    print(_table(rows))
    text = json.dumps(rows, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    distributed.cleanup()
    for r in rows:
        if r.get("valid") is False:
            print(f"INVALID measurement ({r.get('variant')} / {r.get('attention')} / {r.get('precision')}): "
                  f"{r['invalid_because']}", file=sys.stderr)
    return 1 if any("error" in r or r.get("valid") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
