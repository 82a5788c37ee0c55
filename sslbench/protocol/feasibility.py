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
  fine-tuning step of 64 x 64 x 32 at feature size 12 on a 2-core CPU (~2.7 s on one thread).
* **validation and evaluation** (:func:`estimate_validation`) = sliding-window passes (the periodic validations,
  one every ``finetune.val_every`` steps and one at the last step, plus the final evaluation) x validation cases
  x windows per case (MONAI's ``sliding_window_inference`` grid for the case's shape, ROI and
  ``evaluate.overlap``) x the forward share of a training step (:data:`FORWARD_SHARE` = 1/3: the backward pass
  costs about twice the forward). Case shapes come from the cache (exact) or the NIfTI headers resampled to
  ``preprocess.spacing`` (before the foreground crop: an upper bound); phantoms not written yet are taken at
  the generator's grid (:data:`PHANTOM_GRID`). Memory: the sliding window's output and count maps (classes + 1
  float32 volumes of the largest case) on top of the fine-tuning's. Metric time (HD95 / NSD distance maps) is
  not counted.
* **pre-processing** (:func:`estimate_preprocessing`): every case not in the case cache is loaded, resampled
  and windowed once per run (``run.cache: read``): :data:`PREPROCESS_SECONDS` per source voxel on one core,
  phantoms not written yet :data:`PHANTOM_SECONDS` per case, over ``min(cores, 8)`` loader threads (measured
  on the 2-core machine, 2026-12-03: 0.075 CPU s to pre-process a 96 x 96 x 48 phantom, 0.18-0.21 CPU s to
  synthesise one). A fine-tuning holds its pre-processed cases in memory (image and label, float32).

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

from .. import tasks
from ..errors import RunError

GIB = 1024 ** 3
#: bytes per voxel-channel of activations, per family, on a GPU (bf16, fused attention) -- see the docstring
ACT_BYTES = {"encoder": 17.0, "segmentation": 55.0}
CPU_MEMORY_FACTOR = 2.6          # fp32 + MONAI attention against bf16 + fused (BENCHMARKS.md fine-tuning bench)
#: seconds per (voxel x feature size^2) of one training step
GPU_SECONDS = {"encoder": 5.3e-12, "segmentation": 1.8e-11}
CPU_SECONDS_2_CORES = 7e-8       # both families; a 2-core CPU (tiny fine-tuning step measured here)
PARAMS_AT_48 = 72.8e6            # SwinUNETR use_v2 at feature size 48
BYTES_PER_PARAM = 16
FORWARD_SHARE = 1 / 3            # a forward pass (validation) against a training step (forward + backward)
PREPROCESS_SECONDS = 1.7e-7      # one core: load + resample + window, per voxel of the source image
PHANTOM_SECONDS = 0.2            # one core: synthesise and write one phantom case
#: a phantom case as the generator writes it (sslbench/data/phantoms/base.py: 96 x 96 x 40..56 voxels of about
#: 3.0-3.9 mm in-plane and 3.5-6 mm between slices): (shape, spacing), used before the phantoms are written
PHANTOM_GRID = ((96, 96, 48), (3.4, 3.4, 4.5))
HEADER_SAMPLE = 50               # NIfTI headers read per stage at most (the rest extrapolated from them)


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
    detail: str = ""               # validate / preprocess: what is counted, in words (replaces steps x voxels)

    def line(self) -> str:
        size = self.detail or (f"{self.steps} steps x {self.voxels / 1e6:.2f} M voxels at feature size "
                               f"{self.feature_size}")
        return f"{self.stage} {self.what}: {size}: ~{self.memory / GIB:.1f} GiB, ~{_duration(self.seconds)}"


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


def _seconds_per_unit(family: str, m: Machine) -> float:
    if m.device == "cuda":
        return GPU_SECONDS[family] / max(1, m.gpus)
    return CPU_SECONDS_2_CORES * 2 / max(1, min(m.cores, 32))


