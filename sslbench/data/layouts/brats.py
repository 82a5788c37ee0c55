"""BraTS 2021: the distributed layout, its fold file, and a skull-stripped brain MRI phantom with a tumour.

Layout as distributed (Synapse / Kaggle)::

    <root>/BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz

where ``<root>`` may also hold the case folders one level down (``RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021/``
or ``TrainingData/``). The four modalities are one case's input channels, stacked in the order of the task's
``channels`` (file suffixes, e.g. ``[flair, t1ce, t1, t2]`` as in SwinUNETR's fold file). Labels: 0
background, 1 necrotic tumour core (NCR), 2 peritumoral edema (ED), 4 enhancing tumour (ET).

Splits: with ``data.val_fold`` set, SwinUNETR's fold file (``data.datalist``, default ``brats21_folds.json`` at
the root: ``{"training": [{"fold": k, "image": [...], "label": ".../BraTS2021_xxxxx_seg.nii.gz"}, ...]}``)
decides: the cases of that fold validate, the others train (cases are matched by the BraTS2021_xxxxx id in
the paths, so the file's folder prefix does not matter). Otherwise ``data.val_last`` keeps the last N case
folders (id order) for validation.
The phantom twin (``sslbench data synth --like brats21``) is :mod:`sslbench.data.phantoms.brats`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from sslbench.data.layouts import base as L
from sslbench.errors import DataError

#: BraTS label values: 1 NCR, 2 ED, 4 ET.
NCR, ED, ET = 1, 2, 4
#: The modality suffixes of a case folder, and the default channel order (SwinUNETR's fold file).
MODALITIES = ("flair", "t1", "t1ce", "t2")
DEFAULT_CHANNELS = ("flair", "t1ce", "t1", "t2")
_CASE_RX = re.compile(r"BraTS2021_\d{5}")


# ----------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------
def _case_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and _CASE_RX.fullmatch(p.name))
    except OSError:
        return []


def locate(task: Mapping[str, Any], root: Path) -> Path | None:
    """The folder holding the BraTS2021_xxxxx case folders: the root or one folder below it."""
    if _case_dirs(root):
        return root
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return None
    found = [p for p in subs if _case_dirs(p)]
    if len(found) > 1:
        raise DataError(f"{root}: holds several folders of BraTS2021_* cases ({', '.join(p.name for p in found)}); "
                        f"expected --root to be the one to use")
    return found[0] if found else None


def channel_order(task: Mapping[str, Any]) -> list[str]:
    """The modality suffixes in channel order (``task.channels``, lower-cased)."""
    chans = [str(c).lower() for c in (task.get("channels") or DEFAULT_CHANNELS)]
    unknown = [c for c in chans if c not in MODALITIES]
    if unknown:
        raise DataError(f"task '{task.get('name', '?')}': channels: '{unknown[0]}' is not a BraTS modality; "
                        f"expected names among {', '.join(MODALITIES)}")
    return chans


def _fold_ids(task: Mapping[str, Any], root: Path, base: Path, fold: int) -> tuple[set[str], Path]:
    """The case ids of one fold of the fold file (looked up at the root, then next to the case folders)."""
    name = (task.get("data") or {}).get("datalist") or "brats21_folds.json"
    path = next((p for p in (root / name, base / name) if p.is_file()), None)
    if path is None:
        raise DataError(f"{root / name}: fold file not found; data.val_fold={fold} needs SwinUNETR's "
                        f"brats21_folds.json (or set data.val_fold to null to use data.val_last)")
    try:
        obj = json.loads(path.read_text())
        entries = obj["training"]
        ids = {m.group(0) for e in entries if int(e["fold"]) == fold
               for m in [_CASE_RX.search(str(e["label"] if e.get("label") else e["image"][0]))] if m}
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{path}: expected {{\"training\": [{{\"fold\": k, \"image\": [...], \"label\": ...}}]}} "
                        f"({type(exc).__name__}: {exc})") from None
    if not ids:
        raise DataError(f"{path}: no case has \"fold\": {fold}; expected data.val_fold to be a fold of the file")
    return ids, path


def read(task: Mapping[str, Any], root: Path, base: Path) -> L.Datalist:
    """The datalist: one item per case folder, ``image`` the list of modality files in channel order."""
    chans = channel_order(task)
    items = []
    for folder in _case_dirs(base):
        cid = folder.name
        images = [str(folder / f"{cid}_{m}.nii.gz") for m in chans]
        items.append(L._item(cid, images, str(folder / f"{cid}_seg.nii.gz")))
    fold = (task.get("data") or {}).get("val_fold")
    if fold is not None:
        ids, path = _fold_ids(task, root, base, int(fold))
        train = [it for it in items if it["id"] not in ids]
        val = [it for it in items if it["id"] in ids]
        origin = {"train": f"case folders not in fold {fold} of {path.name}", "val": f"fold {fold} of {path.name}"}
    else:
        train, val, how = L._carve_val(task, items, "the BraTS2021_* case folders", base)
        origin = {"train": "the BraTS2021_* case folders without the validation cases", "val": how}
    return L.Datalist(layout="brats", base=base, source=base, splits={"train": train, "val": val}, origin=origin)


BRATS = L.Reader("ROOT/BraTS2021_NNNNN/BraTS2021_NNNNN_{flair,t1,t1ce,t2,seg}.nii.gz (or one folder below ROOT)",
                 locate, read)
