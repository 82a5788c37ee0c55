"""Segmentation metrics against hand-computed cases, region conversion, summaries, and the 1 -> C channel load."""
import json
import math

import numpy as np
import pytest
import torch

from sslbench import metrics
from sslbench.backbones import adapt_input_kernel, build_model, load_backbone
from sslbench.protocol import summarize

BRATS_TASK = {"name": "t", "classes": ["background", "NCR", "ED", "ET"],
              "regions": {"TC": ["NCR", "ET"], "WT": ["NCR", "ED", "ET"], "ET": ["ET"]}}


def _box(shape, lo, hi):
    m = torch.zeros((1, 1) + tuple(shape), dtype=torch.uint8)
    m[(0, 0) + tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


def _sphere(n, centre, radius):
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"))
    inside = ((g - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= radius ** 2
    return torch.from_numpy(inside[None, None].astype(np.uint8))


def test_dice_of_known_overlaps():
    truth = _box((12, 12, 12), (0, 0, 0), (4, 4, 4))          # 64 voxels
    pred = _box((12, 12, 12), (2, 0, 0), (6, 4, 4))           # 64 voxels, 32 shared
    empty = torch.zeros_like(truth)
    d = metrics.dice_per_channel(torch.cat([pred, empty, empty], 1), torch.cat([truth, truth, empty], 1))
    assert d[0, 0].item() == pytest.approx(2 * 32 / 128)
    assert d[0, 1].item() == 0.0                               # missed completely
    assert math.isnan(d[0, 2].item())                          # absent from both: left out of the mean


def test_region_conversion_of_a_hand_built_label():
    label = torch.tensor([0, 1, 2, 3, 3, 2]).view(1, 1, 6, 1, 1)   # bg, NCR, ED, ET, ET, ED
    ids = metrics.region_class_ids(BRATS_TASK)
    assert ids == [[1, 3], [1, 2, 3], [3]]
    r = metrics.labels_to_regions(label, ids)[0, :, :, 0, 0]
    assert r.tolist() == [[0, 1, 0, 1, 1, 0],      # TC = NCR + ET
                          [0, 1, 1, 1, 1, 1],      # WT = everything but background
                          [0, 0, 0, 1, 1, 0]]      # ET
    assert metrics.score_names(BRATS_TASK) == ["TC", "WT", "ET"]
    # Sigmoid regions predict by logit > 0 per channel, independently (regions overlap).
    logits = torch.tensor([[-1.0, 2.0], [3.0, 0.5], [-2.0, -0.1]]).view(1, 3, 2, 1, 1)
    assert metrics.predict_masks(logits, BRATS_TASK)[0, :, :, 0, 0].tolist() == [[0, 1], [1, 1], [0, 0]]
    # Softmax classes predict the arg-max and score the foreground classes only.
    plain = {"classes": ["background", "a", "b"]}
    logits = torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 5.0]]).view(1, 3, 2, 1, 1)
    assert metrics.predict_masks(logits, plain)[0, :, :, 0, 0].tolist() == [[0, 0], [0, 1]]
    with pytest.raises(ValueError, match="regions.TC: 'XX' is not a foreground class"):
        metrics.region_class_ids({**BRATS_TASK, "regions": {"TC": ["XX"]}})


def test_nsd_of_a_shifted_sphere():
    truth = _sphere(40, (20, 20, 20), 8)
    near = _sphere(40, (21, 20, 20), 8)         # shifted by 1 voxel = 1 mm
    far = _sphere(40, (20, 20, 38), 1)          # a small blob 9 mm beyond the sphere's pole
    assert metrics.nsd_per_channel(near, truth, 2.0, (1, 1, 1)).item() == pytest.approx(1.0)
    # Disjoint by far more than the tolerance: no boundary voxel within 1 mm of the other boundary.
    apart = torch.zeros_like(truth)
    apart[0, 0] = torch.roll(truth[0, 0], shifts=-19, dims=2)
    assert metrics.nsd_per_channel(apart, truth, 1.0, (1, 1, 1)).item() == pytest.approx(0.0)
    assert metrics.nsd_per_channel(far, truth, 1.0, (1, 1, 1)).item() == pytest.approx(0.0)
    # The spacing is used: a 2-voxel shift is 2 mm at 1 mm voxels (poles fail a 1.5 mm tolerance) but
    # 1 mm at 0.5 mm voxels along the shift (every boundary voxel within tolerance).
    two = _sphere(40, (22, 20, 20), 8)
    assert metrics.nsd_per_channel(two, truth, 1.5, (1, 1, 1)).item() < 0.95
    assert metrics.nsd_per_channel(two, truth, 1.5, (0.5, 1, 1)).item() == pytest.approx(1.0)
    empty = torch.zeros_like(truth)
    assert metrics.nsd_per_channel(empty, truth, 2.0, (1, 1, 1)).item() == 0.0
    assert math.isnan(metrics.nsd_per_channel(empty, empty, 2.0, (1, 1, 1)).item())


def _brute_nsd(pred: np.ndarray, truth: np.ndarray, tol: float, spacing) -> float:
    """NSD by definition: boundary voxels (a 6-neighbour outside), all pairwise distances in mm."""
    def boundary(m):
        p = np.pad(m, 1)
        inner = p[1:-1, 1:-1, 1:-1].copy()
        for ax in range(3):
            for step in (-1, 1):
                inner &= np.roll(p, step, axis=ax)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.asarray(spacing, float)

    bp, bt = boundary(pred.astype(bool)), boundary(truth.astype(bool))
    d = np.sqrt(((bp[:, None, :] - bt[None, :, :]) ** 2).sum(-1))
    return float(((d.min(1) <= tol).sum() + (d.min(0) <= tol).sum()) / (len(bp) + len(bt)))


