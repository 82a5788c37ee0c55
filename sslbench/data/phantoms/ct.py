"""Phantom twins of LiTS, FLARE23, AMOS22 and of the pre-training corpora TCIA COVID-19 and LUNA16.

They reuse the procedural bodies of :mod:`sslbench.data.phantoms.base` (the contrast-enhanced abdomen with the 13
BTCV organs, the chest) and add what each dataset shows, then write the dataset's exact on-disk layout
(see :mod:`sslbench.data.layouts.ct`):

* ``lits``: liver (label 1) with 1-3 hypodense tumours (label 2) as LiTS labels them; uncompressed
  ``volume-N.nii`` / ``segmentation-N.nii`` in two ``Training Batch`` folders, N from 0.
* ``flare23``: the FLARE label order (1 liver ... 13 left kidney, 14 tumour), nnU-Net naming, and partial
  labels as in FLARE23 (in about a third of the cases one to three organs are left unannotated).
* ``amos22``: the AMOS label order (15 organs; duodenum, bladder and prostate/uterus lie outside the phantom's
  field of view and stay absent), ``dataset.json`` with training / validation / test lists, and one MRI case
  (id above 500, MR-like contrast) in the training list that the CT task must leave out.
* ``tcia-covid19``: non-contrast chest CT with COVID-19 lung lesions (ground-glass opacities and
  consolidation), ``Train/volume-covid19-A-0NNN(_dayNNN).nii.gz``; images only.
* ``luna16``: non-contrast chest CT with solid lung nodules in ``subsetK/<seriesuid>.mhd`` + ``.raw``
  (MetaImage headers as LUNA16 writes them, int16 HU, LPS), ``annotations.csv`` with the nodules' world
  coordinates and ``seg-lungs-LUNA16/`` lung masks beside them; images only.

Case numbers of the corpora are offset (TCIA from 3001, LUNA16 from 5001) so that a combined corpus never holds
the same generated volume twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from sslbench.data.phantoms import base as ph

#: BTCV label value (abdomen phantom) -> FLARE22/23 label value (0: not a FLARE class).
BTCV_TO_FLARE = {1: 3, 2: 2, 3: 13, 4: 9, 5: 10, 6: 1, 7: 11, 8: 5, 9: 6, 10: 0, 11: 4, 12: 7, 13: 8}
#: BTCV label value -> AMOS22 label value (portal/splenic veins are not an AMOS class).
BTCV_TO_AMOS = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 10: 0, 11: 10, 12: 11, 13: 12}
AMOS_LABELS = ("background", "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver",
               "stomach", "aorta", "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum",
               "bladder", "prostate/uterus")
FLARE_TUMOUR = 14
_TCIA_FIRST, _LUNA_FIRST = 3001, 5001


# ----------------------------------------------------------------------------------------------------------
# Anatomy added to the shared bodies
# ----------------------------------------------------------------------------------------------------------
def _rng(seed: int, salt: int, number: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 100 + salt, int(number)]))


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _blob(shape: tuple[int, ...], spacing: np.ndarray, centre: np.ndarray, radius_mm: float,
          rng: np.random.Generator, roughness: float = 0.15) -> np.ndarray:
    """A lumpy ball (boolean volume): radius modulated by smooth noise, in millimetres."""
    idx = [np.arange(n, dtype=np.float32)[tuple(slice(None) if a == k else None for k in range(3))]
           for a, n in enumerate(shape)]
    d2 = sum(((idx[a] - np.float32(centre[a])) * np.float32(spacing[a])) ** 2 for a in range(3))
    coarse = ndimage.zoom(rng.standard_normal((4, 4, 4)).astype(np.float32),
                          np.array(shape) / 4.0, order=1, mode="nearest")[: shape[0], : shape[1], : shape[2]]
    r = np.float32(radius_mm) * (1 + np.float32(roughness) * coarse)
    return d2 < r * r


def _pick(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A random voxel index inside ``mask`` (None when it is empty)."""
    where = np.argwhere(mask)
    return where[rng.integers(len(where))].astype(float) if len(where) else None


