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
BatchNorm therefore normalises over all of them, as the official code does), and the losses as small
matrix products. ``forward`` returns its logs as detached 0-dim tensors so that no host sync happens
inside the step: call ``float()`` on them when logging.

Window attention: MONAI's ``use_flash_attention=True`` (MONAI 1.6.1) only takes effect when autograd is
off, so it cannot speed up training. ``params["attention"]`` picks what replaces it (sslbench/fast_swin.py,
shared with the other methods and with fine-tuning); in every case each
``WindowAttention`` of the backbone is switched to a subclass that computes the same function (relative
position bias + shift mask, gradients to the bias table included) and the Swin LayerNorms return bf16
under autocast (their outputs only feed Linears, which autocast casts to bf16 anyway):
``"fused"`` (default) runs sslbench/window_attention.py, a Triton kernel that reads the bias table and
the shift-mask region ids per window instead of materialising a (windows, heads, n, n) bias, in forward
and backward (CUDA with Triton and a power-of-two head dim; otherwise SDPA on CUDA, MONAI's math on a CPU);
``"sdpa"`` uses ``torch.nn.functional.scaled_dot_product_attention`` (memory-efficient kernel) with the
bias materialised; ``"monai"`` keeps MONAI's modules as they are (and turns on MONAI's own SDPA path for
the no-grad teacher). Parameter names and the state-dict layout are unchanged. With the teacher-student
variant encoder1 (the full-resolution residual block on the 1-channel crop, the costliest part of the step)
is computed as ``pooled_input_block``: its two single-channel branches are linear in the crop, so their
instance norms follow from the crop's 27 x 27 tap covariance, and only conv2's map is full size (same
function and gradients; where a block does not qualify, its 1-channel convolutions run as a matmul over
shifted copies on CUDA, ``conv_as_matmul``, which cuDNN does slowly). ``compile_encoders()`` wraps the
backbones and heads in ``torch.compile``, each on its own (static shapes; the fused kernels are registered PyTorch
operators, so a compiled block stays one graph; the SDPA form stays eager). Figures on an
H100: BENCHMARKS.md, section "VoCo pre-training".
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import inductor
from ..models.backbones import build_swinunetr
from ..errors import RecipeError
from ..fast_swin import ATTENTIONS, full_precision, keep_sdpa_out_of_compile, use_sdpa_window_attention
from .base import PretrainMethod

VARIANTS = ("paper", "teacher-student")
#: ``params["pred_loss"]``: the official code's pos + neg split, or the paper's Eq. 3 as printed
PRED_LOSSES = ("official", "eq3")
#: the official loader's foreground threshold on intensities scaled to [0, 1] (``utils/data_utils.py``, ``threshold``)
FOREGROUND_THRESHOLD = 0.3
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


def _axis_positions(lo: torch.Tensor, hi: torch.Tensor, n_out: int) -> torch.Tensor:
    """Voxel positions of n_out samples over voxels lo .. hi - 1 (align_corners=True): [..., n_out]."""
    if n_out > 1:
        t = torch.linspace(0.0, 1.0, n_out, device=lo.device, dtype=torch.float32)
    else:
        t = torch.full((1,), 0.5, device=lo.device, dtype=torch.float32)
    return lo.unsqueeze(-1) + t * (hi - 1 - lo).unsqueeze(-1)


def _grid_coords(pos: torch.Tensor, n_in: int) -> torch.Tensor:
    """Voxel positions of an axis of n_in voxels as grid_sample coordinates (align_corners=True)."""
    return pos * (2.0 / (n_in - 1)) - 1.0 if n_in > 1 else torch.zeros_like(pos)


