"""The BraTS 2021 phantom twin: a skull-stripped brain MRI with a glioma, in the distributed layout.

The phantom (``sslbench data synth --like brats21``) is a skull-stripped head: a brain of grey matter
(cortical ribbon and deep nuclei), white matter and CSF (ventricles, sulcal CSF), zero outside the brain,
with a tumour of nested regions (edema around an enhancing rim around a necrotic core) at a random place in
one hemisphere. Each tissue has its own contrast in the four sequences (T1: WM > GM > CSF; T2: CSF > GM >
WM, edema bright; FLAIR: CSF dark, edema bright; T1ce: enhancing rim bright), multiplied by a smooth bias
field, with Rician-like noise.

Written as ``TrainingData/BraTS2021_NNNNN/BraTS2021_NNNNN_{flair,t1,t1ce,t2,seg}.nii.gz`` with SwinUNETR's
fold file ``brats21_folds.json`` (the ``brats`` reader: :mod:`sslbench.data.layouts.brats`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sslbench.data.layouts.brats import DEFAULT_CHANNELS, ED, ET, MODALITIES, NCR
from sslbench.data.phantoms import base as ph

#: Tissue intensities per sequence (arbitrary MRI units x 100), in the order flair, t1, t1ce, t2.
#: Sources of the orderings: standard MRI contrast of brain tissue and glioma sub-regions (BraTS 2021
#: paper, Baid et al., Fig. 1): ET enhances on T1ce, ED is hyperintense on T2 / FLAIR, NCR is dark on T1ce.
_TISSUE = {
    "wm": (4.6, 9.0, 9.2, 4.2),
    "gm": (6.0, 6.6, 6.8, 6.6),
    "deep": (5.6, 7.4, 7.6, 5.8),
    "csf": (1.4, 2.6, 2.6, 14.0),
    "ed": (11.5, 5.6, 5.8, 11.0),
    "et": (9.0, 6.0, 15.0, 8.0),
    "ncr": (7.0, 3.4, 2.8, 12.5),
}


def head(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case: (images [4, X, Y, Z] float32 in MODALITIES order, BraTS labels uint8, affine).

    Modelled in patient millimetres (RAS) on a 2.4-2.6 mm grid (coarser than BraTS' 1 mm, for speed) covering a 192 x 228 x 156 mm head box,
    affine ``diag(-s, -s, s)`` as BraTS writes it (LPS storage); zero outside the brain (skull-stripped).
    """
    s = round(float(rng.uniform(2.4, 2.6)), 3)
    n = (int(192 / s), int(228 / s), int(156 / s))
    affine = np.diag([-s, -s, s, 1.0])
    affine[:3, 3] = [96.0 + rng.uniform(-4, 4), 114.0 + rng.uniform(-4, 4), -70.0 + rng.uniform(-4, 4)]
    affine = affine.astype(np.float32).astype(np.float64)
    world = [affine[a, a] * np.arange(n[a]) + affine[a, 3] for a in range(3)]
    centre = np.array([0.0, -12.0, 8.0]) + rng.uniform(-3, 3, 3)
    g = ph._Grid(shape=n, spacing=np.array([s, s, s]), affine=affine,
                 x=(world[0] - centre[0]).astype(np.float32).reshape(-1, 1, 1),
                 y=(world[1] - centre[1]).astype(np.float32).reshape(1, -1, 1),
                 z=(world[2] - centre[2]).astype(np.float32).reshape(1, 1, -1))
    tissue = np.zeros(n, np.uint8)          # 0 outside, 1 wm, 2 gm, 3 deep, 4 csf

    def put(region: Any, value: int, where: np.ndarray | None = None) -> np.ndarray | None:
        if region is None:
            return None
        mask = region.mask if where is None else region.mask & where[region.sl]
        tissue[region.sl][mask] = value
        return mask

    semi = np.array([66.0, 84.0, 58.0]) * rng.uniform(0.93, 1.07, 3)
    wob = ph._Wobble(rng, 0.05, (40, 90))
    brain = ph._ellipsoid(g, (0, 0, 0), semi, wobble=wob)
    put(brain, 2)                                                   # cortex (grey matter ribbon)
    put(ph._ellipsoid(g, (0, 0, 0), semi, wobble=wob, scale=0.86), 1)  # white matter inside the ribbon
    inside = tissue > 0
    # Sulcal CSF: thin dark clefts in the ribbon from a smooth random field.
    sulci = ph._noise(rng, g, 5.0)
    cortex = tissue == 2
    tissue[cortex & (sulci > 1.1)] = 4
    # Interhemispheric fissure.
    fissure = (np.abs(g.x) < 1.6 * s) & (g.z > -10)
    tissue[np.broadcast_to(fissure, n) & inside] = 4
    # Deep grey nuclei (thalamus / basal ganglia) and the lateral ventricles.
    for side in (-1, 1):
        put(ph._ellipsoid(g, (side * 17, 2, 2), (9, 16, 10), wobble=ph._Wobble(rng, 0.08)), 3)
        put(ph._ellipsoid(g, (side * 7.5, 0, 14), (5, 26, 7), ph._rot(az=side * 8), ph._Wobble(rng, 0.1)), 4)

    # Tumour: edema around an enhancing rim around a necrotic core, in one hemisphere.
    labels = np.zeros(n, np.uint8)
    side = 1 if rng.random() < 0.5 else -1
    c = np.array([side * rng.uniform(24, 34), rng.uniform(-30, 30), rng.uniform(-2, 26)])
    r_core = rng.uniform(12, 19)
    tw = ph._Wobble(rng, 0.12, (20, 50))
    ed = ph._ellipsoid(g, c, r_core * rng.uniform(1.7, 2.3, 3), ph._rot(*rng.uniform(0, 90, 3)), ph._Wobble(rng, 0.18, (25, 60)))
    rim = ph._ellipsoid(g, c, (r_core, r_core * rng.uniform(0.8, 1.2), r_core * rng.uniform(0.8, 1.2)), wobble=tw)
    core = ph._ellipsoid(g, c, (r_core, r_core, r_core), wobble=tw, scale=rng.uniform(0.45, 0.65))
    for region, value in ((ed, ED), (rim, ET), (core, NCR)):
        if region is not None:
            labels[region.sl][region.mask & inside[region.sl]] = value

    images = np.zeros((4,) + n, np.float32)
    for m in range(4):
        lut = np.array([0.0, _TISSUE["wm"][m], _TISSUE["gm"][m], _TISSUE["deep"][m], _TISSUE["csf"][m]], np.float32)
        img = lut[tissue]
        for value, key in ((ED, "ed"), (ET, "et"), (NCR, "ncr")):
            img[labels == value] = _TISSUE[key][m]
        images[m] = img
    texture = ph._noise(rng, g, 3.0)
    bias = 1.0 + ph._Wobble(rng, 0.08, (150, 300))(g.x, g.y, g.z)
    from scipy import ndimage

    for m in range(4):
        img = ndimage.gaussian_filter(images[m], 0.7) * (1.0 + 0.04 * texture) * bias
        noise = rng.standard_normal((2,) + n).astype(np.float32) * 0.25
        img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2) * 100.0       # Rician magnitude noise
        images[m] = np.where(inside, img, 0.0)
    return np.rint(images).astype(np.float32), labels, affine


def _write_brats(job: Any) -> None:
    """TrainingData/BraTS2021_NNNNN/BraTS2021_NNNNN_{flair,t1,t1ce,t2,seg}.nii.gz + brats21_folds.json (5 folds)."""
    entries = []
    for i in range(job.cases):
        cid = f"BraTS2021_{i * 2 + 1:05d}"     # real ids have gaps
        images, labels, affine = head(ph._case_rng(job.seed, "head", i))
        folder = job.root / "TrainingData" / cid
        ph._write_atomic(folder / f"{cid}_seg.nii.gz", ph.nifti_bytes(labels, affine))
        for m, name in enumerate(MODALITIES):
            ph._write_atomic(folder / f"{cid}_{name}.nii.gz", ph.nifti_bytes(images[m].astype(np.int16), affine))
        rel = f"TrainingData/{cid}/{cid}"
        entries.append({"fold": i % 5, "image": [f"{rel}_{m}.nii.gz" for m in DEFAULT_CHANNELS],
                        "label": f"{rel}_seg.nii.gz"})
    ph._write_atomic(job.root / "brats21_folds.json", ph._json_bytes({"training": entries}))


BRATS21 = ph._Like("head", _write_brats, ("TrainingData", "brats21_folds.json"))
