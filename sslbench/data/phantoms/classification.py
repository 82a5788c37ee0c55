"""Phantom twins of the classification datasets CC-CCII (3D slice folders) and NIH ChestX-ray14 (2D radiographs).

They write miniature trees of the distributed layouts (read by :mod:`sslbench.data.layouts.classification`) whose
classes differ in learnable, anatomically placed patterns; their writers draw their own 8-bit images (no NIfTI
body), so the body name of their :class:`~sslbench.data.phantoms.base._Like` only labels them.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from sslbench.data.layouts.classification import _FOLD_FILE, CCCCII_CLASSES, CHESTXRAY_FINDINGS, NO_FINDING, patient_folds
from sslbench.data.phantoms.base import _Like, _write_atomic


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _blob(u: np.ndarray, v: np.ndarray, w: np.ndarray | float, c: Sequence[float], r: Sequence[float]) -> np.ndarray:
    """A soft-edged ellipsoid (1 inside, smooth fall-off over ~15% of the radius) on a broadcast grid."""
    d = ((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2 + ((w - c[2]) / r[2]) ** 2 if len(c) == 3 else \
        ((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2
    return np.clip((1.0 - np.sqrt(d)) / 0.15, 0.0, 1.0)


def ct_chest_scan(rng: np.random.Generator, cls: str, size: int = 96, depth: tuple[int, int] = (20, 32)) -> np.ndarray:
    """An 8-bit lung-window chest CT slice stack [D, size, size] with a class-specific lung pattern.

    Anatomy (in-plane u right-left, v anterior(-)-posterior(+), w apex (0) to base (1)): body outline with a fat
    rim, two lungs widening towards the base above a diaphragm dome, mediastinum and heart, descending aorta,
    vertebra, ribs, lung vessels. Patterns, inside the lungs only: ``Normal`` clear lungs; ``CP`` (common
    pneumonia) 1-2 dense lobar consolidations, central to lower, mostly one-sided; ``NCP`` (COVID-19)
    several faint bilateral ground-glass opacities in the subpleural periphery (lateral and posterior).
    """
    d = int(rng.integers(depth[0], depth[1] + 1))
    ax = np.linspace(-1, 1, size, dtype=np.float32)
    u, v = ax[None, None, :], ax[None, :, None]
    w = np.linspace(0, 1, d, dtype=np.float32)[:, None, None]
    sx, sy = rng.uniform(0.8, 0.9), rng.uniform(0.58, 0.66)
    body = _blob(u, v, 0.0, (0, 0.02), (sx, sy))
    inner = _blob(u, v, 0.0, (0, 0.02), (sx - 0.06, sy - 0.05))
    img = 8 + body * 92 + inner * 20                              # fat rim ~100, muscle/soft tissue ~120
    grow = np.sqrt(np.clip(np.sin(np.pi * (0.08 + 0.9 * w)), 0, 1))  # lungs small at the apex, wide at the base
    dome = (w < 0.88 - 0.25 * (u ** 2))                            # diaphragm dome cuts the lung base
    lungs = np.zeros((d, size, size), np.float32)
    for side in (-1, 1):
        cu = side * rng.uniform(0.34, 0.40)
        lung = _blob(u, v, 0.0, (cu, 0.0), (0.25 * grow + 0.02, 0.40 * grow + 0.02)) * dome
        lungs = np.maximum(lungs, lung)
    heart = _blob(u, v, w, (rng.uniform(-0.02, 0.08), -0.1, 0.72), (0.24, 0.22, 0.3))
    lungs = lungs * (1 - heart)
    img = img * (1 - lungs) + 22 * lungs
    img = img + heart * 10
    img = np.maximum(img, 160 * _blob(u, v, 0.0, (-0.08, 0.25), (0.07, 0.07)))    # descending aorta
    img = np.maximum(img, 235 * _blob(u, v, 0.0, (0.0, 0.48), (0.10, 0.09)))      # vertebral body
    ang = np.linspace(0, 2 * np.pi, 14, endpoint=False) + rng.uniform(0, 0.3)
    rib_on = ((w * d).astype(int) % 3 != 0)
    for a in ang:
        c = ((sx - 0.04) * np.cos(a), (sy - 0.03) * np.sin(a) + 0.02)
        img = np.maximum(img, 220 * _blob(u, v, 0.0, c, (0.035, 0.03)) * rib_on)
    for _ in range(int(rng.integers(10, 16))):                     # vessels: tubes running along the z axis
        c = (rng.uniform(-0.6, 0.6), rng.uniform(-0.3, 0.3))
        img = img + 45 * _blob(u, v, 0.0, c, (0.025, 0.025)) * lungs
    pattern = np.zeros_like(img)
    if cls == "CP":
        for _ in range(int(rng.integers(1, 3))):
            side = 1 if rng.random() < 0.7 else -1
            c = (side * rng.uniform(0.3, 0.4), rng.uniform(-0.1, 0.2), rng.uniform(0.45, 0.8))
            pattern = np.maximum(pattern, _blob(u, v, w, c, (0.16, 0.2, 0.25)) * 105)
    elif cls == "NCP":
        for _ in range(int(rng.integers(5, 9))):
            side = -1 if _ % 2 else 1
            a = rng.uniform(-0.6, 1.2)                             # lateral to posterior rim of the lung
            c = (side * (0.38 + 0.2 * np.cos(a)), 0.35 * np.sin(a) + 0.05, rng.uniform(0.25, 0.85))
            pattern = np.maximum(pattern, _blob(u, v, w, c, (0.14, 0.14, 0.18)) * 62)
    img = img + pattern * lungs
    img = img + rng.normal(0, 5, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_ccccii(job) -> None:
    """CC-CCII tree: {NCP,CP,Normal}/<patient>/<scan>/NNNN.png, unzip_filenames.csv, csv/ fold files.

    ``job.cases`` patients, classes dealt round-robin (NCP, CP, Normal); every fourth patient has two scans
    (as many real patients do). The fold CSVs follow VoCo's columns and are class-stratified and
    patient-disjoint.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(job.seed), 31]))
    root: Path = job.root
    order = ("NCP", "CP", "Normal")
    scans, next_scan = [], 1000
    patient_ids = rng.choice(np.arange(1, 10 * job.cases + 10), size=job.cases, replace=False)
    for i in range(job.cases):
        cls, pid = order[i % 3], int(patient_ids[i])
        for _ in range(2 if i % 4 == 1 else 1):     # every fourth patient, of each class in turn
            next_scan += int(rng.integers(1, 4))
            vol = ct_chest_scan(np.random.default_rng(np.random.SeedSequence([int(job.seed), 32, next_scan])), cls)
            folder = root / cls / str(pid) / str(next_scan)
            for z in range(vol.shape[0]):
                _write_atomic(folder / f"{z:04d}.png", _png(vol[z]))
            scans.append({"zip_file": f"{cls}-{1 + i // 9}.zip", "label": cls, "patient_id": pid,
                          "scan_id": next_scan, "n_slice": vol.shape[0]})
    lines = ["zip_file,label,patient_id,scan_id,n_slice"]
    lines += [f"{s['zip_file']},{s['label']},{s['patient_id']},{s['scan_id']},{s['n_slice']}" for s in scans]
    _write_atomic(root / "unzip_filenames.csv", ("\n".join(lines) + "\n").encode())
    items = [{"label": CCCCII_CLASSES.index(s["label"]), "patient": str(s["patient_id"])} for s in scans]
    folds = patient_folds(items)
    per_patient: dict[int, list[int]] = {}
    for s in scans:
        per_patient.setdefault(s["patient_id"], []).append(s["scan_id"])
    for k in range(3):
        for part in ("train", "valid"):
            rows = ["zip_file,target,label,patient_id,scan_id,n_slice,scan_count,all_scan_ids"]
            for s, it in zip(scans, items):
                in_val = folds[f"{it['label']}:{it['patient']}"] == k
                if in_val == (part == "valid"):
                    ids = per_patient[s["patient_id"]]
                    rows.append(f"{s['zip_file']},{CCCCII_CLASSES.index(s['label'])},{s['label']},{s['patient_id']},"
                                f"{s['scan_id']},{s['n_slice']},{len(ids)},\"{ids}\"")
            _write_atomic(root / "csv" / _FOLD_FILE.format(fold=k, part=part), ("\n".join(rows) + "\n").encode())


