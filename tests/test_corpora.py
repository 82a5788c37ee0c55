"""Pre-training corpora (TCIA COVID-19, LUNA16, the combined VoCo corpus) and the volume formats they come in:
MetaImage .mhd/.raw (sslbench/data/layouts/ct.py SimpleITKReader) and DICOM series folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sslbench import recipes
from sslbench.cli import main
from sslbench.data import check, corpus, layouts, phantoms, sources
from sslbench.data.layouts import ct as ct_layouts
from sslbench.data.phantoms.ct import write_mhd
from sslbench.data.transforms import preprocess_transforms
from sslbench.errors import DataError, RecipeError

CT5N = Path(__import__("pydicom").data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


from treekit import ids, task, touch  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# Readers on miniature trees of the real layouts
# ----------------------------------------------------------------------------------------------------------
def test_luna16_reads_subsets_and_skips_masks_csvs_and_junk(tmp_path):
    uids = {k: f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{k}0{k}" for k in range(10)}
    for k, uid in uids.items():
        touch(tmp_path / f"subset{k}" / f"{uid}.mhd")
        touch(tmp_path / f"subset{k}" / f"{uid}.raw")
        touch(tmp_path / "seg-lungs-LUNA16" / f"{uid}.mhd")            # lung masks are not scans
    touch(tmp_path / "subset0" / "._x.mhd")
    for name in ("annotations.csv", "candidates.csv", "evaluationScript/annotations/seriesuids.csv"):
        touch(tmp_path / name)
    dl = layouts.load_datalist(task("luna16", val_last=2), tmp_path)
    assert dl.layout == "luna16"
    assert ids(dl.splits["train"]) == [uids[k] for k in range(8)]
    assert ids(dl.splits["val"]) == [uids[8], uids[9]]
    assert dl.splits["train"][0]["label"] is None and dl.splits["train"][0]["image"].endswith(".mhd")


def test_tcia_covid19_nifti_names_and_dicom_series_folders(tmp_path):
    nifti = tmp_path / "nifti"
    for name in ("volume-covid19-A-0003_day000.nii.gz", "volume-covid19-A-0003_day007.nii.gz",
                 "volume-covid19-A-0011.nii.gz", "volume-covid19-A-0014_ct.nii.gz", "._volume-covid19-A-0011.nii.gz",
                 "volume-covid19-A-0014_seg.nii.gz", "notes.txt"):
        touch(nifti / "Train" / name)
    splits = layouts.read_datalist(task("tcia-covid19", val_last=1), nifti)
    assert ids(splits["train"]) == ["volume-covid19-A-0003_day000", "volume-covid19-A-0003_day007",
                                    "volume-covid19-A-0011"]
    assert ids(splits["val"]) == ["volume-covid19-A-0014_ct"]
    dicom = tmp_path / "dicom"
    for patient in ("COVID-19-AR-001", "COVID-19-AR-002"):
        shutil.copytree(CT5N, dicom / patient / "1.2.3-study" / "2.000000-series")
    splits = layouts.read_datalist(task("tcia-covid19", val_last=1), dicom)
    assert ids(splits["train"]) == ["COVID-19-AR-001/1.2.3-study/2.000000-series"]
    assert Path(splits["val"][0]["image"]).is_dir()
    report = check.check_dataset(task("tcia-covid19", val_last=1), dicom)       # images only: no label expected
    assert report.problems == [] and [r["shape"] for r in report.rows] == [(16, 16, 5)] * 2


# ----------------------------------------------------------------------------------------------------------
# Formats: DICOM series (pydicom's shipped CT5N) and MetaImage
# ----------------------------------------------------------------------------------------------------------
def test_dicom_series_reads_as_one_volume_in_hu():
    import pydicom

    slices = sorted((pydicom.dcmread(p) for p in CT5N.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    img = ct_layouts.read_volume(CT5N)
    data = np.asarray(img.dataobj)
    assert data.shape == (16, 16, 5)
    assert np.allclose(img.header.get_zooms()[:3], (0.488281, 0.488281, 2.5), atol=1e-5)
    # HU = stored value * slope + intercept (-1024); RAS voxel (i, j) is DICOM column i, row j; the slices are
    # sorted up the normal (row x column cosines = +z here): z = -1.2375 mm, the lowest, first, step +2.5 mm.
    low, top = slices[0], slices[-1]
    assert float(low.RescaleIntercept) == -1024.0
    assert np.allclose(data[:, :, 0], low.pixel_array.T.astype(float) * float(low.RescaleSlope) - 1024.0)
    assert np.allclose(data[:, :, 4], top.pixel_array.T.astype(float) * float(top.RescaleSlope) - 1024.0)
    assert img.affine[2, 2] == pytest.approx(2.5) and img.affine[2, 3] == pytest.approx(-1.2375)
    # LPS (-72.2, -143.0) of the first voxel is RAS (72.2, 143.0); columns step along -x, rows along -y
    assert img.affine[0, 3] == pytest.approx(72.2, abs=1e-4) and img.affine[1, 3] == pytest.approx(143.0)
    assert img.affine[0, 0] == pytest.approx(-0.488281) and img.affine[1, 1] == pytest.approx(-0.488281)
    out = preprocess_transforms(task("tcia-covid19"), with_label=False)({"image": str(CT5N)})  # MONAI path
    assert out["image"].shape[0] == 1 and float(out["image"].max()) <= 1.0


def test_mhd_round_trip_matches_the_nifti_of_the_same_grid(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 400, size=(20, 18, 12)).astype(np.int16)
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])
    affine[:3, 3] = [180.0, 150.0, -310.0]
    write_mhd(tmp_path / "scan.mhd", data, affine)
    header = (tmp_path / "scan.mhd").read_text()
    assert "ElementType = MET_SHORT" in header and "ElementDataFile = scan.raw" in header
    itk = sitk.ReadImage(str(tmp_path / "scan.mhd"))                    # LUNA16 headers: LPS world coordinates
    assert itk.GetSize() == (20, 18, 12) and np.allclose(itk.GetSpacing(), (0.7, 0.7, 2.5))
    assert np.allclose(itk.GetOrigin(), (-180.0, -150.0, -310.0))
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    t = task("luna16")
    pre = {**t, "preprocess": {**t["preprocess"], "spacing": [0.7, 0.7, 2.5], "crop_foreground": False}}
    a = preprocess_transforms(pre, with_label=False)({"image": str(tmp_path / "scan.mhd")})["image"]
    b = preprocess_transforms(pre, with_label=False)({"image": str(tmp_path / "scan.nii.gz")})["image"]
    assert a.shape == b.shape and np.allclose(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    return phantoms.synth("luna16", tmp_path_factory.mktemp("luna") / "luna16", cases=2, seed=0)


def test_luna16_phantom_is_a_chest_ct_with_nodules(luna):
    scans = sorted((luna / "subset0").glob("*.mhd")) + sorted((luna / "subset1").glob("*.mhd"))
    assert len(scans) == 2 and all(p.with_suffix(".raw").is_file() for p in scans)
    img = ct_layouts.read_volume(scans[0])
    hu = np.asarray(img.dataobj)
    assert hu.dtype == np.int16 and hu.min() <= -1000
    lungs = np.asarray(ct_layouts.read_volume(luna / "seg-lungs-LUNA16" / scans[0].name).dataobj) > 0
    assert lungs.mean() > 0.05 and np.median(hu[lungs]) < -700         # aerated lungs
    rows = (luna / "annotations.csv").read_text().splitlines()
    assert rows[0] == "seriesuid,coordX,coordY,coordZ,diameter_mm" and len(rows) >= 3
    uid, x, y, z, d = rows[1].split(",")
    itk = sitk.ReadImage(str(next(p for p in scans if p.stem == uid)))
    i, j, k = itk.TransformPhysicalPointToIndex((float(x), float(y), float(z)))
    assert -150 < sitk.GetArrayViewFromImage(itk)[k, j, i] < 250 and 3 <= float(d) <= 20   # a solid nodule


def test_covid_lesions_are_ground_glass_or_consolidation_inside_non_contrast_lungs():
    from sslbench.data.phantoms import ct as phantom_ct

    case = phantoms.base._BODIES["chest"](phantoms.base._case_rng(0, "chest", 3001))
    rng = np.random.default_rng(1)
    image, lungs = phantom_ct.non_contrast_chest(case.image, case.label, rng)
    assert case.image[case.label > 0].mean() > 150 and image[case.label > 0].mean() < 80   # bolus removed
    before = image.copy()
    phantom_ct.covid_lesions(image, lungs, case.affine, rng)
    changed = image != before
    assert changed.sum() > 50 and not (changed & ~lungs).any()
    assert np.median(before[changed]) < -750 and -750 < np.median(image[changed]) < 100


def test_missing_raw_is_one_line_naming_both_files(luna, tmp_path):
    root = tmp_path / "luna16"
    shutil.copytree(luna, root)
    raw = next((root / "subset1").glob("*.raw"))
    raw.unlink()
    report = check.check_dataset(task("luna16", val_last=1), root)
    assert len(report.problems) == 1
    line = report.problems[0]
    assert "\n" not in line and str(raw.with_suffix(".mhd")) in line and raw.name in line and "missing" in line
    from sslbench.data.cases import load_cases

    with pytest.raises(DataError, match=r"\.raw is missing") as err:             # the pre-training path
        load_cases([{"id": "x", "image": str(raw.with_suffix(".mhd"))}],
                   preprocess_transforms(task("luna16"), with_label=False), "corpus")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# The combined corpus
# ----------------------------------------------------------------------------------------------------------
def test_combined_corpus_recipes_and_source_roots(monkeypatch, tmp_path):
    full = recipes.load_task("voco-corpus")
    assert [s["task"] for s in full["data"]["sources"]] == ["btcv", "tcia-covid19", "luna16"]
    assert [s["task"] for s in recipes.load_task("voco-corpus-btcv")["data"]["sources"]] == ["btcv", "tcia-covid19"]
    names = ["btcv", "tcia-covid19", "luna16"]
    assert sources.parse_roots("btcv=/a, luna16=/c", names) == {"btcv": "/a", "luna16": "/c"}
    with pytest.raises(RecipeError, match="'brats21' is not a source"):
        sources.parse_roots("brats21=/x", names)
    with pytest.raises(RecipeError, match="NAME=PATH"):
        corpus.corpus_items(full, "/data/one-folder")
    with pytest.raises(DataError, match=r"no root for source 'btcv'.*SSLBENCH_ROOT_BTCV"):
        corpus.corpus_items(full, None)
    nested = {**full, "data": {"sources": [{"task": "phantom-voco-corpus"}]}}
    with pytest.raises(RecipeError, match="'phantom-voco-corpus' is a combined corpus"):
        sources.source_roots(nested, None)
    # Roots from --corpus-root and the environment, each read with its own layout.
    for k in range(3):
        touch(tmp_path / "luna" / "subset0" / f"1.2.{k}.mhd")
    touch(tmp_path / "tcia" / "volume-covid19-A-0001.nii.gz")
    touch(tmp_path / "tcia" / "volume-covid19-A-0002.nii.gz")
    monkeypatch.setenv("SSLBENCH_ROOT_TCIA_COVID19", str(tmp_path / "tcia"))
    sub = {**full, "data": {**full["data"], "sources": [{"task": "tcia-covid19"}, {"task": "luna16"}]}}
    original = recipes.load_task
    monkeypatch.setattr(recipes, "load_task", lambda n: {**original(n), "data": {**original(n)["data"], "val_last": 1}})
    where, is_phantom, items = corpus.corpus_items(sub, f"luna16={tmp_path / 'luna'}", log=lambda _: None)
    assert not is_phantom and f"luna16={tmp_path / 'luna'}" in where
    assert ids(items) == ["tcia-covid19/volume-covid19-A-0001", "tcia-covid19/volume-covid19-A-0002",
                          "luna16/1.2.0", "luna16/1.2.1", "luna16/1.2.2"]


def test_pretrain_voco_on_the_phantom_combined_corpus(phantom_home, tmp_path, capsys):
    assert main(["data", "synth", "--like", "tcia-covid19", "--out", str(tmp_path / "tcia"), "--cases", "2"]) == 0
    assert main(["data", "check", "--task", "tcia-covid19", "--root", str(tmp_path / "tcia")]) == 1   # 49 val > 2
    capsys.readouterr()
    assert main(["data", "check", "--task", "phantom-voco-corpus"]) == 0          # each source in turn
    out = capsys.readouterr().out
    assert out.count("no problems") == 3
    from sslbench.data.locate import locate_data                                  # what a sweep asks first

    tiny = recipes.resolve("voco", None, preset="tiny", corpus="phantom-voco-corpus")["corpus"]
    assert tiny["data"]["phantom_total"] is None                               # tiny: each twin's own cases
    assert locate_data(tiny, None, log=print) == (phantom_home / "phantoms", True)
    assert main(["pretrain", "--method", "voco", "--preset", "tiny", "--corpus", "phantom-voco-corpus",
                 "--set", "method.pretrain.steps=2", "--out", str(tmp_path / "runs")]) == 0
    assert "PHANTOM" in capsys.readouterr().out
    run = next((tmp_path / "runs" / "pretrain" / "voco" / "phantom-voco-corpus").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    expected = 0
    for name in ("phantom-btcv", "phantom-tcia-covid19", "phantom-luna16"):
        t = recipes.load_task(name)
        path = next((phantom_home / "phantoms").glob(f"{t['data']['phantom_like']}-n{t['data']['phantom_cases']}"))
        splits = layouts.read_datalist(t, path)
        expected += len(splits["train"]) + len(splits["val"])
    assert metrics["phantom"] is True and metrics["volumes"] == expected and metrics["steps"] == 2
    assert np.isfinite(metrics["final_loss"]) and (run / "checkpoints" / "backbone.pt").is_file()


def test_phantom_corpora_sizes_by_preset_and_total_split_over_sources():
    from sslbench.data.sources import phantom_shares, source_roots

    paper = recipes.resolve("voco", None, preset="paper", corpus="phantom-voco-corpus")["corpus"]
    assert phantom_shares(paper) == {"phantom-btcv": 80, "phantom-tcia-covid19": 80, "phantom-luna16": 80}
    assert [t["data"]["phantom_cases"] for t, _ in source_roots(paper, None)] == [80, 80, 80]
    odd = recipes.resolve("voco", None, preset="paper", corpus="phantom-voco-corpus",
                          overrides=["corpus.data.phantom_total=7"])["corpus"]
    assert list(phantom_shares(odd).values()) == [3, 2, 2]
    few = recipes.resolve("voco", None, preset="paper", corpus="phantom-voco-corpus",
                          overrides=["corpus.data.phantom_total=5"])["corpus"]
    with pytest.raises(RecipeError, match=r"data\.phantom_total.*at least 6"):
        phantom_shares(few)
    tiny = recipes.resolve("voco", None, preset="tiny", corpus="phantom-voco-corpus")["corpus"]
    assert phantom_shares(tiny) == {}
    assert [t["data"]["phantom_cases"] for t, _ in source_roots(tiny, None)] == [
        recipes.load_task(n)["data"]["phantom_cases"] for n in ("phantom-btcv", "phantom-tcia-covid19", "phantom-luna16")]
    real = recipes.resolve("voco", None, preset="paper", corpus="voco-corpus")["corpus"]
    real["data"]["phantom_total"] = 300
    assert phantom_shares(real) == {}                    # real sources keep their files
    sizes = {p: recipes.resolve("mg", None, preset=p, corpus="phantom-corpus")["corpus"]["data"]["phantom_cases"]
             for p in ("paper", "tiny")}
    assert sizes == {"paper": 200, "tiny": 12}