def _act_and_time(voxels: int, f: int, family: str, m: Machine) -> tuple[float, float]:
    act = voxels * f * ACT_BYTES[family] * (1.0 if m.device == "cuda" else CPU_MEMORY_FACTOR)
    return act, voxels * f * f * _seconds_per_unit(family, m)


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
    from ..methods import get_method_class

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
    voxels, family = tasks.kind_of(task).step_input(task)   # what one step feeds the model, and its family
    steps = finetune_steps(task, train_cases)
    act, seconds = _act_and_time(voxels, f, family, m)
    notes = [] if train_cases or ft.get("max_steps") else ["steps: epochs x 1 case until the data is listed"]
    return StageEstimate("finetune", f"{cfg['run'].get('label', cfg['method']['name'])} on {task['name']}", steps,
                         voxels, f, family, _params(f) * BYTES_PER_PARAM + act, steps * seconds, notes)


def sliding_windows(shape, roi, overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` runs over one image of spatial ``shape``: the image padded
    to at least ``roi``, a window every ``int(roi x (1 - overlap))`` voxels (the whole ROI where it equals the
    padded size), the last one flush with the border (``monai.data.utils.dense_patch_slices``)."""
    from monai.data.utils import dense_patch_slices

    padded = [max(int(s), int(r)) for s, r in zip(shape, roi)]
    interval = [int(r) if int(r) == p else max(1, int(int(r) * (1 - float(overlap)))) for p, r in zip(padded, roi)]
    return len(dense_patch_slices(padded, [int(r) for r in roi], interval))


def validation_passes(steps: int, val_every: int | None) -> int:
    """Passes over the validation split in a fine-tuning of ``steps`` steps: one every ``val_every`` steps and
    one at the last step (as the training loop validates), plus the final evaluation."""
    steps, every = int(steps), int(val_every or 0)
    periodic = 0 if every <= 0 else steps // every + (1 if steps % every else 0)
    return periodic + 1


def resampled_shape(shape, zooms, spacing) -> tuple[int, ...]:
    """The spatial shape of an image of ``shape`` voxels of ``zooms`` mm once resampled to ``spacing`` mm."""
    return tuple(max(1, int(round(int(n) * float(z) / float(s)))) for n, z, s in zip(shape, zooms, spacing))


def estimate_validation(cfg: Mapping[str, Any], m: Machine, shapes: list, steps: int | None = None,
                        notes: list[str] | None = None) -> StageEstimate:
    """Time and memory of the validations and the final evaluation of a fine-tuning (see the module docstring).

    ``shapes``: the spatial shape of each validation case at ``preprocess.spacing``; ``steps``: the
    fine-tuning's steps (default :func:`finetune_steps` of the recipe)."""
    task = cfg["task"]
    ft, ev = task.get("finetune") or {}, task.get("evaluate") or {}
    f = _feature_size(cfg["model"])
    steps = finetune_steps(task, None) if steps is None else int(steps)
    passes = validation_passes(steps, ft.get("val_every"))
    if tasks.kind_of(task).volumes:
        roi = [int(r) for r in (ft.get("roi") or [96, 96, 96])]
        windows = sum(sliding_windows(s, roi, float(ev.get("overlap", 0.5))) for s in shapes)
        voxels = windows * math.prod(roi)
        batch = int(ev.get("sw_batch_size", 1)) * math.prod(roi)
        classes = len(task.get("classes") or [0, 1])
        largest = max((math.prod(int(x) for x in s) for s in shapes), default=0)
        family = "segmentation"
        detail = (f"{passes} pass(es) x {len(shapes)} case(s), {windows} windows of {'x'.join(map(str, roi))} "
                  f"a pass")
    else:   # e.g. classification: one forward of each case, resized to preprocess.size
        voxels = len(shapes) * _cube((task.get("preprocess") or {}).get("size") or 96)
        batch, classes, largest, family = voxels // max(1, len(shapes)), 0, 0, "encoder"
        detail = f"{passes} pass(es) x {len(shapes)} case(s)"
    act = batch * f * ACT_BYTES[family] * FORWARD_SHARE * (1.0 if m.device == "cuda" else CPU_MEMORY_FACTOR)
    memory = _params(f) * BYTES_PER_PARAM + act + largest * (classes + 1) * 4
    seconds = passes * voxels * f * f * _seconds_per_unit(family, m) * FORWARD_SHARE
    return StageEstimate("validate", f"{cfg['run'].get('label', cfg['method']['name'])} on {task['name']}", passes,
                         voxels, f, family, memory, seconds, list(notes or []), detail=detail)


def estimate_preprocessing(recipe: Mapping[str, Any], m: Machine, sources: list, to_write: int = 0,
                           held: list | None = None, notes: list[str] | None = None,
                           stage: str = "preprocess") -> StageEstimate:
    """Time (and memory held) of pre-processing a stage's cases (see the module docstring).

    ``sources``: the voxel count of each source image to pre-process (cases in the cache left out);
    ``to_write``: phantom cases to synthesise first; ``held``: the spatial shapes of the pre-processed cases a
    fine-tuning keeps in memory (image + label, float32), [] for a pre-training (its corpus is counted there)."""
    workers = max(1, min(m.cores, 8))
    voxels = int(sum(int(v) for v in sources))
    seconds = (voxels * PREPROCESS_SECONDS + int(to_write) * PHANTOM_SECONDS) / workers
    memory = sum(math.prod(int(x) for x in s) for s in (held or [])) * 4 * 2
    detail = (f"{len(sources)} case(s), {voxels / 1e6:.1f} M source voxels"
              + (f", {to_write} phantom(s) to write first" if to_write else "")
              + (f", {len(held)} held in memory" if held else ""))
    return StageEstimate(stage, str(recipe.get("name", "?")), len(sources), voxels, 0, "", memory, seconds,
                         list(notes or []), detail=detail)


def image_grid(item: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[float, ...], int] | None:
    """(spatial shape, voxel size in mm, channels) of a case's image from its NIfTI header(s) (a list of files:
    one channel each), or None for another format (DICOM folder, .mhd)."""
    image = item.get("image")
    files = list(image) if isinstance(image, (list, tuple)) else [image]
    first = str(files[0]) if files and files[0] is not None else ""
    if not first.lower().endswith((".nii", ".nii.gz")):
        return None
    try:
        import nibabel as nib

        header = nib.load(first).header
    except Exception:   # an estimate never fails a run (the case checks name a bad file)
        return None
    shape, zooms = header.get_data_shape(), header.get_zooms()
    channels = (int(shape[3]) if len(shape) > 3 else 1) * len(files)
    return tuple(int(x) for x in shape[:3]), tuple(float(z) for z in zooms[:3]), channels



def case_sizes(recipe: Mapping[str, Any], items: list[Mapping[str, Any]] | None, run_cfg: Mapping[str, Any],
               with_label: bool, cases: int = 0) -> tuple[list[int], list[tuple[int, ...]], int, list[str]]:
    """What pre-processing and validation will meet in a stage's cases: (source voxels of each case to
    pre-process, the spatial shape of every case at ``preprocess.spacing``, phantom cases to write, notes).

    A case in the cache (``run.cache`` read / write) costs no pre-processing and has its exact shape; another
    is sized from its NIfTI header (at most :data:`HEADER_SAMPLE` headers read, the rest taken alike); ``items``
    None (phantoms not written yet): ``cases`` cases of :data:`PHANTOM_GRID`, all to write."""
    spacing = (recipe.get("preprocess") or {}).get("spacing") or [1.5, 1.5, 1.5]
    if items is None:
        shape, zooms = PHANTOM_GRID
        n = int(cases)
        return [math.prod(shape)] * n, [resampled_shape(shape, zooms, spacing)] * n, n, []
    cache = None
    if str(run_cfg.get("cache", "read")) != "none":
        from ..data.cache import CaseCache

        cache = CaseCache(recipe, with_label=with_label)
    step = max(1, math.ceil(len(items) / HEADER_SAMPLE))
    sampled, unknown = [], 0
    for it in items[::step]:
        image = cache.files(it)[0] if cache is not None else None
        if image is not None and image.is_file():
            import numpy as np

            sampled.append((0, tuple(int(x) for x in np.load(image, mmap_mode="r").shape[1:])))
            continue
        grid = image_grid(it)
        if grid is None:
            unknown += 1
            continue
        shape, zooms, channels = grid
        sampled.append((math.prod(shape) * channels, resampled_shape(shape, zooms, spacing)))
    notes = []
    if unknown:
        notes.append(f"{unknown} of {len(items[::step])} cases looked at are not NIfTI: sized like the others")
    if not sampled:
        return [], [], 0, notes + ["case sizes unknown (no NIfTI header): pre-processing and validation not counted"]
    full = [sampled[i % len(sampled)] for i in range(len(items))]
    return [v for v, _ in full if v], [s for _, s in full], 0, notes


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
        out.append(f"~{_duration(total)} of training, validation and pre-processing on {where}, limit {hours:g} h "
                   f"(run.feasibility_hours)")
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
