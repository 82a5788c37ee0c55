"""Dataset validation: does the data under a root match its task recipe, case by case?

:func:`check_dataset` reads the datalist the way training does (:mod:`sslbench.data.layouts`), then opens
every listed file, one case at a time, and reports each defect as one line naming the file (or the datalist
and key) and what was expected, instead of raising: a missing or truncated file, label values outside the
task's classes (after ``data.label_map``), non-integral label values, an image/label pair that disagrees in
spatial shape or affine, an empty split, a case in two splits. :func:`summarize` aggregates the per-case
rows into one row per split for the CLI's table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from sslbench.data import ct_layouts, layouts
from sslbench.data.phantom import MARKER, PARTIAL_MARKER
from sslbench.errors import DataError

#: Tolerance between an image's and its label's affine entries (float32 header rounding, not a voxel shift).
AFFINE_ATOL = 1e-3
AFFINE_RTOL = 1e-4
#: Tolerance for a float label value to count as integral.
INTEGRAL_ATOL = 1e-3


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Attributes:
        rows: one dict per listed case: split, id, image, label, shape (spatial), channels, spacing (mm),
            intensity (min, max), labels ({raw value: voxels}), classes ({class index: voxels}, after
            data.label_map), ok (no problem found for this case). Values that could not be read are None.
        problems: one line each, naming the file (or datalist and key) and what was expected.
        layout: the layout detected ("" where none was found).
        phantom: whether the root is an sslbench phantom (marker file present).
        notes: observations that do not make the data unusable (e.g. val_ids absent from the data).
        root, task, classes: what was checked (the task's name and class names).
    """

    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    layout: str = ""
    phantom: bool = False
    notes: list[str] = field(default_factory=list)
    root: Path | None = None
    task: str = ""
    classes: list[str] = field(default_factory=list)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _label_map(task: Mapping[str, Any]) -> dict[int, int] | None:
    """``data.label_map`` with integer keys and values, or None where the task has none."""
    raw = (task.get("data") or {}).get("label_map")
    if not raw:
        return None
    try:
        return {int(float(k)): int(v) for k, v in dict(raw).items()}
    except (TypeError, ValueError):
        raise DataError(f"task '{task.get('name', '?')}': data.label_map: expected {{raw value: class index}} "
                        f"integers, got {raw!r}") from None


def _read(path: str, what: str, where: str, problems: list[str]) -> tuple[Any, np.ndarray | None]:
    """(nibabel image or None, unscaled data or None); a problem line per defect."""
    if ct_layouts.is_itk(path) or Path(path).is_dir():   # LUNA16 .mhd/.raw, DICOM series folders
        try:
            return _read_converted(path)
        except DataError as exc:
            problems.append(str(exc))
            return None, None
    if not Path(path).is_file():
        problems.append(f"{path}: {what} file not found ({where}); expected the file to exist")
        return None, None
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises several types for corrupt headers
        problems.append(f"{path}: cannot be read as NIfTI ({_one_line(exc)}); expected a readable .nii/.nii.gz {what}")
        return None, None
    try:
        proxy = img.dataobj
        raw = np.asanyarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
    except Exception as exc:  # truncated gzip streams raise EOFError, zlib.error, OSError, ValueError
        problems.append(f"{path}: voxel data cannot be read ({_one_line(exc)}); expected a complete {what} file "
                        f"(truncated or corrupt download?)")
        return img, None
    return img, raw


def _read_converted(path: str) -> tuple[Any, np.ndarray]:
    """A MetaImage or DICOM series read into memory as a nibabel image (see sslbench.data.ct_layouts)."""
    img = ct_layouts.read_volume(path)
    return img, np.asanyarray(img.dataobj)


def _scaling(img: Any) -> tuple[float, float]:
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return slope, inter


