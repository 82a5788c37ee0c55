"""DICOM folders (sslbench/data/layouts/ct.py): split by SeriesInstanceUID, each series validated (localizer,
single slice, mixed orientations, non-uniform slice spacing skipped with a named reason), read at its spacing."""
from __future__ import annotations

import numpy as np
import pytest

from sslbench import recipes
from sslbench.data import check, layouts
from sslbench.data.layouts import ct as ct_layouts
from sslbench.data.transforms import preprocess_transforms
from sslbench.errors import DataError

from dicomkit import write_series


def task(name: str, **data) -> dict:
    t = recipes.load_task(name)
    t["data"].update(data)
    return t


def test_uniform_series_is_sorted_along_the_normal_and_read_at_its_gap(tmp_path):
    write_series(tmp_path / "s", [12.0, 15.0, 18.0, 21.0], series_uid="1.2.3.1")     # files written z-descending
    scan = ct_layouts.scan_dicom_folder(tmp_path / "s")
    assert scan.skipped == [] and len(scan.series) == 1
    series = scan.series[0]
    assert series.shape == (8, 6, 4) and series.spacing == pytest.approx((0.7, 0.8, 3.0))
    img = ct_layouts.read_volume(tmp_path / "s")
    data = np.asarray(img.dataobj)
    # slice k: stored 100 (k + 1) - 1024 HU, pixel (row 0, column 1) = k - 1024; voxel (i, j) = (column, row)
    assert [float(data[3, 3, k]) for k in range(4)] == [-924.0, -824.0, -724.0, -624.0]
    assert [float(data[1, 0, k]) for k in range(4)] == [-1024.0, -1023.0, -1022.0, -1021.0]
    assert data[0, 1, 0] == -924.0
    # LPS origin (-10, -20, 12) is RAS (10, 20, 12); columns step 0.7 mm along -x, rows 0.8 mm along -y
    assert np.allclose(img.affine, [[-0.7, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 3, 12], [0, 0, 0, 1]], atol=1e-6)


def test_a_202_mm_gap_is_skipped_as_non_uniform_spacing_not_read_as_an_average(tmp_path):
    write_series(tmp_path / "gap", [0.0, 2.5, 5.0, 207.0, 209.5], series_uid="1.2.3.2")
    scan = ct_layouts.scan_dicom_folder(tmp_path / "gap")
    assert scan.series == []
    assert scan.skipped == [(f"{tmp_path / 'gap'}#series=1.2.3.2",
                             "non-uniform slice spacing (gaps 2.5..202 mm, median 2.5)")]
    with pytest.raises(DataError, match=r"no usable DICOM series \(non-uniform slice spacing"):
        ct_layouts.read_volume(tmp_path / "gap")
    # within +-10% of the median gap is uniform (rounded positions of a real scanner)
    write_series(tmp_path / "ok", [0.0, 2.5, 5.2, 7.5, 10.0], series_uid="1.2.3.3")
    assert len(ct_layouts.scan_dicom_folder(tmp_path / "ok").series) == 1


def test_two_series_in_one_folder_are_two_volumes(tmp_path):
    folder = tmp_path / "COVID-19-AR-001" / "study" / "mixed"
    write_series(folder, [0.0, 5.0, 10.0], series_uid="1.2.3.10", value=lambda k: 1000, prefix="a")
    write_series(folder, [0.0, 1.0, 2.0, 3.0], series_uid="1.2.3.20", value=lambda k: 2000, prefix="b")
    scan = ct_layouts.scan_dicom_folder(folder)
    assert [(s.uid, s.shape[2], s.spacing[2]) for s in scan.series] == [("1.2.3.10", 3, 5.0), ("1.2.3.20", 4, 1.0)]
    t = task("tcia-covid19", val_last=1)
    splits = layouts.read_datalist(t, tmp_path)
    assert [it["id"] for it in splits["train"]] == ["COVID-19-AR-001/study/mixed/1.2.3.10"]
    assert [it["id"] for it in splits["val"]] == ["COVID-19-AR-001/study/mixed/1.2.3.20"]
    first, second = splits["train"][0]["image"], splits["val"][0]["image"]
    assert first == f"{folder}#series=1.2.3.10"
    a, b = ct_layouts.read_volume(first), ct_layouts.read_volume(second)
    assert a.shape == (8, 6, 3) and float(np.asarray(a.dataobj)[3, 3, 1]) == 1000.0 - 1024.0
    assert b.shape == (8, 6, 4) and float(np.asarray(b.dataobj)[3, 3, 1]) == 2000.0 - 1024.0
    # the folder as a whole is not one volume
    with pytest.raises(DataError, match=r"2 DICOM series in one folder; expected one"):
        ct_layouts.read_volume(folder)
    # the MONAI pipeline reads one series of the folder (DicomSeriesReader), and data check accepts both
    out = preprocess_transforms(t, with_label=False)({"image": second})
    assert out["image"].shape[0] == 1
    report = check.check_dataset(t, tmp_path)
    assert report.problems == [] and [r["shape"] for r in report.rows] == [(8, 6, 3), (8, 6, 4)]


def test_localizer_single_slice_and_mixed_orientations_are_skipped_and_counted(tmp_path, capsys):
    from sslbench.data import corpus

    root = tmp_path / "tcia"
    write_series(root / "p1" / "scan", [0.0, 2.0, 4.0], series_uid="1.2.3.1")
    write_series(root / "p1" / "scan", [0.0, 1.0, 2.0], series_uid="1.2.3.2", prefix="loc",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(root / "p2" / "scout", [0.0], series_uid="1.2.3.3")
    tilted = (1.0, 0.0, 0.0, 0.0, 0.9848, -0.1736)                # 10 degrees about x
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    write_series(root / "p3" / "mixed", [0.0, 2.0, 4.0], series_uid="1.2.3.4",
                 orientations=[axial, tilted, axial])
    write_series(root / "p4" / "gap", [0.0, 2.0, 4.0, 206.0], series_uid="1.2.3.5")
    write_series(root / "p5" / "scan", [0.0, 2.0, 4.0], series_uid="1.2.3.6")
    reasons = {uid: r for s in map(ct_layouts.scan_dicom_folder, [root / "p1" / "scan", root / "p2" / "scout",
                                                                  root / "p3" / "mixed", root / "p4" / "gap"])
               for ref, r in s.skipped for uid in [ref.split("#series=")[1]]}
    assert reasons == {"1.2.3.2": "localizer", "1.2.3.3": "single slice", "1.2.3.4": "mixed orientations",
                       "1.2.3.5": "non-uniform slice spacing (gaps 2..202 mm, median 2)"}
    t = task("tcia-covid19", val_last=1)
    line = "tcia-covid19: skipped 4 DICOM series (1 localizer, 1 mixed orientations, 1 non-uniform slice spacing, " \
           "1 single slice)"
    assert check.check_dataset(t, root).notes == [line]
    where, phantom, items = corpus.corpus_items(t, str(root))          # what pre-training reads, and says
    assert [it["id"] for it in items] == ["p1/scan", "p5/scan"] and line in capsys.readouterr().out

