"""Loading the images of a classification task for training: CC-CCII scans (slice stacks) and ChestX-ray14
radiographs as uint8 arrays of the recipe's ``preprocess.size`` (threads: PIL decodes without holding the GIL).

The datasets' layouts are read by :mod:`sslbench.data.layouts.classification`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from sslbench.errors import DataError


def load_scan(slices: Sequence[str], size: Sequence[int], center_crop: float = 1.0) -> np.ndarray:
    """One CC-CCII scan as a uint8 volume [D, H, W] of ``size``.

    The 8-bit slices are stacked in slice order, the central ``center_crop`` fraction of each slice kept
    (VoCo's CC-CCII code keeps the central 384 of 512 pixels, 0.75) and the stack resized (trilinear) to
    ``size``; VoCo resizes the slices to 256 x 256.
    """
    from PIL import Image

    planes = []
    for f in slices:
        try:
            with Image.open(f) as im:
                planes.append(np.asarray(im.convert("L")))
        except (OSError, ValueError) as exc:
            raise DataError(f"{f}: cannot be read as an image ({' '.join(str(exc).split())[:120]}); "
                            f"expected an 8-bit PNG/JPG slice") from None
        if planes[-1].shape != planes[0].shape:
            raise DataError(f"{f}: slice of {planes[-1].shape[0]}x{planes[-1].shape[1]} pixels in a scan of "
                            f"{planes[0].shape[0]}x{planes[0].shape[1]}; expected equal slice sizes")
    if not planes:
        raise DataError("load_scan: no slices given; expected at least one slice file")
    vol = np.stack(planes)
    return _crop_resize(vol, size, center_crop)


def _crop_resize(arr: np.ndarray, size: Sequence[int], center_crop: float) -> np.ndarray:
    """Keep the central fraction of the last two axes, resize to ``size`` (linear), return uint8."""
    import torch
    import torch.nn.functional as F

    h, w = arr.shape[-2:]
    ch, cw = max(1, round(h * center_crop)), max(1, round(w * center_crop))
    top, left = (h - ch) // 2, (w - cw) // 2
    arr = arr[..., top:top + ch, left:left + cw]
    t = torch.from_numpy(np.array(arr, dtype=np.float32))[None, None]
    mode = "trilinear" if arr.ndim == 3 else "bilinear"
    out = F.interpolate(t, size=tuple(int(s) for s in size), mode=mode, align_corners=False)
    return out[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def load_radiograph(path: str, size: Sequence[int]) -> np.ndarray:
    """One radiograph as uint8 [H, W] of ``size`` (grey; RGBA files of the release converted to grey)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as an image ({' '.join(str(exc).split())[:120]}); "
                        f"expected a grey PNG radiograph") from None
    return _crop_resize(arr, size, 1.0)


def load_split(task: Mapping[str, Any], items: list[dict], progress=None, desc: str = "load") -> "np.ndarray":
    """All images of a split as one uint8 array [N, *size] (scans or radiographs), in item order."""
    from concurrent.futures import ThreadPoolExecutor

    pre = task["preprocess"]
    size = tuple(int(s) for s in pre["size"])
    if task["kind"] == "classification":
        fn = lambda it: load_scan(it["slices"], size, float(pre.get("center_crop", 1.0)))  # noqa: E731
    else:
        fn = lambda it: load_radiograph(it["image"], size)  # noqa: E731
    out = np.empty((len(items), *size), dtype=np.uint8)
    job = progress.add_task(desc, total=len(items), info="") if progress is not None else None
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for i, arr in enumerate(pool.map(fn, items)):
            out[i] = arr
            if job is not None:
                progress.advance(job)
    if job is not None:
        progress.remove_task(job)
    return out
