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

from sslbench.data.check import LoadChecked
from sslbench.data.layouts.ct import DicomSeriesReader, SimpleITKReader


def preprocess_transforms(task: Mapping[str, Any], with_label: bool = True) -> mt.Compose:
    """Load (and check) -> channel first -> label map -> orientation -> spacing -> intensity window -> crop.

    Loading is :class:`sslbench.data.check.LoadChecked`: a file that cannot be loaded, an image with NaN or
    infinite voxels, or a label value that is not a class of the task raises one line naming the file.

    Multi-channel images load as channels: a channel-last 4-D NIfTI (MSD Task01 / Task05) becomes channel
    first, and a list of 3-D files (BraTS' four modalities) is stacked in list order. With
    ``preprocess.normalize: zscore`` (MRI) the window is replaced by a per-channel z-score over non-zero
    voxels, after the foreground crop.
    """
    pre = task["preprocess"]
    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    # LoadImaged + voxel checks (NaN image, label values outside the task's classes: one line naming the file);
    # LUNA16 .mhd/.raw (claims only .mhd/.mha) and validated DICOM series (folders, <folder>#series=<uid>)
    load = LoadChecked(task, keys, readers=(SimpleITKReader(), DicomSeriesReader()))
    steps: list = [load, mt.EnsureChannelFirstd(keys=keys)]
    if with_label:
        steps.append(mt.Lambdad(keys="label", func=round_labels))
    label_map = (task.get("data") or {}).get("label_map")
    if with_label and label_map:
        orig = [float(k) for k in label_map]
        target = [float(v) for v in label_map.values()]
        steps.append(mt.MapLabelValued(keys="label", orig_labels=orig, target_labels=target))
    steps += [
        mt.Orientationd(keys=keys, axcodes=pre["orientation"], labels=None),
        mt.Spacingd(keys=keys, pixdim=tuple(pre["spacing"]), mode=modes),
    ]
    if pre.get("normalize", "window") == "zscore":
        # MRI (SwinUNETR's BraTS / MSD MRI recipes): crop to the non-zero head or body first (raw intensities
        # are >= 0 there; z-scored ones are not), then z-score each channel over its non-zero voxels.
        if pre.get("crop_foreground", True):
            steps.append(mt.CropForegroundd(keys=keys, source_key="image", allow_smaller=True))
        steps.append(mt.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    else:
        steps.append(mt.ScaleIntensityRanged(keys="image", a_min=pre["a_min"], a_max=pre["a_max"],
                                             b_min=pre["b_min"], b_max=pre["b_max"], clip=pre["clip"]))
        if pre.get("crop_foreground", True):
            steps.append(mt.CropForegroundd(keys=keys, source_key="image", allow_smaller=True))
    steps.append(mt.EnsureTyped(keys=keys, track_meta=False))
    return mt.Compose(steps)


def round_labels(label):
    """Float label files store class values like 1.9999999: round before anything compares or casts them."""
    return label.round()


def rotation_plane(roi: tuple, crops_per_step: int) -> tuple[int, int] | None:
    """The plane of the 90-degree rotations: (0, 1), MONAI's default and the BTCV recipe's (96^3 crops), whenever a
    rotated crop keeps its shape or is the only crop of its step. Crops of one step are stacked, so when the ROI's
    first two sizes differ and a step has several crops, the first plane of two equal sizes is used instead
    (e.g. (1, 2) for 64 x 32 x 32), or none (no rotation) when all sizes differ: a rotation there would give crops
    of two shapes that cannot be stacked."""
    if roi[0] == roi[1] or crops_per_step <= 1:
        return (0, 1)
    return next(((a, b) for a in range(len(roi)) for b in range(a + 1, len(roi)) if roi[a] == roi[b]), None)


def train_augmentation(task: Mapping[str, Any]) -> mt.Compose:
    """Random crops of the ROI (balanced on labels) with flips, 90-degree rotations and intensity shift."""
    ft = task["finetune"]
    roi = tuple(ft["roi"])
    plane = rotation_plane(roi, int(ft.get("num_samples", 1)) * int(ft.get("batch_size", 1)))
    rotate = [] if plane is None else [mt.RandRotate90d(keys=["image", "label"], prob=0.1, max_k=3,
                                                        spatial_axes=plane)]
    return mt.Compose([
        mt.SpatialPadd(keys=["image", "label"], spatial_size=roi),
        mt.RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=roi,
                                  pos=ft["pos"], neg=ft["neg"], num_samples=ft["num_samples"],
                                  image_key="image", image_threshold=0, allow_smaller=False),
        mt.RandFlipd(keys=["image", "label"], prob=0.1, spatial_axis=0),
        mt.RandFlipd(keys=["image", "label"], prob=0.1, spatial_axis=1),
        mt.RandFlipd(keys=["image", "label"], prob=0.1, spatial_axis=2),
        *rotate,
        mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ])


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 32-bit seed that depends only on (run seed, step, salt): the basis of exact resume."""
    return int(np.random.SeedSequence([int(seed), int(step), int(salt)]).generate_state(1)[0])
