"""What every layout reader shares: the :class:`Datalist` it returns, the :class:`Reader` entry of the table
:data:`sslbench.data.layouts.READERS`, and the helpers of readers (case ids, junk files, validation carving,
datalist JSON).

Every item is ``{"id": str, "image": absolute path, "label": absolute path or None}``; a layout whose
channels are separate files (``brats``, :mod:`sslbench.data.layouts.brats`) gives ``image`` as a list of paths.
The validation split comes from the datalist's own validation list where it has one, else from ``data.val_ids``
(case ids, e.g. BTCV's 0035-0040) or ``data.val_last`` (the last N cases of the training list, in JSON order for
JSON layouts and in id order otherwise). Readers do not check that files exist; :mod:`sslbench.data.check` does.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from sslbench.errors import DataError

#: File name suffixes stripped to derive a case id from an image file name.
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nii.zst")
_JUNK_PREFIX = "._"


@dataclass
class Datalist:
    """A dataset read from disk.

    Attributes:
        layout: the layout that was read.
        base: the folder that paths were resolved against (e.g. the MSD task folder).
        source: the file (datalist JSON) or folder the cases were listed from; named in error messages.
        splits: {"train": [...], "val": [...], and "test" where the layout lists test images}.
        origin: for each split, where it came from, in words (e.g. "key 'validation' of dataset_0.json").
        notes: one line each about what the layout left out (e.g. skipped DICOM series, counted by reason).
    """

    layout: str
    base: Path
    source: Path
    splits: dict[str, list[dict]]
    origin: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------
def _data(task: Mapping[str, Any]) -> Mapping[str, Any]:
    return task.get("data") or {}


def _task_name(task: Mapping[str, Any]) -> str:
    return str(task.get("name", "?"))


def _is_junk(name: str) -> bool:
    """macOS resource-fork files (``._x.nii.gz``) and other hidden files shipped inside archives."""
    return name.startswith(_JUNK_PREFIX)


def _resolve(base: Path, rel: str) -> str:
    """An absolute, normalised path for a datalist entry (leading ``./`` stripped, relative to ``base``)."""
    while rel.startswith("./"):
        rel = rel[2:]
    path = Path(rel).expanduser()
    if not path.is_absolute():
        path = base / path
    return os.path.normpath(os.path.abspath(path))


def case_id(path: str | Path) -> str:
    """A case id from an image file name.

    ``img0035.nii.gz`` -> ``0035`` (BTCV numbering, as in ``data.val_ids``), ``spleen_2.nii.gz`` ->
    ``spleen_2``, ``ct_train_1001_image.nii.gz`` -> ``ct_train_1001``, ``amos_0001_0000.nii.gz`` -> ``amos_0001``.
    """
    name = Path(path).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"_(image|0000)$", "", name)
    m = re.fullmatch(r"img(\d+)", name)
    return m.group(1) if m else name


def _item(cid: str, image: str, label: str | None) -> dict:
    return {"id": cid, "image": image, "label": label}


def _carve_val(task: Mapping[str, Any], train: list[dict], where: str,
               source: Path) -> tuple[list[dict], list[dict], str]:
    """Split a training list into (train, val) by ``data.val_ids`` or ``data.val_last``.

    ``where`` describes the list in words (for the split's origin); ``source`` is the file or folder that an
    error names.
    """
    data = _data(task)
    val_ids = data.get("val_ids")
    val_last = data.get("val_last")
    if val_ids:
        wanted = {str(v) for v in val_ids}
        val = [it for it in train if it["id"] in wanted]
        rest = [it for it in train if it["id"] not in wanted]
        return rest, val, f"data.val_ids of task '{_task_name(task)}' applied to {where}"
    if val_last is not None:
        try:
            n = int(val_last)
        except (TypeError, ValueError):
            raise DataError(f"task '{_task_name(task)}': data.val_last: expected an integer, "
                            f"got {val_last!r}") from None
        if n < 0:
            raise DataError(f"task '{_task_name(task)}': data.val_last: expected >= 0, got {n}")
        cut = max(0, len(train) - n)
        return train[:cut], train[cut:], f"the last {n} cases of {where} (data.val_last)"
    raise DataError(f"{source}: no validation list, and task '{_task_name(task)}' gives neither data.val_ids nor "
                    f"data.val_last; expected one of them")


def _load_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); expected a datalist JSON file") from None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected a datalist JSON object") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object with split lists, got {type(obj).__name__}")
    return obj


def _json_entries(path: Path, obj: dict, key: str, base: Path, labelled: bool) -> list[dict]:
    """Items of one list of a datalist JSON (dicts with "image"/"label", or plain path strings)."""
    entries = obj[key]
    if not isinstance(entries, list):
        raise DataError(f"{path}: key '{key}': expected a list of cases, got {type(entries).__name__}")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            image, label = entry, None
        elif isinstance(entry, dict):
            image, label = entry.get("image"), entry.get("label")
        else:
            raise DataError(f"{path}: key '{key}' item {i}: expected {{\"image\": ..., \"label\": ...}} or a path "
                            f"string, got {type(entry).__name__}")
        if not isinstance(image, str) or not image:
            raise DataError(f"{path}: key '{key}' item {i}: expected an \"image\" path string, got {image!r}")
        if label is not None and not isinstance(label, str):
            raise DataError(f"{path}: key '{key}' item {i}: expected a \"label\" path string, got {label!r}")
        if _is_junk(Path(image).name):
            continue
        out.append(_item(case_id(image), _resolve(base, image),
                         _resolve(base, label) if (label and labelled) else None))
    return out


def _read_json_datalist(task: Mapping[str, Any], layout: str, base: Path, path: Path,
                        test_folder: str | None) -> Datalist:
    """The train / val / test lists of a MONAI or MSD datalist JSON (paths relative to ``base``)."""
    data = _data(task)
    obj = _load_json(path)
    train_key = data.get("train_split") or "training"
    val_key = data.get("val_split") or "validation"
    if train_key not in obj:
        keys = ", ".join(repr(k) for k in obj if isinstance(obj.get(k), list)) or "none"
        raise DataError(f"{path}: missing key '{train_key}' (data.train_split of task '{_task_name(task)}'); "
                        f"lists found: {keys}")
    train = _json_entries(path, obj, train_key, base, labelled=True)
    origin = {"train": f"key '{train_key}' of {path.name}"}
    if val_key in obj:
        val = _json_entries(path, obj, val_key, base, labelled=True)
        origin["val"] = f"key '{val_key}' of {path.name}"
    else:
        if not data.get("val_ids") and data.get("val_last") is None:
            raise DataError(f"{path}: missing key '{val_key}' (data.val_split of task '{_task_name(task)}'), and the "
                            f"task gives neither data.val_ids nor data.val_last; expected a validation list")
        train, val, how = _carve_val(task, train, f"key '{train_key}' of {path.name}", path)
        origin["train"] = f"key '{train_key}' of {path.name} without the validation cases"
        origin["val"] = how
    splits = {"train": train, "val": val}
    if "test" in obj:
        splits["test"] = _json_entries(path, obj, "test", base, labelled=False)
        origin["test"] = f"key 'test' of {path.name}"
    elif test_folder and (base / test_folder).is_dir():
        files = _list_images(base / test_folder)
        splits["test"] = [_item(case_id(f), _resolve(base, str(f)), None) for f in files]
        origin["test"] = f"images in {test_folder}/"
    return Datalist(layout=layout, base=base, source=path, splits=splits, origin=origin)


def _list_images(folder: Path, pattern: str = r".*\.nii(\.gz)?") -> list[Path]:
    """Image files in a folder matching ``pattern`` (full match), junk skipped, sorted by name."""
    rx = re.compile(pattern)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [folder / n for n in names if not _is_junk(n) and rx.fullmatch(n) and (folder / n).is_file()]


# ----------------------------------------------------------------------------------------------------------
# A layout: a locator (None where its markers are absent) and a reader
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reader:
    """One dataset layout: what :func:`sslbench.data.layouts.detect_layout` looks for, where, and how to read it."""

    markers: str                                                   # what detect_layout looks for, in words
    locate: Callable[[Mapping[str, Any], Path], Path | None]       # the base folder, or None
    read: Callable[[Mapping[str, Any], Path, Path], Datalist]
