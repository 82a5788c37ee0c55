"""SwinUNETR self-supervised pre-training: rotation + contrastive coding + masked-volume inpainting.

Tang, Yang, Nath, Xu, Landman, Hatamizadeh, Li, Roth. "Self-Supervised Pre-Training of Swin Transformers
for 3D Medical Image Analysis", CVPR 2022 (code: github.com/Project-MONAI/research-contributions,
SwinUNETR/Pretrain). The equations and operations implemented here, after the official code:

* views: ``sw_batch_size`` random crops of ``crop_size`` per volume (MONAI RandSpatialCropSamples,
  random_size=False: start ~ U{0 .. W - c} per axis, no resize)                     -> ``random_crops``
* rotation (paper Sec. 3.2, official ``rot_rand``): each crop of each of the two views is rotated by
  k * 90 degrees, k ~ U{0, 1, 2, 3}, in the plane of its last two axes (the official ``x.rot90(k, (2, 3))``
  of a [C, H, W, D] crop), and k is the rotation label                             -> ``random_rotation``
* cutout and mixing (official ``aug_rand`` / ``patch_rand_drop``): boxes with sides in
  [tolerance, max_block) x crop side are drawn until their summed volume reaches a target
  U(0, max_drop) x crop volume (0.3, 0.25, 0.05); the first pass fills them with noise, a second pass (when
  the crop's random partner is another crop) pastes the partner's voxels into new boxes. The official
  ``main.py`` calls ``aug_rand`` on x1 and on x2 separately, so a crop's partner ~ U over the crops of ITS
  OWN view (``paste_partners: view``)                                 -> ``cutout``, ``paste_partners``
* heads on the last Swin stage hs4 (16 x feature_size channels, 768 at feature size 48), as the official
  ``SSLHead``: rotation Linear(16fs, 4) on hs4's first token, contrastive Linear(16fs, 512) on its second
  token, reconstruction = 5 x (Conv3d 3^3, InstanceNorm3d, LeakyReLU, trilinear upsample x2) + Conv3d 1^3
  back to the crop size (``ReconstructionHead``), whose target is the rotated crop WITHOUT cutout
* loss (paper Eq. 4, official ``Loss``): L = a1 CE(rotation) + a2 NT-Xent(tau = 0.5) + a3 L1(reconstruction),
  a1 = a2 = a3 = 1                                                        -> ``nt_xent`` and ``forward``
  NT-Xent (paper Eq. 2, official ``Contrast``): with z the 2N l2-normalised embeddings of both views,
  l_i = -log( exp(s(i, pos(i)) / tau) / sum_{k != i} exp(s(i, k) / tau) ), L = mean_i l_i. Under
  torch.distributed the embeddings of every process are all-gathered WITH gradient (``dist.py``), so the
  negatives span the global batch and the loss equals the single-process loss on the concatenated batch
  (MONAI's ContrastiveLoss and the official code use only the local batch).

Batched on the volumes' device: crops by one advanced-indexing gather, rotations by ``torch.where`` over
the four k, the cutout boxes of every crop drawn as one tensor and turned into masks with a
summed-area (difference array + cumsum) union, ONE backbone call for both views.

Where this differs from the official code, and why (each item names the key, if any, that gives the official
behaviour):

* the cutout draws a fixed number of boxes per crop (enough to reach the largest target even with the
  smallest boxes) and keeps those whose preceding boxes have not yet reached the target: the same
  stopping rule as the official ``while`` loop, without a data-dependent loop. The tolerance side is at
  least 1 voxel (``int(0.05 * 32) = 1`` already; below 20 voxels the official gives 0-sided boxes).
  No key (the same distribution of boxes wherever the official's are non-empty).
* noise boxes are filled with N(0, 1) noise min-max scaled to [0, 1] over the whole crop (the official
  scales each box's noise by that box's own min and max); pasted boxes read the partner after its noise
  pass (the official loop reads the partner's current state: already cut out for earlier crops of the
  view, not yet for later ones). Why: every crop's passes run at once, batched. No key.
* paste partners: official by default (``paste_partners: view``, within each view, above).
  ``paste_partners: batch`` restores this module's earlier form: one partner draw over all 2N crops of both
  views (a crop of view 1 could paste from view 2, even from its own crop's other rotation, and pasted
  nothing with probability 1/2N instead of 1/N). Kept for comparison with runs made before.
* only ``swinViT`` is trained (the official ``SSLHead`` has no other encoder block); SwinUNETR's
  encoder1..4 and encoder10 are handed over UNTOUCHED (their random initialisation, frozen), so the
  handover carries every tensor that fine-tuning loads. No key.
* HU window: the official pipeline scales [-1000, 1000] -> [0, 1]; here the corpus recipe's preprocessing
  applies (the same for every method of the benchmark). No key here (the corpus recipe's ``preprocess``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError
from ..models.backbones import build_swinunetr
from . import dist
from .base import PretrainMethod
from .params import Attention, MethodParams, positive, refuse, rule
from .parts.pooled_swin import PooledSwinEncoder

#: official ``patch_rand_drop`` defaults: target fraction U(0, max_drop), box sides in
#: [tolerance, max_block) of the crop side
MAX_DROP = 0.3
MAX_BLOCK = 0.25
TOLERANCE = 0.05


# --------------------------------------------------------------------------------------------------
# Views: crops, rotations, cutout
# --------------------------------------------------------------------------------------------------

def random_crops(volumes: torch.Tensor, k: int, crop: Sequence[int]) -> torch.Tensor:
    """k random crops of size ``crop`` per volume, no resize: Tensor[B * k, C, *crop] (volume-major).

    Start ~ U{0 .. W - c} per axis (MONAI RandSpatialCropSamples with random_size=False). One gather by
    advanced indexing for every crop of the batch.
    """
    b, c = volumes.shape[:2]
    size = volumes.shape[2:]
    if any(int(cs) > int(s) for cs, s in zip(crop, size)):
        raise ValueError(f"crop {tuple(crop)} exceeds the volume size {tuple(size)}")
    dev = volumes.device
    starts = [torch.randint(0, int(s) - int(cs) + 1, (b * k,), device=dev) for s, cs in zip(size, crop)]
    idx = [st.view(-1, 1, 1, 1) + torch.arange(int(cs), device=dev).view(shape)
           for st, cs, shape in zip(starts, crop, ((1, -1, 1, 1), (1, 1, -1, 1), (1, 1, 1, -1)))]
    vol_idx = torch.arange(b, device=dev).repeat_interleave(k).view(-1, 1, 1, 1)
    out = volumes.movedim(1, -1)[vol_idx, idx[0], idx[1], idx[2]]          # [B*k, cx, cy, cz, C]
    return out.movedim(-1, 1).contiguous()


def rotate_views(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate crop i of x [N, C, X, Y, Z] by k[i] * 90 degrees in its (Y, Z) plane (needs Y == Z).

    The official ``x.rot90(k, (2, 3))`` of one [C, H, W, D] crop; batched as a torch.where per k.
    """
    view = (-1,) + (1,) * (x.dim() - 1)
    out = x
    for kk in (1, 2, 3):
        out = torch.where((k == kk).view(view), x.rot90(kk, dims=(3, 4)), out)
    return out


