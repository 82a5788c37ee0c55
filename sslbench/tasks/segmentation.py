"""The segmentation task kind: SwinUNETR (or the recipe's model) fine-tuned on labelled volumes with DiceCE
(softmax over classes) or, for a regions task (BraTS), soft Dice on sigmoid region channels; scored by
sliding-window inference with Dice (and NSD / HD95 where the recipe lists them) per case.

Batches: ``finetune.batch_size`` cases drawn per step with the step's own random stream, each cut into
``finetune.num_samples`` RandCropByPosNegLabel crops by the recipe's MONAI transforms (threads prefetch the next
steps), or, with ``finetune.loader: stream``, the same crops cut from the case cache by worker processes.
"""
from __future__ import annotations

import copy
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .. import distributed
from ..data.cases import case_cache, load_cases
from ..data.loaded import check_cases, labeled_subset
from ..data.locate import read_splits
from ..metrics import score_names, scoring
from ..models.backbones import build_model, load_backbone, read_checkpoint
from ..recipes import input_channels, output_channels
from ..store.records import RunRecord
from .base import autocast, check_volumes, Steps, TaskKind, Validation, write_finetune_record


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

    from ..metrics import case_scores, confusion_counts, predict_masks, truth_masks

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
        if not task.get("regions"):   # which class each true class's voxels went to (summed in the summary)
            row["confusion"] = confusion_counts(logits.argmax(1), label[:, 0], logits.shape[1])
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
    Rows carrying ``confusion`` counts (label tasks) give ``confusion``: {labels: background + names, counts:
    voxels of true class (row) predicted as class (column), summed over the cases}.
    """
    import pandas as pd

    from ..metrics import summed_confusion

    matrices = [r["confusion"] for r in rows if "confusion" in r]
    df = pd.DataFrame(without_confusion(rows)).set_index("case")

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
    if matrices:   # rows: true class, columns: predicted class, voxels summed over the cases
        out["confusion"] = {"labels": ["background", *names], "counts": summed_confusion(matrices)}
    return out


def without_confusion(rows: list[dict]) -> list[dict]:
    """The per-case rows as metrics.json / cases.csv keep them: scores only (each case's confusion counts are
    summed into the summary's ``confusion``)."""
    return [{k: v for k, v in r.items() if k != "confusion"} for r in rows]


def make_loss(task: Mapping[str, Any]) -> torch.nn.Module:
    """The loss ``finetune.loss`` names (``dicece``, :attr:`Segmentation.losses`): DiceCE with softmax over
    classes, or, for a regions task, Dice with a sigmoid per region channel.

    The regions loss is the SwinUNETR BraTS recipe's (Hatamizadeh et al. 2022, Sec. 3: soft Dice on the
    TC / WT / ET sigmoid outputs), MONAI ``DiceLoss(sigmoid=True)``.
    """
    from monai.losses import DiceCELoss, DiceLoss

    Segmentation.loss_name(task)   # "dicece": its only loss (a one-line RecipeError otherwise)
    if task.get("regions"):
        return DiceLoss(to_onehot_y=False, sigmoid=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


def finetune_stream(cfg: Mapping[str, Any], train_items: list[dict], val_items: list[dict], dist: "distributed.Dist",
                    device: torch.device, progress=None, log: Callable[[str], None] = print):
    """``task.finetune.loader: stream``: (the :class:`sslbench.data.stream.CropStream` of this rank's shard of the
    training cases, the validation cases mapped from the case cache).

    Each rank preprocesses only the cases of its shard (every ``world_size``-th training case from its rank, and
    its share of the validation cases) that the case cache lacks, checks its training cases one at a time from
    the cache (channels, label values; nothing of the split stays in memory), and maps the validation cases
    (pages read on touch) after every rank has cached its share.
    """
    from ..data.cache import CaseCache
    from ..data.stream import CropStream, shard
    from ..data.transforms import preprocess_transforms, train_augmentation

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


def _evaluate_sharded(model, cases: list[dict], task: Mapping[str, Any], device: torch.device, bf16: bool,
                      dist: "distributed.Dist", progress=None) -> list[dict]:
    """Sliding-window evaluation with the cases split across ranks; every rank gets all rows, in case order."""
    if not dist.enabled:
        return evaluate_segmentation(model, cases, task, device, bf16, progress)
    order = {c["id"]: i for i, c in enumerate(cases)}
    mine = evaluate_segmentation(model, dist.shard(cases), task, device, bf16, progress if dist.is_main else None)
    rows = dist.gather_rows(mine)
    return sorted(rows, key=lambda r: order.get(r.get("case"), len(order)))


def write_results(record: RunRecord, cfg: Mapping[str, Any], rows: list[dict], summary: dict, protocol: str,
                  phantom: bool, root: Path, extra: Mapping[str, Any]) -> None:
    """A segmentation run's metrics.json and cases.csv (:func:`sslbench.tasks.base.write_finetune_record`), its
    scores in TensorBoard and the last line of its log."""
    task = cfg["task"]
    fields = {"metric": "dice", "metrics": list(task["evaluate"].get("metrics") or ["dice"]),
              "nsd_tolerance_mm": task["evaluate"].get("nsd_tolerance"),
              "scored": "regions" if task.get("regions") else "classes",
              "scoring": scoring(task),   # the empty-set rules, NSD and HD95 settings the scores follow
              **summary}
    # the scores in TensorBoard before the record is finished (finishing closes this process's event file)
    record.scalars(int(extra.get("steps") or 0), {"eval/mean_dice": summary.get("mean_dice"),
                                                  **{"eval/dice/" + k.replace(" ", "_"): v for k, v in (summary.get("per_class") or {}).items()}})
    write_finetune_record(record, cfg, rows, fields, protocol, phantom, root, extra)
    record.log(f"finished: mean dice {summary['mean_dice']:.4f} over {summary['n_cases']} cases"
               f"{' (PHANTOM data)' if phantom else ''}")


class Segmentation(TaskKind):
    """The segmentation kind (see the module docstring)."""

    metric = "dice"
    losses = {"dicece": "Dice + cross-entropy over softmax classes; on a regions task soft Dice on sigmoid regions"}
    measures_data_wait = True
    overrides_runtime = True
    initial_best = -1.0
    label_maps = True
    volumes = True
    loaders = ("memory", "stream")

    @classmethod
    def check_cases(cls, run_cfg: Mapping[str, Any], task: Mapping[str, Any], items: list[dict], force: bool) -> None:
        """NIfTI / DICOM volumes: :func:`sslbench.tasks.base.check_volumes`."""
        check_volumes(run_cfg, task, items, force)

    @classmethod
    def step_input(cls, task: Mapping[str, Any]) -> tuple[int, str]:
        """``finetune.batch_size`` cases x ``num_samples`` crops of ``roi`` a step, through encoder and decoder."""
        ft = task.get("finetune") or {}
        roi = ft.get("roi") or 96
        each = int(roi) ** 3 if isinstance(roi, (int, float)) else int(math.prod(int(x) for x in roi))
        return int(ft.get("batch_size", 1)) * int(ft.get("num_samples", 1)) * each, "segmentation"

    @classmethod
    def print_results(cls, metrics: Mapping[str, Any], console) -> None:
        print_results(metrics, console)

    def load(self, root: Path, progress) -> None:
        from ..data.transforms import preprocess_transforms

        cfg, task, ft, dist = self.cfg, self.task, self.ft, self.rt.dist
        splits = read_splits(task, root)
        self.train_items = labeled_subset(splits["train"], ft.get("labeled_cases"))
        self.val_items = splits["val"]
        self.stream = None
        if ft.get("loader", "memory") == "stream":   # step crops cut from the case cache by worker processes
            self.stream, self.val_cases = finetune_stream(cfg, self.train_items, self.val_items, dist, self.rt.device,
                                                          progress, self.say if dist.is_main else (lambda *_: None))
            return
        pre = preprocess_transforms(task)
        cache, write = case_cache(cfg["run"], task, with_label=True)
        self.train_cases = load_cases(self.train_items, pre, "preprocess train", progress, cache=cache, write=write)
        self.val_cases = load_cases(self.val_items, pre, "preprocess val", progress, cache=cache, write=write)
        check_cases(self.train_cases + self.val_cases, task, self.train_items + self.val_items,
                    cfg["recipe_files"]["task"])

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg["model"], in_channels=input_channels(self.task),
                           out_channels=output_channels(self.task), img_size=tuple(self.ft["roi"]))

    def load_init(self, model: torch.nn.Module, init: Mapping[str, Any] | None):
        if not init or not init.get("path"):
            return None
        return load_backbone(model, read_checkpoint(init["path"]), str(init["path"]),
                             include_decoder=bool(init.get("include_decoder", False)),
                             model_name=str(self.cfg["model"].get("name", "swinunetr")),
                             channel_adapt=str(self.ft.get("channel_adapt", "random")))

    def describe_loader(self) -> str | None:
        if self.stream is None:
            return None
        return (self.stream.plan.describe() + f"; rank 0 of {self.rt.dist.world_size} reads its shard of "
                f"{len(self.stream)} of {len(self.train_items)} training cases")

    def _make_batch(self):
        """The memory loader's batch of a step: each loader thread draws with its own copy of the random
        transforms, re-seeded for the step; rank 0 draws what a single process draws, the other ranks their own
        streams (global batch N x batch)."""
        from ..data.transforms import step_seed, train_augmentation

        aug, local = train_augmentation(self.task), threading.local()
        seed, rank, n, cases = int(self.cfg["run"]["seed"]), self.rt.dist.rank, int(self.ft["batch_size"]), self.train_cases

        def make_batch(step: int):
            mine = getattr(local, "aug", None)
            if mine is None:
                mine = local.aug = copy.deepcopy(aug)
            rng = np.random.default_rng([seed, step] if rank == 0 else [seed, step, rank])
            picks = rng.integers(0, len(cases), size=n)
            mine.set_random_state(seed=step_seed(seed, step, 1000 * rank))
            crops = []
            for i in picks:
                out = mine({"image": cases[int(i)]["image"], "label": cases[int(i)]["label"]})
                crops.extend(out if isinstance(out, list) else [out])
            return (torch.stack([plain(c["image"]) for c in crops]).float(),
                    torch.stack([plain(c["label"]) for c in crops]).float())

        return make_batch

    def steps(self, model: torch.nn.Module, start: int, total: int) -> Steps:
        from ..data.prefetch import Prefetcher, pinned
        from ..metrics import targets

        rt, task = self.rt, self.task
        device = rt.device
        # the CropStream draws what the memory loader's make_batch draws, in worker processes
        batches = self.stream.batches(start, total) if self.stream is not None else None
        workers = 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)
        fetch = None
        if batches is None:
            make = self._make_batch()
            if device.type == "cuda":     # an asynchronous upload (data/prefetch.py pinned), as the CropStream's
                make = pinned(make)
            fetch = Prefetcher(make, start, total, depth=4, workers=workers)
        train_model, self.eval_model, loss_fn = rt.train_module(model), rt.compiled(model), make_loss(task)

        def batch(step: int):
            x, y = next(batches) if batches is not None else fetch.get(step)
            return x.to(device, non_blocking=True), targets(y.to(device, non_blocking=True), task)

        def loss(xy, step: int):
            with rt.autocast():
                logits = train_model(xy[0])
            return loss_fn(logits.float(), xy[1]), {}

        def validate(done: int) -> Validation:
            rows = _evaluate_sharded(self.eval_model, self.val_cases, task, device, rt.bf16, rt.dist)
            score = float(np.nanmean([r["mean"] for r in rows]))
            return Validation(score, score, {"step": done, "val_dice": score}, f"validation dice {score:.4f}",
                              {"val/dice": score}, {"val_dice": score})

        return Steps(batch, loss, validate, close=fetch.close if fetch is not None else (lambda: None))

    def load_validation(self, root: Path, progress) -> None:
        from ..data.transforms import preprocess_transforms

        self.val_items = read_splits(self.task, root)["val"]
        self.val_cases = load_cases(self.val_items, preprocess_transforms(self.task), "preprocess val", progress)

    def evaluate(self, model: torch.nn.Module, progress) -> list[dict]:
        eval_model = getattr(self, "eval_model", None)
        if eval_model is None:   # `sslbench evaluate RUN`: no training steps built one
            eval_model = self.rt.compiled(model)
        return _evaluate_sharded(eval_model, self.val_cases, self.task, self.rt.device, self.rt.bf16,
                                 self.rt.dist, progress)

    def evaluation(self, result: list[dict]) -> dict:
        return {"scoring": scoring(self.task), **summarize(result, score_names(self.task)),
                "cases": without_confusion(result)}

    def record_fields(self) -> dict:
        return {"loader": self.ft.get("loader", "memory")}

    def write_results(self, record, result: list[dict], protocol: str, phantom: bool, root: Path,
                      extra: Mapping) -> None:
        write_results(record, self.cfg, without_confusion(result), summarize(result, score_names(self.task)),
                      protocol=protocol,
                      phantom=phantom, root=root, extra=extra)


