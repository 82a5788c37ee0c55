"""Classification datasets: CC-CCII (3D, slice folders) and NIH ChestX-ray14 (2D), readers and phantom twins.

Readers (registered in :data:`sslbench.data.layouts.LAYOUTS` as ``ccccii`` and ``chestxray14``) turn the
distributed layouts into datalists whose items are ``{"id", "image", "label", "patient"}``; ``label`` is a
class index (CC-CCII) or a 0/1 list over the 14 findings (ChestX-ray14), and CC-CCII items also carry their
``slices`` (sorted slice files). Phantom writers (registered in :mod:`sslbench.data.phantom`) write miniature
trees of the same layouts whose classes differ in learnable, anatomically placed patterns.

* **CC-CCII** (Zhang et al., Cell 2020): ``{NCP,CP,Normal}/<patient_id>/<scan_id>/<slices>.png|.jpg`` and
  ``unzip_filenames.csv`` (zip_file, label, patient_id, scan_id, n_slice). The split is one of the three
  fold CSVs of the official VoCo fine-tuning code (``CC_CCII_fold{k}_{train,valid}.csv``: zip_file, target,
  label, patient_id, scan_id, ...; target 0 Normal, 1 CP, 2 NCP), looked up in ``data.folds_dir``, ``csv/``
  or the root. Without them sslbench uses its own deterministic, class-stratified, patient-disjoint 3-fold
  split and records that it did.
* **NIH ChestX-ray14** (Wang et al., CVPR 2017): ``images/*.png`` or ``images_NNN/images/*.png``,
  ``Data_Entry_2017.csv`` (Finding Labels joined with ``|``, or ``No Finding``), ``train_val_list.txt`` and
  ``test_list.txt``. The VoCo supplement (Sec. 3.2, following PCRL) pre-trains on 60% of the images and
  fine-tunes on the rest, patient-disjoint: sslbench puts whole patients of ``train_val_list.txt`` in the
  ``pretrain`` split (a fixed permutation of the sorted patient ids, until ``data.pretrain_fraction`` of all
  images is reached), fine-tunes on the remaining ``train_val_list.txt`` patients and evaluates on
  ``test_list.txt``.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Sequence

import numpy as np

from sslbench.errors import DataError

#: CC-CCII classes in the order of the official fold CSVs' ``target`` column.
CCCCII_CLASSES = ("Normal", "CP", "NCP")
#: The 14 ChestX-ray14 findings (Wang et al. 2017), in the order of the benchmark's tables.
CHESTXRAY_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                      "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                      "Hernia")
NO_FINDING = "No Finding"
_SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
_FOLD_FILE = "CC_CCII_fold{fold}_{part}.csv"


def _junk(name: str) -> bool:
    """macOS archive junk (``._x``, ``.DS_Store``, ``__MACOSX``) and other hidden entries."""
    return name.startswith(".") or name == "__MACOSX"


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted((p for p in folder.iterdir() if p.is_dir() and not _junk(p.name)), key=lambda p: _natural(p.name))
    except OSError:
        return []


def _natural(name: str) -> tuple:
    """Natural sort key: ``slice2`` before ``slice10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _read_csv(path: Path, required: Sequence[str]):
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({' '.join(str(exc).split())[:160]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}'; expected columns {', '.join(required)}")
    return df


# ----------------------------------------------------------------------------------------------------------
# CC-CCII
# ----------------------------------------------------------------------------------------------------------
def list_slices(scan_dir: Path) -> tuple[list[str], str | None]:
    """The slice files of one scan folder in slice order, and a problem line (or None).

    Slices are ``*.png`` / ``*.jpg`` (junk skipped), ordered by the number in their name. A folder without
    slices, or numbered slices with a gap (a slice missing from the download), is a problem.
    """
    try:
        names = [n for n in os.listdir(scan_dir) if not _junk(n) and n.lower().endswith(_SLICE_SUFFIXES)]
    except OSError as exc:
        return [], f"{scan_dir}: cannot be listed ({exc.strerror or exc}); expected a folder of slice images"
    if not names:
        return [], f"{scan_dir}: no slice images; expected *.png or *.jpg slices"
    names.sort(key=_natural)
    numbers = [re.findall(r"\d+", Path(n).stem) for n in names]
    if all(numbers):
        idx = [int(m[-1]) for m in numbers]
        for a, b, name_a, name_b in zip(idx, idx[1:], names, names[1:]):
            if b != a + 1:
                return [], (f"{scan_dir}: slice numbers jump from {name_a} to {name_b} ({b - a - 1} missing); "
                            f"expected consecutive slices")
    return [str(scan_dir / n) for n in names], None


def _locate_ccccii(task: Mapping[str, Any], root: Path) -> Path | None:
    return root if any((root / c).is_dir() for c in CCCCII_CLASSES) else None


def _ccccii_scans(base: Path) -> tuple[list[dict], list[str]]:
    """Every scan folder under base/<class>/<patient>/<scan>/ as an item, and the problems of their slices."""
    items, problems = [], []
    for label, cls in enumerate(CCCCII_CLASSES):
        for patient in _subdirs(base / cls):
            for scan in _subdirs(patient):
                slices, problem = list_slices(scan)
                if problem:
                    problems.append(problem)
                items.append({"id": f"p{patient.name}-s{scan.name}", "image": str(scan), "label": label,
                              "class": cls, "patient": patient.name, "slices": slices})
    return items, problems


def _check_n_slice(base: Path, items: list[dict]) -> tuple[list[str], list[str]]:
    """Problems (slice counts that disagree with unzip_filenames.csv) and notes (listed scans not on disk)."""
    path = base / "unzip_filenames.csv"
    if not path.is_file():
        return [], []
    df = _read_csv(path, ("label", "patient_id", "scan_id", "n_slice"))
    found = {(it["class"], it["patient"], os.path.basename(it["image"])): it for it in items}
    problems, absent = [], 0
    for i, row in enumerate(df.itertuples(index=False), start=2):
        key = (row.label.strip(), row.patient_id.strip(), row.scan_id.strip())
        it = found.get(key)
        if it is None:
            absent += 1
            continue
        try:
            want = int(float(row.n_slice))
        except ValueError:
            problems.append(f"{path} line {i}: n_slice {row.n_slice!r}; expected an integer")
            continue
        if it["slices"] and len(it["slices"]) != want:
            problems.append(f"{it['image']}: {len(it['slices'])} slices, but {path.name} line {i} lists {want}; "
                            f"expected every slice of the scan (incomplete download?)")
    notes = [f"{path}: {absent} listed scans are not under {base}"] if absent else []
    return problems, notes


def _find_folds(task: Mapping[str, Any], base: Path, fold: int) -> tuple[Path, Path] | None:
    data = task.get("data") or {}
    folders = []
    if data.get("folds_dir"):
        d = Path(str(data["folds_dir"])).expanduser()
        folders.append(d if d.is_absolute() else base / d)
    folders += [base / "csv", base]
    for folder in folders:
        train = folder / _FOLD_FILE.format(fold=fold, part="train")
        valid = folder / _FOLD_FILE.format(fold=fold, part="valid")
        if train.is_file() and valid.is_file():
            return train, valid
    return None


def _fold_items(path: Path, by_key: dict[tuple[str, str], dict]) -> list[dict]:
    df = _read_csv(path, ("patient_id", "scan_id", "label"))
    out = []
    for i, row in enumerate(df.itertuples(index=False), start=2):
        key = (row.patient_id.strip(), row.scan_id.strip())
        it = by_key.get(key)
        if it is None:
            raise DataError(f"{path} line {i}: scan p{key[0]}-s{key[1]} ({row.label}) is not under the dataset root; "
                            f"expected the folder {row.label}/{key[0]}/{key[1]}/")
        if it["class"] != row.label.strip():
            raise DataError(f"{path} line {i}: scan p{key[0]}-s{key[1]} is labelled {row.label!r} but lies in "
                            f"{it['class']}/; expected the same class")
        target = str(getattr(row, "target", it["label"])).strip()    # the class index VoCo's code trains on
        if target != str(it["label"]):
            raise DataError(f"{path} line {i}: target {target!r} of scan p{key[0]}-s{key[1]} ({it['class']}) is not "
                            f"its class index; expected {it['label']} "
                            f"({', '.join(f'{k} {c}' for k, c in enumerate(CCCCII_CLASSES))})")
        out.append(it)
    return out


def patient_folds(items: list[dict], k: int = 3) -> dict[str, int]:
    """A deterministic, class-stratified, patient-disjoint k-fold assignment {patient key: fold}.

    Within each class, the sorted patient ids are permuted with a fixed seed and dealt out round-robin.
    """
    out: dict[str, int] = {}
    for label in sorted({it["label"] for it in items}):
        patients = sorted({it["patient"] for it in items if it["label"] == label}, key=_natural)
        order = np.random.default_rng(label).permutation(len(patients))
        for n, j in enumerate(order):
            out[f"{label}:{patients[j]}"] = (n + label) % k
    return out


def _read_ccccii(task: Mapping[str, Any], root: Path, base: Path):
    from sslbench.data.layouts import Datalist

    items, problems = _ccccii_scans(base)
    if problems:
        more = f" (and {len(problems) - 1} more; run `sslbench data check`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    more_problems, _ = _check_n_slice(base, items)
    if more_problems:
        raise DataError(more_problems[0])
    fold = int((task.get("data") or {}).get("val_fold") or 0)
    files = _find_folds(task, base, fold)
    if files is not None:
        by_key = {(it["patient"], os.path.basename(it["image"])): it for it in items}
        train, val = _fold_items(files[0], by_key), _fold_items(files[1], by_key)
        origin = {"train": f"{files[0]}", "val": f"{files[1]}"}
        source = files[0]
    else:
        folds = patient_folds(items)
        train = [it for it in items if folds[f"{it['label']}:{it['patient']}"] != fold]
        val = [it for it in items if folds[f"{it['label']}:{it['patient']}"] == fold]
        how = (f"no {_FOLD_FILE.format(fold=fold, part='train')} found: sslbench's class-stratified, "
               f"patient-disjoint 3-fold split, fold {fold}")
        origin = {"train": how, "val": how}
        source = base
    return Datalist(layout="ccccii", base=base, source=source, splits={"train": train, "val": val}, origin=origin)


def load_scan(slices: Sequence[str], size: Sequence[int], center_crop: float = 1.0) -> np.ndarray:
    """One CC-CCII scan as a uint8 volume [D, H, W] of ``size``.

    The 8-bit slices are stacked in slice order, the central ``center_crop`` fraction of each slice kept
    (VoCo's CC-CCII code keeps the central 384 of 512 pixels, 0.75) and the stack resized (trilinear) to
    ``size``; VoCo resizes the slices to 256 x 256.
    """
    from PIL import Image

    planes = []
    for f in slices:
        try:
            with Image.open(f) as im:
                planes.append(np.asarray(im.convert("L")))
        except (OSError, ValueError) as exc:
            raise DataError(f"{f}: cannot be read as an image ({' '.join(str(exc).split())[:120]}); "
                            f"expected an 8-bit PNG/JPG slice") from None
        if planes[-1].shape != planes[0].shape:
            raise DataError(f"{f}: slice of {planes[-1].shape[0]}x{planes[-1].shape[1]} pixels in a scan of "
                            f"{planes[0].shape[0]}x{planes[0].shape[1]}; expected equal slice sizes")
    if not planes:
        raise DataError("load_scan: no slices given; expected at least one slice file")
    vol = np.stack(planes)
    return _crop_resize(vol, size, center_crop)


def _crop_resize(arr: np.ndarray, size: Sequence[int], center_crop: float) -> np.ndarray:
    """Keep the central fraction of the last two axes, resize to ``size`` (linear), return uint8."""
    import torch
    import torch.nn.functional as F

    h, w = arr.shape[-2:]
    ch, cw = max(1, round(h * center_crop)), max(1, round(w * center_crop))
    top, left = (h - ch) // 2, (w - cw) // 2
    arr = arr[..., top:top + ch, left:left + cw]
    t = torch.from_numpy(np.array(arr, dtype=np.float32))[None, None]
    mode = "trilinear" if arr.ndim == 3 else "bilinear"
    out = F.interpolate(t, size=tuple(int(s) for s in size), mode=mode, align_corners=False)
    return out[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------------------------------------
# NIH ChestX-ray14
# ----------------------------------------------------------------------------------------------------------
_ENTRY_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")


def _locate_chestxray(task: Mapping[str, Any], root: Path) -> Path | None:
    return root if any((root / n).is_file() for n in _ENTRY_FILES) else None


def _image_index(base: Path) -> dict[str, str]:
    """{image file name: path} over ``images/`` and ``images_NNN/images/`` (and ``images_NNN/``)."""
    folders = [base / "images"]
    for d in sorted(base.glob("images_*")):
        if d.is_dir():
            folders += [d / "images", d]
    index: dict[str, str] = {}
    for folder in folders:
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.lower().endswith(".png") and not _junk(e.name):
                        index.setdefault(e.name, e.path)
        except OSError:
            continue
    return index


def parse_findings(text: str, where: str) -> list[int]:
    """'Effusion|Mass' -> a 0/1 list over :data:`CHESTXRAY_FINDINGS`; 'No Finding' -> all zeros."""
    out = [0] * len(CHESTXRAY_FINDINGS)
    names = [t.strip() for t in str(text).split("|") if t.strip()]
    if not names:
        raise DataError(f"{where}: empty Finding Labels; expected findings joined with '|' or '{NO_FINDING}'")
    for name in names:
        if name == NO_FINDING:
            continue
        if name not in CHESTXRAY_FINDINGS:
            raise DataError(f"{where}: unknown finding {name!r}; expected '{NO_FINDING}' or one of "
                            f"{', '.join(CHESTXRAY_FINDINGS)}")
        out[CHESTXRAY_FINDINGS.index(name)] = 1
    return out


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: split list not found; expected the official {path.name} (one image name a line)")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def pretrain_patients(patients: Mapping[str, int], total: int, fraction: float) -> set[str]:
    """Whole patients (from a fixed permutation of the sorted ids) until ``fraction`` of ``total`` images.

    ``patients`` maps patient id -> number of images; deterministic for given inputs.
    """
    ids = sorted(patients, key=_natural)
    order = np.random.default_rng(0).permutation(len(ids))
    chosen, count, goal = set(), 0, fraction * total
    for j in order:
        if count >= goal:
            break
        chosen.add(ids[j])
        count += patients[ids[j]]
    return chosen


def _read_chestxray(task: Mapping[str, Any], root: Path, base: Path):
    from sslbench.data.layouts import Datalist

    entry = next(base / n for n in _ENTRY_FILES if (base / n).is_file())
    df = _read_csv(entry, ("Image Index", "Finding Labels", "Patient ID"))
    index = _image_index(base)
    rows: dict[str, dict] = {}
    for i, row in enumerate(df[["Image Index", "Finding Labels", "Patient ID"]].itertuples(index=False), start=2):
        name, findings, patient = (str(v).strip() for v in row)
        label = parse_findings(findings, f"{entry} line {i} ({name})")
        rows[name] = {"id": Path(name).stem, "image": index.get(name, str(base / "images" / name)), "label": label,
                      "patient": str(int(patient)) if patient.isdigit() else patient}
    split_items = {}
    for part, fname in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        names = _read_list(base / fname)
        unknown = [n for n in names if n not in rows]
        if unknown:
            raise DataError(f"{base / fname}: image {unknown[0]} is not in {entry.name}"
                            f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; expected listed images")
        split_items[part] = [rows[n] for n in names]
    shared = {it["patient"] for it in split_items["train_val"]} & {it["patient"] for it in split_items["test"]}
    if shared:
        raise DataError(f"{base / 'test_list.txt'}: patient {sorted(shared, key=_natural)[0]} also has images in "
                        f"train_val_list.txt; expected patient-disjoint lists")
    fraction = float((task.get("data") or {}).get("pretrain_fraction", 0.6))
    counts: dict[str, int] = {}
    for it in split_items["train_val"]:
        counts[it["patient"]] = counts.get(it["patient"], 0) + 1
    total = len(split_items["train_val"]) + len(split_items["test"])
    pre = pretrain_patients(counts, total, fraction)
    splits = {"pretrain": [it for it in split_items["train_val"] if it["patient"] in pre],
              "train": [it for it in split_items["train_val"] if it["patient"] not in pre],
              "val": split_items["test"]}
    how = (f"whole patients of train_val_list.txt (fixed permutation) up to {fraction:.0%} of all images")
    origin = {"pretrain": how, "train": "the other patients of train_val_list.txt", "val": "test_list.txt"}
    return Datalist(layout="chestxray14", base=base, source=entry, splits=splits, origin=origin)


def load_radiograph(path: str, size: Sequence[int]) -> np.ndarray:
    """One radiograph as uint8 [H, W] of ``size`` (grey; RGBA files of the release converted to grey)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as an image ({' '.join(str(exc).split())[:120]}); "
                        f"expected a grey PNG radiograph") from None
    return _crop_resize(arr, size, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Loading a split for training (threads: PIL decodes without holding the GIL)
# ----------------------------------------------------------------------------------------------------------
def load_split(task: Mapping[str, Any], items: list[dict], progress=None, desc: str = "load") -> "np.ndarray":
    """All images of a split as one uint8 array [N, *size] (scans or radiographs), in item order."""
    from concurrent.futures import ThreadPoolExecutor

    pre = task["preprocess"]
    size = tuple(int(s) for s in pre["size"])
    if task["kind"] == "classification":
        fn = lambda it: load_scan(it["slices"], size, float(pre.get("center_crop", 1.0)))  # noqa: E731
    else:
        fn = lambda it: load_radiograph(it["image"], size)  # noqa: E731
    out = np.empty((len(items), *size), dtype=np.uint8)
    job = progress.add_task(desc, total=len(items), info="") if progress is not None else None
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for i, arr in enumerate(pool.map(fn, items)):
            out[i] = arr
            if job is not None:
                progress.advance(job)
    if job is not None:
        progress.remove_task(job)
    return out


# ----------------------------------------------------------------------------------------------------------
# `sslbench data check` for classification tasks
# ----------------------------------------------------------------------------------------------------------
def check_dataset(task: Mapping[str, Any], root: Path):
    """Validate a CC-CCII or ChestX-ray14 tree: layout, splits, every image readable, slice completeness.

    Returns :class:`sslbench.data.check.CheckReport` rows compatible with its summary table: ``shape`` is
    the stored size (slices x height x width, or height x width), ``classes`` counts the case per class
    (CC-CCII) or per finding (ChestX-ray14), ``intensity`` the 8-bit grey range.
    """
    from PIL import Image

    from sslbench.data import check as check_mod
    from sslbench.data import layouts

    root = Path(root).expanduser()
    classes = list(task.get("classes") or [])
    report = check_mod.CheckReport(root=root, task=str(task.get("name", "?")), classes=classes)
    report.phantom, unfinished = check_mod._phantom_state(root)
    try:
        name, base = layouts._find(task, root)
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
        dl = layouts.LAYOUTS[name].read(task, layouts._absolute(root), base)
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
                    report.problems.append(f"{f}: cannot be read as an image ({check_mod._one_line(exc)}); "
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


# ----------------------------------------------------------------------------------------------------------
# Phantom twins
# ----------------------------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _blob(u: np.ndarray, v: np.ndarray, w: np.ndarray | float, c: Sequence[float], r: Sequence[float]) -> np.ndarray:
    """A soft-edged ellipsoid (1 inside, smooth fall-off over ~15% of the radius) on a broadcast grid."""
    d = ((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2 + ((w - c[2]) / r[2]) ** 2 if len(c) == 3 else \
        ((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2
    return np.clip((1.0 - np.sqrt(d)) / 0.15, 0.0, 1.0)


def ct_chest_scan(rng: np.random.Generator, cls: str, size: int = 96, depth: tuple[int, int] = (20, 32)) -> np.ndarray:
    """An 8-bit lung-window chest CT slice stack [D, size, size] with a class-specific lung pattern.

    Anatomy (in-plane u right-left, v anterior(-)-posterior(+), w apex (0) to base (1)): body outline with a fat
    rim, two lungs widening towards the base above a diaphragm dome, mediastinum and heart, descending aorta,
    vertebra, ribs, lung vessels. Patterns, inside the lungs only: ``Normal`` clear lungs; ``CP`` (common
    pneumonia) 1-2 dense lobar consolidations, central to lower, mostly one-sided; ``NCP`` (COVID-19)
    several faint bilateral ground-glass opacities in the subpleural periphery (lateral and posterior).
    """
    d = int(rng.integers(depth[0], depth[1] + 1))
    ax = np.linspace(-1, 1, size, dtype=np.float32)
    u, v = ax[None, None, :], ax[None, :, None]
    w = np.linspace(0, 1, d, dtype=np.float32)[:, None, None]
    sx, sy = rng.uniform(0.8, 0.9), rng.uniform(0.58, 0.66)
    body = _blob(u, v, 0.0, (0, 0.02), (sx, sy))
    inner = _blob(u, v, 0.0, (0, 0.02), (sx - 0.06, sy - 0.05))
    img = 8 + body * 92 + inner * 20                              # fat rim ~100, muscle/soft tissue ~120
    grow = np.sqrt(np.clip(np.sin(np.pi * (0.08 + 0.9 * w)), 0, 1))  # lungs small at the apex, wide at the base
    dome = (w < 0.88 - 0.25 * (u ** 2))                            # diaphragm dome cuts the lung base
    lungs = np.zeros((d, size, size), np.float32)
    for side in (-1, 1):
        cu = side * rng.uniform(0.34, 0.40)
        lung = _blob(u, v, 0.0, (cu, 0.0), (0.25 * grow + 0.02, 0.40 * grow + 0.02)) * dome
        lungs = np.maximum(lungs, lung)
    heart = _blob(u, v, w, (rng.uniform(-0.02, 0.08), -0.1, 0.72), (0.24, 0.22, 0.3))
    lungs = lungs * (1 - heart)
    img = img * (1 - lungs) + 22 * lungs
    img = img + heart * 10
    img = np.maximum(img, 160 * _blob(u, v, 0.0, (-0.08, 0.25), (0.07, 0.07)))    # descending aorta
    img = np.maximum(img, 235 * _blob(u, v, 0.0, (0.0, 0.48), (0.10, 0.09)))      # vertebral body
    ang = np.linspace(0, 2 * np.pi, 14, endpoint=False) + rng.uniform(0, 0.3)
    rib_on = ((w * d).astype(int) % 3 != 0)
    for a in ang:
        c = ((sx - 0.04) * np.cos(a), (sy - 0.03) * np.sin(a) + 0.02)
        img = np.maximum(img, 220 * _blob(u, v, 0.0, c, (0.035, 0.03)) * rib_on)
    for _ in range(int(rng.integers(10, 16))):                     # vessels: tubes running along the z axis
        c = (rng.uniform(-0.6, 0.6), rng.uniform(-0.3, 0.3))
        img = img + 45 * _blob(u, v, 0.0, c, (0.025, 0.025)) * lungs
    pattern = np.zeros_like(img)
    if cls == "CP":
        for _ in range(int(rng.integers(1, 3))):
            side = 1 if rng.random() < 0.7 else -1
            c = (side * rng.uniform(0.3, 0.4), rng.uniform(-0.1, 0.2), rng.uniform(0.45, 0.8))
            pattern = np.maximum(pattern, _blob(u, v, w, c, (0.16, 0.2, 0.25)) * 105)
    elif cls == "NCP":
        for _ in range(int(rng.integers(5, 9))):
            side = -1 if _ % 2 else 1
            a = rng.uniform(-0.6, 1.2)                             # lateral to posterior rim of the lung
            c = (side * (0.38 + 0.2 * np.cos(a)), 0.35 * np.sin(a) + 0.05, rng.uniform(0.25, 0.85))
            pattern = np.maximum(pattern, _blob(u, v, w, c, (0.14, 0.14, 0.18)) * 62)
    img = img + pattern * lungs
    img = img + rng.normal(0, 5, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_ccccii(job) -> None:
    """CC-CCII tree: {NCP,CP,Normal}/<patient>/<scan>/NNNN.png, unzip_filenames.csv, csv/ fold files.

    ``job.cases`` patients, classes dealt round-robin (NCP, CP, Normal); every fourth patient has two scans
    (as many real patients do). The fold CSVs follow VoCo's columns and are class-stratified and
    patient-disjoint.
    """
    from sslbench.data.phantom import _write_atomic

    rng = np.random.default_rng(np.random.SeedSequence([int(job.seed), 31]))
    root: Path = job.root
    order = ("NCP", "CP", "Normal")
    scans, next_scan = [], 1000
    patient_ids = rng.choice(np.arange(1, 10 * job.cases + 10), size=job.cases, replace=False)
    for i in range(job.cases):
        cls, pid = order[i % 3], int(patient_ids[i])
        for _ in range(2 if i % 4 == 1 else 1):     # every fourth patient, of each class in turn
            next_scan += int(rng.integers(1, 4))
            vol = ct_chest_scan(np.random.default_rng(np.random.SeedSequence([int(job.seed), 32, next_scan])), cls)
            folder = root / cls / str(pid) / str(next_scan)
            for z in range(vol.shape[0]):
                _write_atomic(folder / f"{z:04d}.png", _png(vol[z]))
            scans.append({"zip_file": f"{cls}-{1 + i // 9}.zip", "label": cls, "patient_id": pid,
                          "scan_id": next_scan, "n_slice": vol.shape[0]})
    lines = ["zip_file,label,patient_id,scan_id,n_slice"]
    lines += [f"{s['zip_file']},{s['label']},{s['patient_id']},{s['scan_id']},{s['n_slice']}" for s in scans]
    _write_atomic(root / "unzip_filenames.csv", ("\n".join(lines) + "\n").encode())
    items = [{"label": CCCCII_CLASSES.index(s["label"]), "patient": str(s["patient_id"])} for s in scans]
    folds = patient_folds(items)
    per_patient: dict[int, list[int]] = {}
    for s in scans:
        per_patient.setdefault(s["patient_id"], []).append(s["scan_id"])
    for k in range(3):
        for part in ("train", "valid"):
            rows = ["zip_file,target,label,patient_id,scan_id,n_slice,scan_count,all_scan_ids"]
            for s, it in zip(scans, items):
                in_val = folds[f"{it['label']}:{it['patient']}"] == k
                if in_val == (part == "valid"):
                    ids = per_patient[s["patient_id"]]
                    rows.append(f"{s['zip_file']},{CCCCII_CLASSES.index(s['label'])},{s['label']},{s['patient_id']},"
                                f"{s['scan_id']},{s['n_slice']},{len(ids)},\"{ids}\"")
            _write_atomic(root / "csv" / _FOLD_FILE.format(fold=k, part=part), ("\n".join(rows) + "\n").encode())


def chest_radiograph(rng: np.random.Generator, findings: Sequence[str], size: int = 128) -> np.ndarray:
    """An 8-bit PA chest radiograph [size, size] with each named finding drawn where it occurs.

    Image axes: row 0 at the top (apices), column 0 on the image left = the patient's right (PA view). Normal
    anatomy: soft-tissue thorax, dark lungs, heart shadow to the image right of the midline, spine, clavicles,
    ribs as arcs, diaphragm domes. Findings (bright = dense): Atelectasis a plate-like band at a base;
    Cardiomegaly a heart wider than half the thorax; Effusion a basal opacity with a meniscus; Infiltration
    patchy mid-zone haze; Mass a large round opacity; Nodule a small round one; Pneumonia a focal lobar
    opacity; Pneumothorax a lateral dark rim without lung markings; Consolidation a dense lower-zone region;
    Edema bilateral perihilar haze; Emphysema hyperlucent lungs with low flat domes; Fibrosis peripheral
    reticular lines; Pleural_Thickening a bright band along the lateral wall; Hernia a round retrocardiac
    opacity with a gas bubble above the left dome.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1     # x: -1 image left, y: -1 top
    f = set(findings)
    img = 40 + 110 * _blob(x, y, 0.0, (0, 0.1), (0.92, 1.05))                   # thorax soft tissue
    emph = "Emphysema" in f
    dome_y = 0.62 + (0.1 if emph else 0.0) + rng.uniform(-0.03, 0.03)
    lung_mask = np.zeros_like(img)
    for side in (-1, 1):
        cx = side * 0.42
        lung = _blob(x, y, 0.0, (cx, -0.02), (0.3 + (0.04 if emph else 0), 0.62 + (0.06 if emph else 0)))
        lung *= (y < dome_y - (0.12 if not emph else 0.04) * (1 - ((x - cx) / 0.35) ** 2))
        lung_mask = np.maximum(lung_mask, lung)
    img = img - lung_mask * (85 + (25 if emph else 0))
    heart_w = 0.46 if "Cardiomegaly" in f else 0.28
    heart = _blob(x, y, 0.0, (0.12, 0.35), (heart_w, 0.26))
    img = np.maximum(img, 150 * heart * (y > 0.1))
    img = np.maximum(img, 170 * _blob(x, y, 0.0, (0, 0.0), (0.07, 1.2)))        # spine / mediastinum
    for side in (-1, 1):                                                          # clavicles
        img = np.maximum(img, 190 * _blob(x, y, 0.0, (side * 0.35, -0.68 + 0.1 * np.abs(x)), (0.35, 0.03)))
    for k in range(8):                                                            # ribs as arcs
        yy = -0.55 + k * 0.15
        arc = np.abs(y - (yy + 0.25 * x ** 2)) < 0.022
        img = img + 25 * arc * lung_mask
    for _ in range(6):                                                            # vascular markings
        c = (rng.uniform(-0.6, 0.6), rng.uniform(-0.3, 0.4))
        img = img + 12 * _blob(x, y, 0.0, c, (0.05, 0.05)) * lung_mask
    side = 1 if rng.random() < 0.5 else -1
    cx = side * 0.42
    if "Atelectasis" in f:
        img = img + 60 * (np.abs(y - 0.4 - 0.1 * (x - cx)) < 0.035) * (np.abs(x - cx) < 0.22) * lung_mask
    if "Effusion" in f:
        img = img + 60 * (y > dome_y - 0.18 + 0.25 * (np.abs(x - cx) - 0.1)) * _blob(x, y, 0.0, (cx, 0.5), (0.4, 0.5))
    if "Infiltration" in f:
        for _ in range(4):
            c = (side * rng.uniform(0.25, 0.55), rng.uniform(-0.2, 0.3))
            img = img + 35 * _blob(x, y, 0.0, c, (0.12, 0.1)) * lung_mask
    if "Mass" in f:
        c = (side * rng.uniform(0.3, 0.5), rng.uniform(-0.35, 0.25))
        img = np.maximum(img, 165 * _blob(x, y, 0.0, c, (0.13, 0.13)) * (lung_mask > 0.5))
    if "Nodule" in f:
        for _ in range(int(rng.integers(1, 3))):
            c = (rng.choice([-1, 1]) * rng.uniform(0.25, 0.55), rng.uniform(-0.45, 0.3))
            img = np.maximum(img, 170 * _blob(x, y, 0.0, c, (0.045, 0.045)) * (lung_mask > 0.5))
    if "Pneumonia" in f:
        img = img + 70 * _blob(x, y, 0.0, (cx, rng.uniform(0.1, 0.35)), (0.2, 0.16)) * lung_mask
    if "Pneumothorax" in f:
        rim = (np.abs(x - cx) > 0.2) * (y < 0.2) * (lung_mask > 0.3)
        img = img - 30 * rim
        img = img + 50 * (np.abs(np.abs(x - cx) - 0.2) < 0.012) * (y < 0.2) * (lung_mask > 0.3)
    if "Consolidation" in f:
        img = np.maximum(img, 140 * _blob(x, y, 0.0, (cx, 0.4), (0.2, 0.12)) * (lung_mask > 0.3))
    if "Edema" in f:
        for s in (-1, 1):
            img = img + 45 * _blob(x, y, 0.0, (s * 0.22, 0.05), (0.22, 0.3)) * lung_mask
    if "Fibrosis" in f:
        net = (np.sin(x * 60 + rng.uniform(0, 6)) * np.sin(y * 60) > 0.6)
        img = img + 40 * net * lung_mask * (np.abs(x) > 0.45) * (y > -0.1)
    if "Pleural_Thickening" in f:
        img = img + 70 * (np.abs(np.abs(x) - (np.abs(cx) + 0.27)) < 0.03) * (np.abs(y) < 0.45) * (x * side > 0)
    if "Hernia" in f:
        img = np.maximum(img, 175 * _blob(x, y, 0.0, (0.08, 0.48), (0.12, 0.1)))
        img = img - 50 * _blob(x, y, 0.0, (0.08, 0.44), (0.05, 0.04))
    img = img + rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_chestxray14(job) -> None:
    """ChestX-ray14 tree: images_001/images/*.png, images_002/images/*.png, Data_Entry_2017.csv, split lists.

    ``job.cases`` patients with 1-3 follow-up images each; about 40% of images show no finding, the others
    1-2 findings drawn uniformly from the 14. About a quarter of the patients are in test_list.txt.
    """
    from sslbench.data.phantom import _write_atomic

    rng = np.random.default_rng(np.random.SeedSequence([int(job.seed), 41]))
    root: Path = job.root
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    entries, train_val, test = [header], [], []
    n_test = max(1, round(job.cases / 4))
    test_patients = set(rng.choice(np.arange(1, job.cases + 1), size=n_test, replace=False).tolist())
    for pid in range(1, job.cases + 1):
        age, sex = int(rng.integers(18, 90)), ("M" if rng.random() < 0.55 else "F")
        for fu in range(int(rng.integers(1, 4))):
            name = f"{pid:08d}_{fu:03d}.png"
            findings = [] if rng.random() < 0.4 else \
                sorted(rng.choice(CHESTXRAY_FINDINGS, size=int(rng.integers(1, 3)), replace=False).tolist(),
                       key=CHESTXRAY_FINDINGS.index)
            img = chest_radiograph(np.random.default_rng(np.random.SeedSequence([int(job.seed), 42, pid, fu])),
                                   findings)
            folder = "images_001" if pid <= (job.cases + 1) // 2 else "images_002"
            _write_atomic(root / folder / "images" / name, _png(img))
            label = "|".join(findings) if findings else NO_FINDING
            entries.append(f"{name},{label},{fu},{pid},{age},{sex},PA,2500,2048,0.143,0.143,")
            (test if pid in test_patients else train_val).append(name)
    _write_atomic(root / "Data_Entry_2017.csv", ("\n".join(entries) + "\n").encode())
    _write_atomic(root / "train_val_list.txt", ("\n".join(train_val) + "\n").encode())
    _write_atomic(root / "test_list.txt", ("\n".join(test) + "\n").encode())


def register_layouts(layouts: ModuleType) -> None:
    """Add the ``ccccii`` and ``chestxray14`` layouts to :data:`sslbench.data.layouts.LAYOUTS`."""
    layouts.LAYOUTS["ccccii"] = layouts._Layout("ROOT/{NCP,CP,Normal}/<patient>/<scan>/<slices>.png|.jpg",
                                                _locate_ccccii, _read_ccccii)
    layouts.LAYOUTS["chestxray14"] = layouts._Layout(
        "ROOT/Data_Entry_2017.csv with ROOT/images/ or ROOT/images_NNN/images/", _locate_chestxray, _read_chestxray)


def register_phantoms(ph: ModuleType) -> None:
    """Register the ``ccccii`` and ``chestxray14`` phantom layouts with :mod:`sslbench.data.phantom`.

    Their writers draw their own images (no NIfTI body), so the body name only labels them.
    """
    ph._LIKES["ccccii"] = ph._Like("ct-slices", write_ccccii, ("NCP", "CP", "Normal", "unzip_filenames.csv", "csv"))
    ph._LIKES["chestxray14"] = ph._Like("radiograph", write_chestxray14,
                                        ("images", "images_001", "images_002", "Data_Entry_2017.csv",
                                         "train_val_list.txt", "test_list.txt"))
