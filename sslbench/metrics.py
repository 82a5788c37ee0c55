"""Segmentation metrics shared by every task: class / region masks, Dice and normalised surface Dice (NSD).

Everything here works on batched tensors ``[B, C, X, Y, Z]`` (no loop over cases): the training step turns
integer label maps into the model's target with :func:`targets`, and the evaluation scores a prediction with
:func:`dice_per_channel` and :func:`nsd_per_channel` (MONAI ``compute_dice`` / ``compute_surface_dice``).

Two kinds of target exist (a task recipe chooses by having a ``regions`` mapping or not):

* **classes** (softmax): one channel per class of ``task.classes``; the prediction is the arg-max.
* **regions** (sigmoid, multi-label): one channel per region, each the union of some classes, e.g. BraTS'
  tumour core TC = {NCR, ET}, whole tumour WT = {NCR, ED, ET}, enhancing tumour ET = {ET} (the BraTS
  challenge's evaluation regions; MONAI ``ConvertToMultiChannelBasedOnBratsClasses`` builds the same
  channels from the raw values 1/2/4); the prediction is ``sigmoid(logit) > 0.5`` per channel, and regions
  may overlap.

Empty-set convention (both kinds, both metrics): a channel absent from both the prediction and the truth
of a case scores NaN and is left out of that case's mean (nnU-Net / MONAI ``ignore_empty``); absent from the
truth only, or from the prediction only, it scores 0.
"""
from __future__ import annotations

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


def truth_masks(label: torch.Tensor, task: Mapping[str, Any]) -> torch.Tensor:
    """Binary masks ``[B, K, ...]`` of the scored channels of an integer label map ``[B, 1, ...]``."""
    ids = region_class_ids(task)
    if ids is not None:
        return labels_to_regions(label, ids).to(torch.uint8)
    return labels_to_onehot(label, len(task["classes"]))[:, 1:]


def dice_per_channel(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Dice ``2|P ∩ T| / (|P| + |T|)`` per case and channel ``[B, K]`` (Dice 1945, Eq. 1; MONAI compute_dice).

    ``pred`` and ``truth`` are binary ``[B, K, ...]`` masks of foreground channels only; NaN where a channel
    is empty in both.
    """
    from monai.metrics import compute_dice

    return compute_dice(pred, truth, include_background=True, ignore_empty=True).float()


def nsd_per_channel(pred: torch.Tensor, truth: torch.Tensor, tolerance_mm: float,
                    spacing: Sequence[float]) -> torch.Tensor:
    """Normalised surface Dice per case and channel ``[B, K]`` at a tolerance in millimetres.

    Nikolov et al. 2021 (arXiv:1809.04430), Eq. 1: the fraction of both boundaries lying within
    ``tolerance_mm`` of the other boundary, ``(|S_P ∩ B_T(τ)| + |S_T ∩ B_P(τ)|) / (|S_P| + |S_T|)``, computed by
    MONAI ``compute_surface_dice`` on boundary voxels with Euclidean distances scaled by ``spacing`` (mm per
    voxel along each axis, i.e. the spacing of the grid the masks live on). NaN where a channel is empty in
    both; 0 where it is empty in one only.
    """
    from monai.metrics import compute_surface_dice

    if pred.shape[1] == 0:
        return torch.empty((pred.shape[0], 0))
    k = pred.shape[1]
    with warnings.catch_warnings():   # MONAI 1.5+ warns about its own use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan")  # empty: see above
        return compute_surface_dice(pred.bool(), truth.bool(), class_thresholds=[float(tolerance_mm)] * k,
                                    include_background=True, spacing=[float(s) for s in spacing]).float().cpu()
