"""Medical Segmentation Decathlon Tasks 01-10: their dataset.json facts and phantom twins of each task.

Every MSD task is distributed as ``TaskXX_Name/{dataset.json, imagesTr/, labelsTr/, imagesTs/}`` (read by the
``msd`` layout, :mod:`sslbench.data.layouts.msd`; macOS ``._*`` files skipped). Tasks 01 (BrainTumour: FLAIR,
T1w, t1gd, T2w) and 05 (Prostate: T2, ADC) store their modalities as a channel-last 4-D NIfTI; sslbench loads
them channel-first (``EnsureChannelFirstd``) as the model's input channels. Task09 (Spleen) is the existing
``msd-spleen`` phantom (:data:`SPLEEN`).

Phantom twins (``sslbench data synth --like msd01`` ... ``msd10``) write the same tree, file names and
dataset.json keys (name, description, tensorImageSize, modality, labels, numTraining, numTest, training,
test) as the real task, with anatomy built from sslbench's procedural bodies:

* 01 BrainTumour: the BraTS brain phantom (:func:`sslbench.data.phantoms.brats.head`) as a 4-D image, labels 1 edema,
  2 non-enhancing tumour, 3 enhancing tumour (the MSD relabelling of BraTS 2, 1, 4).
* 02 Heart: the cardiac CT phantom re-contrasted as a bright-blood (bSSFP-like) MRI; label 1 left atrium.
* 03 Liver, 07 Pancreas, 08 HepaticVessel, 10 Colon: the abdominal CT phantom with hypodense tumours painted
  inside the organ (liver, pancreas) or a soft-tissue colon lesion; labels as in each dataset.json.
* 04 Hippocampus: a ~36 x 50 x 35 mm T1 crop around a curved hippocampus (head = anterior, body and tail =
  posterior) beside the dark temporal horn.
* 05 Prostate: a pelvis with bladder, rectum, muscle and fat around a prostate of transition zone (TZ) and
  a posterior peripheral zone (PZ), as T2 and ADC channels with their typical contrast (PZ bright on T2 and
  ADC, TZ darker, urine bright on both).
* 06 Lung: the chest CT phantom with a solid nodule of soft-tissue density in a lung; label 1 cancer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from sslbench.data.phantoms import base as ph
from sslbench.data.phantoms import brats

F32 = np.float32


@dataclass(frozen=True)
class MsdTask:
    """The dataset.json facts of one MSD task and its phantom case generator."""

    number: int
    folder: str
    name: str                      # dataset.json "name"
    description: str
    modality: dict[str, str]
    labels: dict[str, str]
    prefix: str                    # file names: <prefix><number>.nii.gz
    digits: int                    # zero padding of the case number in file names
    body: str                      # phantom body (random stream) name
    make: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, np.ndarray]]

    @property
    def four_d(self) -> bool:
        return len(self.modality) > 1


# ----------------------------------------------------------------------------------------------------------
# Helpers on generated volumes
# ----------------------------------------------------------------------------------------------------------
def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.abs(np.diag(affine)[:3])


def _lesion(rng: np.random.Generator, hu: np.ndarray, label: np.ndarray, inside: np.ndarray, spacing: np.ndarray,
            radius_mm: float, delta: float, value: int, clip_to_inside: bool = True) -> None:
    """Paint a wobbly ellipsoidal lesion centred in ``inside`` (in place): intensity + ``delta``, label ``value``.

    The centre is drawn among voxels at least half a radius inside the mask (the mask itself if too thin);
    the intensity change falls off smoothly over the outer 30% of the radius (partial volume).
    """
    from scipy import ndimage

    if not inside.any():
        return
    idx = np.argwhere(inside)
    lo0, hi0 = np.maximum(idx.min(0) - 1, 0), idx.max(0) + 2          # the mask's bounding box (+1 voxel)
    box = inside[tuple(slice(int(a), int(b)) for a, b in zip(lo0, hi0))]
    depth = ndimage.distance_transform_edt(np.pad(box, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    cand = np.argwhere(depth >= min(0.5 * radius_mm, depth.max() * 0.8))
    c = cand[rng.integers(len(cand))] + lo0
    semi = radius_mm * rng.uniform(0.75, 1.25, 3) / spacing
    lo = np.maximum(0, np.floor(c - semi * 1.3).astype(int))
    hi = np.minimum(hu.shape, np.ceil(c + semi * 1.3).astype(int) + 1)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    q = np.sqrt(sum(((gr - ci) / si) ** 2 for gr, ci, si in zip(grids, c, semi)))
    q *= 1.0 + 0.15 * np.sin(grids[0] * 0.9 + rng.uniform(0, 6)) * np.cos(grids[1] * 0.7 + rng.uniform(0, 6))
    weight = np.clip((1.0 - q) / 0.3, 0.0, 1.0)
    mask = q < 0.85
    if clip_to_inside:
        weight = weight * inside[sl]
        mask &= inside[sl]
    hu[sl] = (hu[sl] + delta * weight).astype(hu.dtype)
    label[sl][mask] = value


def _centred_grid(rng: np.random.Generator, n: tuple[int, int, int],
                  spacing: tuple[float, float, float]) -> Any:
    """A scanner-like grid (affine ``diag(-sx, -sy, sz)``, random table offset) centred on the anatomy."""
    s = np.array(spacing, float)
    affine = np.diag([-s[0], -s[1], s[2], 1.0])
    centre = rng.uniform(-20, 20, 3)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(n) - 1) / 2.0)
    affine = affine.astype(F32).astype(np.float64)
    world = [affine[a, a] * np.arange(n[a]) + affine[a, 3] - centre[a] for a in range(3)]
    return ph._Grid(shape=n, spacing=s, affine=affine, x=world[0].astype(F32).reshape(-1, 1, 1),
                    y=world[1].astype(F32).reshape(1, -1, 1), z=world[2].astype(F32).reshape(1, 1, -1))


# ----------------------------------------------------------------------------------------------------------
# Case generators: (image: 3-D, or 4-D channel-last; label uint8; affine)
# ----------------------------------------------------------------------------------------------------------
def _brain_tumour(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, lab, affine = brats.head(rng)
    msd = np.zeros_like(lab)
    msd[lab == brats.ED], msd[lab == brats.NCR], msd[lab == brats.ET] = 1, 2, 3
    return np.ascontiguousarray(np.moveaxis(images, 0, -1)), msd, affine   # FLAIR, T1w, t1gd, T2w


def _heart_mri(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cardiac CT phantom re-contrasted as bright-blood MRI: blood bright, myocardium / lung dark, fat bright."""
    c = ph.chest(rng)
    hu = c.image.astype(F32)
    # HU -> MRI signal (piecewise linear): air/lung, fat, muscle/myocardium, enhanced blood, bone.
    signal = np.interp(hu, [-1000, -600, -120, -60, 20, 80, 200, 400, 1200],
                       [5, 30, 620, 560, 180, 240, 820, 900, 150]).astype(F32)
    signal *= 1.0 + 0.05 * rng.standard_normal(hu.shape).astype(F32)
    return np.clip(signal, 0, None), (c.label == ph.MMWHS_LABELS["LA"]).astype(np.uint8), c.affine


