"""VoCo-2D: VoCo's position priors on a 2D grid of base crops (the VoCo supplement's Table 4 row, Sec. 3.2).

VoCo publishes no 2D code; the supplement reports a ChestX-ray14 result and says the position priors hold in 2D
images too. sslbench's 2D form keeps every equation of the 3D method (:mod:`sslbench.methods.voco`, whose pure
functions it calls) and changes only the geometry:

* bases: the image (H x W) cut into an n x n grid (``voco.base_crop_boxes`` over rows x columns);
  random crops: k per image, of the bases' size, integer centres ~ U[half, side - half) (``random_crop_boxes``)
* position labels: y_{k,j} = |crop_k intersect base_j| / |base_j|, areas in pixels (``position_labels``)
* every crop resized to ``crop_size`` x ``crop_size`` (bilinear, :func:`crop_images`), augmented on its own
  (flip of each axis p 0.2, rot90 p 0.2, intensity shift U(-0.1, 0.1) p 0.1: the 3D chain restricted to 2D)
* features: the ResNet-18 encoder's last map pooled -> VoCo's projection MLP 512 -> head_dim -> head_dim -> head_dim
* L = L_pred + lambda L_reg: L_pred the official pos + neg form with w = 1[y > 0] and sg(bases) (VoCo's paper
  variant, ``voco.prediction_term``), L_reg = mean_{i<j} ReLU(cos(b_i, sg(b_j)))^2 (``regularization_loss``)

Ledger (deviations from the 3D official code, none restorable by a key unless said): 2D geometry as above; the
backbone is PCRL's ResNet-18 U-Net encoder (Table 4's protocol), not SwinUNETR; no foreground crop (radiographs
fill the frame); only the paper variant (no teacher-student); ``params.pred_loss: eq3`` gives the paper's Eq. 3.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..models.unet2d import build_encoder
from . import aug2d
from .base import PretrainMethod
from .voco import (ProjectionHead, base_crop_boxes, position_labels, prediction_term, random_crop_boxes,
                   regularization_loss)


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

    def __init__(self, params: Mapping[str, Any], model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.params
        self.n = int(p.get("n", 4))
        self.k = int(p.get("sw_batch_size", 4))
        self.crop_size = int(p.get("crop_size", 64))
        self.lam = float(p.get("lambda", 1.0))
        self.pred_loss = str(p.get("pred_loss", "official"))
        self.augment = bool(p.get("augment", True))
        self.encoder = build_encoder(model_cfg)
        width = self.encoder.feature_info.channels()[-1]
        dim = int(p.get("head_dim", 2048))
        self.head = ProjectionHead(width, dim, dim)

    @staticmethod
    def pixels_per_image(params: Mapping[str, Any], size: tuple[int, int]) -> float:
        """Encoder input pixels per image and step (feasibility): (k + n^2) crops of crop_size^2."""
        n, k, s = int(params.get("n", 4)), int(params.get("sw_batch_size", 4)), int(params.get("crop_size", 64))
        return (k + n * n) * s * s

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
