"""PCRL v1 and PCRL v2: preservational contrastive representation learning.

* PCRL v1: Zhou, Lu, Yang, Han, Yu. "Preservational Learning Improves Self-supervised Medical Image Models by
  Reconstructing Diverse Contexts", ICCV 2021 (code: github.com/Luchixiang/PCRL, ``pytorch/pcrl_3d.py``).
* PCRL v2: Zhou, Lu, Chen, Yang, Yu. "A Unified Visual Information Preservation Framework for Self-supervised
  Pre-training in Medical Image Analysis", TPAMI 2023 (code: github.com/RL4M/PCRLv2, ``src/train_3d.py``).

The 2D forms of both (``PCRLv1_2D``, ``PCRLv2_2D``: the ChestX-ray14 track, from each repository's own 2D code) are
at the end of this file.

Both run on a fine-tuning network built by ``sslbench.models.backbones.build_model`` (``model.name`` swinunetr, the
default, unet3d = the official 3D U-Net, or basicunet) and call its own submodules, so the weights handed over are in the fine-tuning layout.

PCRL v1 (``PCRLv1``), per batch of B volumes:

* views: two overlapping crops per volume (IoU > ``min_iou`` = 0.25, sizes and positions drawn on the device),
  resized to ``view_size`` with one ``grid_sample`` -> clean crops c1, c2; encoder inputs x = Models Genesis
  local pixel shuffling + in/out-painting of c (``sslbench.methods.parts.perturbations``);
* transformation T = random flips of the three axes (p = 0.5 each) + rot90 by k in {0..3} in the x-y plane,
  coded as the 7-d one-hot a = [flip_x, flip_y, flip_z, onehot(k)] (the official ``spatial_aug``);
* transformation-conditioned attention: g(a) = sigmoid(FC(ReLU(FC(a)))) gates the bottleneck channels
  (``TransformGate``); the decoder reconstructs T(x) (``target: corrupted``, the official; ``clean``: T(c)) from
  the gated bottleneck;
* momentum (key) encoder: encoder + projection, param_k <- m param_k + (1 - m) param_q, m = 0.999
  (``momentum_update``, run in ``after_step``); memory queue of K keys (``MemoryQueue``);
* mixup: lambda ~ Beta(1, 1), lambda <- max(lambda, 1 - lambda); mixed inputs x~ = lambda x + (1 - lambda) x[perm]
  and mixed key features k~ = lambda k + (1 - lambda) k[perm] (``mixup_weight``, ``mixup``);
* hybrid features: h_alpha = alpha g(a1) h_q(x1) + (1 - alpha) g(a2) h_k(x2) at the bottleneck and
  alpha h_q + (1 - alpha) h_k at every skip, alpha ~ max(Beta(1,1), 1 - Beta(1,1));
* L = L_contrast + L_rec with
  L_contrast = 1/3 [NCE(q, k) + NCE(q~, k(x~2)) + NCE(q~, k~)]                       (the three NCE pairs)
  L_rec = 1/4 [MSE(D(g1 h_q(x1)), T1 x1) + MSE(D(h_q(x~1)), c~1)
               + MSE(D(h_alpha1), alpha1 T1 x1 + (1 - alpha1) T2 x2)
               + MSE(D(h_alpha2 of x~1, x~2), alpha2 c~1 + (1 - alpha2) c~2)]         (the four MSE terms)
  (with ``target: clean``, c1 / c2 in place of x1 / x2 in the first and third terms)

PCRL v2 (``PCRLv2``):

* views: two global crops per volume (IoU > 0.3) resized to ``global_size`` and ``num_local`` (6) local crops
  whose origins lie in the union box of the two global crops, resized to ``local_size``; random flips (the
  spatial part: gt = flipped crop, intensities untouched in [0, 1]); then the network inputs go through the
  official intensity chain (``augment: official``, ``pcrlv2_intensity``), in the official order:
  torchio RandomNoise (mean 0, std ~ U(0, 0.25) per view: ``random_noise``), RandomGamma (log gamma ~
  U(-0.3, 0.3) per view and channel, x -> sign(x) |x|^gamma: ``random_gamma``), on global views only a patch
  shuffle (standing in for RandomSwap, see below), then ZNormalization of each view over all its voxels
  (``z_normalize``);
* a decoder WITHOUT skip connections (``SkiplessDecoder``): per scale s, x_s = up-block(x_{s+1}),
  pro_s = BN(GAP(x_s)), pre_s = predictor(pro_s), mask_s = sigmoid(conv1x1(x_s)) upsampled to full size;
* L = MSE(out(v1), gt1) + L_cos(s) + beta MSE(mask_s(v1), gt1) + L_local, with
  L_cos(s) = -1/2 [cos(pre_s(v1), sg(pro_s(v2))) + cos(pre_s(v2), sg(pro_s(v1)))] on one random scale s,
  L_local = mean over the 2 global x num_local local pairs of L_cos at a random scale per pair,
  beta = 1/2 (1 + cos(pi t / T)), t = the step, T = ``params["schedule_steps"]`` (the recipe sets it to
  ``pretrain.steps``; beta stays 0 after T).

GPU-first: crops, transforms, mixup, the queue update and every loss are batched tensor ops; the plain and mixed
views share one encoder call, the four reconstructions one decoder call, and randomness is drawn as tensors.

Departures from the official code (each one deliberate; the recipe comments repeat the user-facing ones):

* v1 contrast: ``contrast: nce`` (default) is the official estimator (P_n = 1 / ``nce_n_data``; the official
  n_data is the number of batches per epoch, which only enters through the 1e-5 eps); its constant Z is set
  from the first step's three pairs (the official: from the first (q, k) call). ``infonce`` is MoCo's softmax
  form. The three pairs are scored against the queue as it was before the step and their 3B keys are then
  enqueued together (the official enqueues after each of its three calls).
* v1 target: no departure by default. ``target: corrupted`` (default) is the official 3D loader: the plain and hybrid
  branches reconstruct T(corrupted input) (``luna_pcrl_pretask.py``: ``mask = spatial_aug(input)``, the
  input after local pixel shuffling and painting); the mixed branches restore the mixed clean crops (the
  official ``mixed_gt``). ``target: clean`` reconstructs T(clean crop) instead, as Models Genesis restores the
  clean image (sslbench's default before issue 18).
* v1 views: torchio's RandomAffine / RandomBlur of the official loader are not applied (flips / rot90 /
  shuffling / painting only); crop sizes are fractions of the corpus volume (``crop_scale``) instead of the
  official absolute LUNA16 sizes. ShuffleBN is not used: on one device a batch permutation does not change
  BatchNorm statistics (SwinUNETR has none). BatchNorm (unet3d, basicunet) sees the plain and mixed views together (one
  encoder call of 2B) and the four decoder inputs together (4B); the official calls them one at a time.
* v2: both global views share one encoder / decoder call (BatchNorm over 2B, the official: B each);
  ``schedule_steps`` plays the official's 240 epochs; the deep-supervision heads are the official 3x3 conv + BN + sigmoid
  (``ds_head``; ``conv1x1`` is sslbench's earlier head).
* v2 augmentations. Official (``src/data.py``, ``pcrlv2_luna_pretask``; every torchio transform at its
  defaults, p = 1): spatial = Compose([RandomFlip(), RandomAffine()]) on the crops (gt = its output); then
  global inputs Compose([RandomBlur(), RandomNoise(), RandomGamma(), RandomSwap(patch_size=(8, 4, 4)),
  ZNormalization()]), local inputs the same without RandomSwap. Here:
  - RandomNoise, RandomGamma, ZNormalization: as torchio (``augment: official``, ``normalize: zscore``, the
    defaults; ranges ``noise_std`` = [0, 0.25], ``log_gamma`` = [-0.3, 0.3]). torchio's Gamma takes x^gamma
    when the image has no negative value and sign(x) |x|^gamma otherwise; both are sign(x) |x|^gamma (gamma
    > 0), so one formula serves. ZNormalization uses the unbiased std and raises on a constant image; here a
    constant view is only centred (std taken as 1), as a training step must not stop on one flat crop.
  - ``augment: genesis`` restores sslbench's earlier stand-in (Models Genesis local pixel shuffling on global
    views, the Bezier map ``nonlinear_intensity`` at ``nonlinear_rate``, which inverts intensities half the
    time, then the noise); ``normalize: none`` drops the z-normalisation, ``noise_std: 0.05`` the earlier
    noise strength (all three together: the pre-issue-18 behaviour).
  - RandomSwap (100 swaps of two 8x4x4 patches, sequential) is replaced by Genesis local pixel shuffling at
    ``local_rate`` (a batched shuffle; a sequential swap loop has no batched form); RandomBlur (sigma ~ U(0, 2)
    mm per axis) and RandomAffine (scale 0.9..1.1, rotation +-10 degrees) are not applied (no key restores these); the flips act
    on ``flip_axes`` with p = 0.5 each, by default axis 0 only as torchio's RandomFlip() ([0, 1, 2]: sslbench's earlier form).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError
from ..models.backbones import (SIZE_DIVISOR, TRANSFER_PREFIXES, bottleneck_features, bottleneck_module,
                                build_model, decoder_output, encoder_features, output_layer_name, upsampling_widths)
from ..models.unet2d import ConvBNReLU, UNet2D, build_encoder, unet2d_config
from .base import PretrainMethod
from .params import Attention, MethodParams, positive, probability, rule
from .parts import aug2d
from .parts.ema import momentum_update
from .parts.perturbations import local_pixel_shuffle, nonlinear_intensity, paint
from .parts.views import axis_coords

FAMILIES = ("swinunetr", "unet3d", "basicunet")


# --------------------------------------------------------------------------------------------------
# Boxes and crops
# --------------------------------------------------------------------------------------------------

def box_iou_3d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of axis-aligned boxes a, b [..., 6] = (x0, y0, z0, x1, y1, z1) (broadcasting): Tensor[...]."""
    lo = torch.maximum(a[..., :3], b[..., :3])
    hi = torch.minimum(a[..., 3:], b[..., 3:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    vol_a = (a[..., 3:] - a[..., :3]).prod(-1)
    vol_b = (b[..., 3:] - b[..., :3]).prod(-1)
    return inter / (vol_a + vol_b - inter)


def _sides(scale: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Box sides [..., 3] = scale [...] x volume size (isotropic fraction of each side)."""
    s = torch.as_tensor([float(v) for v in size], device=scale.device)
    return scale.unsqueeze(-1) * s


def random_boxes(shape: Sequence[int], size: Sequence[int], scale_range: Sequence[float],
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boxes [*shape, 6] inside a volume of ``size``: side = U(scale_range) x size per box, origin uniform."""
    lo, hi = float(scale_range[0]), float(scale_range[1])
    scale = lo + (hi - lo) * torch.rand(tuple(shape), generator=generator, device=device)
    sides = _sides(scale, size)
    vol = torch.as_tensor([float(v) for v in size], device=device)
    origin = torch.rand(tuple(shape) + (3,), generator=generator, device=device) * (vol - sides)
    return torch.cat([origin, origin + sides], dim=-1)


def overlapping_box_pairs(batch: int, size: Sequence[int], scale_range: Sequence[float], min_iou: float,
                          candidates: int = 128, generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Two crops per volume with IoU > ``min_iou`` (the official generators' rejection loop, batched).

    Box 1 ~ ``random_boxes``. ``candidates`` boxes 2 per volume get a side ~ U(scale_range) x size and a centre
    uniform within (side1 + side2) / 2 of box 1's centre on each axis (every overlapping position); the first
    candidate inside the volume with IoU > min_iou is taken (``argmax`` of the mask: no host sync). If none
    qualifies (rare), box 2 = box 1 (IoU 1). Returns (boxes1, boxes2), each [batch, 6].
    """
    box1 = random_boxes((batch,), size, scale_range, generator, device)
    lo, hi = float(scale_range[0]), float(scale_range[1])
    scale = lo + (hi - lo) * torch.rand((batch, candidates), generator=generator, device=device)
    sides2 = _sides(scale, size)
    sides1 = (box1[:, 3:] - box1[:, :3]).unsqueeze(1)
    centre1 = ((box1[:, 3:] + box1[:, :3]) / 2).unsqueeze(1)
    # IoU <= overlap / max side on every axis, so IoU > t needs |centre offset| < (s1 + s2) / 2 - t max(s1, s2):
    # proposing exactly that range covers every admissible position and wastes few candidates
    reach = ((sides1 + sides2) / 2 - min_iou * torch.maximum(sides1, sides2)).clamp_min(0)
    offset = (torch.rand((batch, candidates, 3), generator=generator, device=device) * 2 - 1) * reach
    origin2 = centre1 + offset - sides2 / 2
    cand = torch.cat([origin2, origin2 + sides2], dim=-1)                          # [B, C, 6]
    vol = torch.as_tensor([float(v) for v in size], device=device)
    inside = (cand[..., :3] >= 0).all(-1) & (cand[..., 3:] <= vol).all(-1)
    ok = inside & (box_iou_3d(cand, box1.unsqueeze(1)) > min_iou)
    first = ok.to(torch.int8).argmax(dim=1)                                         # first qualifying candidate
    chosen = cand.gather(1, first.view(batch, 1, 1).expand(batch, 1, 6)).squeeze(1)
    box2 = torch.where(ok.any(dim=1, keepdim=True), chosen, box1)
    return box1, box2


def local_boxes(box1: torch.Tensor, box2: torch.Tensor, k: int, size: Sequence[int],
                scale_range: Sequence[float], generator: torch.Generator | None = None) -> torch.Tensor:
    """PCRL v2's local crops: k boxes per volume whose origin is uniform in the union box of the two global
    crops (as the official generator), kept inside the volume: Tensor[B, k, 6]."""
    b = box1.shape[0]
    device = box1.device
    lo_s, hi_s = float(scale_range[0]), float(scale_range[1])
    scale = lo_s + (hi_s - lo_s) * torch.rand((b, k), generator=generator, device=device)
    sides = _sides(scale, size)
    vol = torch.as_tensor([float(v) for v in size], device=device)
    u_lo = torch.minimum(box1[:, :3], box2[:, :3]).unsqueeze(1)
    u_hi = torch.maximum(box1[:, 3:], box2[:, 3:]).unsqueeze(1)
    hi = torch.minimum(u_hi, vol - sides)
    lo = torch.minimum(u_lo, hi)
    origin = lo + torch.rand((b, k, 3), generator=generator, device=device) * (hi - lo)
    return torch.cat([origin, origin + sides], dim=-1)


def crop_and_resize_3d(volumes: torch.Tensor, boxes: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """Cut every 3-D box of every volume and resize it (trilinear): Tensor[B, k, C, *out_size].

    volumes [B, C, X, Y, Z]; boxes [B, k, 6] (x0, y0, z0, x1, y1, z1) in voxels. Sampling as VoCo's
    ``crop_and_resize`` (MONAI Resize with align_corners=True after a crop), generalised to boxes in z; ONE
    ``grid_sample`` for all B*k crops (the k crops of a volume stacked along the output's first axis).
    """
    b, c, sx, sy, sz = volumes.shape
    ox, oy, oz = (int(s) for s in out_size)
    k = boxes.shape[1]
    boxes = boxes.to(device=volumes.device, dtype=torch.float32)
    gx = axis_coords(boxes[..., 0], boxes[..., 3], ox, sx)[..., :, None, None]      # [B, k, ox, 1, 1]
    gy = axis_coords(boxes[..., 1], boxes[..., 4], oy, sy)[..., None, :, None]      # [B, k, 1, oy, 1]
    gz = axis_coords(boxes[..., 2], boxes[..., 5], oz, sz)[..., None, None, :]      # [B, k, 1, 1, oz]
    # grid_sample's last grid axis is (W, H, D) = (z, y, x) of a [B, C, X, Y, Z] input
    grid = torch.stack(torch.broadcast_tensors(gz, gy, gx), dim=-1).reshape(b, k * ox, oy, oz, 3)
    out = F.grid_sample(volumes, grid.to(volumes.dtype), mode="bilinear", padding_mode="border",
                        align_corners=True)                                            # [B, C, k*ox, oy, oz]
    return out.view(b, c, k, ox, oy, oz).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Transformations, attention gate, mixup
# --------------------------------------------------------------------------------------------------

def random_spatial_codes(n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                         p_flip: float = 0.5, axes: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCRL v1's transformation T per sample: (flips [n, axes] bool, rot90 k [n] in 0..3, code [n, axes + 4]).

    As the official ``spatial_aug``: each axis flipped with p = 0.5, then rot90 by k ~ U{0..3} in the x-y plane;
    code = [flip_x, flip_y, flip_z, onehot(k)] (7-d). ``axes=2``: the official 2D ``PCRLChestPretask.aug``, flips of
    rows and columns, rot90 in the image plane, code = [flip_rows, flip_cols, onehot(k)] (6-d).
    """
    flips = torch.rand((n, axes), generator=generator, device=device) < p_flip
    k = torch.randint(0, 4, (n,), generator=generator, device=device)
    return flips, k, transform_code(flips, k)


def transform_code(flips: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The code of PCRL v1's attention: [flips, onehot(k, 4)] for flips [n, A], k [n] (7-d in 3D, 6-d in 2D)."""
    return torch.cat([flips.float(), F.one_hot(k.long(), 4).float()], dim=1)


def flip_axes(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip each sample of x [n, C, *spatial] along the spatial axes where flips [n, A] is true (A = 3 in 3D,
    2 for images [n, C, H, W])."""
    view = (x.shape[0],) + (1,) * (x.dim() - 1)
    for axis in range(flips.shape[1]):
        x = torch.where(flips[:, axis].view(view), x.flip(2 + axis), x)
    return x


def random_axis_flips(n: int, axes: Sequence[int], device: torch.device | str = "cpu", p: float = 0.5,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip flags [n, 3]: each axis of ``axes`` flipped with probability p per sample, the others never.

    ``axes=[0]`` is torchio's ``RandomFlip()`` default (axis 0 with p 0.5), the official PCRL v2 spatial flip.
    """
    flips = torch.rand((n, 3), generator=generator, device=device) < p
    keep = torch.zeros(3, dtype=torch.bool, device=device)
    keep[list(axes)] = True
    return flips & keep


def apply_spatial(x: torch.Tensor, flips: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply per-sample flips [n, A] then rot90 by k [n] in the (X, Y) plane to x [n, C, X, Y, Z] (X == Y); the
    same on images x [n, C, H, W] with flips [n, 2] (rot90 in the (H, W) plane, H == W)."""
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"rot90 in the x-y plane needs X == Y, got a view of {tuple(x.shape[2:])}")
    x = flip_axes(x, flips)
    view = (x.shape[0],) + (1,) * (x.dim() - 1)
    out = x
    for kk in (1, 2, 3):
        out = torch.where((k == kk).view(view), x.rot90(kk, dims=(2, 3)), out)
    return out


class TransformGate(nn.Module):
    """Transformation-conditioned attention (PCRL v1, Sec. 3.3): g(a) = sigmoid(W2 ReLU(W1 a + b1) + b2).

    ``a`` [n, 7] is the one-hot code of the applied flips / rot90; the result [n, C, 1, 1, 1] multiplies the
    bottleneck channels (the official ``aug_fc1`` 7 -> 256, ``aug_fc2`` 256 -> 512 for C = 512). In 2D
    (``code_dim=6``, ``spatial_dims=2``): the official ``pcrl_model.py`` ``aug_fc1`` 6 -> 256, ``aug_fc2`` 256 -> 512,
    the result [n, C, 1, 1].
    """

    def __init__(self, channels: int, hidden: int | None = None, code_dim: int = 7, spatial_dims: int = 3):
        super().__init__()
        hidden = hidden or max(channels // 2, 1)
        self.spatial_dims = spatial_dims
        self.fc1 = nn.Linear(code_dim, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(code))))
        return g.view(*g.shape, *(1,) * self.spatial_dims)


def mixup_weight(shape: Sequence[int] = (), generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """lambda ~ Beta(1, 1) (= U(0, 1)), returned as max(lambda, 1 - lambda) in [0.5, 1] (the official mixup_data)."""
    lam = torch.rand(tuple(shape), generator=generator, device=device)
    return torch.maximum(lam, 1 - lam)


def mixup(x: torch.Tensor, index: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lambda x + (1 - lambda) x[index] along the batch (lambda a 0-dim tensor, index a permutation)."""
    lam = lam.to(x.dtype)
    return lam * x + (1 - lam) * x.index_select(0, index)


# --------------------------------------------------------------------------------------------------
# PCRL v2's intensity augmentations (torchio's RandomNoise / RandomGamma / ZNormalization, batched)
# --------------------------------------------------------------------------------------------------

def _uniform(shape: Sequence[int], bounds: Sequence[float], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """U(low, high) of the given shape, drawn on ``device`` (the generator's device when one is given)."""
    lo, hi = float(bounds[0]), float(bounds[1])
    return lo + (hi - lo) * torch.rand(tuple(shape), generator=generator, device=device)


def _draw_device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else x.device


def random_noise(x: torch.Tensor, std_range: Sequence[float] = (0.0, 0.25),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """torchio ``RandomNoise()`` per sample of x [n, C, ...]: x + N(0, sigma^2), sigma ~ U(std_range).

    One sigma per sample (torchio draws one per image, shared by its channels), i.i.d. noise per voxel; the
    mean is 0 (torchio's default mean range (0, 0)). A range of (0, 0) returns x unchanged.
    """
    if float(std_range[1]) <= 0:
        return x
    dev = _draw_device(x, generator)
    sigma = _uniform((x.shape[0],) + (1,) * (x.dim() - 1), std_range, generator, dev)
    noise = torch.randn(tuple(x.shape), generator=generator, device=dev)
    return x + (sigma * noise).to(device=x.device, dtype=x.dtype)


def gamma_power(x: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """torchio's ``Gamma`` map: sign(x) |x|^gamma (gamma > 0, broadcast against x).

    torchio takes x^gamma when the image has no negative voxel and sign(x) |x|^gamma when it has one; for
    gamma > 0 both agree on every x >= 0, so this one formula is torchio's in both cases. It is monotone
    increasing: it never inverts intensities (0 -> 0, 1 -> 1, -1 -> -1).
    """
    gamma = torch.as_tensor(gamma, dtype=x.dtype, device=x.device)
    return torch.sign(x) * x.abs().pow(gamma)


def random_gamma(x: torch.Tensor, log_gamma_range: Sequence[float] = (-0.3, 0.3),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """torchio ``RandomGamma()`` per sample of x [n, C, ...]: gamma = exp(beta), beta ~ U(log_gamma_range),
    one gamma per sample and channel (as torchio, per channel of each image); applied by ``gamma_power``."""
    dev = _draw_device(x, generator)
    beta = _uniform(tuple(x.shape[:2]) + (1,) * (x.dim() - 2), log_gamma_range, generator, dev)
    return gamma_power(x, torch.exp(beta).to(x.device))


def z_normalize(x: torch.Tensor) -> torch.Tensor:
    """torchio ``ZNormalization()`` per sample of x [n, ...]: (x - mean) / std over all of the sample's voxels
    and channels, std unbiased (torch.std's default, as torchio). A constant sample (std 0, where torchio
    raises) is only centred. In fp32."""
    v = x.float()
    dims = tuple(range(1, v.dim()))
    mean = v.mean(dim=dims, keepdim=True)
    std = v.std(dim=dims, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return ((v - mean) / std).to(x.dtype)


def pcrlv2_intensity(x: torch.Tensor, noise_std: Sequence[float] = (0.0, 0.25),
                     log_gamma: Sequence[float] = (-0.3, 0.3), shuffle_rate: float = 0.0,
                     normalize: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCRL v2's official intensity chain on network inputs x [n, C, ...] in [0, 1], in the official order:
    noise (``random_noise``), gamma (``random_gamma``), then, where ``shuffle_rate`` > 0 (global views), Models
    Genesis local pixel shuffling with that probability (sslbench's stand-in for torchio RandomSwap), then
    ``z_normalize`` when ``normalize``. (The official RandomBlur before the noise is not applied.)"""
    x = random_gamma(random_noise(x, noise_std, generator), log_gamma, generator)
    if shuffle_rate > 0:
        x = local_pixel_shuffle(x, shuffle_rate, generator)
    return z_normalize(x) if normalize else x


# --------------------------------------------------------------------------------------------------
# Contrast: queue, NCE losses, momentum update
# --------------------------------------------------------------------------------------------------

class MemoryQueue(nn.Module):
    """A fixed-size FIFO of K keys [K, D] with its write pointer, both registered buffers (checkpointed).

    Initialised as the official ``MemoryC2L``: U(-stdv, stdv), stdv = 1 / sqrt(D / 3).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("keys", torch.rand(size, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys [n, D] at ptr, ptr+1, ... (mod K) in one ``index_copy_``; under torch.distributed the keys
        of every rank are all-gathered first (rank order), as the official DDP queues are filled."""
        keys = keys.detach().to(self.keys.dtype)
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            parts = [torch.empty_like(keys) for _ in range(tdist.get_world_size())]
            tdist.all_gather(parts, keys.contiguous())
            keys = torch.cat(parts)
        size = self.keys.shape[0]
        if keys.shape[0] > size:       # more keys than slots: the last K win, as sequential writes would
            keys = keys[-size:]
        ids = torch.remainder(self.ptr + torch.arange(keys.shape[0], device=self.keys.device), size)
        self.keys.index_copy_(0, ids, keys)
        self.ptr.copy_(torch.remainder(self.ptr + keys.shape[0], size))


def contrast_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """[q.k, q.queue_1, ..., q.queue_K]: Tensor[n, 1 + K] for q, k [n, D] (L2-normalised by the caller)."""
    pos = (q * k).sum(-1, keepdim=True)
    return torch.cat([pos, q @ queue.t()], dim=1)


def nce_loss(logits: torch.Tensor, temperature: float, z: torch.Tensor | float, n_data: int) -> torch.Tensor:
    """The official PCRL contrastive loss: noise-contrastive estimation (CMC's ``NCECriterion``, ``MemoryC2L``).

    P = exp(l / T) / Z for the positive (column 0) and the K queue negatives; noise P_n = 1 / n_data, m = K;
    L = -1/n sum_rows [ log(P_pos / (P_pos + m P_n + eps)) + sum_neg log(m P_n / (P_neg + m P_n + eps)) ], eps 1e-5.
    """
    p = torch.exp(logits.float() / temperature) / z
    m = logits.shape[1] - 1
    noise = m / float(n_data)
    eps = 1e-5
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (p[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / logits.shape[0]


def info_nce_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: cross-entropy of softmax(logits / T) with the positive (column 0) as the target."""
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float() / temperature, target)


def pcrlv2_beta(step: int, total: int) -> float:
    """PCRL v2's deep-supervision weight beta = 1/2 (1 + cos(pi t / T)), t clamped to [0, T]."""
    t = min(max(int(step), 0), int(total))
    return 0.5 * (1.0 + math.cos(math.pi * t / max(int(total), 1)))


def symmetric_cosine_loss(pre_a: torch.Tensor, pro_a: torch.Tensor, pre_b: torch.Tensor,
                          pro_b: torch.Tensor) -> torch.Tensor:
    """PCRL v2 / SimSiam: -1/2 [cos(pre_a, sg(pro_b)) + cos(pre_b, sg(pro_a))], mean over the last-but-one axis.

    Inputs [..., n, D]; returns [...] (one value per leading index, e.g. per view pair).
    """
    ab = F.cosine_similarity(pre_a.float(), pro_b.detach().float(), dim=-1).mean(-1)
    ba = F.cosine_similarity(pre_b.float(), pro_a.detach().float(), dim=-1).mean(-1)
    return -0.5 * (ab + ba)


def pcrlv2_objective(pros_g: Sequence[torch.Tensor], preds_g: Sequence[torch.Tensor], pros_l: Sequence[torch.Tensor],
                     preds_l: Sequence[torch.Tensor], out: torch.Tensor, masks: Sequence[torch.Tensor],
                     gt1: torch.Tensor, num_local: int, beta: float
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PCRL v2's loss (the 3D and 2D forms alike): L = MSE(out, gt1) + L_cos(s) + beta MSE(mask_s, gt1) + L_local.

    Per decoder scale: ``pros_g`` / ``preds_g`` [2B, C_s] (global view 1 of every image, then view 2), ``pros_l`` /
    ``preds_l`` [num_local * B, C_s] (local view j of every image, then j + 1); ``out`` and ``masks`` (one per scale)
    restore global view 1, whose target is ``gt1``. s is one random scale (the official ``cos_loss`` index) for
    the global pair and its deep supervision; each of the 2 x num_local (global, local) pairs draws its own scale.
    Returns (loss, logs).
    """
    b = gt1.shape[0]
    dev = gt1.device
    n_s = len(pros_g)
    # global pair: L_cos at every scale [S], one random scale s kept (as the official random index)
    per_scale = torch.stack([symmetric_cosine_loss(pre[:b], pro[:b], pre[b:], pro[b:])
                             for pre, pro in zip(preds_g, pros_g)])
    s = torch.randint(0, n_s, (), device=dev)
    cos_global = per_scale[s]
    # local pairs: [S, 2, L] (each global view against each local view), a random scale per pair
    local_terms = []
    for pre_g, pro_g, pre_l, pro_l in zip(preds_g, pros_g, preds_l, pros_l):
        pg = pre_g.view(2, 1, b, -1)
        qg = pro_g.view(2, 1, b, -1)
        pl = pre_l.view(1, num_local, b, -1)
        ql = pro_l.view(1, num_local, b, -1)
        local_terms.append(symmetric_cosine_loss(pg.expand(2, num_local, b, -1), qg.expand(2, num_local, b, -1),
                                                 pl.expand(2, num_local, b, -1), ql.expand(2, num_local, b, -1)))
    local_all = torch.stack(local_terms)                                             # [S, 2, L]
    pick = torch.randint(0, n_s, (1, 2, num_local), device=dev)
    cos_local = local_all.gather(0, pick).mean()

    rec = F.mse_loss(out, gt1)
    ds_all = torch.stack([F.mse_loss(m, gt1) for m in masks])                       # [S]
    ds = beta * ds_all[s]
    loss = rec + cos_global + ds + cos_local
    logs = {"loss": loss.detach(), "rec": rec.detach(), "cos_global": cos_global.detach(),
            "cos_local": cos_local.detach(), "deep_supervision": ds.detach(), "beta": torch.tensor(beta, device=dev)}
    return loss, logs


# --------------------------------------------------------------------------------------------------
# The fine-tuning network's encoder and decoder, called through its own submodules
# --------------------------------------------------------------------------------------------------

def _family(model_cfg: Mapping[str, Any], method: str) -> str:
    name = str(model_cfg.get("name", "swinunetr"))
    if name not in FAMILIES:
        raise RecipeError(f"model.name: {name!r} is not supported by method {method}; expected one of "
                          f"{', '.join(FAMILIES)}")
    return name


class UNetEncoder(nn.Module):
    """The encoder of a ``build_model`` network under its own attribute names (its keys = fine-tuning keys).

    swinunetr: ``swinViT`` + ``encoder1..4`` + ``encoder10``; unet3d: ``down_tr64..512``; basicunet:
    ``conv_0`` + ``down_1..4``. ``forward`` -> :func:`sslbench.models.backbones.encoder_features` (the bottleneck
    last). ``bottleneck_only``: keep only the modules on the path input -> bottleneck (on swinunetr: swinViT and
    encoder10, without SwinUNETR's skip blocks encoder1..4).
    """

    def __init__(self, net: nn.Module, family: str, bottleneck_only: bool = False):
        super().__init__()
        self.family = family
        self.bottleneck_only = bottleneck_only
        for prefix in TRANSFER_PREFIXES[family][0]:
            name = prefix.rstrip(".")
            if bottleneck_only and family == "swinunetr" and name not in ("swinViT", "encoder10"):
                continue
            setattr(self, name, getattr(net, name))

    @property
    def bottleneck_channels(self) -> int:
        return bottleneck_module(self, self.family)[1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.bottleneck_only and self.family == "swinunetr":
            raise RuntimeError("this encoder keeps only the bottleneck path: call bottleneck()")
        return encoder_features(self, self.family, x)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """Only the path input -> bottleneck (for decoders without skips)."""
        return bottleneck_features(self, self.family, x)


class UNetDecoder(nn.Module):
    """The skip-connected decoder of a ``build_model`` network under its own attribute names.

    swinunetr: ``decoder5..1``; unet3d: ``up_tr256..64``; basicunet: ``upcat_4..1``. ``forward(features)`` -> the
    last decoder map (before the output layer), exactly as the network's own forward.
    """

    def __init__(self, net: nn.Module, family: str):
        super().__init__()
        self.family = family
        for prefix in TRANSFER_PREFIXES[family][1]:
            name = prefix.rstrip(".")
            setattr(self, name, getattr(net, name))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return decoder_output(self, self.family, list(feats))


def _check_size(size: Sequence[int], family: str, key: str, method: str) -> tuple[int, int, int]:
    size = tuple(int(s) for s in size)
    step = SIZE_DIVISOR[family]
    if len(size) != 3 or any(s <= 0 or s % step for s in size):
        raise RecipeError(f"method.params.{key}: {list(size)} for method {method} on {family}; expected three "
                          f"multiples of {step} (the network downsamples {int(math.log2(step))} times)")
    if family == "swinunetr" and max(size) < 64:
        raise RecipeError(f"method.params.{key}: {list(size)} for method {method} on swinunetr; expected a side "
                          f">= 64 (encoder10 instance-normalises the 1/32-scale map, a single voxel otherwise)")
    return size


def _as_range(value: float | tuple[float, float], symmetric: bool) -> tuple[float, float]:
    """A torchio-style range: d -> (-d, d) if ``symmetric`` else (0, d); [low, high] as given."""
    if isinstance(value, tuple):
        return value
    return (-value, value) if symmetric else (0.0, value)


def _range_ok(symmetric: bool) -> Callable[[Any], bool]:
    def ok(value: Any) -> bool:
        lo, hi = _as_range(value, symmetric)
        return math.isfinite(lo) and math.isfinite(hi) and lo <= hi and (symmetric or lo >= 0)
    return ok


#: rules of the params dataclasses below
_SCALE = rule(lambda v: 0 < v[0] <= v[1] <= 1, "[low, high] with 0 < low <= high <= 1 (crop side / volume side)")
_AREA = rule(lambda v: 0 < v[0] <= v[1] <= 1, "[low, high] with 0 < low <= high <= 1 (crop area / image area)")
_STD = rule(_range_ok(False), "d >= 0 (U(0, d)) or [low, high] with 0 <= low <= high")
_SYMMETRIC = rule(_range_ok(True), "d >= 0 (U(-d, d)) or [low, high] with low <= high")
_SIZE3 = positive("a list of 3 positive integers")
_COUNT = positive("an integer >= 1")
_AXES = rule(lambda v: len(v) > 0 and len(set(v)) == len(v) and all(a in (0, 1, 2) for a in v),
             "a list of distinct spatial axes from 0, 1, 2 (e.g. [0], torchio's default, or [0, 1, 2])")


@dataclass(frozen=True)
class PCRLv1Params(MethodParams):
    """PCRL v1's ``method.params`` (methods/pcrlv1.yaml holds the defaults; equal to these, tests check). Official:
    Luchixiang/PCRL pytorch/main.py, pcrl_3d.py, datasets/luna_pcrl_pretask.py, memory_c2l.py."""

    volume_size: tuple[int, int, int] = field(default=(192, 192, 128), metadata=_SIZE3)
    """every corpus volume resized to this; the two views are crops of it (sslbench's; the official reads LUNA16)."""
    view_size: tuple[int, int, int] = field(default=(96, 96, 64), metadata=_SIZE3)
    """each crop resized to this (official 64 x 64 x 32 on its U-Net; SwinUNETR needs multiples of 32, X == Y)."""
    crop_scale: tuple[float, float] = field(default=(0.3, 0.6), metadata=_SCALE)
    """crop side / volume side, uniform per crop (official 32..112 voxels of LUNA16)."""
    min_iou: float = 0.25
    """the two crops of a volume overlap with IoU > min_iou (sslbench's; no official counterpart)."""
    queue_size: int = field(default=16384, metadata=_COUNT)
    """K keys in the memory queue (official MemoryC2L nce_k 16384)."""
    dim: int = field(default=128, metadata=_COUNT)
    """projection / key dimension (official fc2 128)."""
    temperature: float = 0.2
    """T of the contrast (official --moco_t 0.2)."""
    momentum: float = field(default=0.999, metadata=rule(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"))
    """key encoder EMA: param_k = m param_k + (1 - m) param_q (official moment_update 0.999)."""
    contrast: Literal["nce", "infonce"] = "nce"
    """nce: the official NCE estimator (CMC's NCECriterion) | infonce: MoCo's softmax form."""
    nce_n_data: int = field(default=1000, metadata=_COUNT)
    """nce only: noise distribution P_n = 1 / nce_n_data (official: batches per epoch)."""
    target: Literal["corrupted", "clean"] = "corrupted"
    """corrupted: reconstruct T(Genesis-corrupted input), the official loader | clean: T(clean crop)."""
    local_rate: float = field(default=0.5, metadata=probability())
    """Models Genesis local pixel shuffling (official config local_rate 0.5)."""
    paint_rate: float = field(default=0.9, metadata=probability())
    """in/out-painting (official config paint_rate 0.9)."""
    inpaint_rate: float = field(default=0.2, metadata=probability())
    """in-painting share of painting (official 1 - outpaint_rate 0.8)."""
    attention: Attention = "fused"
    """the Swin window-attention kernel the runtime applies (same function; not hashed)."""


@dataclass(frozen=True)
class PCRLv2Params(MethodParams):
    """PCRL v2's ``method.params`` (methods/pcrlv2.yaml holds the defaults; equal to these, tests check). Official:
    RL4M/PCRLv2 src/main.py, src/data.py, src/models/pcrlv2_model_3d.py."""

    volume_size: tuple[int, int, int] = field(default=(192, 192, 128), metadata=_SIZE3)
    """every corpus volume resized to this; global and local views are crops of it."""
    global_size: tuple[int, int, int] = field(default=(96, 96, 64), metadata=_SIZE3)
    """two global views, resized (official 64 x 64 x 32 on its U-Net)."""
    local_size: tuple[int, int, int] = field(default=(64, 64, 32), metadata=_SIZE3)
    """local views, resized (official 16^3; SwinUNETR needs multiples of 32, >= 2 voxels at 1/32 scale)."""
    num_local: int = field(default=6, metadata=_COUNT)
    """local views per volume (official local_num 6)."""
    global_scale: tuple[float, float] = field(default=(0.4, 0.8), metadata=_SCALE)
    """global crop side / volume side (official 64..112 voxels of LUNA16)."""
    local_scale: tuple[float, float] = field(default=(0.1, 0.3), metadata=_SCALE)
    """local crop side / volume side (official 8..32 voxels), origin in the union box."""
    min_iou: float = 0.3
    """the two global crops overlap with IoU > min_iou."""
    schedule_steps: int = field(default=100000, metadata=_COUNT)
    """T of beta = 1/2 (1 + cos(pi step / T)) (official: the epochs; keep equal to pretrain.steps)."""
    augment: Literal["official", "genesis"] = "official"
    """official: torchio's noise -> gamma -> (global) shuffle -> z-norm, as src/data.py | genesis: earlier sslbench."""
    noise_std: float | tuple[float, float] = field(default=(0.0, 0.25), metadata=_STD)
    """Gaussian noise std ~ U(low, high) per view (torchio RandomNoise default std (0, 0.25))."""
    log_gamma: float | tuple[float, float] = field(default=(-0.3, 0.3), metadata=_SYMMETRIC)
    """official only: gamma = exp(U(low, high)) per view (torchio RandomGamma default (-0.3, 0.3))."""
    normalize: Literal["zscore", "none"] = "zscore"
    """zscore: z-normalise each input view (torchio ZNormalization, the official) | none: earlier sslbench."""
    nonlinear_rate: float = field(default=0.9, metadata=probability())
    """genesis only: the Models Genesis Bezier intensity map's probability."""
    local_rate: float = field(default=0.5, metadata=probability())
    """Models Genesis local pixel shuffling on global views (stands in for torchio RandomSwap((8, 4, 4)))."""
    ds_head: Literal["official", "conv1x1"] = "official"
    """deep-supervision heads: official = 3x3 conv -> BatchNorm3d(1) -> sigmoid (LUConv of pcrlv2_model_3d.py)."""
    flip_axes: tuple[int, ...] = field(default=(0,), metadata=_AXES)
    """spatial flips, each listed axis with p 0.5: [0] = torchio RandomFlip() (the official)."""
    attention: Attention = "fused"
    """the Swin window-attention kernel the runtime applies (same function; not hashed)."""


# --------------------------------------------------------------------------------------------------
# PCRL v1
# --------------------------------------------------------------------------------------------------

class ProjectionHead(nn.Module):
    """GAP(bottleneck) -> Linear(C, D) -> ReLU -> Linear(D, D) (the official ``fc1``, ``fc2``; D = 128), pooled
    over every spatial axis (3D volumes or 2D maps)."""

    def __init__(self, channels: int, dim: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(channels, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(bottleneck.mean(dim=tuple(range(2, bottleneck.dim()))))))


class _PCRLv1Contrast(PretrainMethod):
    """What PCRL v1's 3D and 2D forms share: the NCE / InfoNCE contrast against the memory queue, the momentum
    update and the heads' state. A subclass builds ``encoder``, ``head`` (projection), ``gate``, ``out_layer``,
    ``queue``, the ``nce_z`` buffer and the frozen copies ``key_encoder``, ``key_head``, and sets ``contrast``,
    ``temperature``, ``nce_n_data``, ``momentum``."""

    def _contrast_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean NCE over the rows of q, k [n, D] against the queue as it is before this call; then k enqueued.

        In fp32 (autocast off): cosines / T = 0.2 inside exp need more than bf16's 8 mantissa bits.
        """
        with torch.autocast(q.device.type, enabled=False):
            return self._contrast_loss_fp32(q.float(), k.float())

    def _contrast_loss_fp32(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
        # a copy: the enqueue below writes the buffer that the backward of q @ queue^T still needs
        logits = contrast_logits(q, k, self.queue.keys.detach().clone())
        if self.contrast == "infonce":
            loss = info_nce_loss(logits, self.temperature)
        else:
            with torch.no_grad():
                first = torch.exp(logits / self.temperature).mean() * self.nce_n_data
                self.nce_z.copy_(torch.where(self.nce_z < 0, first, self.nce_z))
            # a copy: a later call of this step rewrites the buffer that this loss's backward needs
            loss = nce_loss(logits, self.temperature, self.nce_z.clone(), self.nce_n_data)
        self.queue.enqueue(k)
        return loss

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Momentum update of the key encoder and key head: param_k <- m param_k + (1 - m) param_q."""
        momentum_update(list(self.key_encoder.parameters()) + list(self.key_head.parameters()),
                        list(self.encoder.parameters()) + list(self.head.parameters()), self.momentum)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, module in (("head", self.head), ("gate", self.gate), ("out_layer", self.out_layer),
                               ("key_head", self.key_head)):
            out.update({f"{prefix}.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()})
        return out


class PCRLv1(_PCRLv1Contrast):
    """PCRL v1 on volumes [B, 1, *volume_size] in [0, 1] (see the module docstring for the equations).

    params: volume_size, view_size, crop_scale, min_iou, queue_size (K), dim (128), temperature (T),
    momentum (m), contrast (nce | infonce), nce_n_data, target (corrupted | clean), local_rate, paint_rate,
    inpaint_rate, attention (fused | sdpa | monai).

    The encoder, the skip-connected decoder (``transfers_decoder``) and the output layer are the fine-tuning
    network's own; the momentum encoder is a copy of the encoder + projection head.
    """

    name = "pcrlv1"
    Params = PCRLv1Params
    transfers_decoder = True

    def __init__(self, params: "PCRLv1Params | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.family = _family(self.model_cfg, self.name)
        self.contrast, self.target = p.contrast, p.target
        self.view_size = _check_size(p.view_size, self.family, "view_size", self.name)   # against the backbone
        if self.view_size[0] != self.view_size[1]:
            raise RecipeError(f"method.params.view_size: {list(self.view_size)} for method pcrlv1; expected X == Y "
                              f"(the transformation rotates by 90 degrees in the x-y plane)")
        self.crop_scale, self.min_iou = p.crop_scale, p.min_iou
        self.temperature, self.momentum, self.nce_n_data = p.temperature, p.momentum, p.nce_n_data
        self.local_rate, self.paint_rate, self.inpaint_rate = p.local_rate, p.paint_rate, p.inpaint_rate
        dim = p.dim

        net = build_model(self.model_cfg, in_channels=1, out_channels=1)
        self.encoder = UNetEncoder(net, self.family)
        self.decoder = UNetDecoder(net, self.family)
        self.out_layer = getattr(net, output_layer_name(self.family))
        channels = self.encoder.bottleneck_channels
        self.head = ProjectionHead(channels, dim)
        self.gate = TransformGate(channels)
        self.queue = MemoryQueue(p.queue_size, dim)
        # Z of the NCE estimator: set from the first batch (official MemoryC2L), -1 until then
        self.register_buffer("nce_z", torch.full((), -1.0))
        self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)

    @classmethod
    def input_size(cls, params: Any) -> tuple[int, int, int] | None:
        return cls.typed(params).volume_size

    # ------------------------------------------------------------------------------------------ views
    def make_views(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clean crops c1, c2 [B, 1, *view_size], their Genesis-corrupted inputs x1, x2, transformations."""
        b = volumes.shape[0]
        dev = volumes.device
        box1, box2 = overlapping_box_pairs(b, volumes.shape[2:], self.crop_scale, self.min_iou, device=dev)
        crops = crop_and_resize_3d(volumes, torch.stack([box1, box2], dim=1), self.view_size)
        clean = torch.cat([crops[:, 0], crops[:, 1]])                                   # [2B, 1, ...]
        corrupt = paint(local_pixel_shuffle(clean, self.local_rate), self.paint_rate, self.inpaint_rate)
        flips, k, code = random_spatial_codes(2 * b, device=dev)
        source = clean if self.target == "clean" else corrupt
        return {"c": clean, "x": corrupt, "t": apply_spatial(source, flips, k), "code": code,
                "box1": box1, "box2": box2}

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = volumes.shape[0]
        dev = volumes.device
        v = self.make_views(volumes)
        x1, x2 = v["x"][:b], v["x"][b:]
        c1, c2 = v["c"][:b], v["c"][b:]
        t1, t2 = v["t"][:b], v["t"][b:]
        lam, alpha1, alpha2 = mixup_weight((3,), device=dev).unbind(0)
        perm = torch.randperm(b, device=dev)
        mx1, mx2, mc1, mc2 = (mixup(t, perm, lam) for t in (x1, x2, c1, c2))

        # queries of x1 and of mixed x1 in one encoder call; keys of x2 and mixed x2 from the momentum encoder
        fq = self.encoder(torch.cat([x1, mx1]))
        with torch.no_grad():
            fk = self.key_encoder(torch.cat([x2, mx2]))
            keys = self.key_head(fk[-1]).float()
        q_all = self.head(fq[-1]).float()
        q, mq = q_all[:b], q_all[b:]
        k, mk = keys[:b], keys[b:]
        mk_feat = mixup(k, perm, lam)
        contrast = self._contrast_loss(torch.cat([q, mq, mq]), torch.cat([k, mk, mk_feat]))

        # the four reconstructions in one decoder call: plain (gated), mixed, hybrid (gated), mixed hybrid
        gates = self.gate(v["code"]).to(fq[-1].dtype)
        g1, g2 = gates[:b], gates[b:]
        a1 = alpha1.to(fq[-1].dtype)
        a2 = alpha2.to(fq[-1].dtype)
        dec_in = []
        last = len(fq) - 1
        for i, (q_map, k_map) in enumerate(zip(fq, fk)):
            q_plain, q_mixed = q_map[:b], q_map[b:]
            k_plain, k_mixed = k_map[:b], k_map[b:]
            if i == last:
                q_plain, k_plain = q_plain * g1, k_plain * g2
            dec_in.append(torch.cat([q_plain, q_mixed, a1 * q_plain + (1 - a1) * k_plain,
                                     a2 * q_mixed + (1 - a2) * k_mixed]))
        out = torch.sigmoid(self.out_layer(self.decoder(dec_in))).float()
        targets = torch.cat([t1, mc1, alpha1 * t1 + (1 - alpha1) * t2, alpha2 * mc1 + (1 - alpha2) * mc2]).float()
        rec = F.mse_loss(out, targets)     # = 1/4 sum of the four per-branch MSEs (equal sizes)
        loss = contrast + rec
        logs = {"loss": loss.detach(), "contrast": contrast.detach(), "rec": rec.detach(),
                "lambda": lam.detach(), "pos_cos": F.cosine_similarity(q, k, dim=1).mean().detach()}
        return loss, logs

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder + skip-connected decoder, in the fine-tuning network's key layout."""
        state = {**self.encoder.state_dict(), **self.decoder.state_dict()}
        return {k: v.detach().cpu().clone() for k, v in state.items()}


# --------------------------------------------------------------------------------------------------
# PCRL v2
# --------------------------------------------------------------------------------------------------

DS_HEADS = ("official", "conv1x1")


def deep_supervision_head(channels: int, form: str) -> nn.Module:
    """PCRL v2's per-scale deep-supervision head, a map [n, C, ...] -> [n, 1, ...] in (0, 1).

    ``official``: 3x3x3 conv (padding 1) -> BatchNorm3d(1) -> sigmoid (``LUConv(C, 1, "sigmoid", "bn")`` in
    RL4M/PCRLv2 ``src/models/pcrlv2_model_3d.py``); ``conv1x1``: 1x1x1 conv -> sigmoid (sslbench before 2026-12-03).
    """
    if form == "official":
        return nn.Sequential(nn.Conv3d(channels, 1, kernel_size=3, padding=1), nn.BatchNorm3d(1), nn.Sigmoid())
    if form == "conv1x1":
        return nn.Sequential(nn.Conv3d(channels, 1, kernel_size=1), nn.Sigmoid())
    raise RecipeError(f"method.params.ds_head: '{form}' for method pcrlv2; expected one of {', '.join(DS_HEADS)}")


class SkiplessDecoder(nn.Module):
    """PCRL v2's decoder without skip connections, with per-scale heads.

    Stage s: transposed conv (k 2, stride 2) + MONAI ``UnetBasicBlock`` (two conv-norm-LeakyReLU); then
    pro_s = BatchNorm1d(GAP(x_s)), pre_s = Linear(C, 2C) -> BN -> ReLU -> Linear(2C, C) (the predictor), and the
    deep-supervision map of ``ds_head``: ``official`` = sigmoid(BN_1(conv3x3(x_s))), the official ``LUConv(C, 1,
    "sigmoid", "bn")`` of ``pcrlv2_model_3d.UpTransition``; ``conv1x1`` = sigmoid(conv1x1(x_s)), sslbench's earlier
    head. ``out`` = sigmoid(conv1x1(last stage)).
    """

    def __init__(self, widths: Sequence[int], norm: str, ds_head: str = "official"):
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetBasicBlock, get_conv_layer

        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.pro_norms = nn.ModuleList()
        self.predictors = nn.ModuleList()
        self.ds_heads = nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:]):
            self.ups.append(get_conv_layer(3, cin, cout, kernel_size=2, stride=2, conv_only=True, is_transposed=True))
            self.blocks.append(UnetBasicBlock(3, cout, cout, kernel_size=3, stride=1, norm_name=norm))
            self.pro_norms.append(nn.BatchNorm1d(cout))
            self.predictors.append(nn.Sequential(nn.Linear(cout, 2 * cout), nn.BatchNorm1d(2 * cout),
                                                 nn.ReLU(inplace=True), nn.Linear(2 * cout, cout)))
            self.ds_heads.append(deep_supervision_head(cout, ds_head))
        self.out = nn.Conv3d(widths[-1], 1, kernel_size=1)

    @property
    def num_scales(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, restore_rows: int = 0
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
        """(pros, preds, out, masks): per-scale projections / predictions [n, C_s]; for the first
        ``restore_rows`` samples also the restoration ``out`` and the deep-supervision masks (full size)."""
        pros, preds, maps = [], [], []
        for up, block, norm, predictor in zip(self.ups, self.blocks, self.pro_norms, self.predictors):
            x = block(up(x))
            pro = norm(x.mean(dim=(2, 3, 4)).float())
            pros.append(pro)
            preds.append(predictor(pro))
            maps.append(x)
        if restore_rows <= 0:
            return pros, preds, None, []
        size = maps[-1].shape[2:]
        masks = [F.interpolate(head(m[:restore_rows]).float(), size=size, mode="trilinear")
                 for head, m in zip(self.ds_heads, maps)]
        out = torch.sigmoid(self.out(maps[-1][:restore_rows])).float()
        return pros, preds, out, masks


class PCRLv2(PretrainMethod):
    """PCRL v2 on volumes [B, 1, *volume_size] in [0, 1] (see the module docstring for the equations).

    params: volume_size, global_size, local_size, num_local (6), global_scale, local_scale, min_iou (0.3),
    schedule_steps (T of beta), augment (official | genesis), noise_std ([0, 0.25]), log_gamma ([-0.3, 0.3],
    official only), normalize (zscore | none), nonlinear_rate (genesis only), local_rate, ds_head (official |
    conv1x1), flip_axes ([0]), attention (fused | sdpa | monai).

    The skip-less decoder is not the fine-tuning network's decoder: only the encoder is handed over. On
    swinunetr the path input -> bottleneck is swinViT -> encoder10, so ``swinViT.*`` and ``encoder10.*`` are
    trained and handed over, and ``encoder1..4`` (SwinUNETR's skip blocks, unused without skips) are not.
    On unet3d (basicunet) the whole encoder (down_tr64..512; conv_0, down_1..4) is handed over.
    """

    name = "pcrlv2"
    Params = PCRLv2Params
    transfers_decoder = False

    def __init__(self, params: "PCRLv2Params | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.family = _family(self.model_cfg, self.name)
        # the view sizes against the backbone
        self.global_size = _check_size(p.global_size, self.family, "global_size", self.name)
        self.local_size = _check_size(p.local_size, self.family, "local_size", self.name)
        self.num_local, self.global_scale, self.local_scale = p.num_local, p.global_scale, p.local_scale
        self.min_iou, self.schedule_steps, self.augment = p.min_iou, p.schedule_steps, p.augment
        self.normalize = p.normalize == "zscore"
        self.noise_std, self.log_gamma = _as_range(p.noise_std, False), _as_range(p.log_gamma, True)
        self.nonlinear_rate, self.local_rate = p.nonlinear_rate, p.local_rate
        ds_head = p.ds_head
        self.flip_axes = list(p.flip_axes)

        net = build_model(self.model_cfg, in_channels=1, out_channels=1)
        # only the bottleneck path is trained (see the class docstring)
        self.encoder = UNetEncoder(net, self.family, bottleneck_only=True)
        norm = "instance" if self.family == "swinunetr" else "batch"
        self.decoder = SkiplessDecoder(upsampling_widths(self.model_cfg, self.family), norm, ds_head)

    @classmethod
    def input_size(cls, params: Any) -> tuple[int, int, int] | None:
        return cls.typed(params).volume_size

    def make_views(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        """gt = flipped global crops [2B] (view 1 of every volume, then view 2) in [0, 1], their augmented
        inputs x, and the augmented local views [num_local * B] (local j of every volume, then local j + 1)."""
        b = volumes.shape[0]
        dev = volumes.device
        box1, box2 = overlapping_box_pairs(b, volumes.shape[2:], self.global_scale, self.min_iou, device=dev)
        glob = crop_and_resize_3d(volumes, torch.stack([box1, box2], dim=1), self.global_size)
        gt = glob.transpose(0, 1).reshape(2 * b, *glob.shape[2:])
        boxes_l = local_boxes(box1, box2, self.num_local, volumes.shape[2:], self.local_scale)
        loc = crop_and_resize_3d(volumes, boxes_l, self.local_size)
        loc = loc.transpose(0, 1).reshape(self.num_local * b, *loc.shape[2:])
        gt = self._flip(gt)
        loc = self._flip(loc)
        x = self.augment_views(gt, global_views=True)
        loc = self.augment_views(loc, global_views=False)
        return {"gt": gt, "x": x, "local": loc, "box1": box1, "box2": box2, "local_boxes": boxes_l}

    def augment_views(self, x: torch.Tensor, global_views: bool) -> torch.Tensor:
        """The intensity augmentations of network inputs x [n, 1, ...] (``augment``; see the module docstring).

        official: noise -> gamma -> (global views) local pixel shuffling -> z-normalisation (``normalize``);
        genesis: (global views) local pixel shuffling -> Bezier map -> noise (-> z-normalisation if set).
        """
        shuffle = self.local_rate if global_views else 0.0
        if self.augment == "official":
            return pcrlv2_intensity(x, self.noise_std, self.log_gamma, shuffle, self.normalize)
        if shuffle > 0:
            x = local_pixel_shuffle(x, shuffle)
        x = random_noise(nonlinear_intensity(x, self.nonlinear_rate), self.noise_std)
        return z_normalize(x) if self.normalize else x

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        return flip_axes(x, random_axis_flips(x.shape[0], self.flip_axes, x.device))

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = volumes.shape[0]
        v = self.make_views(volumes)
        pros_g, preds_g, out, masks = self.decoder(self.encoder.bottleneck(v["x"]), restore_rows=b)
        pros_l, preds_l, _, _ = self.decoder(self.encoder.bottleneck(v["local"]))
        return pcrlv2_objective(pros_g, preds_g, pros_l, preds_l, out, masks, v["gt"][:b].float(), self.num_local,
                                pcrlv2_beta(step, self.schedule_steps))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder only (swinViT + encoder10 on swinunetr; the whole encoder on unet3d / basicunet)."""
        return {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"decoder.{k}": v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# The 2D forms (the ChestX-ray14 track, issue 23)
# --------------------------------------------------------------------------------------------------
# Both official repositories hold their 2D (NIH ChestX-ray14) code beside the 3D one, read for these classes:
# PCRL v1: Luchixiang/PCRL ``pytorch/pcrl.py`` (``train_pcrl_2d``, ``train_rep_C2L``), ``pytorch/models/pcrl_model.py``
# (``PCRLModel``, ``ShuffleUnetDecoder``), ``pytorch/datasets/reverse_pcrl_pretask.py`` (``PCRLChestPretask``),
# ``pytorch/data.py`` (``pcrl_chest_pretask``), ``pytorch/memory_c2l.py``, ``pytorch/utils.py``, README (the 2D command);
# PCRL v2: RL4M/PCRLv2 ``src/train_2d.py``, ``src/models/pcrlv2_model.py``, ``src/data.py`` (``pcrlv2_chest_pretask``),
# ``src/datasets/chestDataset.py`` (``Pcrlv2ChestPretask``), ``src/utils.py``, ``src/bash_scripts/run2d.sh``.
# Both train smp's ``Unet('resnet18')``, i.e. PCRL's ResNet-18 U-Net of sslbench/models/unet2d.py.

#: ImageNet's mean and std averaged over the three channels. The official loaders replicate grey to RGB and
#: normalise with ImageNet's per-channel statistics; for one grey channel this is their channel average.
GREY_MEAN, GREY_STD = 0.449, 0.226


def grey_normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - 0.449) / 0.226: the official ``transforms.Normalize(ImageNet mean, std)`` on a grey image in [0, 1]."""
    return (x - GREY_MEAN) / GREY_STD


@dataclass(frozen=True)
class ChestViews(MethodParams):
    """The official chest loaders' view settings (torchvision; Luchixiang/PCRL data.py pcrl_chest_pretask, RL4M/PCRLv2
    src/data.py pcrlv2_chest_pretask), shared by the 2D forms' params."""

    rotate_degrees: float = 10.0
    """RandomRotation(10), degrees either way."""
    p_flip: float = field(default=0.5, metadata=probability())
    """RandomHorizontalFlip."""
    jitter: float = field(default=0.4, metadata=rule(lambda v: 0.0 <= v < 1.0, "a strength in [0, 1)"))
    """ColorJitter(0.4, 0.4, 0.4, 0.4): brightness / contrast (saturation and hue do nothing on grey)."""
    p_blur: float = field(default=0.5, metadata=probability())
    """RandomApply([GaussianBlur([0.1, 2.0])], p=0.5)."""
    blur_sigma: float | tuple[float, float] = field(default=(0.1, 2.0), metadata=_STD)
    """GaussianBlur sigma range, pixels at 224 (scaled with the image side)."""
    cutout_holes: int = 3
    """Cutout(n_holes=3, length=32), global inputs only."""
    cutout_length: float = 0.142857
    """the holes' side as a fraction of the image side (32 px of 224)."""
    cutout_fill: float = GREY_MEAN
    """0 after ImageNet normalisation = the mean colour (the mean of the channel means)."""
    normalize: Literal["imagenet", "none"] = "imagenet"
    """imagenet: (x - 0.449) / 0.226 on inputs and targets (the official Normalize) | none: [0, 1]."""

    def views(self) -> dict[str, Any]:
        """The settings as ``chest_intensity`` and the view geometry read them."""
        return {"degrees": self.rotate_degrees, "p_flip": self.p_flip, "jitter": self.jitter, "p_blur": self.p_blur,
                "blur_sigma": _as_range(self.blur_sigma, False), "holes": self.cutout_holes,
                "length": self.cutout_length, "fill": self.cutout_fill, "normalize": self.normalize == "imagenet"}


@dataclass(frozen=True)
class PCRLv1_2DParams(ChestViews):
    """PCRLv1_2D's ``method.params`` (methods/pcrlv1.yaml ``two_d.params``; official pytorch/pcrl.py train_pcrl_2d)."""

    crop_scale: tuple[float, float] = field(default=(0.2, 1.0), metadata=_AREA)
    """RandomResizedCrop(224, scale=(0.2, 1)): crop area / image area."""
    target: Literal["corrupted", "clean"] = "corrupted"
    """corrupted: plain / hybrid branches restore T(input), the official | clean: T(crop)."""
    queue_size: int = field(default=16384, metadata=_COUNT)
    """nce_k (official MemoryC2L 16384)."""
    dim: int = field(default=128, metadata=_COUNT)
    """low_dim (official 128)."""
    temperature: float = 0.2
    """--moco_t (official 0.2)."""
    momentum: float = field(default=0.999, metadata=rule(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"))
    """moment_update(model, model_ema, 0.999)."""
    contrast: Literal["nce", "infonce"] = "nce"
    """NCECriterion (official) | infonce."""
    nce_n_data: int = field(default=1000, metadata=_COUNT)
    """official: len(train_loader), batches per epoch."""


@dataclass(frozen=True)
class PCRLv2_2DParams(ChestViews):
    """PCRLv2_2D's ``method.params`` (methods/pcrlv2.yaml ``two_d.params``; official src/train_2d.py, run2d.sh)."""

    global_scale: tuple[float, float] = field(default=(0.3, 1.0), metadata=_AREA)
    """RandomResizedCrop(224, scale=(0.3, 1)): crop area / image area."""
    local_scale: tuple[float, float] = field(default=(0.05, 0.3), metadata=_AREA)
    """RandomResizedCrop(96, scale=(0.05, 0.3))."""
    local_size: float = field(default=0.428571, metadata=rule(
        lambda v: 0 < v <= 1, "a fraction of the image side in (0, 1] (96 / 224 = 0.428571 as the official)"))
    """local view side / image side (96 of 224; at least 32 px)."""
    num_local: int = field(default=6, metadata=_COUNT)
    """num_local_view (official 6)."""
    schedule_steps: int = field(default=20000, metadata=_COUNT)
    """T of beta = 1/2 (1 + cos(pi step / T)) (official: 240 epochs; keep equal to pretrain.steps)."""


def chest_intensity(x: torch.Tensor, cfg: Mapping[str, Any], image_side: int, cutout: bool) -> torch.Tensor:
    """The official chest loaders' intensity chain on views [n, 1, h, w] in [0, 1], in their order: Gaussian blur
    (sigma in pixels of a 224 image, scaled to ``image_side``), colour jitter, then Cutout where ``cutout``."""
    x = aug2d.random_blur(x, cfg["p_blur"], cfg["blur_sigma"], image_side)
    x = aug2d.random_jitter(x, cfg["jitter"])
    return aug2d.cutout(x, cfg["holes"], cfg["length"], cfg["fill"]) if cutout else x


class PCRLv1_2D(_PCRLv1Contrast):
    """PCRL v1 on radiographs [B, 1, S, S] in [0, 1] (the official ``train_pcrl_2d``), on the ResNet-18 U-Net.

    Views (``PCRLChestPretask``): two RandomResizedCrops (area ``crop_scale`` (0.2, 1)) per image give the clean crops
    c1, c2 (targets of the mixed branches, ImageNet-normalised); the network inputs x1, x2 are the crops rotated
    (+-10 degrees), flipped, blurred, jittered and cut out (``chest_intensity``); the plain and hybrid targets
    are T(x) (``target: corrupted``; ``clean``: T(c)), T = flips of rows and columns (p 0.5 each) + rot90 by
    k ~ U{0..3}, coded as the 6-d [flip_rows, flip_cols, onehot(k)] that gates the bottleneck (``TransformGate``,
    the official ``aug_fc1`` 6 -> 256 -> ``aug_fc2`` 512). Then the 3D form's equations (module docstring):
    L = 1/3 [NCE(q, k) + NCE(q~, k(x~2)) + NCE(q~, k~)] + 1/4 [four MSE reconstructions], the reconstructions
    being the U-Net head's raw output (smp's segmentation head has no activation, its targets are normalised).

    As the official 2D code (no departure from the 3D form's batching here): the query encoder runs on x1 and on
    x~1 in two calls, the key encoder on x2 and x~2, the decoder once per branch (BatchNorm over B each); the
    three comparisons run one after the other, each against the queue as the previous one left it
    (``MemoryC2L`` enqueues in every call), and the NCE constant Z comes from the first (q, k) call.

    params: crop_scale, rotate_degrees, p_flip, jitter, p_blur, blur_sigma, cutout_holes, cutout_length,
    cutout_fill, normalize (imagenet | none), target (corrupted | clean), queue_size (16384), dim (128),
    temperature (0.2), momentum (0.999), contrast (nce | infonce), nce_n_data. Hands over the U-Net's encoder and
    decoder (``encoder.*``, ``decoder.*``; the ChestX-ray14 classifier loads the encoder).

    Ledger (deviations from the official 2D code; restoring keys where one exists):

    * Inputs: one grey channel; the official replicates it to 3 channels (``convert('RGB')``) and restores 3
      channels. ``normalize: imagenet`` (default) applies the channel-averaged ImageNet normalisation (0.449,
      0.226) to inputs and targets, so the reconstruction loss has the official scale; ``none`` keeps [0, 1].
      No key for 3 channels.
    * Optimiser: the shared AdamW warmup-cosine; official SGD lr 1e-3, momentum 0.9, weight decay 1e-4, cosine
      over 240 epochs, batch 64 (README): ``--set method.pretrain.optimizer=sgd --set method.pretrain.lr=1e-3
      --set method.pretrain.momentum=0.9 --set method.pretrain.weight_decay=1e-4 --set
      method.pretrain.warmup_steps=0 --set method.pretrain.batch_size=64``.
    * NCE noise: ``nce_n_data`` = 1000 (the official: batches per epoch, ``len(train_loader)``, about 1050 on
      60% of ChestX-ray14 at batch 64; it enters through P_n and Z): ``--set method.params.nce_n_data=N``.
    * ShuffleBN is left out: on one process a permutation does not change the key encoder's batch statistics.
    * The momentum copy holds the encoder and projection head only; the official EMA model is a whole
      ``PCRLModel`` whose decoder and gate are never used. No effect on the loss; no key.
    * Views are cut from the preprocessed image (``preprocess.size``), not the original 1024 px PNG; rotation
      resamples bilinearly (torchvision's RandomRotation: nearest); ColorJitter applies brightness then contrast
      (torchvision: a random order of its four factors); the blur is a Gaussian truncated at 3 sigma (PIL's
      GaussianBlur: an extended box blur); RandomResizedCrop clips its box instead of falling back to a centre
      crop (sslbench/methods/parts/aug2d.py). No keys.
    * Precision: the protocol's bf16 autocast on CUDA with the contrast in fp32; the official apex O1.
    """

    name = "pcrlv1"
    Params = PCRLv1_2DParams
    transfers_decoder = True

    def __init__(self, params: "PCRLv1_2DParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.contrast, self.target, self.crop_scale, self.views = p.contrast, p.target, p.crop_scale, p.views()
        self.temperature, self.momentum, self.nce_n_data = p.temperature, p.momentum, p.nce_n_data
        dim = p.dim

        net = UNet2D(self.model_cfg, in_channels=1, out_channels=1)
        self.encoder, self.decoder, self.out_layer = net.encoder, net.decoder, net.head
        channels = net.widths[-1]
        self.head = ProjectionHead(channels, dim)
        self.gate = TransformGate(channels, hidden=256, code_dim=6, spatial_dims=2)
        self.queue = MemoryQueue(p.queue_size, dim)
        self.register_buffer("nce_z", torch.full((), -1.0))
        self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)

    @staticmethod
    def pixels_per_image(params: Mapping[str, Any], size: tuple[int, int]) -> float:
        """Encoder input pixels per image and step (feasibility): x1, x~1 (query), x2, x~2 (key)."""
        return 4 * size[0] * size[1]

    def make_views(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clean crops c [2B] (view 1 of every image, then view 2), inputs x, targets t = T(x) (or T(c)), codes."""
        n = 2 * images.shape[0]
        v = self.views
        clean, moved = aug2d.random_crop_then_rotation(torch.cat([images, images]), self.crop_scale, v["degrees"],
                                                       v["p_flip"])
        x = chest_intensity(moved, v, images.shape[-1], cutout=True)
        flips, k, code = random_spatial_codes(n, device=images.device, axes=2)
        t = apply_spatial(clean if self.target == "clean" else x, flips, k)
        if v["normalize"]:
            clean, x, t = grey_normalize(clean), grey_normalize(x), grey_normalize(t)
        return {"c": clean, "x": x, "t": t, "code": code}

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = volumes
        b, dev = images.shape[0], images.device
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"pcrlv1: images {list(images.shape[2:])} must be square (the rot90 of T)")
        with torch.autocast(dev.type, enabled=False):     # views in fp32 under the protocol's bf16
            v = self.make_views(images)
        x1, x2, c1, c2, t1, t2 = (t for key in ("x", "c", "t") for t in (v[key][:b], v[key][b:]))
        lam, alpha1, alpha2 = mixup_weight((3,), device=dev).unbind(0)
        perm = torch.randperm(b, device=dev)
        mx1, mx2, mc1, mc2 = (mixup(t, perm, lam) for t in (x1, x2, c1, c2))

        fq, fmq = self.encoder(x1), self.encoder(mx1)
        with torch.no_grad():
            fk, fmk = self.key_encoder(x2), self.key_encoder(mx2)
            k, mk = self.key_head(fk[-1]).float(), self.key_head(fmk[-1]).float()
        q, mq = self.head(fq[-1]).float(), self.head(fmq[-1]).float()
        contrast = (self._contrast_loss(q, k) + self._contrast_loss(mq, mk)
                    + self._contrast_loss(mq, mixup(k, perm, lam))) / 3

        gates = self.gate(v["code"]).to(fq[-1].dtype)
        a1, a2 = alpha1.to(fq[-1].dtype), alpha2.to(fq[-1].dtype)
        gated = fq[-1] * gates[:b]
        branches = [[*fq[:-1], gated],                                                  # plain (gated)
                    fmq,                                                                # mixed
                    [a1 * fq_ + (1 - a1) * fk_ for fq_, fk_ in zip(fq[:-1], fk[:-1])]
                    + [a1 * gated + (1 - a1) * fk[-1] * gates[b:]],                     # hybrid (gated)
                    [a2 * fq_ + (1 - a2) * fk_ for fq_, fk_ in zip(fmq, fmk)]]          # mixed hybrid
        targets = [t1, mc1, alpha1 * t1 + (1 - alpha1) * t2, alpha2 * mc1 + (1 - alpha2) * mc2]
        rec = sum(F.mse_loss(self.out_layer(self.decoder(f)).float(), t.float())
                  for f, t in zip(branches, targets)) / 4
        loss = contrast + rec
        logs = {"loss": loss.detach(), "contrast": contrast.detach(), "rec": rec.detach(), "lambda": lam.detach(),
                "pos_cos": F.cosine_similarity(q, k, dim=1).mean().detach()}
        return loss, logs

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The U-Net's encoder and decoder in its key layout (``encoder.*``, ``decoder.*``)."""
        state = {**{f"encoder.{k}": v for k, v in self.encoder.state_dict().items()},
                 **{f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}}
        return {k: v.detach().cpu().clone() for k, v in state.items()}


class SkiplessDecoder2D(nn.Module):
    """PCRL v2's 2D decoder (the official ``PCRLv2Decoder`` / ``DecoderBlock`` of ``src/models/pcrlv2_model.py``).

    Five stages over the encoder's last map, WITHOUT skip connections, widths ``decoder_channels`` (256 .. 16):
    x_s = two conv3x3-BN-ReLU(nearest x2 upsampling of x_{s+1}); pro_s = BatchNorm1d(GAP(x_s)); pre_s =
    Linear(C, 2C) -> BN -> ReLU -> Linear(2C, C); the deep-supervision map conv3x3(C, C) -> BN -> ReLU ->
    conv1x1(C, 1), bilinearly upsampled to the input size (official: 3 output channels); ``out`` = the U-Net's
    3x3 segmentation head on the last stage (raw: smp's head has no activation).
    """

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int]):
        super().__init__()
        ins = [int(encoder_channels[-1])] + [int(c) for c in decoder_channels[:-1]]
        self.blocks = nn.ModuleList()
        self.pro_norms = nn.ModuleList()
        self.predictors = nn.ModuleList()
        self.ds_heads = nn.ModuleList()
        for cin, cout in zip(ins, (int(c) for c in decoder_channels)):
            self.blocks.append(nn.Sequential(ConvBNReLU(cin, cout), ConvBNReLU(cout, cout)))
            self.pro_norms.append(nn.BatchNorm1d(cout))
            self.predictors.append(nn.Sequential(nn.Linear(cout, 2 * cout), nn.BatchNorm1d(2 * cout),
                                                 nn.ReLU(inplace=True), nn.Linear(2 * cout, cout)))
            self.ds_heads.append(nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout),
                                               nn.ReLU(inplace=True), nn.Conv2d(cout, 1, 1)))
        self.out = nn.Conv2d(int(decoder_channels[-1]), 1, 3, padding=1)

    def forward(self, x: torch.Tensor, restore: bool = False
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
        """(pros, preds, out, masks): per-scale projections / predictions [n, C_s]; with ``restore`` also the
        restoration ``out`` and the deep-supervision masks (input size)."""
        pros, preds, maps = [], [], []
        for block, norm, predictor in zip(self.blocks, self.pro_norms, self.predictors):
            x = block(F.interpolate(x, scale_factor=2, mode="nearest"))
            pro = norm(x.mean(dim=(2, 3)).float())
            pros.append(pro)
            preds.append(predictor(pro))
            maps.append(x)
        if not restore:
            return pros, preds, None, []
        size = maps[-1].shape[2:]
        masks = [F.interpolate(head(m).float(), size=size, mode="bilinear") for head, m in zip(self.ds_heads, maps)]
        return pros, preds, self.out(maps[-1]).float(), masks


class PCRLv2_2D(PretrainMethod):
    """PCRL v2 on radiographs [B, 1, H, W] in [0, 1] (the official ``train_pcrlv2``), on the ResNet-18 U-Net encoder.

    Views (``Pcrlv2ChestPretask``): two global views per image, RandomResizedCrop (area ``global_scale`` (0.3, 1))
    at the image size, rotated (+-10 degrees) and flipped: gt = that view (ImageNet-normalised); the input adds
    blur, jitter and Cutout (``chest_intensity``). ``num_local`` (6) local views: RandomResizedCrop (area
    ``local_scale`` (0.05, 0.3)) at ``local_size`` x the image side (96 of 224), rotated, flipped, blurred and
    jittered (no Cutout). The encoder and the skip-less decoder (``SkiplessDecoder2D``) run once on global view 1,
    once on global view 2 and once on all local views (BatchNorm over B, B, num_local x B, as the official calls);
    L = MSE(out(v1), gt1) + L_cos(s) + beta MSE(mask_s(v1), gt1) + L_local (``pcrlv2_objective``), beta =
    1/2 (1 + cos(pi t / T)), T = ``schedule_steps``.

    params: global_scale, local_scale, local_size (fraction of the image side), num_local, rotate_degrees, p_flip,
    jitter, p_blur, blur_sigma, cutout_holes, cutout_length, cutout_fill, normalize (imagenet | none),
    schedule_steps. Hands over the encoder only (``encoder.*``; the official saves ``model.encoder``).

    Ledger (deviations from the official 2D code; restoring keys where one exists):

    * Inputs: one grey channel; the official replicates it to 3 channels and restores 3 channels (restoration
      and deep-supervision heads). ``normalize: imagenet`` (default) normalises inputs and targets with the
      channel-averaged ImageNet statistics (0.449, 0.226), so the MSE terms have the official scale; ``none`` keeps
      [0, 1]. No key for 3 channels.
    * Encoder initialisation: the official ``smp.Unet('resnet18')`` loads ImageNet weights (smp's default); here
      random, as every Table 4 row: ``--set model.pretrained_2d=imagenet``.
    * Optimiser: the shared AdamW warmup-cosine; official SGD lr 1e-2, momentum 0.9, weight decay 1e-4, cosine over
      240 epochs, batch 64 (``run2d.sh``): ``--set method.pretrain.optimizer=sgd --set method.pretrain.lr=1e-2 --set
      method.pretrain.momentum=0.9 --set method.pretrain.weight_decay=1e-4 --set method.pretrain.warmup_steps=0
      --set method.pretrain.batch_size=64``; beta's T is ``schedule_steps`` steps (official: 240 epochs).
    * Local views: ``local_size`` x the image side (96 px at 224, at least 32 px), cut from the preprocessed image
      (official: 96 px cut from the original 1024 px PNG); the deep-supervision masks are computed for global
      view 1 only (the official computes them in every call and uses view 1's: the same loss; only those heads'
      BatchNorm running statistics, never handed over, differ). No keys.
    * The view notes of ``PCRLv1_2D`` (bilinear rotation, jitter order, truncated Gaussian blur, clipped crop box)
      and its precision note apply. No keys.
    """

    name = "pcrlv2"
    Params = PCRLv2_2DParams
    transfers_decoder = False

    def __init__(self, params: "PCRLv2_2DParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.global_scale, self.local_scale, self.local_size = p.global_scale, p.local_scale, p.local_size
        self.num_local, self.schedule_steps, self.views = p.num_local, p.schedule_steps, p.views()
        self.encoder = build_encoder(self.model_cfg)
        self.decoder = SkiplessDecoder2D(self.encoder.feature_info.channels(),
                                         unet2d_config(self.model_cfg)["decoder_channels"])

    @classmethod
    def local_side(cls, params: "PCRLv2_2DParams | Mapping[str, Any]", side: int) -> int:
        """Pixels of a local view's side for images of ``side`` pixels (at least 32: one pixel at 1/32 scale)."""
        return max(32, round(cls.typed(params).local_size * side))

    @classmethod
    def pixels_per_image(cls, params: "PCRLv2_2DParams | Mapping[str, Any]", size: tuple[int, int]) -> float:
        """Encoder input pixels per image and step (feasibility): two global views and the local views."""
        p = cls.typed(params)
        side = cls.local_side(p, size[-1])
        return 2 * size[0] * size[1] + p.num_local * side * side

    def make_views(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """gt [2B] (global view 1 of every image, then view 2), their inputs x, and the local views
        [num_local * B] (local j of every image, then local j + 1)."""
        v, side = self.views, images.shape[-1]
        _, gt = aug2d.random_crop_then_rotation(torch.cat([images, images]), self.global_scale, v["degrees"],
                                                v["p_flip"])
        x = chest_intensity(gt, v, side, cutout=True)
        ls = self.local_side(self.p, side)
        _, loc = aug2d.random_crop_then_rotation(images.repeat(self.num_local, 1, 1, 1), self.local_scale,
                                                 v["degrees"], v["p_flip"], size=(ls, ls))
        loc = chest_intensity(loc, v, side, cutout=False)
        if v["normalize"]:
            gt, x, loc = grey_normalize(gt), grey_normalize(x), grey_normalize(loc)
        return {"gt": gt, "x": x, "local": loc}

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = volumes
        b = images.shape[0]
        with torch.autocast(images.device.type, enabled=False):   # views in fp32 under the protocol's bf16
            v = self.make_views(images)
        pros1, preds1, out, masks = self.decoder(self.encoder(v["x"][:b])[-1], restore=True)
        pros2, preds2, _, _ = self.decoder(self.encoder(v["x"][b:])[-1])
        pros_l, preds_l, _, _ = self.decoder(self.encoder(v["local"])[-1])
        pros_g = [torch.cat(pair) for pair in zip(pros1, pros2)]
        preds_g = [torch.cat(pair) for pair in zip(preds1, preds2)]
        return pcrlv2_objective(pros_g, preds_g, pros_l, preds_l, out, masks, v["gt"][:b].float(), self.num_local,
                                pcrlv2_beta(step, self.schedule_steps))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The ResNet-18 encoder (``encoder.*``)."""
        return {f"encoder.{k}": v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"decoder.{k}": v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()}
