"""The classification task kinds: CC-CCII (3D) and NIH ChestX-ray14 (2D, multi-label).

The protocol's one fine-tuning flow (:func:`sslbench.protocol.finetuning.finetune`) runs them as it runs
segmentation: one run folder per (task, method, protocol hash, seed), atomic records, ``--resume`` from the last
checkpoint with every random draw of step ``s`` seeded by (run seed, s), best checkpoint chosen on the validation
split, phantom results flagged. This module supplies what is the kind's own:

* Model: the pre-trained backbone's Swin encoder (MONAI SwinUNETR's ``swinViT``, the part every method's
  checkpoint transfers, loaded by the shared key rules of :mod:`sslbench.models.backbones`) -> global average
  pool of its last stage -> ``Linear``. 3D for CC-CCII, ``spatial_dims=2`` for ChestX-ray14 with
  ``model.name=swinunetr``; ChestX-ray14's default is the 2D track's ``model.name=unet2d``: the ResNet-18 encoder
  of PCRL's U-Net (:mod:`sslbench.models.unet2d`) -> pool -> ``Linear``, loaded from a 2D pre-training's ``encoder.*``.
* Losses: cross-entropy over the 3 CC-CCII classes; binary cross-entropy per finding for ChestX-ray14.
* Augmentation (VoCo's CC-CCII code): random flips, a random shift of the crop, brightness and contrast,
  drawn per sample as tensors and applied to the whole batch at once on the device (one ``grid_sample``).
* Metrics: accuracy (the VoCo paper's CC-CCII metric) and one-vs-rest AUC per class with their macro mean
  (scikit-learn ``roc_auc_score``); per-finding AUC and their mean for ChestX-ray14 (Wang et al. 2017, the
  VoCo supplement's Table 4 metric).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..models.backbones import build_model, load_backbone, LoadReport, read_checkpoint
from ..data.loaded import labeled_subset
from ..data.prefetch import upload
from ..errors import CheckpointError, DataError, RecipeError
from ..store.records import RunRecord
from .base import autocast, Steps, TaskKind, Validation, write_finetune_record


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
class EncoderClassifier(nn.Module):
    """Swin encoder -> global average pool of the last stage -> linear head (logits)."""

    def __init__(self, swin: nn.Module, width: int, n_outputs: int):
        super().__init__()
        self.swinViT = swin          # the name SwinUNETR gives it, so that backbone keys match
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self.swinViT(x, normalize=True)[-1]
        return self.head(last.flatten(2).mean(-1))


def build_classifier(model_cfg: Mapping[str, Any], n_outputs: int, spatial_dims: int) -> nn.Module:
    """SwinUNETR's ``swinViT`` (3D from the shared builder, or the same configuration in 2D) with a head; in 2D
    with ``model.name: unet2d`` the ResNet-18 encoder of PCRL's U-Net with a head (sslbench/unet2d.py)."""
    if spatial_dims == 2 and str(model_cfg.get("name")) == "unet2d":   # the 2D track: PCRL's ResNet-18 U-Net
        from ..models.unet2d import UNet2DClassifier

        return UNet2DClassifier(model_cfg, n_outputs)
    if str(model_cfg.get("name", "swinunetr")) != "swinunetr":
        raise RecipeError(f"model.name: classification tasks use the SwinUNETR encoder (swinunetr"
                          f"{', or unet2d in 2D' if spatial_dims == 2 else ''}), got {model_cfg.get('name')!r}")
    if spatial_dims == 3:
        net = build_model(model_cfg, in_channels=1, out_channels=1)
    else:
        from monai.networks.nets import SwinUNETR

        net = SwinUNETR(in_channels=1, out_channels=1, spatial_dims=2, feature_size=int(model_cfg["feature_size"]),
                        use_v2=bool(model_cfg.get("use_v2", True)),
                        use_checkpoint=bool(model_cfg.get("use_checkpoint", False)),
                        drop_rate=float(model_cfg.get("drop_rate", 0.0)),
                        attn_drop_rate=float(model_cfg.get("attn_drop_rate", 0.0)),
                        dropout_path_rate=float(model_cfg.get("dropout_path_rate", 0.0)))
    return EncoderClassifier(net.swinViT, 16 * int(model_cfg["feature_size"]), n_outputs)


