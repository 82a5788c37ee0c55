"""Segmentation metrics shared by every task: class / region masks, Dice, normalised surface Dice (NSD), HD95.

Everything here works on batched tensors ``[B, C, X, Y, Z]`` (no loop over cases): the training step turns
integer label maps into the model's target with :func:`targets`, and the evaluation scores a prediction with
:func:`case_scores` (:func:`dice_per_channel`, :func:`nsd_per_channel`, :func:`hd95_per_channel`).

Two kinds of target exist (a task recipe chooses by having a ``regions`` mapping or not):

* **classes** (softmax): one channel per class of ``task.classes``; the prediction is the arg-max.
* **regions** (sigmoid, multi-label): one channel per region, each the union of some classes, e.g. BraTS'
  tumour core TC = {NCR, ET}, whole tumour WT = {NCR, ED, ET}, enhancing tumour ET = {ET} (the BraTS
  challenge's evaluation regions; MONAI ``ConvertToMultiChannelBasedOnBratsClasses`` builds the same
  channels from the raw values 1/2/4); the prediction is ``sigmoid(logit) > 0.5`` per channel, and regions
  may overlap.

Empty sets (both kinds, every metric) follow the task's ``evaluate.empty`` rules, stated in metrics.json's
``scoring`` block (:func:`scoring`):

* **one side empty** (the structure is absent from the truth but predicted, or present but missed): Dice and
  NSD score ``empty.one`` (default 0, as nnU-Net, medpy and the BraTS evaluation score it), and it counts in
  the case mean: a 216-voxel false positive of a class absent from the truth, beside a perfect class, gives
  the case a mean of 0.5. HD95 is ``evaluate.hd95_empty`` mm (default NaN; BraTS: 373.13 mm).
* **both sides empty**: Dice and NSD score ``empty.both`` (default NaN; BraTS: 1); HD95 is 0 mm where
  ``empty.both`` is 1 (an empty structure correctly left empty), else NaN.

NaN means "left out": a NaN channel does not enter its case's mean, nor the per-channel mean over cases
(metrics.json writes it as null).

NSD is the surface-area weighted normalised surface Dice of Nikolov et al. (the DeepMind ``surface-distance``
reference used by the FLARE and AMOS leaderboards): MONAI ``compute_surface_dice(use_subvoxels=True)`` with
the voxel spacing. HD95 is MONAI ``compute_hausdorff_distance(percentile=95)``, the larger of the two directed
95th-percentile boundary distances, in mm at the voxel spacing.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Mapping, Sequence

import torch


def region_class_ids(task: Mapping[str, Any]) -> list[list[int]] | None:
    """The class indices of each region of ``task.regions`` ({name: [class names]}), or None without regions.

    Raises ValueError naming the region and the unknown class.
    """
    regions = task.get("regions")
    if not regions:
        return None
    classes = list(task["classes"])
    out = []
    for name, members in regions.items():
        ids = []
        for member in members:
            if member not in classes[1:]:
                raise ValueError(f"task '{task.get('name', '?')}': regions.{name}: '{member}' is not a foreground "
                                 f"class; expected one of {', '.join(classes[1:])}")
            ids.append(classes.index(member))
        out.append(ids)
    return out


def score_names(task: Mapping[str, Any]) -> list[str]:
    """The names of the scored channels: the regions in recipe order, else the foreground classes."""
    regions = task.get("regions")
    return list(regions) if regions else list(task["classes"][1:])


def labels_to_regions(label: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Multi-label region masks ``[B, R, ...]`` (float 0/1) from an integer label map ``[B, 1, ...]``.

    Channel r is 1 where the label is any class of ``regions[r]`` (BraTS regions: Baid et al. 2021, Sec. 2).
    One ``isin`` per region over the whole batch.
    """
    lab = label[:, 0].long()
    chans = [torch.isin(lab, torch.as_tensor(list(ids), device=lab.device, dtype=lab.dtype)) for ids in regions]
    return torch.stack(chans, dim=1).to(torch.float32)


def labels_to_onehot(label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """One-hot ``[B, n_classes, ...]`` (uint8) of an integer label map ``[B, 1, ...]``."""
    lab = label[:, 0].long().clamp(0, n_classes - 1)
    return torch.nn.functional.one_hot(lab, n_classes).movedim(-1, 1).to(torch.uint8)


def targets(label: torch.Tensor, task: Mapping[str, Any]) -> torch.Tensor:
    """The training target of a batch: region masks for a regions task, else the label map unchanged."""
    ids = region_class_ids(task)
    return labels_to_regions(label, ids) if ids is not None else label


def predict_masks(logits: torch.Tensor, task: Mapping[str, Any]) -> torch.Tensor:
    """Binary masks ``[B, K, ...]`` of the scored channels (foreground classes, or regions) from logits."""
    if task.get("regions"):
        return (logits.float() > 0).to(torch.uint8)        # sigmoid(x) > 0.5  <=>  x > 0
    pred = logits.float().argmax(1, keepdim=True)
    return labels_to_onehot(pred, logits.shape[1])[:, 1:]


def confusion_counts(pred: torch.Tensor, truth: torch.Tensor, n_classes: int) -> list[list[int]]:
    """Voxel counts ``C[t][p]``: voxels of true class ``t`` predicted as class ``p`` (integer label maps of one
    shape, classes ``0..n_classes-1``, background included). Row ``t`` sums to the voxels of class ``t``; the
    diagonal holds the true positives (Dice of class ``c`` = 2 C[c][c] / (row c + column c))."""
    t = truth.reshape(-1).long()
    p = pred.reshape(-1).long().to(t.device)
    counts = torch.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).tolist()


