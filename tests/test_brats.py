"""BraTS 2021: the distributed layout, fold file, four channels, WT / TC / ET regions, phantom and a tiny run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sslbench import metrics, protocol, recipes
from sslbench.cli import main
from sslbench.tasks import segmentation
from sslbench.data import check, layouts, phantoms
from sslbench.data.layouts import brats
from sslbench.data.transforms import preprocess_transforms
from sslbench.errors import DataError

FAST = ["--set", "task.finetune.max_steps=2", "--set", "task.finetune.roi=[64,32,32]",
        "--set", "task.finetune.val_every=0", "--set", "task.finetune.checkpoint_every=2",
        "--set", "task.finetune.log_every=1", "--set", "task.evaluate.overlap=0.0",
        "--set", "task.finetune.warmup_steps=1", "--set", "task.evaluate.sw_batch_size=8",
        "--set", "task.preprocess.spacing=[6,6,6]", "--set", "run.cache=write"]   # cases keyed by all 4 files


def task(name: str = "phantom-brats21", **data) -> dict:
    t = recipes.load_task(name)
    t["data"].update(data)
    return t


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return phantoms.synth("brats21", tmp_path_factory.mktemp("brats"), cases=5, seed=0)


def test_synth_check_and_tiny_run(tmp_path, capsys, phantom_home):
    assert main(["data", "synth", "--like", "brats21", "--out", str(tmp_path / "data"), "--cases", "3"]) == 0
    root = tmp_path / "data"
    cases = sorted((root / "TrainingData").iterdir())
    assert [c.name for c in cases] == ["BraTS2021_00001", "BraTS2021_00003", "BraTS2021_00005"]
    assert sorted(p.name for p in cases[0].iterdir()) == [f"BraTS2021_00001_{m}.nii.gz"
                                                          for m in ("flair", "seg", "t1", "t1ce", "t2")]
    assert main(["data", "check", "--task", "phantom-brats21", "--root", str(root)]) == 0
    out = tmp_path / "runs"
    assert main(["run", "--method", "scratch", "--task", "phantom-brats21", "--root", str(root), "--out", str(out),
                 *FAST]) == 0
    out_text = capsys.readouterr().out
    assert "NSD (%) @ 2.0 mm" in out_text and "HD95 (mm)" in out_text
    run = next((out / "finetune" / "phantom-brats21" / "scratch").iterdir())
    text = (run / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text                                 # strict JSON
    m = json.loads(text)
    assert m["scored"] == "regions" and list(m["per_class"]) == ["TC", "WT", "ET"]
    assert list(m["per_class_nsd"]) == ["TC", "WT", "ET"] and m["n_cases"] == 1 and m["train_cases"] == 2
    assert 0.0 <= m["mean_dice"] <= 1.0
    assert (run / "cases.csv").read_text().splitlines()[0] == ("case,TC,WT,ET,mean,nsd:TC,nsd:WT,nsd:ET,nsd:mean,"
                                                               "hd95:TC,hd95:WT,hd95:ET,hd95:mean")
    assert list(m["per_class_hd95"]) == ["TC", "WT", "ET"]
    assert m["scoring"]["dice"] == {"both_empty": 1.0, "one_empty": 0.0}            # BraTS' rules
    assert m["scoring"]["hd95"]["one_empty"] == 373.12866 and m["scoring"]["nsd"]["tolerance_mm"] == 2.0

    # A 1-channel checkpoint fine-tuned on the 4 channels: the recipe's channel_adapt (repeat) is applied and
    # recorded in the run's load report.
    from sslbench.models.backbones import build_model

    ckpt = tmp_path / "one-channel.pt"
    cfg = recipes.resolve("scratch", "phantom-brats21")
    torch.save(build_model(cfg["model"], in_channels=1, out_channels=2).state_dict(), ckpt)
    assert main(["finetune", "--task", "phantom-brats21", "--root", str(root), "--out", str(tmp_path / "ft"),
                 "--init", str(ckpt), *FAST, "--set", "task.finetune.max_steps=1"]) == 0
    ft = next((tmp_path / "ft" / "finetune" / "phantom-brats21" / "external").iterdir())
    load = json.loads((ft / "metrics.json").read_text())["init"]["load"]
    assert "swinViT.patch_embed.proj.weight (12, 1, 2, 2, 2) -> (12, 4, 2, 2, 2)" in load["adapted"]
    assert load["shape_mismatch"] == []


def test_layout_channels_and_splits(tree, tmp_path):
    t = task()
    splits = layouts.read_datalist(t, tree)
    assert [it["id"] for it in splits["val"]] == ["BraTS2021_00009"]               # data.val_last: 1
    item = splits["train"][0]
    assert [Path(p).name for p in item["image"]] == [f"{item['id']}_{m}.nii.gz" for m in ("flair", "t1ce", "t1", "t2")]
    assert Path(item["label"]).name == f"{item['id']}_seg.nii.gz"
    # The fold file (SwinUNETR's brats21_folds.json): fold 1 holds the cases i % 5 == 1.
    folds = layouts.read_datalist(task(val_fold=1), tree)
    assert [it["id"] for it in folds["val"]] == ["BraTS2021_00003"] and len(folds["train"]) == 4
    with pytest.raises(DataError, match="no case has \"fold\": 7"):
        layouts.read_datalist(task(val_fold=7), tree)
    bare = tmp_path / "bare"
    shutil.copytree(tree / "TrainingData", bare / "RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021")
    assert layouts.detect_layout(t, bare) == "brats"                                 # one folder below the root
    with pytest.raises(DataError, match=r"brats21_folds.json: fold file not found"):
        layouts.read_datalist(task(val_fold=0), bare)
    shutil.copytree(tree / "TrainingData", bare / "copy")
    with pytest.raises(DataError, match="holds several folders of BraTS2021_"):
        layouts.detect_layout(t, bare)


def test_check_names_a_missing_or_misaligned_modality(tree, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(tree, root)
    case = root / "TrainingData" / "BraTS2021_00001"
    (case / "BraTS2021_00001_t2.nii.gz").unlink()
    other = root / "TrainingData" / "BraTS2021_00003" / "BraTS2021_00003_t1.nii.gz"
    img = nib.load(other)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), other)
    report = check.check_dataset(task(), root)
    assert len(report.problems) == 2, report.problems
    assert report.problems[0].startswith(str(case / "BraTS2021_00001_t2.nii.gz"))
    assert report.problems[1].startswith(str(other)) and "expected every channel on the same grid" in report.problems[1]


def test_phantom_is_a_brain_with_nested_tumour_regions(tree):
    t = task()
    item = layouts.read_datalist(t, tree)["train"][0]
    raw = {m: np.asarray(nib.load(p).dataobj) for m, p in zip(("flair", "t1ce", "t1", "t2"), item["image"])}
    seg = np.asarray(nib.load(item["label"]).dataobj)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
    brain = raw["t1"] > 0
    assert 0.15 < brain.mean() < 0.6 and (raw["flair"][~brain] == 0).all()          # skull-stripped head
    assert (seg[~brain] == 0).all()
    # Contrasts: ET enhances on T1ce, edema is bright on FLAIR and T2 compared with white matter.
    wm = brain & (seg == 0) & (raw["t1"] > np.percentile(raw["t1"][brain], 70))
    assert raw["t1ce"][seg == 4].mean() > 1.3 * raw["t1ce"][wm].mean()
    assert raw["flair"][seg == 2].mean() > 1.5 * raw["flair"][wm].mean()
    assert raw["t2"][seg == 2].mean() > 1.5 * raw["t2"][wm].mean()
    # Nested: the enhancing rim surrounds the necrotic core, the edema surrounds the core.
    from scipy import ndimage

    core = (seg == 1) | (seg == 4)
    assert ndimage.binary_dilation(seg == 1, iterations=2)[seg == 2].sum() < 0.05 * (seg == 2).sum()
    assert ndimage.binary_dilation(core, iterations=2)[seg == 2].any()


def test_regions_agree_with_monai_brats_conversion(tree):
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    t = task()
    item = layouts.read_datalist(t, tree)["train"][1]
    case = preprocess_transforms(t)(item)
    assert case["image"].shape[0] == 4 and set(torch.unique(case["label"]).tolist()) <= {0.0, 1.0, 2.0, 3.0}
    ours = metrics.labels_to_regions(case["label"][None], metrics.region_class_ids(t))[0]
    raw = case["label"].clone()
    raw[raw == 3] = 4                                     # back to BraTS values for MONAI's converter
    ref = ConvertToMultiChannelBasedOnBratsClasses()(raw[0])
    assert torch.equal(ours.bool(), torch.as_tensor(ref).bool())
    # z-score per channel over the brain.
    for c in range(4):
        ch = case["image"][c]
        assert abs(float(ch[ch != 0].mean())) < 0.05
    with pytest.raises(DataError, match="expected 4"):
        protocol.check_cases([{"image": case["image"][:3], "label": case["label"], "id": "x"}], t, [item], "b.yaml")


def test_recipe_carries_the_seed_settings():
    t = recipes.load_task("brats21")
    assert t["channels"] == ["flair", "t1ce", "t1", "t2"] and list(t["regions"]) == ["TC", "WT", "ET"]
    assert t["finetune"]["epochs"] == 500 and t["finetune"]["labeled_cases"] == 387 and t["data"]["val_last"] == 97
    assert t["preprocess"]["normalize"] == "zscore" and t["finetune"]["roi"] == [96, 96, 96]
    assert recipes.output_channels(t) == 3 and recipes.input_channels(t) == 4
    assert type(segmentation.make_loss(t)).__name__ == "DiceLoss"
    tiny = recipes.resolve("scratch", "phantom-brats21")["task"]
    assert tiny["finetune"]["labeled_cases"] is None
    with pytest.raises(Exception, match="regions"):
        recipes.resolve("scratch", "brats21", overrides=["task.regions={TC: [NCR, XX]}"])
    with pytest.raises(DataError, match="not a BraTS modality"):
        brats.channel_order({"name": "x", "channels": ["flair", "dwi"]})
