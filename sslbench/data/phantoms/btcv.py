"""The BTCV phantom twins: the abdomen body in the MONAI layout (``btcv``: dataset_0.json) and as distributed
(``btcv-raw``: RawData/), with the real BTCV case numbering (readers: :mod:`sslbench.data.layouts.btcv`).
"""
from __future__ import annotations

from sslbench.data.phantoms.base import _Job, _json_bytes, _Like, _write_atomic


# BTCV numbering: 30 labelled cases 0001-0010, 0021-0040; the MONAI split puts 0035-0040 in validation;
# test images are 0061-0080.
_BTCV_TRAIN = list(range(1, 11)) + list(range(21, 35))


_BTCV_VAL = list(range(35, 41))


def _btcv_numbers(cases: int, test_cases: int) -> tuple[list[int], list[int], list[int]]:
    """Case numbers following the real BTCV numbering: (training, validation, test).

    The miniature keeps about a fifth of its cases (at most the real 6) in validation, taken from the real
    validation ids, so that the ``val_ids`` of the btcv recipe select the same split in the RawData layout.
    """
    n_val = 0 if cases < 2 else min(len(_BTCV_VAL), max(1, round(cases / 5)))
    n_train = cases - n_val
    extra = [n for n in range(41, 10_000) if not 61 <= n <= 80]
    train = (_BTCV_TRAIN + extra)[:n_train]
    # the real test ids 0061-0080 first; a larger miniature continues after its last training number (disjoint)
    after = max(train + _BTCV_VAL + [80]) + 1
    test = (list(range(61, 81)) + list(range(after, after + test_cases)))[:test_cases]
    return train, _BTCV_VAL[:n_val], test


_BTCV_LABEL_NAMES = {"0": "background", "1": "spleen", "2": "rkid", "3": "lkid", "4": "gall", "5": "eso",
                     "6": "liver", "7": "sto", "8": "aorta", "9": "IVC", "10": "veins", "11": "pancreas",
                     "12": "rad", "13": "lad"}


def _write_btcv(job: _Job) -> None:
    """MONAI layout: imagesTr/img0001.nii.gz, labelsTr/label0001.nii.gz, imagesTs/, dataset_0.json."""
    train, val, test = _btcv_numbers(job.cases, job.test_cases)
    r = job.root
    for n in train + val:
        job.write_case(n, r / "imagesTr" / f"img{n:04d}.nii.gz", r / "labelsTr" / f"label{n:04d}.nii.gz")
    for n in test:
        job.write_case(n, r / "imagesTs" / f"img{n:04d}.nii.gz", None)

    def pair(n: int) -> dict:
        return {"image": f"imagesTr/img{n:04d}.nii.gz", "label": f"labelsTr/label{n:04d}.nii.gz"}

    datalist = {
        "description": "btcv yucheng",
        "labels": _BTCV_LABEL_NAMES,
        "licence": "yt",
        "modality": {"0": "CT"},
        "name": "btcv",
        "numTest": len(test),
        "numTraining": len(train) + len(val),
        "reference": "Vanderbilt University",
        "release": "1.0 06/08/2015",
        "tensorImageSize": "3D",
        "test": [f"imagesTs/img{n:04d}.nii.gz" for n in test],
        "training": [pair(n) for n in train],
        "validation": [pair(n) for n in val],
    }
    _write_atomic(r / "dataset_0.json", _json_bytes(datalist))


def _write_btcv_raw(job: _Job) -> None:
    """As distributed: RawData/Training/{img,label}/img0001.nii.gz|label0001.nii.gz, RawData/Testing/img/."""
    train, val, test = _btcv_numbers(job.cases, job.test_cases)
    raw = job.root / "RawData"
    for n in train + val:
        job.write_case(n, raw / "Training" / "img" / f"img{n:04d}.nii.gz",
                       raw / "Training" / "label" / f"label{n:04d}.nii.gz")
    for n in test:
        job.write_case(n, raw / "Testing" / "img" / f"img{n:04d}.nii.gz", None)


BTCV = _Like("abdomen", _write_btcv, ("imagesTr", "labelsTr", "imagesTs", "dataset_0.json"), test=True)
BTCV_RAW = _Like("abdomen", _write_btcv_raw, ("RawData",), test=True)
