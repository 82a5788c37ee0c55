"""BTCV (Synapse multi-organ CT) as distributed and as MONAI ships it.

* ``monai-json``: a MONAI datalist JSON (BTCV's ``dataset_0.json``) at the root, with "training" /
  "validation" / "test" lists; paths are relative to the root.
* ``btcv-raw``: ``RawData/Training/img/img0001.nii.gz`` + ``RawData/Training/label/label0001.nii.gz`` as BTCV
  is distributed (the root may also be the folder that directly holds ``Training/``), test images in
  ``RawData/Testing/img``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from sslbench.data.layouts.base import (Datalist, Reader, _carve_val, _data, _item, _list_images, _read_json_datalist,
                                        _resolve, case_id)


def _locate_monai_json(task: Mapping[str, Any], root: Path) -> Path | None:
    name = _data(task).get("datalist") or "dataset_0.json"
    return root if (root / name).is_file() else None


def _read_monai_json(task: Mapping[str, Any], root: Path, base: Path) -> Datalist:
    name = _data(task).get("datalist") or "dataset_0.json"
    return _read_json_datalist(task, "monai-json", base, base / name, test_folder=None)


def _locate_btcv_raw(task: Mapping[str, Any], root: Path) -> Path | None:
    for base in (root / "RawData", root):
        if (base / "Training" / "img").is_dir():
            return base
    return None


def _read_btcv_raw(task: Mapping[str, Any], root: Path, base: Path) -> Datalist:
    img_dir, lab_dir = base / "Training" / "img", base / "Training" / "label"
    train = []
    for f in _list_images(img_dir, r"img\d+\.nii(\.gz)?"):
        cid = case_id(f)
        ext = ".nii.gz" if f.name.endswith(".nii.gz") else ".nii"
        train.append(_item(cid, _resolve(base, str(f)), _resolve(base, str(lab_dir / f"label{cid}{ext}"))))
    train.sort(key=lambda it: it["id"])
    train, val, how = _carve_val(task, train, "Training/img", img_dir)
    splits = {"train": train, "val": val}
    origin = {"train": "images in Training/img without the validation cases", "val": how}
    test_dir = base / "Testing" / "img"
    if test_dir.is_dir():
        tests = _list_images(test_dir, r"img\d+\.nii(\.gz)?")
        splits["test"] = [_item(case_id(f), _resolve(base, str(f)), None) for f in tests]
        origin["test"] = "images in Testing/img"
    return Datalist(layout="btcv-raw", base=base, source=img_dir, splits=splits, origin=origin)


MONAI_JSON = Reader("ROOT/<data.datalist, default dataset_0.json>", _locate_monai_json, _read_monai_json)
BTCV_RAW = Reader("ROOT/RawData/Training/img/ or ROOT/Training/img/", _locate_btcv_raw, _read_btcv_raw)
