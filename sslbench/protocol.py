"""The one protocol: pretrain(method, corpus) -> checkpoint -> finetune(task) -> evaluate(task) -> record.

Written once for every method and task: a method only supplies a loss on a batch of corpus volumes
(sslbench/methods/), a task only supplies a recipe (benchmarks/) and, where its layout is new, a reader
(sslbench/data/layouts.py). Training is counted in steps; every random draw of step ``s`` is seeded by
(run seed, s), so a run killed at any moment and continued with ``--resume`` from its last checkpoint
ends with the same metrics as an uninterrupted run (on the CPU, where kernels are deterministic).
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from . import distributed, inductor, locks, recipes, track2d
from .backbones import build_model, load_backbone, read_checkpoint
from .errors import DataError, RecipeError, RunError
from .metrics import score_names, scoring
from .records import RunRecord, atomic_torch_save, atomic_write_json, load_state, prepare_run_folder
from .data.cases import case_cache, load_cases
from .data.locate import PLAN_ONLY as _PLAN_ONLY, PhantomNotWritten, locate_data, read_splits

PHANTOM_MARKER = "sslbench_phantom.json"


def keep_freed_memory() -> None:
    """Ask glibc to keep freed tensor memory instead of returning it to the kernel after every step.

    A CPU training step allocates and frees the same activation buffers each time; with glibc's defaults
    buffers above 128 KiB are mmap-ed and unmapped, and the page faults that follow cost ~40% of a tiny
    SwinUNETR step on a 2-core machine (measured: 1.6 s -> 0.9 s per step). No effect off glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------------
# Devices and precision
# --------------------------------------------------------------------------------------------------
def select_device(run_cfg: Mapping[str, Any]) -> torch.device:
    want = run_cfg.get("device", "auto")
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"run.device: '{want}' asked for, but no CUDA device is visible (use run.device=cpu)")
    return torch.device(want)


def use_bf16(run_cfg: Mapping[str, Any], device: torch.device) -> bool:
    p = run_cfg.get("precision", "auto")
    return p == "bf16" or (p == "auto" and device.type == "cuda")


def autocast(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Data: where it lives, whether it is a phantom, and the preprocessed cases
# --------------------------------------------------------------------------------------------------
def labeled_subset(items: list[dict], labeled: int | float | None) -> list[dict]:
    """A deterministic label-efficiency subset: the same cases for every method and seed."""
    if labeled is None:
        return items
    n = int(labeled) if (isinstance(labeled, int) or float(labeled) >= 1) else max(1, round(float(labeled) * len(items)))
    if n > len(items) or n <= 0:
        raise RecipeError(f"task.finetune.labeled_cases: expected 1..{len(items)} cases (or a fraction), got {labeled}")
    order = np.random.default_rng(0).permutation(len(items))
    return [items[i] for i in sorted(order[:n])]


def make_progress(console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=False)


# --------------------------------------------------------------------------------------------------
# Evaluation (shared by every method): sliding-window inference, Dice per class per case
# --------------------------------------------------------------------------------------------------
def plain(x: Any) -> torch.Tensor:
    """``x`` as a plain torch.Tensor (a MONAI MetaTensor loses its metadata, not its data; no copy)."""
    return torch.as_tensor(x).as_subclass(torch.Tensor)


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, cases: list[dict], task: Mapping[str, Any],
                          device: torch.device, bf16: bool, progress=None) -> list[dict]:
    """Per-case scores of each scored channel (foreground classes, or the task's regions).

    Sliding-window inference with the recipe's ROI and overlap, then :func:`sslbench.metrics.case_scores`: Dice
    (``<name>`` columns) and, where ``evaluate.metrics`` lists them, the surface-area NSD at
    ``evaluate.nsd_tolerance`` mm (``nsd:<name>``) and HD95 in mm (``hd95:<name>``) on the preprocessed grid
    (spacing ``preprocess.spacing``), empty sets as ``evaluate.empty`` / ``evaluate.hd95_empty`` say;
    ``mean`` / ``nsd:mean`` / ``hd95:mean`` are each case's mean over its channels that are not NaN.
    """
    from monai.inferers import sliding_window_inference

    from .metrics import case_scores, predict_masks, truth_masks

    ev, roi = task["evaluate"], tuple(task["finetune"]["roi"])
    model.eval()
    rows = []
    job = progress.add_task("evaluate", total=len(cases), info="") if progress is not None else None
    for case in cases:
        # plain tensors: a MONAI MetaTensor would carry its __torch_function__ through every layer (and break
        # torch.compile's graphs); the scores need no metadata
        image = plain(case["image"]).unsqueeze(0).to(device)
        label = plain(case["label"]).unsqueeze(0).to(device).long()
        with autocast(bf16, device):
            logits = sliding_window_inference(image, roi, ev["sw_batch_size"], model, overlap=ev["overlap"],
                                              mode=ev.get("mode", "gaussian"))
        pred, truth = predict_masks(logits, task), truth_masks(label, task)
        row: dict[str, Any] = {"case": case["id"], **case_scores(pred, truth, task)}
        rows.append(row)
        if job is not None:
            progress.update(job, advance=1, info=f"dice {row['mean']:.3f}")
    if job is not None:
        progress.remove_task(job)
    model.train()
    return rows


def summarize(rows: list[dict], names: list[str]) -> dict[str, Any]:
    """Mean over cases of each case's mean (``mean_dice``), its std, the per-channel means (NaN-skipping).

    ``names`` are the scored channels (:func:`sslbench.metrics.score_names`). Where the rows hold NSD (HD95)
    columns the same keys appear for them: ``mean_nsd``, ``std_nsd``, ``per_class_nsd`` (``mean_hd95``, ...).
    A case whose mean is NaN (every channel left out) is left out of the mean over cases (metrics.json: NaN as null).
    """
    import pandas as pd

    df = pd.DataFrame(rows).set_index("case")

    def clean(v: float) -> float | None:
        return None if math.isnan(v) else float(v)

    out: dict[str, Any] = {
        "mean_dice": float(df["mean"].mean()),
        "std_dice": float(df["mean"].std(ddof=0)),
        "per_class": {c: clean(v) for c, v in df[names].mean(skipna=True).items()},
        "n_cases": int(len(df)),
    }
    for metric in ("nsd", "hd95"):
        if f"{metric}:mean" in df.columns:
            out[f"mean_{metric}"] = clean(float(df[f"{metric}:mean"].mean()))
            out[f"std_{metric}"] = clean(float(df[f"{metric}:mean"].std(ddof=0)))
            out[f"per_class_{metric}"] = {c: clean(df[f"{metric}:{c}"].mean(skipna=True)) for c in names}
    return out


def output_channels(task: Mapping[str, Any]) -> int:
    """The model's output channels: one per region (sigmoid) for a regions task, else one per class (softmax)."""
    return len(task["regions"]) if task.get("regions") else len(task["classes"])


def make_loss(task: Mapping[str, Any]) -> torch.nn.Module:
    """DiceCE with softmax over classes, or, for a regions task, Dice with a sigmoid per region channel.

    The regions loss is the SwinUNETR BraTS recipe's (Hatamizadeh et al. 2022, Sec. 3: soft Dice on the
    TC / WT / ET sigmoid outputs), MONAI ``DiceLoss(sigmoid=True)``.
    """
    from monai.losses import DiceCELoss, DiceLoss

    if task.get("regions"):
        return DiceLoss(to_onehot_y=False, sigmoid=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


def input_channels(task: Mapping[str, Any]) -> int:
    """The number of input channels of a task's images (``task.channels``; 1 where the recipe has none)."""
    return len(task.get("channels") or []) or 1


def check_cases(cases: list[dict], task: Mapping[str, Any], items: list[dict], recipe_file: str) -> None:
    """Each preprocessed case has the task's input channels and only label values of its classes."""
    want = input_channels(task)
    n_classes = len(task["classes"])
    for case, item in zip(cases, items):
        image = item["image"] if isinstance(item["image"], str) else item["image"][0]
        got = int(case["image"].shape[0])
        if got != want:
            raise DataError(f"{image}: {got} image channel(s) after loading; expected {want} "
                            f"({', '.join(task.get('channels') or ['one 3-D volume'])}; see 'channels' in {recipe_file})")
        bad = torch.unique(case["label"])
        bad = bad[(bad < 0) | (bad >= n_classes)]
        if len(bad):
            raise DataError(f"{case['id']}: label values {bad.tolist()} outside the task's {n_classes} classes "
                            f"(0..{n_classes - 1}); check data.label_map in {recipe_file}")


# --------------------------------------------------------------------------------------------------
# Shared training machinery
# --------------------------------------------------------------------------------------------------
def make_optimizer(params, lr: float, weight_decay: float, device: torch.device, amsgrad: bool = False,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA, foreach elsewhere) over ``params``: tensors, or groups whose own ``weight_decay``
    overrides ``weight_decay``. ``amsgrad``: keep the running maximum of the second moment (Reddi et al. 2018);
    ``betas``: the moment decays (torch's default; MAE's official (0.9, 0.95))."""
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad,
                             betas=(float(betas[0]), float(betas[1])), **kw)


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Whether the no-decay rule exempts a parameter: a bias (name ends in ``.bias``) or a 1-D tensor (the
    weights of LayerNorm / BatchNorm / InstanceNorm). The rule of timm 0.3.2's ``add_weight_decay``, which the
    official MAE pre-training calls (facebookresearch/mae ``main_pretrain.py``, no skip list); SimMIM's
    ``get_pretrain_param_groups`` has the same test. Multi-dimensional tokens ([1, 1, D] mask tokens) decay."""
    return param.ndim == 1 or name.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_bias_norm: bool) -> list[dict[str, Any]]:
    """The AdamW parameter groups of ``model``'s trainable parameters (``requires_grad``), in module order.

    ``no_decay_bias_norm`` false: one group with ``weight_decay`` (the earlier behaviour: every tensor
    decays). True: ``{weight_decay: 0}`` for the tensors of :func:`no_decay`, then ``{weight_decay}`` for
    the rest (MAE's order); an empty group is left out.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay_bias_norm:
        return [{"params": [p for _, p in trainable], "weight_decay": float(weight_decay)}]
    groups = [{"params": [p for n, p in trainable if no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in trainable if not no_decay(n, p)], "weight_decay": float(weight_decay)}]
    return [g for g in groups if g["params"]]


def split_fixed_lr(method: torch.nn.Module, groups: list[dict[str, Any]], prefixes: Sequence[str]) -> list[dict[str, Any]]:
    """``groups`` with the parameters under the module-name ``prefixes`` (e.g. ``["predictor"]``) moved into
    groups of their own, marked ``fixed_lr`` (kept at the base lr by :func:`pretrain_schedule`), appended after
    the scheduled groups so that group 0 (the logged lr) stays a scheduled one. SimSiam's ``--fix-pred-lr``."""
    if not prefixes:
        return groups
    named = list(method.named_parameters())
    for f in prefixes:
        if not any(n == f or n.startswith(f + ".") for n, _ in named):
            raise RecipeError(f"method.pretrain.fixed_lr: '{f}' names no parameters of method "
                              f"{getattr(method, 'name', type(method).__name__)}; expected module names such as "
                              f"{', '.join(sorted({n.split('.')[0] for n, _ in named})[:6])}")
    fixed_ids = {id(p) for n, p in named if any(n == f or n.startswith(f + ".") for f in prefixes)}
    scheduled, fixed = [], []
    for g in groups:
        keep = [p for p in g["params"] if id(p) not in fixed_ids]
        move = [p for p in g["params"] if id(p) in fixed_ids]
        if keep:
            scheduled.append({**g, "params": keep})
        if move:
            fixed.append({**g, "params": move, "fixed_lr": True})
    return scheduled + fixed