def random_rotation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated crops, rotation labels k ~ U{0, 1, 2, 3} [N]) of x [N, C, X, Y, Z] (official ``rot_rand``)."""
    k = torch.randint(0, 4, (x.shape[0],), device=x.device)
    return rotate_views(x, k), k


def cutout_geometry(size: Sequence[int], max_drop: float = MAX_DROP, max_block: float = MAX_BLOCK,
                    tolerance: float = TOLERANCE) -> tuple[list[int], list[int], int]:
    """(smallest box side, largest box side + 1, number of boxes to draw) per crop of ``size``.

    Sides per axis are ``max(1, int(tolerance * s))`` .. ``int(max_block * s) - 1`` (the official
    ``randint(tolr, mx_blk)``); the number of boxes is enough to reach the largest target
    ``max_drop * volume`` even if every box had the smallest volume.
    """
    lo = [max(1, int(tolerance * int(s))) for s in size]
    hi = [max(l + 1, int(max_block * int(s))) for l, s in zip(lo, size)]
    volume = math.prod(int(s) for s in size)
    n_boxes = int(math.ceil(max_drop * volume / math.prod(lo))) + 1
    return lo, hi, n_boxes


def cutout_boxes(n: int, size: Sequence[int], max_drop: float = MAX_DROP, max_block: float = MAX_BLOCK,
                 tolerance: float = TOLERANCE, device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``patch_rand_drop`` boxes of n crops of ``size``: (boxes, keep, target).

    boxes [n, M, 6] int64 (x0, y0, z0, x1, y1, z1), half-open, clipped to the crop: start
    ~ U{0 .. s - tol - 1}, side ~ U{tol .. max_block * s - 1}. target [n] = U(0, max_drop) * volume.
    keep [n, M]: box j is used iff the summed volume of boxes 0 .. j-1 is below the target (the
    official ``while total_pix < n_drop_pix`` loop), so kept volume - last box < target <= kept volume.
    """
    lo, hi, m = cutout_geometry(size, max_drop, max_block, tolerance)
    starts, ends = [], []
    for s, l, h in zip(size, lo, hi):
        start = torch.randint(0, int(s) - l, (n, m), device=device)
        side = torch.randint(l, h, (n, m), device=device)
        starts.append(start)
        ends.append(torch.clamp(start + side, max=int(s)))
    boxes = torch.stack(starts + ends, dim=-1)
    volume = math.prod(int(s) for s in size)
    target = torch.rand(n, device=device) * (max_drop * volume)
    box_volume = ((boxes[..., 3:] - boxes[..., :3]).prod(dim=-1)).to(torch.float64)
    before = box_volume.cumsum(dim=-1) - box_volume
    keep = before < target.to(torch.float64).unsqueeze(-1)
    return boxes, keep, target


