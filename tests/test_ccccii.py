"""CC-CCII (3D classification): slice-folder reader, fold CSVs, metrics, augmentation, phantom, a tiny run."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslbench import recipes
from sslbench.tasks import classification as classify
from sslbench.cli import main
from sslbench.data import classification as cls_data
from sslbench.data.phantoms import classification as cls_phantoms
from sslbench.data import layouts, phantoms
from sslbench.errors import DataError

TASK = recipes.load_task("ccccii")


def _scan(root: Path, cls: str, patient: int, scan: int, n: int = 3, value: int = 50, names=None) -> Path:
    folder = root / cls / str(patient) / str(scan)
    folder.mkdir(parents=True)
    for i, name in enumerate(names or [f"{k}.png" for k in range(n)]):
        Image.fromarray(np.full((8, 8), value + i, np.uint8)).save(folder / name)
    return folder


def _tree(root: Path) -> Path:
    # slice numbers 0..10 (natural order: 2.png before 10.png); patient 7 has two scans
    _scan(root, "NCP", 7, 101, names=[f"{k}.png" for k in range(11)])
    _scan(root, "NCP", 7, 102)
    _scan(root, "CP", 8, 201)
    _scan(root, "CP", 9, 202)
    _scan(root, "Normal", 10, 301)
    _scan(root, "Normal", 11, 302)
    (root / "NCP" / "7" / "101" / "._0.png").write_bytes(b"junk")        # macOS archive junk
    (root / "__MACOSX").mkdir()
    return root


def _fold_csv(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["zip_file,target,label,patient_id,scan_id,n_slice,scan_count,all_scan_ids"]
    lines += [f"{c}-1.zip,{['Normal', 'CP', 'NCP'].index(c)},{c},{p},{s},3,1,\"[{s}]\"" for c, p, s in rows]
    path.write_text("\n".join(lines) + "\n")


def test_reader_uses_the_fold_csvs_and_stacks_slices_in_order(tmp_path):
    root = _tree(tmp_path)
    _fold_csv(root / "csv" / "CC_CCII_fold0_train.csv", [("NCP", 7, 101), ("NCP", 7, 102), ("CP", 8, 201),
                                                         ("Normal", 10, 301)])
    _fold_csv(root / "csv" / "CC_CCII_fold0_valid.csv", [("CP", 9, 202), ("Normal", 11, 302)])
    splits = layouts.read_datalist(TASK, root)
    assert [it["id"] for it in splits["train"]] == ["p7-s101", "p7-s102", "p8-s201", "p10-s301"]
    assert [it["id"] for it in splits["val"]] == ["p9-s202", "p11-s302"]
    assert [it["label"] for it in splits["val"]] == [1, 0]                 # CP = 1, Normal = 0 (the CSV's target)
    first = splits["train"][0]
    assert [Path(f).name for f in first["slices"]][:4] == ["0.png", "1.png", "2.png", "3.png"]
    assert len(first["slices"]) == 11 and first["patient"] == "7"
    vol = cls_data.load_scan(first["slices"], (11, 8, 8))
    assert vol.shape == (11, 8, 8) and list(vol[:, 4, 4]) == list(range(50, 61))   # slice k holds 50 + k


def test_fold_csv_naming_a_scan_that_is_not_on_disk_is_one_clear_line(tmp_path):
    root = _tree(tmp_path)
    _fold_csv(root / "CC_CCII_fold0_train.csv", [("NCP", 7, 101), ("CP", 8, 999)])
    _fold_csv(root / "CC_CCII_fold0_valid.csv", [("Normal", 11, 302)])
    with pytest.raises(DataError, match=r"CC_CCII_fold0_train.csv line 3: scan p8-s999 .*expected the folder CP/8/999/"):
        layouts.read_datalist(TASK, root)


def test_missing_slices_are_an_error_naming_the_scan(tmp_path):
    root = _tree(tmp_path)
    _scan(root, "CP", 12, 203, names=["0000.png", "0001.png", "0004.png"])
    with pytest.raises(DataError, match=r"CP/12/203: slice numbers jump from 0001.png to 0004.png \(2 missing\)"):
        layouts.read_datalist(TASK, root)


def test_slice_count_disagreeing_with_unzip_filenames_is_an_error(tmp_path):
    root = _tree(tmp_path)
    (root / "unzip_filenames.csv").write_text("zip_file,label,patient_id,scan_id,n_slice\nCP-1.zip,CP,8,201,5\n")
    with pytest.raises(DataError, match=r"201: 3 slices, but unzip_filenames.csv line 2 lists 5"):
        layouts.read_datalist(TASK, root)


def test_without_fold_csvs_the_split_is_patient_disjoint_stratified_and_fixed(tmp_path):
    root = _tree(tmp_path)
    for p in range(20, 29):   # more patients per class
        _scan(root, ("NCP", "CP", "Normal")[p % 3], p, 400 + p)
    dl = layouts.load_datalist(TASK, root)
    train, val = dl.splits["train"], dl.splits["val"]
    assert "patient-disjoint" in dl.origin["val"]
    assert not {it["patient"] for it in train} & {it["patient"] for it in val}
    assert {it["label"] for it in val} == {0, 1, 2}                       # every class in validation
    assert len(train) + len(val) == 15
    again = layouts.load_datalist(TASK, root)
    assert [it["id"] for it in again.splits["val"]] == [it["id"] for it in val]
    other = layouts.load_datalist({**TASK, "data": {**TASK["data"], "val_fold": 1}}, root)
    assert not {it["id"] for it in other.splits["val"]} & {it["id"] for it in val}


def test_accuracy_and_auc_on_hand_cases():
    # binary AUC of a known ranking: positives 0.35, 0.8 vs negatives 0.1, 0.4 -> 3 of 4 pairs ordered
    assert classify.binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert classify.binary_auc(np.array([0.1, 0.2]), np.array([1, 1])) is None     # undefined: one class only
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3]])
    truth = np.array([0, 1, 2, 0])
    assert classify.accuracy(probs, truth) == pytest.approx(0.75)            # the last case is wrong
    s = classify.summarize(probs, truth, TASK)
    # Normal vs rest: scores 0.7, 0.3 (Normal) vs 0.2, 0.1 -> 1.0; CP: 0.5 vs 0.2, 0.3, 0.4 -> 1.0;
    # NCP: 0.6 vs 0.1, 0.3, 0.3 -> 1.0
    assert s["per_class"] == {"Normal": 1.0, "CP": 1.0, "NCP": 1.0}
    assert s["metric"] == "accuracy" and s["mean_accuracy"] == pytest.approx(0.75)
    assert s["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=30)
    t = rng.integers(0, 3, size=30)
    assert classify.summarize(p, t, TASK)["mean_auc"] == pytest.approx(roc_auc_score(t, p, multi_class="ovr"))


def test_batched_augmentation_flips_exactly_and_shifts_intensities():
    x = torch.rand(3, 1, 4, 6, 8)
    flip = {"signs": torch.tensor([[-1.0, 1, 1], [1, 1, 1], [1, -1, -1]]), "shift": torch.zeros(3, 3),
            "brightness": torch.zeros(3), "contrast": torch.ones(3)}
    out = classify.apply_augmentation(x, flip)
    torch.testing.assert_close(out[0], torch.flip(x[0], dims=[1]))         # slice axis (spatial axis 0)
    torch.testing.assert_close(out[1], x[1])
    torch.testing.assert_close(out[2], torch.flip(x[2], dims=[2, 3]))
    flat = torch.full((2, 1, 4, 4, 4), 0.5)
    bc = {"signs": torch.ones(2, 3), "shift": torch.full((2, 3), 0.1), "brightness": torch.tensor([0.1, -0.1]),
          "contrast": torch.tensor([1.05, 0.95])}
    out = classify.apply_augmentation(flat, bc)
    torch.testing.assert_close(out[0], torch.full_like(out[0], 0.63))     # (0.5 + 0.1) * 1.05, shift of a constant
    torch.testing.assert_close(out[1], torch.full_like(out[1], 0.38))     # (0.5 - 0.1) * 0.95
    gen = torch.Generator().manual_seed(0)
    params = classify.draw_augmentation(64, 3, TASK["finetune"], gen)
    assert set(params["signs"][:, 0].tolist()) == {-1.0, 1.0} and (params["signs"][:, 1:] == 1).all()
    assert params["brightness"].abs().max() <= 0.07 and (params["contrast"] - 1).abs().max() <= 0.05


def test_phantom_classes_differ_in_the_lungs_as_designed():
    rng = lambda n: np.random.default_rng(n)  # noqa: E731
    normal, cp, ncp = (cls_phantoms.ct_chest_scan(rng(1), c) for c in ("Normal", "CP", "NCP"))
    # lung-window CT: dark lungs, so the fraction of dark voxels inside the body drops with opacities
    dark = lambda v: float((v < 40).mean())  # noqa: E731
    assert dark(cp) < dark(normal) and dark(ncp) < dark(normal)
    assert normal.max() > 200                                                # bone


def test_synth_check_and_tiny_run(phantom_home, tmp_path, capsys):
    out = tmp_path / "cc"
    root = phantoms.synth("ccccii", out, cases=6, seed=0)
    assert (root / "csv" / "CC_CCII_fold0_valid.csv").is_file() and (root / "unzip_filenames.csv").is_file()
    scans = list(root.glob("*/*/*"))
    assert {p.parts[-3] for p in scans} == {"NCP", "CP", "Normal"} and len(scans) >= 8   # some patients: 2 scans
    assert main(["data", "check", "--task", "ccccii", "--root", str(root)]) == 0
    assert "no problems" in capsys.readouterr().out
    fast = ["--set", "task.preprocess.size=[32,32,32]", "--set", "task.finetune.max_steps=4",
            "--set", "task.finetune.val_every=2", "--set", "task.finetune.checkpoint_every=2",
            "--set", "task.finetune.log_every=2", "--set", "task.evaluate.batch_size=8"]
    assert main(["run", "--method", "scratch", "--task", "phantom-ccccii", "--root", str(root),
                 "--out", str(tmp_path / "runs"), *fast]) == 0
    text = capsys.readouterr().out
    assert "PHANTOM" in text and "accuracy" in text
    run = next((tmp_path / "runs" / "finetune" / "phantom-ccccii" / "scratch").iterdir())
    for name in ("metrics.json", "cases.csv", "split.csv", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["phantom"] is True and m["metric"] == "accuracy" and m["task_kind"] == "classification"
    assert 0.0 <= m["mean_accuracy"] <= 1.0 and list(m["per_class"]) == ["Normal", "CP", "NCP"]
    assert m["n_cases"] == len(m["cases"]) >= 3 and sum(map(sum, m["confusion"])) == m["n_cases"]
    assert "CC_CCII_fold0_valid.csv" in m["split"]["val"]["from"]
    assert any("val_accuracy" in h for h in m["history"])
    header = (run / "cases.csv").read_text().splitlines()[0]
    assert header == "case,patient,truth,pred,p:Normal,p:CP,p:NCP"
    assert main(["run", "--method", "scratch", "--task", "phantom-ccccii", "--root", str(root),
                 "--out", str(tmp_path / "runs"), *fast]) == 0
    assert "already finished" in capsys.readouterr().out


def test_a_pretrained_swinunetr_checkpoint_initialises_the_encoder(tmp_path):
    """Every method's backbone.pt is in SwinUNETR's key layout: its swinViT tensors load, the rest is reported."""
    from sslbench.models.backbones import build_model

    cfg = {"feature_size": 12, "use_v2": True}
    pretrained = build_model(cfg, in_channels=1, out_channels=1)
    path = tmp_path / "backbone.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in pretrained.state_dict().items()}}, path)
    model = classify.build_classifier(cfg, 3, 3)
    report = classify._load_init(model, {"path": str(path)})
    n_swin = sum(1 for k in model.state_dict() if k.startswith("swinViT."))
    assert len(report.matched) == n_swin and not report.missing
    assert any(k.startswith("encoder1.") for k in report.unexpected)       # CNN encoder blocks: not used here
    key = "swinViT.layers4.0.blocks.1.mlp.linear1.weight"
    torch.testing.assert_close(model.state_dict()[key], pretrained.state_dict()[key])
    x = torch.rand(2, 1, 32, 32, 32)
    assert model(x).shape == (2, 3)
