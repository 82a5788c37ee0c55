"""On-disk layouts of the CT datasets LiTS, FLARE23 and AMOS22 and of the pre-training corpora TCIA COVID-19 and
LUNA16, plus the volume formats they come in besides NIfTI (MetaImage .mhd/.raw, DICOM series folders).

Layouts (in :data:`sslbench.data.layouts.READERS`; facts from ../shared/reference/datasets.md and the
VoCo supplement's Table 1):

* ``lits``: the LiTS challenge release, ``volume-N.nii`` + ``segmentation-N.nii`` (uncompressed), directly under
  the root or in its batch folders (``Training Batch 1/``, ``Training Batch 2/``), N = 0..130. Cases are ordered by
  N, so ``data.val_last: 31`` gives the seed's 100 / 31 split (volumes 100-130 in validation).
* ``lits-msd``: the same 131 volumes as Medical Segmentation Decathlon Task03 (``Task03_Liver/dataset.json``,
  ``imagesTr/liver_N.nii.gz``); also ordered by N, so both namings give the same split.
* ``flare23``: ``imagesTr/FLARE23_0001_0000.nii.gz`` + ``labelsTr/FLARE23_0001.nii.gz`` (nnU-Net naming; FLARE22's
  ``FLARE22_Tr_0001_0000.nii.gz`` too). Images without a label file (FLARE23's unlabelled part) are left out of a
  segmentation datalist; ``imagesVal``/``labelsVal`` (or ``imagesVa``/``labelsVa``) form the validation split where
  both exist, else ``data.val_last``; ``imagesTs/`` (images only: what a leaderboard scores) is the test split.
* ``amos22``: ``dataset.json`` with ``training`` / ``validation`` / ``test`` lists over ``imagesTr``,
  ``imagesVa`` and ``imagesTs`` (``amos_0001.nii.gz``), or those folders without the JSON. Ids up to
  :data:`AMOS_CT_MAX_ID` are CT, above it MRI: only CT cases are listed (the AMOS22 CT task).
* ``tcia-covid19``: ``volume-covid19-A-0XXX(_dayNNN).nii.gz`` (the NIfTI release), anywhere below the root, and
  TCIA's own DICOM distribution (``<patient>/<study>/<series>/*.dcm``: every valid series of a folder holding DICOM
  slices is one volume). Images only.
* ``luna16``: ``subset0``..``subset9/<seriesuid>.mhd`` (+ ``.raw``); ``seg-lungs-LUNA16/`` masks, the CSV files and
  ``evaluationScript/`` shipped beside them are not images and are skipped. Images only.

Formats: :class:`SimpleITKReader` is a MONAI image reader for MetaImage files (MONAI's own ITKReader needs the
``itk`` package; SimpleITK is lighter and already a dependency); the training pipeline registers it on its
``LoadImaged``. DICOM folders are split into series by :func:`scan_dicom_folder` (SeriesInstanceUID; localizers,
single slices, mixed orientations and non-uniform slice spacing skipped with a reason, counted per corpus by
:func:`skip_report`); :class:`DicomSeriesReader` reads one validated series (slices sorted along the normal, its
uniform gap as spacing, HU rescale applied). :func:`read_volume` gives all of them as a nibabel image for
:mod:`sslbench.data.check`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from monai.data import NibabelReader

from sslbench.data.layouts import base as L
from sslbench.data.layouts import msd
from sslbench.errors import DataError

#: AMOS numbering: ids 1..500 are CT scans, larger ids MRI (AMOS paper, dataset description).
AMOS_CT_MAX_ID = 500
_ITK_SUFFIXES = (".mhd", ".mha")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


# ----------------------------------------------------------------------------------------------------------
# Volume formats: MetaImage (.mhd/.raw, .mha) and DICOM series folders
# ----------------------------------------------------------------------------------------------------------
def is_itk(path: str | Path) -> bool:
    return str(path).lower().endswith(_ITK_SUFFIXES)


def _dicom_files(folder: Path) -> list[Path]:
    """The DICOM slice files directly in a folder: ``*.dcm`` or extension-less files with the DICM preamble."""
    out = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    for name in names:
        path = folder / name
        if L._is_junk(name) or not path.is_file():
            continue
        if name.lower().endswith(_DICOM_SUFFIXES):
            out.append(path)
        elif "." not in name:
            try:
                with open(path, "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if head[128:132] == b"DICM":
                out.append(path)
    return out


def is_dicom_series(path: str | Path) -> bool:
    """Whether ``path`` is a folder of DICOM slices (one series, read as one volume)."""
    p = Path(path)
    return p.is_dir() and bool(_dicom_files(p))


def _mhd_data_file(path: Path) -> Path | None:
    """The voxel data file a MetaImage header names (``ElementDataFile``), or None when the data is inline."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); expected a MetaImage header") from None
    m = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text, flags=re.MULTILINE)
    if m is None:
        raise DataError(f"{path}: no 'ElementDataFile' line; expected a MetaImage (.mhd) header")
    name = m.group(1)
    if name.upper() in ("LOCAL", "LIST") or "%" in name:
        return None
    return (path.parent / name) if not Path(name).is_absolute() else Path(name)