def chest_radiograph(rng: np.random.Generator, findings: Sequence[str], size: int = 128) -> np.ndarray:
    """An 8-bit PA chest radiograph [size, size] with each named finding drawn where it occurs.

    Image axes: row 0 at the top (apices), column 0 on the image left = the patient's right (PA view). Normal
    anatomy: soft-tissue thorax, dark lungs, heart shadow to the image right of the midline, spine, clavicles,
    ribs as arcs, diaphragm domes. Findings (bright = dense): Atelectasis a plate-like band at a base;
    Cardiomegaly a heart wider than half the thorax; Effusion a basal opacity with a meniscus; Infiltration
    patchy mid-zone haze; Mass a large round opacity; Nodule a small round one; Pneumonia a focal lobar
    opacity; Pneumothorax a lateral dark rim without lung markings; Consolidation a dense lower-zone region;
    Edema bilateral perihilar haze; Emphysema hyperlucent lungs with low flat domes; Fibrosis peripheral
    reticular lines; Pleural_Thickening a bright band along the lateral wall; Hernia a round retrocardiac
    opacity with a gas bubble above the left dome.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1     # x: -1 image left, y: -1 top
    f = set(findings)
    img = 40 + 110 * _blob(x, y, 0.0, (0, 0.1), (0.92, 1.05))                   # thorax soft tissue
    emph = "Emphysema" in f
    dome_y = 0.62 + (0.1 if emph else 0.0) + rng.uniform(-0.03, 0.03)
    lung_mask = np.zeros_like(img)
    for side in (-1, 1):
        cx = side * 0.42
        lung = _blob(x, y, 0.0, (cx, -0.02), (0.3 + (0.04 if emph else 0), 0.62 + (0.06 if emph else 0)))
        lung *= (y < dome_y - (0.12 if not emph else 0.04) * (1 - ((x - cx) / 0.35) ** 2))
        lung_mask = np.maximum(lung_mask, lung)
    img = img - lung_mask * (85 + (25 if emph else 0))
    heart_w = 0.46 if "Cardiomegaly" in f else 0.28
    heart = _blob(x, y, 0.0, (0.12, 0.35), (heart_w, 0.26))
    img = np.maximum(img, 150 * heart * (y > 0.1))
    img = np.maximum(img, 170 * _blob(x, y, 0.0, (0, 0.0), (0.07, 1.2)))        # spine / mediastinum
    for side in (-1, 1):                                                          # clavicles
        img = np.maximum(img, 190 * _blob(x, y, 0.0, (side * 0.35, -0.68 + 0.1 * np.abs(x)), (0.35, 0.03)))
    for k in range(8):                                                            # ribs as arcs
        yy = -0.55 + k * 0.15
        arc = np.abs(y - (yy + 0.25 * x ** 2)) < 0.022
        img = img + 25 * arc * lung_mask
    for _ in range(6):                                                            # vascular markings
        c = (rng.uniform(-0.6, 0.6), rng.uniform(-0.3, 0.4))
        img = img + 12 * _blob(x, y, 0.0, c, (0.05, 0.05)) * lung_mask
    side = 1 if rng.random() < 0.5 else -1
    cx = side * 0.42
    if "Atelectasis" in f:
        img = img + 60 * (np.abs(y - 0.4 - 0.1 * (x - cx)) < 0.035) * (np.abs(x - cx) < 0.22) * lung_mask
    if "Effusion" in f:
        img = img + 60 * (y > dome_y - 0.18 + 0.25 * (np.abs(x - cx) - 0.1)) * _blob(x, y, 0.0, (cx, 0.5), (0.4, 0.5))
    if "Infiltration" in f:
        for _ in range(4):
            c = (side * rng.uniform(0.25, 0.55), rng.uniform(-0.2, 0.3))
            img = img + 35 * _blob(x, y, 0.0, c, (0.12, 0.1)) * lung_mask
    if "Mass" in f:
        c = (side * rng.uniform(0.3, 0.5), rng.uniform(-0.35, 0.25))
        img = np.maximum(img, 165 * _blob(x, y, 0.0, c, (0.13, 0.13)) * (lung_mask > 0.5))
    if "Nodule" in f:
        for _ in range(int(rng.integers(1, 3))):
            c = (rng.choice([-1, 1]) * rng.uniform(0.25, 0.55), rng.uniform(-0.45, 0.3))
            img = np.maximum(img, 170 * _blob(x, y, 0.0, c, (0.045, 0.045)) * (lung_mask > 0.5))
    if "Pneumonia" in f:
        img = img + 70 * _blob(x, y, 0.0, (cx, rng.uniform(0.1, 0.35)), (0.2, 0.16)) * lung_mask
    if "Pneumothorax" in f:
        rim = (np.abs(x - cx) > 0.2) * (y < 0.2) * (lung_mask > 0.3)
        img = img - 30 * rim
        img = img + 50 * (np.abs(np.abs(x - cx) - 0.2) < 0.012) * (y < 0.2) * (lung_mask > 0.3)
    if "Consolidation" in f:
        img = np.maximum(img, 140 * _blob(x, y, 0.0, (cx, 0.4), (0.2, 0.12)) * (lung_mask > 0.3))
    if "Edema" in f:
        for s in (-1, 1):
            img = img + 45 * _blob(x, y, 0.0, (s * 0.22, 0.05), (0.22, 0.3)) * lung_mask
    if "Fibrosis" in f:
        net = (np.sin(x * 60 + rng.uniform(0, 6)) * np.sin(y * 60) > 0.6)
        img = img + 40 * net * lung_mask * (np.abs(x) > 0.45) * (y > -0.1)
    if "Pleural_Thickening" in f:
        img = img + 70 * (np.abs(np.abs(x) - (np.abs(cx) + 0.27)) < 0.03) * (np.abs(y) < 0.45) * (x * side > 0)
    if "Hernia" in f:
        img = np.maximum(img, 175 * _blob(x, y, 0.0, (0.08, 0.48), (0.12, 0.1)))
        img = img - 50 * _blob(x, y, 0.0, (0.08, 0.44), (0.05, 0.04))
    img = img + rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_chestxray14(job) -> None:
    """ChestX-ray14 tree: images_001/images/*.png, images_002/images/*.png, Data_Entry_2017.csv, split lists.

    ``job.cases`` patients with 1-3 follow-up images each; about 40% of images show no finding, the others
    1-2 findings drawn uniformly from the 14. About a quarter of the patients are in test_list.txt.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(job.seed), 41]))
    root: Path = job.root
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    entries, train_val, test = [header], [], []
    n_test = max(1, round(job.cases / 4))
    test_patients = set(rng.choice(np.arange(1, job.cases + 1), size=n_test, replace=False).tolist())
    for pid in range(1, job.cases + 1):
        age, sex = int(rng.integers(18, 90)), ("M" if rng.random() < 0.55 else "F")
        for fu in range(int(rng.integers(1, 4))):
            name = f"{pid:08d}_{fu:03d}.png"
            findings = [] if rng.random() < 0.4 else \
                sorted(rng.choice(CHESTXRAY_FINDINGS, size=int(rng.integers(1, 3)), replace=False).tolist(),
                       key=CHESTXRAY_FINDINGS.index)
            img = chest_radiograph(np.random.default_rng(np.random.SeedSequence([int(job.seed), 42, pid, fu])),
                                   findings)
            folder = "images_001" if pid <= (job.cases + 1) // 2 else "images_002"
            _write_atomic(root / folder / "images" / name, _png(img))
            label = "|".join(findings) if findings else NO_FINDING
            entries.append(f"{name},{label},{fu},{pid},{age},{sex},PA,2500,2048,0.143,0.143,")
            (test if pid in test_patients else train_val).append(name)
    _write_atomic(root / "Data_Entry_2017.csv", ("\n".join(entries) + "\n").encode())
    _write_atomic(root / "train_val_list.txt", ("\n".join(train_val) + "\n").encode())
    _write_atomic(root / "test_list.txt", ("\n".join(test) + "\n").encode())


CCCCII = _Like("ct-slices", write_ccccii, ("NCP", "CP", "Normal", "unzip_filenames.csv", "csv"))
CHESTXRAY14 = _Like("radiograph", write_chestxray14, ("images", "images_001", "images_002", "Data_Entry_2017.csv",
                                                      "train_val_list.txt", "test_list.txt"))
