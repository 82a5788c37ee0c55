"""The layouts of the classification datasets CC-CCII (3D, slice folders) and NIH ChestX-ray14 (2D).

Readers (in :data:`sslbench.data.layouts.READERS` as ``ccccii`` and ``chestxray14``) turn the
distributed layouts into datalists whose items are ``{"id", "image", "label", "patient"}``; ``label`` is a
class index (CC-CCII) or a 0/1 list over the 14 findings (ChestX-ray14), and CC-CCII items also carry their
``slices`` (sorted slice files). Their phantom twins are :mod:`sslbench.data.phantoms.classification`; the
images are loaded for training by :mod:`sslbench.data.classification`.

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

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sslbench.data.layouts.base import Datalist, Reader
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


CCCCII = Reader("ROOT/{NCP,CP,Normal}/<patient>/<scan>/<slices>.png|.jpg", _locate_ccccii, _read_ccccii)
CHESTXRAY14 = Reader("ROOT/Data_Entry_2017.csv with ROOT/images/ or ROOT/images_NNN/images/", _locate_chestxray,
                     _read_chestxray)
