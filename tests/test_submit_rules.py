"""Leaderboard packing rules (sslbench/submit.py, issue 24): file names and folders per leaderboard, what each
rule's sources confirm, and MSD's imagesTs predicted and packed end to end on a tiny trained phantom run."""
from __future__ import annotations

import json
import zipfile

import nibabel as nib
import numpy as np
import pytest

from sslbench import recipes, submit
from sslbench.errors import RecipeError


def _item(image, cid="x"):
    return {"id": cid, "image": image}


def test_archive_names_per_leaderboard():
    task = {"name": "btcv"}
    # BTCV and AMOS22: the image's own name; AMOS22 inside results/
    assert submit.archive_name(_item("/d/Testing/img/img0061.nii.gz", "0061"), "btcv", task) == "img0061.nii.gz"
    assert submit.archive_name(_item("/d/imagesTs/amos_0401.nii.gz"), "amos22", task) == "results/amos_0401.nii.gz"
    # FLARE23: named as the case's label file, the nnU-Net channel suffix dropped (only at the end)
    assert submit.archive_name(_item("/d/imagesVal/FLARE23_0001_0000.nii.gz"), "flare23", task) == "FLARE23_0001.nii.gz"
    assert submit.archive_name(_item("/d/x/case_0000_a.nii.gz"), "flare23", task) == "case_0000_a.nii.gz"
    # MSD: the Decathlon's task folder, whatever the folder the images were read from; a 4-D image keeps its name
    for name, folder in (("msd04", "Task04_Hippocampus"), ("phantom-msd01", "Task01_BrainTumour"),
                         ("msd-spleen", "Task09_Spleen"), ("msd09", "Task09_Spleen"), ("msd10", "Task10_Colon")):
        t = {"name": name, **({"extends": name[len("phantom-"):]} if name.startswith("phantom-") else {})}
        assert submit.archive_name(_item("/tmp/copy/imagesTs/BRATS_485.nii.gz"), "msd", t) == f"{folder}/BRATS_485.nii.gz"
    with pytest.raises(RecipeError, match="task 'btcv': not an MSD task"):
        submit.archive_name(_item("/d/img0061.nii.gz"), "msd", {"name": "btcv"})


def test_only_a_fully_sourced_rule_is_verified_and_every_other_says_what_is_not():
    for board, rule in submit.RULES.items():
        assert rule["verified"] == (rule["unconfirmed"] is None), board
        assert rule["verified"] <= bool(rule["sources"]), board
    assert [b for b, r in submit.RULES.items() if r["verified"]] == ["amos22"]
    assert "all ten tasks" in submit.RULES["msd"]["unconfirmed"]
    assert submit.RULES["btcv"]["source"] == "not found"


def test_msd_imagests_predicted_and_packed_from_a_tiny_trained_phantom_run(phantom_home, tmp_path, capsys):
    from sslbench.cli import main
    from sslbench.data import layouts

    fast = ["--set", "task.finetune.max_steps=1", "--set", "task.finetune.roi=[64,32,32]",
            "--set", "task.finetune.num_samples=1", "--set", "task.finetune.val_every=0",
            "--set", "task.evaluate.overlap=0.0", "--set", "task.finetune.warmup_steps=1",
            "--set", "task.data.phantom_cases=8", "--set", "model.feature_size=12"]
    assert main(["run", "--method", "scratch", "--task", "phantom-msd04", "--out", str(tmp_path), *fast]) == 0
    run = next((tmp_path / "finetune" / "phantom-msd04" / "scratch").iterdir())
    root = json.loads((run / "data.json").read_text())["root"]
    tests = layouts.read_datalist(recipes.resolve("scratch", "phantom-msd04")["task"], root)["test"]
    images = sorted(f["image"].rsplit("/", 1)[1] for f in tests)
    assert len(images) == 2 and all(i.startswith("hippocampus_") for i in images)     # imagesTs, named as MSD's
    capsys.readouterr()
    assert main(["predict", str(run)]) == 0                                 # --split test: the imagesTs images
    out = run / "predictions" / "test"
    assert sorted(p.name for p in out.glob("*.nii.gz")) == images          # one file per image, its name
    assert main(["submit", str(run), "--leaderboard", "msd"]) == 0
    said = capsys.readouterr().out
    assert "2 predictions packed for msd" in said and "NOT verified" in said
    with zipfile.ZipFile(run / "submissions" / "msd-test.zip") as zf:
        assert sorted(zf.namelist()) == [f"Task04_Hippocampus/{i}" for i in images]
        for t in tests:
            name = t["image"].rsplit("/", 1)[1]
            assert zf.read(f"Task04_Hippocampus/{name}") == (out / name).read_bytes()
            pred, src = nib.load(str(out / name)), nib.load(t["image"])
            assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
            assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2}
    # a run of another task is refused for MSD's board and MSD's run for another board; a missing case too
    assert main(["submit", str(run), "--leaderboard", "amos22"]) == 2
    assert "a phantom-msd04 run; --leaderboard amos22 takes amos22 runs" in capsys.readouterr().err
    (out / images[1]).unlink()
    assert main(["submit", str(run), "--leaderboard", "msd", "--out", str(tmp_path / "again.zip")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"prediction of case {images[1][:-7]} missing" in err
    assert not (tmp_path / "again.zip").exists()


def test_flare23_imagests_is_the_test_split_and_packs_as_its_label_names(tmp_path):
    from sslbench.data import layouts
    from treekit import task, touch

    for n in (1, 2, 3):
        touch(tmp_path / "imagesTr" / f"FLARE23_{n:04d}_0000.nii.gz")
        touch(tmp_path / "labelsTr" / f"FLARE23_{n:04d}.nii.gz")
    t = task("flare23", val_last=1)
    assert "test" not in layouts.load_datalist(t, tmp_path).splits         # no imagesTs: no test split
    for n in (101, 102):
        touch(tmp_path / "imagesTs" / f"FLARE23Ts_{n:04d}_0000.nii.gz")
    dl = layouts.load_datalist(t, tmp_path)
    tests = dl.splits["test"]
    assert [i["id"] for i in tests] == ["FLARE23Ts_0101", "FLARE23Ts_0102"] and all(i["label"] is None for i in tests)
    assert dl.origin["test"] == "images in imagesTs/" and len(dl.splits["train"]) == 2
    assert [submit.archive_name(i, "flare23", t) for i in tests] == ["FLARE23Ts_0101.nii.gz", "FLARE23Ts_0102.nii.gz"]
