"""``sslbench submit``: a run's predictions (``sslbench predict``) packed as a leaderboard expects (issue 24).

Every image of the split must have its prediction (listed in the predictions' manifest.json, its file
intact), on the image's voxel grid (same spatial shape and affine) with integer labels; the first case that
fails is refused with one line. The archive is a zip written atomically.

The packing rules, with where each was (or was not) verified; sslbench had no internet access when they were
written, only a search over stored public pages:

* ``amos22``: one zip holding ``results/amos_XXXX.nii.gz``, one prediction per image, matched one to one
  (else the submission is invalid): AMOS22 "Evaluation" page, https://amos22.grand-challenge.org/Evaluation/
  (validation phase; the test phase took Docker containers).
* ``flare23``: one zip of ``<case>.nii.gz`` at its top level. NOT verified: only the FLARE21 page
  (https://flare.grand-challenge.org/Evaluation/) was found; it says validation segmentations are uploaded
  to grand-challenge directly and the test phase takes a Docker container, without naming files.
* ``btcv``: one zip of ``<case>.nii.gz`` (the test image's name, e.g. ``img0061.nii.gz``). NOT verified: the
  Synapse BTCV submission page could not be found.
* ``msd``: one zip holding ``<TaskXX_Name>/<image name>.nii.gz``. NOT verified: the Decathlon's submission
  instructions could not be found (http://medicaldecathlon.com/ names the rolling leaderboard only).
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import DataError, RecipeError, RunError

#: leaderboard -> folder inside the archive (None: top level; "task": the MSD task folder), verified, where
RULES: dict[str, dict[str, Any]] = {
    "amos22": {"folder": "results", "verified": True, "source": "https://amos22.grand-challenge.org/Evaluation/"},
    "flare23": {"folder": None, "verified": False, "source": "not found (FLARE21's page only)"},
    "btcv": {"folder": None, "verified": False, "source": "not found"},
    "msd": {"folder": "task", "verified": False, "source": "not found"},
}


def _image_name(item: Mapping[str, Any]) -> str:
    image = item["image"] if isinstance(item["image"], str) else item["image"][0]
    name = Path(image).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def archive_name(item: Mapping[str, Any], leaderboard: str, task: Mapping[str, Any]) -> str:
    """The path of ``item``'s prediction inside the archive, per :data:`RULES`."""
    folder = RULES[leaderboard]["folder"]
    name = f"{_image_name(item)}.nii.gz"
    if folder == "task":
        task_dir = next((p.name for p in [Path(_first(item)).parent.parent] if p.name.startswith("Task")), None)
        return f"{task_dir or task['name']}/{name}"
    return f"{folder}/{name}" if folder else name


def _first(item: Mapping[str, Any]) -> str:
    return item["image"] if isinstance(item["image"], str) else item["image"][0]


def check_predictions(items: list[dict], pred_dir: Path) -> dict[str, Path]:
    """case id -> prediction file, every one present, intact, integer, on its image's grid; else one line."""
    import nibabel as nib

    from .predict import MANIFEST, sha256
    from .records import read_json

    mf = pred_dir / MANIFEST
    if not mf.is_file():
        raise RunError(f"{mf}: no predictions manifest; run sslbench predict first")
    cases = read_json(mf).get("cases", {})
    out = {}
    for item in items:
        entry = cases.get(item["id"])
        path = pred_dir / (entry or {}).get("file", f"{item['id']}.nii.gz")
        if entry is None or not path.is_file():
            raise DataError(f"{path}: prediction of case {item['id']} missing; expected one per image of the split "
                            f"({len(items)}); run sslbench predict again")
        if sha256(path) != entry.get("sha256"):
            raise DataError(f"{path}: sha256 differs from {mf.name}'s; expected the file sslbench predict wrote")
        pred, ref = nib.load(str(path)), nib.load(_first(item))
        if tuple(pred.shape) != tuple(ref.shape[:3]):
            raise DataError(f"{path}: shape {tuple(pred.shape)}; expected the image's {tuple(ref.shape[:3])} ({_first(item)})")
        if not np.allclose(pred.affine, ref.affine, atol=1e-4):
            raise DataError(f"{path}: affine differs from the image's ({_first(item)}); expected the original geometry")
        if not np.issubdtype(pred.get_data_dtype(), np.integer):
            raise DataError(f"{path}: dtype {pred.get_data_dtype()}; expected integer labels")
        out[item["id"]] = path
    return out


def pack(items: list[dict], task: Mapping[str, Any], pred_dir: str | Path, leaderboard: str, out: str | Path) -> dict:
    """Check every prediction (:func:`check_predictions`) and write the leaderboard's zip at ``out``."""
    if leaderboard not in RULES:
        raise RecipeError(f"--leaderboard: {leaderboard!r}; expected one of {', '.join(RULES)}")
    files = check_predictions(items, Path(pred_dir))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    names = []
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:   # .nii.gz: compressed already
            for item in items:
                name = archive_name(item, leaderboard, task)
                zf.write(files[item["id"]], name)
                names.append(name)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"archive": str(out), "files": names, **RULES[leaderboard]}


def submit_run(run_dir: str | Path, leaderboard: str, root: str | Path | None = None, split: str = "test",
               predictions: str | Path | None = None, out: str | Path | None = None) -> dict:
    """``sslbench submit``: the predictions of ``run_dir`` (default ``<run>/predictions/<split>``) packed."""
    from .data import layouts
    from .protocol import locate_data
    from .records import RunRecord

    record = RunRecord(run_dir)
    if not (record.path / "recipe.yaml").is_file():
        raise RunError(f"{record.path}: not a run folder (no recipe.yaml)")
    cfg = record.read_recipe()
    task = cfg["task"]
    root_path, _ = locate_data(task, root or (cfg.get("data") or {}).get("root"))
    items = layouts.read_datalist(task, root_path).get(split) or []
    if not items:
        raise DataError(f"{root_path}: no {split} images for task '{task['name']}'")
    pred_dir = Path(predictions) if predictions else record.path / "predictions" / split
    out = Path(out) if out else record.path / "submissions" / f"{leaderboard}-{split}.zip"
    return pack(items, task, pred_dir, leaderboard, out)
