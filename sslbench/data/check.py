"""Dataset validation: does the data under a root match its task recipe, case by case?

:func:`check_dataset` reads the datalist the way training does (:mod:`sslbench.data.layouts`), then opens
every listed file, one case at a time, and reports each defect as one line naming the file (or the datalist
and key) and what was expected, instead of raising: a missing or truncated file, label values outside the
task's classes (after ``data.label_map``), non-integral label values, an image/label pair that disagrees in
spatial shape or affine, an empty split, a case in two splits. :func:`summarize` aggregates the per-case
rows into one row per split for the CLI's table. Classification tasks (CC-CCII slice folders, ChestX-ray14
PNGs) get the same report from their own image checks (every slice readable, equal slice sizes, complete
slice numbering, patient-disjoint splits).

Every run applies the same checks to the cases it reads (issue 19): :func:`check_case_headers` (headers only:
files exist and are complete, image / label grids agree; also used here) before its run folder is claimed, and
:class:`LoadChecked` (the case pipelines' loader: NaN / infinite intensities, label values outside the task's
classes) as each case is loaded; :func:`load_error` says why a file fails to load (truncated gzip, not a NIfTI
header, missing reader package, ...), in one line naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from sslbench.data import layouts
from sslbench.data.layouts import ct as ct_layouts
from sslbench.data.marker import MARKER, PARTIAL_MARKER
from sslbench.errors import DataError

#: Tolerance between an image's and its label's affine entries (float32 header rounding, not a voxel shift).
AFFINE_ATOL = 1e-3
AFFINE_RTOL = 1e-4
#: Tolerance for a float label value to count as integral.
INTEGRAL_ATOL = 1e-3


#: Version of the voxel checks of :class:`LoadChecked`; part of the case cache's key, so cases cached before a
#: change of these checks (or before they existed) are preprocessed, and checked, again.
VOXEL_CHECKS = 1
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


# ----------------------------------------------------------------------------------------------------------
# Why a file cannot be loaded, in words
# ----------------------------------------------------------------------------------------------------------
def _files(image: Any) -> list[str]:
    return [str(f) for f in image] if isinstance(image, (list, tuple)) else [str(image)]


def _gzip_problem(path: Path, deep: bool, expected: int | None) -> str | None:
    """Why a .gz file is not a complete gzip stream, or None. Cheap check: the stream's recorded size (its last 4
    bytes) against ``expected`` uncompressed bytes; the whole stream is decompressed only when they disagree
    (or with ``deep``), so a sound file costs two small reads."""
    import gzip
    import zlib

    if not deep and expected is not None:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            if int.from_bytes(fh.read(4), "little") == expected % (1 << 32):
                return None
    size = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                size += len(chunk)
    except EOFError:
        return "truncated gzip (the file ends inside its compressed stream); expected a complete download"
    except (OSError, zlib.error) as exc:
        return f"corrupt gzip stream ({_one_line(exc)}); expected a complete download"
    if expected is not None and size < expected:
        return f"truncated NIfTI (voxel data ends after {size} of {expected} bytes); expected a complete file"
    return None


def _nifti_expected_bytes(hdr: Any) -> int:
    """Header bytes plus voxel bytes that a single-file NIfTI must hold."""
    return int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape(), dtype=np.int64)) * hdr.get_data_dtype().itemsize


def file_problem(path: str | Path, deep: bool = False) -> str | None:
    """The cause that keeps a volume file from loading, in words (None: none found). Checks, cheapest first:
    the file exists; a .gz is gzip; the NIfTI header parses; the file (or gzip stream) holds all voxel bytes.
    ``deep`` decompresses a .gz completely even when its recorded size fits (for an error already seen)."""
    p = Path(path)
    if not p.exists():
        return "file not found; expected the file to exist"
    if p.is_dir() or not str(p).lower().endswith(_NIFTI_SUFFIXES):
        return None
    gz = str(p).lower().endswith(".gz")
    if gz:
        with open(p, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return "not a gzip file although named .gz; expected a gzip-compressed NIfTI"
    try:
        hdr = nib.load(str(p)).header
    except Exception as exc:  # nibabel raises several types for a bad header
        if gz and (problem := _gzip_problem(p, deep=True, expected=None)):
            return problem
        return f"not a NIfTI header ({_one_line(exc)}); expected a readable .nii/.nii.gz volume"
    expected = _nifti_expected_bytes(hdr)
    if gz:
        return _gzip_problem(p, deep=deep, expected=expected)
    if p.stat().st_size < expected:
        return (f"truncated NIfTI (voxel data ends after {p.stat().st_size} of {expected} bytes); expected a complete "
                f"file")
    return None


def _innermost(exc: BaseException) -> BaseException:
    """The exception at the bottom of a chain (MONAI wraps a reader's error in 'applying transform ...')."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DataError):
            return exc
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def load_error(path: str | Path | list, exc: BaseException) -> str:
    """One line ``<file>: <cause>`` for a volume that failed to load: file missing, truncated gzip, not a gzip
    file, not a NIfTI header, voxel data cut short, missing reader package (e.g. SimpleITK for .mhd), or the
    reader's own message. A reader's one-line DataError (which names its file) is returned as it is."""
    inner = _innermost(exc)
    if isinstance(inner, DataError):
        return str(inner)
    files = _files(path)
    for f in files:
        problem = file_problem(str(f).split(ct_layouts.SERIES_SEP)[0], deep=True)
        if problem is not None:
            return f"{f}: {problem}"
        if not isinstance(inner, ImportError) and (ct_layouts.is_itk(f) or ct_layouts.is_series_ref(f)):
            try:
                read_header(f)     # MetaImage without its .raw, a DICOM folder without a usable series, ...
            except DataError as err:
                return str(err)
            except ImportError:
                pass
    first = files[0]
    if isinstance(inner, ImportError):
        name = getattr(inner, "name", None) or (str(inner).split("'")[1] if "'" in str(inner) else str(inner))
        return f"{first}: missing reader package {name} (pip install {name}); expected it installed to read this file"
    text = _one_line(inner)
    if "suitable reader" in text or "OptionalImportError" in text:
        return f"{first}: no installed reader for this format ({text}); expected a NIfTI, MetaImage or DICOM series"
    lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
    return f"{first}: cannot be loaded and preprocessed ({(lines[-1] if lines else type(inner).__name__)[:200]})"


# ----------------------------------------------------------------------------------------------------------
# Header checks: shared by `sslbench data check` and every run (before its run folder exists)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Header:
    """What a volume's header says: shape (all axes) and the voxel-to-world affine (RAS)."""

    shape: tuple[int, ...]
    affine: np.ndarray


def read_header(path: str | Path, what: str = "image") -> Header:
    """The header of a NIfTI file, a MetaImage or a DICOM series, without reading voxels; DataError
    (``<file>: <cause>``) when the file is missing, truncated, corrupt or of an unknown format."""
    p = str(path)
    if ct_layouts.SERIES_SEP in p or Path(p).is_dir():
        series = ct_layouts.dicom_series(p)
        return Header(tuple(series.shape), series.affine)
    problem = file_problem(p)
    if problem is not None:
        raise DataError(f"{p}: {problem.replace('expected the file', f'expected the {what} file')}")
    if ct_layouts.is_itk(p):
        try:
            import SimpleITK as sitk
        except ImportError:
            raise DataError(f"{p}: missing reader package SimpleITK (pip install SimpleITK); expected it installed "
                            f"to read MetaImage files") from None
        if p.lower().endswith(".mhd"):
            raw = ct_layouts._mhd_data_file(Path(p))
            if raw is not None and not raw.is_file():
                raise DataError(f"{p}: its voxel data file {raw.name} is missing; expected {raw} next to the header "
                                f"(LUNA16 ships each scan as a .mhd + .raw pair)")
        reader = sitk.ImageFileReader()
        reader.SetFileName(p)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise DataError(f"{p}: not a MetaImage header ({_one_line(exc)[-160:]}); expected a .mhd/.raw pair") from None
        direction = np.asarray(reader.GetDirection(), float).reshape(3, 3) if reader.GetDimension() == 3 else np.eye(3)
        lps = np.eye(4)
        if reader.GetDimension() == 3:
            lps[:3, :3] = direction * np.asarray(reader.GetSpacing(), float)[None, :]
            lps[:3, 3] = reader.GetOrigin()
        return Header(tuple(int(s) for s in reader.GetSize()), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
    try:
        img = nib.load(p)
    except Exception as exc:  # nibabel raises several types for unknown formats
        raise DataError(f"{p}: cannot be read as NIfTI ({_one_line(exc)}); expected a readable .nii/.nii.gz "
                        f"{what}") from None
    return Header(tuple(int(s) for s in img.shape), np.asarray(img.affine, float))


def case_header_problems(task: Mapping[str, Any], item: Mapping[str, Any], where: str = "",
                         unreadable: set | None = None) -> list[tuple[str, str]]:
    """[(file, one-line problem)] of one case from its headers alone (no voxel is read): every file exists and
    has a readable, complete header; channel files share the first's grid and the image has the task's
    channels; the label's spatial shape and affine match the image's (within AFFINE_RTOL / AFFINE_ATOL).
    Files whose header cannot be read are added to ``unreadable`` when given."""
    out: list[tuple[str, str]] = []
    files = _files(item["image"])
    headers: dict[str, Header] = {}
    unreadable = set() if unreadable is None else unreadable
    for f in files + ([str(item["label"])] if item.get("label") else []):
        what = "label" if f == str(item.get("label")) else "image"
        try:
            headers[f] = read_header(f, what)
        except DataError as exc:
            text = str(exc)
            if "file not found" in text and where:
                text = text.replace("file not found;", f"file not found ({where});")
            out.append((f, text))
            unreadable.add(f)
    first = headers.get(files[0])
    if first is None:
        return out
    if len(first.shape) < 3:
        out.append((files[0], f"{files[0]}: {len(first.shape)}-D image of shape {first.shape}; expected a 3-D or "
                              f"4-D volume"))
        return out
    channels = int(np.prod(first.shape[3:])) if len(first.shape) > 3 else 1
    for other in files[1:]:
        h = headers.get(other)
        if h is None:
            continue
        if h.shape != first.shape:
            out.append((other, f"{other}: shape {h.shape} differs from {files[0]} {first.shape}; expected every "
                               f"channel on the same grid"))
        elif not np.allclose(h.affine, first.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
            out.append((other, f"{other}: affine differs from {files[0]}; expected every channel on the same grid"))
    want = len(task.get("channels") or []) or 1
    if len(files) * channels != want:
        names = ", ".join(task.get("channels") or []) or "a single 3-D volume"
        out.append((files[0], f"{files[0]}: {'x'.join(map(str, first.shape))} image with {len(files) * channels} "
                              f"channel(s); expected {want} ({names}) for task '{task.get('name', '?')}'"))
    label = str(item["label"]) if item.get("label") else None
    lab = headers.get(label) if label else None
    if lab is not None:
        lshape = lab.shape[:3] if len(lab.shape) == 4 and lab.shape[3] == 1 else lab.shape
        if len(lshape) != 3:
            out.append((label, f"{label}: label of shape {lab.shape}; expected a 3-D label volume"))
        elif tuple(first.shape[:3]) != tuple(lshape):
            out.append((label, f"{label}: spatial shape {'x'.join(map(str, lshape))} differs from its image "
                               f"{files[0]} ({'x'.join(map(str, first.shape[:3]))}); expected the same grid"))
        elif not np.allclose(lab.affine, first.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
            diff = float(np.abs(first.affine - lab.affine).max())
            out.append((label, f"{label}: affine differs from its image {files[0]} (largest difference {diff:.4g}); "
                               f"expected the same voxel-to-world mapping (spacing, origin, orientation)"))
    return out


def check_case_headers(items: list[Mapping[str, Any]], task: Mapping[str, Any], what: str = "") -> None:
    """Header checks of every case a run will read (:func:`case_header_problems`); raises one DataError line
    naming the first file at fault (and how many more problems `sslbench data check` would list)."""
    problems = [line for it in items
                for _, line in case_header_problems(task, it, where=f"{what} case '{it.get('id', '?')}'".strip())]
    if problems:
        more = (f" (and {len(problems) - 1} more problem(s): sslbench data check --task {task.get('name', '?')} "
                f"lists them)") if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


# ----------------------------------------------------------------------------------------------------------
# Voxel checks: once per case, as it is loaded (LoadChecked), cached with the case
# ----------------------------------------------------------------------------------------------------------
def allowed_labels(task: Mapping[str, Any]) -> tuple[set[int] | None, str]:
    """(the raw label values a task accepts before data.label_map, the expectation in words); None: any
    non-negative integer (a task without classes)."""
    label_map = _label_map(task)
    classes = task.get("classes") or []
    if label_map is not None:
        return {0} | set(label_map), f"0 or a raw value of data.label_map ({', '.join(str(k) for k in sorted(label_map))})"
    if classes:
        return set(range(len(classes))), f"integers 0..{len(classes) - 1} (data.classes)"
    return None, "non-negative integers"


def voxel_problem(task: Mapping[str, Any], image: Any, label: Any = None, image_file: str = "",
                  label_file: str = "") -> str | None:
    """The first voxel-level defect of a loaded case as one line naming its file, or None: NaN or infinite
    image intensities, NaN / non-integral label values, label values that are not classes of the task."""
    import torch

    img = torch.as_tensor(image)
    if img.is_floating_point() and not bool(torch.isfinite(img).all()):
        n = int((~torch.isfinite(img)).sum())
        return f"{image_file}: contains {n} NaN or infinite voxel(s); expected finite intensities"
    if label is None:
        return None
    lab = torch.as_tensor(label)
    values = torch.unique(lab).double()
    if not bool(torch.isfinite(values).all()):
        return f"{label_file}: contains NaN or infinite values; expected integral class values"
    off = (values - values.round()).abs() > INTEGRAL_ATOL
    if bool(off.any()):
        return f"{label_file}: non-integer label values (e.g. {float(values[off][0]):g}); expected integral class values"
    allowed, expected = allowed_labels(task)
    ints = [int(v) for v in values.round().tolist()]
    bad = [v for v in ints if (v < 0 if allowed is None else v not in allowed)]
    if bad:
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        return f"{label_file}: label values {shown} are not classes of task '{task.get('name', '?')}'; expected {expected}"
    return None


class LoadChecked:
    """MONAI-style dictionary transform: MONAI's ``LoadImaged`` (with sslbench's MetaImage and DICOM series
    readers) followed by the voxel checks of :func:`voxel_problem`.

    A file that fails to load raises one DataError line ``<file>: <cause>`` (:func:`load_error`), not MONAI's
    'applying transform <LoadImaged object at 0x...>'; a NaN image or a label value outside the task's classes
    raises one line naming that file. The checked case then goes on through the pipeline (and into the case
    cache, whose key holds :data:`VOXEL_CHECKS`).
    """

    def __init__(self, task: Mapping[str, Any], keys: Sequence[str], readers: Sequence[Any] = ()):
        from monai import transforms as mt

        self.task = {k: task.get(k) for k in ("name", "classes", "data")}
        self.keys = list(keys)
        self.loaders = {}
        for key in self.keys:   # one loader per key: a failure names its own file
            load = mt.LoadImaged(keys=[key], image_only=False)
            for reader in readers:
                load.register(reader)
            self.loaders[key] = load

    def __call__(self, data: Mapping[str, Any]) -> dict:
        d = dict(data)
        for key in self.keys:
            try:
                d = self.loaders[key](d)
            except Exception as exc:  # readers raise many types; one line naming the file and the cause
                raise DataError(load_error(data[key], exc)) from None
        image_file = _files(data["image"])[0]
        label_file = str(data.get("label") or "")
        problem = voxel_problem(self.task, d["image"], d.get("label") if "label" in self.keys else None,
                                image_file, label_file)
        if problem is not None:
            raise DataError(problem)
        return d


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
    if ct_layouts.is_itk(path) or Path(path).is_dir() or ct_layouts.SERIES_SEP in str(path):   # .mhd, DICOM
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
        problems.append(load_error(path, exc))
        return img, None
    return img, raw


def _read_converted(path: str) -> tuple[Any, np.ndarray]:
    """A MetaImage or DICOM series read into memory as a nibabel image (see sslbench.data.layouts.ct)."""
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

    # header checks shared with every run (files exist and are complete, channels, grids of image and label)
    unreadable: set = set()
    problems.extend(line for _, line in case_header_problems(task, {**item, "image": files}, where, unreadable))
    img, raw = _read(item["image"], "image", where, problems) if item["image"] not in unreadable else (None, None)
    if img is not None and len(img.shape) >= 3:
        row["shape"] = _spatial(img.shape)
        row["channels"] = len(files) * (int(np.prod(img.shape[3:])) if len(img.shape) > 3 else 1)
        row["spacing"] = tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
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

    lab, lraw = _read(item["label"], "label", where, problems) if str(item["label"]) not in unreadable else (None, None)
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
        return _check_classification(task, root)
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
    report.notes.extend(dl.notes)   # e.g. DICOM series skipped (localizers, single slices, gaps)
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


def _check_classification(task: Mapping[str, Any], root: Path) -> CheckReport:
    """Validate a CC-CCII or ChestX-ray14 tree: layout, splits, every image readable, slice completeness.

    Returns :class:`CheckReport` rows compatible with the summary table of :func:`summarize`: ``shape`` is
    the stored size (slices x height x width, or height x width), ``classes`` counts the case per class
    (CC-CCII) or per finding (ChestX-ray14), ``intensity`` the 8-bit grey range.
    """
    from PIL import Image

    from sslbench.data.layouts.classification import _ccccii_scans, _check_n_slice

    root = Path(root).expanduser()
    classes = list(task.get("classes") or [])
    report = CheckReport(root=root, task=str(task.get("name", "?")), classes=classes)
    report.phantom, unfinished = _phantom_state(root)
    try:
        name, base = layouts.find_layout(task, root)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    report.layout = name
    if unfinished:
        report.problems.append(f"{base}: the phantom synth that wrote this folder did not finish; run it again")
    if name == "ccccii":
        scans, problems = _ccccii_scans(base)
        report.problems.extend(problems)
        try:
            p2, notes = _check_n_slice(base, scans)
            report.problems.extend(p2)
            report.notes.extend(notes)
        except DataError as exc:
            report.problems.append(str(exc))
        if problems:
            return report
    try:
        dl = layouts.READERS[name].read(task, layouts.absolute_root(root), base)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    for split in ("train", "val"):
        if not dl.splits.get(split):
            report.problems.append(f"{dl.source}: the '{split}' split ({dl.origin.get(split, '?')}) is empty; "
                                   f"expected at least one case")
    report.problems.extend(layouts.overlaps(dl.splits))
    by_patient: dict[str, set[str]] = {}
    for split, items in dl.splits.items():
        for it in items:
            by_patient.setdefault(f"{it.get('label') if name == 'ccccii' else ''}:{it['patient']}", set()).add(split)
    mixed = [k.split(":", 1)[1] for k, v in by_patient.items() if len(v) > 1]
    official_folds = name == "ccccii" and Path(dl.source).suffix == ".csv"
    if mixed:
        line = (f"{dl.source}: patient {mixed[0]} has scans in several splits"
                f"{f' (and {len(mixed) - 1} more patients)' if len(mixed) > 1 else ''}")
        # the official CC-CCII fold CSVs are per scan; sslbench's own splits are patient-disjoint
        (report.notes if official_folds else report.problems).append(
            line + ("" if official_folds else "; expected patient-disjoint splits"))
    for split, items in dl.splits.items():
        for it in items:
            files = it.get("slices") or [it["image"]]
            row: dict[str, Any] = {"split": split, "id": it["id"], "image": it["image"], "label": None,
                                   "shape": None, "channels": 1, "spacing": None, "intensity": None,
                                   "labels": None, "classes": None, "ok": True}
            n_before = len(report.problems)
            lo, hi, shape = 255, 0, None
            for f in files:
                try:
                    with Image.open(f) as im:
                        arr = np.asarray(im.convert("L"))
                except (OSError, ValueError) as exc:
                    report.problems.append(f"{f}: cannot be read as an image ({_one_line(exc)}); "
                                           f"expected an 8-bit PNG/JPG")
                    break
                if shape is not None and arr.shape != shape:
                    report.problems.append(f"{f}: {arr.shape[0]}x{arr.shape[1]} pixels in a scan of "
                                           f"{shape[0]}x{shape[1]}; expected equal slice sizes")
                    break
                shape = arr.shape
                lo, hi = min(lo, int(arr.min())), max(hi, int(arr.max()))
            if shape is not None:
                row["shape"] = ((len(files),) + tuple(shape)) if name == "ccccii" else tuple(shape)
                row["intensity"] = (float(lo), float(hi))
            # check.summarize counts classes by index and leaves index 0 out (background): shift by one
            labels = [int(it["label"])] if name == "ccccii" else [k for k, v in enumerate(it["label"]) if v]
            row["classes"] = {k + 1: 1 for k in labels}
            row["ok"] = len(report.problems) == n_before
            report.rows.append(row)
    report.classes = ["No Finding" if name == "chestxray14" else "-"] + classes
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
