"""Predictions of a fine-tuning run in the ORIGINAL image geometry (``sslbench predict``; issue 24).

Every image of a split goes through the run's own deterministic preprocessing
(:func:`sslbench.data.transforms.preprocess_transforms`, image only: test images need no label), the run's
network by sliding-window inference with the run's ROI, overlap and blending, then back through the inverse of
the preprocessing: the class probabilities (sigmoid region probabilities for a regions task) are un-cropped
(foreground crop), resampled to the original spacing (bilinear) and re-oriented (MONAI's inverse transforms,
from the MetaTensor's ``applied_operations``), and only then turned into labels (argmax, or region > 0.5), so
that the label map lies on the original voxel grid. Labels are written in the dataset's ORIGINAL label space:
the inverse of the task's ``data.label_map`` (MM-WHS 205..850), and a regions task (BraTS TC / WT / ET) is
painted back to its classes from the largest region to the smallest, each region giving the one class that
no region nested in it holds (BraTS: WT -> 2, TC -> 1, ET -> 4).

Files: ``<out>/<case id>.nii.gz``, NIfTI with the original image's header (affine, qform/sform, pixdim;
the first modality's for a multi-file image, the spatial part of a 4-D multi-channel image), integer dtype
(uint8, or int16 where a label value exceeds 255), each written atomically. ``<out>/manifest.json`` maps each
case to its file and sha256 and records the run (folder, run key, checkpoint and its digest); a second call
skips the cases the manifest lists (and whose files are still there, same sha256), so an interrupted
prediction resumes where it stopped; a folder holding another run's (or checkpoint's) predictions is refused.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .errors import DataError, RecipeError, RunError
from .store.records import new_file_mode

MANIFEST = "manifest.json"

#: channels inverted at a time (bounds the memory of a 14-class CT on its original 512 x 512 grid)
CHANNEL_CHUNK = 4


# --------------------------------------------------------------------------------------------------
# Label spaces
# --------------------------------------------------------------------------------------------------
def original_values(task: Mapping[str, Any]) -> np.ndarray:
    """``values[c]``: the dataset's original label value of class index ``c`` (inverse of data.label_map)."""
    n = len(task["classes"])
    values = np.arange(n, dtype=np.int64)
    label_map = (task.get("data") or {}).get("label_map") or {}
    for raw, idx in label_map.items():
        idx = int(idx)
        if not 0 <= idx < n:
            raise RecipeError(f"task '{task.get('name', '?')}': data.label_map {raw}: {idx}; expected a class index 0..{n - 1}")
        values[idx] = int(float(raw))
    return values


