"""What every phantom shares: the voxel grid and shape primitives, the two CT bodies, the per-case random
streams, deterministic file writing, and the :class:`_Like` entry of :data:`sslbench.data.phantoms.PHANTOMS`.

Two bodies exist:

* ``abdomen``: body outline (subcutaneous fat, muscle wall, paraspinal and psoas muscles), spine with
  vertebral bodies, discs and posterior elements, lower ribs, bowel loops with gas, a CT table, and the
  13 BTCV organs with their BTCV label values (1 spleen ... 13 left adrenal gland).
* ``chest``: a contrast-enhanced cardiac CT: lungs with vessels and airways, ribs, sternum, spine,
  mediastinal fat, the upper abdomen below the diaphragm, and a heart made of the 7 MM-WHS structures with
  their raw MM-WHS label values (205 LV myocardium, 420 LA, 500 LV, 550 RA, 600 RV, 820 ascending aorta,
  850 pulmonary artery).

Anatomy is modelled in patient coordinates (millimetres, +x towards the patient's right, +y anterior,
+z superior, i.e. NIfTI RAS+ world axes relative to an anatomical anchor), then sampled on a voxel grid
whose affine is the scanner-like ``diag(-sx, -sy, +-sz)`` plus an origin offset. Because every voxel's
value is computed from its world position, images and labels are consistent with the affine, and after
``Orientationd("RAS")`` the anatomy is the same way round in every case, even where the slice axis is
stored flipped.

Other bodies (the BraTS head, the MSD hippocampus crop and pelvis) are built from these primitives in their
dataset's module; every body has its code in :data:`_BODY_CODES`.
"""

from __future__ import annotations

import gzip
import json
import os
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage


#: BTCV label values of the abdominal phantom (index = value).
BTCV_ORGANS = ("background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver",
               "stomach", "aorta", "inferior vena cava", "portal and splenic veins", "pancreas",
               "right adrenal gland", "left adrenal gland")
#: Raw MM-WHS label values of the cardiac phantom.
MMWHS_LABELS = {"LV myocardium": 205, "LA": 420, "LV": 500, "RA": 550, "RV": 600, "ascending aorta": 820,
                "pulmonary artery": 850}

F32 = np.float32


# ----------------------------------------------------------------------------------------------------------
# Geometry: the voxel grid and shape primitives evaluated on it
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Grid:
    """A voxel grid with its affine and the patient coordinate (mm) of every index along each axis.

    ``x`` has shape (nx, 1, 1), ``y`` (1, ny, 1) and ``z`` (1, 1, nz), so that arithmetic on them
    broadcasts to the volume (the affine is axis-aligned, as scanners write it).
    """

    shape: tuple[int, int, int]
    spacing: np.ndarray
    affine: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie within the patient-coordinate box [lo, hi]."""
        out = []
        for axis, coords in enumerate((self.x.ravel(), self.y.ravel(), self.z.ravel())):
            idx = np.nonzero((coords >= lo[axis]) & (coords <= hi[axis]))[0]
            if idx.size == 0:
                return None
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable patient coordinates of the voxels in a box."""
        return self.x[sl[0]], self.y[:, sl[1]], self.z[:, :, sl[2]]


def _make_grid(rng: np.random.Generator, nz: tuple[int, int], inplane: tuple[float, float],
               slices: tuple[float, float], top_above_anchor: tuple[float, float]) -> _Grid:
    """A 96 x 96 x nz scanner-like grid and the anatomical anchor inside it.

    The affine is ``diag(-s, -s, +-sz)`` (DICOM LPS storage seen in RAS world coordinates; a quarter of the
    cases store slices head-to-feet) with the field-of-view centre at a random table position. The anchor
    (patient coordinate origin) is the body centre in-plane and, along z, a reference level placed
    ``top_above_anchor`` mm below the top of the field of view.
    """
    n = (96, 96, int(rng.integers(nz[0], nz[1] + 1)))
    s_xy = round(float(rng.uniform(*inplane)), 3)
    s_z = round(float(rng.uniform(*slices)), 2)
    flip_z = rng.random() < 0.25
    affine = np.diag([-s_xy, -s_xy, -s_z if flip_z else s_z, 1.0])
    centre = np.array([rng.uniform(-15, 15), rng.uniform(-40, 10), rng.uniform(-650, -250)])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(n) - 1) / 2.0)
    affine = affine.astype(F32).astype(np.float64)  # exactly what the float32 NIfTI header will hold
    top = centre[2] + (n[2] - 1) / 2.0 * s_z
    anchor = np.array([centre[0] + rng.uniform(-12, 12), centre[1] + rng.uniform(-12, 12),
                       top - rng.uniform(*top_above_anchor)])
    world = [affine[a, a] * np.arange(n[a]) + affine[a, 3] - anchor[a] for a in range(3)]
    return _Grid(shape=n, spacing=np.array([s_xy, s_xy, s_z]), affine=affine,
                 x=world[0].astype(F32).reshape(-1, 1, 1), y=world[1].astype(F32).reshape(1, -1, 1),
                 z=world[2].astype(F32).reshape(1, 1, -1))


