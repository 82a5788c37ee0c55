"""Will the plan fit? Memory and time of a run's stages, estimated before any work starts.

The estimates are simple, documented models (right within a factor of about 2, enough to tell a plan that
runs in minutes from one that needs days or 50 GB), not predictions to the second:

* **activation memory** = voxels through the backbone per step x feature size x a per-family factor (bytes per
  voxel-channel). The factors come from measured peaks (BENCHMARKS.md, NVIDIA H100, bf16, fused attention):
  VoCo pre-training, 36 crops of 64^3 through the Swin encoder + head at feature size 48: 8.23 GiB ->
  ``encoder`` 17 B; the fine-tuning step, SwinUNETR (encoder + decoder) on 4 x 96^3 at 48: 9.85 GiB ->
  ``segmentation`` 55 B (after the weights and optimiser state below). On the CPU (fp32, MONAI attention)
  both are multiplied by 2.6, the ratio of the same bench's ``monai fp32`` row (23.67 GiB) to ``fused bf16``.
  Paper-preset VoCo on the CPU (80 crops of 64^3) comes to ~41 GiB of activations (~50 GiB with the weights
  and the 200-volume corpus); the run of issue 20 was OOM-killed at 21.7 GB, still growing.
* **weights + optimiser**: 16 bytes a parameter (fp32 weights, gradients, AdamW's two moments); SwinUNETR has
  72.8 M parameters at feature size 48 and scales with its square (4.7 M at 12).
* **pre-training corpus**: the corpus is held resized in memory (on the GPU when there is one): volumes x
  the method's ``input_size`` x 4 bytes (x 2 with label maps).
* **time** = steps x voxels x feature size^2 x seconds per voxel-channel^2, per family and device, divided by
  the number of GPUs: H100 (BENCHMARKS.md) 5.3e-12 s (``encoder``: 0.114 s for 36 x 64^3 at 48) and
  1.8e-11 s (``segmentation``: 0.144 s for 4 x 96^3 at 48); CPU 7e-8 s per core-pair, measured here: one
  fine-tuning step of 64 x 64 x 32 at feature size 12 on a 2-core CPU (~2.7 s on one thread). Validation
  and evaluation are not counted.

A plan is refused (one line: the estimate and the way out) when its memory exceeds 90 % of the memory
available (RAM from /proc/meminfo MemAvailable, or the GPU's) or its time exceeds ``run.feasibility_hours``
(default 72). ``run.feasibility: warn`` (the ``--no-feasibility-check`` flag) prints the same line and goes
on; ``off`` skips the check. Neither key is part of the protocol hash.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import RunError

GIB = 1024 ** 3
#: bytes per voxel-channel of activations, per family, on a GPU (bf16, fused attention) -- see the docstring
ACT_BYTES = {"encoder": 17.0, "segmentation": 55.0}
CPU_MEMORY_FACTOR = 2.6          # fp32 + MONAI attention against bf16 + fused (BENCHMARKS.md fine-tuning bench)
#: seconds per (voxel x feature size^2) of one training step
GPU_SECONDS = {"encoder": 5.3e-12, "segmentation": 1.8e-11}
CPU_SECONDS_2_CORES = 7e-8       # both families; a 2-core CPU (tiny fine-tuning step measured here)
PARAMS_AT_48 = 72.8e6            # SwinUNETR use_v2 at feature size 48
BYTES_PER_PARAM = 16


@dataclass
class Machine:
    """What the run would run on: ``device`` 'cuda' or 'cpu', GPUs used, memory per device, CPU cores."""

    device: str
    gpus: int
    memory: float                  # bytes available to one process: the GPU's, or the RAM available
    cores: int
    name: str = ""


@dataclass
class StageEstimate:
    stage: str                     # pretrain | finetune
    what: str                      # e.g. "voco on voco-corpus"
    steps: int
    voxels: int                    # through the backbone per step
    feature_size: int
    family: str
    memory: float                  # bytes
    seconds: float
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.stage} {self.what}: {self.steps} steps x {self.voxels / 1e6:.2f} M voxels at feature size "
                f"{self.feature_size}: ~{self.memory / GIB:.1f} GiB, ~{_duration(self.seconds)}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def available_ram() -> float:
    """Bytes of RAM available now (/proc/meminfo MemAvailable; else the total physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_memory() -> tuple[int, float, str]:
    """(visible GPUs, bytes of the first, its name); (0, 0, '') without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0, 0.0, ""
    props = torch.cuda.get_device_properties(0)
    return torch.cuda.device_count(), float(props.total_memory), props.name


def machine(run_cfg: Mapping[str, Any], gpus: int | None = None) -> Machine:
    """The machine a run with ``run_cfg`` uses (``run.device``; ``gpus`` processes, default torchrun's
    WORLD_SIZE)."""
    want = str(run_cfg.get("device", "auto"))
    n, mem, name = (0, 0.0, "") if want == "cpu" else gpu_memory()
    world = max(1, int(gpus or os.environ.get("WORLD_SIZE", "1") or 1))
    if n and want != "cpu":
        return Machine("cuda", world, mem, cpu_cores(), name)
    return Machine("cpu", 0, available_ram(), cpu_cores(), "CPU")


def _cube(v) -> int:
    if v is None:
        return 0
    if isinstance(v, (int, float)):
        return int(v) ** 3
    return int(math.prod(int(x) for x in v))


def _feature_size(model: Mapping[str, Any]) -> int:
    name = model.get("name", "swinunetr")
    if name == "unet3d":
        return int((model.get("unet3d") or {}).get("base", 32))
    if name == "basicunet":
        return int((model.get("unet_features") or [32])[0])
    if name == "unetr":
        return max(1, int((model.get("vit") or {}).get("hidden_size", 768)) // 16)
    if name == "unet2d":   # ResNet-18 U-Net (~14 M parameters): the SwinUNETR size of that many parameters
        return 16
    return int(model.get("feature_size", 48))


def _params(f: int) -> float:
    return PARAMS_AT_48 * (f / 48) ** 2


def _act_and_time(voxels: int, f: int, family: str, m: Machine) -> tuple[float, float]:
    act = voxels * f * ACT_BYTES[family] * (1.0 if m.device == "cuda" else CPU_MEMORY_FACTOR)
    if m.device == "cuda":
        per = GPU_SECONDS[family] / max(1, m.gpus)
    else:
        per = CPU_SECONDS_2_CORES * 2 / max(1, min(m.cores, 32))
    return act, voxels * f * f * per


def pretrain_voxels(method: Mapping[str, Any]) -> int:
    """Voxels through the backbone in one pre-training step (VoCo: batch x (random crops + n^2 bases) crops;
    another method: batch x its views per volume x the view size)."""
    pt, p = method.get("pretrain") or {}, method.get("params") or {}
    batch = int(pt.get("batch_size", 1))
    if method.get("name") == "voco":
        crops = batch * (int(p.get("sw_batch_size", 1)) + int(p.get("n", 4)) ** 2)
        return crops * _cube(p.get("crop_size", 64)) * (2 if p.get("variant") == "teacher-student" else 1)
    size = next((p[k] for k in ("crop", "crop_size", "view_size", "global_size") if p.get(k) is not None), None)
    if size is None:
        size = p.get("resize") or p.get("volume_size") or 96
    views = 2 * int(p.get("sw_batch_size", 1)) + int(p.get("num_local", 0))
    return batch * views * _cube(size)


def estimate_pretrain(cfg: Mapping[str, Any], m: Machine, volumes: int | None = None) -> StageEstimate:
    from .methods import get_method_class

    from . import track2d

    method, corpus = cfg["method"], cfg.get("corpus") or {}
    two_d = track2d.is_2d(corpus)
    cls = get_method_class(method["name"], 2 if two_d else 3)
    family = "segmentation" if getattr(cls, "transfers_decoder", False) else "encoder"
    f = _feature_size(cfg["model"])
    voxels = track2d.pretrain_pixels(cfg, cls) if two_d else pretrain_voxels(method)
    steps = int(method["pretrain"]["steps"])
    act, seconds = _act_and_time(voxels, f, family, m)
    notes = []
    if volumes is None:
        volumes = int((corpus.get("data") or {}).get("phantom_total") or (corpus.get("data") or {}).get("phantom_cases")
                      or 0) if corpus.get("phantom") else 0
    size = None
    if cls is not None and not two_d:
        try:
            size = cls.input_size(dict(method.get("params") or {}))
        except Exception:   # an estimate never fails a run
            size = None
    stack = volumes * _cube(size) * 4 * (2 if getattr(cls, "needs_labels", False) else 1) if size else 0
    if stack:
        notes.append(f"corpus in memory: {volumes} volumes, {stack / GIB:.1f} GiB")
    memory = _params(f) * BYTES_PER_PARAM + act + stack
    return StageEstimate("pretrain", f"{method['name']} on {corpus.get('name', '?')}", steps, voxels, f, family,
                         memory, steps * seconds, notes)


def finetune_steps(task: Mapping[str, Any], train_cases: int | None) -> int:
    ft = task.get("finetune") or {}
    if ft.get("max_steps"):
        return int(ft["max_steps"])
    cases = train_cases if train_cases else 1
    return int(ft.get("epochs", 1)) * max(1, cases) // max(1, int(ft.get("batch_size", 1)))


def estimate_finetune(cfg: Mapping[str, Any], m: Machine, train_cases: int | None = None) -> StageEstimate:
    task = cfg["task"]
    ft = task.get("finetune") or {}
    f = _feature_size(cfg["model"])
    if task.get("kind") == "segmentation":
        voxels = int(ft.get("batch_size", 1)) * int(ft.get("num_samples", 1)) * _cube(ft.get("roi") or 96)
        family = "segmentation"
    else:   # classification: the encoder on whole inputs, resized to preprocess.size (2D: pixels)
        voxels = int(ft.get("batch_size", 1)) * _cube((task.get("preprocess") or {}).get("size") or 96)
        family = "encoder"
    steps = finetune_steps(task, train_cases)
    act, seconds = _act_and_time(voxels, f, family, m)
    notes = [] if train_cases or ft.get("max_steps") else ["steps: epochs x 1 case until the data is listed"]
    return StageEstimate("finetune", f"{cfg['run'].get('label', cfg['method']['name'])} on {task['name']}", steps,
                         voxels, f, family, _params(f) * BYTES_PER_PARAM + act, steps * seconds, notes)


def problems(estimates: list[StageEstimate], m: Machine, run_cfg: Mapping[str, Any]) -> list[str]:
    """Why the plan cannot fit ([] when it does)."""
    hours = float(run_cfg.get("feasibility_hours", 72))
    out = []
    where = f"{m.gpus} x {m.name or 'GPU'}" if m.device == "cuda" else f"CPU ({m.cores} cores, no GPU)"
    for e in estimates:
        if e.memory > 0.9 * m.memory:
            kind = "GPU memory" if m.device == "cuda" else "RAM available"
            out.append(f"{e.stage} needs ~{e.memory / GIB:.1f} GiB, {kind} {m.memory / GIB:.1f} GiB")
    total = sum(e.seconds for e in estimates)
    if total > hours * 3600:
        out.append(f"~{_duration(total)} of training on {where}, limit {hours:g} h (run.feasibility_hours)")
    return out


def way_out(run_cfg: Mapping[str, Any], m: Machine) -> str:
    ways = []
    if run_cfg.get("preset") != "tiny":
        ways.append("--preset tiny")
    ways.append("a GPU (--gpus N for several)" if m.device != "cuda" else "--gpus N (more GPUs)")
    ways.append("--no-feasibility-check (or --set run.feasibility=warn) if you know better")
    return ", ".join(ways)


def check(estimates: list[StageEstimate], m: Machine, run_cfg: Mapping[str, Any],
          say: Callable[[str], None] = print) -> list[str]:
    """Refuse (RunError, one line) a plan that cannot fit, unless ``run.feasibility`` is 'warn' (a line and on)
    or 'off'. Returns the problems found."""
    mode = str(run_cfg.get("feasibility", "check"))
    if mode == "off":
        return []
    found = problems(estimates, m, run_cfg)
    if not found:
        return []
    line = (f"infeasible plan: {'; '.join(found)} (estimate: {'; '.join(e.line() for e in estimates)}); "
            f"way out: {way_out(run_cfg, m)}")
    if mode == "warn":
        say(f"warning: {line}")
        return found
    raise RunError(line)


#: optional readers a real dataset's files need: (what the files are, the module, the pip package)
READERS = ((lambda p: p.lower().endswith((".mhd", ".mha")), "MetaImage (.mhd)", "SimpleITK", "SimpleITK"),
           (lambda p: p.lower().endswith(".dcm") or os.path.isdir(p), "DICOM", "pydicom", "pydicom"))


def missing_readers(items: list[Mapping[str, Any]], find=None) -> str | None:
    """One line naming the optional readers that ``items``' image files need and that are not installed
    (None when every one is there). ``find``: importlib.util.find_spec (a test swaps it)."""
    import importlib.util

    find = find or importlib.util.find_spec
    paths = []
    for it in items:
        image = it.get("image")
        paths += [str(x) for x in (image if isinstance(image, (list, tuple)) else [image]) if x is not None]
    out = []
    for claims, what, module, package in READERS:
        example = next((p for p in paths if claims(p)), None)
        if example is not None and find(module) is None:
            out.append(f"{what} files (e.g. {example}) need {module}: pip install {package}")
    return "; ".join(out) or None