# --------------------------------------------------------------------------------------------------
# Augmentation: per-sample draws as tensors, applied to the batch at once
# --------------------------------------------------------------------------------------------------
def draw_augmentation(n: int, spatial_dims: int, ft: Mapping[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-sample parameters: flip signs [n, dims], shifts (fraction of the size) [n, dims], brightness, contrast."""
    signs = torch.ones(n, spatial_dims)
    coin = torch.rand(n, spatial_dims, generator=gen)
    for axis in ft.get("flip_axes") or ():
        signs[:, axis] = torch.where(coin[:, axis] < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, spatial_dims, generator=gen) * 2 - 1) * float(ft.get("shift") or 0.0)
    bright = (torch.rand(n, generator=gen) * 2 - 1) * float(ft.get("brightness") or 0.0)
    contrast = 1 + (torch.rand(n, generator=gen) * 2 - 1) * float(ft.get("contrast") or 0.0)
    return {"signs": signs, "shift": shift, "brightness": bright, "contrast": contrast}


def apply_augmentation(x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Flip + shift as one batched affine resampling, then ``(x + brightness) * contrast`` clipped to [0, 1].

    ``x``: [B, 1, *spatial] in [0, 1]. Spatial axis ``a`` is grid coordinate ``dims - 1 - a`` of
    ``affine_grid`` (which orders coordinates x = last axis first). A shift of fraction ``f`` of the size is
    ``2 f`` in normalised coordinates; pixels shifted in from outside repeat the border.
    """
    n, dims = x.shape[0], x.dim() - 2
    signs, shift = params["signs"].to(x), params["shift"].to(x)
    theta = torch.zeros(n, dims, dims + 1, dtype=x.dtype, device=x.device)
    for a in range(dims):
        c = dims - 1 - a
        theta[:, c, c] = signs[:, a]
        theta[:, c, dims] = 2 * shift[:, a]
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    view = (n,) + (1,) * (dims + 1)
    x = (x + params["brightness"].to(x).view(view)) * params["contrast"].to(x).view(view)
    return x.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Metrics (pure functions on arrays)
# --------------------------------------------------------------------------------------------------
def accuracy(probs: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of cases whose arg-max class is the true class (None without cases)."""
    return float(np.mean(np.argmax(probs, axis=1) == truth)) if len(truth) else None


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC (scikit-learn ``roc_auc_score``); None where only one class occurs (AUC undefined)."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive).astype(bool)
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores))


def per_class_auc(probs: np.ndarray, truth: np.ndarray, names: Sequence[str], multilabel: bool) -> dict[str, float | None]:
    """One-vs-rest AUC of each class (multi-class: truth [N] indices) or each label (multi-label: truth [N, K])."""
    out = {}
    for k, name in enumerate(names):
        pos = truth[:, k] if multilabel else (truth == k)
        out[name] = binary_auc(probs[:, k], pos)
    return out


def mean_defined(values: Mapping[str, float | None]) -> float | None:
    """Mean over the defined values (macro average); None when none is defined."""
    vals = [v for v in values.values() if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(probs: np.ndarray, truth: np.ndarray, task: Mapping[str, Any]) -> dict[str, Any]:
    """metrics.json summary: ``metric``, ``mean_<metric>``, ``per_class`` AUCs, counts.

    Multi-label where ``truth`` is [N, K] (one 0/1 column per finding), multi-class where it is [N] (indices). CC-CCII: metric ``accuracy`` (``mean_accuracy``), with ``mean_auc`` the macro one-vs-rest AUC over the
    classes present in the truth and a confusion matrix. ChestX-ray14: metric ``auc`` (``mean_auc``, the
    mean over findings with both outcomes present). ``per_class`` holds the AUC of each class / finding.
    """
    names = list(task["classes"])
    multilabel = truth.ndim == 2
    aucs = per_class_auc(probs, truth, names, multilabel)
    out: dict[str, Any] = {"metric": "auc" if multilabel else "accuracy", "mean_auc": mean_defined(aucs),
                           "per_class": aucs, "n_cases": int(len(truth))}
    if multilabel:
        out["auc_defined_for"] = int(sum(v is not None for v in aucs.values()))
        out["positives"] = {n: int(truth[:, k].sum()) for k, n in enumerate(names)}
    else:
        out["mean_accuracy"] = accuracy(probs, truth)
        pred = np.argmax(probs, axis=1)
        out["confusion"] = [[int(np.sum((truth == i) & (pred == j))) for j in range(len(names))]
                            for i in range(len(names))]
    return out


def score_of(summary: Mapping[str, Any]) -> float:
    """The validation score that selects the best checkpoint: the task's headline metric."""
    v = summary[f"mean_{summary['metric']}"]
    return -math.inf if v is None else float(v)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, task: Mapping[str, Any], device: torch.device,
            bf16: bool, multilabel: bool) -> np.ndarray:
    """Class probabilities [N, K] (softmax) or, ``multilabel``, finding probabilities (sigmoid), in batches."""
    model.eval()
    bs = int(task["evaluate"].get("batch_size", 4))
    out = []
    for i in range(0, images.shape[0], bs):
        x = images[i:i + bs].to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
        with autocast(bf16, device):
            logits = model(x).float()
        out.append(torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1))
    model.train()
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, len(task["classes"])))


