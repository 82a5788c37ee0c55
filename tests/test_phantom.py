"""Procedural phantoms (sslbench/data/phantoms/): real layouts, plausible anatomy, determinism."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sslbench import recipes

from sslbench.data import check, layouts, phantoms
from sslbench.errors import DataError

MMWHS_RAW = {0, 205, 420, 500, 550, 600, 820, 850}

# like -> (task recipe, data overrides, cases, expected (train, val, test) sizes)
CASES = {
    "btcv": ("btcv", {}, 6, (5, 1, 1)),
    "btcv-raw": ("btcv", {}, 6, (5, 1, 1)),
    "msd-spleen": ("msd-spleen", {"val_last": 2}, 6, (4, 2, 1)),
    "mmwhs": ("mmwhs", {"val_last": 2}, 5, (3, 2, 0)),
}


def task(name: str, **data) -> dict:
    """The resolved task recipe (extends + defaults, as the protocol sees it) with data keys overridden."""
    t = recipes.load_task(name)
    t["data"].update(data)
    return t


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """One phantom tree per like (seed 0), shared by the tests of this module."""
    base = tmp_path_factory.mktemp("phantoms")
    return {like: phantoms.synth(like, base / like, cases=spec[2], seed=0) for like, spec in CASES.items()}


def load_ras(item: dict) -> dict:
    """Image and label as MONAI's training pipeline sees them: channel first, reoriented to RAS."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    keys = ["image", "label"]
    ras = (("L", "R"), ("P", "A"), ("I", "S"))
    tf = Compose([LoadImaged(keys, reader="NibabelReader"), EnsureChannelFirstd(keys),
                  Orientationd(keys, axcodes="RAS", labels=ras)])
    out = tf({"image": item["image"], "label": item["label"]})
    return {"image": np.asarray(out["image"][0]), "label": np.asarray(out["label"][0]).astype(int)}


def centroid(label: np.ndarray, value: int) -> np.ndarray:
    return np.argwhere(label == value).mean(axis=0)


@pytest.mark.parametrize("like", list(CASES))
def test_round_trip(trees, like):
    name, over, cases, (n_train, n_val, n_test) = CASES[like]
    root = trees[like]
    t = task(name, **over)
    if like == "msd-spleen":
        assert root.name == "Task09_Spleen"
    marker = json.loads((root / phantoms.MARKER).read_text())
    assert marker == {"like": like, "cases": cases, "seed": 0, "generator": "sslbench.data.phantom", "version": 1,
                      "note": "procedurally generated phantom, not real patient data", "test_cases": n_test}
    assert not (root / phantoms.PARTIAL_MARKER).exists()

    splits = layouts.read_datalist(t, root)
    assert (len(splits["train"]), len(splits["val"]), len(splits.get("test", []))) == (n_train, n_val, n_test)
    report = check.check_dataset(t, root)
    assert report.problems == [] and report.phantom
    assert report.layout == {"btcv": "monai-json", "btcv-raw": "btcv-raw", "msd-spleen": "msd", "mmwhs": "mmwhs"}[like]
    assert len(report.rows) == n_train + n_val + n_test

    raw_values = set()
    for row in report.rows:
        if row["labels"] is not None:
            raw_values |= set(row["labels"])
    expected = {"btcv": set(range(14)), "btcv-raw": set(range(14)), "msd-spleen": {0, 1}, "mmwhs": MMWHS_RAW}[like]
    assert raw_values == expected

    img = nib.load(splits["train"][0]["image"])
    lab = nib.load(splits["train"][0]["label"])
    assert img.get_data_dtype() == np.int16 and img.shape == lab.shape
    assert np.allclose(img.affine, lab.affine) and not np.allclose(img.affine, np.eye(4))
    assert img.affine[0, 0] < 0 and img.affine[1, 1] < 0             # scanner-like LPS storage
    zooms = img.header.get_zooms()
    assert zooms[0] == pytest.approx(zooms[1]) and abs(zooms[2] - zooms[0]) > 0.1   # anisotropic
    assert img.shape[:2] == (96, 96) and 40 <= img.shape[2] <= 56
    spacings = {row["spacing"] for row in report.rows}
    assert len(spacings) == len(report.rows)                          # spacing varies per case
    summary = check.summarize(report)
    assert [s["split"] for s in summary] == [s for s in ("train", "val", "test") if s in splits]


