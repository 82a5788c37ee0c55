"""Dataset validation (sslbench/data/check.py): each defect is exactly one problem line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sslbench import recipes

from sslbench.data import check, phantoms



def task(name: str, **data) -> dict:
    """The resolved task recipe (extends + defaults, as the protocol sees it) with data keys overridden."""
    t = recipes.load_task(name)
    t["data"].update(data)
    return t


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pristine")
    return {"btcv": phantoms.synth("btcv", base / "btcv", cases=4, seed=1),
            "mmwhs": phantoms.synth("mmwhs", base / "mmwhs", cases=3, seed=1),
            "msd-spleen": phantoms.synth("msd-spleen", base / "msd", cases=4, seed=1)}


@pytest.fixture
def btcv(pristine, tmp_path) -> Path:
    """A fresh copy of a 4-case BTCV phantom (train 0001-0003, val 0035, test 0061) to damage."""
    root = tmp_path / "btcv"
    shutil.copytree(pristine["btcv"], root)
    return root


def rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    """Save a NIfTI file again with new voxel data and/or affine."""
    img = nib.load(path)
    out = nib.Nifti1Image(np.asarray(img.dataobj) if data is None else data,
                          img.affine if affine is None else affine)
    nib.save(out, path)


def only_problem(root: Path, t: dict | None = None) -> str:
    report = check.check_dataset(t or task("btcv"), root)
    assert len(report.problems) == 1, report.problems
    line = report.problems[0]
    assert "\n" not in line
    return line


def test_clean_phantom_has_no_problems(btcv):
    report = check.check_dataset(task("btcv"), btcv)
    assert report.problems == [] and report.phantom and report.layout == "monai-json"
    assert [(r["split"], r["id"]) for r in report.rows] == [("train", "0001"), ("train", "0002"),
                                                            ("train", "0003"), ("val", "0035"), ("test", "0061")]
    row = report.rows[0]
    assert row["shape"][:2] == (96, 96) and len(row["spacing"]) == 3 and row["intensity"][0] < -900
    assert row["ok"] and set(row["classes"]) == set(range(14)) and row["channels"] == 1
    summary = check.summarize(report)
    assert [s["split"] for s in summary] == ["train", "val", "test"]
    assert len({tuple(s) for s in summary}) == 1                        # same columns in every row
    assert summary[0]["cases"] == 3 and summary[0]["liver"] > 0 and summary[2]["liver"] == "-"
    assert "background" not in summary[0]


def test_truncated_image(btcv):
    path = btcv / "imagesTr" / "img0002.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = only_problem(btcv)
    assert line.startswith(f"{path}:") and "truncated" in line


def test_truncated_label(btcv):
    path = btcv / "labelsTr" / "label0035.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert only_problem(btcv).startswith(f"{path}:")


def test_header_only_garbage(btcv):
    import gzip

    path = btcv / "imagesTs" / "img0061.nii.gz"
    path.write_bytes(b"not a nifti file at all")
    assert only_problem(btcv) == f"{path}: not a gzip file although named .gz; expected a gzip-compressed NIfTI"
    path.write_bytes(gzip.compress(b"not a nifti file at all" * 40))      # a gzip stream, but not of a NIfTI
    assert only_problem(btcv).startswith(f"{path}: not a NIfTI header (")


def test_label_value_outside_classes(btcv):
    path = btcv / "labelsTr" / "label0001.nii.gz"
    lab = np.asarray(nib.load(path).dataobj).copy()
    lab[10, 10, 10] = 99
    rewrite(path, lab)
    line = only_problem(btcv)
    assert line.startswith(f"{path}:") and "99" in line and "0..13" in line


def test_label_shape_differs(btcv):
    path = btcv / "labelsTr" / "label0003.nii.gz"
    lab = np.asarray(nib.load(path).dataobj)
    rewrite(path, np.ascontiguousarray(lab[:, :, :-2]))
    line = only_problem(btcv)
    assert line.startswith(f"{path}:") and "shape" in line and "img0003.nii.gz" in line


def test_label_affine_differs(btcv):
    path = btcv / "labelsTr" / "label0002.nii.gz"
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 5.0
    rewrite(path, affine=affine)
    line = only_problem(btcv)
    assert line.startswith(f"{path}:") and "affine" in line


def test_tiny_affine_difference_is_tolerated(btcv):
    path = btcv / "labelsTr" / "label0002.nii.gz"
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 1e-5
    rewrite(path, affine=affine)
    assert check.check_dataset(task("btcv"), btcv).problems == []


def test_missing_image(btcv):
    path = btcv / "imagesTr" / "img0035.nii.gz"
    path.unlink()
    line = only_problem(btcv)
    assert line.startswith(f"{path}:") and "not found" in line


def test_empty_validation_split(btcv):
    path = btcv / "dataset_0.json"
    obj = json.loads(path.read_text())
    obj["training"] += obj["validation"]
    obj["validation"] = []
    path.write_text(json.dumps(obj))
    line = only_problem(btcv)
    assert line.startswith(f"{path}:") and "'val' split" in line and "empty" in line


def test_case_in_two_splits(btcv):
    path = btcv / "dataset_0.json"
    obj = json.loads(path.read_text())
    obj["validation"].append(obj["training"][0])
    path.write_text(json.dumps(obj))
    line = only_problem(btcv)
    assert "img0001.nii.gz" in line and "both" in line


def test_bad_datalist_is_a_problem_not_an_exception(btcv):
    path = btcv / "dataset_0.json"
    path.write_text("[1, 2")
    line = only_problem(btcv)
    assert line.startswith(f"{path}:")
    (btcv / "dataset_0.json").unlink()
    report = check.check_dataset(task("btcv"), btcv / "nothing-here")
    assert len(report.problems) == 1 and report.layout == "" and report.rows == []


def test_float_labels_integral_ok_fractional_not(btcv):
    path = btcv / "labelsTr" / "label0001.nii.gz"
    lab = np.asarray(nib.load(path).dataobj).astype(np.float32)
    rewrite(path, lab)
    assert check.check_dataset(task("btcv"), btcv).problems == []
    lab[5, 5, 5] = 0.5
    rewrite(path, lab)
    line = only_problem(btcv)
    assert line.startswith(f"{path}:") and "non-integer" in line
    lab[5, 5, 5] = np.nan
    rewrite(path, lab)
    line = only_problem(btcv)
    assert line.startswith(f"{path}:") and "NaN" in line


def test_four_d_image_on_a_one_channel_task_is_one_problem(btcv):
    path = btcv / "imagesTr" / "img0001.nii.gz"
    img = np.asarray(nib.load(path).dataobj)
    rewrite(path, np.stack([img, img], axis=-1))
    report = check.check_dataset(task("btcv"), btcv)
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith(f"{path}:") and "2 channel(s); expected 1" in report.problems[0]
    rewrite(path, img[..., None])                      # a trailing axis of 1 is still one channel: fine
    assert check.check_dataset(task("btcv"), btcv).problems == []


def test_label_map_raw_values(pristine, tmp_path):
    root = tmp_path / "mmwhs"
    shutil.copytree(pristine["mmwhs"], root)
    t = task("mmwhs", val_last=1)
    report = check.check_dataset(t, root)
    assert report.problems == []
    assert set(report.rows[0]["labels"]) == {0, 205, 420, 500, 550, 600, 820, 850}
    assert set(report.rows[0]["classes"]) == set(range(8))                     # after data.label_map
    path = root / "ct_train" / "ct_train_1002_label.nii.gz"
    lab = np.asarray(nib.load(path).dataobj).copy()
    lab[lab == 600] = 3                                                          # a class index, not a raw value
    rewrite(path, lab)
    line = only_problem(root, t)
    assert line.startswith(f"{path}:") and "label_map" in line and "3" in line
    no_map = task("mmwhs", val_last=1, label_map=None)
    assert len(check.check_dataset(no_map, root).problems) == 3                 # raw values are not 0..7


def test_msd_junk_files_are_skipped(pristine, tmp_path):
    root = tmp_path / "msd" / "Task09_Spleen"
    shutil.copytree(pristine["msd-spleen"], root)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub / "._spleen_1.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / "._dataset.json").write_bytes(b"\x00\x05\x16\x07")
    (root.parent / "._Task09_Spleen").write_bytes(b"\x00\x05\x16\x07")
    t = task("msd-spleen", val_last=1)
    for where in (root, root.parent):
        report = check.check_dataset(t, where)
        assert report.problems == [] and report.phantom and report.layout == "msd"
        assert not any("._" in r["image"] for r in report.rows)


def test_rawdata_missing_val_ids_is_a_note(tmp_path):
    root = phantoms.synth("btcv-raw", tmp_path, cases=2, seed=0, test_cases=0)
    report = check.check_dataset(task("btcv"), root)
    assert report.problems == [] and report.phantom
    assert len(report.notes) == 1 and "0036" in report.notes[0]
    assert check.check_dataset(task("btcv"), root / "RawData").phantom     # marker one level up
