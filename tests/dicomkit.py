"""Synthetic DICOM CT slices for tests (pydicom): positions, orientations, series UIDs and ImageType chosen
by the test, pixel values known exactly (stored value * RescaleSlope + RescaleIntercept = HU)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_slice(path: Path, pixels: np.ndarray, *, series_uid: str, position: Sequence[float],
                orientation: Sequence[float] = AXIAL, spacing: Sequence[float] = (0.8, 0.8),
                image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"), instance: int = 1,
                slope: float = 1.0, intercept: float = -1024.0) -> Path:
    """One CT slice: ``pixels`` (rows, columns) int16 stored values."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.1"
    ds.SeriesInstanceUID = series_uid
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 1.0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    px = np.ascontiguousarray(pixels, dtype=np.int16)
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = px.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_series(folder: Path, z: Sequence[float], *, series_uid: str, rows: int = 6, cols: int = 8,
                 value=None, orientation: Sequence[float] = AXIAL, orientations: Sequence[Sequence[float]] | None = None,
                 image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"), spacing=(0.8, 0.7),
                 origin=(-10.0, -20.0), prefix: str = "s") -> list[Path]:
    """Slices at heights ``z`` (mm, along the normal of an axial orientation), one file each, written in
    reverse order of z (readers must sort). Slice k holds stored value ``value(k)`` (default 100 * (k + 1))
    everywhere except pixel (row 0, column 1), which holds k (so rows and columns can be told apart)."""
    out = []
    for k in reversed(range(len(z))):
        px = np.full((rows, cols), (value(k) if value else 100 * (k + 1)), dtype=np.int16)
        px[0, 1] = k
        ori = orientations[k] if orientations is not None else orientation
        out.append(write_slice(folder / f"{prefix}{k:03d}.dcm", px, series_uid=series_uid,
                               position=(origin[0], origin[1], z[k]), orientation=ori, spacing=spacing,
                               image_type=image_type, instance=k + 1))
    return out