def test_btcv_and_btcv_raw_hold_the_same_volumes(trees):
    a = trees["btcv"] / "imagesTr" / "img0035.nii.gz"
    b = trees["btcv-raw"] / "RawData" / "Training" / "img" / "img0035.nii.gz"
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_abdomen_anatomy_after_ras_orientation(trees):
    t = task("btcv")
    splits = layouts.read_datalist(t, trees["btcv"])
    items = splits["train"] + splits["val"]
    flips = [nib.load(it["image"]).affine[2, 2] < 0 for it in items]
    assert any(flips) and not all(flips)       # slice order differs between cases: orientation matters
    means: dict[int, list[float]] = {v: [] for v in range(1, 14)}
    for item in items:
        case = load_ras(item)
        img, lab = case["image"], case["label"]
        assert set(np.unique(lab)) == set(range(14)), item["label"]       # all 13 organs in every case
        c = {v: centroid(lab, v) for v in range(1, 14)}
        # RAS arrays: axis 0 grows towards the patient's right, axis 1 anterior, axis 2 superior
        assert c[6][0] > c[1][0], f"liver not right of spleen in {item['image']}"
        assert c[2][0] > c[3][0], "right kidney not right of left kidney"
        assert c[9][0] > c[8][0], "IVC not right of aorta"
        assert c[12][0] > c[13][0], "right adrenal not right of left adrenal"
        assert c[1][1] < c[7][1], "spleen not posterior to stomach"
        assert c[2][1] < c[4][1], "kidney not posterior to gallbladder"
        assert c[6][2] > c[2][2], "liver not above the right kidney"
        assert c[12][2] > c[2][2], "right adrenal not above the right kidney"
        corners = img[:5, :5, :]
        assert corners.mean() < -900                                      # air around the body
        assert img.max() > 300                                            # bone
        body = img[lab == 0]
        assert np.mean((body > -200) & (body < 0)) > 0.05                 # fat exists
        for v in range(1, 14):
            means[v].append(float(img[lab == v].mean()))
    m = {v: np.mean(vals) for v, vals in means.items()}
    assert 80 < m[6] < 140 and m[4] < 40 and m[2] > m[6] + 30 and m[8] > m[6] + 40
    assert np.std(list(m.values())) > 25                                  # organs differ in HU


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_mmwhs_heart(trees):
    t = task("mmwhs", val_last=2)
    splits = layouts.read_datalist(t, trees["mmwhs"])
    for item in splits["train"] + splits["val"]:
        case = load_ras(item)
        img, lab = case["image"], case["label"]
        assert set(np.unique(lab)) == MMWHS_RAW
        lv, myo = img[lab == 500].mean(), img[lab == 205].mean()
        assert 250 < lv < 500 and 50 < myo < 160 and lv > myo + 150
        assert np.mean(img < -700) > 0.15                                 # lungs + air
        assert centroid(lab, 550)[0] > centroid(lab, 420)[0]              # RA right of LA
        assert centroid(lab, 420)[1] < centroid(lab, 600)[1]              # LA posterior to RV
        assert centroid(lab, 820)[2] > centroid(lab, 500)[2]              # aorta above the LV
        myo_mask = lab == 205
        lv_mask = lab == 500
        # the myocardium wraps the LV cavity: dilating the cavity by one voxel hits mostly myocardium
        from scipy import ndimage

        rim = ndimage.binary_dilation(lv_mask) & ~lv_mask
        assert np.mean(myo_mask[rim]) > 0.6