def pretrain_optimizer(method: torch.nn.Module, pt: Mapping[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """The pre-training optimizer of a method from its recipe's ``pretrain`` section, over :func:`param_groups`
    (``weight_decay``, ``no_decay_bias_norm``) split by ``fixed_lr`` (:func:`split_fixed_lr`).

    ``optimizer: adamw`` (default): AdamW at ``lr`` with ``amsgrad``, ``betas``; ``sgd``: SGD with ``momentum``
    and L2 ``weight_decay`` (torch's coupled form, as the official Models Genesis / TransVW / SimSiam / PCRL code).
    A section without the keys (a run recorded before they existed) gets what every run had then: AdamW, decay on
    every tensor, no AMSGrad."""
    groups = param_groups(method, pt["weight_decay"], bool(pt.get("no_decay_bias_norm", False)))
    groups = split_fixed_lr(method, groups, list(pt.get("fixed_lr") or []))
    if pt.get("optimizer", "adamw") == "sgd":
        return torch.optim.SGD(groups, lr=pt["lr"], momentum=float(pt.get("momentum", 0.9)),
                               weight_decay=pt["weight_decay"], foreach=True)
    return make_optimizer(groups, pt["lr"], pt["weight_decay"], device, amsgrad=bool(pt.get("amsgrad", False)),
                          betas=tuple(pt.get("betas") or (0.9, 0.999)))


def pretrain_schedule(opt: torch.optim.Optimizer, pt: Mapping[str, Any], total: int):
    """The pre-training lr schedule of a recipe's ``pretrain`` section (a LambdaLR, stepped once per step).

    ``schedule: warmup_cosine`` (default): MONAI's ``WarmupCosineSchedule`` (linear warm-up over ``warmup_steps``,
    then a half cosine to 0 at ``total``); ``step``: lr x ``step_gamma`` ** (step // ``step_every``), torch's StepLR
    (Models Genesis / TransVW: gamma 0.5 every 40 epochs), no warm-up. Groups marked ``fixed_lr`` keep the base
    lr throughout. Without ``fixed_lr`` groups the warm-up-cosine form is MONAI's scheduler itself."""
    form = pt.get("schedule", "warmup_cosine")
    fixed = [bool(g.get("fixed_lr")) for g in opt.param_groups]
    if form == "warmup_cosine" and not any(fixed):
        return make_schedule(opt, pt["warmup_steps"], total)
    if form == "step":
        every, gamma = max(int(pt.get("step_every") or 1), 1), float(pt.get("step_gamma", 0.5))

        def scheduled(step: int) -> float:
            return gamma ** (step // every)
    else:
        from monai.optimizers import WarmupCosineSchedule

        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)   # only to borrow MONAI's formula
        scheduled = WarmupCosineSchedule(probe, warmup_steps=min(pt["warmup_steps"], max(total - 1, 0)),
                                         t_total=max(total, 1)).lr_lambda

    def constant(step: int) -> float:
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, [constant if f else scheduled for f in fixed])


def make_schedule(opt, warmup: int, total: int):
    from monai.optimizers import WarmupCosineSchedule

    return WarmupCosineSchedule(opt, warmup_steps=min(warmup, max(total - 1, 0)), t_total=max(total, 1))


def _kill_point(step: int) -> None:
    """Test hook: SSLBENCH_KILL_AFTER_STEP=N kills the process (SIGKILL) right after step N."""
    at = os.environ.get("SSLBENCH_KILL_AFTER_STEP")
    if at is not None and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _rank_report(dist: "distributed.Dist", state: Mapping[str, torch.Tensor], **facts: Any) -> None:
    """Test hook: with SSLBENCH_RANK_REPORT=DIR every rank writes DIR/rank<r>.json (its rank, world size, a
    SHA-256 of its final trained state and ``facts``), so a test can check that the ranks of a job ended in
    agreement; the run folder stays rank 0's alone."""
    folder = os.environ.get("SSLBENCH_RANK_REPORT")
    if not folder:
        return
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(folder) / f"rank{dist.rank}.json", {"rank": dist.rank, "world_size": dist.world_size,
                                                               "state_sha256": h.hexdigest(), **facts})


class Prefetcher:
    """Builds the batches of the next steps in background threads (each batch depends only on its step)."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2, workers: int = 1):
        self.make, self.stop = make, stop
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        self.pending: dict[int, Any] = {}
        self.depth = depth
        self._fill(start)

    def _fill(self, step: int) -> None:
        if self.pool is None:
            return
        for s in range(step, min(step + self.depth, self.stop)):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self.make, s)

    def get(self, step: int):
        fut = self.pending.pop(step, None)
        self._fill(step + 1)
        return fut.result() if fut is not None else self.make(step)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Outcome:
    record: RunRecord
    action: str                    # new | resume | skip
    metrics: dict[str, Any] = field(default_factory=dict)


def run_protocol_hash(cfg: Mapping[str, Any], dist: "distributed.Dist | None" = None) -> str:
    """The protocol hash of a run: the recipe's, plus the number of processes when there are several.

    Under torchrun every process draws its own batch, so N processes train with an N times larger global batch:
    another protocol, which must never be mixed with (or reused as) the single-process one.
    """
    dist = dist or distributed.current()
    if dist.world_size > 1:
        return recipes.protocol_hash({**cfg, "world_size": dist.world_size})
    return recipes.protocol_hash(cfg)


def _run_dir(cfg: Mapping[str, Any], stage: str, key: str) -> Path:
    """``<out>/pretrain/<method>/<corpus>/<run key>-s<seed>`` or ``<out>/finetune/<task>/<label>/<run key>-s<seed>``."""
    out = Path(cfg["run"]["out"])
    seed = cfg["run"]["seed"]
    if stage == "pretrain":
        return out / "pretrain" / cfg["method"]["name"] / cfg["corpus"]["name"] / f"{key}-s{seed}"
    return out / "finetune" / cfg["task"]["name"] / cfg["run"].get("label", cfg["method"]["name"]) / f"{key}-s{seed}"


# --------------------------------------------------------------------------------------------------
# A run's identity: protocol + data (+ the pre-training it starts from) -> run key -> run folder
# --------------------------------------------------------------------------------------------------
def run_key(protocol: str, data: Mapping[str, Any], pretrain_key: str | None = None) -> str:
    """The run key: a short SHA-256 of the protocol hash, the data fingerprint (sslbench/data/fingerprint.py)
    and, for a fine-tuning from a pre-training, that pre-training's run key. Runs of one protocol on other data
    (another copy, changed files) get other keys, so other folders; ``protocol`` alone still names the
    protocol (status.json, metrics.json), which the report compares."""
    text = json.dumps({"protocol": protocol, "data": data["fingerprint"], "pretrain": pretrain_key}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class PlannedRun:
    """Where a run goes and why: its folder, protocol hash, run key, data identity (data.json), the located
    root, whether it reads phantoms, and the items it reads (pre-training: the corpus volumes)."""

    stage: str
    path: Path
    protocol: str
    run_key: str
    data: dict
    root: Path
    phantom: bool
    items: list = field(default_factory=list)


def _stage_items(cfg: Mapping[str, Any], stage: str, root, log) -> tuple[Path, bool, list]:
    """(root, phantom, items read) of a run's data: the corpus volumes of a pre-training, the train and val
    cases of a fine-tuning (only located and listed here; nothing is preprocessed)."""
    if stage == "pretrain" and track2d.is_2d(cfg.get("corpus")):   # the 2D track: the task's pretrain split
        return track2d.pretrain_items(cfg["corpus"], *locate_data(cfg["corpus"], root, log=log))
    if stage == "pretrain":
        from .data.corpus import corpus_items, labelled_items
        from .methods import get_method_class

        cls = get_method_class(cfg["method"]["name"])
        read = labelled_items if getattr(cls, "needs_labels", False) else corpus_items
        where, phantom, items = read(cfg["corpus"], None if root is None else str(root), log=log)
        return Path(where), phantom or bool(cfg["corpus"].get("phantom")), items
    from .data import layouts

    root_path, phantom = locate_data(cfg["task"], root, log=log)
    splits = layouts.load_datalist(cfg["task"], root_path).splits
    return Path(root_path), phantom, [*splits.get("train", []), *splits.get("val", [])]


def plan_run(cfg: Mapping[str, Any], stage: str, root: str | Path | None = None, log: Callable[[str], None] = print,
             pretrain_key: str | None = None, dist: "distributed.Dist | None" = None) -> PlannedRun:
    """The one computation of a run's identity (used by the protocol, the sweep and, through the records, the
    report): locate and list the data (a phantom task synthesises its tree), fingerprint it, and name the folder.

    ``cfg`` is a pre-training ('pretrain') or fine-tuning ('finetune') view of a resolved recipe, as the
    protocol runs it (a fine-tuning's ``init`` set); ``pretrain_key`` the run key of the pre-training a
    fine-tuning starts from."""
    from .data.fingerprint import fingerprint

    root_path, phantom, items = _stage_items(cfg, stage, root, log)
    data = fingerprint(root_path, items)
    protocol = run_protocol_hash(cfg, dist)
    key = run_key(protocol, data, pretrain_key)
    return PlannedRun(stage, _run_dir(cfg, stage, key), protocol, key, data, root_path, phantom, items)


def planned_runs(cfg: Mapping[str, Any], root: str | Path | None = None, corpus_root: str | Path | None = None,
                 log: Callable[[str], None] = print) -> tuple[PlannedRun | None, PlannedRun, dict]:
    """(pre-training plan or None, fine-tuning plan, the fine-tuning config) that :func:`run_protocol` will use
    for a resolved recipe ``cfg``."""
    fcfg = finetune_view(cfg)
    pre = None
    corpus_root = track2d.corpus_root(cfg, root, corpus_root)
    if cfg["method"].get("pretrain") is not None:
        pre = plan_run(recipes.split_config(cfg, "corpus"), "pretrain", corpus_root, log)
    return pre, plan_run(fcfg, "finetune", root, log, pretrain_key=pre.run_key if pre else None), fcfg


# --------------------------------------------------------------------------------------------------
# Before any work: roots, readers, feasibility (sslbench/feasibility.py); --dry-run
# --------------------------------------------------------------------------------------------------
def _listed(cfg: Mapping[str, Any], stage: str, root) -> tuple[list | None, bool, Path | None]:
    """(items, phantom, root) of a stage's data, located and listed without writing anything (items None: a
    phantom tree not written yet). A real dataset without its root raises the one-line DataError here."""
    token = _PLAN_ONLY.set(True)
    try:
        where, phantom, items = _stage_items(cfg, stage, root, log=lambda *a, **k: None)
        return items, phantom, where
    except PhantomNotWritten:
        return None, True, None
    finally:
        _PLAN_ONLY.reset(token)


def _estimates(cfg: Mapping[str, Any], root, corpus_root, machine) -> tuple[list, dict]:
    from . import feasibility

    ests, seen = [], {}
    if "corpus" in cfg and cfg["method"].get("pretrain") is not None:
        pcfg = cfg if "task" not in cfg else recipes.split_config(cfg, "corpus")
        try:
            items, phantom, where = _listed(pcfg, "pretrain", corpus_root)
        except DataError as exc:
            if pcfg["corpus"].get("phantom"):
                raise
            raise DataError(f"{exc}; a real task pre-trains on the paper's corpus ('{pcfg['corpus']['name']}'); "
                            f"--corpus phantom-corpus pre-trains on phantoms (the run is then PHANTOM)") from None
        seen["pretrain"] = (items, phantom, where)
        ests.append(feasibility.estimate_pretrain(pcfg, machine, None if items is None else len(items)))
        from .methods import get_method_class

        labelled = bool(getattr(get_method_class(pcfg["method"]["name"]), "needs_labels", False))
        volumes = int((pcfg["corpus"].get("data") or {}).get("phantom_total")
                      or (pcfg["corpus"].get("data") or {}).get("phantom_cases") or 0)
        voxels, _, write, notes = feasibility.case_sizes(pcfg["corpus"], items, pcfg["run"], labelled, volumes)
        ests.append(feasibility.estimate_preprocessing(pcfg["corpus"], machine, voxels, write, notes=notes))
    if "task" in cfg:
        fcfg = cfg if "corpus" not in cfg else recipes.split_config(cfg, "task")
        items, phantom, where = _listed(fcfg, "finetune", root)
        seen["finetune"] = (items, phantom, where)
        task = fcfg["task"]
        train = task["data"].get("phantom_cases") if items is None else None   # a phantom not written yet
        train_items, val_items = None, None
        if items is not None:
            from .data import layouts

            splits = layouts.load_datalist(task, where).splits
            train_items = labeled_subset(splits.get("train", []), task["finetune"].get("labeled_cases"))
            val_items, train = splits.get("val", []), len(train_items)
        est = feasibility.estimate_finetune(fcfg, machine, train)
        ests.append(est)
        if task.get("kind") in ("classification", "classification2d"):
            return ests, seen   # images and labels, not NIfTI volumes: no sliding window, no case cache to size
        # a phantom not written yet: its validation cases are data.val_last (else about a fifth) of its cases
        n = int(task["data"].get("phantom_cases") or 0)
        n_val = int(task["data"].get("val_last") or max(1, n // 5)) if items is None else 0
        _, val_shapes, _, vnotes = feasibility.case_sizes(task, val_items, fcfg["run"], True, n_val)
        ests.append(feasibility.estimate_validation(fcfg, machine, val_shapes, est.steps, notes=vnotes))
        everything = None if items is None else [*train_items, *val_items]
        voxels, shapes, write, notes = feasibility.case_sizes(task, everything, fcfg["run"], True, n)
        ests.append(feasibility.estimate_preprocessing(task, machine, voxels, write, held=shapes, notes=notes))
    return ests, seen


def preflight(cfg: Mapping[str, Any], root=None, corpus_root=None, say: Callable[[str], None] = print,
              gpus: int | None = None) -> list:
    """Check everything before any work starts (issue 20), writing nothing: the fine-tuning task's root (a real
    task without --root or $SSLBENCH_ROOT_<NAME>: one line naming the dataset, its layout and the phantom
    twin), then the corpus's roots (one line naming the corpus), the optional readers its files need
    (SimpleITK for .mhd, pydicom for DICOM), and the feasibility of the plan (memory and time estimates,
    refused with the way out unless ``run.feasibility`` says otherwise). ``cfg``: a resolved recipe or one
    stage's view of it. Returns the stage estimates."""
    from . import feasibility

    fcfg = recipes.split_config(cfg, "task") if "task" in cfg and "corpus" in cfg else cfg
    if "task" in cfg:   # the fine-tuning data first: its missing root is the first thing to say
        check_finetune_loader(fcfg)   # refused before any pre-training runs for a loader the task cannot use
        _listed(fcfg, "finetune", root)
    machine = feasibility.machine(cfg["run"], gpus)
    ests, seen = _estimates(cfg, root, corpus_root, machine)
    missing = feasibility.missing_readers([it for items, phantom, _ in seen.values() if items and not phantom
                                           for it in items])
    if missing:
        raise DataError(missing)
    feasibility.check(ests, machine, cfg["run"], say=say)
    return ests