def union_of_boxes(boxes: torch.Tensor, keep: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Boolean mask [n, X, Y, Z] of the voxels inside any kept box.

    A 3D difference array: +-1 at the 8 corners of every kept box (sign (-1)^(number of upper corners)),
    one scatter_add, then a cumulative sum along each axis gives how many boxes cover each voxel.
    """
    n, m = keep.shape
    sx, sy, sz = (int(s) for s in size)
    diff = torch.zeros(n, (sx + 1) * (sy + 1) * (sz + 1), dtype=torch.int32, device=boxes.device)
    weight = keep.to(torch.int32)
    for cx in (0, 1):
        for cy in (0, 1):
            for cz in (0, 1):
                x, y, z = boxes[..., 3 * cx], boxes[..., 1 + 3 * cy], boxes[..., 2 + 3 * cz]
                sign = -1 if (cx + cy + cz) % 2 else 1
                diff.scatter_add_(1, (x * (sy + 1) + y) * (sz + 1) + z, sign * weight)
    count = diff.view(n, sx + 1, sy + 1, sz + 1)
    for axis in (1, 2, 3):
        count = count.cumsum(dim=axis, dtype=torch.int32)
    return count[:, :sx, :sy, :sz] > 0


def paste_partners(n: int, groups: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """Each crop's paste partner [n] (int64): crops are ``groups`` consecutive blocks of n // groups (the
    views), and crop i draws its partner ~ U over the crops of its own block (the official
    ``randint(0, img_n)`` inside ``aug_rand`` of one view). groups = 1: one draw over all n crops."""
    if groups < 1 or n % groups:
        raise ValueError(f"{n} crops do not split into {groups} equal views")
    size = n // groups
    first = torch.arange(n, device=device) // size * size
    return first + torch.randint(0, size, (n,), device=device)


def cutout(x: torch.Tensor, max_drop: float = MAX_DROP, max_block: float = MAX_BLOCK,
           tolerance: float = TOLERANCE, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``aug_rand`` on crops x [N, C, X, Y, Z]: (augmented, noise mask, paste mask).

    Pass 1: the boxes of ``cutout_boxes`` are filled with N(0, 1) noise min-max scaled to [0, 1] per crop.
    Pass 2: each crop draws a partner (``paste_partners``: within its block when x holds ``groups`` views
    one after the other); if the partner is another crop, new boxes are filled with the partner's voxels
    (after the partner's pass 1). Each pass changes at most max_drop + max_block^3 of a crop's voxels.
    Masks are [N, X, Y, Z] booleans.
    """
    n = x.shape[0]
    size = x.shape[2:]
    noise_mask = union_of_boxes(*cutout_boxes(n, size, max_drop, max_block, tolerance, x.device)[:2], size)
    noise = torch.randn_like(x)
    lo = noise.amin(dim=(1, 2, 3, 4), keepdim=True)
    hi = noise.amax(dim=(1, 2, 3, 4), keepdim=True)
    noise = (noise - lo) / (hi - lo)
    out = torch.where(noise_mask.unsqueeze(1), noise, x)
    partner = paste_partners(n, groups, x.device)
    paste_mask = union_of_boxes(*cutout_boxes(n, size, max_drop, max_block, tolerance, x.device)[:2], size)
    paste_mask = paste_mask & (partner != torch.arange(n, device=x.device)).view(-1, 1, 1, 1)
    out = torch.where(paste_mask.unsqueeze(1), out[partner], out)
    return out, noise_mask, paste_mask


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------