def summed_confusion(matrices: Sequence[Sequence[Sequence[int]]]) -> list[list[int]]:
    """The element-wise sum of per-case confusion counts (:func:`confusion_counts`)."""
    total = [list(map(int, row)) for row in matrices[0]]
    for m in matrices[1:]:
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                total[i][j] += int(v)
    return total


def confused_with(confusion: Mapping[str, Any], name: str) -> tuple[str, float] | None:
    """The class that received the largest share of class ``name``'s true voxels, when that is not ``name``
    itself: (that class, its share of the row), else None (``confusion``: metrics.json's ``confusion`` block)."""
    labels = list(confusion["labels"])
    if name not in labels:
        return None
    row = confusion["counts"][labels.index(name)]
    total = sum(row)
    if total == 0:
        return None
    j = max(range(len(row)), key=lambda k: row[k])
    return None if labels[j] == name else (labels[j], row[j] / total)


def truth_masks(label: torch.Tensor, task: Mapping[str, Any]) -> torch.Tensor:
    """Binary masks ``[B, K, ...]`` of the scored channels of an integer label map ``[B, 1, ...]``."""
    ids = region_class_ids(task)
    if ids is not None:
        return labels_to_regions(label, ids).to(torch.uint8)
    return labels_to_onehot(label, len(task["classes"]))[:, 1:]


#: NSD's method as recorded in metrics.json
NSD_METHOD = "surface-area (MONAI use_subvoxels)"
#: the defaults of evaluate.empty / evaluate.hd95_empty (sslbench.recipes.TASK_DEFAULTS holds the same values)
EMPTY_DEFAULTS = {"both": float("nan"), "one": 0.0}
HD95_EMPTY_DEFAULT = float("nan")


def empty_rules(evaluate: Mapping[str, Any]) -> dict[str, float]:
    """The empty-set scores of an ``evaluate`` section: Dice / NSD ``both`` and ``one``, HD95 ``hd95_both`` and
    ``hd95_one`` (defaults where a recorded recipe predates the keys)."""
    empty = {**EMPTY_DEFAULTS, **(evaluate.get("empty") or {})}
    both, one = float(empty["both"]), float(empty["one"])
    return {"both": both, "one": one, "hd95_both": 0.0 if both == 1.0 else float("nan"),
            "hd95_one": float(evaluate.get("hd95_empty", HD95_EMPTY_DEFAULT))}


def _apply_empty(score: torch.Tensor, pred: torch.Tensor, truth: torch.Tensor, both: float,
                 one: float) -> torch.Tensor:
    """``score`` ``[B, K]`` with the empty-set rules: ``both`` where a channel is empty in both masks, ``one``
    where it is empty in exactly one."""
    p = pred.flatten(2).bool().any(-1).cpu()
    t = truth.flatten(2).bool().any(-1).cpu()
    out = score.double().cpu().clone()
    out[~p & ~t] = both
    out[p ^ t] = one
    return out


def dice_per_channel(pred: torch.Tensor, truth: torch.Tensor, both: float = float("nan"),
                     one: float = 0.0) -> torch.Tensor:
    """Dice ``2|P ∩ T| / (|P| + |T|)`` per case and channel ``[B, K]`` (Dice 1945, Eq. 1), float64 on the CPU.

    ``pred`` and ``truth`` are binary ``[B, K, ...]`` masks of foreground channels only. A channel empty in
    both scores ``both`` (default NaN: left out), one empty in exactly one scores ``one`` (default 0).
    """
    p, t = pred.flatten(2).bool(), truth.flatten(2).bool()
    inter = (p & t).sum(-1).double()
    size = p.sum(-1).double() + t.sum(-1).double()
    dice = torch.where(size > 0, 2 * inter / size.clamp(min=1), torch.zeros_like(size))
    return _apply_empty(dice, pred, truth, both, one)


@contextlib.contextmanager
def _quiet_monai():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # MONAI 1.5+ warns about its own use of a deprecated argument
        warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan")   # empty: handled here
        yield


def _spacing(spacing: Sequence[float]) -> list[float]:
    return [float(s) for s in spacing]        # MONAI refuses a mix of ints and floats