def dry_run(cfg: Mapping[str, Any], root=None, corpus_root=None, say: Callable[[str], None] = print,
            init: Mapping[str, Any] | None = None, gpus: int | None = None) -> int:
    """``--dry-run``: the plan (stages, the recipes' key settings, corpus, phantom or not, run folders and
    keys) and its estimates, printed; nothing is written (a phantom tree not written yet leaves its run keys
    open). Root and reader errors raise as in a run; an infeasible plan is printed, not raised."""
    from . import feasibility

    fcfg = recipes.split_config(cfg, "task") if "task" in cfg and "corpus" in cfg else cfg
    if "task" in cfg:
        _listed(fcfg, "finetune", root)
    machine = feasibility.machine(cfg["run"], gpus)
    corpus_root = track2d.corpus_root(cfg, root, corpus_root)   # 2D: the task's pretrain split, from its --root
    ests, seen = _estimates(cfg, root, corpus_root, machine)
    run, model = cfg["run"], cfg["model"]
    say(f"plan (dry run, nothing written): preset {run['preset']}, seed {run['seed']}, model {model['name']} "
        f"feature size {model.get('feature_size')}, device {machine.device}"
        f"{f' x {machine.gpus}' if machine.gpus > 1 else ''}, out {run['out']}")
    pre_key = (init or {}).get("run_key")
    token = _PLAN_ONLY.set(True)
    try:
        for e in ests:
            if e.stage not in seen:   # validation / pre-processing: under the stage they belong to
                say(f"    estimate: {e.line()}" + "".join(f"; {n}" for n in e.notes))
                continue
            items, phantom, where = seen[e.stage]
            view = cfg
            if e.stage == "pretrain":
                view = cfg if "task" not in cfg else recipes.split_config(cfg, "corpus")
                pt = cfg["method"]["pretrain"]
                say(f"  pretrain: method {cfg['method']['name']} on corpus {cfg['corpus']['name']}"
                    f"{' (PHANTOM)' if phantom or cfg['corpus'].get('phantom') else ''}: {pt['steps']} steps, batch "
                    f"{pt['batch_size']}, lr {pt['lr']}, {'?' if items is None else len(items)} volumes")
            else:
                # hashed as open_finetune hashes it: with its init (None: from scratch)
                view = finetune_view(cfg) if "corpus" in cfg else {
                    **fcfg, "init": {k: v for k, v in (init or {}).items() if k in ("source", "hash", "method")} or None}
                ft, task = cfg["task"]["finetune"], cfg["task"]
                say(f"  finetune: {run.get('label', cfg['method']['name'])} on task {task['name']}"
                    f"{' (PHANTOM)' if phantom or task.get('phantom') else ''}: "
                    + (f"{ft['max_steps']} steps" if ft.get("max_steps") else f"{ft['epochs']} epochs")
                    + f", roi {ft.get('roi')}, batch {ft.get('batch_size')} x {ft.get('num_samples', 1)} crops, "
                      f"lr {ft.get('lr')}")
            if items is None or (e.stage == "finetune" and "pretrain" in seen and pre_key is None):
                say(f"    run folder: decided once the phantom data is written (run key = protocol + data"
                    f" fingerprint)")
            else:
                plan = plan_run(view, e.stage, root if e.stage == "finetune" else corpus_root,
                                log=lambda *a, **k: None, pretrain_key=pre_key if e.stage == "finetune" else None)
                if e.stage == "pretrain":
                    pre_key = plan.run_key
                state = (RunRecord(plan.path).status or {}).get("state") if plan.path.is_dir() else None
                say(f"    run folder: {plan.path} (run key {plan.run_key}, protocol {plan.protocol}"
                    f"{f', {state} there' if state else ''}); data {where}")
            say(f"    estimate: {e.line()}" + "".join(f"; {n}" for n in e.notes))
    finally:
        _PLAN_ONLY.reset(token)
    found = feasibility.problems(ests, machine, run)
    if found and run.get("feasibility", "check") != "off":
        say(f"would be refused: {'; '.join(found)}; way out: {feasibility.way_out(run, machine)}")
    else:
        say("feasible on this machine (estimates: sslbench/feasibility.py)")
    return 0


def finetune_view(cfg: Mapping[str, Any]) -> dict:
    """The fine-tuning config :func:`run_protocol` hashes for a resolved recipe: its ``init`` names the
    pre-training's protocol (or None for a method without one)."""
    fcfg = recipes.split_config(cfg, "task")
    fcfg["init"] = None
    if cfg["method"].get("pretrain") is not None:
        fcfg["init"] = {"source": "pretrain", "hash": recipes.protocol_hash(recipes.split_config(cfg, "corpus")),
                        "method": cfg["method"]["name"]}
    return fcfg


#: the runs this process has claimed inside the current run scope: (record, lock)
_CLAIMED: contextvars.ContextVar[list | None] = contextvars.ContextVar("sslbench_claimed_runs", default=None)
_UNSCOPED: list = []   # locks taken outside any run scope: held until the process ends


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, (DataError, RecipeError, RunError)) or type(exc).__module__.startswith("sslbench"):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class _Scope:
    """What :func:`run_scope` tracks: the claimed (record, lock) pairs, and the caller's own stop (below)."""

    def __init__(self):
        self.claimed: list = []
        self.stopped: list[BaseException] = []

    def callback(self, fn: Callable | None) -> Callable | None:
        """``fn`` (e.g. a sweep's ``on_validation``), whose exceptions are the caller stopping the run (a pruned
        trial), not the run failing: the folder stays unfinished and resumable."""
        if fn is None:
            return None

        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                self.stopped.append(exc)
                raise
        return call


