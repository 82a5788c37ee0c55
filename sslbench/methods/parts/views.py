"""Views of 3D volumes shared by several methods: sub-volume crops resized by one ``grid_sample``, the crop
checks of the restoration methods, and VoCo's per-crop flip / rot90 / intensity-shift chain (also MAE's flips).

Every function draws its random choices as tensors on the device and transforms the whole batch at once.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ...errors import RecipeError
from ...models.backbones import SIZE_DIVISOR
from .perturbations import MIN_PAINT_SIZE, randint_inclusive

#: backbones a restoration method can train (the whole encoder-decoder is needed).
RESTORATION_MODELS = ("swinunetr", "unet3d", "basicunet")


def crop_boxes(x: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """Cut one box per sample and resize it (bilinear / trilinear) to out_size: Tensor[B, C, *out_size].

    x [B, C, *spatial] with 2 or 3 spatial axes; starts / sizes [B, axes] in pixels / voxels (box [start, start +
    size) per axis). Output voxel o of an axis reads voxel start + o * (size - 1) / (out - 1) (``align_corners=True``,
    as MONAI's Resize after a SpatialCrop); a box of the output's size is therefore an exact crop. ONE grid_sample.
    """
    b, _, *shape = x.shape
    starts = starts.to(device=x.device, dtype=torch.float32)
    sizes = sizes.to(device=x.device, dtype=torch.float32)
    outs = [int(n) for n in out_size]
    grids = []
    for axis, (n_in, n_out) in enumerate(zip(shape, outs)):
        t = torch.linspace(0.0, 1.0, n_out, device=x.device)
        pos = starts[:, axis, None] + t * (sizes[:, axis, None] - 1)
        coord = pos * (2.0 / max(int(n_in) - 1, 1)) - 1.0                    # [B, n_out]
        view = [b] + [1] * len(outs)
        view[1 + axis] = n_out
        grids.append(coord.view(view).expand(b, *outs))
    # grid_sample's last grid axis lists the spatial axes last-first: (z, y, x) of [B, C, X, Y, Z], (col, row) in 2D
    grid = torch.stack(grids[::-1], dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def random_crop_starts(batch: int, size: Sequence[int], crop: Sequence[int],
                       generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Integer corners uniform in [0, size - crop] per axis: Tensor[batch, 3] (int64)."""
    hi = torch.tensor([int(s) - int(c) for s, c in zip(size, crop)], device=device)
    return randint_inclusive(0, hi, (batch, 3), generator, torch.device(device))


def check_crop(method: str, model_name: str, crop: Sequence[int], resize: Sequence[int]) -> None:
    """RecipeError unless the crop fits the corpus volume and the backbone's downsampling."""
    if model_name not in RESTORATION_MODELS:
        raise RecipeError(f"model.name: {model_name!r} for method {method}; expected one of "
                          f"{', '.join(RESTORATION_MODELS)} (the restoration needs the whole encoder-decoder)")
    if len(crop) != 3 or len(resize) != 3:
        raise RecipeError(f"method.params.crop / resize for method {method}: expected 3 sizes each, got "
                          f"{list(crop)} and {list(resize)}")
    if any(c > r for c, r in zip(crop, resize)):
        raise RecipeError(f"method.params.crop: {list(crop)} for method {method}; expected at most the corpus "
                          f"volume size method.params.resize {list(resize)} on every axis")
    if min(crop) < MIN_PAINT_SIZE:
        raise RecipeError(f"method.params.crop: {list(crop)} for method {method}; expected >= {MIN_PAINT_SIZE} "
                          f"voxels per axis (painting boxes keep 3 voxels off the borders)")
    factor = SIZE_DIVISOR[model_name]
    if any(c % factor for c in crop):
        raise RecipeError(f"method.params.crop: {list(crop)} for method {method} with model {model_name}; expected "
                          f"multiples of {factor}")
    if model_name == "swinunetr" and math.prod(c // 32 for c in crop) < 2:
        raise RecipeError(f"method.params.crop: {list(crop)} for method {method}; SwinUNETR's encoder10 "
                          f"instance-normalises the 1/32-scale map, which needs >= 2 voxels (e.g. 64x32x32)")


def axis_positions(lo: torch.Tensor, hi: torch.Tensor, n_out: int) -> torch.Tensor:
    """Voxel positions of n_out samples over voxels lo .. hi - 1 (align_corners=True): [..., n_out]."""
    if n_out > 1:
        t = torch.linspace(0.0, 1.0, n_out, device=lo.device, dtype=torch.float32)
    else:
        t = torch.full((1,), 0.5, device=lo.device, dtype=torch.float32)
    return lo.unsqueeze(-1) + t * (hi - 1 - lo).unsqueeze(-1)


def grid_coords(pos: torch.Tensor, n_in: int) -> torch.Tensor:
    """Voxel positions of an axis of n_in voxels as grid_sample coordinates (align_corners=True)."""
    return pos * (2.0 / (n_in - 1)) - 1.0 if n_in > 1 else torch.zeros_like(pos)


def axis_coords(lo: torch.Tensor, hi: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """grid_sample coordinates (align_corners=True) of n_out samples over voxels lo .. hi - 1: [..., n_out]."""
    return grid_coords(axis_positions(lo, hi, n_out), n_in)


def augment_crops(x: torch.Tensor, generator: torch.Generator | None = None, p_flip: float = 0.2,
                  p_rot90: float = 0.2, p_shift: float = 0.1, max_shift: float = 0.1) -> torch.Tensor:
    """Independent random augmentation of each crop of x [N, C, X, Y, Z] (X == Y), batched.

    The official per-crop chain: RandFlip p=0.2 on each spatial axis, RandRotate90 p=0.2 (k in 1..3, x-y
    plane), RandShiftIntensity(offsets=0.1) p=0.1. Each choice is a torch.where over the whole batch.
    """
    n = x.shape[0]
    u = torch.rand(n, 6, generator=generator, device=x.device)
    rot_k = torch.randint(1, 4, (n,), generator=generator, device=x.device)
    view = (n,) + (1,) * (x.dim() - 1)
    for axis in range(3):
        x = torch.where((u[:, axis] < p_flip).view(view), x.flip(2 + axis), x)
    if x.shape[2] == x.shape[3]:
        rotate = u[:, 3] < p_rot90
        for kk in (1, 2, 3):
            x = torch.where((rotate & (rot_k == kk)).view(view), x.rot90(kk, dims=(2, 3)), x)
    shift = (u[:, 4] * 2 - 1) * max_shift * (u[:, 5] < p_shift)
    return x + shift.view(view).to(x.dtype)