def nt_xent(z_i: torch.Tensor, z_j: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """NT-Xent (SimCLR; Tang et al. Eq. 2; the official ``Contrast``) of paired embeddings z_i, z_j [N, D].

    With z = normalise(cat(z_i, z_j)) [2N, D] and s = z z^T: l_a = -log(exp(s_{a,pos(a)} / tau) /
    sum_{k != a} exp(s_{a,k} / tau)), loss = mean over the 2N anchors. ``gather``: under torch.distributed,
    z_i and z_j of every process are all-gathered with gradient first (rank order), so every process
    returns the loss of the global batch.
    """
    if gather:
        z_i, z_j = dist.all_gather_with_grad(z_i), dist.all_gather_with_grad(z_j)
    n = z_i.shape[0]
    z = F.normalize(torch.cat([z_i, z_j]).float(), dim=1)
    logits = (z @ z.t()) / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.arange(2 * n, device=z.device).roll(n)            # anchor a's positive: a +- n
    return F.cross_entropy(logits, positives)


# --------------------------------------------------------------------------------------------------
# Heads and the method
# --------------------------------------------------------------------------------------------------

class ReconstructionHead(nn.Sequential):
    """The official ``SSLHead`` 'vae' upsampler: 5 x (Conv3d 3^3, InstanceNorm3d, LeakyReLU, upsample x2),
    then Conv3d 1^3 to ``out_channels``; channels dim -> dim/2 -> dim/4 -> dim/8 -> dim/16 -> dim/16."""

    def __init__(self, dim: int, out_channels: int = 1):
        widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv3d(c_in, c_out, kernel_size=3, padding=1), nn.InstanceNorm3d(c_out), nn.LeakyReLU(),
                       nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
        layers.append(nn.Conv3d(widths[-1], out_channels, kernel_size=1))
        super().__init__(*layers)


@dataclass(frozen=True)
class SwinUNETRSSLParams(MethodParams):
    """SwinUNETR SSL's ``method.params`` (methods/swinunetr-ssl.yaml holds the defaults; equal to these, tests
    check). Official: Project-MONAI/research-contributions SwinUNETR/Pretrain main.py, losses/loss.py, utils/ops.py."""

    resize: tuple[int, int, int] = field(default=(160, 160, 128), metadata=positive("a list of 3 positive integers"))
    """every corpus volume resized to this before batching (official: random crops of the resampled volume)."""
    crop_size: int | tuple[int, int, int] = field(default=(96, 96, 96), metadata=positive(
        "a positive integer or a list of 3"))
    """random crops, no resize: [X, Y, Z] or an int (official --roi_x/y/z 96); Y == Z (rotations turn Y-Z)."""
    sw_batch_size: int = field(default=2, metadata=positive("a positive integer"))
    """crops per volume (official --sw_batch_size 2)."""
    temperature: float = 0.5
    """NT-Xent temperature (official losses/loss.py Contrast temperature 0.5)."""
    contrastive_dim: int = field(default=512, metadata=positive("a positive integer"))
    """contrastive head output (official ssl_head.py contrastive_head 512)."""
    rotation_weight: float = 1.0
    """L = a1 CE(rotation) + a2 NT-Xent + a3 L1(reconstruction): a1 (official alpha1 1.0)."""
    contrastive_weight: float = 1.0
    """a2 (official alpha2 1.0)."""
    reconstruction_weight: float = 1.0
    """a3 (official alpha3 1.0)."""
    max_drop: float = MAX_DROP
    """cutout: target U(0, max_drop) of the crop per pass (official patch_rand_drop max_drop 0.3)."""
    max_block: float = MAX_BLOCK
    """box sides < max_block x crop side (official max_block_sz 0.25)."""
    tolerance: float = TOLERANCE
    """box sides >= tolerance x crop side (official tolr 0.05)."""
    paste_partners: Literal["view", "batch"] = "view"
    """view: a crop pastes from a crop of its own view (official aug_rand on x1, x2) | batch: earlier sslbench."""
    attention: Attention = "fused"
    """the Swin window-attention kernel the runtime applies (same function; not hashed)."""

    def crop(self) -> tuple[int, int, int]:
        """``crop_size`` as three sides (an int means a cube)."""
        c = self.crop_size
        return (c, c, c) if isinstance(c, int) else c

    def check(self) -> None:
        crop = self.crop()
        if any(c % 32 for c in crop) or math.prod(c // 32 for c in crop) < 2:
            refuse("crop_size", list(crop), "multiples of 32 with >= 2 voxels at 1/32 scale (e.g. [64, 32, 32] or 96)")
        if crop[1] != crop[2]:
            refuse("crop_size", list(crop), "equal Y and Z sides (crops are rotated in the Y-Z plane)")
        if any(c > s for c, s in zip(crop, self.resize)):
            refuse("crop_size", list(crop), f"sides within the volume (it exceeds method.params.resize "
                                            f"{list(self.resize)})")


class SwinUNETRSSL(PretrainMethod):
    """SwinUNETR self-supervised pre-training on volumes [B, 1, X, Y, Z] in [0, 1] resized to ``resize``.

    params: :class:`SwinUNETRSSLParams` (typed, checked; a line per field on the official code it follows).
    model.name must be swinunetr.
    """

    name = "swinunetr-ssl"
    Params = SwinUNETRSSLParams
    transfers_decoder = False

    def __init__(self, params: "SwinUNETRSSLParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        model_name = str(self.model_cfg.get("name", "swinunetr"))
        if model_name != "swinunetr":
            raise RecipeError(f"model.name: {model_name!r} for method swinunetr-ssl; expected swinunetr "
                              f"(its heads sit on the last Swin stage)")
        self.crop, self.paste_partners, self.sw_batch_size, self.temperature = (p.crop(), p.paste_partners,
                                                                                p.sw_batch_size, p.temperature)
        self.weights = (p.rotation_weight, p.contrastive_weight, p.reconstruction_weight)
        self.cutout_args = (p.max_drop, p.max_block, p.tolerance)
        dim = 16 * int(self.model_cfg["feature_size"])

        # swinViT + encoder1..4, encoder10 under SwinUNETR's names; only swinViT is trained (see module doc)
        self.backbone = PooledSwinEncoder(build_swinunetr(self.model_cfg), all_stages=True)
        for name, module in self.backbone.named_children():
            if name != "swinViT":
                module.requires_grad_(False)
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, p.contrastive_dim)
        self.reconstruction_head = ReconstructionHead(dim, 1)

    @classmethod
    def input_size(cls, params: "SwinUNETRSSLParams | Mapping[str, Any]") -> tuple[int, int, int] | None:
        return cls.typed(params).resize

    def make_views(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Two rotated + cut-out views of ``sw_batch_size`` random crops per volume (crops volume-major).

        Returns inputs [2N, C, *crop] (view 1 then view 2), targets (the rotated crops without cutout),
        rotation labels [2N].
        """
        crops = random_crops(volumes, self.sw_batch_size, self.crop)
        x1, r1 = random_rotation(crops)
        x2, r2 = random_rotation(crops)
        targets = torch.cat([x1, x2])
        groups = 2 if self.paste_partners == "view" else 1      # view: partners within x1's crops, x2's crops
        inputs = cutout(targets, *self.cutout_args, groups=groups)[0]
        return {"inputs": inputs, "targets": targets, "rotations": torch.cat([r1, r2])}

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        views = self.make_views(volumes)
        n = views["inputs"].shape[0] // 2
        hs4 = self.backbone.swinViT(views["inputs"].contiguous())[4]        # [2N, 16fs, h, w, d], layer-normed
        tokens = hs4.flatten(2).transpose(1, 2)                              # [2N, h*w*d, 16fs]
        rot_logits = self.rotation_head(tokens[:, 0])
        embeddings = self.contrastive_head(tokens[:, 1])
        recon = self.reconstruction_head(hs4)
        rotation = F.cross_entropy(rot_logits.float(), views["rotations"])
        contrastive = nt_xent(embeddings[:n], embeddings[n:], self.temperature)
        reconstruction = F.l1_loss(recon.float(), views["targets"].float())
        a1, a2, a3 = self.weights
        loss = a1 * rotation + a2 * contrastive + a3 * reconstruction
        accuracy = (rot_logits.detach().argmax(dim=1) == views["rotations"]).float().mean()
        logs = {"loss": loss.detach(), "rotation": rotation.detach(), "contrastive": contrastive.detach(),
                "reconstruction": reconstruction.detach(), "rotation_acc": accuracy}
        return loss, logs

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """swinViT.* (trained) + encoder1..4, encoder10 (untouched), SwinUNETR's key layout."""
        return {k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        heads = {"rotation_head": self.rotation_head, "contrastive_head": self.contrastive_head,
                 "reconstruction_head": self.reconstruction_head}
        return {f"{name}.{k}": v.detach().cpu().clone()
                for name, module in heads.items() for k, v in module.state_dict().items()}