def case_rows(items: list[dict], probs: np.ndarray, task: Mapping[str, Any], multilabel: bool) -> list[dict]:
    """cases.csv rows: id, patient, truth, prediction and every class probability."""
    names = list(task["classes"])
    rows = []
    for it, p in zip(items, probs):
        row: dict[str, Any] = {"case": it["id"], "patient": it.get("patient")}
        if multilabel:
            row.update({f"truth:{n}": int(v) for n, v in zip(names, it["label"])})
        else:
            row["truth"] = names[int(it["label"])]
            row["pred"] = names[int(np.argmax(p))]
        row.update({f"p:{n}": float(v) for n, v in zip(names, p)})
        rows.append(row)
    return rows


def truth_array(items: list[dict], task: Mapping[str, Any], multilabel: bool) -> np.ndarray:
    """The labels as [N] class indices, or ``multilabel`` as [N, K] 0/1 findings."""
    if multilabel:
        return np.asarray([it["label"] for it in items], dtype=np.int64).reshape(len(items), len(task["classes"]))
    return np.asarray([int(it["label"]) for it in items], dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------
def _load_init(model: nn.Module, init: Mapping[str, Any] | None,
               refuse: Callable[[Mapping[str, torch.Tensor], str], None] | None = None) -> LoadReport | None:
    """The encoder of ``model`` loaded from ``init``'s backbone (``refuse(state, path)`` first, where given)."""
    if not init or not init.get("path"):
        return None
    state = read_checkpoint(init["path"])
    if refuse is not None:
        refuse(state, str(init["path"]))
    family = "unet2d" if hasattr(model, "encoder") and not hasattr(model, "swinViT") else "swinunetr"
    return load_backbone(model, state, str(init["path"]), include_decoder=False, model_name=family)


class Classification(TaskKind):
    """The 3D classification kind (``classification``: CC-CCII, one class per scan): the pre-trained encoder + a
    linear head (see the module docstring). Under torchrun every rank draws its own batch, DDP averages gradients
    and every rank scores the whole validation split (cheap for classification)."""

    metric = "accuracy"
    initial_best = -math.inf
    losses = {"ce": "cross-entropy over the classes"}
    #: the batch is gathered from the images held in memory (on the GPU there): its wait is that gather
    measures_data_wait = True
    #: spatial dimensions of the images
    dims = 3
    #: one 0/1 label per finding (sigmoid outputs, AUC per finding), not one class per case (softmax)
    multilabel = False
    #: the loss module of each ``finetune.loss`` value in :attr:`losses`
    loss_modules: Mapping[str, Callable[[], nn.Module]] = {"ce": nn.CrossEntropyLoss}

    @classmethod
    def check_cases(cls, run_cfg: Mapping[str, Any], task: Mapping[str, Any], items: list[dict], force: bool) -> None:
        """PNG/JPG slices and radiographs (sslbench/data/classification_check.py): headers, end markers, slice
        sizes, labels; every pixel decoded with ``force``."""
        from ..data.classification_check import check_cases

        check_cases(task, items, decode=force)

    @classmethod
    def step_input(cls, task: Mapping[str, Any]) -> tuple[int, str]:
        """The encoder on whole inputs resized to ``preprocess.size`` (2D: pixels), ``finetune.batch_size`` a step."""
        size = (task.get("preprocess") or {}).get("size") or 96
        each = int(size) ** 3 if isinstance(size, (int, float)) else int(math.prod(int(x) for x in size))
        return int((task.get("finetune") or {}).get("batch_size", 1)) * each, "encoder"

    @classmethod
    def print_results(cls, metrics: Mapping[str, Any], console) -> None:
        print_results(metrics, console)

    def make_loss(self) -> nn.Module:
        """The loss ``finetune.loss`` names (:attr:`loss_modules`)."""
        return self.loss_modules[self.loss_name(self.task)]()

    def load(self, root: Path, progress) -> None:
        from ..data import classification as data_mod
        from ..data import layouts

        task, device = self.task, self.rt.device
        self.datalist = dl = layouts.load_datalist(task, root)
        for name in ("train", "val"):
            if not dl.splits.get(name):
                raise DataError(f"{dl.source}: the '{name}' split ({dl.origin.get(name, '?')}) is empty; expected cases")
        clash = layouts.overlaps(dl.splits)
        if clash:
            raise DataError(clash[0])
        self.train_items = labeled_subset(dl.splits["train"], self.ft.get("labeled_cases"))
        self.val_items = dl.splits["val"]
        self.train_x = torch.from_numpy(data_mod.load_split(task, self.train_items, progress, "load train"))
        self.val_x = torch.from_numpy(data_mod.load_split(task, self.val_items, progress, "load val"))
        if device.type == "cuda":   # uint8 on the device: batches are gathered and augmented there
            self.train_x = self.train_x.to(device)
        dtype = torch.float32 if self.multilabel else torch.long
        self.train_y = torch.as_tensor(truth_array(self.train_items, task, self.multilabel), dtype=dtype).to(device)
        self.val_truth = truth_array(self.val_items, task, self.multilabel)

    def build_model(self) -> nn.Module:
        return build_classifier(self.cfg["model"], len(self.task["classes"]), self.dims)

    def load_init(self, model: nn.Module, init: Mapping[str, Any] | None) -> LoadReport | None:
        return _load_init(model, init, lambda state, source: self.refuse_init(self.task, state, source))

    def on_new_record(self, record) -> None:
        splits = self.datalist.splits
        unused = [it for it in splits["train"] if it not in self.train_items]   # left out by finetune.labeled_cases
        if self.rt.dist.is_main:
            _write_split(record, {**splits, "train": self.train_items, **({"train-unused": unused} if unused else {})})

    def steps(self, model: nn.Module, start: int, total: int) -> Steps:
        from ..data.transforms import step_seed

        rt, task, ft, metric = self.rt, self.task, self.ft, self.metric
        seed, rank, device = int(self.cfg["run"]["seed"]), rt.dist.rank, rt.device
        train_model = rt.train_module(model)
        loss_fn = self.make_loss()

        def batch(step: int):
            stream = [seed, step] if rank == 0 else [seed, step, rank]   # rank 0 = one process
            picks = np.random.default_rng(stream).integers(0, len(self.train_items), size=ft["batch_size"])
            # uploaded without waiting for the last step's GPU work (data/prefetch.py upload)
            idx = upload(torch.as_tensor(picks, dtype=torch.long), self.train_x.device)
            gen = torch.Generator().manual_seed(step_seed(seed, step, 2 + 1000 * rank))
            params = {k: upload(v, device) for k, v in draw_augmentation(len(picks), self.dims, ft, gen).items()}
            x = self.train_x.index_select(0, idx).to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
            return apply_augmentation(x, params), self.train_y.index_select(0, idx.to(device))

        def loss(xy, step: int):
            with rt.autocast():
                logits = train_model(xy[0])
            return loss_fn(logits.float(), xy[1]), {}

        def validate(done: int) -> Validation:
            summary = summarize(predict(model, self.val_x, task, device, rt.bf16, self.multilabel), self.val_truth, task)
            value, score = summary[f"mean_{metric}"], score_of(summary)
            return Validation(score, math.nan if value is None else float(value),
                              {"step": done, f"val_{metric}": value}, f"validation {metric} {_fmt(value)}",
                              {f"val/{metric}": value}, {f"val_{metric}": score})

        return Steps(batch, loss, validate)

    def load_validation(self, root: Path, progress) -> None:
        from ..data import classification as data_mod
        from ..data import layouts

        self.val_items = layouts.read_datalist(self.task, root)["val"]
        self.val_x = torch.from_numpy(data_mod.load_split(self.task, self.val_items, progress, "load val"))
        self.val_truth = truth_array(self.val_items, self.task, self.multilabel)

    def evaluate(self, model: nn.Module, progress) -> np.ndarray:
        return predict(model, self.val_x, self.task, self.rt.device, self.rt.bf16, self.multilabel)

    def evaluation(self, result: np.ndarray) -> dict:
        return {**summarize(result, self.val_truth, self.task),
                "cases": case_rows(self.val_items, result, self.task, self.multilabel)}

    def record_fields(self) -> dict:
        origin = self.datalist.origin
        return {"split": {k: {"cases": len(v), "from": origin.get(k, "")} for k, v in self.datalist.splits.items()}}

    def write_results(self, record, result: np.ndarray, protocol: str, phantom: bool, root: Path,
                      extra: Mapping) -> None:
        write_results(record, self.cfg, case_rows(self.val_items, result, self.task, self.multilabel),
                      summarize(result, self.val_truth, self.task), protocol=protocol, phantom=phantom, root=root,
                      extra=extra)


class Classification2D(Classification):
    """The 2D classification kind (``classification2d``: NIH ChestX-ray14): radiographs with one 0/1 label per
    finding (sigmoid outputs, binary cross-entropy per finding, AUC per finding), the 2D track's own images to
    pre-train on (sslbench/protocol/track2d.py); a 3D backbone cannot initialise its 2D encoder."""

    metric = "auc"
    losses = {"bce": "binary cross-entropy per finding (multi-label)"}
    loss_modules = {"bce": nn.BCEWithLogitsLoss}
    two_d = True
    dims = 2
    multilabel = True

    @classmethod
    def refuse_init(cls, task: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None, source: str) -> None:
        """A 3D checkpoint (5-D patch embedding), or a pre-training not run in 2D (``state`` None), cannot
        initialise the 2D encoder."""
        if state is None or any(v.dim() == 5 for v in state.values()):
            raise CheckpointError(f"{source}: a 3D pre-trained backbone cannot initialise the 2D encoder of task "
                                  f"'{task['name']}' (pre-train it in 2D: sslbench run --method M --task "
                                  f"{task['name']}); or fine-tune it with --method scratch")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _write_split(record: RunRecord, splits: Mapping[str, list[dict]]) -> None:
    """split.csv: every case id with its patient and split (the record of a deterministic split)."""
    import pandas as pd

    rows = [{"case": it["id"], "patient": it.get("patient"), "split": name}
            for name, items in splits.items() for it in items]
    tmp = record.path / ".split.csv.tmp"
    pd.DataFrame(rows).to_csv(tmp, index=False)
    tmp.replace(record.path / "split.csv")


def write_results(record: RunRecord, cfg: Mapping[str, Any], rows: list[dict], summary: Mapping[str, Any],
                  protocol: str, phantom: bool, root: Path, extra: Mapping[str, Any]) -> None:
    """metrics.json (summary + per-case rows) and cases.csv, atomically; the status becomes finished."""
    write_finetune_record(record, cfg, rows, {"task_kind": cfg["task"]["kind"], **summary}, protocol, phantom,
                          root, extra)
    head = summary["metric"]
    record.log(f"finished: {head} {_fmt(summary[f'mean_{head}'])} over {summary['n_cases']} cases"
               f"{' (PHANTOM data)' if phantom else ''}")


def print_results(metrics: Mapping[str, Any], console) -> None:
    """The terminal table of a classification run: headline metric, macro / mean AUC, per-class AUC."""
    from rich.table import Table

    phantom = " [PHANTOM data, not the real dataset]" if metrics.get("phantom") else ""
    head = metrics["metric"]
    t = Table(title=f"{metrics.get('method', '?')} on {metrics.get('task_title', '?')}{phantom}: validation split, "
                    f"{metrics['n_cases']} cases, checkpoint {metrics.get('checkpoint', '?')}")
    t.add_column("class" if head == "accuracy" else "finding")
    t.add_column("AUC (one-vs-rest)" if head == "accuracy" else "AUC", justify="right")
    for name, value in metrics["per_class"].items():
        t.add_row(name, "n/a" if value is None else f"{100 * value:.2f}")
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    t.add_row("[bold]macro AUC" if head == "accuracy" else "[bold]mean AUC", f"[bold]{fmt(metrics.get('mean_auc'))}")
    if head == "accuracy":
        t.add_row("[bold]accuracy", f"[bold]{fmt(metrics.get('mean_accuracy'))}")
    console.print(t)