def _read_itk(path: Path) -> nib.Nifti1Image:
    """A MetaImage as a nibabel image with its RAS affine (ITK stores LPS: x and y change sign)."""
    import SimpleITK as sitk

    if path.suffix.lower() == ".mhd":
        raw = _mhd_data_file(path)
        if raw is not None and not raw.is_file():
            raise DataError(f"{path}: its voxel data file {raw.name} is missing; expected {raw} next to the header "
                            f"(LUNA16 ships each scan as a .mhd + .raw pair)")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        last = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise DataError(f"{path}: cannot be read as MetaImage ({(last[-1] if last else 'unknown error').strip()[:160]}); "
                        f"expected a complete .mhd/.raw pair") from None
    if img.GetDimension() != 3:
        raise DataError(f"{path}: {img.GetDimension()}-D MetaImage; expected a 3-D volume")
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)            # ITK arrays are (z, y, x)
    direction = np.asarray(img.GetDirection(), float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing(), float)[None, :]
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    out = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    out.set_qform(affine, code=1)
    return out


def read_volume(path: str | Path) -> nib.Nifti1Image:
    """Any supported volume as a nibabel image: NIfTI as is, MetaImage and DICOM series converted (RAS affine)."""
    p = Path(path)
    if split_series_ref(p)[1] is not None:
        return _read_dicom(p)
    if p.is_dir():
        if not is_dicom_series(p):
            raise DataError(f"{p}: folder without DICOM slices; expected a DICOM series folder or a volume file")
        return _read_dicom(p)
    if is_itk(p):
        return _read_itk(p)
    return nib.load(str(p))