def _value_counts(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and their counts; integer volumes are counted slab by slab (low memory)."""
    if raw.size == 0:
        return np.array([]), np.array([], dtype=np.int64)
    if raw.dtype.kind in "iub":
        lo, hi = int(raw.min()), int(raw.max())
        if hi - lo < 1_000_000:
            counts = np.zeros(hi - lo + 1, dtype=np.int64)
            # slabs along the last axis: contiguous in nibabel's Fortran-ordered arrays, no full-size copy
            per_index = max(1, raw.size // raw.shape[-1])
            step = max(1, 4_000_000 // per_index)
            for k in range(0, raw.shape[-1], step):
                chunk = raw[..., k:k + step].astype(np.int64).ravel() - lo
                counts += np.bincount(chunk, minlength=counts.size)
            values = np.nonzero(counts)[0]
            return values + lo, counts[values]
    values, counts = np.unique(raw, return_counts=True)
    return values, counts


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape[:3])


def _check_channels(task: Mapping[str, Any], files: list[str], img: Any, row: dict, problems: list[str]) -> None:
    """The image has the task's input channels (``task.channels``; one 3-D volume where it has none).

    Channels come from a 4-D NIfTI's 4th axis or from one 3-D file per channel; per-channel files must
    share the first one's grid (shape and affine).
    """
    want = len(task.get("channels") or []) or 1
    if len(files) > 1:
        for other in files[1:]:
            try:
                hdr = nib.load(other)
            except Exception as exc:  # missing or corrupt: nibabel raises several types
                problems.append(f"{other}: cannot be read as NIfTI ({_one_line(exc)}); expected a channel "
                                f"image of case '{row['id']}'")
                continue
            if tuple(hdr.shape) != tuple(img.shape):
                problems.append(f"{other}: shape {hdr.shape} differs from {files[0]} {img.shape}; expected "
                                f"every channel on the same grid")
            elif not np.allclose(hdr.affine, img.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
                problems.append(f"{other}: affine differs from {files[0]}; expected every channel on the same grid")
        row["channels"] = len(files) * row["channels"]
    if row["channels"] != want:
        names = ", ".join(task.get("channels") or []) or "a single 3-D volume"
        problems.append(f"{files[0]}: {'x'.join(map(str, img.shape))} image with {row['channels']} channel(s); "
                        f"expected {want} ({names}) for task '{task.get('name', '?')}'")


def _check_case(task: Mapping[str, Any], split: str, item: Mapping[str, Any],
                label_map: dict[int, int] | None, problems: list[str]) -> dict:
    """Check one listed case; returns its row and appends its problems."""
    n_before = len(problems)
    classes = task.get("classes") or []
    where = f"{split} case '{item['id']}'"
    files = list(item["image"]) if isinstance(item["image"], (list, tuple)) else [item["image"]]
    item = {**item, "image": files[0]}     # one file per channel (BraTS): the first stands for the case
    row: dict[str, Any] = {"split": split, "id": item["id"], "image": item["image"], "label": item.get("label"),
                           "shape": None, "channels": None, "spacing": None, "intensity": None,
                           "labels": None, "classes": None, "ok": True}

    img, raw = _read(item["image"], "image", where, problems)
    if img is not None:
        if len(img.shape) < 3:
            problems.append(f"{item['image']}: {len(img.shape)}-D image of shape {img.shape}; expected a 3-D or "
                            f"4-D volume")
        else:
            row["shape"] = _spatial(img.shape)
            row["channels"] = int(np.prod(img.shape[3:])) if len(img.shape) > 3 else 1
            row["spacing"] = tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
            _check_channels(task, files, img, row, problems)
    if raw is not None and raw.size:
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            problems.append(f"{item['image']}: contains NaN or infinite values; expected finite intensities")
        else:
            slope, inter = _scaling(img)
            ends = sorted((float(raw.min()) * slope + inter, float(raw.max()) * slope + inter))
            row["intensity"] = (ends[0], ends[1])
    del raw

    if item.get("label") is None:
        if split != "test" and task.get("kind") != "corpus":   # corpora are images only
            problems.append(f"{item['image']}: {where} has no label; expected a label file")
            row["ok"] = False
        else:
            row["ok"] = len(problems) == n_before
        return row

    lab, lraw = _read(item["label"], "label", where, problems)
    if lab is not None:
        lshape = tuple(lab.shape)
        if len(lshape) == 4 and lshape[3] == 1:
            lshape = lshape[:3]
        if len(lshape) != 3:
            problems.append(f"{item['label']}: label of shape {lab.shape}; expected a 3-D label volume")
        elif img is not None and len(img.shape) >= 3 and _spatial(img.shape) != lshape:
            problems.append(f"{item['label']}: spatial shape {'x'.join(map(str, lshape))} differs from its image "
                            f"{item['image']} ({'x'.join(map(str, _spatial(img.shape)))}); expected the same grid")
        elif img is not None and not np.allclose(lab.affine, img.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
            diff = float(np.abs(np.asarray(img.affine) - np.asarray(lab.affine)).max())
            problems.append(f"{item['label']}: affine differs from its image {item['image']} (largest difference "
                            f"{diff:.4g}); expected the same voxel-to-world mapping")
    if lraw is not None and lraw.dtype.kind == "f" and not np.isfinite(lraw).all():
        problems.append(f"{item['label']}: contains NaN or infinite values; expected integral class values")
    elif lraw is not None:
        slope, inter = _scaling(lab)
        values, counts = _value_counts(lraw)
        scaled = values.astype(np.float64) * slope + inter
        rounded = np.rint(scaled)
        off = np.abs(scaled - rounded) > INTEGRAL_ATOL
        if off.any():
            problems.append(f"{item['label']}: non-integer label values (e.g. {scaled[off][0]:g}); expected integral "
                            f"class values")
        else:
            ints = [int(v) for v in rounded]
            row["labels"] = {v: int(c) for v, c in zip(ints, counts)}
            if label_map is not None:
                allowed = {0} | set(label_map)
                expected = f"0 or a raw value of data.label_map ({', '.join(str(k) for k in sorted(label_map))})"
                mapped = {0: 0, **label_map}
            else:
                allowed = set(range(len(classes))) if classes else {v for v in ints if v >= 0}
                expected = f"integers 0..{len(classes) - 1} (data.classes)" if classes else "non-negative integers"
                mapped = {v: v for v in allowed}
            bad = [v for v in ints if v not in allowed]
            if bad:
                shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
                problems.append(f"{item['label']}: label values {shown} are not classes of task "
                                f"'{task.get('name', '?')}'; expected {expected}")
            else:
                per_class: dict[int, int] = {}
                for v, c in row["labels"].items():
                    per_class[mapped[v]] = per_class.get(mapped[v], 0) + c
                row["classes"] = dict(sorted(per_class.items()))
    row["ok"] = len(problems) == n_before
    return row


def _phantom_state(*folders: Path) -> tuple[bool, bool]:
    """(phantom marker found, synth unfinished) for the first folder that has a marker."""
    for folder in folders:
        if (folder / MARKER).is_file():
            return True, False
        if (folder / PARTIAL_MARKER).is_file():
            return True, True
    return False, False


def check_dataset(task: Mapping[str, Any], root: Path) -> CheckReport:
    """Validate the dataset of ``task`` under ``root``; never raises for a defect of the data.

    Reads the datalist (a DataError there becomes a problem line), checks the splits (non-empty, disjoint
    by id and by image path), then loads every listed case, one at a time: the files exist and load, label
    values are classes of the task (after data.label_map; float labels must hold integral values), and image
    and label share the spatial shape and the affine.
    """
    if task.get("kind") in ("classification", "classification2d"):   # CC-CCII slice folders, ChestX-ray14 PNGs
        from sslbench.data import classification

        return classification.check_dataset(task, root)
    root = Path(root).expanduser()
    report = CheckReport(root=root, task=str(task.get("name", "?")), classes=list(task.get("classes") or []))
    report.phantom, unfinished = _phantom_state(root)
    try:
        label_map = _label_map(task)
        dl = layouts.load_datalist(task, root)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    report.layout = dl.layout
    if not report.phantom:  # the marker sits at the phantom's root: MSD task folder, or above RawData/
        extra = [root.parent] if root.name == "RawData" else []
        report.phantom, unfinished = _phantom_state(dl.base, *extra)
    if unfinished:
        report.problems.append(f"{dl.base / PARTIAL_MARKER}: the phantom synth that wrote this folder did not "
                               f"finish; expected {MARKER} (run `sslbench data synth` again)")

    for split in ("train", "val"):
        if not dl.splits.get(split):
            report.problems.append(f"{dl.source}: the '{split}' split ({dl.origin.get(split, 'not listed')}) is "
                                   f"empty; expected at least one case")
    report.problems.extend(layouts.overlaps(dl.splits))
    for split, items in dl.splits.items():
        seen: dict[str, int] = {}
        for it in items:
            key = layouts.image_key(it["image"])
            seen[key] = seen.get(key, 0) + 1
        for image, n in seen.items():
            if n > 1:
                report.problems.append(f"{image}: listed {n} times in the '{split}' split "
                                       f"({dl.origin.get(split, '')}); expected each case once")

    val_ids = (task.get("data") or {}).get("val_ids")
    if val_ids and "val_ids" in dl.origin.get("val", ""):
        present = {it["id"] for items in dl.splits.values() for it in items}
        missing = [str(v) for v in val_ids if str(v) not in present]
        if missing:
            report.notes.append(f"{dl.source}: data.val_ids {', '.join(missing)} are not among the cases; the "
                                f"validation split is smaller than the benchmark's")

    for split, items in dl.splits.items():
        for it in items:
            report.rows.append(_check_case(task, split, it, label_map, report.problems))
    return report


def _range(values: list[tuple], fmt: str) -> str:
    """Per-axis min-max of equal-length tuples: '96 x 96 x 40-56'."""
    if not values:
        return "-"
    parts = []
    for axis in zip(*values):
        lo, hi = min(axis), max(axis)
        parts.append(format(lo, fmt) if lo == hi else f"{format(lo, fmt)}-{format(hi, fmt)}")
    return " x ".join(parts)


def summarize(report: CheckReport) -> list[dict]:
    """One row per split, every row with the same keys in the same order (ready for a table).

    Keys: split, cases, problems (cases with a problem), shape (per-axis range), spacing (mm, per-axis
    range), intensity (overall min..max), then one column per class (total voxels over the split's cases
    after data.label_map, by class name, background left out; "-" for unlabelled splits).
    """
    class_ids: set[int] = set()
    for r in report.rows:
        class_ids |= set(r.get("classes") or {})
    names = list(report.classes) or ["background"]
    for c in sorted(class_ids):
        if c >= len(names):
            names.extend(f"class {i}" for i in range(len(names), c + 1))
    out = []
    splits = list(dict.fromkeys(r["split"] for r in report.rows))
    for split in splits:
        rows = [r for r in report.rows if r["split"] == split]
        shapes = [r["shape"] for r in rows if r["shape"]]
        spacings = [r["spacing"] for r in rows if r["spacing"]]
        lows = [r["intensity"][0] for r in rows if r["intensity"]]
        highs = [r["intensity"][1] for r in rows if r["intensity"]]
        labelled = [r["classes"] for r in rows if r["classes"] is not None]
        entry: dict[str, Any] = {
            "split": split,
            "cases": len(rows),
            "problems": sum(1 for r in rows if not r["ok"]),
            "shape": _range(shapes, "d"),
            "spacing": _range(spacings, ".2f"),
            "intensity": f"{min(lows):g}..{max(highs):g}" if lows else "-",
        }
        for i, name in enumerate(names[1:], start=1):
            entry[name] = sum(c.get(i, 0) for c in labelled) if labelled else "-"
        out.append(entry)
    return out