def _axis_coords(lo: torch.Tensor, hi: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """grid_sample coordinates (align_corners=True) of n_out samples over voxels lo .. hi - 1: [..., n_out]."""
    return _grid_coords(_axis_positions(lo, hi, n_out), n_in)


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
        gx = _axis_coords(boxes[..., 0], boxes[..., 2], ox, sx)[..., :, None, None]      # [B, k, ox, 1, 1]
        gy = _axis_coords(boxes[..., 1], boxes[..., 3], oy, sy)[..., None, :, None]      # [B, k, 1, oy, 1]
        gz = _axis_coords(zero, zero + sz, oz, sz).view(1, 1, 1, 1, oz)                # [1, 1, 1, 1, oz]
    else:
        f = frame.to(device=volumes.device, dtype=torch.float32)
        px = _through_frame(_axis_positions(boxes[..., 0], boxes[..., 2], ox), f[:, 0], f[:, 3], sx)
        py = _through_frame(_axis_positions(boxes[..., 1], boxes[..., 3], oy), f[:, 1], f[:, 4], sy)
        pz = _through_frame(_axis_positions(zero, zero + sz, oz).expand(b, oz), f[:, 2], f[:, 5], sz)
        gx = _grid_coords(px, sx)[..., :, None, None]                                    # [B, k, ox, 1, 1]
        gy = _grid_coords(py, sy)[..., None, :, None]                                    # [B, k, 1, oy, 1]
        gz = _grid_coords(pz, sz).view(b, 1, 1, 1, oz)                                   # [B, 1, 1, 1, oz]
    # grid_sample's last grid axis is (W, H, D) = (z, y, x) of a [B, C, X, Y, Z] input
    grid = torch.stack(torch.broadcast_tensors(gz, gy, gx), dim=-1).reshape(b, k * ox, oy, oz, 3)
    out = F.grid_sample(volumes, grid.to(volumes.dtype), mode="bilinear", padding_mode="border",
                        align_corners=True)                                                # [B, C, k*ox, oy, oz]
    return out.view(b, c, k, ox, oy, oz).transpose(1, 2).contiguous()


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

class _SingleChannelConv3d(nn.Conv3d):
    """nn.Conv3d with one input channel (stride 1, 'same' padding), computed on CUDA as one batched matrix
    product over the k^3 shifted copies of the input (cuDNN picks a slow generic kernel for a 1-channel
    3x3x3 convolution of 64^3 crops: 1.9 ms per call on an H200 against ~0.4 ms this way). Same parameters,
    same function: out[c] = sum_ijk w[c, 0, i, j, k] * x_pad[. + (i, j, k)] (+ bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_as_matmul(self, x) if x.is_cuda else super().forward(x)


def conv_as_matmul(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1-input-channel, stride-1 nn.Conv3d applied to x [b, 1, d, h, w] as weight [C, k^3] @ shifted copies
    [b, k^3, d*h*w] (under autocast, in its dtype, as the convolution would be)."""
    kd, kh, kw = conv.kernel_size
    pd, ph, pw = conv.padding
    b, _, d, h, w = x.shape
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    xp = F.pad(x[:, 0], (pw, pw, ph, ph, pd, pd)) if (pd or ph or pw) else x[:, 0]
    cols = torch.stack([xp[:, i:i + d, j:j + h, k:k + w] for i in range(kd) for j in range(kh) for k in range(kw)],
                       dim=1).view(b, kd * kh * kw, d * h * w)
    out = torch.matmul(conv.weight.view(conv.out_channels, -1).to(cols.dtype), cols)          # [b, C, d*h*w]
    if conv.bias is not None:
        out = out + conv.bias.to(out.dtype).view(1, -1, 1)
    return out.view(b, conv.out_channels, d, h, w)


def use_single_channel_convs(module: nn.Module) -> int:
    """Switch every 1-input-channel, stride-1, 'same'-padded nn.Conv3d in ``module`` to
    ``_SingleChannelConv3d`` (same parameters and keys); returns how many."""
    count = 0
    for m in module.modules():
        if (type(m) is nn.Conv3d and m.in_channels == 1 and m.groups == 1 and tuple(m.stride) == (1, 1, 1)
                and tuple(m.dilation) == (1, 1, 1) and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
                and all(2 * p + 1 == k for p, k in zip(m.padding, m.kernel_size))):
            m.__class__ = _SingleChannelConv3d
            count += 1
    return count


def _is_pooled_input_block(block: nn.Module) -> bool:
    """True for MONAI's UnetrBasicBlock / UnetResBlock on a 1-channel input as SwinUNETR's encoder1 builds it:
    conv1 3^3 (stride 1, 'same' zero padding) and residual conv3 1^3, no biases, affine-free instance norms
    without running statistics, LeakyReLU."""
    layer = getattr(block, "layer", block)
    try:
        c1, c2, c3 = layer.conv1.conv, layer.conv2.conv, layer.conv3.conv
        # MONAI's Convolution holds only the convolution here (an 'adn' child would add dropout / norm / act)
        if any(set(dict(getattr(layer, f"conv{i}").named_children())) != {"conv"} for i in (1, 2, 3)):
            return False
        norms = (layer.norm1, layer.norm2, layer.norm3)
        lrelu = layer.lrelu
    except AttributeError:
        return False
    return (all(isinstance(c, nn.Conv3d) and c.bias is None and c.groups == 1 and tuple(c.stride) == (1, 1, 1)
                and tuple(c.dilation) == (1, 1, 1) and c.padding_mode == "zeros" and isinstance(c.padding, tuple)
                and all(2 * p + 1 == k for p, k in zip(c.padding, c.kernel_size)) for c in (c1, c2, c3))
            and c1.in_channels == 1 and c3.in_channels == 1 and tuple(c3.kernel_size) == (1, 1, 1)
            and all(type(nm) is nn.InstanceNorm3d and not nm.affine and not nm.track_running_stats for nm in norms)
            and isinstance(lrelu, nn.LeakyReLU))


def _exact_moments(cols: torch.Tensor, acc: torch.dtype, chunks: int = 64, split: bool | None = None) -> torch.Tensor:
    """cols^T cols per batch entry, [N, S, K] -> [N, K, K] in ``acc``, summed over up to 64 chunks of S (one
    batched product with enough blocks). TF32 does not round the products: bf16 / fp16 inputs are exact in
    TF32, and an fp32 input on CUDA with TF32 on is split into two bf16 parts, hi + lo, which carry it to
    ~2^-17 (the dropped lo * lo term is smaller still); ``split`` forces the choice."""
    n, s, k = cols.shape
    chunks = math.gcd(s, chunks)

    def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.reshape(n * chunks, s // chunks, k).to(acc)
        b = b.reshape(n * chunks, s // chunks, k).to(acc)
        return (a.transpose(1, 2) @ b).view(n, chunks, k, k).sum(dim=1)

    if split is None:
        split = cols.dtype == torch.float32 and cols.is_cuda and torch.backends.cuda.matmul.allow_tf32
    if split:
        hi = cols.to(torch.bfloat16)
        lo = (cols - hi.float()).to(torch.bfloat16)
        cross = gram(hi, lo)
        return gram(hi, hi) + cross + cross.transpose(1, 2)
    return gram(cols, cols)


def pooled_input_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block(x).mean over space for SwinUNETR's encoder1 (a MONAI residual block on the 1-channel crop),
    computed without the full-size outputs of conv1, norm1, conv3 and norm3: Tensor[N, C] (float32).

    The block is  out = lrelu(IN(conv2(lrelu(IN(conv1(x))))) + IN(conv3(x))),  IN = instance norm without
    affine, conv1 3^3 and conv3 1^3 with one input channel and no bias. Both single-channel branches are
    linear in x, so their instance norms follow from statistics of x alone (exact algebra, no approximation):

    * conv1(x)_c = w_c . P(s), P = the k^3 shifted copies of the zero-padded crop [N, S, k^3]. With mu = mean_s P
      and Sigma = Cov_s(P) (biased, per crop):  IN(conv1(x))_c = w_c . (P - mu) / sqrt(w_c^T Sigma w_c + eps),
      i.e. a per-crop 1 -> C convolution with weights A[n, c] = w_c / sqrt(w_c^T Sigma_n w_c + eps) and bias
      -A[n, c] . mu_n, applied as one batched matrix product that writes the map directly in channels-last order.
    * IN(conv3(x))_c = w3_c (x - m) / sqrt(w3_c^2 var(x) + eps): a per-crop scale of the centred crop, fused into
      the final addition instead of a C-channel map with its own statistics (var(x) = Sigma at the centre tap).

    Only conv2's output (channels-last, so cuDNN needs no layout conversions) and its statistics remain full size.
    The copies are centred by a per-crop constant (the mean of a strided sample: the algebra is exact for any
    constant, which only keeps the bias small) and padded with columns of ones to 32 (aligned rows for the
    tensor cores; one batched product then gives the sums of the taps too, and the bias rides in the weights).
    The moments are accumulated in float32 (float64 for float64 input) from the very values the main product
    reads (bf16 under autocast), unrounded by TF32 (``_exact_moments``); the variances
    w^T Sigma w are elementwise sums (as a TF32 matrix product they came out negative on smooth crops: NaN).
    Gradients reach conv1, conv2 and conv3 through the same algebra: the function and its gradients are the
    block's up to rounding (``tests/test_voco.py`` checks both against MONAI's module in float64). Use
    ``_is_pooled_input_block`` to see whether a block qualifies.
    """
    layer = getattr(block, "layer", block)
    c1, c2, c3 = layer.conv1.conv, layer.conv2.conv, layer.conv3.conv
    slope = float(layer.lrelu.negative_slope)
    n, _, d, h, w = x.shape
    s, ch = d * h * w, c1.out_channels
    kd, kh, kw = c1.kernel_size
    pd, ph, pw = c1.padding
    taps = kd * kh * kw
    width = -(-(taps + 1) // 8) * 8                       # taps + the ones column, rounded up to 8
    centre = (kd // 2) * kh * kw + (kh // 2) * kw + kw // 2
    dev = x.device.type
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else acc
    with torch.autocast(dev, enabled=False):
        xf = x[:, 0].to(acc)
        shift = xf[:, ::4, ::4, ::4].mean(dim=(1, 2, 3), keepdim=True)                # any per-crop constant
        xp = F.pad(xf, (pw, pw, ph, ph, pd, pd)) - shift                              # the padding becomes -shift
        taps_view = xp.unfold(1, kd, 1).unfold(2, kh, 1).unfold(3, kw, 1)              # [N, d, h, w, kd, kh, kw]
        cols = F.pad(taps_view.reshape(n, s, taps), (0, width - taps), value=1.0).to(cdt)   # [N, S, width]
        moments = _exact_moments(cols, acc) / s                                       # [N, width, width]
        mu = moments[:, :taps, taps]                                                  # [N, taps]
        cov = moments[:, :taps, :taps] - mu.unsqueeze(2) * mu.unsqueeze(1)
        w1 = c1.weight.view(ch, taps).to(acc)
        # w^T Sigma w and the bias as elementwise sums, never a matrix product (TF32 would round them); a
        # smooth crop makes Sigma nearly rank one, and an edge-like filter's variance is then a tiny difference
        var1 = (w1.unsqueeze(-1) * cov.unsqueeze(1) * w1.unsqueeze(-2)).sum(dim=(-2, -1)).clamp_min(0)   # [N, C]
        a1 = w1 * torch.rsqrt(var1 + layer.norm1.eps).unsqueeze(-1)                   # [N, C, taps]
        b1 = -(a1 * mu.unsqueeze(1)).sum(dim=-1, keepdim=True)                        # [N, C, 1]
        weights = torch.cat([a1, b1, a1.new_zeros(n, ch, width - taps - 1)], dim=-1)   # [N, C, width]: the
        # columns past the taps are all ones: the first carries the bias, the rest meet zero weights
        w3 = c3.weight.view(ch).to(acc)
        a3 = w3 * torch.rsqrt(w3.square() * cov[:, centre, centre].unsqueeze(-1) + layer.norm3.eps)   # [N, C]
        xc = xp[:, pd:pd + d, ph:ph + h, pw:pw + w] - mu[:, centre].view(n, 1, 1, 1)   # x - mean(x)
    h1 = F.leaky_relu(cols @ weights.transpose(1, 2).to(cdt), slope)                 # [N, S, C] = channels-last
    z = F.conv3d(h1.view(n, d, h, w, ch).permute(0, 4, 1, 2, 3), c2.weight.to(cdt), padding=c2.padding)
    with torch.autocast(dev, enabled=False):
        zf = z.to(acc)
        var2, mean2 = torch.var_mean(zf, dim=(2, 3, 4), correction=0, keepdim=True)
        out = (zf - mean2) * torch.rsqrt(var2 + layer.norm2.eps) + a3[:, :, None, None, None] * xc.unsqueeze(1)
        return F.leaky_relu(out, slope).mean(dim=(2, 3, 4))


def max_relative_difference(compiled: torch.Tensor, eager: torch.Tensor) -> float:
    """max |compiled - eager| / max |eager| (NaN where ``compiled`` is not finite): how far a compiled
    computation is from the eager one, relative to the eager output's scale."""
    compiled, eager = compiled.detach().float(), eager.detach().float()
    if not bool(torch.isfinite(compiled).all()):
        return float("nan")
    return float((compiled - eager).abs().max() / eager.abs().max().clamp_min(1e-12))


def _plain_float(volumes: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (cheaper, and it compiles), integer input as float."""
    if hasattr(volumes, "as_tensor"):
        volumes = volumes.as_tensor()
    return volumes if volumes.is_floating_point() else volumes.float()


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


class VoCoBackbone(nn.Module):
    """The parts of a SwinUNETR that VoCo trains, under SwinUNETR's own attribute names.

    ``all_stages=False``: ``swinViT`` only; features = pooled, layer-normed last stage (16fs).
    ``all_stages=True``: also encoder1..4 and encoder10; features = pooled and concatenated
    encoder1(x), encoder2(hs0), encoder3(hs1), encoder4(hs2), encoder10(hs4) (24fs); encoder1's pooled
    output comes from ``pooled_input_block`` when the block qualifies (``pooled_encoder1``).
    Its state_dict keys are SwinUNETR's (``swinViT.*``, ``encoder1.*``...).
    """

    def __init__(self, net: nn.Module, all_stages: bool):
        super().__init__()
        self.all_stages = all_stages
        self.swinViT = net.swinViT
        if all_stages:
            self.encoder1, self.encoder2, self.encoder3 = net.encoder1, net.encoder2, net.encoder3
            self.encoder4, self.encoder10 = net.encoder4, net.encoder10
        # encoder1's pooled output without its full-size 1-channel branches (same function; pooled_input_block)
        self.pooled_encoder1 = all_stages and _is_pooled_input_block(net.encoder1)
        self.memory_format = torch.contiguous_format    # of the maps between stages (``use_channels_last``)

    def use_channels_last(self) -> None:
        """Convolution weights and the maps between stages channels-last (NDHWC). The Swin stages produce their
        maps channels-last anyway and cuDNN's bf16 3D convolutions run on NDHWC, so in the NCDHW layout every
        convolution converted its input, weight and output: 6.9 of 142.7 ms of the compiled teacher-student
        step (H100, 2026-11-27; 149.8 -> 141.9 ms a step with this). Done for compiled encoders only
        (``VoCo.compile_encoders``): the eager step measured no faster with it (8.16 volumes/s against 8.25
        without, same peak memory, H100), so eager runs keep MONAI's layout. Only for ``all_stages`` (the
        teacher-student backbone, where it was measured): the paper variant's swinViT-only backbone has few
        convolutions, and its eager step ran slower channels-last (16.77 against 18.52 volumes/s, two H100
        machines); its compiled step was not measured either way, so it keeps NCDHW. Same function; the state
        dict's values are unchanged."""
        if not self.all_stages:
            return
        self.to(memory_format=torch.channels_last_3d)
        self.memory_format = torch.channels_last_3d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SwinTransformer.forward, minus the layer norms of stage outputs that are not used
        swin = self.swinViT
        h = swin.pos_drop(swin.patch_embed(x))
        stages = [h]
        for i in range(1, 5):
            if swin.use_v2:
                h = getattr(swin, f"layers{i}c")[0](h.contiguous(memory_format=self.memory_format))
            h = getattr(swin, f"layers{i}")[0](h.contiguous(memory_format=self.memory_format))
            stages.append(h)

        def hs(i: int) -> torch.Tensor:
            return swin.proj_out(stages[i], True)

        if not self.all_stages:
            return hs(4).mean(dim=(2, 3, 4))
        enc1 = pooled_input_block(self.encoder1, x) if self.pooled_encoder1 else self.encoder1(x).mean(dim=(2, 3, 4))
        encs = (self.encoder2(hs(0)), self.encoder3(hs(1)), self.encoder4(hs(2)), self.encoder10(hs(4)))
        return torch.cat([enc1] + [e.mean(dim=(2, 3, 4)) for e in encs], dim=1)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------

class VoCo(PretrainMethod):
    """VoCo pre-training on volumes [B, 1, X, Y, Z] in [0, 1], already resized to ``params["resize"]``.

    params: variant (paper | teacher-student), n, sw_batch_size, resize, crop_size, lambda; optional
    augment (true), attention (fused | sdpa | monai), head_dim (2048), ema_momentum (0.9), detach_bases
    (null: the variant's official choice, true | false), pred_loss (official | eq3), foreground_threshold
    (0.3, null: off). The module docstring's ledger says which official code each setting follows.
    """

    name = "voco"
    transfers_decoder = False

    def __init__(self, params: Mapping[str, Any], model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.params
        self.variant = str(p.get("variant", "paper"))
        if self.variant not in VARIANTS:
            raise RecipeError(f"method.params.variant: unknown value {self.variant!r} for method voco; "
                              f"expected one of {', '.join(VARIANTS)}")
        attention = str(p.get("attention", "fused"))
        if attention not in ATTENTIONS:
            raise RecipeError(f"method.params.attention: unknown value {attention!r} for method voco; "
                              f"expected one of {', '.join(ATTENTIONS)}")
        self.n = int(p.get("n", 4))
        self.sw_batch_size = int(p.get("sw_batch_size", 4))
        self.crop_size = int(p.get("crop_size", 64))
        if self.crop_size % 32:
            raise RecipeError(f"method.params.crop_size: {self.crop_size} for method voco; expected a multiple "
                              f"of 32 (SwinUNETR downsamples 5 times)")
        if self.variant == "teacher-student" and self.crop_size < 64:
            raise RecipeError(f"method.params.crop_size: {self.crop_size} with variant teacher-student; expected "
                              f">= 64 (encoder10 instance-normalises the 1/32-scale map, a single voxel at 32)")
        self.lam = float(p.get("lambda", 1.0))
        detach = p.get("detach_bases")
        if detach is not None and not isinstance(detach, bool):
            raise RecipeError(f"method.params.detach_bases: {detach!r} for method voco; expected true, false or "
                              f"null (the variant's official choice: true for paper, false for teacher-student)")
        #: L_pred's logits read the student's bases behind a stop-gradient (module docstring, ledger)
        self.detach_bases = (self.variant == "paper") if detach is None else detach
        self.pred_loss = str(p.get("pred_loss", "official"))
        if self.pred_loss not in PRED_LOSSES:
            raise RecipeError(f"method.params.pred_loss: unknown value {self.pred_loss!r} for method voco; "
                              f"expected one of {', '.join(PRED_LOSSES)}")
        #: the official pos term's weights: 1[y > 0] in the paper-era head, y in the teacher-student one
        self.positive = "mask" if self.variant == "paper" else "label"
        threshold = p.get("foreground_threshold", FOREGROUND_THRESHOLD)
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 <= float(threshold) < 1.0):
            raise RecipeError(f"method.params.foreground_threshold: {threshold!r} for method voco; expected a "
                              f"number in [0, 1) (intensities are scaled to [0, 1]) or null (no foreground crop)")
        self.foreground_threshold = None if threshold is None else float(threshold)
        self.augment = bool(p.get("augment", True))
        self.ema_momentum = float(p.get("ema_momentum", 0.9))
        head_dim = int(p.get("head_dim", 2048))
        fs = int(self.model_cfg["feature_size"])

        net = build_swinunetr(self.model_cfg)
        if attention != "monai":
            use_sdpa_window_attention(net.swinViT, kernel=attention)
        teacher_student = self.variant == "teacher-student"
        self.backbone = VoCoBackbone(net, all_stages=teacher_student)   # SwinUNETR's decoder is dropped
        if teacher_student and not self.backbone.pooled_encoder1:
            use_single_channel_convs(self.backbone.encoder1)   # its 3^3 and 1^3 convolutions of the 1-channel crop
        self.head = ProjectionHead((24 if teacher_student else 16) * fs, head_dim, head_dim)
        self.teacher: VoCoBackbone | None = None
        self.teacher_head: ProjectionHead | None = None
        if teacher_student:
            self.teacher = copy.deepcopy(self.backbone).requires_grad_(False)
            self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
            if attention == "monai":
                for m in self.teacher.modules():
                    if hasattr(m, "use_flash_attention"):
                        m.use_flash_attention = True   # MONAI's SDPA path: only used without autograd
        # torch.compile'd forwards of backbone / head / teacher / teacher_head (compile_encoders); absent: eager
        self._compiled: dict[str, Any] = {}

    @staticmethod
    def input_size(params: Mapping[str, Any]) -> tuple[int, int, int] | None:
        return tuple(int(s) for s in params["resize"])

    def compile_encoders(self, **kwargs: Any) -> None:
        """torch.compile the backbones and heads (static shapes), each on its own: crops and losses stay eager,
        and ``compile_agreement`` can compare a compiled backbone with the eager one (no head's batch norm
        between them to amplify rounding). The backbones go channels-last first (``use_channels_last``):
        call this before the optimizer holds state, or align it (``protocol.align_optimizer_state``)."""
        self.use_channels_last()
        keep_sdpa_out_of_compile(self)
        # static shapes (inductor.compile's default): the stages call the same block code with four shapes,
        # each its own entry in Dynamo's cache, where automatic dynamic shapes would recompile symbolically
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # bound methods in a plain dict: a compiled module stored as an attribute would join the state dict
        self._compiled = {name: inductor.compile(getattr(self, name).forward, **kwargs)
                          for name in ("backbone", "head", "teacher", "teacher_head") if getattr(self, name) is not None}

    def use_channels_last(self) -> None:
        """The student's and the teacher's backbones channels-last (``VoCoBackbone.use_channels_last``)."""
        for net in (self.backbone, self.teacher):
            if net is not None:
                net.use_channels_last()

    def _encode(self, backbone: str, head: str, x: torch.Tensor) -> torch.Tensor:
        """head(backbone(x)), each through its compiled form where ``compile_encoders`` made one."""
        run_backbone = self._compiled.get(backbone) or getattr(self, backbone)
        run_head = self._compiled.get(head) or getattr(self, head)
        return run_head(run_backbone(x))

    def compile_agreement(self, volumes: torch.Tensor) -> dict[str, float]:
        """After ``compile_encoders``: how far the compiled backbones' features are from the eager ones (student,
        and teacher without autograd as in training) on one batch of views of ``volumes``, under the caller's
        autocast and random state. Keys ``student`` / ``teacher``: max |compiled - eager| / max |eager| (NaN
        where the compiled features are not finite). Under autocast also, against the same eager backbone
        computed in full fp32 (``fast_swin.full_precision``): ``<key>_vs_fp32`` for the compiled features and
        ``<key>_eager_vs_fp32`` for the eager ones, i.e. the rounding that low precision alone costs
        (``protocol.compiled_feature_problems`` judges them). {} when nothing is compiled."""
        if not self._compiled:
            return {}
        views, _ = self.make_views(_plain_float(volumes))
        low_precision = torch.is_autocast_enabled(views.device.type)
        out: dict[str, float] = {}
        for name in ("backbone", "teacher"):
            if name not in self._compiled:
                continue
            net = getattr(self, name)
            with torch.set_grad_enabled(name == "backbone"):
                eager = net(views).detach()           # no graphs kept while the fp32 reference runs
                compiled = self._compiled[name](views).detach()
            key = "student" if name == "backbone" else "teacher"
            out[key] = max_relative_difference(compiled, eager)
            if low_precision:
                with torch.no_grad(), full_precision(net):
                    reference = net(views.float())
                out[f"{key}_vs_fp32"] = max_relative_difference(compiled, reference)
                out[f"{key}_eager_vs_fp32"] = max_relative_difference(eager, reference)
        return out

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
        volumes = _plain_float(volumes)
        b = volumes.shape[0]
        k, nn_ = self.sw_batch_size, self.n * self.n
        views, labels = self.make_views(volumes)

        feats = self._encode("backbone", "head", views).float()
        crops_s, bases_s = feats[: b * k].view(b, k, -1), feats[b * k:].view(b, nn_, -1)
        reg = regularization_loss(bases_s)
        crops_t = bases_t = None
        if self.teacher is not None:
            with torch.no_grad():
                feats_t = self._encode("teacher", "teacher_head", views).float()
            crops_t, bases_t = feats_t[: b * k].view(b, k, -1), feats_t[b * k:].view(b, nn_, -1)
        pred, logits, logs = prediction_term(crops_s, bases_s, labels, self.detach_bases, self.pred_loss,
                                             self.positive, crops_t, bases_t)
        loss = pred + self.lam * reg
        logs.update(loss=loss.detach(), pred=pred.detach(), reg=reg.detach(),
                    logit_mean=logits.detach().mean())
        return loss, logs

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA teacher update param_t = m param_t + (1 - m) param_s, one foreach kernel group."""
        if self.teacher is None:
            return
        teacher = list(self.teacher.parameters()) + list(self.teacher_head.parameters())
        student = list(self.backbone.parameters()) + list(self.head.parameters())
        torch._foreach_lerp_(teacher, student, 1.0 - self.ema_momentum)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """swinViT.* (paper), plus encoder1..4 and encoder10 (teacher-student), SwinUNETR's key layout."""
        # contiguous: the file has one layout whether or not the run compiled (use_channels_last)
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.backbone.state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        if self.teacher_head is not None:
            out.update({f"teacher_head.{k}": v.detach().cpu().clone()
                        for k, v in self.teacher_head.state_dict().items()})
        return out