class SimpleITKReader(NibabelReader):
    """MONAI image reader for MetaImage volumes (LUNA16's ``.mhd`` + ``.raw``) through SimpleITK.

    Reads the file into a nibabel image with the RAS affine, then reuses MONAI's NibabelReader for the array
    and the metadata, so the volume enters the pipeline exactly as a NIfTI of the same grid would.
    Register it on a ``LoadImaged`` (``loader.register(SimpleITKReader())``): it only claims ``.mhd`` / ``.mha``.
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return bool(names) and all(is_itk(n) for n in names)

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any):
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        self.filenames = [str(n) for n in names]
        imgs = [_read_itk(Path(n)) for n in names]
        return imgs if len(imgs) > 1 else imgs[0]


# ----------------------------------------------------------------------------------------------------------
# DICOM: folders split into series, each series validated before it is read
# ----------------------------------------------------------------------------------------------------------
#: How an item names one series of a folder that holds several: ``<folder>#series=<SeriesInstanceUID>``.
SERIES_SEP = "#series="
#: Slices of one series must agree on ImageOrientationPatient within this (direction cosines).
ORIENTATION_ATOL = 1e-3
#: Every gap between neighbouring slices (along the normal) within this fraction of the median gap.
SPACING_RTOL = 0.10
#: Fewer slices than this is not a volume (a single slice, a pair): skipped.
MIN_SLICES = 3
_DICOM_TAGS = ["SeriesInstanceUID", "ImageType", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
               "Rows", "Columns", "SeriesDescription", "InstanceNumber"]


@dataclass
class DicomSeries:
    """One validated DICOM series: its slice files sorted along the normal, and the grid they form.

    ``shape`` is (columns, rows, slices); ``spacing`` (column spacing, row spacing, slice gap) in mm;
    ``affine`` maps voxel (column, row, slice) to RAS world mm (DICOM's LPS with x and y negated).
    """

    folder: Path
    uid: str
    files: list[Path]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray

    @property
    def ref(self) -> str:
        return f"{self.folder}{SERIES_SEP}{self.uid}"


@dataclass
class DicomScan:
    """What :func:`scan_dicom_folder` found: the valid series and the skipped ones as (series, reason)."""

    folder: Path
    series: list[DicomSeries] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def split_series_ref(path: str | Path) -> tuple[Path, str | None]:
    """(folder, SeriesInstanceUID or None) of a folder path or a ``<folder>#series=<uid>`` reference."""
    text = str(path)
    if SERIES_SEP in text:
        folder, uid = text.split(SERIES_SEP, 1)
        return Path(folder), uid
    return Path(text), None


def is_series_ref(path: str | Path) -> bool:
    """Whether ``path`` names a DICOM series: a folder of slices or a ``<folder>#series=<uid>`` reference."""
    folder, uid = split_series_ref(path)
    return uid is not None or (folder.is_dir() and bool(_dicom_files(folder)))


def _reason(key: str, detail: str = "") -> str:
    return f"{key} ({detail})" if detail else key


def _validate_series(folder: Path, uid: str, slices: list[tuple[Path, Any]]) -> DicomSeries | str:
    """The series as a :class:`DicomSeries`, or the reason it is skipped."""
    types = {str(t).upper() for _, ds in slices for t in (ds.get("ImageType") or [])}
    if types & {"LOCALIZER", "SCOUT"}:
        return "localizer"
    if len(slices) == 1:
        return "single slice"
    if len(slices) < MIN_SLICES:
        return _reason("too few slices", f"{len(slices)}; expected at least {MIN_SLICES}")
    try:
        iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in slices])
        ipps = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
        pixel = np.array([[float(v) for v in ds.PixelSpacing] for _, ds in slices])
        sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    except (AttributeError, TypeError, ValueError, KeyError):
        return _reason("no slice geometry", "ImageOrientationPatient / ImagePositionPatient / PixelSpacing missing")
    if iops.shape[1] != 6 or ipps.shape[1] != 3 or np.abs(iops - iops[0]).max() > ORIENTATION_ATOL:
        return "mixed orientations"
    if len(sizes) > 1 or np.abs(pixel - pixel[0]).max() > 1e-4:
        return "mixed slice sizes"
    row, col = iops[0, :3], iops[0, 3:]
    normal = np.cross(row, col)
    where = ipps @ normal
    order = np.argsort(where, kind="stable")
    gaps = np.diff(where[order])
    median = float(np.median(gaps))
    if median <= 1e-6 or gaps.min() <= 1e-6:
        return "duplicate slice positions"
    if np.abs(gaps - median).max() > SPACING_RTOL * median:
        return _reason("non-uniform slice spacing", f"gaps {gaps.min():.4g}..{gaps.max():.4g} mm, median {median:.4g}")
    rows, cols = sizes.pop()
    dr, dc = float(pixel[0, 0]), float(pixel[0, 1])           # PixelSpacing: (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row * dc                                     # voxel i: along a row (the column index)
    lps[:3, 1] = col * dr                                     # voxel j: down a column (the row index)
    lps[:3, 2] = normal * median
    lps[:3, 3] = ipps[order[0]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return DicomSeries(folder, uid, [slices[k][0] for k in order], (cols, rows, len(slices)), (dc, dr, median), affine)


_SCANS: dict[tuple, DicomScan] = {}


def scan_dicom_folder(folder: str | Path) -> DicomScan:
    """Read the headers of a folder's DICOM slices and split them into validated series.

    Slices are grouped by SeriesInstanceUID (two series in one folder are two volumes). A series is skipped,
    with its reason, when it is a localizer / scout (ImageType), has fewer than :data:`MIN_SLICES` slices,
    mixes orientations (ImageOrientationPatient beyond :data:`ORIENTATION_ATOL`) or slice sizes, or its slices
    are not evenly spaced along the normal (a gap more than :data:`SPACING_RTOL` off the median, e.g. a missing
    slice). Pixel data is not read. Results are kept per folder listing (names, sizes, times) in this process.
    """
    import pydicom

    folder = Path(folder)
    files = _dicom_files(folder)
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(folder.resolve()), stamp)
    if key in _SCANS:
        return _SCANS[key]
    scan = DicomScan(folder)
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_DICOM_TAGS)
        except Exception as exc:  # pydicom raises many types for damaged files
            scan.skipped.append((str(path), _reason("unreadable slice", " ".join(str(exc).split())[:80])))
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((path, ds))
    for uid, slices in sorted(groups.items()):
        got = _validate_series(folder, uid, slices)
        if isinstance(got, str):
            scan.skipped.append((f"{folder}{SERIES_SEP}{uid}", got))
        else:
            scan.series.append(got)
    _SCANS.clear() if len(_SCANS) > 4096 else None
    _SCANS[key] = scan
    return scan


