"""``sslbench predict`` (issue 24): predictions inverted to the original grid and label values, manifest, resume.

The round trips use an oracle "network": the ground truth put through the run's forward preprocessing
(one-hot classes, or BraTS region masks, on the preprocessed grid). Predicted and inverted, it must give back
the original label map on the original grid (non-RAS, axis-permuted affines, anisotropic spacing).
"""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from sslbench import predict as P
from sslbench import recipes
from sslbench.data.transforms import preprocess_transforms
from sslbench.errors import DataError, RecipeError, RunError
from sslbench.metrics import labels_to_onehot, labels_to_regions, region_class_ids

# voxel axis 0 -> world -y (1.6 mm), axis 1 -> world -x (0.8 mm), axis 2 -> +z (2.4 mm): "PLS", not RAS.
# The tests resample to 0.8 mm: whole ratios 2, 1, 3, so that the oracle's hard (nearest) forward labels hold
# the original voxels exactly and the round trip tests the geometry alone (with other ratios a hard label map
# resampled there and back loses sub-voxel parts of small structures, whatever the inversion).
AFFINE = np.array([[0.0, -0.8, 0.0, 30.0],
                   [-1.6, 0.0, 0.0, 20.0],
                   [0.0, 0.0, 2.4, -10.0],
                   [0.0, 0.0, 0.0, 1.0]])
SHAPE = (24, 44, 16)
RUN = {"run_key": "k0", "checkpoint_sha256": "c0", "run_hash": "abc-s0"}


def _world():
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(np.float64)
    world = idx @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    centre = (np.array(SHAPE) - 1) / 2 @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    return world - centre


def _spheres(values_radii):
    """Concentric-ish balls (world mm) painted largest first: a label map in raw label values."""
    w = _world()
    lab = np.zeros(SHAPE, np.int16)
    for value, radius, shift in values_radii:
        lab[np.linalg.norm(w - np.array(shift), axis=-1) <= radius] = value
    return lab


def _save(path, data, affine=AFFINE):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def _body(channels=None, value=800.0):
    """An image whose body (an ellipsoid, > 0) is smaller than the volume, so the foreground crop acts."""
    w = _world()
    body = ((w / np.array([15.0, 13.0, 16.0])) ** 2).sum(-1) <= 1.0
    img = np.where(body, value, 0.0).astype(np.float32)
    if channels:
        img = np.stack([img * (c + 1) for c in range(channels)], -1)
    return img


def _oracle(task, items):
    """infer(case): the preprocessed ground truth of the next item, as probabilities (one-hot or regions)."""
    full = preprocess_transforms(task)
    queue = list(items)

    def infer(case):
        item = queue.pop(0)
        lab = full({"image": item["image"], "label": item["label"]})["label"]
        assert lab.shape[1:] == case["image"].shape[1:]
        lab = torch.as_tensor(lab).unsqueeze(0).long()
        ids = region_class_ids(task)
        if ids is not None:
            return labels_to_regions(lab, ids)[0]
        return labels_to_onehot(lab, len(task["classes"]))[0].float()

    return infer


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _check_round_trip(items, out, truth_values):
    for item in items:
        src = nib.load(item["image"] if isinstance(item["image"], str) else item["image"][0])
        pred = nib.load(str(out / f"{item['id']}.nii.gz"))
        truth = np.asarray(nib.load(item["label"]).dataobj)
        data = np.asarray(pred.dataobj)
        assert np.issubdtype(pred.get_data_dtype(), np.integer)
        assert data.shape == truth.shape == src.shape[:3]
        assert np.array_equal(pred.affine, src.affine)
        assert np.array_equal(pred.header.get_sform(), src.header.get_sform())
        assert np.array_equal(pred.header.get_qform(), src.header.get_qform())
        assert set(np.unique(data).tolist()) == set(np.unique(truth).tolist()) == truth_values
        for v in truth_values - {0}:
            assert _dice(data == v, truth == v) >= 0.995, (item["id"], v)


