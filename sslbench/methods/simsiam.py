"""SimSiam: simple Siamese representation learning, on 3D volumes.

Chen and He. "Exploring Simple Siamese Representation Learning", CVPR 2021 (code:
github.com/facebookresearch/simsiam). Two augmented views x1, x2 of the same volume go through the same
encoder f (backbone + projector) and a predictor h; with z = f(x), p = h(z) and a stop-gradient sg:

* D(p, z) = -(p / ||p||) . (z / ||z||), averaged over the batch (paper Eq. 1)     -> ``negative_cosine``
* L = 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)) (paper Eq. 2 and 3)                   -> ``simsiam_loss``
* collapse indicator (paper Sec. 4.1, Fig. 2): the std over the batch of l2-normalised z, per dimension,
  averaged over dimensions: ~1/sqrt(d) for a healthy Gaussian-like z, 0 on collapse. Logged as ``z_std``
                                                                                  -> ``collapse_std``
* projector (the official ``encoder.fc``): Linear(in, 2048, no bias), BN, ReLU, Linear(2048, 2048, no
  bias), BN, ReLU, Linear(2048, 2048, no bias), BN(affine=False). The official first two layers keep the
  encoder's width (2048 for ResNet-50); here they take ``proj_dim``, since the 3D encoders are narrower.
  predictor: Linear(2048, 512, no bias), BN, ReLU, Linear(512, 2048).                -> ``Projector``,
  ``Predictor``. Each view goes through the heads (and through a backbone with BatchNorm) on its own, so
  batch statistics are per view, as in the official two encoder calls.

Backbone features (``params["features"]``, model.name=swinunetr):

* ``all`` (default): SwinUNETR's encoder1(x), encoder2(hs0), encoder3(hs1), encoder4(hs2), encoder10(hs4)
  each globally pooled and concatenated (24 x feature_size), the feature path of VoCo's official code
  (``parts.pooled_swin.PooledSwinEncoder``): every tensor handed over to fine-tuning is trained. Needs >= 2 voxels at
  1/32 scale (crop >= 64), since encoder10 instance-normalises that map.
* ``last``: the last Swin stage pooled (16 x feature_size); encoder1..4 and encoder10 are handed over
  UNTOUCHED (random, frozen). Works with 32^3 crops (the tiny CPU preset).

With model.name=unet3d (Models Genesis' 3D U-Net) or basicunet (MONAI BasicUNet at its widths): the bottleneck
(down_tr512 / down_4) pooled; the whole encoder is trained and handed over (``features`` does not apply).

Views (a 3D version of the paper's ImageNet augmentation; SimSiam has no official 3D recipe): per view,
ONE ``affine_grid`` + ``grid_sample`` over all views of the batch does a random resized crop (each axis
independently keeps a side fraction ~ U[crop_scale]), random flips (p_flip per axis) and a random rot90 in
the x-y plane (p_rot90, k ~ U{1, 2, 3}), resampled to crop_size^3 (trilinear). Then, per view: intensity
scale ~ U[1 - s, 1 + s] and shift ~ U[-t, t] (p_intensity, the colour-jitter stand-in), Gaussian blur with
sigma ~ U[blur_sigma] voxels (p_blur; separable, per-view kernels applied as one grouped conv per axis),
Gaussian noise N(0, noise_std^2) (p_noise). Every random choice is a tensor; no loop over samples.

Optimiser: the official recipe is SGD (lr 0.05 x batch / 256, momentum 0.9, weight decay 1e-4, fixed
predictor lr); the shared protocol uses AdamW for every method (methods/simsiam.yaml). The official form is
``--set method.pretrain.optimizer=sgd --set method.pretrain.fixed_lr=[predictor]`` (+ lr, weight decay, no
warm-up: docs/ledger.md), applied by the protocol's optimiser (``protocol.pretrain_optimizer``), not here.

Distributed training: the heads' (and the U-Nets') BatchNorm must be SyncBatchNorm under DDP, as in the official
code; the distributed runner does the conversion (``sslbench.distributed.wrap`` converts every BatchNorm of
the method before wrapping it in DistributedDataParallel on CUDA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError
from ..models.backbones import (TRANSFER_PREFIXES, bottleneck_features, bottleneck_module, build_model,
                                build_swinunetr)
from . import dist
from .base import PretrainMethod
from ..models.unet2d import build_encoder
from .params import Attention, MethodParams, positive, probability, rule
from .parts import aug2d
from .parts.blur import blur_2d, gaussian_blur  # noqa: F401  (blur_2d: SimSiam2D; both: the tests' names)
from .parts.pooled_swin import PooledSwinEncoder

FEATURES = ("all", "last")
MODELS = ("swinunetr", "unet3d", "basicunet")
_SCALE = rule(lambda v: 0 < v[0] <= v[1] <= 1, "[low, high] with 0 < low <= high <= 1")
_SIGMA = rule(lambda v: 0 < v[0] <= v[1], "[low, high] with 0 < low <= high")


@dataclass(frozen=True)
class SimSiamParams(MethodParams):
    """SimSiam's ``method.params`` (methods/simsiam.yaml holds the defaults; equal to these, tests check). The
    official values are facebookresearch/simsiam main_simsiam.py's (argparse, ``augmentation``)."""

    resize: tuple[int, int, int] = field(default=(128, 128, 96), metadata=positive("a list of 3 positive integers"))
    """every corpus volume resized to this before batching (sslbench's; the official reads ImageNet images)."""
    crop_size: int = field(default=64, metadata=positive("a positive integer"))
    """views are crop_size^3, a trilinear resample of a random box (the official RandomResizedCrop(224))."""
    sw_batch_size: int = field(default=4, metadata=positive("a positive integer"))
    """view pairs per volume (the official: one pair per image, TwoCropsTransform)."""
    features: Literal["all", "last"] = "all"
    """all: pooled encoder1..4 + encoder10 of SwinUNETR | last: the last Swin stage pooled (module docstring)."""
    proj_dim: int = field(default=2048, metadata=positive("a positive integer"))
    """projector width (official --dim 2048; paper Sec. 3 projection MLP)."""
    pred_dim: int = field(default=512, metadata=positive("a positive integer"))
    """predictor hidden width (official --pred-dim 512)."""
    crop_scale: tuple[float, float] = field(default=(0.5, 1.0), metadata=_SCALE)
    """kept side fraction per axis (official RandomResizedCrop scale=(0.2, 1.) of the area; ledger)."""
    p_flip: float = field(default=0.5, metadata=probability())
    """flip per axis (official RandomHorizontalFlip)."""
    p_rot90: float = field(default=0.5, metadata=probability())
    """k ~ U{1, 2, 3} quarter turns in the x-y plane (no official counterpart; 3D stand-in)."""
    p_intensity: float = field(default=0.8, metadata=probability())
    """colour-jitter stand-in x -> a x + b (official RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8))."""
    intensity_scale: float = 0.1
    """a ~ U[1 - scale, 1 + scale]."""
    intensity_shift: float = 0.1
    """b ~ U[-shift, shift]."""
    p_blur: float = field(default=0.5, metadata=probability())
    """Gaussian blur (official RandomApply(GaussianBlur([.1, 2.]), p=0.5))."""
    blur_sigma: tuple[float, float] = field(default=(0.1, 2.0), metadata=_SIGMA)
    """blur sigma range, here in voxels (official [.1, 2.] in pixels)."""
    p_noise: float = field(default=0.2, metadata=probability())
    """additive Gaussian noise (no official counterpart; a 3D stand-in for RandomGrayscale's p 0.2)."""
    noise_std: float = 0.05
    """the noise's standard deviation."""
    attention: Attention = "fused"
    """the Swin window-attention kernel the runtime applies (same function; not hashed)."""


