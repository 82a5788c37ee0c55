"""LiTS, FLARE23 and AMOS22 (sslbench/data/layouts/ct.py, phantoms/ct.py): real-layout readers on hand-built
trees, phantom twins -> data check -> a tiny scratch run through the CLI, and the edge cases of their files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sslbench import recipes
from sslbench.cli import main
from sslbench.data import check, layouts, phantoms
from sslbench.data.transforms import preprocess_transforms
from sslbench.errors import DataError

# A whole run in a few seconds of CPU: 4 steps on 64 x 32 x 32 crops of 5 mm volumes.
FAST = ["--set", "task.finetune.max_steps=4", "--set", "task.finetune.roi=[64,32,32]",
        "--set", "task.finetune.num_samples=1", "--set", "task.finetune.val_every=4",
        "--set", "task.finetune.checkpoint_every=4", "--set", "task.finetune.log_every=2",
        "--set", "task.evaluate.overlap=0.0", "--set", "task.finetune.warmup_steps=1",
        "--set", "task.preprocess.spacing=[5.0,5.0,5.0]"]


from treekit import ids, task, touch  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# Readers on miniature trees of the real layouts (empty files: readers do not open them)
# ----------------------------------------------------------------------------------------------------------
def test_lits_batches_give_the_100_31_split_in_case_number_order(tmp_path):
    for n in range(131):
        batch = tmp_path / ("Training Batch 1" if n < 28 else "Training Batch 2")
        touch(batch / f"volume-{n}.nii")
        touch(batch / f"segmentation-{n}.nii")
    touch(tmp_path / "Training Batch 1" / "._volume-3.nii")          # macOS junk inside the archive
    touch(tmp_path / "README.txt")
    t = task("lits")
    assert layouts.detect_layout(t, tmp_path) == "lits"
    splits = layouts.read_datalist(t, tmp_path)
    assert ids(splits["train"]) == [f"volume-{n}" for n in range(100)]
    assert ids(splits["val"]) == [f"volume-{n}" for n in range(100, 131)]
    item = splits["val"][0]
    assert item["label"] == str(tmp_path / "Training Batch 2" / "segmentation-100.nii")


def test_lits_msd_task03_naming_gives_the_same_split(tmp_path):
    base = tmp_path / "Task03_Liver"
    order = np.random.default_rng(0).permutation(131)                 # dataset.json lists cases unsorted
    training = [{"image": f"./imagesTr/liver_{n}.nii.gz", "label": f"./labelsTr/liver_{n}.nii.gz"} for n in order]
    training.append({"image": "./imagesTr/._liver_7.nii.gz", "label": "./labelsTr/._liver_7.nii.gz"})
    for n in range(131):
        touch(base / "imagesTr" / f"liver_{n}.nii.gz")
    (base / "dataset.json").write_text(json.dumps({"name": "Liver", "labels": {"0": "background", "1": "liver",
                                                                              "2": "cancer"},
                                                   "training": training, "test": ["./imagesTs/liver_132.nii.gz"]}))
    t = task("lits")
    assert layouts.detect_layout(t, tmp_path) == "lits-msd"
    splits = layouts.read_datalist(t, tmp_path)
    assert ids(splits["val"]) == [f"liver_{n}" for n in range(100, 131)]
    assert ids(splits["train"]) == [f"liver_{n}" for n in range(100)]
    assert ids(splits["test"]) == ["liver_132"]
    other = tmp_path / "spleen" / "Task09_Spleen"                      # another MSD task is not LiTS
    touch(other / "imagesTr" / "spleen_2.nii.gz")
    (other / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="no known layout of task 'lits'"):
        layouts.read_datalist(t, tmp_path / "spleen")


def test_flare23_skips_unlabelled_images_and_uses_a_validation_folder(tmp_path):
    for n in range(1, 7):
        touch(tmp_path / "imagesTr" / f"FLARE23_{n:04d}_0000.nii.gz")
        if n != 4:                                                    # case 4: from the unlabelled part
            touch(tmp_path / "labelsTr" / f"FLARE23_{n:04d}.nii.gz")
    touch(tmp_path / "imagesTr" / "._FLARE23_0001_0000.nii.gz")
    t = task("flare23", val_last=2)
    dl = layouts.load_datalist(t, tmp_path)
    assert dl.layout == "flare23"
    assert ids(dl.splits["train"]) == ["FLARE23_0001", "FLARE23_0002", "FLARE23_0003"]
    assert ids(dl.splits["val"]) == ["FLARE23_0005", "FLARE23_0006"]
    assert "1 images without a label file left out" in dl.origin["train"]
    assert dl.splits["train"][0]["label"].endswith("labelsTr/FLARE23_0001.nii.gz")
    touch(tmp_path / "imagesVal" / "FLARE23_0101_0000.nii.gz")
    touch(tmp_path / "labelsVal" / "FLARE23_0101.nii.gz")
    dl = layouts.load_datalist(t, tmp_path)
    assert len(dl.splits["train"]) == 5 and ids(dl.splits["val"]) == ["FLARE23_0101"]


def _amos_json(root: Path) -> None:
    pair = lambda i, s: {"image": f"./images{s}/amos_{i:04d}.nii.gz", "label": f"./labels{s}/amos_{i:04d}.nii.gz"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "name": "AMOS", "training": [pair(i, "Tr") for i in (1, 5, 500, 507, 589)],
        "validation": [pair(i, "Va") for i in (8, 596)],
        "test": [{"image": "./imagesTs/amos_0002.nii.gz"}, {"image": "./imagesTs/amos_0550.nii.gz"}]}))


def test_amos22_lists_ct_cases_only(tmp_path):
    _amos_json(tmp_path / "amos22")
    t = task("amos22")
    dl = layouts.load_datalist(t, tmp_path)                          # the root may hold the amos22 folder
    assert dl.layout == "amos22"
    assert ids(dl.splits["train"]) == ["amos_0001", "amos_0005", "amos_0500"]     # 507, 589 are MRI
    assert ids(dl.splits["val"]) == ["amos_0008"] and ids(dl.splits["test"]) == ["amos_0002"]
    assert "2 MRI cases left out" in dl.origin["train"]
    assert dl.splits["val"][0]["label"] == str(tmp_path / "amos22" / "labelsVa" / "amos_0008.nii.gz")


def test_amos22_without_dataset_json_reads_the_folders(tmp_path):
    for i in (1, 3, 540):
        touch(tmp_path / "imagesTr" / f"amos_{i:04d}.nii.gz")
    touch(tmp_path / "imagesVa" / "amos_0009.nii.gz")
    splits = layouts.read_datalist(task("amos22"), tmp_path)
    assert ids(splits["train"]) == ["amos_0001", "amos_0003"] and ids(splits["val"]) == ["amos_0009"]
    assert splits["val"][0]["label"] == str(tmp_path / "labelsVa" / "amos_0009.nii.gz")


def test_no_known_layout_is_one_line_naming_the_markers(tmp_path):
    touch(tmp_path / "scan.nii.gz")
    with pytest.raises(DataError) as err:
        layouts.read_datalist(task("lits"), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and "volume-N.nii" in msg and "liver_N" in msg


# ----------------------------------------------------------------------------------------------------------
# Phantoms: anatomy, labels in the datasets' own conventions
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ct-phantoms")
    return {like: phantoms.synth(like, base / like, cases=3, seed=0) for like in ("lits", "flare23", "amos22")}


def test_lits_phantom_has_hypodense_tumours_inside_the_liver(trees):
    root = trees["lits"]
    assert (root / "Training Batch 1" / "volume-0.nii").is_file()     # uncompressed, as LiTS ships
    seen_tumour = False
    for n in range(3):
        folder = root / ("Training Batch 1" if n == 0 else "Training Batch 2")
        img = np.asarray(nib.load(folder / f"volume-{n}.nii").dataobj)
        seg = np.asarray(nib.load(folder / f"segmentation-{n}.nii").dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2} and (seg == 1).sum() > 1000
        if (seg == 2).any():
            seen_tumour = True
            assert img[seg == 2].mean() < img[seg == 1].mean() - 20
    assert seen_tumour


def test_flare_and_amos_phantoms_use_their_label_orders(trees):
    flare = nib.load(trees["flare23"] / "labelsTr" / "FLARE23_0001.nii.gz")
    img = np.asarray(nib.load(trees["flare23"] / "imagesTr" / "FLARE23_0001_0000.nii.gz").dataobj)
    lab = np.asarray(flare.dataobj)
    assert set(np.unique(lab)) <= set(range(15))
    # FLARE: 1 liver is the biggest organ, 3 spleen to the patient's left (smaller RAS x) of 1 liver.
    counts = np.bincount(lab.ravel(), minlength=15)
    assert counts[1] == counts[1:14].max()
    ras = nib.as_closest_canonical(flare)
    lr = np.asarray(ras.dataobj)
    assert np.argwhere(lr == 3)[:, 0].mean() < np.argwhere(lr == 1)[:, 0].mean()
    assert 20 < img[lab == 1].mean() < 200 and img[lab == 0].min() < -900
    amos = json.loads((trees["amos22"] / "dataset.json").read_text())
    assert amos["labels"]["9"] == "postcava" and len(amos["labels"]) == 16
    mri = [e for e in amos["training"] if int(e["image"][-11:-7]) > 500]
    assert len(mri) == 1                                             # the reader must leave it out
    mr = np.asarray(nib.load(trees["amos22"] / mri[0]["image"]).dataobj)
    assert mr.min() >= 0                                             # MR signal, not HU
    alab = np.asarray(nib.load(trees["amos22"] / amos["training"][0]["label"]).dataobj)
    assert set(np.unique(alab)) <= set(range(13)) and (alab == 6).sum() == np.bincount(alab.ravel())[1:].max()


def test_lits_label_map_scores_liver_plus_tumour_as_liver(trees):
    t = task("lits", val_last=1)
    item = layouts.read_datalist(t, trees["lits"])["train"][0]
    out = preprocess_transforms(t)({"image": item["image"], "label": item["label"]})
    raw = np.asarray(nib.load(item["label"]).dataobj)
    assert set(np.unique(raw)) == {0, 1, 2}
    assert set(np.unique(np.asarray(out["label"]))) == {0.0, 1.0}


# ----------------------------------------------------------------------------------------------------------
# Edge cases of real files: float labels, labels outside the classes, affine mismatch, big-endian NIfTI
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def lits_copy(trees, tmp_path) -> Path:
    root = tmp_path / "lits"
    shutil.copytree(trees["lits"], root)
    return root


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if data is None else data,
                             img.affine if affine is None else affine), path)


def _problems(root: Path) -> list[str]:
    return check.check_dataset(task("lits", val_last=1), root).problems


def test_float_label_files_are_read_when_integral(lits_copy):
    seg = lits_copy / "Training Batch 1" / "segmentation-0.nii"
    data = np.asarray(nib.load(seg).dataobj)
    _rewrite(seg, data.astype(np.float32))
    assert _problems(lits_copy) == []
    _rewrite(seg, data.astype(np.float32) * 0.75)                     # 0.75, 1.5: not class values
    problems = _problems(lits_copy)
    assert len(problems) == 1 and str(seg) in problems[0] and "non-integer" in problems[0]


def test_labels_outside_the_classes_and_affine_mismatch_are_one_line_each(lits_copy):
    seg = lits_copy / "Training Batch 2" / "segmentation-1.nii"
    data = np.asarray(nib.load(seg).dataobj).copy()
    data[0, 0, 0] = 3
    _rewrite(seg, data)
    problems = _problems(lits_copy)
    assert len(problems) == 1 and str(seg) in problems[0] and "3" in problems[0] and "label_map" in problems[0]
    data[0, 0, 0] = 0
    shifted = nib.load(seg).affine.copy()
    shifted[0, 3] += 5.0
    _rewrite(seg, data, shifted)
    problems = _problems(lits_copy)
    assert len(problems) == 1 and str(seg) in problems[0] and "affine" in problems[0]


def test_big_endian_nifti_is_read_right(tmp_path):
    src = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"   # big-endian int16, as shipped
    img = nib.load(src)
    assert img.header.endianness == ">"
    truth = np.asarray(img.dataobj).astype(np.float32)
    t = task("lits")
    out = preprocess_transforms({**t, "preprocess": {**t["preprocess"], "a_min": float(truth.min()),
                                                     "a_max": float(truth.max()), "crop_foreground": False,
                                                     "spacing": [float(z) for z in img.header.get_zooms()[:3]],
                                                     "orientation": "".join(nib.aff2axcodes(img.affine))}},
                                with_label=False)({"image": str(src)})
    expected = (truth - truth.min()) / (truth.max() - truth.min())
    assert np.allclose(np.asarray(out["image"][0]), expected, atol=1e-5)
    little = tmp_path / "anatomical-le.nii"
    nib.save(nib.Nifti1Image(truth.astype("<i2"), img.affine), little)
    assert np.array_equal(np.asarray(nib.load(little).dataobj), truth)


# ----------------------------------------------------------------------------------------------------------
# synth -> check -> tiny scratch run, through the CLI
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, metric_keys", [("lits", {"liver"}), ("flare23", {"liver", "tumor"}),
                                               ("amos22", {"postcava", "prostate/uterus"})])
def test_phantom_synth_check_and_tiny_scratch_run(phantom_home, tmp_path, capsys, name, metric_keys):
    assert main(["data", "check", "--task", f"phantom-{name}"]) == 0       # synthesises it on first use
    assert "no problems" in capsys.readouterr().out
    assert main(["run", "--method", "scratch", "--task", f"phantom-{name}", "--out", str(tmp_path / "runs"), *FAST]) == 0
    assert "PHANTOM" in capsys.readouterr().out
    run = next((tmp_path / "runs" / "finetune" / f"phantom-{name}" / "scratch").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = recipes.load_task(name)
    assert metrics["phantom"] is True and metrics["n_cases"] >= 1
    assert list(metrics["per_class"]) == cfg["classes"][1:] and metric_keys <= set(metrics["per_class"])
    assert 0.0 <= metrics["mean_dice"] <= 1.0
    if "nsd" in cfg["evaluate"]["metrics"]:
        assert list(metrics["per_class_nsd"]) == cfg["classes"][1:]
        assert metrics["mean_nsd"] is None or 0.0 <= metrics["mean_nsd"] <= 1.0