def nsd_per_channel(pred: torch.Tensor, truth: torch.Tensor, tolerance_mm: float,
                    spacing: Sequence[float], both: float = float("nan"), one: float = 0.0) -> torch.Tensor:
    """Normalised surface Dice per case and channel ``[B, K]`` at a tolerance in millimetres, surface-area weighted.

    Nikolov et al. 2021 (arXiv:1809.04430), Eq. 1 as their reference code (DeepMind ``surface-distance``)
    computes it: ``(|S_P ∩ B_T(τ)| + |S_T ∩ B_P(τ)|) / (|S_P| + |S_T|)`` where ``|S|`` is surface *area*: each
    2x2x2 neighbourhood of the voxel grid is a surface element whose area is its marching-cubes patch at the
    voxel ``spacing`` (mm per voxel along each axis), and an element counts when its distance to the other
    surface's elements is at most ``tolerance_mm``. MONAI ``compute_surface_dice(use_subvoxels=True)``, on the
    CPU. Empty sets: ``both`` / ``one`` as :func:`dice_per_channel`.
    """
    from monai.metrics import compute_surface_dice

    if pred.shape[1] == 0:
        return torch.empty((pred.shape[0], 0), dtype=torch.float64)
    p, t = pred.bool().cpu(), truth.bool().cpu()
    with _quiet_monai():
        nsd = compute_surface_dice(p, t, class_thresholds=[float(tolerance_mm)] * p.shape[1], include_background=True,
                                   spacing=_spacing(spacing), use_subvoxels=True)
    return _apply_empty(nsd, p, t, both, one)


def hd95_per_channel(pred: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float],
                     both: float = float("nan"), one: float = float("nan")) -> torch.Tensor:
    """95th-percentile Hausdorff distance in mm per case and channel ``[B, K]`` (MONAI
    ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed 95th percentiles of boundary-voxel
    distances at the voxel ``spacing``), on the CPU. A channel empty in both scores ``both`` mm, one empty in
    exactly one ``one`` mm (defaults NaN: left out)."""
    from monai.metrics import compute_hausdorff_distance

    if pred.shape[1] == 0:
        return torch.empty((pred.shape[0], 0), dtype=torch.float64)
    p, t = pred.bool().cpu(), truth.bool().cpu()
    with _quiet_monai():
        hd = compute_hausdorff_distance(p, t, include_background=True, distance_metric="euclidean", percentile=95,
                                        spacing=_spacing(spacing))
    return _apply_empty(hd, p, t, both, one)


def _mean(values) -> float:
    finite = [float(v) for v in values if v == v]     # NaN != NaN: left out
    return sum(finite) / len(finite) if finite else float("nan")


def case_scores(pred: torch.Tensor, truth: torch.Tensor, task: Mapping[str, Any]) -> dict[str, float]:
    """The scores of one case (``pred`` / ``truth`` ``[1, K, ...]`` binary masks of :func:`score_names`).

    Dice per channel (``<name>``) and its mean over the channels that are not NaN (``mean``); where
    ``evaluate.metrics`` lists them, NSD at ``evaluate.nsd_tolerance`` mm (``nsd:<name>``, ``nsd:mean``) and HD95
    in mm (``hd95:<name>``, ``hd95:mean``), at the voxel spacing ``preprocess.spacing`` (the grid the masks live
    on). Empty sets follow :func:`empty_rules`.
    """
    ev = task["evaluate"]
    names = score_names(task)
    rules = empty_rules(ev)
    metrics = ev.get("metrics") or ["dice"]
    spacing = task["preprocess"]["spacing"]
    row: dict[str, float] = {}
    columns = [("", dice_per_channel(pred, truth, rules["both"], rules["one"]))]
    if "nsd" in metrics:
        columns.append(("nsd:", nsd_per_channel(pred, truth, float(ev["nsd_tolerance"]), spacing,
                                                rules["both"], rules["one"])))
    if "hd95" in metrics:
        columns.append(("hd95:", hd95_per_channel(pred, truth, spacing, rules["hd95_both"], rules["hd95_one"])))
    for prefix, values in columns:
        vals = [float(v) for v in values[0]]
        row.update({f"{prefix}{name}": v for name, v in zip(names, vals)})
        row[f"{prefix}mean"] = _mean(vals)
    return row


def _number(v: float) -> float | str:
    return "nan" if v != v else float(v)


def scoring(task: Mapping[str, Any]) -> dict[str, Any]:
    """The conventions a segmentation run was scored with (metrics.json's ``scoring`` block); ``"nan"`` = left
    out of the means."""
    ev = task["evaluate"]
    rules = empty_rules(ev)
    metrics = list(ev.get("metrics") or ["dice"])
    out: dict[str, Any] = {
        "dice": {"both_empty": _number(rules["both"]), "one_empty": _number(rules["one"])},
        "case_mean": "mean over the scored channels that are not nan; then the mean over cases",
        "spacing_mm": [float(s) for s in task["preprocess"]["spacing"]],
    }
    if "nsd" in metrics:
        out["nsd"] = {"tolerance_mm": float(ev["nsd_tolerance"]), "method": NSD_METHOD,
                      "both_empty": _number(rules["both"]), "one_empty": _number(rules["one"])}
    if "hd95" in metrics:
        out["hd95"] = {"percentile": 95, "directed": False, "units": "mm",
                       "method": "MONAI compute_hausdorff_distance (boundary voxels, euclidean)",
                       "both_empty": _number(rules["hd95_both"]), "one_empty": _number(rules["hd95_one"])}
    return out