@dataclass(frozen=True)
class SimSiam2DParams(MethodParams):
    """SimSiam2D's ``method.params`` (methods/simsiam.yaml ``two_d.params``): the official 2D augmentation."""

    proj_dim: int = field(default=2048, metadata=positive("a positive integer"))
    """projector width (official --dim 2048)."""
    pred_dim: int = field(default=512, metadata=positive("a positive integer"))
    """predictor hidden width (official --pred-dim 512)."""
    crop_scale: tuple[float, float] = field(default=(0.2, 1.0), metadata=_SCALE)
    """crop area / image area (official RandomResizedCrop(224, scale=(0.2, 1.)))."""
    p_flip: float = field(default=0.5, metadata=probability())
    """official RandomHorizontalFlip."""
    jitter: float = 0.4
    """ColorJitter brightness / contrast (official 0.4; saturation and hue do nothing on grey)."""
    p_jitter: float = field(default=0.8, metadata=probability())
    """official RandomApply([ColorJitter], p=0.8)."""
    blur_sigma: tuple[float, float] = field(default=(0.1, 2.0), metadata=_SIGMA)
    """blur sigma range in pixels at 224 (official GaussianBlur([.1, 2.]))."""
    p_blur: float = field(default=0.5, metadata=probability())
    """official RandomApply([GaussianBlur], p=0.5)."""


# --------------------------------------------------------------------------------------------------
# Loss and collapse indicator
# --------------------------------------------------------------------------------------------------