def test_nsd_matches_the_definition_on_shifted_boxes():
    truth = _box((24, 24, 24), (5, 5, 5), (15, 15, 15))
    pred = _box((24, 24, 24), (8, 5, 5), (18, 15, 15))       # shifted by 3 voxels along x
    for tol, spacing in ((1.5, (1, 1, 1)), (2.5, (1, 1, 1)), (2.0, (0.7, 1.0, 1.3))):
        want = _brute_nsd(pred[0, 0].numpy(), truth[0, 0].numpy(), tol, spacing)
        assert 0.2 < want < 1.0
        assert metrics.nsd_per_channel(pred, truth, tol, spacing).item() == pytest.approx(want, abs=1e-6)


def test_summarize_keeps_dice_keys_and_adds_nsd():
    rows = [{"case": "a", "x": 0.5, "y": float("nan"), "mean": 0.5, "nsd:x": 0.25, "nsd:y": float("nan"), "nsd:mean": 0.25},
            {"case": "b", "x": 1.0, "y": 0.0, "mean": 0.5, "nsd:x": 0.75, "nsd:y": 0.5, "nsd:mean": 0.625}]
    s = summarize(rows, ["x", "y"])
    assert s["mean_dice"] == pytest.approx(0.5) and s["std_dice"] == pytest.approx(0.0) and s["n_cases"] == 2
    assert s["per_class"] == {"x": pytest.approx(0.75), "y": pytest.approx(0.0)}
    assert s["mean_nsd"] == pytest.approx(0.4375) and s["std_nsd"] == pytest.approx(0.1875)
    assert s["per_class_nsd"] == {"x": pytest.approx(0.5), "y": pytest.approx(0.5)}
    assert "mean_nsd" not in summarize([{k: v for k, v in r.items() if not k.startswith("nsd")} for r in rows], ["x", "y"])


MODEL = {"name": "swinunetr", "feature_size": 12, "use_v2": True}


def test_one_channel_checkpoint_into_a_four_channel_model():
    torch.manual_seed(0)
    one = build_model(MODEL, in_channels=1, out_channels=2).eval()
    four = build_model(MODEL, in_channels=4, out_channels=4).eval()
    report = load_backbone(four, one.state_dict(), "one.pt", channel_adapt="repeat")
    adapted = [a.split(" ")[0] for a in report.adapted]
    assert "swinViT.patch_embed.proj.weight" in adapted
    assert "encoder1.layer.conv1.conv.weight" in adapted and "encoder1.layer.conv3.conv.weight" in adapted
    assert not report.shape_mismatch and "adapted" in report.summary()
    w = one.state_dict()["swinViT.patch_embed.proj.weight"]
    assert torch.equal(four.state_dict()["swinViT.patch_embed.proj.weight"], adapt_input_kernel(w, 4))
    assert torch.allclose(adapt_input_kernel(w, 4).sum(1, keepdim=True), w, atol=1e-7)
    # Invariant: four equal channels give exactly the 1-channel encoder's features.
    x = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        a = one.swinViT(x, one.normalize)
        b = four.swinViT(x.repeat(1, 4, 1, 1, 1), four.normalize)
        for fa, fb in zip(a, b):
            assert torch.allclose(fa, fb, atol=1e-5)
        assert torch.allclose(one.encoder1(x), four.encoder1(x.repeat(1, 4, 1, 1, 1)), atol=1e-5)

    # "random": the input kernels keep their random initialisation and are reported as mismatched.
    fresh = build_model(MODEL, in_channels=4, out_channels=4)
    before = fresh.state_dict()["swinViT.patch_embed.proj.weight"].clone()
    report = load_backbone(fresh, one.state_dict(), "one.pt", channel_adapt="random")
    assert not report.adapted and any(m.startswith("swinViT.patch_embed.proj.weight") for m in report.shape_mismatch)
    assert torch.equal(fresh.state_dict()["swinViT.patch_embed.proj.weight"], before)


def test_report_reads_nsd_from_a_run_record(tmp_path):
    from sslbench import report

    folder = tmp_path / "finetune" / "msd03" / "voco" / "abc-s0"
    folder.mkdir(parents=True)
    (folder / "status.json").write_text('{"state": "finished"}')
    m = {"kind": "finetune", "task": "msd03", "method": "voco", "seed": 0, "protocol": "abc", "metric": "dice",
         "metrics": ["dice", "nsd"], "mean_dice": 0.8, "per_class": {"liver": 0.9, "cancer": 0.7},
         "mean_nsd": 0.6, "per_class_nsd": {"liver": 0.75, "cancer": 0.45}, "n_cases": 2}
    (folder / "metrics.json").write_text(json.dumps(m))
    df = report.collect_runs(tmp_path).set_index("metric")
    assert df.loc["dice", "score"] == pytest.approx(0.8) and df.loc["dice", "dice:cancer"] == pytest.approx(0.7)
    assert df.loc["nsd", "score"] == pytest.approx(0.6) and df.loc["nsd", "dice:liver"] == pytest.approx(0.75)