def skip_report(name: str, scans: Sequence[DicomScan]) -> str | None:
    """One line counting the skipped series of a corpus by reason, or None when none was skipped:
    ``tcia-covid19: skipped 3 DICOM series (2 localizer, 1 non-uniform slice spacing)``."""
    counts: dict[str, int] = {}
    for scan in scans:
        for _, reason in scan.skipped:
            key = reason.split(" (")[0]
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    total = sum(counts.values())
    parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{name}: skipped {total} DICOM series ({parts})"


def dicom_series(path: str | Path) -> DicomSeries:
    """The one validated series a folder (or a ``<folder>#series=<uid>`` reference) names; DataError otherwise."""
    folder, uid = split_series_ref(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM series folder not found; expected a folder of CT slices")
    scan = scan_dicom_folder(folder)
    if uid is not None:
        found = [s for s in scan.series if s.uid == uid]
        if not found:
            why = next((r for ref, r in scan.skipped if ref == f"{folder}{SERIES_SEP}{uid}"), "not in the folder")
            raise DataError(f"{path}: DICOM series {uid} cannot be used ({why}); expected a valid series")
        return found[0]
    if len(scan.series) == 1:
        return scan.series[0]
    if not scan.series:
        why = "; ".join(sorted({r for _, r in scan.skipped})) or "no DICOM slices"
        raise DataError(f"{folder}: no usable DICOM series ({why}); expected the slices of one CT series")
    raise DataError(f"{folder}: {len(scan.series)} DICOM series in one folder; expected one (name it as "
                    f"<folder>{SERIES_SEP}<SeriesInstanceUID>)")


def _read_dicom(path: str | Path) -> nib.Nifti1Image:
    """One validated DICOM series as a volume in HU (stored value x RescaleSlope + RescaleIntercept), float32,
    slices in the order and at the spacing :func:`scan_dicom_folder` established."""
    import pydicom

    series = dicom_series(path)
    data = np.empty(series.shape, dtype=np.float32)
    for k, f in enumerate(series.files):
        try:
            ds = pydicom.dcmread(str(f))
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # damaged pixel data, a missing decoder package, ...
            text = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise DataError(f"{f}: cannot read the DICOM pixel data ({text}); expected a readable CT slice") from None
        slope = float(ds.get("RescaleSlope", 1) or 1)
        inter = float(ds.get("RescaleIntercept", 0) or 0)
        data[:, :, k] = pixels.T * slope + inter                   # (rows, columns) -> (column i, row j)
    out = nib.Nifti1Image(data, series.affine)
    out.set_qform(series.affine, code=1)
    return out


class DicomSeriesReader(NibabelReader):
    """MONAI image reader for one validated DICOM series (:func:`dicom_series`): a folder of slices or a
    ``<folder>#series=<uid>`` reference. Replaces MONAI's PydicomReader, which reads whatever slices a folder
    holds (several series, localizers, gaps) as one volume with one spacing."""

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return bool(names) and all(is_series_ref(n) for n in names)

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any):
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        self.filenames = [str(n) for n in names]
        imgs = [_read_dicom(n) for n in names]
        return imgs if len(imgs) > 1 else imgs[0]


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def _number(cid: str) -> int:
    """The trailing case number of an id (``volume-12`` -> 12, ``amos_0507`` -> 507)."""
    m = re.search(r"(\d+)$", cid)
    return int(m.group(1)) if m else -1


