"""Segmentation metrics against hand-computed cases, region conversion, summaries, and the 1 -> C channel load."""
import json
import math

import numpy as np
import pytest
import torch

from sslbench import metrics, recipes
from sslbench.models.backbones import adapt_input_kernel, build_model, load_backbone
from sslbench.tasks.segmentation import summarize

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


def _plain_task(**evaluate) -> dict:
    return {"name": "t", "classes": ["background", "a", "b"], "preprocess": {"spacing": [1.0, 1.0, 1.0]},
            "evaluate": {"metrics": ["dice"], **evaluate}}


def test_a_false_positive_in_an_absent_class_scores_zero_and_counts():
    # Class a is segmented perfectly; class b is absent from the truth but predicted as a 6x6x6 = 216-voxel cube.
    truth = torch.zeros((1, 1, 16, 16, 16), dtype=torch.long)
    truth[0, 0, 2:8, 2:8, 2:8] = 1
    pred = truth.clone()
    pred[0, 0, 9:15, 9:15, 9:15] = 2
    task = _plain_task()
    p = metrics.labels_to_onehot(pred, 3)[:, 1:]
    t = metrics.truth_masks(truth, task)
    assert int(p[0, 1].sum()) == 216 and int(t[0, 1].sum()) == 0
    assert metrics.dice_per_channel(p, t)[0].tolist() == [1.0, 0.0]
    row = metrics.case_scores(p, t, task)
    assert row == {"a": 1.0, "b": 0.0, "mean": 0.5}                 # not 1.0: the false positive counts
    # Missed (present in the truth, absent from the prediction) scores 0 as well, and counts.
    assert metrics.dice_per_channel(t, p)[0].tolist() == [1.0, 0.0]
    # Over cases: a second case where b is absent from both is NaN for b (left out) and 1.0 for a.
    both_empty = metrics.case_scores(t, t, task)
    assert both_empty["a"] == 1.0 and math.isnan(both_empty["b"]) and both_empty["mean"] == 1.0
    s = summarize([{"case": "fp", **row}, {"case": "ok", **both_empty}], ["a", "b"])
    assert s["mean_dice"] == pytest.approx(0.75) and s["per_class"] == {"a": 1.0, "b": 0.0}


def test_empty_sets_follow_the_task_convention():
    empty = torch.zeros((1, 1, 8, 8, 8), dtype=torch.uint8)
    blob = _box((8, 8, 8), (2, 2, 2), (4, 4, 4))
    pred, truth = torch.cat([blob, empty, blob], 1), torch.cat([blob, empty, empty], 1)
    # Defaults: both empty = NaN (left out of the case mean), one empty = 0 (counts), HD95 of one empty = NaN.
    task = {**BRATS_TASK, "preprocess": {"spacing": [1.0, 1.0, 1.0]},
            "evaluate": {"metrics": ["dice", "nsd", "hd95"], "nsd_tolerance": 1.0}}
    row = metrics.case_scores(pred, truth, task)
    assert row["TC"] == 1.0 and math.isnan(row["WT"]) and row["ET"] == 0.0 and row["mean"] == 0.5
    assert row["nsd:TC"] == pytest.approx(1.0) and math.isnan(row["nsd:WT"]) and row["nsd:ET"] == 0.0
    assert row["hd95:TC"] == 0.0 and math.isnan(row["hd95:WT"]) and math.isnan(row["hd95:ET"])
    assert row["hd95:mean"] == 0.0 and row["nsd:mean"] == pytest.approx(0.5)
    # BraTS (benchmarks/brats21.yaml, as nnU-Net's compute_BraTS_dice / compute_BraTS_HD95): both empty = Dice 1
    # and HD95 0 mm, one empty = Dice 0 and HD95 373.12866 mm; the phantom twin inherits the rules.
    for name in ("brats21", "phantom-brats21"):
        ev = recipes.load_task(name)["evaluate"]
        assert ev["empty"] == {"both": 1.0, "one": 0.0} and ev["hd95_empty"] == 373.12866
        assert "hd95" in ev["metrics"]
    brats = {**task, "evaluate": {**task["evaluate"], "empty": {"both": 1.0, "one": 0.0}, "hd95_empty": 373.12866}}
    row = metrics.case_scores(pred, truth, brats)
    assert [row["TC"], row["WT"], row["ET"], row["mean"]] == [1.0, 1.0, 0.0, pytest.approx(2 / 3)]
    assert [row["hd95:TC"], row["hd95:WT"], row["hd95:ET"]] == [0.0, 0.0, 373.12866]
    assert row["nsd:WT"] == 1.0 and row["nsd:ET"] == 0.0
    sc = metrics.scoring(brats)
    assert sc["dice"] == {"both_empty": 1.0, "one_empty": 0.0}
    assert sc["nsd"]["method"] == "surface-area (MONAI use_subvoxels)" and sc["nsd"]["tolerance_mm"] == 1.0
    assert sc["hd95"]["both_empty"] == 0.0 and sc["hd95"]["one_empty"] == 373.12866
    assert metrics.scoring(task)["dice"] == {"both_empty": "nan", "one_empty": 0.0}
    assert metrics.scoring(task)["hd95"]["both_empty"] == "nan"