def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -cos(p, sg(z)), mean over the batch (SimSiam Eq. 1 with the stop-gradient of Eq. 3)."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """L = 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)) (SimSiam Eq. 3); in [-1, 1], -1 when p and z align."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Per-dimension std over the batch of l2-normalised z [N, d], averaged over dimensions (SimSiam Sec. 4.1).

    ~1/sqrt(d) when z is spread like an isotropic Gaussian; 0 when every sample maps to the same vector.
    The population std (no Bessel correction), so a batch of one gives 0 rather than NaN.
    """
    return F.normalize(z.detach().float(), dim=1).std(dim=0, correction=0).mean()


# --------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------

def random_view_affines(n: int, crop_scale: Sequence[float] = (0.5, 1.0), p_flip: float = 0.5,
                        p_rot90: float = 0.5, device: torch.device | str | None = None) -> torch.Tensor:
    """Affine maps [n, 3, 4] from output to input normalised coordinates, axes in (X, Y, Z) order.

    input = c + S F R u for output coordinates u in [-1, 1]^3: R a rot90 (k ~ U{1, 2, 3} with probability
    p_rot90, else identity) in the x-y plane, F a flip (-1 with probability p_flip) per axis, S the kept
    side fractions s ~ U[crop_scale] per axis, c ~ U[-(1 - s), 1 - s] per axis (the box stays inside).
    """
    lo, hi = float(crop_scale[0]), float(crop_scale[1])
    s = lo + (hi - lo) * torch.rand(n, 3, device=device)
    c = (torch.rand(n, 3, device=device) * 2 - 1) * (1 - s)
    flip = torch.where(torch.rand(n, 3, device=device) < p_flip, -1.0, 1.0)
    k = torch.randint(1, 4, (n,), device=device) * (torch.rand(n, device=device) < p_rot90)
    angle = k.to(torch.float32) * (math.pi / 2)
    cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
    rot = torch.zeros(n, 3, 3, device=device)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = cos, -sin, sin, cos, 1.0
    linear = (s * flip).unsqueeze(-1) * rot
    return torch.cat([linear, c.unsqueeze(-1)], dim=-1)


def resample_views(volumes: torch.Tensor, theta: torch.Tensor, out_size: int) -> torch.Tensor:
    """Views of volumes [B, C, X, Y, Z] under affines theta [B, V, 3, 4] ((X, Y, Z) order): [B, V, C, s, s, s].

    ONE grid_sample (trilinear, align_corners=False, border padding) for every view: the V views of a
    volume are stacked along the output's first axis, so the volumes are never copied.
    """
    b, c = volumes.shape[:2]
    v = theta.shape[1]
    s = int(out_size)
    # affine_grid and grid_sample order coordinates (W, H, D) = (Z, Y, X) of a [B, C, X, Y, Z] tensor
    theta_zyx = torch.cat([theta[..., :3].flip(-1).flip(-2), theta[..., 3:].flip(-2)], dim=-1)
    grid = F.affine_grid(theta_zyx.reshape(b * v, 3, 4).to(torch.float32), [b * v, 1, s, s, s], align_corners=False)
    grid = grid.view(b, v * s, s, s, 3)
    out = F.grid_sample(volumes, grid.to(volumes.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(b, c, v, s, s, s).transpose(1, 2)


def augment_intensity(x: torch.Tensor, p_intensity: float = 0.8, scale: float = 0.1, shift: float = 0.1,
                      p_blur: float = 0.5, blur_sigma: Sequence[float] = (0.1, 2.0), p_noise: float = 0.2,
                      noise_std: float = 0.05) -> torch.Tensor:
    """Per-view intensity augmentation of x [N, C, X, Y, Z]: scale/shift, then blur, then Gaussian noise.

    a ~ U[1 - scale, 1 + scale], b ~ U[-shift, shift] (x -> a x + b) with probability p_intensity;
    Gaussian blur, sigma ~ U[blur_sigma], with probability p_blur; + N(0, noise_std^2) with probability p_noise.
    """
    n = x.shape[0]
    dev = x.device
    view = (n,) + (1,) * (x.dim() - 1)
    u = torch.rand(n, 5, device=dev)
    jitter = u[:, 0] < p_intensity
    a = torch.where(jitter, 1 + (2 * u[:, 1] - 1) * scale, 1.0).to(x.dtype)
    b = torch.where(jitter, (2 * u[:, 2] - 1) * shift, 0.0).to(x.dtype)
    x = x * a.view(view) + b.view(view)
    lo, hi = float(blur_sigma[0]), float(blur_sigma[1])
    if p_blur > 0 and hi > 0:
        sigma = torch.where(u[:, 3] < p_blur, lo + (hi - lo) * torch.rand(n, device=dev), 0.0)
        x = gaussian_blur(x, sigma, radius=max(1, math.ceil(3 * hi)))
    if p_noise > 0 and noise_std > 0:
        x = x + torch.randn_like(x) * (noise_std * (u[:, 4] < p_noise).to(x.dtype)).view(view)
    return x


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------

class Projector(nn.Sequential):
    """SimSiam's 3-layer projector: in -> hidden -> hidden -> out, BN + ReLU after the first two Linears,
    BN(affine=False) after the last; the Linears have no bias (each is followed by BN)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048):
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False))