def test_label_spaces_by_hand():
    mmwhs = recipes.resolve("scratch", "mmwhs")["task"]
    assert P.original_values(mmwhs).tolist() == [0, 205, 420, 500, 550, 600, 820, 850]
    assert P.to_original_labels(np.array([[0, 1], [7, 3]]), mmwhs).tolist() == [[0, 205], [850, 500]]
    assert P.to_original_labels(np.array([1]), mmwhs).dtype == np.int16
    brats = recipes.resolve("scratch", "brats21")["task"]
    # regions TC, WT, ET: WT paints ED (class 2), TC paints NCR (class 1), ET paints ET (class 3)
    assert P.region_paint_order(brats) == [(1, 2), (0, 1), (2, 3)]
    masks = np.array([[0, 1, 1, 0, 1],      # TC
                      [0, 1, 1, 1, 1],      # WT
                      [0, 0, 1, 0, 0]])     # ET
    classes = P.regions_to_classes(masks, brats)
    assert classes.tolist() == [0, 1, 3, 2, 1]
    labels = P.to_original_labels(classes, brats)
    assert labels.tolist() == [0, 1, 4, 2, 1] and labels.dtype == np.uint8
    bad = {**brats, "regions": {"A": ["NCR", "ED"], "B": ["ET"]}}
    with pytest.raises(RecipeError, match="regions.A"):
        P.region_paint_order(bad)


def test_ct_round_trip_mmwhs_label_values_and_resume(tmp_path):
    task = recipes.resolve("scratch", "phantom-mmwhs", overrides=["task.preprocess.spacing=[0.8,0.8,0.8]"])["task"]
    items = []
    for k, shift in enumerate([(0, 0, 0), (2, -3, 4)]):
        lab = _spheres([(205, 11, shift), (500, 6, (shift[0] + 3, shift[1], shift[2])), (850, 3, (-6, 5, 0))])
        items.append({"id": f"case{k}", "image": _save(tmp_path / f"img{k}.nii.gz", _body()),
                      "label": _save(tmp_path / f"lab{k}.nii.gz", lab)})
    out = tmp_path / "pred"
    m = P.predict_items(items, task, _oracle(task, items), out, RUN)
    assert m["_written"] == 2 and m["_skipped"] == 0
    _check_round_trip(items, out, {0, 205, 500, 850})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["run_key"] == "k0" and set(manifest["cases"]) == {"case0", "case1"}
    assert manifest["cases"]["case0"]["sha256"] == P.sha256(out / "case0.nii.gz")
    assert nib.load(str(out / "case0.nii.gz")).get_data_dtype() == np.int16
    # resumable: finished cases are skipped (no inference called), a lost file is predicted again
    (out / "case1.nii.gz").unlink()
    m = P.predict_items(items, task, _oracle(task, items[1:]), out, RUN)
    assert m["_written"] == 1 and m["_skipped"] == 1
    _check_round_trip(items[1:], out, {0, 205, 500, 850})
    with pytest.raises(RunError, match="another run or checkpoint"):
        P.predict_items(items, task, _oracle(task, items), out, {**RUN, "checkpoint_sha256": "c1"})


def test_msd_4d_multimodal_round_trip(tmp_path):
    task = recipes.resolve("scratch", "phantom-msd01", overrides=["task.preprocess.spacing=[0.8,0.8,0.8]"])["task"]
    assert len(task["channels"]) == 4
    lab = _spheres([(1, 10, (0, 0, 0)), (2, 6, (1, 1, 0)), (3, 3, (1, 1, 0))])
    item = {"id": "BRATS_001", "image": _save(tmp_path / "img.nii.gz", _body(channels=4, value=300.0)),
            "label": _save(tmp_path / "lab.nii.gz", lab.astype(np.uint8))}
    assert nib.load(item["image"]).shape == (*SHAPE, 4)
    P.predict_items([item], task, _oracle(task, [item]), tmp_path / "pred", RUN)
    _check_round_trip([item], tmp_path / "pred", {0, 1, 2, 3})
    assert nib.load(str(tmp_path / "pred" / "BRATS_001.nii.gz")).get_data_dtype() == np.uint8