def _mc_area(a: int, b: int, c: int, s) -> tuple[float, float, float]:
    """Marching-cubes surface area of an a x b x c voxel box at spacing s (the surface NSD weighs): its flat
    faces, its bevelled edges and its 8 corner triangles; and the areas of its x = end layer of surface elements
    and of the ring one voxel inside it (see the test)."""
    sx, sy, sz = s
    corner = math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 8          # one corner triangle
    faces = 2 * ((b - 1) * (c - 1) * sy * sz + (a - 1) * (c - 1) * sx * sz + (a - 1) * (b - 1) * sx * sy)
    edges = 2 * ((a - 1) * sx * math.hypot(sy, sz) + (b - 1) * sy * math.hypot(sx, sz) + (c - 1) * sz * math.hypot(sx, sy))
    total = faces + edges + 8 * corner
    end = (b - 1) * (c - 1) * sy * sz + (b - 1) * sy * math.hypot(sx, sz) + (c - 1) * sz * math.hypot(sx, sy) + 4 * corner
    ring = 2 * (c - 1) * sx * sz + 2 * (b - 1) * sx * sy + 2 * sx * math.hypot(sy, sz)
    return total, end, ring


def test_nsd_is_surface_area_weighted_on_hand_computed_boxes():
    # Two 4 x 3 x 5 boxes side by side along x with a 2-voxel gap, at anisotropic spacing 0.8 x 1.5 x 2.0 mm.
    # Surface elements sit between voxel centres; the facing end faces are 2 * 0.8 = 1.6 mm apart, the next layer
    # of elements (a ring round the side faces) 3 * 0.8 = 2.4 mm. Within 1.6 <= tol < 2.4 mm only the facing end
    # layers count: NSD = 2 * end / (2 * total); at 2.4 mm the rings join: (end + ring) / total.
    s, (a, b, c), gap = (0.8, 1.5, 2.0), (4, 3, 5), 2
    truth = _box((20, 12, 14), (2, 3, 4), (2 + a, 3 + b, 4 + c))
    pred = _box((20, 12, 14), (2 + a + gap, 3, 4), (2 + 2 * a + gap, 3 + b, 4 + c))
    total, end, ring = _mc_area(a, b, c, s)
    assert total == pytest.approx(156.529947, abs=1e-5) and end / total == pytest.approx(0.293011, abs=1e-6)
    for tol in (1.6, 2.0, 2.39):
        assert metrics.nsd_per_channel(pred, truth, tol, s).item() == pytest.approx(end / total, abs=1e-6)
    assert metrics.nsd_per_channel(pred, truth, 2.4, s).item() == pytest.approx((end + ring) / total, abs=1e-6)
    assert metrics.nsd_per_channel(pred, truth, 1.5, s).item() == 0.0
    # Counting boundary voxels instead (the old NSD) gives another number for the same masks.
    from monai.metrics import compute_surface_dice

    voxels = compute_surface_dice(pred.bool(), truth.bool(), [2.0], include_background=True, spacing=list(s)).item()
    assert abs(voxels - end / total) > 0.02


def test_nsd_equals_monai_subvoxel_nsd_on_anisotropic_masks():
    from monai.metrics import compute_surface_dice

    truth = _sphere(28, (14, 14, 14), 7)
    pred = _sphere(28, (15, 13, 14), 6)
    masks = torch.cat([pred, truth], 1), torch.cat([truth, _sphere(28, (12, 14, 15), 8)], 1)
    for tol, spacing in ((1.0, (0.7, 1.0, 2.5)), (2.0, (1.2, 0.6, 3.0)), (0.5, (1.0, 1.0, 1.0))):
        got = metrics.nsd_per_channel(*masks, tol, spacing)
        want = compute_surface_dice(masks[0].bool(), masks[1].bool(), [tol, tol], include_background=True,
                                    spacing=list(spacing), use_subvoxels=True)
        assert torch.allclose(got, want.double(), atol=1e-7) and bool(((got > 0.1) & (got < 0.99)).all())


