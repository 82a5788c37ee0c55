"""Issue 20: time estimates count validation (sliding-window passes x validation cases x validations) and
pre-processing, not only the training steps; hand-computed plans."""
import numpy as np
import pytest
import torch

from sslbench import recipes
from sslbench.protocol import feasibility
from sslbench.cli import main

GIB = 1024 ** 3
CPU2 = feasibility.Machine("cpu", 0, 16 * GIB, 2, "CPU")


def _seg_cfg(val_every=75, max_steps=150, roi=(64, 32, 32), overlap=0.25, f=12):
    return {"run": {"label": "scratch"}, "method": {"name": "scratch"}, "model": {"name": "swinunetr", "feature_size": f},
            "task": {"name": "t", "kind": "segmentation", "classes": ["bg", *"abcdefg"],
                     "finetune": {"roi": list(roi), "max_steps": max_steps, "val_every": val_every, "batch_size": 1,
                                  "num_samples": 1},
                     "evaluate": {"overlap": overlap, "sw_batch_size": 4}}}


def test_sliding_windows_is_monais_grid():
    # x: 80 > 64, a window every int(64 x 0.75) = 48: starts 0, 16 (flush) -> 2; y: 60, every 24: 0, 24, 28 -> 3;
    # z: 40, every 24: 0, 8 -> 2
    assert feasibility.sliding_windows((80, 60, 40), (64, 32, 32), 0.25) == 12
    # smaller than the ROI on every axis: padded to it, one window
    assert feasibility.sliding_windows((50, 20, 32), (64, 32, 32), 0.25) == 1
    assert feasibility.sliding_windows((96, 96, 96), (96, 96, 96), 0.5) == 1
    # overlap 0.5 on 100 voxels with a 64 ROI: every 32 -> starts 0, 32, 36 -> 3 per axis
    assert feasibility.sliding_windows((100, 100, 100), (64, 64, 64), 0.5) == 27

    # and the count MONAI's sliding_window_inference really runs
    from monai.inferers import sliding_window_inference

    seen = []

    def count(x):
        seen.append(x.shape[0])
        return torch.zeros((x.shape[0], 1, *x.shape[2:]))

    for shape, roi, overlap in (((80, 60, 40), (64, 32, 32), 0.25), ((50, 20, 32), (64, 32, 32), 0.25),
                                ((33, 70, 17), (16, 32, 16), 0.5)):
        seen.clear()
        sliding_window_inference(torch.zeros((1, 1, *shape)), roi, 1, count, overlap=overlap)
        assert sum(seen) == feasibility.sliding_windows(shape, roi, overlap), (shape, roi, overlap)


def test_validation_passes_count_the_periodic_ones_the_last_step_and_the_final_evaluation():
    assert feasibility.validation_passes(150, 75) == 3     # steps 75, 150, then the final evaluation
    assert feasibility.validation_passes(100, 30) == 5     # 30, 60, 90, 100 (the last step), final
    assert feasibility.validation_passes(160, 0) == 1      # no periodic validation: the final evaluation only
    assert feasibility.validation_passes(160, None) == 1


def test_validation_estimate_of_a_hand_computed_plan():
    # two validation cases of 80 x 60 x 40 -> 12 windows of 64 x 32 x 32 each, 24 windows a pass, 3 passes
    e = feasibility.estimate_validation(_seg_cfg(), CPU2, [(80, 60, 40), (80, 60, 40)], steps=150)
    assert e.stage == "validate" and e.steps == 3 and e.voxels == 24 * 65_536
    # passes x voxels a pass x f^2 x 7e-8 s (2-core CPU) x 1/3 (a forward pass) = 15.85 s
    assert e.seconds == pytest.approx(3 * 1_572_864 * 144 * 7e-8 / 3) == pytest.approx(15.854, abs=1e-3)
    # weights + optimiser 4.55 M params x 16 B, a window batch's forward (4 x 64 x 32 x 32 x 12 x 55 B / 3 x 2.6),
    # output + count maps of the largest case (80 x 60 x 40 x (7 + 1 + 1 classes) x 4 B)
    assert e.memory == pytest.approx(72_800_000 + 149_946_368 + 6_912_000)
    assert "3 pass(es) x 2 case(s), 24 windows of 64x32x32 a pass" in e.line()
    # on one GPU: the H100 rate of the segmentation family
    gpu = feasibility.Machine("cuda", 1, 80 * GIB, 16, "H100")
    g = feasibility.estimate_validation(_seg_cfg(), gpu, [(80, 60, 40)] * 2, steps=150)
    assert g.seconds == pytest.approx(3 * 1_572_864 * 144 * 1.8e-11 / 3)


