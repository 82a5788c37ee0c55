"""VoCo: volume contrast with position priors.

Wu, Zhuang, Chen. "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D Medical
Image Analysis", CVPR 2024 (code: github.com/Luffy03/VoCo).

A volume resized to W_x x W_y x Z is cut into an n x n grid of *base crops* over the x-y plane (full
depth); k *random crops* of the same x-y size are taken at random centres. Every crop is resized to
crop_size^3 and embedded by the backbone + projection head f. The equations implemented here:

* position label (paper Sec. 3.2):  y_{k,j} = |crop_k  intersect  base_j|_xy / |base_j|_xy
  (each row sums to 1 while the crop lies inside the grid)                      -> ``position_labels``
* logits:  l_{k,j} = ReLU(cos(f(crop_k), f(base_j)))                            -> ``voco_logits``
* prediction loss, ``params["pred_loss"]``:
  ``official`` (default), as the official code of the variant computes it, per volume over its [k, n*n]
  entries, then averaged over the batch:  L_pred = pos + neg,
  pos = -sum w log(1 - |y - l| + 1e-6) / (sum w + 1e-6),  neg = sum_{y=0} l^2 / (#(y=0) + 1e-6),
  with w = 1[y > 0] for the paper variant and w = y for the teacher-student one   -> ``prediction_loss_official``;
  ``eq3``: the paper's Eq. 3 as printed,  L_pred = -(1/N) sum log(1 - |y - l|)  over every entry, 1 - |y - l|
  clamped at 1e-6 (sslbench's paper-variant loss before issue 18)                  -> ``prediction_loss``
* regularisation:  L_reg = mean_{i<j} ReLU(cos(b_i, sg(b_j)))^2 over the bases of one volume, averaged
  over the batch                                                          -> ``regularization_loss``
* total:  L = L_pred + lambda * L_reg  (lambda = params["lambda"], 1.0 in the paper and the official code).

Fidelity ledger: where this module departs from the official code, why, and the key that restores it.
Sources (read for facts only; no line is copied): the paper-era single-network head, Luffy03/Large-Scale-Medical
``Self-supervised/models/old/voco_headv1.py`` and ``voco_headv2_batch.py`` (commit 44bc46e), functions
``VoCoHead.forward`` and ``ce_loss``; the teacher-student head, Luffy03/VoCo ``models/voco_head.py`` (commits
0b54710 / 4cb32e8), ``VoCoHead.forward`` and ``ce_loss``; the loader, Luffy03/VoCo ``utils/data_utils.py``
(0b54710), ``get_loader`` / ``get_loader_1k`` / ``threshold``; MIC-DKFZ/nnssl's ``VoCoLoss.prediction_loss``
(``src/nnssl/training/loss/voco_loss.py``, read in its fork jwutsetro/nnssl_etro at 41751bc: the index holds
no copy of that file under MIC-DKFZ/nnssl).

* Gradient into the bases, ``params["detach_bases"]``. ``null`` (default) does what the variant's official
  code does. Paper variant: true, the logits of L_pred read sg(f(base_j)) as ``voco_headv1.VoCoHead.forward``
  and ``voco_headv2_batch.VoCoHead.forward`` (``online_assign(feats, bases.detach())``) and nnssl's
  ``VoCoLoss.prediction_loss`` (``base_embeddings.detach()``) do; false gives the bases L_pred's gradient too
  (sslbench before issue 18). Teacher-student: false, as Luffy03/VoCo ``VoCoHead.forward``, whose
  l(x_tea, bases_stu) term carries L_pred's gradient into the student's bases; true detaches that term too
  (then it passes no gradient at all). L_reg keeps its own stop-gradient either way. Under both settings the
  bases still reach the crops' features through the projection head's BatchNorm, whose batch statistics
  cover crops and bases (as in the official heads).
* Loss form, ``params["pred_loss"]`` (above): ``official`` restores the official split; the 1 - |y - l| of the
  log is floored at 0 before the 1e-6 is added, which changes nothing where |y - l| <= 1 (always, up to the
  rounding of an fp32 cosine of 1) and keeps the log finite where a cosine of a 2048-dim pair rounds past 1.
  The paper variant follows ``voco_headv2_batch`` in averaging per volume; ``voco_headv1`` pooled the batch.
* Foreground crop, ``params["foreground_threshold"]`` (default 0.3, ``null``: off). The official loader scales
  intensities to [0, 1] (HU -175..250, as sslbench's corpus recipes), crops the volume to the bounding box of
  the voxels with x > 0.3 (MONAI CropForegroundd, ``select_fn=threshold``, margin 0: one box over the whole
  volume, no tries, no foreground fraction per crop) and resizes it back to 384 x 384 x 96 before it cuts any
  crop. sslbench's corpus arrives foreground-cropped at x > 0 and resized to ``resize``; ``foreground_boxes``
  finds the x > threshold box of each volume on the device and ``crop_and_resize`` reads every crop through
  it (``frame``): the same geometry, interpolated once instead of twice (the official resizes the box, then
  each crop). A volume with no voxel above the threshold keeps its whole extent (the official pipeline
  would fail on the empty crop).
* Volume size, ``params["resize"]``: [384, 384, 64] by default, the supplement's Table 2; the official code
  resizes to 384 x 384 x 96 (``Resized(spatial_size=(384, 384, 96))``): ``resize: [384, 384, 96]`` restores it
  (crops then span 96 slices, resized to crop_size^3 = 64^3 as the official roi 96 -> 64).
* The teacher starts as a copy of the student; the official code initialises it separately (no key).
* The optimiser (the official AdamW with amsgrad) is the protocol's, not this module's.

Variants (``params["variant"]``):

* ``paper`` (default): one network; features = the last Swin stage (16 * feature_size channels),
  globally pooled, through the MLP 16fs -> 2048 -> 2048 -> 2048 (BatchNorm1d without affine or running
  statistics + ReLU after the first two layers). Only SwinUNETR's ``swinViT`` is trained and transferred:
  the full-resolution convolution blocks are never run.
* ``teacher-student`` (the official repository's form): features = SwinUNETR's encoder1(x),
  encoder2(hs0), encoder3(hs1), encoder4(hs2), encoder10(hs4), each pooled and concatenated (24fs) ->
  the same MLP; an EMA teacher (backbone + head, no gradients); logits
  = 1/2 [l(x_stu, bases_tea) + l(x_tea, bases_stu)]; the pos/neg loss (w = y); L_reg on the student's bases.
  The EMA  param_t <- 0.9 param_t + 0.1 param_s  runs in ``after_step`` (after the optimizer step) with one
  ``torch._foreach_lerp_``; the official code runs the same update at the start of the next forward, with
  the same student weights, so the two orders give the same teacher at every forward. Unlike the
  official code, the teacher starts as a copy of the student instead of a second random initialisation.
  Its prediction loss and its gradient into the bases follow ``pred_loss`` and ``detach_bases`` (above).

Both variants augment every crop independently, as the official data pipeline does (Table 2 of the
supplement: random rotate and flip): flip p=0.2 per axis, rot90 in the x-y plane p=0.2 (k in 1..3),
intensity shift U(-0.1, 0.1) p=0.1; ``params["augment"] = false`` turns it off. Random crop centres are
integers ~ U[half, W - half) as in the official ``get_position_label``; bases are ordered x-major
(index = i * n + j for the i-th x slab and j-th y slab) as in the official ``get_crop_transform``.

Everything inside a step is batched on the volumes' device: crop boxes, labels, one ``grid_sample`` for
every crop and base of the batch, augmentation by ``torch.where``, ONE backbone call for all crops and
bases of the batch (crops first, then bases, as the official code orders them; the projection head's
BatchNorm therefore normalises over all of them, as ``voco_headv1`` and the teacher-student head do, while
``voco_headv2_batch`` projected each volume's crops and bases on their own: the ledger), and the losses as small
matrix products. ``forward`` returns its logs as detached 0-dim tensors so that no host sync happens
inside the step: call ``float()`` on them when logging.

Speed: none of it is here. The method computes on plain float tensors; the runtime's speed layer
(sslbench/speed, applied when a run asks) computes the same functions faster: the Swin window attention that
``params["attention"]`` names (``fused`` Triton kernels, ``sdpa``, or MONAI's own ``monai``, whose SDPA path then
serves the no-grad teacher), encoder1 of the teacher-student backbone pooled from the crop's statistics, and
``run.compile`` of the parts this class names (``compile_parts``) with channels-last backbones and a check of the
compiled features against eager (``feature_encoders``, ``encoder_inputs``). Figures on an H100: BENCHMARKS.md,
section "VoCo pre-training".

The 2D form (``VoCo2D``, the ChestX-ray14 track of issue 23) is at the end of this file.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbones import build_swinunetr
from ..models.unet2d import build_encoder
from .base import PretrainMethod
from .parts import aug2d
from .parts.ema import momentum_update
from .parts.pooled_swin import PooledSwinEncoder
from .parts.views import augment_crops, axis_coords, axis_positions, grid_coords
from .params import Attention, MethodParams, positive, refuse, rule

#: the official loader's foreground threshold on intensities scaled to [0, 1] (``utils/data_utils.py``, ``threshold``)
FOREGROUND_THRESHOLD = 0.3


@dataclass(frozen=True)
class VoCoParams(MethodParams):
    """VoCo's ``method.params`` (methods/voco.yaml holds the paper defaults; equal to these, tests check)."""

    variant: Literal["paper", "teacher-student"] = "paper"
    """paper: one network, last Swin stage (the paper-era voco_headv1/v2 heads) | teacher-student: Luffy03/VoCo
    models/voco_head.py (EMA teacher, encoder1..4 + encoder10 pooled)."""
    n: int = field(default=4, metadata=positive("a positive integer"))
    """n x n base crops over the x-y plane (paper Sec. 3.2; official get_crop_transform num=4)."""
    sw_batch_size: int = field(default=4, metadata=positive("a positive integer"))
    """random crops per volume (official args.sw_batch_size, get_vanilla_transform num)."""
    resize: tuple[int, int, int] = field(default=(384, 384, 64), metadata=positive("a list of 3 positive integers"))
    """volume size before cropping: the supplement's Table 2 depth 64; the official Resized is (384, 384, 96)."""
    crop_size: int = field(default=64, metadata=rule(lambda v: v > 0 and v % 32 == 0,
                                                     "a positive multiple of 32 (SwinUNETR downsamples 5 times)"))
    """every crop resized to crop_size^3 (official roi_small 64)."""
    lambda_: float = field(default=1.0, metadata={"key": "lambda"})
    """L = L_pred + lambda L_reg, the paper's total loss (lambda 1 in the paper and the official code)."""
    pred_loss: Literal["official", "eq3"] = "official"
    """official: pos + neg of the official ce_loss | eq3: the paper's Eq. 3 as printed."""
    detach_bases: bool | None = None
    """L_pred's logits read sg(bases): null = the variant's official code (paper true: online_assign(feats,
    bases.detach()); teacher-student false: voco_head.py VoCoHead.forward)."""
    foreground_threshold: float | None = field(default=FOREGROUND_THRESHOLD, metadata=rule(
        lambda v: 0.0 <= v < 1.0 and not math.isnan(v),
        "a number in [0, 1) (intensities are scaled to [0, 1]) or null (no foreground crop)"))
    """crop each volume to its x > threshold box (official utils/data_utils.py threshold: x > 0.3) | null: off."""
    augment: bool = True
    """per-crop flip / rot90 / intensity shift (official get_vanilla_transform with aug; Table 2)."""
    attention: Attention = "fused"
    """the Swin window-attention kernel the runtime applies (same function; not hashed)."""
    head_dim: int = field(default=2048, metadata=positive("a positive integer"))
    """projection MLP width (official projection_head hidden_dim = out_dim = 2048)."""
    ema_momentum: float = field(default=0.9, metadata=rule(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"))
    """teacher-student only: param_t = m param_t + (1 - m) param_s (official _EMA_update_encoder_teacher, 0.9)."""

    def check(self) -> None:
        if self.variant == "teacher-student" and self.crop_size < 64:
            refuse("crop_size", self.crop_size, ">= 64 with variant teacher-student (encoder10 instance-normalises "
                                                "the 1/32-scale map, a single voxel at 32)")


@dataclass(frozen=True)
class VoCo2DParams(MethodParams):
    """VoCo2D's ``method.params`` (methods/voco.yaml ``two_d.params``; VoCo publishes no 2D code: sslbench's values)."""

    n: int = field(default=4, metadata=positive("a positive integer"))
    """n x n bases over the image (the 3D official num=4 per axis)."""
    sw_batch_size: int = field(default=4, metadata=positive("a positive integer"))
    """random crops per image (official args.sw_batch_size)."""
    crop_size: int = field(default=64, metadata=rule(lambda v: v > 0 and v % 32 == 0,
                                                     "a positive multiple of 32 (the ResNet-18 downsamples 5 times)"))
    """every crop resized to crop_size x crop_size (the 3D official roi_small 64)."""
    lambda_: float = field(default=1.0, metadata={"key": "lambda"})
    """L = L_pred + lambda L_reg, the paper's total loss."""
    pred_loss: Literal["official", "eq3"] = "official"
    """official: the paper variant's pos + neg (w = 1[y > 0]) | eq3: the paper's Eq. 3 as printed."""
    augment: bool = True
    """per-crop flip / rot90 / intensity shift: the 3D official chain restricted to 2D."""
    head_dim: int = field(default=2048, metadata=positive("a positive integer"))
    """projection MLP width (official projection_head 2048)."""


#: floor of 1 - |y - l| inside the paper's log: |y - l| reaches 1 when a crop fully inside base k gets
#: logit 0 (or a disjoint base gets logit 1), where log(0) = -inf would poison the step.
LOG_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Crops and labels
# --------------------------------------------------------------------------------------------------

def base_crop_boxes(size_xy: Sequence[int], n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The n x n grid of base crops over the x-y plane: Tensor[n*n, 4] of (x0, y0, x1, y1), voxel units.

    Boxes are half-open [x0, x1) x [y0, y1) and span the full depth. Index i * n + j is the i-th slab
    along x and the j-th along y.
    """
    sx, sy = float(size_xy[0]), float(size_xy[1])
    edges = torch.arange(n + 1, dtype=torch.float32, device=device)
    ex, ey = edges * (sx / n), edges * (sy / n)
    x0, x1 = ex[:-1].repeat_interleave(n), ex[1:].repeat_interleave(n)
    y0, y1 = ey[:-1].repeat(n), ey[1:].repeat(n)
    return torch.stack([x0, y0, x1, y1], dim=-1)


def random_crop_boxes(batch: int, k: int, size_xy: Sequence[int], crop_xy: Sequence[int],
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """k random crops of size crop_xy per volume: Tensor[batch, k, 4] of (x0, y0, x1, y1).

    Integer centres c ~ U[half, W - half) per axis (the official ``np.random.randint(half, W - half)``),
    box [c - half, c - half + crop). Drawn on ``device`` (default: the generator's), so no host sync.
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    boxes = []
    for w, c in ((int(size_xy[0]), int(crop_xy[0])), (int(size_xy[1]), int(crop_xy[1]))):
        if c > w:
            raise ValueError(f"crop size {c} exceeds the volume size {w}")
        half = c // 2
        centre = torch.randint(half, max(w - half, half + 1), (batch, k), generator=generator, device=device)
        boxes.append((centre - half).to(torch.float32))
    x0, y0 = boxes
    return torch.stack([x0, y0, x0 + float(crop_xy[0]), y0 + float(crop_xy[1])], dim=-1)


def position_labels(crop_boxes: torch.Tensor, base_boxes: torch.Tensor) -> torch.Tensor:
    """Overlap area in x-y of each crop with each base / area of that base: Tensor[..., n*n].

    crop_boxes [..., 4], base_boxes [n*n, 4] (or broadcastable [..., n*n, 4]).
    """
    c = crop_boxes.unsqueeze(-2).to(torch.float32)
    b = base_boxes.to(device=c.device, dtype=torch.float32)
    dx = (torch.minimum(c[..., 2], b[..., 2]) - torch.maximum(c[..., 0], b[..., 0])).clamp_min(0)
    dy = (torch.minimum(c[..., 3], b[..., 3]) - torch.maximum(c[..., 1], b[..., 1])).clamp_min(0)
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return dx * dy / area


def foreground_boxes(volumes: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bounding box of the voxels above ``threshold`` in any channel, per volume: Tensor[B, 6] (float32) of
    (x0, y0, z0, x1, y1, z1), half-open voxel bounds of volumes [B, C, X, Y, Z].

    What MONAI's CropForegroundd(select_fn=lambda x: x > threshold) crops to (margin 0), as the official VoCo
    loader does at 0.3. A volume with no voxel above the threshold gets its whole extent. No host sync.
    """
    mask = (volumes > threshold).any(dim=1)                                  # [B, X, Y, Z]
    found = mask.flatten(1).any(dim=1)                                       # [B]
    lows, highs = [], []
    for axis in (1, 2, 3):
        hit = mask.any(dim=tuple(d for d in (1, 2, 3) if d != axis)).to(torch.uint8)   # [B, size]
        size = hit.shape[1]
        first = hit.argmax(dim=1)                                            # the first maximum: the first hit
        last = size - 1 - hit.flip(1).argmax(dim=1)
        lows.append(torch.where(found, first, torch.zeros_like(first)))
        highs.append(torch.where(found, last + 1, torch.full_like(last, size)))
    return torch.stack(lows + highs, dim=1).to(torch.float32)


def _through_frame(pos: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor, n_in: int) -> torch.Tensor:
    """Positions in the frame [f0, f1) resized to n_in voxels (align_corners=True) as positions in the volume.

    pos [B, ...]; f0, f1 [B]. Virtual voxel p reads voxel f0 + p (f1 - 1 - f0) / (n_in - 1)."""
    view = (-1,) + (1,) * (pos.dim() - 1)
    scale = (f1 - 1 - f0) / (n_in - 1) if n_in > 1 else torch.zeros_like(f0)
    return f0.view(view) + pos * scale.view(view)


def crop_and_resize(volumes: torch.Tensor, boxes: torch.Tensor, out_size: int | Sequence[int],
                    frame: torch.Tensor | None = None) -> torch.Tensor:
    """Cut every box of every volume (full depth) and resize it (trilinear): Tensor[B, k, C, *out_size].

    volumes [B, C, X, Y, Z]; boxes [B, k, 4] (x0, y0, x1, y1) half-open in voxels. Sampling follows
    MONAI's Resize(mode="trilinear", align_corners=True) after SpatialCrop, as the official pipeline:
    output voxel o of an axis reads voxel x0 + o * (x1 - 1 - x0) / (out - 1). All B*k crops come from ONE
    ``grid_sample`` call (the k crops of a volume are stacked along the output's first axis, so the
    volumes are never copied).

    ``frame`` [B, 6] (x0, y0, z0, x1, y1, z1; e.g. ``foreground_boxes``): the boxes (and the full depth) are
    those of the frame's region of each volume resized to the volume's size X x Y x Z (align_corners=True),
    as the official loader's foreground crop + resize; both maps are linear, so each crop is still sampled
    once, from the stored volume.
    """
    b, c, sx, sy, sz = volumes.shape
    ox, oy, oz = (int(out_size),) * 3 if isinstance(out_size, int) else tuple(int(s) for s in out_size)
    k = boxes.shape[1]
    boxes = boxes.to(device=volumes.device, dtype=torch.float32)
    zero = torch.zeros((), device=volumes.device)
    if frame is None:
        gx = axis_coords(boxes[..., 0], boxes[..., 2], ox, sx)[..., :, None, None]      # [B, k, ox, 1, 1]
        gy = axis_coords(boxes[..., 1], boxes[..., 3], oy, sy)[..., None, :, None]      # [B, k, 1, oy, 1]
        gz = axis_coords(zero, zero + sz, oz, sz).view(1, 1, 1, 1, oz)                # [1, 1, 1, 1, oz]
    else:
        f = frame.to(device=volumes.device, dtype=torch.float32)
        px = _through_frame(axis_positions(boxes[..., 0], boxes[..., 2], ox), f[:, 0], f[:, 3], sx)
        py = _through_frame(axis_positions(boxes[..., 1], boxes[..., 3], oy), f[:, 1], f[:, 4], sy)
        pz = _through_frame(axis_positions(zero, zero + sz, oz).expand(b, oz), f[:, 2], f[:, 5], sz)
        gx = grid_coords(px, sx)[..., :, None, None]                                    # [B, k, ox, 1, 1]
        gy = grid_coords(py, sy)[..., None, :, None]                                    # [B, k, 1, oy, 1]
        gz = grid_coords(pz, sz).view(b, 1, 1, 1, oz)                                   # [B, 1, 1, 1, oz]
    # grid_sample's last grid axis is (W, H, D) = (z, y, x) of a [B, C, X, Y, Z] input
    grid = torch.stack(torch.broadcast_tensors(gz, gy, gx), dim=-1).reshape(b, k * ox, oy, oz, 3)
    out = F.grid_sample(volumes, grid.to(volumes.dtype), mode="bilinear", padding_mode="border",
                        align_corners=True)                                                # [B, C, k*ox, oy, oz]
    return out.view(b, c, k, ox, oy, oz).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Logits and losses
# --------------------------------------------------------------------------------------------------

def voco_logits(crop_feats: torch.Tensor, base_feats: torch.Tensor) -> torch.Tensor:
    """l = ReLU(cos(crop, base)): crop_feats [B, k, D], base_feats [B, n*n, D] -> [B, k, n*n]."""
    c = F.normalize(crop_feats.float(), dim=-1)
    b = F.normalize(base_feats.float(), dim=-1)
    return F.relu(c @ b.transpose(-1, -2))


def prediction_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = LOG_EPS) -> torch.Tensor:
    """The paper's Eq. 3 as printed (``pred_loss: eq3``): L_pred = -(1/N) sum log(1 - |y - l|), mean over
    every entry.

    1 - |y - l| is clamped to >= eps (1e-6) for numerical safety: it is 0 when a crop that lies fully in
    base k gets logit 0, and fp32 cosines can exceed 1 by an ulp. (Against the official log(1 - |y - l| +
    1e-6) the clamp differs by at most 1e-6 / (1 - |y - l|) in each term: what sets this form apart from
    the official one is that it puts the log on every entry, with no pos / neg split.)
    """
    dist = (labels.to(logits.dtype) - logits).abs()
    return -torch.log((1 - dist).clamp_min(eps)).mean()


#: ``prediction_loss_official``'s weights w of the positive term: the label itself (Luffy03/VoCo
#: ``models/voco_head.py``, the teacher-student head) or 1[y > 0] (the paper-era ``voco_headv1`` / ``v2_batch``)
POSITIVE_WEIGHTS = ("label", "mask")


def prediction_loss_official(logits: torch.Tensor, labels: torch.Tensor,
                             positive: str = "label") -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's ``ce_loss``: (pos, neg), each computed per volume over its [k, n*n] entries, then
    averaged over the volumes.

    pos = -sum(w * log(1 - |y - l| + 1e-6)) / (sum w + 1e-6);  neg = sum_{y=0} l^2 / (#(y=0) + 1e-6), with
    w = y (``positive="label"``: Luffy03/VoCo ``models/voco_head.py``) or w = 1[y > 0] (``"mask"``: the
    paper-era Luffy03/Large-Scale-Medical ``models/old/voco_headv1.py`` / ``voco_headv2_batch.py``, and nnssl's
    ``VoCoLoss.prediction_loss``). Total prediction loss = pos + neg. (1 - |y - l| is clamped at 0 before the
    +1e-6, which changes nothing where |y - l| <= 1, so that an fp32 cosine rounded past 1 cannot give the
    log of a negative number.)
    """
    if positive not in POSITIVE_WEIGHTS:
        raise ValueError(f"positive={positive!r}: expected one of {', '.join(POSITIVE_WEIGHTS)}")
    labels = labels.to(logits.dtype)
    dims = (-2, -1) if logits.dim() >= 2 else (-1,)
    dist = (labels - logits).abs()
    weight = labels if positive == "label" else (labels > 0).to(logits.dtype)
    pos = -(weight * torch.log((1 - dist).clamp_min(0) + 1e-6)).sum(dims) / (weight.sum(dims) + 1e-6)
    neg_mask = (labels == 0).to(logits.dtype)
    neg = (neg_mask * logits.square()).sum(dims) / (neg_mask.sum(dims) + 1e-6)
    return pos.mean(), neg.mean()


def regularization_loss(base_features: torch.Tensor) -> torch.Tensor:
    """L_reg = mean over pairs i<j of ReLU(cos(b_i, sg(b_j)))^2 per volume, averaged over volumes.

    base_features [B, n*n, D] (or [n*n, D]). One [B, n*n, n*n] cosine matrix; the gradient flows through
    the row (b_i) only, as in the official pairwise loop.
    """
    m = base_features.shape[-2]
    if m < 2:
        return base_features.sum() * 0.0
    b = F.normalize(base_features.float(), dim=-1)
    cos = b @ b.detach().transpose(-1, -2)
    # a multiplicative mask, not cos[..., upper]: boolean indexing would sync the host mid-step
    upper = torch.ones(m, m, device=b.device).triu(1)
    per_volume = (F.relu(cos).square() * upper).sum(dim=(-2, -1)) / (m * (m - 1) / 2)
    return per_volume.mean()


def prediction_term(crops: torch.Tensor, bases: torch.Tensor, labels: torch.Tensor, detach_bases: bool,
                    pred_loss: str = "official", positive: str = "mask", crops_t: torch.Tensor | None = None,
                    bases_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """L_pred of one step from the (student's) features: (L_pred, logits [B, k, n*n], logs).

    crops [B, k, D], bases [B, n*n, D]; with the teacher's ``crops_t`` / ``bases_t`` the logits are
    1/2 [l(crops, bases_t) + l(crops_t, bases)] (the official teacher-student head), else l(crops, bases).
    ``detach_bases``: the student's bases enter the logits behind a stop-gradient. ``pred_loss``: ``official``
    (pos + neg, ``prediction_loss_official`` with ``positive``; logs ``pos`` / ``neg``) or ``eq3``
    (``prediction_loss``).
    """
    b = bases.detach() if detach_bases else bases
    if bases_t is None:
        logits = voco_logits(crops, b)
    else:
        logits = 0.5 * (voco_logits(crops, bases_t) + voco_logits(crops_t, b))
    if pred_loss == "eq3":
        return prediction_loss(logits, labels), logits, {}
    pos, neg = prediction_loss_official(logits, labels, positive)
    return pos + neg, logits, {"pos": pos.detach(), "neg": neg.detach()}


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """in_dim -> hidden -> hidden -> out, BatchNorm1d(affine=False, track_running_stats=False) + ReLU
    after the first two layers (the official ``projection_head``)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(in_dim, hidden_dim),
                                    nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
                                    nn.ReLU(inplace=True))
        self.layer2 = nn.Sequential(nn.Linear(hidden_dim, hidden_dim),
                                    nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
                                    nn.ReLU(inplace=True))
        self.layer3 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(x)))


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------

class VoCo(PretrainMethod):
    """VoCo pre-training on volumes [B, 1, X, Y, Z] in [0, 1], already resized to ``params.resize``.

    params: :class:`VoCoParams` (typed, checked; one line per field on what it is and the official code it
    follows); the module docstring's ledger says where the defaults depart from the official code.
    """

    name = "voco"
    Params = VoCoParams
    transfers_decoder = False
    #: what the runtime's speed layer may act on (sslbench/speed): the EMA teacher, the parts compiled one by one
    #: (crops and losses stay eager), and the encoders whose compiled features are checked against eager
    teachers = ("teacher",)
    compile_parts = ("backbone", "head", "teacher", "teacher_head")
    feature_encoders = {"student": "backbone", "teacher": "teacher"}

    def __init__(self, params: "VoCoParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.variant, self.n, self.sw_batch_size, self.crop_size = p.variant, p.n, p.sw_batch_size, p.crop_size
        self.lam, self.pred_loss, self.augment, self.ema_momentum = p.lambda_, p.pred_loss, p.augment, p.ema_momentum
        #: L_pred's logits read the student's bases behind a stop-gradient (module docstring, ledger)
        self.detach_bases = (self.variant == "paper") if p.detach_bases is None else p.detach_bases
        #: the official pos term's weights: 1[y > 0] in the paper-era head, y in the teacher-student one
        self.positive = "mask" if self.variant == "paper" else "label"
        self.foreground_threshold = p.foreground_threshold
        head_dim = p.head_dim
        fs = int(self.model_cfg["feature_size"])

        teacher_student = self.variant == "teacher-student"
        # SwinUNETR's decoder is dropped
        self.backbone = PooledSwinEncoder(build_swinunetr(self.model_cfg), all_stages=teacher_student)
        self.head = ProjectionHead((24 if teacher_student else 16) * fs, head_dim, head_dim)
        self.teacher: PooledSwinEncoder | None = None
        self.teacher_head: ProjectionHead | None = None
        if teacher_student:
            self.teacher = copy.deepcopy(self.backbone).requires_grad_(False)
            self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)

    @classmethod
    def input_size(cls, params: "VoCoParams | Mapping[str, Any]") -> tuple[int, int, int] | None:
        return cls.typed(params).resize

    def encoder_inputs(self, volumes: torch.Tensor) -> torch.Tensor:
        """The backbones' input of one step: every view of ``volumes`` (``make_views``), for the runtime's check of
        compiled encoders against eager."""
        return self.make_views(volumes)[0]

    def make_views(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All crops of a batch: (views [B*k + B*n*n, C, s, s, s], labels [B, k, n*n]).

        Random crops of all volumes first, then the bases of all volumes (volume-major in each part). Boxes and
        labels are in the coordinates of each volume's foreground box resized to the volume's size (the whole
        volume with ``foreground_threshold: null``).
        """
        b, c, sx, sy, _ = volumes.shape
        n, k, s = self.n, self.sw_batch_size, self.crop_size
        bases = base_crop_boxes((sx, sy), n, device=volumes.device)
        crops = random_crop_boxes(b, k, (sx, sy), (sx // n, sy // n), device=volumes.device)
        labels = position_labels(crops, bases)
        # the official loader's foreground crop + resize, read through by the sampling (no resampled copy)
        frame = None if self.foreground_threshold is None else foreground_boxes(volumes, self.foreground_threshold)
        views = crop_and_resize(volumes, torch.cat([crops, bases.expand(b, -1, -1)], dim=1), s, frame=frame)
        views = torch.cat([views[:, :k].reshape(b * k, c, s, s, s), views[:, k:].reshape(b * n * n, c, s, s, s)])
        if self.augment:
            views = augment_crops(views)
        return views, labels

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = volumes.shape[0]
        k, nn_ = self.sw_batch_size, self.n * self.n
        views, labels = self.make_views(volumes)

        feats = self.head(self.backbone(views)).float()
        crops_s, bases_s = feats[: b * k].view(b, k, -1), feats[b * k:].view(b, nn_, -1)
        reg = regularization_loss(bases_s)
        crops_t = bases_t = None
        if self.teacher is not None:
            with torch.no_grad():
                feats_t = self.teacher_head(self.teacher(views)).float()
            crops_t, bases_t = feats_t[: b * k].view(b, k, -1), feats_t[b * k:].view(b, nn_, -1)
        pred, logits, logs = prediction_term(crops_s, bases_s, labels, self.detach_bases, self.pred_loss,
                                             self.positive, crops_t, bases_t)
        loss = pred + self.lam * reg
        logs.update(loss=loss.detach(), pred=pred.detach(), reg=reg.detach(),
                    logit_mean=logits.detach().mean())
        return loss, logs

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA teacher update param_t = m param_t + (1 - m) param_s (``momentum_update``)."""
        if self.teacher is None:
            return
        teacher = list(self.teacher.parameters()) + list(self.teacher_head.parameters())
        student = list(self.backbone.parameters()) + list(self.head.parameters())
        momentum_update(teacher, student, self.ema_momentum)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """swinViT.* (paper), plus encoder1..4 and encoder10 (teacher-student), SwinUNETR's key layout."""
        # contiguous: the file has one layout whether or not the run compiled (channels-last backbones)
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.backbone.state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        if self.teacher_head is not None:
            out.update({f"teacher_head.{k}": v.detach().cpu().clone()
                        for k, v in self.teacher_head.state_dict().items()})
        return out


# --------------------------------------------------------------------------------------------------
# The 2D form (ChestX-ray14 track, issue 23)
# --------------------------------------------------------------------------------------------------
# VoCo-2D: VoCo's position priors on a 2D grid of base crops (the VoCo supplement's Table 4 row, Sec. 3.2).
#
# VoCo publishes no 2D code; the supplement reports a ChestX-ray14 result and says the position priors hold in 2D
# images too. sslbench's 2D form keeps every equation of the 3D method (above: it calls the same pure
# functions) and changes only the geometry:
#
# * bases: the image (H x W) cut into an n x n grid (``base_crop_boxes`` over rows x columns);
#   random crops: k per image, of the bases' size, integer centres ~ U[half, side - half) (``random_crop_boxes``)
# * position labels: y_{k,j} = |crop_k intersect base_j| / |base_j|, areas in pixels (``position_labels``)
# * every crop resized to ``crop_size`` x ``crop_size`` (bilinear, :func:`crop_images`), augmented on its own
#   (flip of each axis p 0.2, rot90 p 0.2, intensity shift U(-0.1, 0.1) p 0.1: the 3D chain restricted to 2D)
# * features: the ResNet-18 encoder's last map pooled -> VoCo's projection MLP 512 -> head_dim -> head_dim -> head_dim
# * L = L_pred + lambda L_reg: L_pred the official pos + neg form with w = 1[y > 0] and sg(bases) (VoCo's paper
#   variant, ``prediction_term``), L_reg = mean_{i<j} ReLU(cos(b_i, sg(b_j)))^2 (``regularization_loss``)
#
# Ledger (deviations from the 3D official code, none restorable by a key unless said): 2D geometry as above; the
# backbone is PCRL's ResNet-18 U-Net encoder (Table 4's protocol), not SwinUNETR; no foreground crop (radiographs
# fill the frame); only the paper variant (no teacher-student); ``params.pred_loss: eq3`` gives the paper's Eq. 3.

def crop_images(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of ``images`` [B, C, H, W] at ``boxes`` [B, m, 4] = (r0, c0, r1, c1) in pixels (half-open), each
    resized to size x size by bilinear sampling of exactly that area: [B, m, C, size, size]."""
    b, m = boxes.shape[:2]
    hgt, wid = images.shape[-2:]
    r0, c0, r1, c1 = boxes.reshape(-1, 4).to(images.dtype).unbind(-1)
    cx, cy = (c0 + c1) / wid - 1, (r0 + r1) / hgt - 1          # box centres in normalised (column, row) coords
    w, h = (c1 - c0) / wid, (r1 - r0) / hgt                      # half-sizes as fractions of the half-side
    theta = aug2d.affine_theta(cx, cy, w, h, torch.zeros_like(cx), torch.zeros_like(cx, dtype=torch.bool))
    src = images.repeat_interleave(m, dim=0)
    grid = F.affine_grid(theta, [b * m, images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(b, m, images.shape[1], size, size)


def augment_crops_2d(x: torch.Tensor, p_flip: float = 0.2, p_rot90: float = 0.2, p_shift: float = 0.1,
                     max_shift: float = 0.1) -> torch.Tensor:
    """VoCo's per-crop chain in 2D on x [N, C, s, s]: flip each axis p_flip, rot90 (k 1..3) p_rot90, shift p_shift."""
    n = x.shape[0]
    u = torch.rand(n, 5, device=x.device)
    rot_k = torch.randint(1, 4, (n,), device=x.device)
    view = (n,) + (1,) * (x.dim() - 1)
    for axis in range(2):
        x = torch.where((u[:, axis] < p_flip).view(view), x.flip(2 + axis), x)
    for kk in (1, 2, 3):
        x = torch.where(((u[:, 2] < p_rot90) & (rot_k == kk)).view(view), x.rot90(kk, dims=(2, 3)), x)
    shift = (u[:, 3] * 2 - 1) * max_shift * (u[:, 4] < p_shift)
    return x + shift.view(view).to(x.dtype)


class VoCo2D(PretrainMethod):
    name = "voco"
    Params = VoCo2DParams

    def __init__(self, params: "VoCo2DParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.n, self.k, self.crop_size, self.lam = p.n, p.sw_batch_size, p.crop_size, p.lambda_
        self.pred_loss, self.augment = p.pred_loss, p.augment
        self.encoder = build_encoder(model_cfg)
        width = self.encoder.feature_info.channels()[-1]
        self.head = ProjectionHead(width, p.head_dim, p.head_dim)

    @classmethod
    def pixels_per_image(cls, params: "VoCo2DParams | Mapping[str, Any]", size: tuple[int, int]) -> float:
        """Encoder input pixels per image and step (feasibility): (k + n^2) crops of crop_size^2."""
        p = cls.typed(params)
        return (p.sw_batch_size + p.n * p.n) * p.crop_size * p.crop_size

    def make_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(views [B*k + B*n*n, C, s, s]: random crops of every image, then the bases; labels [B, k, n*n])."""
        b, c, hgt, wid = images.shape
        bases = base_crop_boxes((hgt, wid), self.n, device=images.device)
        crops = random_crop_boxes(b, self.k, (hgt, wid), (hgt // self.n, wid // self.n), device=images.device)
        labels = position_labels(crops, bases)
        views = crop_images(images, torch.cat([crops, bases.expand(b, -1, -1)], dim=1), self.crop_size)
        s = self.crop_size
        views = torch.cat([views[:, :self.k].reshape(b * self.k, c, s, s),
                           views[:, self.k:].reshape(b * self.n * self.n, c, s, s)])
        return (augment_crops_2d(views) if self.augment else views), labels

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, nn_ = volumes.shape[0], self.n * self.n
        views, labels = self.make_views(volumes.float())
        feats = self.head(self.encoder(views)[-1].mean(dim=(2, 3))).float()
        crops, bases = feats[: b * self.k].view(b, self.k, -1), feats[b * self.k:].view(b, nn_, -1)
        reg = regularization_loss(bases)
        pred, logits, logs = prediction_term(crops, bases, labels, True, self.pred_loss, "mask")
        loss = pred + self.lam * reg
        logs.update(pred=pred.detach(), reg=reg.detach(), logit_mean=logits.detach().mean())
        return loss, logs

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}