@contextlib.contextmanager
def run_scope():
    """Around one pre-training or fine-tuning: the run folders claimed inside are unlocked at the end, and an
    exception (not an interrupt, not one of a :meth:`_Scope.callback`) marks a claimed, unfinished folder
    ``failed`` with its one-line reason, so the next identical command starts it over (or resumes it from a
    readable last.pt with --resume)."""
    scope = _Scope()
    claimed = scope.claimed
    token = _CLAIMED.set(claimed)
    try:
        yield scope
    except Exception as exc:
        if any(exc is e for e in scope.stopped):
            raise
        reason = _one_line(exc)
        for record, _ in claimed:
            if record.path.is_dir() and not record.finished:
                with contextlib.suppress(Exception):   # on a full disk even this may not be written
                    record.set_status(state="failed", reason=reason, failed=time.strftime("%Y-%m-%dT%H:%M:%S"))
                    record.log(f"failed: {reason}")
        raise
    finally:
        _CLAIMED.reset(token)
        for record, lock in claimed:
            record.close_scalars()   # a run stopped unfinished (a pruned sweep trial) too
            lock.release()


def file_digest(path: Path) -> str:
    """The first 16 hex digits of a file's SHA-256 (:func:`sslbench.data.fingerprint.file_sha256`)."""
    from .data.fingerprint import file_sha256

    return file_sha256(path)[:16]


# --------------------------------------------------------------------------------------------------
# Fine-tuning + evaluation
# --------------------------------------------------------------------------------------------------
def finetune(cfg: dict, root: str | Path | None = None, init: dict | None = None, resume: bool = False,
             force: bool = False, console=None, on_validation: Callable[[int, float], None] | None = None) -> Outcome:
    """:func:`_finetune` inside a :func:`run_scope` (its folder locked while it runs; ``failed`` on an error)."""
    with run_scope() as scope:
        return _finetune(cfg, root=root, init=init, resume=resume, force=force, console=console,
                         on_validation=scope.callback(on_validation))


def finetune_stream(cfg: Mapping[str, Any], train_items: list[dict], val_items: list[dict], dist: "distributed.Dist",
                    device: torch.device, progress=None, log: Callable[[str], None] = print):
    """``task.finetune.loader: stream``: (the :class:`sslbench.data.stream.CropStream` of this rank's shard of the
    training cases, the validation cases mapped from the case cache).

    Each rank preprocesses only the cases of its shard (every ``world_size``-th training case from its rank, and
    its share of the validation cases) that the case cache lacks, checks its training cases one at a time from
    the cache (channels, label values; nothing of the split stays in memory), and maps the validation cases
    (pages read on touch) after every rank has cached its share.
    """
    from .data.cache import CaseCache
    from .data.stream import CropStream, shard
    from .data.transforms import preprocess_transforms, train_augmentation

    task, run_cfg = cfg["task"], cfg["run"]
    ft = task["finetune"]
    cache = CaseCache(task, with_label=True)
    mine = shard(train_items, dist.rank, dist.world_size)
    share = mine + dist.shard(val_items)
    todo = [it for it in share if cache.get(it) is None]
    if todo:
        log(f"caching {len(todo)} of {len(share)} cases ({len(mine)} training, {len(share) - len(mine)} validation) "
            f"in {cache.folder}")
        load_cases(todo, preprocess_transforms(task), "cache cases", progress, cache=cache, write=True, keep=False)
    for item in mine:
        check_cases([{**cache.get(item), "id": item["id"]}], task, [item], cfg["recipe_files"]["task"])
    dist.barrier()   # every rank's validation share is in the cache
    val_cases = load_cases(val_items, preprocess_transforms(task), "map val", progress, cache=cache)
    check_cases(val_cases, task, val_items, cfg["recipe_files"]["task"])
    stream = CropStream([cache.files(it) for it in mine], train_augmentation(task), int(ft["batch_size"]),
                        int(ft["num_samples"]), ft["roi"], input_channels(task), int(run_cfg["seed"]), rank=dist.rank,
                        budget_mb=float(run_cfg.get("loader_memory_mb", 2048)),
                        workers=int(run_cfg.get("loader_workers", 0)), pin_memory=device.type == "cuda")
    return stream, val_cases


def check_finetune_loader(cfg: Mapping[str, Any]) -> None:
    """One-line errors for a ``task.finetune.loader`` that cannot run (before any run folder exists)."""
    task = cfg["task"]
    if (task.get("finetune") or {}).get("loader", "memory") != "stream":
        return
    where = (cfg.get("recipe_files") or {}).get("task") or task["name"]
    if task["kind"] != "segmentation":
        raise RecipeError(f"{where}: key 'finetune.loader': stream, but task '{task['name']}' is a {task['kind']} "
                          f"task (the stream cuts RandCropByPosNegLabel crops of segmentation cases); expected "
                          f"loader memory")
    if str(cfg["run"].get("cache", "read")) == "none":
        raise RecipeError("run.cache: none, but task.finetune.loader=stream reads the cases from the case cache; "
                          "expected read or write")