def test_hd95_of_hand_computed_cases():
    # Two 1 x 5 x 5 plates 3 voxels apart along x: every boundary voxel is 3 voxels from the other plate, 4.5 mm
    # at 1.5 mm along x (the other axes' spacing does not matter here).
    truth = _box((10, 10, 10), (2, 2, 2), (3, 7, 7))
    pred = _box((10, 10, 10), (5, 2, 2), (6, 7, 7))
    assert metrics.hd95_per_channel(pred, truth, (1.5, 1.0, 2.0)).item() == pytest.approx(4.5)
    assert metrics.hd95_per_channel(pred, truth, (0.5, 3.0, 3.0)).item() == pytest.approx(1.5)
    # The 95th percentile, not the maximum: a 10^3 cube plus one stray voxel 14 voxels off each axis of its far
    # corner keeps HD95 0 (the stray voxel is one of 489 boundary voxels), whereas its Hausdorff distance is
    # 14 * sqrt(3) mm.
    cube = _box((30, 30, 30), (2, 2, 2), (12, 12, 12))
    stray = cube.clone()
    stray[0, 0, 25, 25, 25] = 1
    assert metrics.hd95_per_channel(stray, cube, (1.0, 1.0, 1.0)).item() == 0.0
    from monai.metrics import compute_hausdorff_distance

    assert compute_hausdorff_distance(stray.bool(), cube.bool(), include_background=True,
                                      spacing=[1.0, 1.0, 1.0]).item() == pytest.approx(14 * math.sqrt(3))
    empty = torch.zeros_like(cube)
    assert math.isnan(metrics.hd95_per_channel(empty, cube, (1.0, 1.0, 1.0)).item())
    assert metrics.hd95_per_channel(empty, cube, (1.0, 1.0, 1.0), one=373.12866).item() == 373.12866
    assert metrics.hd95_per_channel(empty, empty, (1.0, 1.0, 1.0), both=0.0).item() == 0.0


def test_summarize_keeps_dice_keys_and_adds_nsd():
    rows = [{"case": "a", "x": 0.5, "y": float("nan"), "mean": 0.5, "nsd:x": 0.25, "nsd:y": float("nan"), "nsd:mean": 0.25},
            {"case": "b", "x": 1.0, "y": 0.0, "mean": 0.5, "nsd:x": 0.75, "nsd:y": 0.5, "nsd:mean": 0.625}]
    s = summarize(rows, ["x", "y"])
    assert s["mean_dice"] == pytest.approx(0.5) and s["std_dice"] == pytest.approx(0.0) and s["n_cases"] == 2
    assert s["per_class"] == {"x": pytest.approx(0.75), "y": pytest.approx(0.0)}
    assert s["mean_nsd"] == pytest.approx(0.4375) and s["std_nsd"] == pytest.approx(0.1875)
    assert s["per_class_nsd"] == {"x": pytest.approx(0.5), "y": pytest.approx(0.5)}
    assert "mean_nsd" not in summarize([{k: v for k, v in r.items() if not k.startswith("nsd")} for r in rows], ["x", "y"])


def test_confusion_counts_where_each_true_class_went():
    # a 1 x 6 label map: truth 0 0 1 1 2 2, prediction 0 1 1 2 2 2
    truth = torch.tensor([[0, 0, 1, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 2, 2, 2]])
    c = metrics.confusion_counts(pred, truth, 3)
    assert c == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]          # rows: truth, columns: prediction
    # Dice of class 1 from the counts: 2 * 1 / (row 2 + column 2) = 0.5, as dice_per_channel says
    d = metrics.dice_per_channel(metrics.labels_to_onehot(pred[:, None], 3)[:, 1:],
                                 metrics.labels_to_onehot(truth[:, None], 3)[:, 1:])
    assert float(d[0, 0]) == pytest.approx(2 * c[1][1] / (sum(c[1]) + sum(r[1] for r in c)))
    assert metrics.summed_confusion([c, c]) == [[2, 2, 0], [0, 2, 2], [0, 0, 4]]
    block = {"labels": ["background", "LA", "aorta"], "counts": [[5, 0, 0], [0, 1, 3], [0, 0, 4]]}
    assert metrics.confused_with(block, "LA") == ("aorta", 0.75)     # 3 of LA's 4 voxels went to the aorta
    assert metrics.confused_with(block, "aorta") is None             # it kept its voxels
    assert metrics.confused_with({**block, "counts": [[5, 0, 0], [0, 0, 0], [0, 0, 4]]}, "LA") is None  # absent