def _abdomen_task(organ: int | None, lesion_in: int | None, lesion_delta: float, lesions: tuple[int, int],
                  organ_value: int | None, lesion_value: int, radius: tuple[float, float], clip: bool) -> Callable:
    """An abdominal CT task: keep one BTCV organ as ``organ_value``, paint lesions as ``lesion_value``.

    Lesions (radius in mm drawn from ``radius``) are centred inside BTCV organ ``lesion_in`` and, with
    ``clip``, kept inside it; a tumour outgrowing a thin organ (pancreas) is not clipped.
    """

    def make(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = ph.abdomen(rng)
        hu = c.image.astype(np.int16)
        lab = np.zeros(c.label.shape, np.uint8)
        if organ is not None and organ_value is not None:
            lab[c.label == organ] = organ_value
        spacing = _spacing(c.affine)
        if lesion_in is not None:
            inside = c.label == lesion_in
        else:   # colon: soft tissue of the lower abdomen that is no organ (bowel wall, mesentery)
            z = np.arange(hu.shape[2]) * np.sign(c.affine[2, 2])
            low = z[None, None, :] < np.percentile(z, 45)
            inside = (c.label == 0) & (hu > -80) & (hu < 120) & low
        for _ in range(int(rng.integers(lesions[0], lesions[1] + 1))):
            _lesion(rng, hu, lab, inside, spacing, float(rng.uniform(*radius)), lesion_delta, lesion_value,
                    clip_to_inside=clip)
        return hu, lab, c.affine

    return make


def _lung_nodule(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy import ndimage

    c = ph.chest(rng)
    hu = c.image.astype(np.int16)
    lab = np.zeros(c.label.shape, np.uint8)
    lung = ndimage.binary_opening(hu < -600, iterations=2) & (c.label == 0)
    labels, n = ndimage.label(lung)
    if n:
        sizes = ndimage.sum(lung, labels, range(1, n + 1))
        lung = labels == (1 + int(np.argsort(sizes)[-1 - int(rng.integers(0, min(2, n)))]))
    radius = float(rng.uniform(10, 17))
    depth_ok = ndimage.distance_transform_edt(lung, sampling=_spacing(c.affine)) > radius * 0.6
    region = depth_ok if depth_ok.any() else lung
    _lesion(rng, hu, lab, region, _spacing(c.affine), radius, 850.0, 1, clip_to_inside=False)
    return hu, lab, c.affine


def _hippocampus(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A T1 crop (~36 x 50 x 35 voxels at 1 mm) around a hippocampus: head (label 1) and body/tail (label 2)."""
    n = (int(rng.integers(33, 40)), int(rng.integers(46, 54)), int(rng.integers(32, 38)))
    g = _centred_grid(rng, n, (1.0, 1.0, 1.0))
    texture = ph._noise(rng, g, 3.0)
    t1 = np.where(texture > 0.3, 92.0, 64.0).astype(F32)          # white / grey matter background
    # The hippocampus: a curved tube running antero-posteriorly, thick head in front, thin tail behind.
    bend = rng.uniform(3, 6)
    pts = [(0, y, bend * (1 - (y / 20.0) ** 2) - 2) for y in (20, 12, 4, -4, -12, -20)]
    radii = [6.5, 6.0, 4.6, 3.8, 3.0, 2.4]
    hippo = ph._tube(g, pts, np.array(radii) * rng.uniform(0.9, 1.1), ph._Wobble(rng, 0.08, (15, 40)))
    horn = ph._tube(g, [(p[0] + 6.0, p[1], p[2] + 5.0) for p in pts[:5]], 1.6)   # temporal horn (CSF)
    lab = np.zeros(n, np.uint8)
    split = rng.uniform(2, 6)
    if hippo is not None:
        view = t1[hippo.sl]
        view[hippo.mask] = 70.0
        y = np.broadcast_to(g.y[:, hippo.sl[1]], hippo.mask.shape)
        lab[hippo.sl][hippo.mask & (y > split)] = 1
        lab[hippo.sl][hippo.mask & (y <= split)] = 2
    if horn is not None:
        t1[horn.sl][horn.mask] = 22.0
        lab[horn.sl][horn.mask] = 0
    t1 = t1 * (1 + 0.04 * texture) + rng.standard_normal(n).astype(F32) * 3.0
    return np.clip(t1, 0, None).astype(F32), lab, g.affine


def _prostate(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pelvis T2 + ADC (4-D, channel-last): prostate TZ (label 2) and posterior PZ (label 1)."""
    n = (80, 80, int(rng.integers(16, 22)))
    g = _centred_grid(rng, n, (1.6, 1.6, 3.6))
    tissue = np.zeros(n, np.uint8)      # 0 air, 1 fat, 2 muscle, 3 urine, 4 rectum wall, 5 gas, 6 TZ, 7 PZ

    def put(region: Any, value: int) -> None:
        if region is not None:
            tissue[region.sl][region.mask] = value

    put(ph._ellipsoid(g, (0, 0, 0), (60, 50, 200), wobble=ph._Wobble(rng, 0.04)), 1)
    for side in (-1, 1):
        put(ph._ellipsoid(g, (side * 32, -4, 0), (12, 22, 200), wobble=ph._Wobble(rng, 0.08)), 2)  # obturator
    put(ph._ellipsoid(g, (0, 30, 20), (26, 18, 24) * rng.uniform(0.8, 1.2, 3), wobble=ph._Wobble(rng, 0.1)), 3)
    put(ph._ellipsoid(g, (0, -26, 0), (11, 9, 200)), 4)
    put(ph._ellipsoid(g, (0, -26, 0), (5, 4, 200), wobble=ph._Wobble(rng, 0.15)), 5)
    size = rng.uniform(0.85, 1.2)
    centre = (rng.uniform(-3, 3), rng.uniform(-4, 2), rng.uniform(-8, 0))
    gland = ph._ellipsoid(g, centre, np.array([22, 16, 18]) * size, wobble=ph._Wobble(rng, 0.06))
    put(gland, 7)
    tz = ph._ellipsoid(g, (centre[0], centre[1] + 4 * size, centre[2] + 2), np.array([15, 10, 13]) * size,
                       wobble=ph._Wobble(rng, 0.08))
    put(tz, 6)
    if gland is not None:   # the PZ is the posterior and lateral part of the gland only
        y = np.broadcast_to(g.y[:, gland.sl[1]], gland.mask.shape)
        anterior = gland.mask & (tissue[gland.sl] == 7) & (y > centre[1] + 6 * size)
        tissue[gland.sl][anterior] = 6
    #          air  fat   muscle urine rectum gas  TZ    PZ
    t2 = np.array([0, 780, 180, 1500, 260, 10, 420, 900], F32)
    adc = np.array([0, 250, 1400, 2900, 1100, 0, 1150, 1750], F32)
    texture = ph._noise(rng, g, 2.5)
    out = np.stack([t2[tissue], adc[tissue]], axis=-1)
    out *= (1.0 + 0.06 * texture)[..., None]
    out += rng.standard_normal(out.shape).astype(F32) * np.array([25.0, 60.0], F32)
    lab = np.where(tissue == 7, 1, np.where(tissue == 6, 2, 0)).astype(np.uint8)
    return np.clip(out, 0, None).astype(F32), lab, g.affine


#: MSD tasks by number (Task09 Spleen is the existing ``msd-spleen`` phantom); facts from each dataset.json.
TASKS: dict[int, MsdTask] = {t.number: t for t in (
    MsdTask(1, "Task01_BrainTumour", "BRATS", "Gliomas segmentation tumour and oedema in on brain images",
            {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "BRATS_", 3, "head", _brain_tumour),
    MsdTask(2, "Task02_Heart", "LeftAtrium", "Left atrium segmentation", {"0": "MRI"},
            {"0": "background", "1": "left atrium"}, "la_", 3, "chest", _heart_mri),
    MsdTask(3, "Task03_Liver", "LiTS", "Liver and liver tumor segmentation", {"0": "CT"},
            {"0": "background", "1": "liver", "2": "cancer"}, "liver_", 0, "abdomen",
            _abdomen_task(6, 6, -55.0, (1, 3), 1, 2, (10, 20), True)),
    MsdTask(4, "Task04_Hippocampus", "Hippocampus", "Left and right hippocampus segmentation", {"0": "MRI"},
            {"0": "background", "1": "Anterior", "2": "Posterior"}, "hippocampus_", 3, "hippocampus",
            _hippocampus),
    MsdTask(5, "Task05_Prostate", "PROSTATE", "Prostate transitional zone and peripheral zone segmentation",
            {"0": "T2", "1": "ADC"}, {"0": "background", "1": "PZ", "2": "TZ"}, "prostate_", 2, "pelvis",
            _prostate),
    MsdTask(6, "Task06_Lung", "Lung", "Lung and cancer segmentation", {"0": "CT"},
            {"0": "background", "1": "cancer"}, "lung_", 3, "chest", _lung_nodule),
    MsdTask(7, "Task07_Pancreas", "Pancreas", "Pancreas and cancer segmentation", {"0": "CT"},
            {"0": "background", "1": "pancreas", "2": "cancer"}, "pancreas_", 3, "abdomen",
            _abdomen_task(11, 11, -45.0, (1, 1), 1, 2, (9, 14), False)),
    MsdTask(8, "Task08_HepaticVessel", "HepaticVessel", "Hepatic Vessel and Tumour Segmentation", {"0": "CT"},
            {"0": "background", "1": "Vessel", "2": "Tumour"}, "hepaticvessel_", 3, "abdomen",
            _abdomen_task(10, 6, -55.0, (1, 2), 1, 2, (10, 18), True)),
    MsdTask(10, "Task10_Colon", "Colon", "Colon cancer segmentation", {"0": "CT"},
            {"0": "background", "1": "colon cancer primaries"}, "colon_", 3, "abdomen",
            _abdomen_task(None, None, 45.0, (1, 1), None, 1, (14, 22), False)),
)}


def _file(task: MsdTask, number: int) -> str:
    return f"{task.prefix}{number:0{task.digits}d}.nii.gz" if task.digits else f"{task.prefix}{number}.nii.gz"


def _writer(task: MsdTask) -> Callable[[Any], None]:
    def write(job: Any) -> None:
        """TaskXX_Name/{dataset.json, imagesTr/, labelsTr/, imagesTs/} with the task's file names and keys."""
        rng = np.random.default_rng(np.random.SeedSequence([int(job.seed), 100 + task.number]))
        total = job.cases + job.test_cases
        numbers = np.sort(rng.choice(np.arange(1, int(total * 1.5) + 3), size=total, replace=False))
        is_test = np.zeros(total, bool)
        is_test[rng.choice(total, size=job.test_cases, replace=False)] = True
        train = [int(v) for v in numbers[~is_test]]
        test = [int(v) for v in numbers[is_test]]
        r = job.root
        (r / "imagesTs").mkdir(parents=True, exist_ok=True)
        for v in train + test:
            image, label, affine = task.make(ph._case_rng(job.seed, task.body, 1000 * task.number + v))
            if v in train:
                ph._write_atomic(r / "labelsTr" / _file(task, v), ph.nifti_bytes(label, affine))
            folder = "imagesTr" if v in train else "imagesTs"
            ph._write_atomic(r / folder / _file(task, v), ph.nifti_bytes(image, affine))
        datalist = {
            "name": task.name,
            "description": task.description,
            "reference": "sslbench procedural phantom (not the Medical Segmentation Decathlon data)",
            "licence": "CC-BY-SA 4.0",
            "release": "1.0 04/05/2018",
            "tensorImageSize": "4D" if task.four_d else "3D",
            "modality": task.modality,
            "labels": task.labels,
            "numTraining": len(train),
            "numTest": len(test),
            "training": [{"image": f"./imagesTr/{_file(task, v)}", "label": f"./labelsTr/{_file(task, v)}"}
                         for v in train],
            "test": [f"./imagesTs/{_file(task, v)}" for v in test],
        }
        ph._write_atomic(r / "dataset.json", ph._json_bytes(datalist))

    return write


def _write_msd_spleen(job: ph._Job) -> None:
    """Task09_Spleen/{dataset.json, imagesTr/spleen_N.nii.gz, labelsTr/spleen_N.nii.gz, imagesTs/}.

    Case numbers are a sparse, sorted draw (as in the real task, where numbers have gaps) and the training
    list is in directory-listing order, not numeric order, like the real dataset.json.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(job.seed), 9]))
    total = job.cases + job.test_cases
    numbers = np.sort(rng.choice(np.arange(1, int(total * 1.55) + 3), size=total, replace=False))
    is_test = np.zeros(total, bool)
    is_test[rng.choice(total, size=job.test_cases, replace=False)] = True
    train = [int(n) for n in numbers[~is_test]]
    test = [int(n) for n in numbers[is_test]]
    order = [train[i] for i in rng.permutation(len(train))]
    r = job.root
    (r / "imagesTs").mkdir(parents=True, exist_ok=True)
    for n in train:
        job.write_case(n, r / "imagesTr" / f"spleen_{n}.nii.gz", r / "labelsTr" / f"spleen_{n}.nii.gz",
                       relabel=lambda lab: (lab == 1).astype(np.uint8))
    for n in test:
        job.write_case(n, r / "imagesTs" / f"spleen_{n}.nii.gz", None)
    datalist = {
        "name": "Spleen",
        "description": "Spleen Segmentation",
        "reference": "Memorial Sloan Kettering Cancer Center",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0 06/08/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": len(train),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/spleen_{n}.nii.gz", "label": f"./labelsTr/spleen_{n}.nii.gz"}
                     for n in order],
        "test": [f"./imagesTs/spleen_{n}.nii.gz" for n in test],
    }
    ph._write_atomic(r / "dataset.json", ph._json_bytes(datalist))


#: The phantom twins ``msd01`` ... ``msd10`` (Task09 is also written by the older ``msd-spleen``).
TASK_PHANTOMS: dict[str, ph._Like] = {
    f"msd{t.number:02d}": ph._Like(t.body, _writer(t), ("imagesTr", "labelsTr", "imagesTs", "dataset.json"),
                                   subdir=t.folder, test=True)
    for t in TASKS.values()}
SPLEEN = ph._Like("abdomen", _write_msd_spleen, ("imagesTr", "labelsTr", "imagesTs", "dataset.json"),
                  subdir="Task09_Spleen", test=True)