class _Wobble:
    """A smooth random scalar field: a sum of a few plane waves of long wavelength (mm), std ``amp``.

    Evaluated in millimetres, so a shape deformed by it is the same physical shape whatever the spacing.
    """

    def __init__(self, rng: np.random.Generator, amp: float, wavelength: tuple[float, float] = (45, 120),
                 waves: int = 5):
        dirs = rng.standard_normal((waves, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.k = (dirs * (2 * np.pi / rng.uniform(*wavelength, size=waves))[:, None]).astype(F32)
        self.phase = rng.uniform(0, 2 * np.pi, size=waves).astype(F32)
        self.scale = F32(amp / np.sqrt(waves / 2.0))
        self.amp = amp

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = None
        for k, ph in zip(self.k, self.phase):
            term = np.sin(k[0] * x + k[1] * y + k[2] * z + ph)
            out = term if out is None else out + term
        return out * self.scale


@dataclass
class _Region:
    """A boolean mask over a box of the grid (``sl``)."""

    sl: tuple[slice, slice, slice]
    mask: np.ndarray


def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix (degrees about x, then y, then z); its columns are the shape's local axes."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid(g: _Grid, centre: Sequence[float], semi: Sequence[float], rot: np.ndarray | None = None,
               wobble: _Wobble | None = None, scale: float = 1.0) -> _Region | None:
    """Voxels inside a rotated ellipsoid whose radius is modulated by ``1 + wobble``; None if out of view.

    ``scale`` multiplies the semi-axes (shells are built from two calls sharing the same wobble).
    """
    c = np.asarray(centre, float)
    semi = np.asarray(semi, float) * scale
    r = np.eye(3) if rot is None else rot
    margin = 1.0 + (3.0 * wobble.amp if wobble is not None else 0.0)
    half = np.sqrt(((r * semi[None, :]) ** 2).sum(axis=1)) * margin
    sl = g.box(c - half, c + half)
    if sl is None:
        return None
    x, y, z = g.coords(sl)
    dx, dy, dz = x - F32(c[0]), y - F32(c[1]), z - F32(c[2])
    q = None
    for k in range(3):
        local = (F32(r[0, k]) * dx + F32(r[1, k]) * dy + F32(r[2, k]) * dz) / F32(semi[k])
        q = local * local if q is None else q + local * local
    limit = 1.0 + wobble(x, y, z) if wobble is not None else F32(1.0)
    return _Region(sl, q < limit * limit)


def _smooth_path(points: np.ndarray, radii: np.ndarray, sub: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Catmull-Rom interpolation of a polyline (``sub`` pieces per segment), radii interpolated linearly."""
    if len(points) < 3:
        return points, radii
    padded = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    pts, rad = [], []
    for i in range(len(points) - 1):
        p0, p1, p2, p3 = padded[i:i + 4]
        for t in np.arange(sub) / sub:
            pts.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                              + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
            rad.append(radii[i] + (radii[i + 1] - radii[i]) * t)
    pts.append(points[-1])
    rad.append(radii[-1])
    return np.array(pts), np.array(rad)


def _tube(g: _Grid, points: Sequence[Sequence[float]], radii: float | Sequence[float],
          wobble: _Wobble | None = None) -> _Region | None:
    """Voxels within a (smoothed) polyline's varying radius, modulated by ``1 + wobble``."""
    pts = np.asarray(points, float)
    rad = np.broadcast_to(np.asarray(radii, float), (len(pts),)).copy()
    pts, rad = _smooth_path(pts, rad)
    margin = 1.0 + (3.0 * wobble.amp if wobble is not None else 0.0)
    reach = rad[:, None] * margin
    sl = g.box((pts - reach).min(axis=0), (pts + reach).max(axis=0))
    if sl is None:
        return None
    x, y, z = g.coords(sl)
    shape = (x.shape[0], y.shape[1], z.shape[2])
    ratio = np.full(shape, np.inf, dtype=F32)
    xs, ys, zs = x.ravel(), y.ravel(), z.ravel()
    for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
        r_max = max(ra, rb) * margin
        lo, hi = np.minimum(a, b) - r_max, np.maximum(a, b) + r_max
        sub = []
        for coords, l, h in zip((xs, ys, zs), lo, hi):
            idx = np.nonzero((coords >= l) & (coords <= h))[0]
            if idx.size == 0:
                break
            sub.append(slice(int(idx[0]), int(idx[-1]) + 1))
        if len(sub) < 3:
            continue
        px, py, pz = x[sub[0]] - F32(a[0]), y[:, sub[1]] - F32(a[1]), z[:, :, sub[2]] - F32(a[2])
        d = (b - a).astype(F32)
        length2 = float(d @ d) or 1e-6
        t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / F32(length2), 0, 1)
        dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2
        radius = F32(ra) + t * F32(rb - ra)
        view = ratio[sub[0], sub[1], sub[2]]
        np.minimum(view, np.sqrt(dist2) / radius, out=view)
    limit = 1.0 + wobble(x, y, z) if wobble is not None else F32(1.0)
    return _Region(sl, ratio < limit)


def _superellipse(x: np.ndarray, y: np.ndarray, a: float, b: float, p: float = 2.3) -> np.ndarray:
    """Normalised superellipse radius (< 1 inside) of an in-plane cross-section with half-widths a, b."""
    return (np.abs(x / F32(a)) ** F32(p) + np.abs(y / F32(b)) ** F32(p)) ** F32(1.0 / p)


def _noise(rng: np.random.Generator, g: _Grid, corr_mm: float) -> np.ndarray:
    """Smooth Gaussian noise (std 1) with correlation length ``corr_mm`` in millimetres.

    Filtered at low resolution and upsampled linearly where the correlation spans several voxels.
    """
    sigma = corr_mm / g.spacing
    factor = np.maximum(1, np.floor(sigma / 1.5)).astype(int)
    coarse = tuple(max(2, -(-n // f)) for n, f in zip(g.shape, factor))
    field = rng.standard_normal(coarse, dtype=F32)
    field = ndimage.gaussian_filter(field, sigma / factor, mode="wrap")
    if coarse != g.shape:
        field = ndimage.zoom(field, np.array(g.shape) / np.array(coarse), order=1, mode="nearest")
    field -= field.mean()
    field /= field.std() + F32(1e-6)
    return field


class _Canvas:
    """The HU image and label volume being painted; later paint overwrites earlier paint."""

    def __init__(self, g: _Grid, label_dtype: type):
        self.g = g
        self.hu = np.full(g.shape, -1000.0, dtype=F32)
        self.label = np.zeros(g.shape, dtype=label_dtype)

    def paint(self, region: _Region | None, hu: float, label: int | None = None,
              tex: tuple[float, np.ndarray] | None = None, where: np.ndarray | None = None) -> np.ndarray | None:
        """Set HU (mean + amp * texture) and optionally the label inside a region; returns the mask painted.

        ``where`` is a full-volume mask (or broadcastable) restricting the region.
        """
        if region is None:
            return None
        sl, mask = region.sl, region.mask
        if where is not None:
            mask = mask & np.broadcast_to(where, self.g.shape)[sl]
        view = self.hu[sl]
        if tex is None:
            view[mask] = hu
        else:
            amp, field = tex
            view[mask] = F32(hu) + F32(amp) * field[sl][mask]
        if label is not None:
            self.label[sl][mask] = label
        return mask

    def full(self, mask: np.ndarray) -> _Region:
        """A region covering the whole volume (mask broadcast to the grid)."""
        return _Region((slice(None),) * 3, np.broadcast_to(mask, self.g.shape))

    def finish(self, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
        """Partial-volume blur, scanner noise, and HU quantisation to int16."""
        g = self.g
        blur = np.array([0.6, 0.6, 0.45])
        img = ndimage.gaussian_filter(self.hu, blur)
        noise = rng.standard_normal(g.shape, dtype=F32)
        noise = ndimage.gaussian_filter(noise, [0.5, 0.5, 0.0])
        noise *= F32(noise_hu) / (noise.std() + F32(1e-6))
        img += noise
        return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


@dataclass
class PhantomCase:
    """One generated volume: int16 HU image, label volume (raw label values) and the shared affine."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


# ----------------------------------------------------------------------------------------------------------
# Shared anatomy: spine, ribs, table
# ----------------------------------------------------------------------------------------------------------
def _spine(cv: _Canvas, rng: np.random.Generator, spine_y: float, scale: float, period: tuple[float, float],
           clear_label: bool = True) -> None:
    """Vertebral bodies (cortex, cancellous bone), discs, spinal canal and posterior elements.

    Painted last so that bone clears any organ label that strayed into it.
    """
    x, y, z = cv.g.x, cv.g.y, cv.g.z
    per = rng.uniform(*period)
    disc_h = 0.25 * per
    phase = (z - F32(rng.uniform(0, per))) % F32(per)
    disc = phase < F32(disc_h)
    bony = ~disc
    mid_bone = (phase > F32(disc_h + 0.2 * per)) & (phase < F32(per - 0.15 * per))
    lab = 0 if clear_label else None
    body_r = _superellipse(x, y - F32(spine_y), 22 * scale, 17 * scale, p=2.2)
    vb = body_r < 1.0
    cv.paint(cv.full(vb & disc), rng.uniform(80, 100), lab)
    cv.paint(cv.full(vb & bony), rng.uniform(200, 260), lab)
    cv.paint(cv.full((body_r > 0.8) & vb & bony), rng.uniform(700, 900), lab)
    canal_y = spine_y - 17 * scale - 10
    canal_r = np.sqrt((x / F32(9)) ** 2 + ((y - F32(canal_y)) / F32(9)) ** 2)
    arch = (canal_r >= 1.0) & (canal_r < 1.7) & (y < F32(canal_y + 4))
    cv.paint(cv.full(arch & bony), rng.uniform(500, 700), lab)
    cv.paint(cv.full(canal_r < 1.0), rng.uniform(10, 25), lab)
    spinous = (np.abs(x) < F32(5)) & (y < F32(canal_y - 12)) & (y > F32(canal_y - 45))
    cv.paint(cv.full(spinous & mid_bone), rng.uniform(450, 650), lab)
    transverse = _superellipse(np.abs(x) - F32(30 * scale), y - F32(canal_y + 6), 16 * scale, 6) < 1.0
    cv.paint(cv.full(transverse & mid_bone), rng.uniform(450, 650), lab)


def _ribs(cv: _Canvas, rng: np.random.Generator, outer: np.ndarray, inner: np.ndarray, a: float, b: float,
          z_from: float, anterior_gap: float, hu: float) -> None:
    """Oblique ribs in the body wall: a radial band cut into bars that descend towards the front."""
    x, y, z = cv.g.x, cv.g.y, cv.g.z
    theta = np.abs(np.arctan2(x / F32(a), y / F32(b)))  # 0 anterior midline, pi posterior
    per = rng.uniform(26, 32)
    bars = ((z + F32(40) * theta + F32(rng.uniform(0, per))) % F32(per)) < F32(rng.uniform(9, 12))
    lowest = F32(z_from) - F32(30) * (theta / F32(np.pi))  # posterior ribs reach lower
    rib = outer & ~inner & bars & (theta > F32(anterior_gap)) & (z > lowest)
    cv.paint(cv.full(rib), hu, 0)


def _table(cv: _Canvas, rng: np.random.Generator, y_back: float) -> None:
    """The CT table: a curved plate below the patient's back."""
    x, y = cv.g.x, cv.g.y
    top = F32(y_back - rng.uniform(10, 30)) + F32(0.0008) * x * x
    plate = (y < top) & (y > top - F32(8)) & (np.abs(x) < F32(220))
    cv.paint(cv.full(plate), rng.uniform(120, 250))


def _body_layers(cv: _Canvas, a: float, b: float, fat: float, muscle: float,
                 wobble: _Wobble, p: float = 2.3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Skin/subcutaneous fat and the muscle wall; returns (body, muscle_outer, cavity, wobble limit)."""
    x, y, z = cv.g.x, cv.g.y, cv.g.z
    limit = 1.0 + wobble(x, y, z)
    body = _superellipse(x, y, a, b, p) < limit
    outer = _superellipse(x, y, a - fat, b - 0.8 * fat, p) < limit
    cavity = _superellipse(x, y, a - fat - muscle, b - 0.8 * fat - muscle, p) < limit
    return body, outer, cavity, limit


# ----------------------------------------------------------------------------------------------------------
# The abdomen (BTCV organs)
# ----------------------------------------------------------------------------------------------------------
def abdomen(rng: np.random.Generator) -> PhantomCase:
    """One contrast-enhanced (portal venous) abdominal CT with the 13 BTCV organs labelled 1..13."""
    g = _make_grid(rng, nz=(40, 56), inplane=(3.4, 3.9), slices=(4.0, 6.0), top_above_anchor=(110, 150))
    cv = _Canvas(g, np.uint8)
    x, y = g.x, g.y
    a, b = rng.uniform(145, 172), rng.uniform(100, 125)
    kx, ky = a / 160.0, b / 115.0                      # body habitus scales organ positions in-plane
    size = rng.uniform(0.9, 1.1)                       # overall organ size of this patient
    contrast = rng.uniform(0.75, 1.25)                 # enhancement (bolus timing, dose)
    offset = rng.normal(0, 5)                          # calibration offset of the scanner

    def P(px: float, py: float, pz: float) -> np.ndarray:
        jit = rng.normal(0, 4, size=3)
        return np.array([px * kx, py * ky, pz]) + jit

    def hu(base: float, enh: float, sd: float = 6.0) -> float:
        return base + enh * contrast + offset + rng.normal(0, sd)

    def S(*semi: float) -> np.ndarray:
        return np.array(semi) * size * rng.uniform(0.9, 1.1, size=3)

    def W(amp: float = 0.12, wl: tuple[float, float] = (45, 120)) -> _Wobble:
        return _Wobble(rng, amp, wl)

    fine, coarse = _noise(rng, g, 4.0), _noise(rng, g, 12.0)
    organ_tex = (fine * F32(0.8) + coarse * F32(0.6))
    bowel_field, gas_field = _noise(rng, g, 11.0), _noise(rng, g, 7.0)
    ves1, ves2 = _noise(rng, g, 9.0), _noise(rng, g, 9.0)

    # body wall, table, background of the abdominal cavity (mesenteric fat and bowel loops with gas)
    fat_t, musc_t = rng.uniform(12, 30), rng.uniform(8, 14)
    body, outer, cavity, _ = _body_layers(cv, a, b, fat_t, musc_t, W(0.025, (80, 220)))
    _table(cv, rng, -b)
    cv.paint(cv.full(body), hu(-100, 0, 8), tex=(12, fine))
    cv.paint(cv.full(outer & ~cavity), hu(45, 8, 5), tex=(8, fine))
    cv.paint(cv.full(cavity), hu(-90, 0, 8), tex=(14, fine))
    loops = cavity & (bowel_field > F32(0.1))
    cv.paint(cv.full(loops), hu(30, 15, 6), tex=(14, fine))
    cv.paint(cv.full(loops & (gas_field > F32(1.6)) & (y > F32(-0.2 * b))), -850, tex=(40, fine))

    spine_y = -0.48 * b
    paraspinal = _superellipse(np.abs(x) - F32(38 * kx), y - F32(spine_y - 42), 30 * kx, 24) < 1.0
    cv.paint(cv.full(paraspinal & body), hu(48, 6, 4), tex=(8, fine))
    for side in (1, -1):
        psoas = _tube(g, [P(side * 30, spine_y / ky + 8, 40), P(side * 45, spine_y / ky + 6, -60),
                          P(side * 62, spine_y / ky + 20, -170)], [6, 20, 24], W(0.1))
        cv.paint(psoas, hu(48, 6, 4), tex=(8, fine), where=body)

    sy = spine_y / ky  # spine level in the reference body's y, for the organ table below
    organs = cavity

    # liver (right lobe + left lobe across the midline) with brighter intrahepatic vessels
    liver_hu, liver_w = hu(58, 48), W(0.1)
    right_lobe = _ellipsoid(g, P(68, 0, 62), S(78, 88, 82), _rot(0, 8, rng.uniform(-10, 10)), liver_w)
    left_lobe = _ellipsoid(g, P(-12, 48, 78), S(58, 34, 40), _rot(0, 0, rng.uniform(-20, -5)), liver_w)
    for lobe in (right_lobe, left_lobe):
        painted = cv.paint(lobe, liver_hu, 6, tex=(7, organ_tex), where=organs)
        if painted is not None:
            vessels = painted & (np.abs(ves1[lobe.sl]) < F32(0.12)) & (np.abs(ves2[lobe.sl]) < F32(0.12))
            cv.paint(_Region(lobe.sl, vessels), liver_hu + 40 * contrast, tex=(6, fine))

    # esophagus (before the stomach, which wins at the gastro-oesophageal junction)
    cv.paint(_tube(g, [P(-2, sy + 57, 175), P(-6, sy + 58, 125), P(-22, sy + 62, 98), P(-40, 5, 86)],
                   9 * size, W(0.08)), hu(40, 10), 5, tex=(6, organ_tex), where=organs)

    # stomach: fundus, body, antrum; water content with an anterior gas cap (patient supine)
    st_hu, st_w = hu(15, 8), W(0.1)
    fundus_c = P(-55, 8, 88)
    parts = [_ellipsoid(g, fundus_c, S(42, 40, 40), None, st_w),
             _ellipsoid(g, P(-45, 42, 45), S(36, 30, 50), _rot(rng.uniform(-20, 0), 0, 20), st_w),
             _tube(g, [P(-40, 48, 25), P(-10, 58, 5), P(22, 45, 2)], np.array([20, 16, 12]) * size, W(0.08))]
    gas_level = F32(fundus_c[1] + rng.uniform(8, 28))
    for part in parts:
        painted = cv.paint(part, st_hu, 7, tex=(8, organ_tex), where=organs)
        if painted is not None:
            cv.paint(_Region(part.sl, painted & (y[:, part.sl[1]] > gas_level)), -900, tex=(30, fine))

    # spleen (left, posterior, along the lower ribs)
    cv.paint(_ellipsoid(g, P(-92, -32, 62), S(24, 50, 55), _rot(15, 0, 30 + rng.uniform(-10, 10)), W(0.12)),
             hu(45, 75), 1, tex=(6, organ_tex), where=organs)

    # kidneys: paravertebral, hilum facing antero-medially; renal sinus of lower density
    for label, side, zc in ((2, 1, -12), (3, -1, 2)):
        c, rot = P(side * 70, sy + 7, zc), _rot(0, side * 10, side * -25)
        semi = S(24, 28, 52)
        w = W(0.08)
        cv.paint(_ellipsoid(g, c, semi, rot, w), hu(35, 135, 8), label, tex=(10, organ_tex), where=organs)
        sinus_c = c + np.array([-side * 10.0, 6.0, 0.0])
        cv.paint(_ellipsoid(g, sinus_c, semi * np.array([0.35, 0.35, 0.55]), rot, None), hu(5, 20), label,
                 tex=(10, fine), where=organs)

    # gallbladder in its fossa under the liver
    cv.paint(_ellipsoid(g, P(48, 55, 22), S(16, 17, 34), _rot(35, 0, rng.uniform(-15, 15)), W(0.1)),
             hu(8, 0, 4), 4, tex=(3, fine), where=organs)

    # pancreas: head by the duodenum, body over the aorta, tail towards the splenic hilum (lobulated)
    cv.paint(_tube(g, [P(26, 22, -5), P(8, 30, 10), P(-20, 22, 20), P(-52, 5, 30), P(-76, -12, 42)],
                   np.array([16, 11, 12, 11, 8]) * size, W(0.15, (30, 80))),
             hu(45, 55), 11, tex=(16, fine), where=organs)

    # adrenal glands: thin plates above/medial to the kidneys
    cv.paint(_ellipsoid(g, P(34, sy + 19, 62), S(5, 13, 20), _rot(0, 0, 30), W(0.1)), hu(40, 20), 12,
             tex=(5, fine), where=organs)
    cv.paint(_ellipsoid(g, P(-34, sy + 27, 44), S(5, 14, 20), _rot(0, 0, -30), W(0.1)), hu(40, 20), 13,
             tex=(5, fine), where=organs)

    # vessels: aorta (left-anterior of the spine, label down to the bifurcation) with unlabelled iliac
    # arteries and SMA; IVC (right of the aorta, into the liver); portal + splenic veins with unlabelled SMV
    ao_hu, vein_hu = hu(45, 150, 10), hu(45, 115, 8)
    r_ao = rng.uniform(10, 12.5)
    cv.paint(_tube(g, [P(-14, sy + 36, 200), P(-14, sy + 36, 20), P(-13, sy + 38, -95)],
                   [r_ao, r_ao, r_ao * 0.85], W(0.04)), ao_hu, 8, tex=(5, fine), where=organs)
    for side in (-1, 1):
        cv.paint(_tube(g, [P(-13, sy + 38, -95), P(-13 + side * 40, sy + 48, -170)], r_ao * 0.6), ao_hu,
                 tex=(5, fine), where=organs)
    cv.paint(_tube(g, [P(-13, sy + 45, 30), P(-10, sy + 75, 10), P(-6, sy + 85, -40)], 4), ao_hu,
             tex=(5, fine), where=organs)
    cv.paint(_tube(g, [P(22, sy + 34, -95), P(22, sy + 34, -20), P(26, sy + 42, 40), P(22, sy + 40, 110),
                       P(14, sy + 38, 200)], rng.uniform(9.5, 12.5), W(0.06)),
             hu(45, 100), 9, tex=(5, fine), where=organs)
    conf = P(6, 8, 18)
    cv.paint(_tube(g, [conf, P(12, 22, -30), P(16, 30, -90)], 6), vein_hu, tex=(5, fine), where=organs)
    cv.paint(_tube(g, [P(48, 18, 55), P(24, 14, 32), conf], 7.5 * size, W(0.05)), vein_hu, 10,
             tex=(5, fine), where=organs)
    cv.paint(_tube(g, [conf, P(-25, 2, 24), P(-55, -10, 32), P(-80, -22, 46)], 5.5 * size, W(0.05)),
             vein_hu, 10, tex=(5, fine), where=organs)

    # bones last: lower ribs in the body wall, then the spine (both clear organ labels)
    rib_mid = fat_t + 0.5 * musc_t
    rib_outer = _superellipse(x, y, a - rib_mid + 5, b - rib_mid + 5) < 1.0
    rib_inner = _superellipse(x, y, a - rib_mid - 5, b - rib_mid - 5) < 1.0
    _ribs(cv, rng, rib_outer, rib_inner, a, b, z_from=-20, anterior_gap=0.9, hu=rng.uniform(400, 600))
    _spine(cv, rng, spine_y, scale=rng.uniform(0.9, 1.1), period=(30, 35))
    cv.label[~np.broadcast_to(body, g.shape)] = 0
    image = cv.finish(rng, rng.uniform(8, 22))
    return PhantomCase(image=image, label=cv.label, affine=g.affine)


# ----------------------------------------------------------------------------------------------------------
# The chest (MM-WHS heart)
# ----------------------------------------------------------------------------------------------------------
def chest(rng: np.random.Generator) -> PhantomCase:
    """One cardiac CT angiogram with the 7 MM-WHS structures at their raw label values (205 ... 850)."""
    g = _make_grid(rng, nz=(40, 56), inplane=(3.0, 3.6), slices=(3.5, 5.0), top_above_anchor=(95, 130))
    cv = _Canvas(g, np.int16)
    x, y, z = g.x, g.y, g.z
    a, b = rng.uniform(150, 172), rng.uniform(105, 125)
    kx, ky = a / 160.0, b / 115.0
    size = rng.uniform(1.05, 1.3)                       # heart size (cardiothoracic ratio ~0.4-0.5)
    blood_l = rng.uniform(300, 450)                     # left heart and aorta
    blood_r = blood_l * rng.uniform(0.7, 1.0)           # right heart and pulmonary artery (mixing)
    offset = rng.normal(0, 5)

    def P(px: float, py: float, pz: float, jitter: float = 3.0) -> np.ndarray:
        return np.array([px * kx, py * ky, pz]) + rng.normal(0, jitter, size=3)

    def W(amp: float = 0.08, wl: tuple[float, float] = (45, 120)) -> _Wobble:
        return _Wobble(rng, amp, wl)

    fine, coarse = _noise(rng, g, 4.0), _noise(rng, g, 14.0)
    ves1, ves2 = _noise(rng, g, 8.0), _noise(rng, g, 8.0)

    fat_t, musc_t = rng.uniform(8, 20), rng.uniform(10, 15)
    body, outer, cavity, limit = _body_layers(cv, a, b, fat_t, musc_t, W(0.02, (80, 220)), p=2.5)
    _table(cv, rng, -b)
    cv.paint(cv.full(body), -100 + offset, tex=(12, fine))
    cv.paint(cv.full(outer & ~cavity), 45 + offset, tex=(8, fine))
    for side in (-1, 1):  # pectoral muscles
        pect = _superellipse(x - F32(side * 65 * kx), y - F32(b - fat_t - 12), 55 * kx, 12) < 1.0
        cv.paint(cv.full(pect & body), 45 + offset, tex=(8, fine))
    spine_y = -0.52 * b
    paraspinal = _superellipse(np.abs(x) - F32(36 * kx), y - F32(spine_y - 40), 28 * kx, 22) < 1.0
    cv.paint(cv.full(paraspinal & body), 48 + offset, tex=(8, fine))

    # thoracic cavity: lungs everywhere above the diaphragm except the mediastinum
    heart_c = P(-15, 18, 0)
    dome_x = 30 * kx
    z_dia = F32(-62) + F32(45) * (1 - ((x - F32(dome_x)) / F32(a)) ** 2 - (y / F32(b)) ** 2)
    z_dia = z_dia + F32(12) * (x > 0)  # the right dome (liver) is higher
    above = z > z_dia
    mediastinum_x = F32(heart_c[0] * 0.3)
    mediastinum = (np.abs(x - mediastinum_x) < F32(28)) & (y > F32(spine_y - 5))
    heart_env = _ellipsoid(g, heart_c, np.array([62, 58, 55]) * size, _rot(25, 0, 30), W(0.04))
    env_full = np.zeros(g.shape, bool)
    if heart_env is not None:
        env_full[heart_env.sl] = heart_env.mask
    lungs = cavity & above & ~mediastinum & ~env_full
    cv.paint(cv.full(cavity & above), -60 + offset, tex=(12, fine))          # mediastinal fat
    lung_hu = rng.uniform(-880, -820)
    cv.paint(cv.full(lungs), lung_hu, tex=(25, coarse))
    pulm_vessels = lungs & (np.abs(ves1) < F32(0.13)) & (np.abs(ves2) < F32(0.13))
    cv.paint(cv.full(pulm_vessels), -150, tex=(60, fine))
    # upper abdomen below the diaphragm: liver on the right, stomach/spleen on the left
    below = cavity & ~above
    cv.paint(cv.full(below), 60 + offset, tex=(10, fine))
    cv.paint(cv.full(below & (x < 0) & (coarse > F32(0.8))), -850, tex=(30, fine))

    # airways: trachea to the carina, main bronchi
    carina = P(0, spine_y / ky + 45, 55)
    for end in (P(55, spine_y / ky + 40, 35), P(-60, spine_y / ky + 38, 32)):
        cv.paint(_tube(g, [carina, end], 7), -950, tex=(20, fine), where=cavity)
    cv.paint(_tube(g, [P(0, spine_y / ky + 50, 200), carina], 9), -950, tex=(20, fine), where=cavity)
    cv.paint(_tube(g, [P(-8, spine_y / ky + 20, 200), P(-6, spine_y / ky + 20, -80)], 6), 40 + offset,
             tex=(6, fine), where=cavity)  # oesophagus

    # heart frame: long axis from the base (posterior-right-superior) to the apex (anterior-left-inferior)
    u = np.array([-0.55, 0.55, -0.62]) + rng.normal(0, 0.06, 3)
    u /= np.linalg.norm(u)
    sept = np.array([0.6, 0.8, 0.0]) - (np.array([0.6, 0.8, 0.0]) @ u) * u
    sept /= np.linalg.norm(sept)
    third = np.cross(u, sept)
    frame = np.stack([sept, third, u], axis=1)  # local axes: (towards RV, third, long axis)
    base = heart_c - 45 * size * u

    def H(along: float, to_rv: float, other: float = 0.0) -> np.ndarray:
        return base + size * (along * u + to_rv * sept + other * third)

    myo_hu = rng.uniform(90, 120) + offset
    cv.paint(heart_env, -80 + offset, tex=(10, fine), where=cavity)                       # epicardial fat
    # RV: crescent in front of the septum; thin free wall (unlabelled myocardium)
    rv_c, rv_semi, rv_w = H(38, 22, 2), np.array([26, 32, 38]) * size, W(0.05)
    rv_rot = frame
    cv.paint(_ellipsoid(g, rv_c, rv_semi + 4, rv_rot, rv_w), myo_hu, tex=(8, fine), where=cavity)
    cv.paint(_ellipsoid(g, rv_c, rv_semi, rv_rot, rv_w), blood_r + offset, 600, tex=(15, fine), where=cavity)
    # LV: myocardial shell (open at the base) around the cavity
    lv_c, lv_semi, lv_w = H(45, -8), np.array([20, 20, 42]) * size, W(0.04)
    lv_outer = _ellipsoid(g, lv_c, lv_semi + 10 * size, frame, lv_w)
    if lv_outer is not None:
        xs, ys, zs = g.coords(lv_outer.sl)
        along = (xs - F32(base[0])) * F32(u[0]) + (ys - F32(base[1])) * F32(u[1]) + (zs - F32(base[2])) * F32(u[2])
        lv_outer.mask &= along > F32(4 * size)
    cv.paint(lv_outer, myo_hu, 205, tex=(8, fine), where=cavity)
    lv_cavity = _ellipsoid(g, lv_c, lv_semi, frame, lv_w)
    if lv_cavity is not None and lv_outer is not None:
        inner = np.zeros(g.shape, bool)
        inner[lv_cavity.sl] = lv_cavity.mask
        outer_full = np.zeros(g.shape, bool)
        outer_full[lv_outer.sl] = lv_outer.mask
        cv.paint(cv.full(inner & outer_full), blood_l + offset, 500, tex=(15, fine), where=cavity)
    # atria: LA posterior (in front of the spine/oesophagus), RA to the right; pulmonary veins and cavae
    la_c = P(-2, spine_y / ky + 42, 30)
    cv.paint(_ellipsoid(g, la_c, np.array([30, 16, 22]) * size, _rot(0, 0, rng.uniform(-10, 10)), W(0.06)),
             blood_l + offset, 420, tex=(12, fine), where=cavity)
    for side in (-1, 1):
        for dz in (-10, 10):
            cv.paint(_tube(g, [la_c + np.array([side * 25, -4, dz]), la_c + np.array([side * 60, -10, dz * 1.3])],
                           5.5), blood_l + offset, tex=(12, fine), where=cavity)
    ra_c = P(38, -2, 20)
    cv.paint(_ellipsoid(g, ra_c, np.array([24, 24, 28]) * size, None, W(0.06)), blood_r + offset, 550,
             tex=(12, fine), where=cavity)
    cv.paint(_tube(g, [ra_c + np.array([-6, -6, 15]), P(28, -14, 70), P(26, -16, 200)], 9),
             blood_r + rng.uniform(200, 500), tex=(40, fine), where=cavity)              # SVC with dense bolus
    cv.paint(_tube(g, [ra_c + np.array([0, -6, -15]), P(36, -14, -200)], 12), 0.6 * blood_r + offset,
             tex=(15, fine), where=cavity)                                                 # IVC (mixing)
    # great vessels: ascending aorta (label) + arch and descending aorta (unlabelled); pulmonary artery
    av = H(2, -4)
    r_ao = rng.uniform(12, 15) * size
    asc = [av, P(15, 6, 55), P(10, 2, 85), P(-5, -14, 100)]
    cv.paint(_tube(g, [P(-5, -14, 100), P(-25, spine_y / ky + 30, 95), P(-35, spine_y / ky + 24, 60),
                       P(-35, spine_y / ky + 24, -200)], r_ao * 0.85), blood_l + offset, tex=(12, fine),
             where=cavity)
    cv.paint(_tube(g, asc, r_ao, W(0.04)), blood_l + offset, 820, tex=(12, fine), where=cavity)
    pv = H(10, 30, -6)
    bif = P(-14, -6, 72)
    r_pa = rng.uniform(11, 14) * size
    pa_w = W(0.04)
    cv.paint(_tube(g, [pv, P(-18, 14, 58), bif], r_pa, pa_w), blood_r + offset, 850, tex=(12, fine),
             where=cavity)
    for end in (P(-55, -18, 64), P(45, -20, 66)):
        cv.paint(_tube(g, [bif, end], r_pa * 0.7, pa_w), blood_r + offset, 850, tex=(12, fine), where=cavity)

    # bones: ribs all around, sternum in front (above the xiphoid), spine
    rib_mid = fat_t + 0.5 * musc_t
    rib_outer = _superellipse(x, y, a - rib_mid + 5, b - rib_mid + 5, 2.5) < limit
    rib_inner = _superellipse(x, y, a - rib_mid - 5, b - rib_mid - 5, 2.5) < limit
    _ribs(cv, rng, rib_outer, rib_inner, a, b, z_from=-120, anterior_gap=0.35, hu=rng.uniform(450, 650))
    sternum = (_superellipse(x, y - F32(b - fat_t - musc_t - 2), 14, 8) < 1.0) & (z > F32(-70))
    cv.paint(cv.full(sternum), rng.uniform(350, 500), 0)
    _spine(cv, rng, spine_y, scale=rng.uniform(0.85, 1.0), period=(24, 28))
    cv.label[~np.broadcast_to(body, g.shape)] = 0
    image = cv.finish(rng, rng.uniform(15, 30))
    return PhantomCase(image=image, label=cv.label, affine=g.affine)


# ----------------------------------------------------------------------------------------------------------
# Writing files
# ----------------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` through a temporary sibling and a rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=4) + "\n").encode()


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Deterministic .nii.gz bytes (qform = sform = affine, mm units, gzip mtime 0, no file name inside)."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"sslbench phantom"
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


#: A code per body for the case random streams (bodies of other modules included: brats head, MSD hippocampus
#: crop and pelvis); a new body takes a new code, so the streams of the others stay as they are.
_BODY_CODES: dict[str, int] = {"abdomen": 1, "chest": 2, "head": 3, "hippocampus": 4, "pelvis": 5}


def _case_rng(seed: int, body: str, number: int) -> np.random.Generator:
    """The random stream of one case: a function of (seed, body, case number) only.

    So the same seed gives the same volume for case 0001 whether written like ``btcv`` or ``btcv-raw``.
    """
    body_code = _BODY_CODES[body]
    return np.random.default_rng(np.random.SeedSequence([int(seed), body_code, int(number)]))


@dataclass(frozen=True)
class _Like:
    """A phantom layout: its body generator, writer, and the paths it owns under the root."""

    body: str
    write: Callable[["_Job"], None]
    owned: tuple[str, ...]
    subdir: str = ""
    test: bool = False   # writes unlabelled test images by default (the real layout has a test folder / list)


@dataclass
class _Job:
    """What one writer needs: the root, the seed and counts, and a case generator."""

    like: str
    root: Path
    cases: int
    test_cases: int
    seed: int
    body: str

    #: threads that generate and write cases (``write_case`` then only queues; :func:`synth` waits for all of them
    #: before the tree's marker): each case's random stream is its own (``_case_rng``), so the files are
    #: byte-identical whatever the threads' order
    pool: Executor | None = None
    pending: list[Future] = field(default_factory=list)

    def case(self, number: int) -> PhantomCase:
        return _BODIES[self.body](_case_rng(self.seed, self.body, number))

    def write_case(self, number: int, image: Path, label: Path | None,
                   relabel: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """Generate one case and write label first, then image (readers key on images); queued on ``pool``."""
        if self.pool is not None:
            self.pending.append(self.pool.submit(self._write_case, number, image, label, relabel))
        else:
            self._write_case(number, image, label, relabel)

    def wait(self) -> None:
        """Every queued case written; the first failure, in the order the cases were queued, is raised."""
        for future in self.pending:
            future.result()
        self.pending.clear()

    def _write_case(self, number: int, image: Path, label: Path | None,
                    relabel: Callable[[np.ndarray], np.ndarray] | None) -> None:
        c = self.case(number)
        if label is not None:
            lab = relabel(c.label) if relabel is not None else c.label
            _write_atomic(label, nifti_bytes(lab, c.affine))
        _write_atomic(image, nifti_bytes(c.image, c.affine))


_BODIES: dict[str, Callable[[np.random.Generator], PhantomCase]] = {"abdomen": abdomen, "chest": chest}
