"""MM-WHS (multi-modality whole heart, CT): ``ct_train_1001_image.nii.gz`` + ``ct_train_1001_label.nii.gz``,
at the root or in ``ct_train/``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from sslbench.data.layouts.base import Datalist, Reader, _carve_val, _item, _list_images, _resolve, case_id


_MMWHS_RX = r"ct_train_\d+_image\.nii(\.gz)?"


def _locate_mmwhs(task: Mapping[str, Any], root: Path) -> Path | None:
    for base in (root, root / "ct_train"):
        if base.is_dir() and _list_images(base, _MMWHS_RX):
            return base
    return None


def _read_mmwhs(task: Mapping[str, Any], root: Path, base: Path) -> Datalist:
    items = []
    for f in _list_images(base, _MMWHS_RX):
        label = f.with_name(f.name.replace("_image.nii", "_label.nii"))
        items.append(_item(case_id(f), _resolve(base, str(f)), _resolve(base, str(label))))
    items.sort(key=lambda it: int(re.sub(r"\D", "", it["id"]) or 0))
    train, val, how = _carve_val(task, items, "the ct_train_*_image files", base)
    origin = {"train": "the ct_train_*_image files without the validation cases", "val": how}
    return Datalist(layout="mmwhs", base=base, source=base, splits={"train": train, "val": val}, origin=origin)


MMWHS = Reader("ROOT/ct_train_NNNN_image.nii.gz or ROOT/ct_train/ct_train_NNNN_image.nii.gz", _locate_mmwhs, _read_mmwhs)