def _walk(root: Path, pattern: str, max_depth: int) -> list[Path]:
    """Files below ``root`` (at most ``max_depth`` folders down) whose names fully match ``pattern``."""
    rx = re.compile(pattern)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not L._is_junk(d) and depth < max_depth)
        out += [Path(dirpath) / f for f in sorted(filenames) if not L._is_junk(f) and rx.fullmatch(f)]
    return out


def _dl(layout: str, base: Path, source: Path, splits: dict, origin: dict) -> L.Datalist:
    return L.Datalist(layout=layout, base=base, source=source, splits=splits, origin=origin)


# ----------------------------------------------------------------------------------------------------------
# LiTS (challenge naming and MSD Task03 naming)
# ----------------------------------------------------------------------------------------------------------
_LITS_VOLUME = r"volume-\d+\.nii(\.gz)?"


def _locate_lits(task: Mapping[str, Any], root: Path) -> Path | None:
    return root if _walk(root, _LITS_VOLUME, 1) else None


def _read_lits(task: Mapping[str, Any], root: Path, base: Path) -> L.Datalist:
    segs = {f.name.split(".")[0].replace("segmentation-", ""): f
            for f in _walk(base, r"segmentation-\d+\.nii(\.gz)?", 1)}
    items = []
    for f in _walk(base, _LITS_VOLUME, 1):
        cid = L.case_id(f)
        seg = segs.get(cid.replace("volume-", ""))
        # A missing segmentation is named where it is expected (next to its volume) for data check to report.
        label = seg if seg is not None else f.with_name(f.name.replace("volume-", "segmentation-"))
        items.append(L._item(cid, L._resolve(base, str(f)), L._resolve(base, str(label))))
    items.sort(key=lambda it: _number(it["id"]))
    train, val, how = L._carve_val(task, items, "the volume-N files in N order", base)
    return _dl("lits", base, base, {"train": train, "val": val},
               {"train": "the volume-N files without the validation cases", "val": how})


def _locate_lits_msd(task: Mapping[str, Any], root: Path) -> Path | None:
    base = msd._locate_msd(task, root)
    if base is None or not L._list_images(base / "imagesTr", r"liver_\d+\.nii(\.gz)?"):
        return None                                   # another MSD task (its images are not liver_N)
    return base


def _read_lits_msd(task: Mapping[str, Any], root: Path, base: Path) -> L.Datalist:
    path = base / msd._msd_name(task)
    obj = L._load_json(path)
    key = (task.get("data") or {}).get("train_split") or "training"
    if key not in obj:
        raise DataError(f"{path}: missing key '{key}'; expected the MSD training list")
    items = sorted(L._json_entries(path, obj, key, base, labelled=True), key=lambda it: _number(it["id"]))
    train, val, how = L._carve_val(task, items, f"key '{key}' of {path.name} in case-number order", path)
    splits = {"train": train, "val": val}
    origin = {"train": f"key '{key}' of {path.name} without the validation cases", "val": how}
    if isinstance(obj.get("test"), list):
        splits["test"] = L._json_entries(path, obj, "test", base, labelled=False)
        origin["test"] = f"key 'test' of {path.name}"
    return _dl("lits-msd", base, path, splits, origin)


# ----------------------------------------------------------------------------------------------------------
# FLARE22 / FLARE23
# ----------------------------------------------------------------------------------------------------------
_NNUNET_IMAGE = r".+_0000\.nii(\.gz)?"


def _flare_dirs(base: Path, kind: str) -> tuple[Path, Path] | None:
    names = {"train": (("imagesTr", "labelsTr"),), "val": (("imagesVal", "labelsVal"), ("imagesVa", "labelsVa"))}
    for img, lab in names[kind]:
        if (base / img).is_dir() and (kind == "train" or (base / lab).is_dir()):
            return base / img, base / lab
    return None


def _locate_flare(task: Mapping[str, Any], root: Path) -> Path | None:
    dirs = _flare_dirs(root, "train")
    return root if dirs is not None and L._list_images(dirs[0], _NNUNET_IMAGE) else None