def test_preprocessing_estimate_of_a_hand_computed_plan():
    # 10 phantoms of 96 x 96 x 48 to write and pre-process on 2 cores, 10 cases of 80 x 60 x 40 held
    e = feasibility.estimate_preprocessing({"name": "phantom-mmwhs"}, CPU2, [442_368] * 10, to_write=10,
                                           held=[(80, 60, 40)] * 10)
    assert e.seconds == pytest.approx((4_423_680 * 1.7e-7 + 10 * 0.2) / 2) == pytest.approx(1.376, abs=1e-3)
    assert e.memory == 10 * 192_000 * 4 * 2   # image + label, float32
    assert "10 case(s), 4.4 M source voxels, 10 phantom(s) to write first, 10 held in memory" in e.line()
    one = feasibility.Machine("cpu", 0, 16 * GIB, 1, "CPU")
    assert feasibility.estimate_preprocessing({"name": "x"}, one, [1_000_000]).seconds == pytest.approx(0.17)


def test_case_sizes_read_the_cache_the_headers_or_the_phantom_grid(tmp_path, monkeypatch):
    import nibabel as nib

    from sslbench.data.cache import CaseCache

    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    recipe = {"name": "t", "kind": "segmentation", "preprocess": {"spacing": [6.0, 6.0, 6.0]}, "data": {}}
    items = []
    for i in range(2):
        img, lab = tmp_path / f"c{i}.nii.gz", tmp_path / f"c{i}_label.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((40, 30, 20), np.float32), np.diag([3.0, 3.0, 6.0, 1.0])), img)
        nib.save(nib.Nifti1Image(np.zeros((40, 30, 20), np.uint8), np.diag([3.0, 3.0, 6.0, 1.0])), lab)
        items.append({"id": f"c{i}", "image": str(img), "label": str(lab)})
    # case 1 is in the cache at its exact pre-processed shape (after the foreground crop): nothing to pre-process
    CaseCache(recipe, with_label=True).put(items[1], {"image": torch.zeros((1, 17, 15, 9)),
                                                      "label": torch.zeros((1, 17, 15, 9))})
    voxels, shapes, write, notes = feasibility.case_sizes(recipe, items, {"cache": "read"}, True)
    assert voxels == [40 * 30 * 20] and shapes == [(20, 15, 20), (17, 15, 9)] and write == 0 and notes == []
    # run.cache none: both from their headers
    voxels, shapes, _, _ = feasibility.case_sizes(recipe, items, {"cache": "none"}, True)
    assert voxels == [24_000, 24_000] and shapes == [(20, 15, 20)] * 2
    # phantoms not written yet: the generator's grid (96 x 96 x 48 of 3.4 x 3.4 x 4.5 mm), all to write
    voxels, shapes, write, _ = feasibility.case_sizes(recipe, None, {}, True, cases=3)
    assert voxels == [442_368] * 3 and shapes == [(54, 54, 36)] * 3 and write == 3
    # not NIfTI (a DICOM folder): said, not counted
    voxels, shapes, _, notes = feasibility.case_sizes(recipe, [{"id": "d", "image": str(tmp_path)}], {}, True)
    assert voxels == [] and shapes == [] and "not counted" in notes[-1]


def test_validation_can_make_a_plan_infeasible_and_the_dry_run_shows_it(tmp_path, monkeypatch, capsys):
    train = feasibility.estimate_finetune(_seg_cfg(val_every=1, max_steps=100), CPU2)
    val = feasibility.estimate_validation(_seg_cfg(val_every=1, max_steps=100), CPU2, [(200, 200, 200)] * 4, 100)
    assert val.seconds > train.seconds   # 101 passes over 4 cases of 4 x 7 x 7 windows each
    hours = 1.01 * train.seconds / 3600
    assert feasibility.problems([train], CPU2, {"feasibility_hours": hours}) == []
    (found,) = feasibility.problems([train, val], CPU2, {"feasibility_hours": hours})
    assert "of training, validation and pre-processing on CPU (2 cores, no GPU)" in found

    monkeypatch.setenv("SSLBENCH_DATA", str(tmp_path / "home"))
    monkeypatch.setattr(feasibility, "gpu_memory", lambda: (0, 0.0, ""))
    monkeypatch.setattr(feasibility, "cpu_cores", lambda: 2)
    assert main(["run", "--method", "scratch", "--task", "phantom-mmwhs", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    # the tiny preset: 150 steps, validation every 75 -> 3 passes over data.val_last = 2 phantoms not written yet
    assert "estimate: validate scratch on phantom-mmwhs: 3 pass(es) x 2 case(s)" in text
    assert "estimate: preprocess phantom-mmwhs: 10 case(s), 4.4 M source voxels, 10 phantom(s) to write first" in text
    assert not (tmp_path / "home").exists()