def _finetune(cfg: dict, root: str | Path | None = None, init: dict | None = None, resume: bool = False,
              force: bool = False, console=None, on_validation: Callable[[int, float], None] | None = None) -> Outcome:
    """Fine-tune SwinUNETR on a task (optionally from pre-trained backbone weights) and evaluate it.

    ``init``: {"path": checkpoint, "source": "pretrain"|"file", "pretrain_run": folder, "hash": ...} or None.
    ``on_validation(step, mean_dice)`` is called after each periodic validation, after the checkpoint of
    that step is safe on disk (a sweep reports intermediate values there and may raise to prune).
    """
    from .data.transforms import preprocess_transforms, step_seed, train_augmentation
    from .metrics import targets

    task = cfg["task"]
    if task["status"] != "available":
        raise RecipeError(f"task '{task['name']}' is {task['status']} (not implemented yet); "
                          f"see `sslbench list tasks` for the available ones")
    check_finetune_loader(cfg)
    if task["kind"] in ("classification", "classification2d"):
        from . import classify

        return classify.finetune(cfg, root=root, init=init, resume=resume, force=force, console=console,
                                 on_validation=on_validation)
    if task["kind"] != "segmentation":
        raise RecipeError(f"task '{task['name']}' is a {task['kind']} task; only segmentation fine-tuning exists yet")
    run = open_finetune(cfg, init, root, resume, force, console)
    if isinstance(run, Outcome):
        return run
    cfg, dist, protocol, record, action = run.cfg, run.dist, run.protocol, run.record, run.action
    say, device, bf16, root_path, phantom = run.say, run.device, run.bf16, run.root, run.phantom
    splits = read_splits(task, root_path)
    ft = task["finetune"]
    train_items = labeled_subset(splits["train"], ft.get("labeled_cases"))
    val_items = splits["val"]

    steps_per_epoch = math.ceil(len(train_items) / ft["batch_size"])
    total = int(ft["max_steps"]) if ft.get("max_steps") else int(ft["epochs"]) * steps_per_epoch
    val_every = ft.get("val_every") or 0
    ckpt_every = max(1, int(ft.get("checkpoint_every") or total))
    seed = int(cfg["run"]["seed"])

    progress = make_progress(console)
    with progress:
        stream = None
        if ft.get("loader", "memory") == "stream":   # step crops cut from the case cache by worker processes
            stream, val_cases = finetune_stream(cfg, train_items, val_items, dist, device, progress,
                                                say if dist.is_main else (lambda *_: None))
        else:
            pre = preprocess_transforms(task)
            cache, write = case_cache(cfg["run"], task, with_label=True)
            train_cases = load_cases(train_items, pre, "preprocess train", progress, cache=cache, write=write)
            val_cases = load_cases(val_items, pre, "preprocess val", progress, cache=cache, write=write)
            check_cases(train_cases + val_cases, task, train_items + val_items, cfg["recipe_files"]["task"])
        # the run folder only once every case loaded and passed its checks (a refused run leaves none)
        record.path.mkdir(parents=True, exist_ok=True)
        if action == "new":
            record.write_recipe({**cfg, "data": {"root": str(root_path), "phantom": phantom}})
            record.write_env(str(device), **({"world_size": dist.world_size} if dist.enabled else {}))
            record.set_status(state="running", stage="finetune", step=0, protocol=protocol,
                              started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        record.log(f"{action}: finetune {cfg['method']['name']} on {task['name']} ({'PHANTOM data' if phantom else 'real data'} "
                   f"at {root_path}), protocol {protocol}, device {device}")
        if stream is not None:
            record.log(stream.plan.describe() + f"; rank 0 of {dist.world_size} reads its shard of {len(stream)} "
                       f"of {len(train_items)} training cases")

        torch.manual_seed(seed)
        model = build_model(cfg["model"], in_channels=input_channels(task), out_channels=output_channels(task),
                            img_size=tuple(ft["roi"]))
        use_run_attention(model, cfg["run"])
        load_report = None
        if init and init.get("path"):
            state = read_checkpoint(init["path"])
            load_report = load_backbone(model, state, str(init["path"]),
                                        include_decoder=bool(init.get("include_decoder", False)),
                                        model_name=str(cfg["model"].get("name", "swinunetr")),
                                        channel_adapt=str(ft.get("channel_adapt", "random")))
            say(load_report.summary())
            record.log(load_report.summary())
        model.to(device)
        opt = make_optimizer(model.parameters(), ft["lr"], ft["weight_decay"], device)
        sched = make_schedule(opt, ft["warmup_steps"], total)
        loss_fn = make_loss(task)
        aug = train_augmentation(task)

        start, best, best_step, history = resume_finetune(run, model, opt, sched, total, best=-1.0)
        last = record.ckpt_dir / "last.pt"

        local = threading.local()

        def make_batch(step: int):
            # Each loader thread draws with its own copy of the random transforms, re-seeded for the step.
            mine = getattr(local, "aug", None)
            if mine is None:
                mine = local.aug = copy.deepcopy(aug)
            # rank 0 draws what a single process draws; other ranks their own streams (global batch N x batch)
            rng = np.random.default_rng([seed, step] if dist.rank == 0 else [seed, step, dist.rank])
            picks = rng.integers(0, len(train_cases), size=ft["batch_size"])
            mine.set_random_state(seed=step_seed(seed, step, 1000 * dist.rank))
            crops = []
            for i in picks:
                case = train_cases[int(i)]
                out = mine({"image": case["image"], "label": case["label"]})
                crops.extend(out if isinstance(out, list) else [out])
            x = torch.stack([plain(c["image"]) for c in crops]).float()
            y = torch.stack([plain(c["label"]) for c in crops]).float()
            return x, y

        def save_last(step: int) -> None:
            if not dist.is_main:
                return
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "step": step, "best": best,
                               "best_step": best_step, "history": history}, last)
            record.set_status(step=step, data_wait=wait.fraction())

        workers = 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)
        # the CropStream draws what make_batch draws, in worker processes
        batches = stream.batches(start, total) if stream is not None else None
        fetch = Prefetcher(make_batch, start, total, depth=4, workers=workers) if stream is None else None
        wait = DataWait()
        train_job = progress.add_task("finetune", total=total, completed=start, info="")
        model.train()
        train_model = compiled(distributed.wrap(model, dist, device), cfg["run"])   # DDP under torchrun
        eval_model = compiled(model, cfg["run"])
        loss_sum, loss_n = torch.zeros((), device=device), 0
        try:
            for step in range(start, total):
                wait.start_step()
                x, y = next(batches) if batches is not None else fetch.get(step)
                x, y = x.to(device, non_blocking=True), targets(y.to(device, non_blocking=True), task)
                wait.got_data()
                with autocast(bf16, device):
                    logits = train_model(x)
                loss = loss_fn(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                wait.end_step()
                loss_sum += loss.detach()
                loss_n += 1
                done = step + 1
                if done % ft.get("log_every", 10) == 0 or done == total:
                    mean_loss = float(dist.mean(loss_sum / loss_n))
                    stop_if_not_finite(mean_loss, done, record, cfg["run"], "fine-tuning")
                    loss_sum.zero_()
                    loss_n = 0
                    history.append({"step": done, "loss": mean_loss})
                    record.log(f"step {done}/{total} loss {mean_loss:.4f} data_wait {wait.interval():.3f}")
                    record.scalars(done, {"finetune/loss": mean_loss, "finetune/lr": opt.param_groups[0]["lr"]})
                    progress.update(train_job, info=f"loss {mean_loss:.3f}" + (f" best {best:.3f}" if best >= 0 else ""))
                if val_every and (done % val_every == 0 or done == total):
                    rows = _evaluate_sharded(eval_model, val_cases, task, device, bf16, dist)
                    score = float(np.nanmean([r["mean"] for r in rows]))
                    history.append({"step": done, "val_dice": score})
                    record.log(f"step {done} validation dice {score:.4f}")
                    record.scalars(done, {"val/dice": score})
                    if score > best:
                        best, best_step = score, done
                        if dist.is_main:
                            atomic_torch_save({"model": model.state_dict(), "step": done, "val_dice": score},
                                              record.ckpt_dir / "best.pt")
                    progress.update(train_job, info=f"dice {score:.3f} best {best:.3f}")
                if done % ckpt_every == 0 or done == total:
                    save_last(done)
                progress.update(train_job, advance=1)
                _kill_point(done)
                if on_validation is not None and val_every and (done % val_every == 0 or done == total):
                    on_validation(done, float(history[-1]["val_dice"]))
        finally:
            if fetch is not None:
                fetch.close()

        # Final evaluation on the validation split with the selected checkpoint.
        dist.barrier()   # best.pt is on disk for every rank
        chosen = "last"
        if best_step > 0 and (record.ckpt_dir / "best.pt").is_file():
            model.load_state_dict(torch.load(record.ckpt_dir / "best.pt", map_location="cpu", weights_only=True)["model"])
            chosen = f"best (step {best_step})"
        rows = _evaluate_sharded(eval_model, val_cases, task, device, bf16, dist, progress)

    if not dist.is_main:
        dist.barrier()
        return Outcome(record, action, {"kind": "finetune", "rank": dist.rank})
    summary = summarize(rows, score_names(task))
    write_results(record, cfg, rows, summary, protocol=protocol, phantom=phantom, root=root_path,
                  extra={"checkpoint": chosen, "steps": total, "train_cases": len(train_items),
                         "init": {**(init or {}), "load": load_report.as_dict() if load_report else None},
                         "history": history, "world_size": dist.world_size, "data_wait": wait.fraction(),
                         "loader": ft.get("loader", "memory")})
    dist.barrier()
    return Outcome(record, action, record.metrics or {})


@dataclass
class FinetuneRun:
    """A fine-tuning run being opened: what every fine-tuning loop (segmentation, classification) shares."""

    cfg: dict
    dist: "distributed.Dist"
    protocol: str
    record: RunRecord
    action: str
    say: Callable[..., None]
    device: torch.device
    bf16: bool
    root: Path
    phantom: bool


def check_run_cases(cfg: Mapping[str, Any], stage: str, items: list[dict], force: bool = False) -> None:
    """Check every case a run will read before its run folder is claimed, created or (``--force``) replaced.

    ``items`` are the cases :func:`plan_run` listed (a fine-tuning's train and val cases, a pre-training's
    corpus volumes, with label maps for a labelled corpus). The header checks of ``sslbench data check``
    (:func:`sslbench.data.check.check_case_headers`) refuse a missing, truncated or non-NIfTI file, a DICOM folder
    without a usable series, an image and label whose shapes or affines differ, with one line naming the file.
    Voxel checks (NaN / infinite intensities, label values outside the task's classes) run as each case is loaded
    (:class:`sslbench.data.check.LoadChecked`), before the folder is created; with ``force`` (which deletes an old
    folder when the run is claimed) they run here too, on every case not in the case cache (a cached case passed
    them), so a refused ``--force`` keeps the old folder.
    Classification tasks (PNG/JPG images) get the checks of :mod:`sslbench.data.classification_check` instead.
    """
    from .data.check import check_case_headers

    task = cfg["task"] if stage == "finetune" else cfg["corpus"]
    if task.get("kind") in ("classification", "classification2d"):
        from .data.classification_check import check_cases

        # PNG/JPG slices and radiographs: headers, end markers, slice sizes, labels; every pixel with --force
        check_cases(task, items, decode=force)
        return
    check_case_headers(items, task)
    if force:
        from .data.check import LoadChecked
        from .data.layouts.ct import DicomSeriesReader, SimpleITKReader

        keys = ["image", "label"] if items and items[0].get("label") else ["image"]
        cache, _ = case_cache(cfg["run"], task, with_label="label" in keys)
        load = LoadChecked(task, keys, readers=(SimpleITKReader(), DicomSeriesReader()))
        for it in items:
            if cache is None or cache.get(it) is None:
                load({k: it[k] for k in keys})


def _claim_run(cfg: Mapping[str, Any], stage: str, resume: bool, force: bool, console=None, root=None,
               pretrain_key: str | None = None):
    """(dist, plan, record, action, say): join the torchrun job if any, locate the data and name the run
    (:func:`plan_run`, rank 0 first), lock the run folder (sslbench/locks.py) and let rank 0 decide new /
    resume / skip after :func:`check_run_cases` checked the cases; every rank gets its decision; only rank 0 talks.
    Nothing is written to the folder here."""
    dist = distributed.setup(cfg["run"].get("device", "auto"))
    say = (console.print if console is not None else print) if dist.is_main else (lambda *a, **k: None)
    plan = _rank0_first(dist, lambda: plan_run(cfg, stage, root, log=say, pretrain_key=pretrain_key, dist=dist))
    if dist.is_main:
        check_run_cases(cfg, stage, plan.items, force)   # data checks before the folder is claimed or replaced
    record = RunRecord(plan.path, run_key=plan.run_key, data=plan.data)
    if dist.is_main:
        lock = locks.RunLock(locks.lock_path(cfg["run"]["out"], plan.path), plan.path).acquire(say=say)
        claimed = _CLAIMED.get()
        try:
            action = prepare_run_folder(record, plan.protocol, resume, force, say=say)
        except BaseException:
            lock.release()
            raise
        (claimed if claimed is not None else _UNSCOPED).append((record, lock))
    action = dist.broadcast_object(action if dist.is_main else None)
    return dist, plan, record, action, say


def stop_if_not_finite(loss: float, step: int, record: "RunRecord", run_cfg: Mapping[str, Any], stage: str) -> None:
    """A NaN / inf training loss ends the run with a one-line error instead of training on (and scoring)
    garbage; the run is marked failed (run_scope), with its last checkpoint from before the logging window."""
    if math.isfinite(loss):
        return
    msg = (f"{record.path}: the {stage} loss is {loss} at step {step} (precision "
           f"{run_cfg.get('precision', 'auto')}, compile {bool(run_cfg.get('compile'))}, attention "
           f"{run_cfg.get('attention', 'fused')}); the run was stopped unfinished. Try a lower learning rate or "
           f"--set run.precision=fp32, then run again (the failed folder starts over)")
    record.log(msg)
    raise RunError(msg)


def compiled(module: torch.nn.Module, run_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """``run.compile``: ``torch.compile(module, dynamic=False)`` (the crops and windows have fixed shapes) under
    sslbench's Inductor settings (sslbench/inductor.py), else ``module`` itself. The compiled wrapper shares the
    module's parameters; checkpoints are always written from the module itself, so their keys carry no
    ``_orig_mod.`` prefix. The Swin attention's SDPA branch (head dims the fused kernel does not take, e.g. the
    tiny preset's 4) is kept out of the compiled graph, as in the methods' compiled pre-training: compiled, it
    gave NaN losses on an H100 (2026-11-27, tiny preset on phantom BTCV, eager finite)."""
    if not run_cfg.get("compile"):
        return module
    from .fast_swin import keep_sdpa_out_of_compile

    keep_sdpa_out_of_compile(module)
    return inductor.compile(module, dynamic=False)


#: largest max |compiled - eager| / max |eager| of a method's encoder features (``compile_agreement``) that
#: still counts as the same computation in bf16; a zeroed encoder or permuted crops give ~0.5-1
COMPILE_FEATURE_TOLERANCE = 0.05
#: with an fp32 reference: the compiled bf16 features may be this many times as far from the fp32 computation
#: as the eager bf16 features are (two roundings of the same function, fused differently), or
#: COMPILE_FEATURE_TOLERANCE, whichever is larger. What it catches: non-finite features and gross faults (wrong
#: weights, permuted crops: ~0.5-1). What it may not: the miscompiled Swin stages of torch 2.11's padding bug
#: were 0.4-0.8 off in their own outputs but only 0.064 in the pooled backbone features (H100, 2026-11-27),
#: about what bf16 rounding gives there; stage-level comparisons (``benchmarks/compile_agreement.py``) see it.
COMPILE_ROUNDING_FACTOR = 2.0


def compiled_feature_problems(diffs: Mapping[str, float]) -> list[str]:
    """What is wrong with a method's compiled features (``compile_agreement``'s dict), one phrase each; []
    when they count as the eager computation. Compiled features must be finite; where an fp32 reference was
    computed (``<key>_vs_fp32``, ``<key>_eager_vs_fp32``) the compiled ones may be at most
    max(COMPILE_FEATURE_TOLERANCE, COMPILE_ROUNDING_FACTOR x the eager ones) from it, else at most
    COMPILE_FEATURE_TOLERANCE from the eager features."""
    problems = []
    for key, diff in diffs.items():
        if key.endswith("_vs_fp32"):
            continue
        if not math.isfinite(diff):
            problems.append(f"compiled {key} features are not finite")
            continue
        to_fp32, eager_to_fp32 = diffs.get(f"{key}_vs_fp32"), diffs.get(f"{key}_eager_vs_fp32")
        if to_fp32 is not None and eager_to_fp32 is not None:
            if not (math.isfinite(to_fp32) and math.isfinite(eager_to_fp32)):
                problems.append(f"the fp32 comparison of the {key} features is not finite (compiled {to_fp32:.3g}, "
                                f"eager {eager_to_fp32:.3g}): the eager or the fp32 computation gave NaN/inf")
                continue
            allowed = max(COMPILE_FEATURE_TOLERANCE, COMPILE_ROUNDING_FACTOR * eager_to_fp32)
            if not to_fp32 <= allowed:
                problems.append(f"compiled {key} features are {to_fp32:.3g} from the fp32 computation (max relative), "
                                f"eager's {eager_to_fp32:.3g} (allowed {allowed:.3g})")
        elif diff > COMPILE_FEATURE_TOLERANCE:
            problems.append(f"compiled {key} features differ from eager (max relative {diff:.3g} > "
                            f"{COMPILE_FEATURE_TOLERANCE})")
    return problems


def seeded_probe(fn: Callable[[], Any], bf16: bool, device: torch.device, seed: int) -> Any:
    """fn() under the run's autocast with the random number generators seeded by ``seed`` and restored
    afterwards: two calls draw the same crops and augmentations (a compiled-against-eager comparison)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with autocast(bf16, device):
            return fn()


def check_compiled_method(method: torch.nn.Module, volumes: torch.Tensor, bf16: bool, device: torch.device,
                          seed: int, where: str) -> dict[str, float]:
    """``run.compile``: before the first step, the compiled encoders of a method that can say
    (``compile_agreement``: VoCo) must give the eager encoders' features on one batch, as
    ``compiled_feature_problems`` judges them; otherwise a one-line RunError (a compiler fault must not train
    silently). Returns the relative differences ({} for methods without the check)."""
    if not hasattr(method, "compile_agreement"):
        return {}
    diffs = seeded_probe(lambda: method.compile_agreement(volumes), bf16, device, seed)
    problems = compiled_feature_problems(diffs)
    if problems:
        raise RunError(f"{where}: run.compile: on the first batch, {'; '.join(problems)}; run again with "
                       f"--set run.compile=false")
    return diffs


def align_optimizer_state(opt: torch.optim.Optimizer) -> int:
    """Give every optimizer state tensor of a parameter's shape that parameter's memory layout; returns how many
    were copied. Fused AdamW pairs elements by memory position: after a parameter goes channels-last (a
    compiled VoCo), a contiguous exp_avg would update it with other elements' moments, silently."""
    moved = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    moved += 1
    return moved


def compile_method(method: torch.nn.Module, run_cfg: Mapping[str, Any]) -> None:
    """``run.compile`` for a pre-training method: its own ``compile_encoders`` where it has one (VoCo
    compiles the student and teacher encoders and leaves the batched crop / loss code eager), else its
    ``forward``; the benchmark (``sslbench bench pretrain --compile``) compiles the same way."""
    if not run_cfg.get("compile"):
        return
    if hasattr(method, "compile_encoders"):
        method.compile_encoders(dynamic=False)
    else:
        method.forward = inductor.compile(method.forward, dynamic=False)


def use_run_attention(model: torch.nn.Module, run_cfg: Mapping[str, Any]) -> int:
    """``run.attention`` (fused | sdpa | monai) for the Swin window attention of a network to fine-tune or
    evaluate (sslbench/fast_swin.py: the same function computed faster; parameters and keys unchanged)."""
    from .fast_swin import apply_attention

    return apply_attention(model, str(run_cfg.get("attention", "fused")))


def _device_setup(run_cfg: Mapping[str, Any], dist: "distributed.Dist") -> tuple[torch.device, bool]:
    """This rank's device and bf16 choice; allocator and thread settings of the run."""
    device = distributed.device_for(dist, select_device(run_cfg))
    keep_freed_memory()
    if device.type == "cuda":   # fixed crop geometry: let cuDNN pick the fastest convolution once per shape
        torch.backends.cudnn.benchmark = True
    if run_cfg.get("num_threads"):
        torch.set_num_threads(int(run_cfg["num_threads"]))
    return device, use_bf16(run_cfg, device)


def _rank0_first(dist: "distributed.Dist", find: Callable[[], Any]) -> Any:
    """``find()`` (locating data, which may synthesise a phantom tree) on rank 0 first, then on the others."""
    if not dist.is_main:
        dist.barrier()
    found = find()
    if dist.is_main:
        dist.barrier()
    return found


def checkpoint_provenance(path: str | Path, method: str | None = None) -> dict[str, Any]:
    """What a backbone file's own pre-training record says of it, when it sits in one
    (``<run>/checkpoints/backbone.pt`` next to ``<run>/metrics.json`` of kind pretrain): ``include_decoder`` (the
    method trained the decoder), ``phantom`` (the corpus held phantoms), ``pretrain_run``. For any other file:
    ``include_decoder`` of the registered ``method`` named for it ({} without one)."""
    run = Path(path).resolve().parent.parent
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = None
    if not isinstance(metrics, dict) or metrics.get("kind") != "pretrain":
        from .methods import get_method_class

        cls = get_method_class(method) if method and method != "scratch" else None
        return {"include_decoder": bool(getattr(cls, "transfers_decoder", False))} if cls is not None else {}
    return {"include_decoder": bool(metrics.get("transfers_decoder")), "phantom": bool(metrics.get("phantom")),
            "pretrain_run": str(run), **({"run_key": metrics["run_key"]} if metrics.get("run_key") else {}),
            **({"corpus": metrics["corpus"]} if metrics.get("corpus") else {})}


def open_finetune(cfg: dict, init: dict | None, root: str | Path | None, resume: bool, force: bool,
                  console=None) -> "FinetuneRun | Outcome":
    """Find the data, name the run (protocol + data: its run key), lock and decide new / resume / skip, pick the
    device (an Outcome: skipped).

    Under torchrun (sslbench/distributed.py) rank 0 owns the run folder and the others follow its decision,
    wait while it synthesises a phantom task, stay silent and get a record whose writes do nothing.
    """
    task = cfg["task"]
    cfg = dict(cfg)
    cfg["init"] = {k: v for k, v in (init or {}).items() if k in ("source", "hash", "method")} or None
    dist, plan, record, action, say = _claim_run(cfg, "finetune", resume, force, console, root,
                                                 pretrain_key=(init or {}).get("run_key"))
    protocol, root_path, phantom = plan.protocol, plan.root, plan.phantom
    if action == "skip":
        say(f"already finished: {record.path} (identical protocol {protocol} on identical data); pass --force to "
            f"run it again")
        return Outcome(record, "skip", record.metrics or {})
    device, bf16 = _device_setup(cfg["run"], dist)
    if not dist.is_main:   # the other ranks never write to the run folder
        record = _SilentRecord(record.path)
    # PHANTOM when the task's data or the pre-training the run starts from touched phantoms
    return FinetuneRun(cfg, dist, protocol, record, action, say, device, bf16, Path(root_path),
                       phantom or bool(task.get("phantom")) or bool((init or {}).get("phantom")))


def resume_finetune(run: FinetuneRun, model, opt, sched, total: int, best: float) -> tuple[int, float, int, list]:
    """(start step, best score, its step, history): from checkpoints/last.pt when resuming, else a fresh start."""
    last = run.record.ckpt_dir / "last.pt"
    if run.action != "resume" or not last.is_file():
        return 0, best, -1, []
    state = load_state(last)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    start = int(state["step"])
    run.say(f"resuming {run.record.path} from step {start}/{total}")
    run.record.log(f"resumed from step {start}")
    return start, float(state["best"]), int(state["best_step"]), list(state.get("history", []))


def _evaluate_sharded(model, cases: list[dict], task: Mapping[str, Any], device: torch.device, bf16: bool,
                      dist: "distributed.Dist", progress=None) -> list[dict]:
    """Sliding-window evaluation with the cases split across ranks; every rank gets all rows, in case order."""
    if not dist.enabled:
        return evaluate_segmentation(model, cases, task, device, bf16, progress)
    order = {c["id"]: i for i, c in enumerate(cases)}
    mine = evaluate_segmentation(model, dist.shard(cases), task, device, bf16, progress if dist.is_main else None)
    rows = dist.gather_rows(mine)
    return sorted(rows, key=lambda r: order.get(r.get("case"), len(order)))


class _SilentRecord(RunRecord):
    """The run record seen by ranks other than 0: reads work, writes do nothing."""

    def write_recipe(self, *a, **k) -> None: ...
    def write_env(self, *a, **k) -> None: ...
    def set_status(self, *a, **k) -> None: ...
    def log(self, *a, **k) -> None: ...
    def scalars(self, *a, **k) -> None: ...


def write_results(record: RunRecord, cfg: Mapping[str, Any], rows: list[dict], summary: dict, protocol: str,
                  phantom: bool, root: Path, extra: Mapping[str, Any]) -> None:
    import pandas as pd

    task = cfg["task"]
    metrics = {
        "kind": "finetune",
        "task": task["name"],
        "task_title": task["title"],
        "method": cfg["run"].get("label", cfg["method"]["name"]),
        "method_recipe": cfg["method"]["name"],
        "variant": (cfg["method"].get("params") or {}).get("variant"),
        "preset": cfg["run"]["preset"],
        "seed": cfg["run"]["seed"],
        "protocol": protocol,
        **record.identity(),
        "phantom": phantom,
        "data_root": str(root),
        "metric": "dice",
        "metrics": list(task["evaluate"].get("metrics") or ["dice"]),
        "nsd_tolerance_mm": task["evaluate"].get("nsd_tolerance"),
        "scored": "regions" if task.get("regions") else "classes",
        "scoring": scoring(task),   # the empty-set rules, NSD and HD95 settings the scores follow
        **summary,
        "cases": rows,
        **extra,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    pd.DataFrame(rows).to_csv(record.path / ".cases.csv.tmp", index=False)
    os.replace(record.path / ".cases.csv.tmp", record.path / "cases.csv")
    atomic_write_json(record.path / "metrics.json", metrics)
    record.scalars(int(extra.get("steps") or 0), {"eval/mean_dice": summary.get("mean_dice"),
                                                  **{"eval/dice/" + k.replace(" ", "_"): v for k, v in (summary.get("per_class") or {}).items()}})
    record.set_status(state="finished", finished=metrics["finished"])
    record.log(f"finished: mean dice {summary['mean_dice']:.4f} over {summary['n_cases']} cases"
               f"{' (PHANTOM data)' if phantom else ''}")


def reevaluate(run_dir: str | Path, checkpoint: str | None = None, root: str | Path | None = None,
               console=None, precision: str | None = None, attention: str | None = None) -> dict:
    """Evaluate a finished fine-tuning run again (e.g. with another checkpoint); writes evaluation.json.

    ``precision`` (bf16 | fp32) and ``attention`` (fused | sdpa | monai) override the run's own settings for
    this evaluation only, to check that fast inference gives the reference's Dice; the result then goes to
    evaluation-<precision>-<attention>.json (never over the run's evaluation.json) and records both."""
    from .data.transforms import preprocess_transforms

    record = RunRecord(run_dir)
    if not (record.path / "recipe.yaml").is_file():
        raise RunError(f"{record.path}: not a run folder (no recipe.yaml)")
    cfg = record.read_recipe()
    task = cfg["task"]
    if task["kind"] in ("classification", "classification2d"):
        from . import classify

        if precision is not None or attention is not None:
            raise RecipeError(f"{record.path}: --precision/--attention overrides apply to segmentation runs; "
                              f"this is a {task['kind']} run")
        return classify.reevaluate(record, cfg, checkpoint=checkpoint, root=root, console=console)
    run_cfg = dict(cfg["run"])
    overridden = precision is not None or attention is not None
    if precision is not None:
        if precision not in ("bf16", "fp32"):
            raise RecipeError(f"--precision: {precision!r}; expected bf16 or fp32")
        run_cfg["precision"] = precision
    if attention is not None:
        from .fast_swin import ATTENTIONS

        if attention not in ATTENTIONS:
            raise RecipeError(f"--attention: {attention!r}; expected one of {', '.join(ATTENTIONS)}")
        run_cfg["attention"] = attention
    device = select_device(run_cfg)
    bf16 = use_bf16(run_cfg, device)
    root_path, phantom = locate_data(task, root or (cfg.get("data") or {}).get("root"))
    splits = read_splits(task, root_path)
    ckpt = Path(checkpoint) if checkpoint else next((p for p in (record.ckpt_dir / "best.pt", record.ckpt_dir / "last.pt") if p.is_file()), None)
    if ckpt is None or not ckpt.is_file():
        raise RunError(f"{record.path}/checkpoints: no best.pt or last.pt to evaluate")
    model = build_model(cfg["model"], input_channels(task), output_channels(task),
                        img_size=tuple(task["finetune"]["roi"]))
    use_run_attention(model, run_cfg)
    state = load_state(ckpt)
    model.load_state_dict(state["model"])
    model.to(device)
    progress = make_progress(console)
    with progress:
        cases = load_cases(splits["val"], preprocess_transforms(task), "preprocess val", progress)
        rows = evaluate_segmentation(compiled(model, run_cfg), cases, task, device, bf16, progress)
    summary = summarize(rows, score_names(task))
    settings = {"precision": "bf16" if bf16 else "fp32", "attention": str(run_cfg.get("attention", "fused")),
                "device": str(device)}
    out = {"checkpoint": str(ckpt), "phantom": phantom or bool(task.get("phantom")), **settings,
           "scoring": scoring(task), **summary, "cases": rows}
    name = f"evaluation-{settings['precision']}-{settings['attention']}.json" if overridden else "evaluation.json"
    out["written"] = str(record.path / name)
    atomic_write_json(record.path / name, out)
    return out


# --------------------------------------------------------------------------------------------------
# Pre-training
# --------------------------------------------------------------------------------------------------
def pretrain(cfg: dict, root: str | Path | None = None, resume: bool = False, force: bool = False,
             console=None) -> Outcome:
    """:func:`_pretrain` inside a :func:`run_scope` (its folder locked while it runs; ``failed`` on an error)."""
    with run_scope():
        return _pretrain(cfg, root=root, resume=resume, force=force, console=console)


class DataWait:
    """The fraction of step time spent waiting for the step's batch (``data_wait`` in log.txt, status.json and
    metrics.json): host wall time from a step's start until its batch is on its way to the device, over the
    step's wall time (CUDA work is asynchronous, so a GPU-bound step shows its time in the step, not the wait)."""

    def __init__(self):
        self.wait = self.total = self.wait_i = self.total_i = 0.0
        self._t0 = self._t1 = None

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def got_data(self) -> None:
        self._t1 = time.perf_counter()

    def end_step(self) -> None:
        now = time.perf_counter()
        w, t = self._t1 - self._t0, now - self._t0
        self.wait, self.total, self.wait_i, self.total_i = self.wait + w, self.total + t, self.wait_i + w, self.total_i + t

    def fraction(self) -> float:
        """Over the steps of this session so far (the step being logged counts up to its data)."""
        return self.wait / self.total if self.total > 0 else 0.0

    def interval(self) -> float:
        """Over the steps since the last call (then restarts)."""
        out = self.wait_i / self.total_i if self.total_i > 0 else 0.0
        self.wait_i = self.total_i = 0.0
        return out


def check_loader(cfg: Mapping[str, Any], cls) -> None:
    """One-line errors for ``method.pretrain.loader`` / ``native_crops`` settings that cannot run (before any run
    folder exists); ``cls`` None skips the check of the method's corpus-level set-up."""
    from .methods.base import PretrainMethod

    pt = cfg["method"].get("pretrain") or {}
    where = (cfg.get("recipe_files") or {}).get("method") or cfg["method"]["name"]
    if pt.get("loader", "memory") != "stream":
        if pt.get("native_crops"):
            raise RecipeError(f"{where}: key 'pretrain.native_crops': true needs pretrain.loader stream (the memory "
                              f"loader keeps whole resized volumes); expected --set method.pretrain.loader=stream")
        return
    if cls is not None and cls.prepare is not PretrainMethod.prepare and not getattr(cls, "streams_prepare", False):
        raise RecipeError(f"{where}: key 'pretrain.loader': stream, but method '{cfg['method']['name']}' sets itself up "
                          f"on the whole corpus in memory (prepare); expected loader memory")
    if cls is not None and getattr(cls, "streams_prepare", False) and pt.get("native_crops"):
        raise RecipeError(f"{where}: key 'pretrain.native_crops': true, but method '{cfg['method']['name']}' discovers "
                          f"its set-up on whole resized volumes and trains on that grid; expected native_crops false")
    if str(cfg["run"].get("cache", "read")) == "none":
        raise RecipeError("run.cache: none, but method.pretrain.loader=stream reads the corpus from the case cache; "
                          "expected read or write")


def pretrain_stream(cfg: Mapping[str, Any], cls, items: list[dict], size, with_label: bool,
                    dist: "distributed.Dist", device: torch.device, progress=None,
                    log: Callable[[str], None] = print):
    """The streaming loader (``method.pretrain.loader: stream``) of this rank's shard of the corpus.

    The shard's cases missing from the case cache are preprocessed into it first (threads, progress bar; every
    rank fills only its own shard), so nothing of the corpus is kept in memory (``cls`` None: no check of the
    method's corpus-level set-up, as ``bench pretrain --from-disk`` times the loader); :class:`sslbench.data.stream.Stream`
    then reads step batches from the cache files in ``run.loader_workers`` processes within ``run.loader_memory_mb``.
    """
    from .data.cache import CaseCache
    from .data.stream import Stream, shard
    from .data.transforms import preprocess_transforms

    run_cfg, corpus, pt = cfg["run"], cfg["corpus"], cfg["method"]["pretrain"]
    check_loader(cfg, cls)
    cache = CaseCache(corpus, with_label=with_label)
    mine = shard(items, dist.rank, dist.world_size)
    files = [cache.files(it) for it in mine]
    todo = [it for it, (image, label) in zip(mine, files)
            if not image.is_file() or (label is not None and not label.is_file())]
    if todo:
        log(f"caching {len(todo)} of {len(mine)} corpus volumes in {cache.folder}")
        load_cases(todo, preprocess_transforms(corpus, with_label=with_label), "cache corpus", progress,
                   cache=cache, write=True, keep=False)
    return Stream(files, size, int(pt["batch_size"]), int(run_cfg["seed"]), rank=dist.rank, with_label=with_label,
                  budget_mb=float(run_cfg.get("loader_memory_mb", 2048)), workers=int(run_cfg.get("loader_workers", 0)),
                  pin_memory=device.type == "cuda", native=bool(pt.get("native_crops", False)))


@torch.no_grad()
def stream_features(method: torch.nn.Module, stream, dist: "distributed.Dist", device: torch.device) -> torch.Tensor:
    """Every corpus volume's ``method.volume_features`` [N, D] in corpus order, without holding the corpus: this rank
    reads its shard (volumes r, r + W, ...) from the case cache in chunks; the shards are gathered to every rank and
    interleaved back, so every rank discovers the same set-up the memory loader's ``prepare`` does."""
    mine = torch.cat([method.volume_features(chunk.to(device)) for chunk in stream.whole_volumes()])
    if not dist.enabled:
        return mine
    parts = dist.gather_rows([mine])
    out = torch.empty((sum(len(p) for p in parts), mine.shape[1]), dtype=mine.dtype)
    for r, part in enumerate(parts):
        out[r::dist.world_size] = part
    return out


def _pretrain(cfg: dict, root: str | Path | None = None, resume: bool = False, force: bool = False,
              console=None) -> Outcome:
    """Pre-train a method's backbone on a corpus; writes checkpoints/backbone.pt in SwinUNETR's key layout."""
    from monai import transforms as mt

    from .data.transforms import preprocess_transforms, step_seed
    from .methods import get_method_class

    method_cfg, corpus = cfg["method"], cfg["corpus"]
    if method_cfg.get("pretrain") is None:
        raise RecipeError(f"method '{method_cfg['name']}' has no pre-training (its recipe's 'pretrain' is null)")
    two_d = track2d.is_2d(corpus)   # the 2D track (sslbench/track2d.py): images of a classification2d task
    if two_d:
        track2d.check(cfg)
    cls = track2d.method_class(cfg) if two_d else get_method_class(method_cfg["name"])
    if cls is None or method_cfg["status"] != "available":
        raise RecipeError(f"method '{method_cfg['name']}' is {method_cfg['status']}: its pre-training is not implemented yet")
    pt = method_cfg["pretrain"]
    # a method that pre-trains on label maps (the supervised controls) reads a segmentation task as its corpus
    needs_labels = bool(getattr(cls, "needs_labels", False))
    if needs_labels and (corpus.get("kind") != "segmentation" or len(corpus.get("classes") or []) < 2):
        where = (cfg.get("recipe_files") or {}).get("corpus") or corpus["name"]
        raise RecipeError(f"{where}: method '{method_cfg['name']}' pre-trains on label "
                          f"maps; corpus '{corpus['name']}' is a {corpus.get('kind')} recipe without classes; expected "
                          f"a segmentation task (e.g. --corpus phantom-btcv)")
    params = dict(method_cfg.get("params") or {})
    if needs_labels:   # the method knows no task: its class count is the labelled corpus's
        params["num_classes"] = len(corpus["classes"])
    check_loader(cfg, cls)
    # one root, or the roots of data.sources (a labelled corpus: its training split, images and labels)
    dist, plan, record, action, say = _claim_run(cfg, "pretrain", resume, force, console, root)
    protocol, root_path, phantom, items = plan.protocol, plan.root, plan.phantom, plan.items
    if action == "skip":
        say(f"pre-training already finished: {record.path} (protocol {protocol}); reusing it")
        return Outcome(record, "skip", record.metrics or {})

    device, bf16 = _device_setup(cfg["run"], dist)
    seed = int(cfg["run"]["seed"])
    total = int(pt["steps"])
    size = track2d.input_size(corpus) if two_d else cls.input_size(params)
    if size is None:
        raise RecipeError(f"method '{method_cfg['name']}': random-crop corpora are not supported yet (input_size is None)")

    progress = make_progress(console)
    with progress:
        stream = stack = None
        if pt.get("loader", "memory") == "stream":   # step batches read from the case cache by worker processes
            stream = pretrain_stream(cfg, cls, items, size, needs_labels, dist, device, progress,
                                     say if dist.is_main else (lambda *_: None))

        elif two_d:
            stack = track2d.load_images(corpus, items, progress)   # [N, 1, H, W] at preprocess.size
            if device.type == "cuda":
                stack = stack.to(device)
        else:
            cache, write = case_cache(cfg["run"], corpus, with_label=needs_labels)
            volumes = load_cases(items, preprocess_transforms(corpus, with_label=needs_labels), "preprocess corpus",
                                 progress, cache=cache, write=write)
            resize = mt.Resize(spatial_size=tuple(size), mode="trilinear")
            stack = torch.stack([torch.as_tensor(resize(torch.as_tensor(v["image"]).float())).float()
                                 for v in volumes])  # [N, 1, X, Y, Z]
            if needs_labels:   # [N, 2, X, Y, Z]: channel 1 holds the label ids (nearest-neighbour resize)
                nearest = mt.Resize(spatial_size=tuple(size), mode="nearest")
                labels = torch.stack([torch.as_tensor(nearest(torch.as_tensor(v["label"]).float())).float()
                                      for v in volumes])
                stack = torch.cat([stack, labels], dim=1)
            del volumes
            if device.type == "cuda":
                stack = stack.to(device)  # GPU-resident corpus: batches are gathered on the device
        # the run folder only once every case loaded and passed its checks (a refused run leaves none)
        if dist.is_main:
            record.path.mkdir(parents=True, exist_ok=True)
        if action == "new" and dist.is_main:
            record.write_recipe({**cfg, "data": {"root": str(root_path), "phantom": phantom}})
            record.write_env(str(device), world_size=dist.world_size)
            record.set_status(state="running", stage="pretrain", step=0, protocol=protocol, world_size=dist.world_size,
                              started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if stream is not None and dist.is_main:
            record.log(stream.plan.describe() + f"; rank 0 of {dist.world_size} reads its shard of {len(stream)} "
                       f"of {len(items)} volumes")
        torch.manual_seed(seed)
        method = cls(params, cfg["model"]).to(device)
        if stack is not None:
            method.prepare(stack, seed)   # corpus-level set-up (e.g. TransVW's visual words); deterministic
        elif getattr(cls, "streams_prepare", False):   # the same set-up from features streamed volume by volume
            method.discover(stream_features(method, stream, dist, device), seed)
        opt = pretrain_optimizer(method, pt, device)
        sched = pretrain_schedule(opt, pt, total)
        start, history = 0, []
        last = record.ckpt_dir / "last.pt"
        if action == "resume" and last.is_file():
            state = load_state(last)
            method.load_state_dict(state["method"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start, history = int(state["step"]), list(state.get("history", []))
            say(f"resuming {record.path} from step {start}/{total}")
        # Under torchrun: DDP averages gradients; each rank draws its own batch (rank 0 draws what a single
        # process would), so the global batch is world_size x batch_size.
        compile_method(method, cfg["run"])
        align_optimizer_state(opt)     # compiled VoCo's backbones went channels-last; a resumed state may not be
        if cfg["run"].get("compile"):
            if dist.is_main:
                record.log("run.compile: Inductor settings " + ", ".join(f"{k}={v}" for k, v in inductor.current().items()))
            first = stack[: pt["batch_size"]] if stream is None else stream.first_batch()
            diffs = check_compiled_method(method, first.to(device), bf16, device, seed, str(record.path))
            if diffs and dist.is_main:
                record.log("compiled encoders against eager on the first batch (max relative difference): "
                           + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
        step_fn = distributed.wrap(method, dist, device)
        job = progress.add_task(f"pretrain {method_cfg['name']}", total=total, completed=start, info="")
        acc: dict[str, torch.Tensor] = {}
        n_acc = 0
        t0 = time.perf_counter()
        batches = stream.batches(start, total) if stream is not None else None
        wait = DataWait()
        for step in range(start, total):
            wait.start_step()
            if batches is not None:   # the StepSampler draws what the memory loader's rng draws below
                volumes_b = next(batches).to(device, non_blocking=True)
            else:
                rng = np.random.default_rng([seed, step] if dist.rank == 0 else [seed, step, dist.rank])
                idx = torch.as_tensor(rng.integers(0, stack.shape[0], size=pt["batch_size"]), device=stack.device)
                volumes_b = stack.index_select(0, idx).to(device, non_blocking=True)
            wait.got_data()
            torch.manual_seed(step_seed(seed, step, 1 + 1000 * dist.rank))
            with autocast(bf16, device):
                loss, logs = step_fn(volumes_b, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            method.after_step(step)
            wait.end_step()
            for k, v in {"loss": loss, **logs}.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                acc[k] = acc.get(k, 0) + v
            n_acc += 1
            done = step + 1
            if done % pt.get("log_every", 10) == 0 or done == total:
                entry = {"step": done, **{k: float(dist.mean(v.to(device) / n_acc)) for k, v in acc.items()}}
                stop_if_not_finite(entry["loss"], done, record, cfg["run"], "pre-training")
                history.append(entry)
                acc, n_acc = {}, 0
                if dist.is_main:
                    record.log("step {step} ".format(step=done) + " ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "step")
                               + f" data_wait {wait.interval():.3f}")
                    record.scalars(done, {**{f"pretrain/{k}": v for k, v in entry.items() if k != "step"},
                                          "pretrain/lr": opt.param_groups[0]["lr"]})
                progress.update(job, info=f"loss {entry['loss']:.4f}")
            if done % pt.get("checkpoint_every", 500) == 0 or done == total:
                if dist.is_main:
                    atomic_torch_save({"method": method.state_dict(), "optimizer": opt.state_dict(),
                                       "scheduler": sched.state_dict(), "step": done, "history": history}, last)
                    record.set_status(step=done, data_wait=wait.fraction())
                dist.barrier()
            progress.update(job, advance=1)
            _kill_point(done)
        elapsed = time.perf_counter() - t0
    _rank_report(dist, method.backbone_state_dict(), steps=total, history=history)
    if not dist.is_main:   # rank 0 writes the weights and the record; the others wait for them
        dist.barrier()
        return Outcome(record, action, {"kind": "pretrain", "rank": dist.rank,
                                        "transfers_decoder": bool(getattr(cls, "transfers_decoder", False))})
    backbone = {k: v.detach().cpu() for k, v in method.backbone_state_dict().items()}
    atomic_torch_save(backbone, record.ckpt_dir / "backbone.pt")
    atomic_torch_save({k: v.detach().cpu() for k, v in method.head_state_dict().items()}, record.ckpt_dir / "heads.pt")
    metrics = {"kind": "pretrain", "method": method_cfg["name"], "variant": (method_cfg.get("params") or {}).get("variant"),
               "corpus": corpus["name"], "phantom": phantom, "protocol": protocol, **record.identity(), "seed": seed,
               "preset": cfg["run"]["preset"], "steps": total, "volumes": len(items), "world_size": dist.world_size,
               "labelled": needs_labels,
               "final_loss": history[-1]["loss"] if history else None, "history": history,
               "seconds_this_session": elapsed, "data_wait": wait.fraction(),
               "loader": pt.get("loader", "memory"), "backbone_tensors": len(backbone),
               "transfers_decoder": bool(getattr(cls, "transfers_decoder", False)),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(record.path / "metrics.json", metrics)
    record.set_status(state="finished", finished=metrics["finished"])
    dist.barrier()
    return Outcome(record, action, metrics)


# --------------------------------------------------------------------------------------------------
# The whole protocol for one (method, task, seed)
# --------------------------------------------------------------------------------------------------
def run_protocol(method: str, task: str, *, preset: str | None = None, overrides=(), seed: int | None = None,
                 root: str | Path | None = None, corpus: str | None = None, corpus_root: str | Path | None = None,
                 out: str | None = None, resume: bool = False, force: bool = False, console=None,
                 on_validation: Callable[[int, float], None] | None = None) -> Outcome:
    """pretrain (if the method has one; an identical finished pre-training is reused) -> finetune -> evaluate.

    This is what ``sslbench run`` does and what every sweep trial calls.
    """
    cfg = recipes.resolve(method, task, preset=preset, overrides=overrides, seed=seed, corpus=corpus)
    if out:
        cfg["run"]["out"] = out
    corpus_root = track2d.corpus_root(cfg, root, corpus_root)   # 2D: the task's pretrain split, from its --root
    # roots, readers and feasibility of both stages before any work starts (nothing written if refused)
    preflight(cfg, root, corpus_root, say=(console.print if console is not None else print))
    init = None
    if cfg["task"]["kind"] == "classification2d":
        from . import classify

        classify.refuse_pretraining_for_2d(cfg)   # a 3D corpus, or a method without a 2D form
    if cfg["method"].get("pretrain") is not None:
        pcfg = recipes.split_config(cfg, "corpus")
        pre = pretrain(pcfg, root=corpus_root, resume=resume, force=False, console=console)
        init = {"path": str(pre.record.ckpt_dir / "backbone.pt"), "source": "pretrain",
                "pretrain_run": str(pre.record.path), "hash": recipes.protocol_hash(pcfg), "run_key": pre.record.run_key,
                "method": cfg["method"]["name"], "include_decoder": bool(pre.metrics.get("transfers_decoder", False)),
                "phantom": bool(pre.metrics.get("phantom")), "corpus": cfg["corpus"]["name"]}
    return finetune(recipes.split_config(cfg, "task"), root=root, init=init, resume=resume, force=force,
                    console=console, on_validation=on_validation)