def _labelled(images: Path, labels: Path, base: Path) -> tuple[list[dict], int]:
    """(cases whose label file exists, number of images without one) of an nnU-Net style folder pair."""
    items, unlabelled = [], 0
    for f in L._list_images(images, _NNUNET_IMAGE):
        cid = L.case_id(f)
        ext = ".nii.gz" if f.name.endswith(".nii.gz") else ".nii"
        label = labels / f"{cid}{ext}"
        if label.is_file():
            items.append(L._item(cid, L._resolve(base, str(f)), L._resolve(base, str(label))))
        else:
            unlabelled += 1
    return items, unlabelled


def _read_flare(task: Mapping[str, Any], root: Path, base: Path) -> L.Datalist:
    img_dir, lab_dir = _flare_dirs(base, "train")  # type: ignore[misc]
    items, unlabelled = _labelled(img_dir, lab_dir, base)
    skipped = f" ({unlabelled} images without a label file left out)" if unlabelled else ""
    val_dirs = _flare_dirs(base, "val")
    if val_dirs is not None:
        val, _ = _labelled(val_dirs[0], val_dirs[1], base)
        train = items
        origin = {"train": f"labelled images in {img_dir.name}/{skipped}",
                  "val": f"labelled images in {val_dirs[0].name}/"}
    else:
        train, val, how = L._carve_val(task, items, f"labelled images in {img_dir.name}/", img_dir)
        origin = {"train": f"labelled images in {img_dir.name}/ without the validation cases{skipped}", "val": how}
    splits = {"train": train, "val": val}
    if (base / "imagesTs").is_dir():            # unlabelled images a leaderboard scores (sslbench predict --split test)
        splits["test"] = [L._item(L.case_id(f), L._resolve(base, str(f)), None)
                          for f in L._list_images(base / "imagesTs", _NNUNET_IMAGE)]
        origin["test"] = "images in imagesTs/"
    return _dl("flare23", base, img_dir, splits, origin)


# ----------------------------------------------------------------------------------------------------------
# AMOS22 (CT cases only)
# ----------------------------------------------------------------------------------------------------------
_AMOS_IMAGE = r"amos_\d+\.nii(\.gz)?"


def _locate_amos(task: Mapping[str, Any], root: Path) -> Path | None:
    for base in [root] + sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("amos")):
        if (base / "dataset.json").is_file() or L._list_images(base / "imagesTr", _AMOS_IMAGE):
            return base
    return None


def _ct_only(items: list[dict]) -> tuple[list[dict], int]:
    ct = [it for it in items if 0 <= _number(it["id"]) <= AMOS_CT_MAX_ID]
    return ct, len(items) - len(ct)


def _read_amos(task: Mapping[str, Any], root: Path, base: Path) -> L.Datalist:
    path = base / "dataset.json"
    lists: dict[str, list[dict]] = {}
    if path.is_file():
        obj = L._load_json(path)
        for split, key in (("train", "training"), ("val", "validation"), ("test", "test")):
            if isinstance(obj.get(key), list):
                lists[split] = L._json_entries(path, obj, key, base, labelled=split != "test")
        where, source = {"train": "key 'training' of dataset.json", "val": "key 'validation' of dataset.json",
                         "test": "key 'test' of dataset.json"}, path
    else:
        for split, img, lab in (("train", "imagesTr", "labelsTr"), ("val", "imagesVa", "labelsVa"),
                                ("test", "imagesTs", None)):
            if (base / img).is_dir():
                lists[split] = [L._item(L.case_id(f), L._resolve(base, str(f)),
                                        L._resolve(base, str(base / lab / f.name)) if lab else None)
                                for f in L._list_images(base / img, _AMOS_IMAGE)]
        where = {"train": "images in imagesTr/", "val": "images in imagesVa/", "test": "images in imagesTs/"}
        source = base / "imagesTr"
    if "train" not in lists:
        raise DataError(f"{source}: no AMOS training list; expected dataset.json key 'training' or imagesTr/")
    splits, origin = {}, {}
    for split, items in lists.items():
        splits[split], mri = _ct_only(items)
        origin[split] = where[split] + (f", CT ids <= {AMOS_CT_MAX_ID} only ({mri} MRI cases left out)" if mri else "")
    if "val" not in splits:
        splits["train"], splits["val"], origin["val"] = L._carve_val(task, splits["train"], where["train"], source)
    return _dl("amos22", base, source, splits, origin)


