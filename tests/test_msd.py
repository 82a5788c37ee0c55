"""MSD Tasks 01-10: phantom twins in the real layout, check, a tiny scratch run each, and NIfTI edge cases."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sslbench import protocol, recipes
from sslbench.cli import main
from sslbench.data import check, layouts, phantoms
from sslbench.data.phantoms import msd
from sslbench.data.cases import load_cases
from sslbench.data.transforms import preprocess_transforms
from sslbench.errors import DataError

# like -> task; Task09 is the msd-spleen phantom under the msd09 recipe (msd-spleen + NSD).
TASKS = {f"msd{n:02d}": f"msd{n:02d}" for n in msd.TASKS} | {"msd-spleen": "msd09"}
# Tiny enough for 2 CPU cores: two steps of a 64x32x32 ROI on 1 training case, one validation case (most of
# a run is the sliding-window evaluation, hence the coarse spacing below).
FAST = ["--set", "task.finetune.max_steps=2", "--set", "task.finetune.roi=[64,32,32]",
        "--set", "task.finetune.val_every=0", "--set", "task.finetune.checkpoint_every=2",
        "--set", "task.finetune.log_every=1", "--set", "task.evaluate.overlap=0.0",
        "--set", "task.finetune.warmup_steps=1", "--set", "task.evaluate.sw_batch_size=8"]


def _phantom_task(name: str) -> dict:
    t = recipes.load_task(f"phantom-{name}")
    return t


@pytest.mark.parametrize("like", list(TASKS))
def test_synth_check_and_tiny_run(like, tmp_path, capsys, phantom_home):
    name = TASKS[like]
    assert main(["data", "synth", "--like", like, "--out", str(tmp_path / "data"), "--cases", "2"]) == 0
    root = next(p.parent for p in (tmp_path / "data").rglob(phantoms.MARKER))
    # The real task folder, file names and dataset.json keys.
    meta = json.loads((root / "dataset.json").read_text())
    real = recipes.load_task(name)
    assert root.name.startswith(f"Task{name[3:]}_")
    assert [meta["labels"][str(i)] for i in range(len(meta["labels"]))] == real["classes"]
    assert len(meta["modality"]) == len(real.get("channels") or [None])
    assert meta["numTraining"] == len(meta["training"]) == 2 and len(meta["test"]) == meta["numTest"] == 1
    first = nib.load(root / meta["training"][0]["image"])
    assert len(first.shape) == (4 if real.get("channels") else 3)
    if real.get("channels"):
        assert first.shape[3] == len(real["channels"])

    task = _phantom_task(name)
    report = check.check_dataset(task, root)
    assert report.problems == [] and report.phantom and report.layout == "msd"
    # Every foreground class is present in the phantom (learnable, not an empty label).
    seen = set().union(*[set(r["classes"]) for r in report.rows if r["classes"]])
    assert seen == set(range(len(real["classes"])))
    assert main(["data", "check", "--task", f"phantom-{name}", "--root", str(root)]) == 0

    out = tmp_path / "runs"
    coarse = [] if name in ("msd04", "msd05") else ["--set", "task.preprocess.spacing=[6,6,6]"]  # fewer windows
    assert main(["run", "--method", "scratch", "--task", f"phantom-{name}", "--root", str(root), "--out", str(out),
                 *FAST, *coarse]) == 0
    assert "NSD (%) @" in capsys.readouterr().out
    run = next((out / "finetune" / f"phantom-{name}" / "scratch").iterdir())
    m = json.loads((run / "metrics.json").read_text())
    fg = real["classes"][1:]
    assert m["phantom"] is True and m["n_cases"] == 1 and list(m["per_class"]) == fg
    assert m["metrics"] == ["dice", "nsd"] and m["nsd_tolerance_mm"] == real["evaluate"]["nsd_tolerance"]
    assert list(m["per_class_nsd"]) == fg and 0.0 <= m["mean_dice"] <= 1.0
    assert m["mean_nsd"] is None or 0.0 <= m["mean_nsd"] <= 1.0
    header = (run / "cases.csv").read_text().splitlines()[0].split(",")
    assert header == ["case", *fg, "mean", *[f"nsd:{c}" for c in fg], "nsd:mean"]


def test_recipes_carry_the_paper_settings():
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 10):
        t = recipes.load_task(f"msd{n:02d}")
        assert t["status"] == "available" and t["finetune"]["roi"] == [96, 96, 96]
        assert t["finetune"]["lr"] == 3.0e-4 and t["finetune"]["weight_decay"] == 1.0e-5
        ct = t["modality"] == "CT"
        assert t["preprocess"]["normalize"] == ("window" if ct else "zscore")
        assert t["evaluate"]["metrics"] == ["dice", "nsd"] and t["evaluate"]["nsd_tolerance"] > 0
    assert recipes.load_task("msd01")["channels"] == ["FLAIR", "T1w", "t1gd", "T2w"]
    assert recipes.load_task("msd05")["channels"] == ["T2", "ADC"]
    assert recipes.load_task("msd01")["data"]["val_last"] == 97            # 387 / 97 of 484
    nine = recipes.load_task("msd09")
    assert nine["data"]["val_last"] == 9 and nine["finetune"]["epochs"] == 1000 and "nsd" in nine["evaluate"]["metrics"]
    with pytest.raises(Exception, match="nsd_tolerance"):
        recipes.resolve("scratch", "msd03", overrides=["task.evaluate.nsd_tolerance=0"])


@pytest.fixture(scope="module")
def liver(tmp_path_factory) -> Path:
    return phantoms.synth("msd03", tmp_path_factory.mktemp("msd03"), cases=2, seed=3)


def _copy(src: Path, dst: Path) -> tuple[Path, dict]:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "dataset.json").read_text())
    return dst, meta


def test_multichannel_4d_image_loads_channel_first(tmp_path):
    root = phantoms.synth("msd05", tmp_path, cases=2, seed=0)
    task = _phantom_task("msd05")
    item = layouts.read_datalist(task, root)["train"][0]
    raw = nib.load(item["image"]).get_fdata()                       # X, Y, Z, 2 (channel last on disk)
    case = preprocess_transforms(task)({"image": item["image"], "label": item["label"]})
    assert case["image"].shape[0] == 2 and case["label"].shape[0] == 1
    # Per-channel z-score over non-zero voxels: each channel ~ mean 0 / std 1 inside the body, 0 outside.
    for c in range(2):
        ch = case["image"][c]
        inside = ch != 0
        assert abs(float(ch[inside].mean())) < 0.05 and abs(float(ch[inside].std()) - 1) < 0.05
    # T2 and ADC differ (the channels are not one volume repeated): the PZ is brighter than the TZ on both.
    lab = case["label"][0]
    for c in range(2):
        assert float(case["image"][c][lab == 1].mean()) > float(case["image"][c][lab == 2].mean())
    assert raw.shape[3] == 2


def test_4d_image_where_3d_expected_is_one_clear_problem(liver, tmp_path):
    root, meta = _copy(liver, tmp_path / "t")
    image = root / meta["training"][0]["image"]
    img = nib.load(image)
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), img.affine), image)
    task = _phantom_task("msd03")
    report = check.check_dataset(task, root)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{image.resolve()}:") and "2 channel(s); expected 1" in report.problems[0]
    items = layouts.read_datalist(task, root)["train"][:1]
    cases = load_cases(items, preprocess_transforms(task), "x")
    with pytest.raises(DataError, match=r"2 image channel\(s\) after loading; expected 1"):
        protocol.check_cases(cases, task, items, "msd03.yaml")


def test_float_labels_with_integral_values_read_right(liver, tmp_path):
    root, meta = _copy(liver, tmp_path / "t")
    label = root / meta["training"][0]["label"]
    img = nib.load(label)
    ints = np.asarray(img.dataobj).astype(np.int64)
    # Stored as float32 just below each integer (what some converters write).
    nib.save(nib.Nifti1Image((ints - 1e-6 * (ints > 0)).astype(np.float32), img.affine), label)
    task = _phantom_task("msd03")
    report = check.check_dataset(task, root)
    assert report.problems == []
    item = {"image": str(root / meta["training"][0]["image"]), "label": str(label)}
    got = preprocess_transforms(task)(item)["label"]
    ref = preprocess_transforms(task)({"image": item["image"], "label": str(liver / meta["training"][0]["label"])})["label"]
    assert torch.equal(got, ref) and set(torch.unique(got).tolist()) == {0.0, 1.0, 2.0}


def test_labels_outside_the_class_list(liver, tmp_path):
    root, meta = _copy(liver, tmp_path / "t")
    label = root / meta["training"][0]["label"]
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data[data == 2] = 7
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine), label)
    task = _phantom_task("msd03")
    report = check.check_dataset(task, root)
    assert len(report.problems) == 1 and "label values 7 are not classes" in report.problems[0]
    items = layouts.read_datalist(task, root)["train"][:1]
    # a run refuses the case as it loads (LoadChecked), naming the label file, before any training
    with pytest.raises(DataError) as err:
        load_cases(items, preprocess_transforms(task), "x")
    assert str(err.value) == (f"{label}: label values 7 are not classes of task 'phantom-msd03'; expected integers "
                              f"0..2 (data.classes)")


def test_big_endian_nifti_reads_like_little_endian(liver, tmp_path):
    # nibabel's shipped anatomical.nii is a real big-endian int16 MRI.
    path = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    img = nib.load(path)
    assert img.header.endianness == ">"
    task = {**_phantom_task("msd04"), "preprocess": {**_phantom_task("msd04")["preprocess"], "spacing": list(
        float(z) for z in img.header.get_zooms()[:3]), "crop_foreground": False}}
    out = preprocess_transforms(task, with_label=False)({"image": str(path)})["image"]
    little = tmp_path / "little.nii"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype("<i2"), img.affine), little)
    assert nib.load(little).header.endianness == "<"
    ref = preprocess_transforms(task, with_label=False)({"image": str(little)})["image"]
    assert out.shape == ref.shape and torch.allclose(out, ref)
    # And a big-endian phantom image in an MSD tree passes the check and loads to the same volume.
    root, meta = _copy(liver, tmp_path / "t")
    image = root / meta["training"][0]["image"]
    src = nib.load(image)
    header = nib.Nifti1Header().as_byteswapped(">")
    header.set_data_dtype(">i2")
    big = nib.Nifti1Image(np.asarray(src.dataobj).astype(">i2"), src.affine, header)
    nib.save(big, image)
    assert nib.load(image).header.endianness == ">"
    task = _phantom_task("msd03")
    assert check.check_dataset(task, root).problems == []
    a = preprocess_transforms(task)({"image": str(image), "label": str(root / meta["training"][0]["label"])})
    b = preprocess_transforms(task)({"image": str(liver / meta["training"][0]["image"]),
                                     "label": str(liver / meta["training"][0]["label"])})
    assert torch.allclose(a["image"], b["image"])


def test_msd_junk_files_are_skipped(liver, tmp_path):
    root, meta = _copy(liver, tmp_path / "t")
    (root / "imagesTr" / ("._" + Path(meta["training"][0]["image"]).name)).write_bytes(b"\0\5\26\7")
    meta["training"].append({"image": "./imagesTr/._junk.nii.gz", "label": "./labelsTr/._junk.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    splits = layouts.read_datalist(_phantom_task("msd03"), root)
    assert sum(len(v) for k, v in splits.items() if k != "test") == 2
    assert not any("._" in it["image"] for v in splits.values() for it in v)
    assert os.path.isfile(root / "imagesTr" / ("._" + Path(meta["training"][0]["image"]).name))