def liver_tumours(image: np.ndarray, liver: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
                  count: tuple[int, int] = (1, 3)) -> np.ndarray:
    """Paint hypodense tumours into the liver (portal venous phase: 30-70 HU below the parenchyma).

    Returns the tumour mask; ``image`` is changed in place. Tumours stay inside the liver (LiTS labels a
    tumour only within the liver outline).
    """
    tumour = np.zeros(liver.shape, bool)
    inner = ndimage.binary_erosion(liver, iterations=2)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        c = _pick(inner, rng)
        if c is None:
            break
        tumour |= _blob(liver.shape, _spacing(affine), c, float(rng.uniform(8, 20)), rng) & liver
    drop = rng.uniform(30, 70)
    image[tumour] = np.clip(image[tumour] - drop + rng.normal(0, 6, int(tumour.sum())), -1024, 3071)
    return tumour


def _outside_air(image: np.ndarray) -> np.ndarray:
    """Air connected to the border of the field of view (outside the body), as opposed to lungs and gas."""
    air = image < -500
    lab, _ = ndimage.label(air)
    border = np.unique(np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(), lab[:, -1].ravel()]))
    return np.isin(lab, border[border > 0])


def non_contrast_chest(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Turn the cardiac CT angiogram phantom into a non-contrast chest CT; returns (image, lung mask).

    Blood pools and great vessels (every MM-WHS label) lose their contrast (35-50 HU), like TCIA COVID-19
    and LUNA16 scans acquired without a bolus.
    """
    img = image.astype(np.float32)
    blood = label > 0
    img[blood] = rng.uniform(35, 50) + rng.normal(0, 12, int(blood.sum()))
    lungs = (img < -500) & ~_outside_air(img)
    lungs = ndimage.binary_opening(lungs, iterations=1)
    return img, lungs


def covid_lesions(image: np.ndarray, lungs: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> None:
    """Peripheral ground-glass opacities (-700..-350 HU) and some consolidation (-50..50 HU) in the lungs."""
    edge = lungs & ~ndimage.binary_erosion(lungs, iterations=3)      # COVID-19 lesions favour the periphery
    for _ in range(int(rng.integers(2, 6))):
        c = _pick(edge, rng)
        if c is None:
            return
        blob = _blob(lungs.shape, _spacing(affine), c, float(rng.uniform(12, 35)), rng, 0.3) & lungs
        consolidation = rng.random() < 0.3
        level = rng.uniform(-50, 50) if consolidation else rng.uniform(-700, -350)
        image[blob] = level + rng.normal(0, 40, int(blob.sum()))


def lung_nodules(image: np.ndarray, lungs: np.ndarray, affine: np.ndarray,
                 rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
    """Solid nodules (3-20 mm across, -50..100 HU) inside the lungs; returns [(voxel centre, diameter mm)]."""
    inner = ndimage.binary_erosion(lungs, iterations=2)
    out = []
    for _ in range(int(rng.integers(1, 4))):
        c = _pick(inner, rng)
        if c is None:
            break
        diameter = float(rng.uniform(3, 20))
        ball = _blob(lungs.shape, _spacing(affine), c, diameter / 2, rng, 0.1)
        image[ball] = rng.uniform(-50, 100) + rng.normal(0, 20, int(ball.sum()))
        out.append((c, diameter))
    return out


def mr_like(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A T2-weighted-looking abdominal MR image (AMOS's MRI cases) from the CT phantom: air and bone dark,
    fat bright, fluid-filled organs (gallbladder, kidneys) brighter than the liver; arbitrary units."""
    hu = image.astype(np.float32)
    mr = np.interp(hu, [-1024, -500, -120, -60, 0, 40, 80, 200, 3071], [0, 5, 700, 650, 400, 300, 260, 80, 20])
    mr[np.isin(label, (2, 3))] *= 1.6
    mr[label == 4] = 1200
    mr *= rng.uniform(0.8, 1.2)
    mr += rng.normal(0, 15, mr.shape)
    return np.clip(mr, 0, 4000).astype(np.int16)


def _remap(label: np.ndarray, table: dict[int, int]) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    for src, dst in table.items():
        lut[src] = dst
    return lut[label]


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------
def _nii(data: np.ndarray, affine: np.ndarray, gz: bool = True) -> bytes:
    if gz:
        return ph.nifti_bytes(data, affine)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"sslbench phantom"
    return img.to_bytes()


def _write(path: Path, data: bytes) -> None:
    ph._write_atomic(path, data)


def _write_lits(job: Any) -> None:
    """``Training Batch 1/`` and ``Training Batch 2/`` with ``volume-N.nii`` + ``segmentation-N.nii`` (N from 0)."""
    first = max(1, job.cases // 3)
    for n in range(job.cases):
        c = job.case(n + 1)
        image = c.image.astype(np.int16)
        liver = c.label == 6
        tumour = liver_tumours(image, liver, c.affine, _rng(job.seed, 1, n))
        seg = liver.astype(np.uint8) + tumour.astype(np.uint8)
        folder = job.root / ("Training Batch 1" if n < first else "Training Batch 2")
        _write(folder / f"segmentation-{n}.nii", _nii(seg, c.affine, gz=False))
        _write(folder / f"volume-{n}.nii", _nii(image, c.affine, gz=False))


def _write_flare23(job: Any) -> None:
    """``imagesTr/FLARE23_NNNN_0000.nii.gz`` + ``labelsTr/FLARE23_NNNN.nii.gz`` with FLARE labels, partly annotated."""
    for n in range(1, job.cases + 1):
        c = job.case(n)
        rng = _rng(job.seed, 2, n)
        image = c.image.astype(np.int16)
        label = _remap(c.label, BTCV_TO_FLARE)
        if rng.random() < 0.5:
            host = c.label == (6 if rng.random() < 0.6 else int(rng.choice([2, 3])))
            label[liver_tumours(image, host, c.affine, rng, (1, 1))] = FLARE_TUMOUR
        if n % 3 == 0:  # FLARE23's partial labels: some organs left unannotated in this case
            present = [v for v in np.unique(label) if 0 < v < FLARE_TUMOUR]
            for v in rng.choice(present, size=min(len(present), int(rng.integers(1, 4))), replace=False):
                label[label == v] = 0
        _write(job.root / "labelsTr" / f"FLARE23_{n:04d}.nii.gz", _nii(label, c.affine))
        _write(job.root / "imagesTr" / f"FLARE23_{n:04d}_0000.nii.gz", _nii(image, c.affine))


def _write_amos22(job: Any) -> None:
    """imagesTr/labelsTr/imagesVa/labelsVa/imagesTs (``amos_NNNN.nii.gz``) + dataset.json; one MRI training case."""
    n_val = 0 if job.cases < 2 else max(1, round(job.cases / 5))
    ct = [int(v) for v in np.sort(_rng(job.seed, 3, 0).choice(np.arange(1, 410), job.cases + job.test_cases,
                                                                replace=False))]
    train, val, test = ct[: job.cases - n_val], ct[job.cases - n_val: job.cases], ct[job.cases:]
    mri = 540
    r = job.root
    entries: dict[str, list] = {"training": [], "validation": [], "test": []}
    for ids, img_dir, lab_dir, key in ((train + [mri], "imagesTr", "labelsTr", "training"),
                                       (val, "imagesVa", "labelsVa", "validation"), (test, "imagesTs", None, "test")):
        for i in ids:
            c = job.case(i)
            label = _remap(c.label, BTCV_TO_AMOS)
            image = mr_like(c.image, c.label, _rng(job.seed, 3, i)) if i > 500 else c.image
            name = f"amos_{i:04d}.nii.gz"
            if lab_dir is not None:
                _write(r / lab_dir / name, _nii(label, c.affine))
            _write(r / img_dir / name, _nii(image, c.affine))
            entry = {"image": f"./{img_dir}/{name}"}
            if lab_dir is not None:
                entry["label"] = f"./{lab_dir}/{name}"
            entries[key].append(entry)
    datalist = {"name": "AMOS", "description": "MICCAI2022 Multi-Modality Abdominal Multi-Organ Segmentation Challenge",
                "tensorImageSize": "3D", "reference": "SRIBD, CUHK-SZ", "licence": "CC-BY-SA 4.0", "release": "1.0",
                "modality": {"0": "CT"}, "labels": {str(k): v for k, v in enumerate(AMOS_LABELS)},
                "numTraining": len(entries["training"]), "numValidation": len(entries["validation"]),
                "numTest": len(entries["test"]), **entries}
    _write(r / "dataset.json", (json.dumps(datalist, indent=4) + "\n").encode())


def _chest(job: Any, number: int, salt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.random.Generator]:
    c = ph._BODIES["chest"](ph._case_rng(job.seed, "chest", number))
    rng = _rng(job.seed, salt, number)
    image, lungs = non_contrast_chest(c.image, c.label, rng)
    return image, lungs, c.affine, rng


def _write_tcia(job: Any) -> None:
    """``Train/volume-covid19-A-0NNN.nii.gz`` (every third patient also has a later ``_dayNNN`` scan); images only.

    The files sit in ``Train/`` as in the COVID-19-20 challenge release of the TCIA volumes (the reader finds
    them at the root or one folder below)."""
    k = 0
    patient = 3
    while k < job.cases:
        for day in ([None, 7] if patient % 3 == 0 else [None]):
            if k == job.cases:
                break
            image, lungs, affine, rng = _chest(job, _TCIA_FIRST + k, 4)
            covid_lesions(image, lungs, affine, rng)
            suffix = "" if day is None else f"_day{day:03d}"
            data = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
            _write(job.root / "Train" / f"volume-covid19-A-{patient:04d}{suffix}.nii.gz", _nii(data, affine))
            k += 1
        patient += int(_rng(job.seed, 5, patient).integers(1, 9))


def _mhd_header(shape: tuple[int, ...], affine: np.ndarray, raw_name: str, element: str) -> bytes:
    """A MetaImage header as LUNA16 ships it (world coordinates in ITK's LPS)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, float)
    spacing = _spacing(affine)
    direction = lps[:3, :3] / spacing[None, :]
    fmt = lambda v: " ".join(f"{x:.10g}" for x in v)  # noqa: E731
    lines = ["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
             "CompressedData = False", f"TransformMatrix = {fmt(direction.T.ravel())}", f"Offset = {fmt(lps[:3, 3])}",
             "CenterOfRotation = 0 0 0", "AnatomicalOrientation = RAI", f"ElementSpacing = {fmt(spacing)}",
             f"DimSize = {fmt(shape)}", f"ElementType = {element}", f"ElementDataFile = {raw_name}"]
    return ("\n".join(lines) + "\n").encode()


def write_mhd(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` (x, y, z) as ``path`` (.mhd header) + the .raw beside it; raw first, header last."""
    element = {np.dtype(np.int16): "MET_SHORT", np.dtype(np.uint8): "MET_UCHAR"}[data.dtype]
    raw = path.with_suffix(".raw")
    _write(raw, np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"))).tobytes(order="F"))
    _write(path, _mhd_header(data.shape, affine, raw.name, element))


def _write_luna16(job: Any) -> None:
    """``subsetK/<seriesuid>.mhd`` + ``.raw``, ``seg-lungs-LUNA16/<seriesuid>.mhd`` masks, ``annotations.csv``."""
    rows = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    for k in range(job.cases):
        image, lungs, affine, rng = _chest(job, _LUNA_FIRST + k, 6)
        nodules = lung_nodules(image, lungs, affine, rng)
        uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001." + "".join(str(d) for d in rng.integers(0, 10, 30))
        data = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
        write_mhd(job.root / "seg-lungs-LUNA16" / f"{uid}.mhd", (lungs * 3).astype(np.uint8), affine)
        write_mhd(job.root / f"subset{k % 10}" / f"{uid}.mhd", data, affine)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        for centre, diameter in nodules:
            x, y, z = (lps @ np.append(centre, 1.0))[:3]
            rows.append(f"{uid},{x:.6f},{y:.6f},{z:.6f},{diameter:.6f}")
    _write(job.root / "annotations.csv", ("\n".join(rows) + "\n").encode())


LITS = ph._Like("abdomen", _write_lits, ("Training Batch 1", "Training Batch 2"))
FLARE23 = ph._Like("abdomen", _write_flare23, ("imagesTr", "labelsTr"))
AMOS22 = ph._Like("abdomen", _write_amos22, ("imagesTr", "labelsTr", "imagesVa", "labelsVa", "imagesTs", "dataset.json"),
                  test=True)
TCIA_COVID19 = ph._Like("chest", _write_tcia, ("Train",))
LUNA16 = ph._Like("chest", _write_luna16,
                  tuple(f"subset{k}" for k in range(10)) + ("seg-lungs-LUNA16", "annotations.csv"))
