"""The Medical Segmentation Decathlon layout (``msd``): a task folder ``TaskXX_Name/`` with ``dataset.json``.

The root may be the task folder itself or the folder holding exactly one task; macOS ``._*`` junk files are
skipped; test images are the datalist's ``test`` list or ``imagesTs/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from sslbench.data.layouts.base import Datalist, Reader, _data, _read_json_datalist
from sslbench.errors import DataError


def _msd_name(task: Mapping[str, Any]) -> str:
    return _data(task).get("datalist") or "dataset.json"


def _locate_msd(task: Mapping[str, Any], root: Path) -> Path | None:
    name = _msd_name(task)
    if (root / name).is_file():
        return root
    try:
        candidates = sorted(p for p in root.iterdir()
                            if p.is_dir() and p.name.startswith("Task") and (p / name).is_file())
    except OSError:
        return None
    if len(candidates) > 1:
        raise DataError(f"{root}: holds several MSD task folders ({', '.join(p.name for p in candidates)}); "
                        f"expected --root to be the one task folder to use")
    return candidates[0] if candidates else None


def _read_msd(task: Mapping[str, Any], root: Path, base: Path) -> Datalist:
    return _read_json_datalist(task, "msd", base, base / _msd_name(task), test_folder="imagesTs")


MSD = Reader("ROOT/dataset.json or ROOT/TaskXX_Name/dataset.json", _locate_msd, _read_msd)
