"""The MM-WHS phantom twin: the chest body's heart as ``ct_train/ct_train_NNNN_{image,label}.nii.gz`` with the raw
MM-WHS label values 205..850 (reader: :mod:`sslbench.data.layouts.mmwhs`).
"""
from __future__ import annotations

from sslbench.data.phantoms.base import _Job, _Like


def _write_mmwhs(job: _Job) -> None:
    """ct_train/ct_train_1001_image.nii.gz + ct_train_1001_label.nii.gz (raw label values 205..850)."""
    folder = job.root / "ct_train"
    for i in range(job.cases):
        n = 1001 + i
        job.write_case(n, folder / f"ct_train_{n}_image.nii.gz", folder / f"ct_train_{n}_label.nii.gz")


MMWHS = _Like("chest", _write_mmwhs, ("ct_train",))