def test_brats_regions_round_trip_back_to_1_2_4(tmp_path):
    task = recipes.resolve("scratch", "phantom-brats21", overrides=["task.preprocess.spacing=[0.8,0.8,0.8]"])["task"]
    lab = _spheres([(2, 11, (0, 0, 0)), (1, 7, (1, 0, 1)), (4, 3, (1, 0, 1))])
    images = [_save(tmp_path / f"img_{c}.nii.gz", _body(value=100.0 * (k + 1))) for k, c in enumerate(task["channels"])]
    item = {"id": "BraTS2021_00000", "image": images, "label": _save(tmp_path / "seg.nii.gz", lab)}
    P.predict_items([item], task, _oracle(task, [item]), tmp_path / "pred", RUN)
    _check_round_trip([item], tmp_path / "pred", {0, 1, 2, 4})


def test_predict_cli_on_a_tiny_trained_phantom_run(phantom_home, tmp_path, capsys):
    from sslbench.cli import main
    from sslbench.data import layouts

    fast = ["--set", "task.finetune.max_steps=2", "--set", "task.finetune.roi=[64,32,32]",
            "--set", "task.finetune.num_samples=1", "--set", "task.finetune.val_every=0",
            "--set", "task.evaluate.overlap=0.0", "--set", "task.finetune.warmup_steps=1"]
    assert main(["run", "--method", "scratch", "--task", "phantom-btcv", "--out", str(tmp_path), *fast]) == 0
    run = next((tmp_path / "finetune" / "phantom-btcv" / "scratch").iterdir())
    capsys.readouterr()
    assert main(["predict", str(run)]) == 0
    assert "written" in capsys.readouterr().out
    out = run / "predictions" / "test"
    cfg = recipes.resolve("scratch", "phantom-btcv")["task"]
    root = json.loads((run / "data.json").read_text())["root"]   # the tree this run read (others may exist)
    tests = layouts.read_datalist(cfg, root)["test"]
    assert tests and sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{t['id']}.nii.gz" for t in tests)
    manifest = json.loads((out / "manifest.json").read_text())
    status = json.loads((run / "status.json").read_text())
    assert manifest["run"]["run_key"] == status["run_key"] and manifest["run"]["run_hash"] == run.name
    ckpt = run / "checkpoints" / ("best.pt" if (run / "checkpoints" / "best.pt").is_file() else "last.pt")
    assert manifest["run"]["checkpoint"] == str(ckpt) and manifest["run"]["checkpoint_sha256"] == P.sha256(ckpt)
    for t in tests:
        src, pred = nib.load(t["image"]), nib.load(str(out / f"{t['id']}.nii.gz"))
        assert pred.shape == src.shape and np.array_equal(pred.affine, src.affine)
        assert manifest["cases"][t["id"]]["sha256"] == P.sha256(out / f"{t['id']}.nii.gz")
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(14))
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["predict", str(run)]) == 0
    assert f"0 written, {len(tests)} already there" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.json"} == \
        {k: v for k, v in stamp.items() if k != "manifest.json"}
    # scored in the original space: the validation images predicted (predictions/val) and scored on their grids
    assert main(["evaluate", str(run), "--space", "original"]) == 0
    orig = json.loads((run / "evaluation-original.json").read_text())
    val = layouts.read_datalist(cfg, root)["val"]
    assert orig["space"] == "original" and orig["n_cases"] == len(val) and 0.0 <= orig["mean_dice"] <= 1.0
    assert sorted(p.name for p in (run / "predictions" / "val").glob("*.nii.gz")) == sorted(f"{v['id']}.nii.gz" for v in val)
    capsys.readouterr()
    assert main(["predict", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    from sslbench.store import lock as locks

    with locks.folder_lock(run):   # a training (or evaluate) of the folder holds its lock: predict is refused
        assert main(["predict", str(run), "--split", "val"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {run} is in use by pid {os.getpid()} on ") and "\n" not in err, err


def test_submit_packs_and_refuses_a_missing_case_and_a_wrong_shape(tmp_path):
    import zipfile

    from sslbench import submit
    from sslbench.errors import DataError

    task = recipes.resolve("scratch", "phantom-mmwhs", overrides=["task.preprocess.spacing=[0.8,0.8,0.8]"])["task"]
    items = []
    for k in range(2):
        lab = _spheres([(205, 10, (k, 0, 0))])
        items.append({"id": f"amos_000{k}", "image": _save(tmp_path / f"amos_000{k}.nii.gz", _body()),
                      "label": _save(tmp_path / f"lab{k}.nii.gz", lab)})
    pred = tmp_path / "pred"
    P.predict_items(items, task, _oracle(task, items), pred, RUN)
    res = submit.pack(items, task, pred, "amos22", tmp_path / "sub.zip")
    assert res["verified"] is True
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert sorted(zf.namelist()) == ["results/amos_0000.nii.gz", "results/amos_0001.nii.gz"]
    res = submit.pack(items, task, pred, "btcv", tmp_path / "btcv.zip")
    assert res["files"] == ["amos_0000.nii.gz", "amos_0001.nii.gz"] and res["verified"] is False
    # a wrong shape: the file replaced (and the manifest's sha256 updated, so that only the shape is wrong)
    manifest = json.loads((pred / "manifest.json").read_text())
    bad = pred / "amos_0001.nii.gz"
    _save(bad, np.zeros((5, 5, 5), np.uint8))
    manifest["cases"]["amos_0001"]["sha256"] = P.sha256(bad)
    (pred / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"amos_0001.nii.gz: shape \(5, 5, 5\); expected the image's \(24, 44, 16\)"):
        submit.pack(items, task, pred, "amos22", tmp_path / "sub2.zip")
    bad.unlink()
    with pytest.raises(DataError, match="prediction of case amos_0001 missing"):
        submit.pack(items, task, pred, "amos22", tmp_path / "sub2.zip")
    assert not (tmp_path / "sub2.zip").exists()


def test_chunked_argmax_equals_one_argmax_ties_to_the_lower_class():
    task = recipes.resolve("scratch", "mmwhs")["task"]          # 8 classes: chunks of 4 + 4
    scores = np.zeros((8, 3), np.float32)
    scores[:, 0] = [0.1, 0.2, 0.0, 0.0, 0.0, 0.7, 0.0, 0.0]   # class 5, in the second chunk
    scores[:, 1] = [0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0]   # tie across the chunks: class 3
    scores[:, 2] = [0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1]   # background
    chunks = [(0, scores[:4]), (4, scores[4:])]
    assert P.labels_from_scores(iter(chunks), task).tolist() == [600, 500, 0]


def test_scores_in_the_original_space_by_hand(tmp_path):
    task = recipes.resolve("scratch", "phantom-mmwhs", overrides=["task.preprocess.spacing=[0.8,0.8,0.8]"])["task"]
    lab = np.zeros(SHAPE, np.int16)
    lab[2:6, 2:6, 2:4] = 205          # 32 voxels
    lab[10:12, 10:12, 5:7] = 850      # 8 voxels
    pred = lab.copy()
    pred[2:4, 2:6, 2:4] = 0           # 205: 16 of 32 found -> Dice 2*16/(16+32) = 2/3
    pred[10:12, 10:12, 5:7] = 0       # 850 missed entirely -> Dice 0 (empty in one)
    item = {"id": "c0", "image": _save(tmp_path / "img.nii.gz", _body()), "label": _save(tmp_path / "lab.nii.gz", lab)}
    (tmp_path / "pred").mkdir()
    _save(tmp_path / "pred" / "c0.nii.gz", pred.astype(np.int16))
    row = P.score_original([item], task, tmp_path / "pred")[0]
    assert row["myocardium of left ventricle"] == pytest.approx(2 / 3)
    assert row["pulmonary artery"] == 0.0
    assert np.isnan(row["left atrium"])      # absent from both: left out (the task's empty rule)
    assert row["mean"] == pytest.approx(1 / 3)
    _save(tmp_path / "pred" / "c0.nii.gz", np.full(SHAPE, 7, np.int16))
    with pytest.raises(DataError, match=r"c0.nii.gz: label values \[7\] outside"):
        P.score_original([item], task, tmp_path / "pred")


def test_an_unreadable_image_is_one_line_naming_it(tmp_path):
    from sslbench.errors import DataError

    task = recipes.resolve("scratch", "phantom-mmwhs")["task"]
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    item = {"id": "broken", "image": str(bad), "label": None}
    with pytest.raises(DataError, match="broken.nii.gz: not a gzip file although named .gz") as err:
        P.predict_items([item], task, lambda case: None, tmp_path / "pred", RUN)
    assert "\n" not in str(err.value)