# ----------------------------------------------------------------------------------------------------------
# Pre-training corpora: TCIA COVID-19 and LUNA16 (images only)
# ----------------------------------------------------------------------------------------------------------
_TCIA_NIFTI = r"volume-covid19-A-\d+(_day\d+)?(_ct)?\.nii(\.gz)?"


def _dicom_series(root: Path, max_depth: int = 5) -> list[Path]:
    out = []
    for dirpath, dirnames, _ in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not L._is_junk(d) and depth < max_depth)
        if _dicom_files(Path(dirpath)):
            out.append(Path(dirpath))
    return out


def _locate_tcia(task: Mapping[str, Any], root: Path) -> Path | None:
    return root if (_walk(root, _TCIA_NIFTI, 2) or _dicom_series(root)) else None


def _series_id(folder: Path, base: Path) -> str:
    return "/".join(folder.relative_to(base).parts) or folder.name


def dicom_items(base: Path, folders: Sequence[Path]) -> tuple[list[dict], list[DicomScan]]:
    """(one item per valid series, the scans) of DICOM folders: a folder of one valid series is listed as the
    folder (id: its path below ``base``), one of several as ``<folder>#series=<uid>`` (id: ``<path>/<uid>``)."""
    items, scans = [], []
    for d in folders:
        scan = scan_dicom_folder(d)
        scans.append(scan)
        sid = _series_id(d, base)
        if len(scan.series) == 1:
            items.append(L._item(sid, L._resolve(base, str(d)), None))
        else:
            items += [L._item(f"{sid}/{s.uid}", L._resolve(base, str(d)) + SERIES_SEP + s.uid, None)
                      for s in scan.series]
    return items, scans


def _read_tcia(task: Mapping[str, Any], root: Path, base: Path) -> L.Datalist:
    files = _walk(base, _TCIA_NIFTI, 2)
    notes: list[str] = []
    if files:
        items = [L._item(L.case_id(f), L._resolve(base, str(f)), None) for f in files]
        items.sort(key=lambda it: it["id"])
        what = "the volume-covid19-A-* files"
    else:
        items, scans = dicom_items(base, _dicom_series(base))
        what = "the DICOM series"
        report = skip_report(str(task.get("name", "tcia-covid19")), scans)
        notes = [report] if report else []
    train, val, how = L._carve_val(task, items, f"{what} in name order", base)
    dl = _dl("tcia-covid19", base, base, {"train": train, "val": val},
             {"train": f"{what} without the validation cases", "val": how})
    dl.notes = notes
    return dl


def _locate_luna(task: Mapping[str, Any], root: Path) -> Path | None:
    for base in (root, root / "LUNA16"):
        if any(L._list_images(base / f"subset{k}", r".+\.mhd") for k in range(10)):
            return base
    return None


def _read_luna(task: Mapping[str, Any], root: Path, base: Path) -> L.Datalist:
    items = []
    for k in range(10):
        for f in L._list_images(base / f"subset{k}", r".+\.mhd"):
            items.append(L._item(f.name[: -len(".mhd")], L._resolve(base, str(f)), None))
    train, val, how = L._carve_val(task, items, "subset0..subset9 in subset and name order", base)
    return _dl("luna16", base, base, {"train": train, "val": val},
               {"train": "the .mhd scans of subset0..9 without the validation cases", "val": how})


LITS = L.Reader("ROOT/volume-N.nii or ROOT/<batch folder>/volume-N.nii", _locate_lits, _read_lits)
LITS_MSD = L.Reader("ROOT/dataset.json + imagesTr/liver_N.nii.gz (MSD Task03_Liver)", _locate_lits_msd, _read_lits_msd)
FLARE23 = L.Reader("ROOT/imagesTr/<case>_0000.nii.gz + ROOT/labelsTr/<case>.nii.gz", _locate_flare, _read_flare)
AMOS22 = L.Reader("ROOT/dataset.json or ROOT/imagesTr/amos_NNNN.nii.gz", _locate_amos, _read_amos)
TCIA_COVID19 = L.Reader("ROOT/**/volume-covid19-A-NNNN*.nii.gz or DICOM series folders", _locate_tcia, _read_tcia)
LUNA16 = L.Reader("ROOT/subset0..9/<seriesuid>.mhd", _locate_luna, _read_luna)