def test_same_seed_same_bytes_other_seed_other_volumes(tmp_path):
    a = phantoms.synth("mmwhs", tmp_path / "a", cases=2, seed=3)
    b = phantoms.synth("mmwhs", tmp_path / "b", cases=2, seed=3)
    c = phantoms.synth("mmwhs", tmp_path / "c", cases=2, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    img_a = nib.load(a / "ct_train" / "ct_train_1001_image.nii.gz").get_fdata()
    img_c = nib.load(c / "ct_train" / "ct_train_1001_image.nii.gz").get_fdata()
    assert img_a.shape != img_c.shape or not np.array_equal(img_a, img_c)


def test_unknown_like_lists_the_valid_ones(tmp_path):
    with pytest.raises(DataError) as err:
        phantoms.synth("brats", tmp_path)
    assert all(like in str(err.value) for like in phantoms.LIKES)
    assert {"btcv", "btcv-raw", "msd-spleen", "mmwhs"} <= set(phantoms.LIKES)
    assert len(set(phantoms.LIKES)) == len(phantoms.LIKES)


def test_resynth_replaces_a_phantom_but_never_real_data(tmp_path):
    root = phantoms.synth("btcv-raw", tmp_path / "p", cases=3, seed=0, test_cases=0)
    assert len(list((root / "RawData" / "Training" / "img").iterdir())) == 3
    phantoms.synth("btcv-raw", root, cases=2, seed=1, test_cases=0)       # fewer cases: stale ones removed
    assert sorted(p.name for p in (root / "RawData" / "Training" / "img").iterdir()) == ["img0001.nii.gz",
                                                                                           "img0035.nii.gz"]
    real = tmp_path / "real"
    (real / "imagesTr").mkdir(parents=True)
    with pytest.raises(DataError, match="refusing to overwrite"):
        phantoms.synth("btcv", real, cases=1)


def test_interrupted_synth_is_flagged_and_recoverable(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = phantoms._Job.write_case

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(phantoms._Job, "write_case", failing)
    with pytest.raises(KeyboardInterrupt):
        phantoms.synth("mmwhs", tmp_path, cases=3)
    root = tmp_path
    assert not (root / phantoms.MARKER).exists() and (root / phantoms.PARTIAL_MARKER).exists()
    assert not [p for p in root.rglob("*partial-*")]                  # no half-written file left behind
    report = check.check_dataset(task("mmwhs", val_last=1), root)
    assert report.phantom and any(phantoms.PARTIAL_MARKER in p for p in report.problems)
    monkeypatch.setattr(phantoms._Job, "write_case", original)
    phantoms.synth("mmwhs", tmp_path, cases=3)
    assert (root / phantoms.MARKER).exists() and not (root / phantoms.PARTIAL_MARKER).exists()
    assert check.check_dataset(task("mmwhs", val_last=1), root).problems == []


def test_a_case_is_a_function_of_its_own_stream_only():
    """What lets synth write cases on threads in any order (its speed: benchmarks/phantom_synth.py)."""
    for body, fn in (("abdomen", phantoms.base.abdomen), ("chest", phantoms.base.chest)):
        later = fn(phantoms.base._case_rng(0, body, 102))        # case 102 first, then 100 and 102 again
        first = fn(phantoms.base._case_rng(0, body, 100))
        again = fn(phantoms.base._case_rng(0, body, 102))
        assert np.array_equal(later.image, again.image) and np.array_equal(later.label, again.label)
        assert first.image.shape != later.image.shape or not np.array_equal(first.image, later.image)


def test_cases_written_by_threads_are_the_bytes_one_thread_writes(tmp_path, monkeypatch):
    """synth generates cases on $SSLBENCH_LOAD_WORKERS threads; each case has its own random stream, so the
    tree is byte-identical to a one-thread synth, whatever the threads' order."""
    import threading

    original = phantoms._Job._write_case
    threads: dict[str, set] = {}

    def recorded(self, *args):
        threads.setdefault(os.environ["SSLBENCH_LOAD_WORKERS"], set()).add(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(phantoms._Job, "_write_case", recorded)
    roots = {}
    for workers in ("1", "3"):
        monkeypatch.setenv("SSLBENCH_LOAD_WORKERS", workers)
        roots[workers] = phantoms.synth("btcv", tmp_path / f"w{workers}", cases=5, seed=2)
    assert threads["1"] == {threading.current_thread().name}                    # one thread: the caller's
    assert len(threads["3"]) > 1 and all(n.startswith("sslbench-phantom") for n in threads["3"])
    files = sorted(str(p.relative_to(roots["1"])) for p in roots["1"].rglob("*") if p.is_file())
    assert len([f for f in files if f.endswith(".nii.gz")]) == 5 + 1 + 5   # 5 images + 1 test image, 5 labels
    assert files == sorted(str(p.relative_to(roots["3"])) for p in roots["3"].rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(roots["1"], roots["3"], files, shallow=False)
    assert mismatch == [] and errors == []


def test_a_case_failing_on_a_thread_fails_the_synth_before_its_marker(tmp_path, monkeypatch):
    """A write that fails after its temporary file is written (the rename): the synth raises it, leaves no marker
    and no temporary file, and the cases still queued behind it are never written."""
    monkeypatch.setenv("SSLBENCH_LOAD_WORKERS", "2")
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith("ct_train_1002_image.nii.gz"):
            assert Path(src).is_file()                                           # the temporary file exists
            raise OSError("disk full")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(phantoms.base.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        phantoms.synth("mmwhs", tmp_path, cases=12)
    assert not (tmp_path / phantoms.MARKER).exists() and (tmp_path / phantoms.PARTIAL_MARKER).exists()
    assert not [p for p in tmp_path.rglob("*partial-*")]                       # no half-written file left behind
    assert not (tmp_path / "ct_train" / "ct_train_1002_image.nii.gz").exists()
    assert not (tmp_path / "ct_train" / "ct_train_1012_image.nii.gz").exists()  # queued behind: cancelled


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_a_bad_thread_count_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch, value):
    monkeypatch.setenv("SSLBENCH_LOAD_WORKERS", value)
    with pytest.raises(DataError) as err:
        phantoms.synth("mmwhs", tmp_path / "p", cases=2)
    assert "$SSLBENCH_LOAD_WORKERS" in str(err.value) and repr(value) in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "p").exists()


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_abdomen_cases_vary_in_organ_size_position_and_enhancement(trees):
    """Issue 18, section 2: anatomy varies per case (habitus, organ size, position, contrast), so pre-training on
    the phantom corpus has something to learn. Measured in world units (mm, ml, HU), not voxels."""
    t = task("btcv")
    splits = layouts.read_datalist(t, trees["btcv"])
    volume, offset, enhancement = [], [], []
    for item in splits["train"] + splits["val"]:
        lab, img = nib.load(item["label"]), nib.load(item["image"])
        labels, hu = np.asarray(lab.dataobj).astype(int), np.asarray(img.dataobj, dtype=np.float64)
        voxel_ml = abs(np.linalg.det(lab.affine[:3, :3])) / 1000.0

        def world_centroid(value: int) -> np.ndarray:
            return lab.affine[:3, :3] @ np.argwhere(labels == value).mean(axis=0) + lab.affine[:3, 3]

        volume.append(voxel_ml * np.count_nonzero(labels == 6))                 # liver, ml
        offset.append(world_centroid(6) - world_centroid(8))                     # liver relative to the aorta, mm
        enhancement.append(hu[labels == 6].mean())                              # liver, mean HU
    volume, offset = np.array(volume), np.array(offset)
    assert len(volume) == 6
    assert volume.max() - volume.min() > 0.15 * volume.mean(), volume           # liver sizes differ
    assert offset.std(axis=0).max() > 3.0, offset                               # so do organ positions
    assert np.ptp(enhancement) > 8.0, enhancement                                # and the enhancement
    assert len({tuple(np.round(o, 1)) for o in offset}) == len(offset)          # no two cases alike
