"""Batched 2D view augmentations of the 2D track's methods (torchvision's per-image transforms, drawn per sample
from the global torch generator, which the protocol seeds per step, and applied to the whole batch at once).

* :func:`resized_crop_grid` / :func:`random_geometry`: ``RandomResizedCrop(size, scale, ratio=(3/4, 4/3))``, a
  ``RandomRotation(degrees)`` (zero fill) and ``RandomHorizontalFlip`` as ONE affine resampling (``affine_grid`` +
  bilinear ``grid_sample``) per sample; the crop box is inside the image, as torchvision draws it (its fallback
  after 10 failed tries, the central crop, is replaced by clipping the box's sides to the image).
* :func:`jitter`: ``ColorJitter(brightness, contrast)`` on grey images (saturation and hue do nothing to grey):
  ``x * b`` then ``(x - mean(x)) * c + mean(x)``, clipped to [0, 1], as torchvision's adjust_brightness /
  adjust_contrast (the contrast blend uses the image's mean grey value).
* :func:`random_crop_then_rotation`: the same crop, rotation and flip as two resamplings (the crop, then its
  rotated / flipped copy with zero fill), for the loaders that keep the un-rotated crop as a target (PCRL v1).
* :func:`random_blur`: SimCLR's ``GaussianBlur`` with probability p, sigma in pixels of a 224 image.
* :func:`cutout`: ``n_holes`` squares of side ``length`` (a fraction of the image side; centres anywhere, clipped
  at the border, as DeVries & Taylor's Cutout) set to ``fill``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .blur import blur_2d


def affine_theta(cx: torch.Tensor, cy: torch.Tensor, w: torch.Tensor, h: torch.Tensor, angle: torch.Tensor,
                 flip: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` affine maps from output to input normalised coordinates (x = column, y = row, in [-1, 1]).

    The output image shows the box of half-sizes ``w``, ``h`` (fractions of the input's half-size, so 1 = the
    whole side) centred at ``(cx, cy)``, rotated by ``angle`` (radians), mirrored left-right where ``flip``.
    """
    sx = torch.where(flip, -w, w)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(cx.shape[0], 2, 3, dtype=cx.dtype, device=cx.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * sx, -sin * h, cx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * sx, cos * h, cy
    return theta


def crop_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
               device=None) -> tuple[torch.Tensor, ...]:
    """RandomResizedCrop's boxes: area fraction ~ U[scale], aspect ratio log-uniform in ``ratio``; returns
    (cx, cy, w, h) in normalised coordinates (w, h: half-sizes as fractions of the side, at most 1)."""
    area = torch.empty(n, device=device).uniform_(*scale)
    logr = torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, device=device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, device=device) * 2 - 1) * (1 - h)
    return cx, cy, w, h


