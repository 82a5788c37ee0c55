"""SimSiam in 2D (Chen and He, CVPR 2021) on the ResNet-18 encoder of sslbench/models/unet2d.py (the Table 4 row).

The official code (facebookresearch/simsiam ``main_simsiam.py``, ``simsiam/builder.py``) is 2D; this is its form
on grey radiographs, with the losses and heads of :mod:`sslbench.methods.simsiam`:

* D(p, z) = -cos(p, sg(z)); L = 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)) (paper Eq. 1-3, ``simsiam_loss``)
* projector: the encoder's pooled last map (512) -> 3 Linear layers of ``proj_dim`` (BN + ReLU, last BN without
  affine); predictor proj_dim -> ``pred_dim`` -> proj_dim (``Projector`` / ``Predictor``; the official widths
  for ResNet-50 are 2048 / 512, and its first projector layers keep the encoder's width: here proj_dim)
* views, the official augmentation: RandomResizedCrop(scale (0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with
  p 0.8 (brightness and contrast: saturation and hue do nothing to grey), RandomGrayscale (nothing to grey),
  GaussianBlur sigma ~ U[0.1, 2.0] with p 0.5 (in pixels of the 224 image: sigma scales with the image side),
  RandomHorizontalFlip (sslbench/methods/aug2d.py)

Ledger: 1 grey channel in [0, 1] without ImageNet normalisation (no key); optimiser = the shared AdamW
(official SGD lr 0.05 x batch / 256, momentum 0.9, wd 1e-4, fixed predictor lr:
``--set method.pretrain.optimizer=sgd --set method.pretrain.fixed_lr=[predictor]`` + lr); blur radius
truncated at 3 sigma (torchvision's kernel is 10% of the image side).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..models.unet2d import build_encoder
from . import aug2d
from .base import PretrainMethod
from .simsiam import Predictor, Projector, collapse_std, gaussian_blur, simsiam_loss


def blur_2d(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-image isotropic Gaussian blur of x [N, C, H, W] (the 3D ``gaussian_blur`` on a depth of 1, where its
    replicate-padded third axis leaves the image unchanged)."""
    return gaussian_blur(x.unsqueeze(-1), sigma, radius).squeeze(-1)


class SimSiam2D(PretrainMethod):
    name = "simsiam"

    def __init__(self, params: Mapping[str, Any], model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.params
        self.encoder = build_encoder(model_cfg)
        width = self.encoder.feature_info.channels()[-1]
        proj, pred = int(p.get("proj_dim", 2048)), int(p.get("pred_dim", 512))
        self.projector = Projector(width, proj, proj)
        self.predictor = Predictor(proj, pred)

    @staticmethod
    def pixels_per_image(params: Mapping[str, Any], size: tuple[int, int]) -> float:
        return 2 * size[0] * size[1]

    def view(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        v = aug2d.random_geometry(x, tuple(p.get("crop_scale", (0.2, 1.0))), 0.0, float(p.get("p_flip", 0.5)))
        v = aug2d.random_jitter(v, float(p.get("jitter", 0.4)), float(p.get("p_jitter", 0.8)))
        lo, hi = (float(s) for s in p.get("blur_sigma", (0.1, 2.0)))
        scale = x.shape[-1] / 224.0                             # sigma in pixels of a 224 image
        n = x.shape[0]
        on = torch.rand(n, device=x.device) < float(p.get("p_blur", 0.5))
        sigma = torch.where(on, (lo + (hi - lo) * torch.rand(n, device=x.device)) * scale, torch.zeros(n, device=x.device))
        return blur_2d(v, sigma, radius=max(1, math.ceil(3 * hi * scale)))

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = volumes.float()
        z1 = self.projector(self.encoder(self.view(x))[-1].mean(dim=(2, 3)))
        z2 = self.projector(self.encoder(self.view(x))[-1].mean(dim=(2, 3)))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1, z2)
        return loss, {"z_std": collapse_std(z1)}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, module in (("projector", self.projector), ("predictor", self.predictor))
                for k, v in module.state_dict().items()}
