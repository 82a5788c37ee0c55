"""Read real on-disk dataset layouts into a datalist: {"train": [...], "val": [...], ("test": [...])}.

Users point sslbench at their own copies of the datasets, in the layout they were distributed in (no
renaming by hand). A task recipe names, in ``data.layouts``, the layouts to try in order:

* ``monai-json``: a MONAI datalist JSON (BTCV's ``dataset_0.json``) at the root, with "training" /
  "validation" / "test" lists; paths are relative to the root.
* ``btcv-raw``: ``RawData/Training/img/img0001.nii.gz`` + ``RawData/Training/label/label0001.nii.gz`` as BTCV
  is distributed (the root may also be the folder that directly holds ``Training/``), test images in
  ``RawData/Testing/img``.
* ``msd``: a Medical Segmentation Decathlon task folder ``TaskXX_Name/`` with ``dataset.json`` (the root may be
  the task folder itself or the folder holding exactly one task); macOS ``._*`` junk files are skipped.
* ``mmwhs``: ``ct_train_1001_image.nii.gz`` + ``ct_train_1001_label.nii.gz``, at the root or in ``ct_train/``.

Every item is ``{"id": str, "image": absolute path, "label": absolute path or None}``; a layout whose
channels are separate files (``brats``, :mod:`sslbench.data.brats`) gives ``image`` as a list of paths. The validation split
comes from the datalist's own validation list where it has one, else from ``data.val_ids`` (case ids, e.g.
BTCV's 0035-0040) or ``data.val_last`` (the last N cases of the training list, in JSON order for JSON layouts
and in id order otherwise). This module does not check that files exist; :mod:`sslbench.data.check` does.
"""

from __future__ import annotations

import json
import os
import re
import sys
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
# Layouts: each has a locator (None where its markers are absent) and a reader
# ----------------------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class _Layout:
    markers: str                                                   # what detect_layout looks for, in words
    locate: Callable[[Mapping[str, Any], Path], Path | None]       # the base folder, or None
    read: Callable[[Mapping[str, Any], Path, Path], Datalist]


#: Registered layouts, in the order tried when a task names none.
LAYOUTS: dict[str, _Layout] = {
    "monai-json": _Layout("ROOT/<data.datalist, default dataset_0.json>", _locate_monai_json, _read_monai_json),
    "btcv-raw": _Layout("ROOT/RawData/Training/img/ or ROOT/Training/img/", _locate_btcv_raw, _read_btcv_raw),
    "msd": _Layout("ROOT/dataset.json or ROOT/TaskXX_Name/dataset.json", _locate_msd, _read_msd),
    "mmwhs": _Layout("ROOT/ct_train_NNNN_image.nii.gz or ROOT/ct_train/ct_train_NNNN_image.nii.gz",
                     _locate_mmwhs, _read_mmwhs),
}
# Layouts written in their own modules register here (they receive this module; no import cycle).
from sslbench.data import brats as _brats  # noqa: E402

_brats.register_layout(sys.modules[__name__])
# LiTS, FLARE23, AMOS22, TCIA COVID-19 and LUNA16 (their module adds them to LAYOUTS when imported).
from sslbench.data import ct_layouts as _ct_layouts  # noqa: E402,F401
# CC-CCII and NIH ChestX-ray14 (classification tasks).
import sys  # noqa: E402

from sslbench.data import classification as _classification  # noqa: E402

_classification.register_layouts(sys.modules[__name__])


def _task_layouts(task: Mapping[str, Any]) -> list[str]:
    names = list(_data(task).get("layouts") or LAYOUTS)
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise DataError(f"task '{_task_name(task)}': data.layouts: unknown layout '{unknown[0]}'; expected one of "
                        f"{', '.join(LAYOUTS)}")
    return names


def _absolute(root: Path | str) -> Path:
    """The root as an absolute, normalised path (listed files then resolve to absolute paths too)."""
    return Path(os.path.normpath(os.path.abspath(Path(root).expanduser())))


def _find(task: Mapping[str, Any], root: Path) -> tuple[str, Path]:
    root = _absolute(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found; expected a folder holding task '{_task_name(task)}'")
    names = _task_layouts(task)
    for name in names:
        base = LAYOUTS[name].locate(task, root)
        if base is not None:
            return name, base
    expected = "; ".join(f"{n}: {LAYOUTS[n].markers}" for n in names)
    raise DataError(f"{root}: no known layout of task '{_task_name(task)}' found; expected {expected}")


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def detect_layout(task: Mapping[str, Any], root: Path) -> str:
    """The first layout of ``task["data"]["layouts"]`` whose markers exist under ``root``.

    Raises DataError naming the root and the markers expected where none matches.
    """
    return _find(task, root)[0]


def load_datalist(task: Mapping[str, Any], root: Path) -> Datalist:
    """Detect the layout and read it, with where every split came from; no consistency checks."""
    name, base = _find(task, root)
    return LAYOUTS[name].read(task, _absolute(root), base)


def read_datalist(task: Mapping[str, Any], root: Path, *, strict: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, list[dict]]:
    """The dataset under ``root`` as ``{"train": [...], "val": [...], ("test": [...])}``.

    Each item is ``{"id": str, "image": absolute path, "label": absolute path or None}``. With ``strict``
    (the default, what training uses) an empty train or val split, or a case in two splits (same id or same
    image file), is a DataError naming the datalist; :func:`sslbench.data.check.check_dataset` reads with
    ``strict=False`` and reports those as problems instead. Files are not opened here (DICOM folders excepted:
    their slice headers split them into series). ``log`` receives the layout's notes (e.g. skipped DICOM series).
    """
    dl = load_datalist(task, root)
    for note in dl.notes if log is not None else ():
        log(note)
    if strict:
        for split in ("train", "val"):
            if not dl.splits.get(split):
                raise DataError(f"{dl.source}: the '{split}' split ({dl.origin.get(split, '?')}) is empty; "
                                f"expected at least one case")
        lines = overlaps(dl.splits)
        if lines:
            more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
            raise DataError(lines[0] + more)
    return dl.splits


def image_key(image: str | list[str]) -> str:
    """A hashable key of an item's image: the path, or the first path of a multi-file (one per channel) image."""
    return image if isinstance(image, str) else image[0]


def overlaps(splits: Mapping[str, list[dict]]) -> list[str]:
    """One line per case found in two splits (by id or by image path), naming the image file."""
    lines = []
    names = list(splits)
    for i, a in enumerate(names):
        ids = {it["id"] for it in splits[a]}
        paths = {image_key(it["image"]) for it in splits[a]}
        for b in names[i + 1:]:
            for it in splits[b]:
                if image_key(it["image"]) in paths or it["id"] in ids:
                    lines.append(f"{it['image']}: case '{it['id']}' is in both the '{a}' and '{b}' splits; "
                                 f"expected disjoint splits")
    return lines