def region_paint_order(task: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(region channel, class index) pairs, largest region first: painting them in order gives the class map.

    Each region paints the one class it holds that no region nested inside it holds (BraTS: WT paints ED,
    TC paints NCR, ET paints ET). A recipe whose regions do not nest that way is refused with one line.
    """
    from .metrics import region_class_ids

    ids = [set(r) for r in region_class_ids(task)]
    names = list(task["regions"])
    order = sorted(range(len(ids)), key=lambda r: -len(ids[r]))
    out = []
    for r in order:
        inner = set().union(*[ids[q] for q in range(len(ids)) if q != r and ids[q] < ids[r]])
        own = ids[r] - inner
        if len(own) != 1:
            raise RecipeError(f"task '{task.get('name', '?')}': regions.{names[r]}: cannot be mapped back to one class "
                              f"(it holds {sorted(own)} beyond its nested regions); expected nested regions")
        out.append((r, own.pop()))
    return out


def to_original_labels(classes: np.ndarray, task: Mapping[str, Any]) -> np.ndarray:
    """A class-index map in the dataset's original label values, as the smallest integer dtype that holds them."""
    values = original_values(task)
    dtype = np.uint8 if values.min() >= 0 and values.max() <= 255 else np.int16
    return values.astype(dtype)[classes]


def regions_to_classes(masks: np.ndarray, task: Mapping[str, Any]) -> np.ndarray:
    """Class indices ``[...]`` from binary region masks ``[R, ...]`` (largest region painted first)."""
    out = np.zeros(masks.shape[1:], dtype=np.int64)
    for r, c in region_paint_order(task):
        out[masks[r] > 0] = c
    return out


# --------------------------------------------------------------------------------------------------
# Forward and inverse
# --------------------------------------------------------------------------------------------------
def invertible_preprocessing(task: Mapping[str, Any]):
    """The run's image preprocessing with its metadata kept (the last step, which drops it, left out)."""
    from monai import transforms as mt

    from .data.transforms import preprocess_transforms

    steps = list(preprocess_transforms(task, with_label=False).transforms)
    if isinstance(steps[-1], mt.EnsureTyped):
        steps = steps[:-1]
    return mt.Compose(steps)


def _image_file(item: Mapping[str, Any]) -> str:
    image = item["image"]
    return image if isinstance(image, str) else image[0]


def invert_to_original(scores: torch.Tensor, image, pre):
    """``scores`` ``[K, ...]`` on the preprocessed grid of ``image`` (its MetaTensor), on the original grid.

    Yields (first channel, float32 ``[k, X, Y, Z]`` in the original voxel order) for :data:`CHANNEL_CHUNK`
    channels at a time, each through ``pre``'s inverse: un-crop, resample (bilinear, as the image was),
    re-orient.
    """
    import copy

    from monai.data import MetaTensor

    for lo in range(0, scores.shape[0], CHANNEL_CHUNK):
        chunk = MetaTensor(scores[lo:lo + CHANNEL_CHUNK].float().cpu(), meta=copy.deepcopy(image.meta),
                           applied_operations=copy.deepcopy(image.applied_operations))
        inv = pre.inverse({"image": chunk})["image"]
        yield lo, torch.as_tensor(inv).as_subclass(torch.Tensor).numpy().astype(np.float32, copy=False)


def labels_from_scores(chunks, task: Mapping[str, Any]) -> np.ndarray:
    """Original label values from chunks of class probabilities (argmax) or region probabilities (> 0.5).

    ``chunks`` as :func:`invert_to_original` yields them; only one chunk and the running maximum are held,
    never all channels on the original grid.
    """
    if task.get("regions"):
        masks = {}
        for lo, part in chunks:
            for k in range(part.shape[0]):
                masks[lo + k] = part[k] > 0.5
        classes = regions_to_classes(np.stack([masks[r] for r in sorted(masks)]), task)
    else:
        best = classes = None
        for lo, part in chunks:
            arg, top = part.argmax(0), part.max(0)
            if best is None:
                best, classes = top, arg.astype(np.int64)
            else:
                better = top > best              # ties keep the lower class, as one argmax over all would
                best = np.where(better, top, best)
                classes = np.where(better, arg + lo, classes)
    return to_original_labels(classes, task)


def model_scores(model: torch.nn.Module, task: Mapping[str, Any], device: torch.device, bf16: bool) -> Callable:
    """``infer(case) -> [K, ...]`` probabilities: the run's sliding-window inference, softmax or sigmoid."""
    from monai.inferers import sliding_window_inference

    from .protocol import autocast
    from .tasks.segmentation import plain

    ev, roi = task["evaluate"], tuple(task["finetune"]["roi"])
    model.eval()

    @torch.no_grad()
    def infer(case: Mapping[str, Any]) -> torch.Tensor:
        image = plain(case["image"]).unsqueeze(0).to(device)
        with autocast(bf16, device):
            logits = sliding_window_inference(image, roi, ev["sw_batch_size"], model, overlap=ev["overlap"],
                                              mode=ev.get("mode", "gaussian"))
        logits = logits.float()[0]
        return torch.sigmoid(logits) if task.get("regions") else torch.softmax(logits, 0)

    return infer


def predict_item(item: Mapping[str, Any], task: Mapping[str, Any], infer: Callable, pre=None) -> tuple[np.ndarray, Any]:
    """(original label values on the original grid, the preprocessed image MetaTensor) of one item."""
    pre = pre if pre is not None else invertible_preprocessing(task)
    try:
        case = pre({"image": item["image"]})
    except Exception as exc:     # MONAI wraps reader errors: a reader's own one-line DataError, else the last line
        inner = exc
        while inner is not None and not isinstance(inner, DataError):
            inner = inner.__cause__
        if inner is not None:
            raise DataError(str(inner)) from None
        msg = str(exc).strip().splitlines()
        raise DataError(f"{_image_file(item)}: cannot be loaded and preprocessed "
                        f"({(msg[-1] if msg else type(exc).__name__)[:200]})") from None
    scores = infer(case)
    return labels_from_scores(invert_to_original(scores, case["image"], pre), task), case["image"]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    """The manifest's checksum of a file (:func:`sslbench.data.fingerprint.file_sha256`)."""
    from .data.fingerprint import file_sha256

    return file_sha256(path)


def _is_nifti(path: str) -> bool:
    return path.endswith((".nii", ".nii.gz"))


def save_prediction(labels: np.ndarray, item: Mapping[str, Any], image, path: Path) -> None:
    """Write ``labels`` as NIfTI with the original image's geometry, atomically (temporary file, then rename).

    A NIfTI source lends its header (affine, qform/sform codes, pixdim, units); any other source (MetaImage,
    DICOM) gives the affine MONAI read. The label map must have the source's spatial shape.
    """
    import nibabel as nib

    src = _image_file(item)
    if _is_nifti(src):
        ref = nib.load(src)
        shape = tuple(ref.shape[:3])
        if tuple(labels.shape) != shape:
            raise RunError(f"{src}: prediction of shape {tuple(labels.shape)} after inversion; expected the "
                           f"image's {shape}")
        header = ref.header.copy()
        header.set_data_shape(labels.shape)
        header.set_data_dtype(labels.dtype)
        header.set_slope_inter(1.0, 0.0)
        out = nib.Nifti1Image(labels, ref.affine, header)
        qform, qcode = ref.header.get_qform(coded=True)
        sform, scode = ref.header.get_sform(coded=True)
        out.set_qform(qform if qform is not None else ref.affine, code=int(qcode) if qform is not None else 1)
        out.set_sform(sform if sform is not None else ref.affine, code=int(scode) if sform is not None else 1)
    else:
        affine = np.asarray(torch.as_tensor(image.meta.get("original_affine", image.affine)), dtype=np.float64)
        out = nib.Nifti1Image(labels, affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        out.to_filename(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_name(item: Mapping[str, Any]) -> str:
    return f"{item['id']}.nii.gz"


def predict_items(items: list[dict], task: Mapping[str, Any], infer: Callable, out: Path, run_info: Mapping[str, Any],
                  progress=None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Predict every item into ``out`` (skipping those the manifest already lists); returns the manifest.

    ``run_info`` identifies what predicts (run folder, run key, checkpoint digest); a manifest in ``out`` that
    names another run or checkpoint is refused with one line.
    """
    from .store.records import atomic_write_json, read_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mf = out / MANIFEST
    manifest = read_json(mf) if mf.is_file() else None
    ident = ("run_key", "checkpoint_sha256")
    if manifest is not None:
        theirs = {k: manifest.get("run", {}).get(k) for k in ident}
        ours = {k: run_info.get(k) for k in ident}
        if theirs != ours:
            raise RunError(f"{mf}: holds predictions of another run or checkpoint ({theirs}); expected {ours}: "
                           f"choose another --out")
    else:
        manifest = {"run": dict(run_info), "task": task["name"], "cases": {}}
    manifest["label_values"] = [int(v) for v in original_values(task)]
    pre = invertible_preprocessing(task)
    todo = []
    for item in items:
        entry = manifest["cases"].get(item["id"])
        path = out / output_name(item)
        if entry and path.is_file() and sha256(path) == entry.get("sha256"):
            continue
        todo.append(item)
    skipped = len(items) - len(todo)
    if log is not None and skipped:
        log(f"{skipped} case(s) already predicted in {out}; {len(todo)} to go")
    job = progress.add_task("predict", total=len(todo), info="") if progress is not None else None
    for item in todo:
        labels, image = predict_item(item, task, infer, pre)
        path = out / output_name(item)
        save_prediction(labels, item, image, path)
        manifest["cases"][item["id"]] = {"file": path.name, "image": _image_file(item), "sha256": sha256(path),
                                         "shape": list(labels.shape), "dtype": str(labels.dtype),
                                         "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(mf, manifest)     # after every case: an interrupted call resumes after it
        if job is not None:
            progress.update(job, advance=1, info=item["id"])
    if job is not None:
        progress.remove_task(job)
    atomic_write_json(mf, manifest)
    manifest["_written"] = len(todo)
    manifest["_skipped"] = skipped
    return manifest


# --------------------------------------------------------------------------------------------------
# A run's predictions
# --------------------------------------------------------------------------------------------------
def predict_run(run_dir: str | Path, root: str | Path | None = None, split: str = "test", out: str | Path | None = None,
                checkpoint: str | None = None, console=None) -> dict[str, Any]:
    """``sslbench predict``: the run's model on every image of ``split``, written in the original geometry.

    ``out`` defaults to ``<run>/predictions/<split>``. Returns the manifest (with ``out``, ``_written`` and
    ``_skipped``).
    """
    from .models.backbones import build_model
    from .data.locate import locate_data
    from .protocol import file_digest, make_progress, select_device, use_bf16, use_run_attention
    from . import tasks
    from .recipes import input_channels, output_channels
    from .data import layouts
    from .store.records import RunRecord, load_state

    record = RunRecord(run_dir)
    if not (record.path / "recipe.yaml").is_file():
        raise RunError(f"{record.path}: not a run folder (no recipe.yaml)")
    cfg = record.read_recipe()
    task = cfg["task"]
    kind = tasks.kind_of(task)
    if not (kind.volumes and kind.label_maps):   # sliding windows over volumes, label maps written back
        raise RecipeError(f"{record.path}: predict writes segmentations; this is a {task['kind']} run")
    if split not in ("train", "val", "test"):
        raise RecipeError(f"--split: {split!r}; expected test, val or train")
    root_path, _ = locate_data(task, root or (cfg.get("data") or {}).get("root"))
    splits = layouts.read_datalist(task, root_path)
    items = splits.get(split) or []
    if not items:
        raise DataError(f"{root_path}: no {split} images for task '{task['name']}'")
    ckpt = Path(checkpoint) if checkpoint else next((p for p in (record.ckpt_dir / "best.pt", record.ckpt_dir / "last.pt")
                                                    if p.is_file()), None)
    if ckpt is None or not ckpt.is_file():
        raise RunError(f"{record.path}/checkpoints: no best.pt or last.pt to predict with")
    run_cfg = dict(cfg["run"])
    device = select_device(run_cfg)
    bf16 = use_bf16(run_cfg, device)
    model = build_model(cfg["model"], input_channels(task), output_channels(task), img_size=tuple(task["finetune"]["roi"]))
    use_run_attention(model, run_cfg)
    model.load_state_dict(load_state(ckpt)["model"])
    model.to(device)
    status = record.status or {}
    run_info = {"run_dir": str(record.path.resolve()), "run_key": status.get("run_key"),
                "run_hash": record.path.name, "checkpoint": str(ckpt), "checkpoint_sha256": sha256(ckpt),
                "checkpoint_digest": file_digest(ckpt), "split": split, "data_root": str(root_path)}
    out_path = Path(out) if out else record.path / "predictions" / split
    say = console.print if console is not None else print
    progress = make_progress(console)
    with progress:
        manifest = predict_items(items, task, model_scores(model, task, device, bf16), out_path, run_info,
                                 progress=progress, log=say)
    manifest["out"] = str(out_path)
    return manifest


# --------------------------------------------------------------------------------------------------
# Scores in the original space (``sslbench evaluate RUN --space original``)
# --------------------------------------------------------------------------------------------------
def original_to_classes(values: np.ndarray, task: Mapping[str, Any], source: str) -> np.ndarray:
    """Class indices of a label map in the dataset's original values (``source`` names the file on a bad value)."""
    lut = {int(v): c for c, v in enumerate(original_values(task))}
    values = np.rint(np.asarray(values)).astype(np.int64)
    uniq = np.unique(values)
    bad = [int(v) for v in uniq if int(v) not in lut]
    if bad:
        raise DataError(f"{source}: label values {bad[:8]} outside the task's {sorted(lut)}")
    out = np.zeros(values.shape, np.int64)
    for v in uniq:
        out[values == v] = lut[int(v)]
    return out


def score_original(items: list[dict], task: Mapping[str, Any], pred_dir: str | Path) -> list[dict]:
    """Per-case scores of the predictions in ``pred_dir`` against the original label files, on the original grid.

    :func:`sslbench.metrics.case_scores` as the run's own evaluation (Dice, and NSD at ``evaluate.nsd_tolerance``
    mm / HD95 where the task scores them, the same empty-set rules), but at each label file's own voxel
    spacing (its header's pixdim) instead of ``preprocess.spacing``.
    """
    import nibabel as nib

    from .metrics import case_scores, truth_masks

    rows = []
    for item in items:
        if not item.get("label"):
            raise DataError(f"{_image_file(item)}: no label file; --space original scores labelled cases only")
        truth_img = nib.load(item["label"])
        pred_path = Path(pred_dir) / output_name(item)
        pred = original_to_classes(np.asarray(nib.load(str(pred_path)).dataobj), task, str(pred_path))
        truth = original_to_classes(np.asarray(truth_img.dataobj), task, item["label"])
        if pred.shape != truth.shape:
            raise DataError(f"{pred_path}: shape {pred.shape}; expected the label's {truth.shape} ({item['label']})")
        spacing = [float(z) for z in truth_img.header.get_zooms()[:3]]
        local = {**task, "preprocess": {**task["preprocess"], "spacing": spacing}}
        p = truth_masks(torch.as_tensor(pred)[None, None], task)
        t = truth_masks(torch.as_tensor(truth)[None, None], task)
        rows.append({"case": item["id"], **case_scores(p, t, local)})
    return rows


def evaluate_original(run_dir: str | Path, root: str | Path | None = None, checkpoint: str | None = None,
                      console=None) -> dict[str, Any]:
    """Predict the validation split into ``<run>/predictions/val`` (resumable) and score it in the original space.

    Writes ``<run>/evaluation-original.json`` (same fields as evaluation.json, ``space: original``, the
    ``scoring`` block with ``spacing_mm: "each label file's own"``).
    """
    from .data import layouts
    from .metrics import score_names, scoring
    from .data.locate import locate_data
    from .tasks.segmentation import summarize
    from .store.records import RunRecord, atomic_write_json

    manifest = predict_run(run_dir, root=root, split="val", checkpoint=checkpoint, console=console)
    record = RunRecord(run_dir)
    task = record.read_recipe()["task"]
    root_path, phantom = locate_data(task, manifest["run"]["data_root"])
    items = layouts.read_datalist(task, root_path)["val"]
    rows = score_original(items, task, manifest["out"])
    out = {"checkpoint": manifest["run"]["checkpoint"], "space": "original", "phantom": phantom or bool(task.get("phantom")),
           "predictions": manifest["out"], "scoring": {**scoring(task), "spacing_mm": "each label file's own"},
           **summarize(rows, score_names(task)), "cases": rows}
    out["written"] = str(record.path / "evaluation-original.json")
    atomic_write_json(record.path / "evaluation-original.json", out)
    return out