def print_results(metrics: Mapping[str, Any], console) -> None:
    """The terminal table of a segmentation run: Dice per class (NSD and HD95 where the task scores them), and
    the mean per case then over cases with its std."""
    from rich.table import Table

    phantom = " [PHANTOM data, not the real dataset]" if metrics.get("phantom") else ""
    t = Table(title=f"{metrics['method']} on {metrics['task_title']}{phantom}: Dice (validation split, "
                    f"{metrics['n_cases']} cases, checkpoint {metrics.get('checkpoint', '?')})")
    t.add_column("class")
    t.add_column("Dice (%)", justify="right")
    # NSD (surface-area, metrics.json scoring.nsd) and HD95 where the task scores them; None = left out (n/a)
    cols = [(f"NSD (%) @ {metrics.get('nsd_tolerance_mm')} mm", "nsd", 100.0),
            ("HD95 (mm)", "hd95", 1.0)]
    cols = [c for c in cols if metrics.get(f"per_class_{c[1]}") is not None]
    for title, _, _ in cols:
        t.add_column(title, justify="right")

    def num(v: float | None, scale: float = 100.0) -> str:
        return "n/a" if v is None or v != v else f"{scale * v:.2f}"

    for name, value in metrics["per_class"].items():
        t.add_row(name, num(value), *[num(metrics[f"per_class_{key}"].get(name), scale) for _, key, scale in cols])

    def mean_std(mean: float | None, std: float | None, scale: float = 100.0) -> str:
        return "[bold]n/a" if mean is None or mean != mean else f"[bold]{num(mean, scale)} ± {num(std or 0.0, scale)}"

    mean = mean_std(metrics.get("mean_dice"), metrics.get("std_dice"))
    extra = [mean_std(metrics.get(f"mean_{key}"), metrics.get(f"std_{key}"), scale) for _, key, scale in cols]
    t.add_row("[bold]mean (per case, then over cases)", mean, *extra)
    console.print(t)