def test_summarize_sums_the_cases_confusion_and_keeps_it_out_of_the_rows():
    rows = [{"case": "a", "x": 0.5, "mean": 0.5, "confusion": [[3, 1], [1, 1]]},
            {"case": "b", "x": 1.0, "mean": 1.0, "confusion": [[2, 0], [0, 4]]}]
    s = summarize(rows, ["x"])
    assert s["confusion"] == {"labels": ["background", "x"], "counts": [[5, 1], [1, 5]]}
    assert s["per_class"] == {"x": pytest.approx(0.75)} and "confusion" in rows[0]   # the input is left alone
    assert "confusion" not in summarize([{k: v for k, v in r.items() if k != "confusion"} for r in rows], ["x"])


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
    from sslbench.report.runs import collect_runs

    folder = tmp_path / "finetune" / "msd03" / "voco" / "abc-s0"
    folder.mkdir(parents=True)
    (folder / "status.json").write_text('{"state": "finished"}')
    m = {"kind": "finetune", "task": "msd03", "method": "voco", "seed": 0, "protocol": "abc", "metric": "dice",
         "metrics": ["dice", "nsd"], "mean_dice": 0.8, "per_class": {"liver": 0.9, "cancer": 0.7},
         "mean_nsd": 0.6, "per_class_nsd": {"liver": 0.75, "cancer": 0.45}, "n_cases": 2}
    (folder / "metrics.json").write_text(json.dumps(m))
    df = collect_runs(tmp_path).set_index("metric")
    assert df.loc["dice", "score"] == pytest.approx(0.8) and df.loc["dice", "dice:cancer"] == pytest.approx(0.7)
    assert df.loc["nsd", "score"] == pytest.approx(0.6) and df.loc["nsd", "dice:liver"] == pytest.approx(0.75)


def test_summary_and_results_table_carry_hd95_and_units():
    rows = [{"case": "a", "TC": 0.5, "mean": 0.5, "nsd:TC": 0.25, "nsd:mean": 0.25, "hd95:TC": 4.0, "hd95:mean": 4.0},
            {"case": "b", "TC": 1.0, "mean": 1.0, "nsd:TC": 0.75, "nsd:mean": 0.75, "hd95:TC": float("nan"),
             "hd95:mean": float("nan")}]
    s = summarize(rows, ["TC"])
    assert s["mean_hd95"] == 4.0 and s["std_hd95"] == 0.0 and s["per_class_hd95"] == {"TC": 4.0}
    from rich.console import Console

    from sslbench.tasks.segmentation import Segmentation

    console = Console(record=True, width=200)
    Segmentation.print_results({"method": "scratch", "task_title": "T", "n_cases": 2, "nsd_tolerance_mm": 2.0, **s}, console)
    text = console.export_text()
    assert "Dice (%)" in text and "NSD (%) @ 2.0 mm" in text and "HD95 (mm)" in text
    assert "75.00 ± 25.00" in text and "50.00 ± 25.00" in text and "4.00 ± 0.00" in text


def test_existing_run_hashes_are_unchanged_by_the_empty_keys():
    # Hashes of recipes resolved before evaluate.empty / evaluate.hd95_empty existed (main at d8286c0).
    cfg = recipes.resolve("scratch", "phantom-mmwhs")
    assert cfg["task"]["evaluate"]["empty"]["one"] == 0.0 and math.isnan(cfg["task"]["evaluate"]["hd95_empty"])
    assert recipes.protocol_hash(cfg) == "57e10608ca0e"
    assert recipes.protocol_hash(recipes.resolve("scratch", "btcv")) == "383053d98ec0"
    voco = recipes.resolve("voco", "btcv", corpus="phantom-corpus")   # a real task's default is now voco-corpus-btcv
    assert recipes.protocol_hash(recipes.split_config(voco, "corpus")) == "635d66100ebc"
    # nan written out explicitly is the default too; any other rule is another protocol.
    assert recipes.protocol_hash(recipes.resolve("scratch", "btcv", overrides=["task.evaluate.empty.both=nan"])) \
        == "383053d98ec0"
    assert recipes.protocol_hash(recipes.resolve("scratch", "btcv", overrides=["task.evaluate.empty.both=1"])) \
        != "383053d98ec0"
    assert recipes.protocol_hash(recipes.resolve("scratch", "btcv", overrides=["task.evaluate.empty={both: nan, one: 0}"])) \
        == "383053d98ec0"
    assert recipes.protocol_hash(recipes.resolve("scratch", "btcv", overrides=["task.evaluate.hd95_empty=100"])) \
        != "383053d98ec0"
    with pytest.raises(recipes.RecipeError, match="evaluate.empty.both"):
        recipes.resolve("scratch", "btcv", overrides=["task.evaluate.empty.both=lots"])