class Predictor(nn.Sequential):
    """SimSiam's 2-layer predictor (bottleneck): dim -> pred_dim (no bias, BN, ReLU) -> dim."""

    def __init__(self, dim: int = 2048, pred_dim: int = 512):
        super().__init__(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                         nn.Linear(pred_dim, dim))


class UNetEncoder(nn.Module):
    """The encoder of a U-Net family (unet3d: down_tr64..512; basicunet: conv_0, down_1..4) under the network's
    names; features = the bottleneck globally pooled."""

    def __init__(self, net: nn.Module, family: str):
        super().__init__()
        self.family = family
        for prefix in TRANSFER_PREFIXES[family][0]:
            setattr(self, prefix.rstrip("."), getattr(net, prefix.rstrip(".")))
        self.out_dim = bottleneck_module(self, family)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bottleneck_features(self, self.family, x).mean(dim=(2, 3, 4))


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------

class SimSiam(PretrainMethod):
    """SimSiam pre-training on volumes [B, 1, X, Y, Z] in [0, 1], already resized to ``params.resize``.

    params: :class:`SimSiamParams` (typed, checked; a line per field on the official code it follows).
    """

    name = "simsiam"
    Params = SimSiamParams
    transfers_decoder = False

    def __init__(self, params: "SimSiamParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.model_name = str(self.model_cfg.get("name", "swinunetr"))
        if self.model_name not in MODELS:
            raise RecipeError(f"model.name: {self.model_name!r} for method simsiam; "
                              f"expected one of {', '.join(MODELS)}")
        self.features, self.crop_size, self.sw_batch_size = p.features, p.crop_size, p.sw_batch_size
        min_crop = 64 if self.model_name == "swinunetr" and self.features == "all" else 32   # against the backbone
        if self.crop_size % 32 or self.crop_size < min_crop:
            raise RecipeError(f"method.params.crop_size: {self.crop_size} for method simsiam; expected a multiple of "
                              f"32, >= {min_crop} for model.name={self.model_name}, features={self.features}")
        self.crop_scale, self.p_flip, self.p_rot90 = p.crop_scale, p.p_flip, p.p_rot90
        self.intensity = dict(p_intensity=p.p_intensity, scale=p.intensity_scale, shift=p.intensity_shift,
                              p_blur=p.p_blur, blur_sigma=p.blur_sigma, p_noise=p.p_noise, noise_std=p.noise_std)
        proj_dim, pred_dim = p.proj_dim, p.pred_dim

        fs = int(self.model_cfg["feature_size"])
        if self.model_name == "swinunetr":
            # swinViT + encoder1..4, encoder10 under SwinUNETR's names (SwinUNETR's decoder is dropped)
            self.backbone: nn.Module = PooledSwinEncoder(build_swinunetr(self.model_cfg), all_stages=True)
            if self.features == "last":
                for name, module in self.backbone.named_children():
                    if name != "swinViT":
                        module.requires_grad_(False)
            feat_dim = (24 if self.features == "all" else 16) * fs
        else:
            self.backbone = UNetEncoder(build_model(self.model_cfg), self.model_name)
            feat_dim = self.backbone.out_dim
        # BatchNorm in the backbone (the U-Nets): encode each view on its own, as the official code does
        self.bn_backbone = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.backbone.modules())
        self.projector = Projector(feat_dim, proj_dim, proj_dim)
        self.predictor = Predictor(proj_dim, pred_dim)

    @classmethod
    def input_size(cls, params: "SimSiamParams | Mapping[str, Any]") -> tuple[int, int, int] | None:
        return cls.typed(params).resize

    def make_views(self, volumes: torch.Tensor) -> torch.Tensor:
        """Two augmented views of ``sw_batch_size`` pairs per volume: Tensor[2, B * sw, C, s, s, s].

        views[0][i] and views[1][i] come from the same volume (pairs volume-major).
        """
        b = volumes.shape[0]
        v = 2 * self.sw_batch_size
        theta = random_view_affines(b * v, self.crop_scale, self.p_flip, self.p_rot90, device=volumes.device)
        views = resample_views(volumes, theta.view(b, v, 3, 4), self.crop_size)     # [B, 2 sw, C, s, s, s]
        views = augment_intensity(views.reshape(b * v, *views.shape[2:]), **self.intensity)
        views = views.view(b, 2, self.sw_batch_size, *views.shape[1:]).transpose(0, 1)
        return views.reshape(2, b * self.sw_batch_size, *views.shape[3:])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features [N, feat_dim] of views x [N, C, s, s, s]."""
        if self.model_name == "swinunetr" and self.features == "last":
            return self.backbone.swinViT(x.contiguous())[4].mean(dim=(2, 3, 4))
        return self.backbone(x)

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.training and volumes.shape[0] * self.sw_batch_size * dist.world_size() < 2:   # SyncBN: global
            raise RecipeError(f"method.pretrain.batch_size x method.params.sw_batch_size: {volumes.shape[0]} x "
                              f"{self.sw_batch_size} view pairs for method simsiam; expected >= 2 (BatchNorm)")
        views = self.make_views(volumes)
        if self.bn_backbone:
            feats = [self.encode(views[0]), self.encode(views[1])]
        else:   # no batch statistics in the backbone: one call for both views gives the same features
            feats = list(self.encode(views.flatten(0, 1)).chunk(2))
        z1, z2 = self.projector(feats[0]), self.projector(feats[1])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1, z2)
        return loss, {"loss": loss.detach(), "z_std": collapse_std(z1)}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """swinViT.* + encoder1..4, encoder10 (swinunetr) or the U-Net's encoder, fine-tuning's key layout."""
        return {k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().cpu().clone()
                for name, module in (("projector", self.projector), ("predictor", self.predictor))
                for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# The 2D form (ChestX-ray14 track, issue 23)
# --------------------------------------------------------------------------------------------------
# SimSiam in 2D (Chen and He, CVPR 2021) on the ResNet-18 encoder of sslbench/models/unet2d.py (the Table 4 row).
#
# The official code (facebookresearch/simsiam ``main_simsiam.py``, ``simsiam/builder.py``) is 2D; this is its form
# on grey radiographs, with the losses and heads of the 3D method above:
#
# * D(p, z) = -cos(p, sg(z)); L = 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)) (paper Eq. 1-3, ``simsiam_loss``)
# * projector: the encoder's pooled last map (512) -> 3 Linear layers of ``proj_dim`` (BN + ReLU, last BN without
#   affine); predictor proj_dim -> ``pred_dim`` -> proj_dim (``Projector`` / ``Predictor``; the official widths
#   for ResNet-50 are 2048 / 512, and its first projector layers keep the encoder's width: here proj_dim)
# * views, the official augmentation: RandomResizedCrop(scale (0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with
#   p 0.8 (brightness and contrast: saturation and hue do nothing to grey), RandomGrayscale (nothing to grey),
#   GaussianBlur sigma ~ U[0.1, 2.0] with p 0.5 (in pixels of the 224 image: sigma scales with the image side),
#   RandomHorizontalFlip (sslbench/methods/parts/aug2d.py)
#
# Ledger: 1 grey channel in [0, 1] without ImageNet normalisation (no key); optimiser = the shared AdamW
# (official SGD lr 0.05 x batch / 256, momentum 0.9, wd 1e-4, fixed predictor lr:
# ``--set method.pretrain.optimizer=sgd --set method.pretrain.fixed_lr=[predictor]`` + lr); blur radius
# truncated at 3 sigma (torchvision's kernel is 10% of the image side).

class SimSiam2D(PretrainMethod):
    name = "simsiam"
    Params = SimSiam2DParams

    def __init__(self, params: "SimSiam2DParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        self.encoder = build_encoder(model_cfg)
        width = self.encoder.feature_info.channels()[-1]
        proj, pred = self.p.proj_dim, self.p.pred_dim
        self.projector = Projector(width, proj, proj)
        self.predictor = Predictor(proj, pred)

    @staticmethod
    def pixels_per_image(params: Mapping[str, Any], size: tuple[int, int]) -> float:
        return 2 * size[0] * size[1]

    def view(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        v = aug2d.random_geometry(x, p.crop_scale, 0.0, p.p_flip)
        v = aug2d.random_jitter(v, p.jitter, p.p_jitter)
        lo, hi = p.blur_sigma
        scale = x.shape[-1] / 224.0                             # sigma in pixels of a 224 image
        n = x.shape[0]
        on = torch.rand(n, device=x.device) < p.p_blur
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