def resample(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Every sample of ``[B, C, H, W]`` read through its affine map ``theta`` [B, 2, 3] (bilinear, zero outside the
    image) at ``size`` (default: the input's)."""
    out = list(x.shape[:2]) + list(size if size is not None else x.shape[2:])
    grid = F.affine_grid(theta.to(x.dtype), out, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_geometry(x: torch.Tensor, scale: tuple[float, float], degrees: float, p_flip: float) -> torch.Tensor:
    """Random resized crop (to the input's size) + rotation + horizontal flip of every sample of ``[B, C, H, W]``,
    in one resampling."""
    n = x.shape[0]
    cx, cy, w, h = crop_boxes(n, scale, device=x.device)
    angle = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(degrees)
    flip = torch.rand(n, device=x.device) < p_flip
    return resample(x, affine_theta(cx, cy, w, h, angle, flip))


def random_crop_then_rotation(x: torch.Tensor, scale: tuple[float, float], degrees: float, p_flip: float,
                              size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``RandomResizedCrop(size, scale)`` and then, on the crop, ``RandomRotation(degrees)`` (zero fill where the
    rotated crop leaves itself) + ``RandomHorizontalFlip(p_flip)``, as two resamplings the way torchvision applies
    them one after the other. Returns (crops, their rotated / flipped copies), each ``[B, C, *size]``."""
    n = x.shape[0]
    cx, cy, w, h = crop_boxes(n, scale, device=x.device)
    still = torch.zeros(n, device=x.device)
    crops = resample(x, affine_theta(cx, cy, w, h, still, still > 0), size)
    angle = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(degrees)
    flip = torch.rand(n, device=x.device) < p_flip
    ones = torch.ones(n, device=x.device)
    return crops, resample(crops, affine_theta(still, still, ones, ones, angle, flip))


def jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """ColorJitter on grey ``[B, 1, H, W]`` in [0, 1] with per-sample factors ``brightness``, ``contrast`` [B]."""
    view = (-1,) + (1,) * (x.dim() - 1)
    x = (x * brightness.view(view)).clamp(0, 1)
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return ((x - mean) * contrast.view(view) + mean).clamp(0, 1)


def random_jitter(x: torch.Tensor, strength: float, p: float = 1.0) -> torch.Tensor:
    """Factors ~ U[1 - strength, 1 + strength] (torchvision's range for a number), applied with probability p."""
    n = x.shape[0]
    on = torch.rand(n, device=x.device) < p
    b = torch.where(on, 1 + (torch.rand(n, device=x.device) * 2 - 1) * strength, torch.ones(n, device=x.device))
    c = torch.where(on, 1 + (torch.rand(n, device=x.device) * 2 - 1) * strength, torch.ones(n, device=x.device))
    return jitter(x, b.to(x.dtype), c.to(x.dtype))


def cutout_mask(n: int, size: tuple[int, int], centres: torch.Tensor, length: int) -> torch.Tensor:
    """``[n, 1, H, W]`` mask, 0 inside squares of side ``length`` px centred at ``centres`` [n, holes, 2] (row,
    col; clipped at the border), 1 elsewhere."""
    hgt, wid = size
    rows = torch.arange(hgt, device=centres.device).view(1, 1, hgt, 1)
    cols = torch.arange(wid, device=centres.device).view(1, 1, 1, wid)
    r, c = centres[..., 0].view(n, -1, 1, 1), centres[..., 1].view(n, -1, 1, 1)
    half = length // 2
    inside = ((rows >= r - half) & (rows < r + (length - half)) & (cols >= c - half) & (cols < c + (length - half)))
    return (~inside.any(dim=1, keepdim=True)).to(torch.float32)


def cutout(x: torch.Tensor, holes: int, length_fraction: float, fill: float) -> torch.Tensor:
    """Cutout with hole centres uniform over the image and side ``round(length_fraction * H)`` pixels."""
    n, _, hgt, wid = x.shape
    if holes <= 0:
        return x
    length = max(1, round(length_fraction * hgt))
    centres = torch.stack([torch.randint(0, hgt, (n, holes), device=x.device),
                           torch.randint(0, wid, (n, holes), device=x.device)], dim=-1)
    keep = cutout_mask(n, (hgt, wid), centres, length).to(x.dtype)
    return x * keep + fill * (1 - keep)


def random_blur(x: torch.Tensor, p: float, sigma: tuple[float, float], image_side: int | None = None,
                reference_side: int = 224) -> torch.Tensor:
    """SimCLR's ``GaussianBlur`` (sigma ~ U[sigma] pixels) applied with probability ``p`` per sample of
    ``[B, C, H, W]``, radius 3 sigma (``blur.blur_2d``). Sigma is given for views cut from a ``reference_side``
    image and scales with ``image_side`` / reference_side (``image_side``: the side of the image the views come
    from, default x's own side)."""
    n = x.shape[0]
    lo, hi = (float(s) for s in sigma)
    if p <= 0 or hi <= 0:
        return x
    scale = float(image_side if image_side is not None else x.shape[-1]) / float(reference_side)
    on = torch.rand(n, device=x.device) < p
    drawn = (lo + (hi - lo) * torch.rand(n, device=x.device)) * scale
    return blur_2d(x, torch.where(on, drawn, torch.zeros_like(drawn)), radius=max(1, math.ceil(3 * hi * scale)))
