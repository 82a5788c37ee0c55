"""MONAI dictionary transforms built from a task recipe's ``preprocess`` and ``finetune`` sections.

Deterministic pre-processing (seed supplement, Table 2: orientation, spacing 1.5 mm, intensity window
[a_min, a_max] -> [b_min, b_max], foreground crop) is cached once per case; the random fine-tuning
augmentation (positive/negative-balanced crops, random flips and 90-degree rotations, intensity shift,
as in the SwinUNETR / VoCo fine-tuning recipes) is applied per step with a seed derived from
(run seed, step), so that a resumed run draws exactly the crops an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from monai import transforms as mt


def preprocess_transforms(task: Mapping[str, Any], with_label: bool = True) -> mt.Compose:
    """Load -> channel first -> label map -> orientation -> spacing -> intensity window -> foreground crop."""
    pre = task["preprocess"]
    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    steps: list = [
        mt.LoadImaged(keys=keys, image_only=False),
        mt.EnsureChannelFirstd(keys=keys),
    ]
    label_map = (task.get("data") or {}).get("label_map")
    if with_label and label_map:
        orig = [float(k) for k in label_map]
        target = [float(v) for v in label_map.values()]
        steps.append(mt.MapLabelValued(keys="label", orig_labels=orig, target_labels=target))
    steps += [
        mt.Orientationd(keys=keys, axcodes=pre["orientation"], labels=None),
        mt.Spacingd(keys=keys, pixdim=tuple(pre["spacing"]), mode=modes),
        mt.ScaleIntensityRanged(keys="image", a_min=pre["a_min"], a_max=pre["a_max"], b_min=pre["b_min"],
                                b_max=pre["b_max"], clip=pre["clip"]),
    ]
    if pre.get("crop_foreground", True):
        steps.append(mt.CropForegroundd(keys=keys, source_key="image", allow_smaller=True))
    steps.append(mt.EnsureTyped(keys=keys, track_meta=False))
    return mt.Compose(steps)


def train_augmentation(task: Mapping[str, Any]) -> mt.Compose:
    """Random crops of the ROI (balanced on labels) with flips, 90-degree rotations and intensity shift."""
    ft = task["finetune"]
    roi = tuple(ft["roi"])
    return mt.Compose([
        mt.SpatialPadd(keys=["image", "label"], spatial_size=roi),
        mt.RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=roi,
                                  pos=ft["pos"], neg=ft["neg"], num_samples=ft["num_samples"],
                                  image_key="image", image_threshold=0, allow_smaller=False),
        mt.RandFlipd(keys=["image", "label"], prob=0.1, spatial_axis=0),
        mt.RandFlipd(keys=["image", "label"], prob=0.1, spatial_axis=1),
        mt.RandFlipd(keys=["image", "label"], prob=0.1, spatial_axis=2),
        mt.RandRotate90d(keys=["image", "label"], prob=0.1, max_k=3),
        mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ])


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 32-bit seed that depends only on (run seed, step, salt): the basis of exact resume."""
    return int(np.random.SeedSequence([int(seed), int(step), int(salt)]).generate_state(1)[0])
