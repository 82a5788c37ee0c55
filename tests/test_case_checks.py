"""Every run checks its cases before its run folder exists (issue 19): header checks up front (missing,
truncated, non-NIfTI files, image/label shape or affine mismatch), voxel checks as each case loads (NaN,
label values outside the classes); one line naming the file; --force deletes an old folder only after them."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sslbench.cli import main
from sslbench.data import phantoms

FAST = ["--set", "task.finetune.max_steps=2", "--set", "task.finetune.roi=[64,32,32]", "--set",
        "task.finetune.num_samples=1", "--set", "task.finetune.val_every=2", "--set", "task.evaluate.overlap=0.0",
        "--set", "task.finetune.warmup_steps=1", "--set", "run.cache=none"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return phantoms.synth("btcv", tmp_path_factory.mktemp("pristine") / "btcv", cases=3, seed=2)


@pytest.fixture
def btcv(pristine, tmp_path) -> Path:
    """A fresh copy of a 3-case BTCV phantom (train 0001, 0002; val 0035) to damage."""
    root = tmp_path / "btcv"
    shutil.copytree(pristine, root)
    return root


def rewrite(path: Path, data=None, affine=None) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if data is None else data,
                             img.affine if affine is None else affine), path)


def finetune(root: Path, out: Path, *extra) -> int:
    return main(["finetune", "--task", "phantom-btcv", "--root", str(root), "--out", str(out), *FAST, *extra])


def refused(capsys, root: Path, out: Path, *extra) -> str:
    """Run the fine-tuning; assert it is refused with one line and left no run folder; return the line."""
    assert finetune(root, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not (out / "finetune").exists()
    return err[len("error: "):]


def test_label_shape_mismatch_is_refused_before_any_folder(btcv, tmp_path, capsys):
    label = btcv / "labelsTr" / "label0002.nii.gz"
    rewrite(label, np.ascontiguousarray(np.asarray(nib.load(label).dataobj)[:, :, :-3]))
    image = nib.load(btcv / "imagesTr" / "img0002.nii.gz").shape
    line = refused(capsys, btcv, tmp_path / "runs")
    assert line == (f"{label}: spatial shape {image[0]}x{image[1]}x{image[2] - 3} differs from its image "
                    f"{btcv / 'imagesTr' / 'img0002.nii.gz'} ({image[0]}x{image[1]}x{image[2]}); expected the same grid")


def test_label_affine_mismatch_is_refused_before_any_folder(btcv, tmp_path, capsys):
    label = btcv / "labelsTr" / "label0035.nii.gz"
    affine = nib.load(label).affine.copy()
    affine[1, 3] += 7.5                              # the label shifted 7.5 mm: same shape, another place
    rewrite(label, affine=affine)
    line = refused(capsys, btcv, tmp_path / "runs")
    assert line.startswith(f"{label}: affine differs from its image ") and "largest difference 7.5)" in line


def test_nan_image_is_refused_before_any_folder_not_blamed_on_the_learning_rate(btcv, tmp_path, capsys):
    image = btcv / "imagesTr" / "img0001.nii.gz"
    data = np.asarray(nib.load(image).dataobj).astype(np.float32)
    data[5, 6, 7] = np.nan
    data[8, 9, 10] = np.inf
    rewrite(image, data)
    line = refused(capsys, btcv, tmp_path / "runs")
    assert line == f"{image}: contains 2 NaN or infinite voxel(s); expected finite intensities"


def test_label_value_outside_the_classes_is_refused_before_any_folder(btcv, tmp_path, capsys):
    label = btcv / "labelsTr" / "label0001.nii.gz"
    data = np.asarray(nib.load(label).dataobj).copy()
    data[0, 0, 0] = 42
    rewrite(label, data)
    line = refused(capsys, btcv, tmp_path / "runs")
    assert line == (f"{label}: label values 42 are not classes of task 'phantom-btcv'; expected integers 0..13 "
                    f"(data.classes)")


def test_truncated_gzip_and_non_nifti_files_name_the_file_and_the_cause(btcv, tmp_path, capsys):
    image = btcv / "imagesTr" / "img0002.nii.gz"
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) * 2 // 3])
    assert refused(capsys, btcv, tmp_path / "runs") == (
        f"{image}: truncated gzip (the file ends inside its compressed stream); expected a complete download")
    image.write_bytes(b"<html>404 Not Found</html>")        # a failed download saved under the file's name
    assert refused(capsys, btcv, tmp_path / "runs") == (
        f"{image}: not a gzip file although named .gz; expected a gzip-compressed NIfTI")
    image.write_bytes(gzip.compress(b"<html>404 Not Found</html>" * 20))
    assert refused(capsys, btcv, tmp_path / "runs").startswith(f"{image}: not a NIfTI header (")
    image.unlink()
    assert refused(capsys, btcv, tmp_path / "runs") == (f"{image}: file not found (case '0002'); expected the image file to exist")


def test_load_error_causes_inside_the_pipeline(btcv, tmp_path):
    """What LoadChecked (the case pipelines' loader) says when a file fails there, not at the header check."""
    from sslbench import recipes
    from sslbench.data.check import load_error
    from sslbench.data.transforms import preprocess_transforms
    from sslbench.errors import DataError
    from sslbench.data.cases import load_cases

    t = recipes.load_task("phantom-btcv")
    image, label = btcv / "imagesTr" / "img0001.nii.gz", btcv / "labelsTr" / "label0001.nii.gz"
    whole = label.read_bytes()
    label.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as err:
        load_cases([{"id": "0001", "image": str(image), "label": str(label)}], preprocess_transforms(t), "test")
    assert str(err.value) == f"{label}: truncated gzip (the file ends inside its compressed stream); expected a complete download"
    mhd = tmp_path / "scan.mhd"
    mhd.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = scan.raw\n")
    missing = ModuleNotFoundError("No module named 'SimpleITK'", name="SimpleITK")
    assert load_error(str(mhd), missing) == (f"{mhd}: missing reader package SimpleITK (pip install SimpleITK); "
                                             f"expected it installed to read this file")
    assert load_error(str(mhd), RuntimeError("x")).startswith(f"{mhd}: its voxel data file scan.raw is missing")


def test_force_deletes_the_old_folder_only_after_the_checks_passed(pristine, btcv, tmp_path, capsys):
    out = tmp_path / "runs"
    assert finetune(btcv, out) == 0
    run = next((out / "finetune" / "phantom-btcv" / "scratch").iterdir())
    before = json.loads((run / "status.json").read_text())
    assert before["state"] == "finished"
    label = btcv / "labelsTr" / "label0002.nii.gz"
    rewrite(label, np.ascontiguousarray(np.asarray(nib.load(label).dataobj)[:, :, :-1]))
    capsys.readouterr()
    assert finetune(btcv, out, "--force") == 2
    assert capsys.readouterr().err.startswith(f"error: {label}: spatial shape")
    assert json.loads((run / "status.json").read_text()) == before and (run / "metrics.json").is_file()
    shutil.copy(pristine / "labelsTr" / "label0002.nii.gz", label)       # repaired; now a voxel-level defect
    image = btcv / "imagesTr" / "img0035.nii.gz"
    data = np.asarray(nib.load(image).dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    rewrite(image, data)
    assert finetune(btcv, out, "--force") == 2
    assert capsys.readouterr().err.strip() == f"error: {image}: contains 1 NaN or infinite voxel(s); expected finite intensities"
    assert json.loads((run / "status.json").read_text()) == before and (run / "metrics.json").is_file()


def test_pretraining_checks_its_corpus_before_any_folder(phantom_home, tmp_path, capsys):
    root = tmp_path / "tcia"
    assert main(["data", "synth", "--like", "tcia-covid19", "--out", str(root), "--cases", "2"]) == 0
    files = sorted(root.rglob("volume-covid19-A-*.nii.gz"))
    assert len(files) == 2
    out = tmp_path / "runs"
    cmd = ["pretrain", "--method", "voco", "--preset", "tiny", "--corpus", "phantom-tcia-covid19", "--corpus-root",
           str(root), "--set", "method.pretrain.steps=1", "--set", "run.cache=none", "--out", str(out)]
    data = np.asarray(nib.load(files[1]).dataobj).astype(np.float32)
    data[1, 2, 3] = np.nan
    rewrite(files[1], data)
    capsys.readouterr()
    assert main(cmd) == 2
    assert capsys.readouterr().err.strip() == f"error: {files[1]}: contains 1 NaN or infinite voxel(s); expected finite intensities"
    whole = files[0].read_bytes()
    files[0].write_bytes(whole[:100])
    assert main(cmd) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {files[0]}: truncated gzip")
    assert not (out / "pretrain").exists()
