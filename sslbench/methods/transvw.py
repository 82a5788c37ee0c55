"""TransVW: transferable visual words (self-discovery, self-classification, self-restoration).

Haghighi, Hosseinzadeh Taher, Zhou, Gotway, Liang. "Transferable Visual Words: Exploiting the Semantics
of Anatomical Patterns for Self-supervised Learning", IEEE TMI 40(10), 2021; official code
github.com/fhaghighi/TransVW (``self_discovery/pattern_generator_3D.py``, ``pytorch/train.py``,
``pytorch/data_loader.py``).

1. Self-discovery (``prepare``; the paper's "self-discovery"): every corpus volume gets a feature
   vector; for each of C visual-word classes a reference volume is drawn (without replacement), its K nearest volumes in
   feature space (the reference first) become the class members, and one random coordinate, drawn on the
   reference's grid, is the class's location: the crop at that coordinate of every member is one
   instance of visual word c. Coordinates closer than ``min_distance`` voxels to an earlier class's are
   redrawn (the official ``distance_threshold``).
2. Self-classification + self-restoration (``forward``; the paper's "self-classification" and
   "self-restoration"): an instance x of class c is perturbed (elastic deformation, then ONE of Models
   Genesis' four transformations, p = 1/4 each, as the official ``TransVW_Dataset``); the encoder's
   bottleneck feeds a classification head (conv -> BN -> ReLU -> GAP -> FC) and the decoder restores x
   (sigmoid output). The paper's joint objective, with the official weights ``lambda_rec`` = 1 and
   ``lambda_cls`` = 0.01 (``pytorch/train.py``):

       L = lambda_rec * MSE(sigmoid(f(x~)), x) + lambda_cls * CE(head(f_enc(x~)), c).

Choices where the shared protocol differs from the official pipeline (documented, not hidden):

* Features for self-discovery: the official uses the global-average-pooled bottleneck (512-d) of an
  auto-encoder trained on whole volumes at 128x128x64. Here the feature is a fixed, training-free stand-in:
  the volume average-pooled to ``embed_grid`` (8x8x8 = 512-d, a coarse intensity layout of the anatomy;
  ``volume_embedding``). It is deterministic, costs one pooling, and ranks volumes by anatomical
  similarity at the same coarse scale the auto-encoder's bottleneck summarises; it does not learn
  invariances an auto-encoder might.
* Where instances come from: the official pre-extracts (class, member) crops into arrays. Here the
  protocol hands ``forward`` a random batch of corpus volumes; each batch volume is assigned, at random,
  one of the classes it is a member of, and its instance is cropped from it at that class's coordinate.
  Membership is tested without knowing the volume's corpus index: volume v is a member of class c iff
  ||phi(v) - phi(ref_c)|| <= the distance of ref_c's K-th nearest neighbour (``vw_radius``), which is
  exactly "v is among the K nearest" (ties aside). A batch volume that belongs to no class (possible
  when C * K < corpus size) gets a crop at a random class's coordinate and contributes to the
  restoration loss only (its CE weight is 0; ``vw_fraction`` logs the share of classified samples).
* Multi-resolution instances: the official stores 3 crops per instance: the exact one and two with a
  random x-y side of 50..79 voxels (for a 64-voxel crop) shifted by -10..9 voxels, resized to the crop
  size. Here each sample is the exact crop with probability 1 / ``multires_patches`` and a jittered one
  otherwise, with the same ranges as fractions of the crop's x-y side.
* When the corpus has fewer volumes than classes (e.g. phantom corpora), references repeat, each class
  still drawing its own coordinate.
* The official TransVW perturbation module (``utils/purturbation.py``) is not in the public repository
  snapshot; the four perturbations here are Models Genesis' (sslbench/methods/genesis.py) applied with
  probability 1, and the elastic deformation follows the TransVW code (alpha 991, sigma 8 voxels, x-y
  displacement, linear interpolation, reflected borders). The restoration target is the undeformed crop,
  as in the official data loader (``x_ori`` is copied before ``elastic_transform``).

All of ``forward`` is batched on the volumes' device (membership by one ``cdist``, classes by a masked
random argmax, one ``grid_sample`` for the crops, one for the elastic deformation).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError
from .base import PretrainMethod
from .genesis import (_size3, _where_sample, build_restoration_net, check_crop, crop_3d, local_pixel_shuffle,
                      nonlinear_intensity, paint, plain_float, randint_inclusive, transferable_state)

#: official ``train.py`` / ``config.py`` defaults
TRANSVW_DEFAULTS: dict[str, Any] = {
    "resize": [192, 192, 128], "crop": [64, 64, 64], "num_classes": 44, "instances": 200,
    "min_distance": 5, "embed_grid": [8, 8, 8], "multires_patches": 3,
    "multires_size": [0.78125, 1.234375], "multires_shift": 0.15625, "elastic": True,
    "elastic_alpha": 991.0, "elastic_sigma": 8.0, "lambda_rec": 1.0, "lambda_cls": 0.01, "attention": "fused",
}
#: tries per class to find a coordinate min_distance away from the earlier ones (official: 200)
COORDINATE_TRIES = 200


# --------------------------------------------------------------------------------------------------
# Self-discovery
# --------------------------------------------------------------------------------------------------

def volume_embedding(volumes: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Training-free volume feature: average-pooled to ``grid`` and flattened, [N, prod(grid)] in fp32."""
    return F.adaptive_avg_pool3d(volumes.float(), tuple(int(g) for g in grid)).flatten(1)


def nearest_members(features: torch.Tensor, refs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each reference index, its k nearest volumes by Euclidean feature distance (reference first).

    Returns (members [C, k] int64, radius [C]: distance of the k-th nearest). Ties are broken by the
    lower corpus index; the reference is put first even when another volume has distance 0 to it.
    """
    dist = torch.cdist(features[refs].double(), features.double())                  # [C, N]
    dist[torch.arange(len(refs)), refs] = -1.0                                       # the reference itself first
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    radius = dist.gather(1, order[:, -1:]).squeeze(1).clamp_min(0.0)
    return order, radius.float()


def draw_coordinates(n: int, size: Sequence[int], crop: Sequence[int], min_distance: float,
                     generator: torch.Generator) -> torch.Tensor:
    """n crop corners uniform in [0, size - crop], each >= min_distance from the earlier ones when possible.

    The official ``get_random_coordinate`` rule (200 tries, then the class is drawn again; here the last
    try is kept so that prepare always ends). Tensor[n, 3] int64 on the CPU.
    """
    hi = torch.tensor([int(s) - int(c) for s, c in zip(size, crop)])
    coords: list[torch.Tensor] = []
    for _ in range(n):
        for _ in range(COORDINATE_TRIES):
            cand = randint_inclusive(0, hi, (3,), generator, torch.device("cpu"))
            if not coords or torch.cdist(cand[None].float(), torch.stack(coords).float()).min() >= min_distance:
                break
        coords.append(cand)
    return torch.stack(coords)


# --------------------------------------------------------------------------------------------------
# Perturbation
# --------------------------------------------------------------------------------------------------

def elastic_deform(x: torch.Tensor, alpha: float = 991.0, sigma: float = 8.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Elastic deformation in the x-y plane of every sample of x [B, C, X, Y, Z] (TransVW ``elastic_transform``).

    Displacements along x and y: uniform noise in [-1, 1] per voxel, Gaussian-smoothed with ``sigma``
    voxels (MONAI ``GaussianFilter``, zero padding as scipy's ``mode="constant"``), times ``alpha``;
    z is not displaced; linear interpolation with reflected borders. One noise draw and one
    ``grid_sample`` for the whole batch (MONAI's ``Rand3DElastic`` deforms one array per call on the CPU).
    """
    from monai.networks.layers import GaussianFilter

    b, _, *shape = x.shape
    dev = generator.device if generator is not None else x.device
    noise = (torch.rand((b, 2, *shape), generator=generator, device=dev) * 2 - 1).to(x.device, torch.float32)
    disp = GaussianFilter(3, float(sigma)).to(x.device)(noise) * float(alpha)               # [B, 2, X, Y, Z]
    nx, ny, nz = (int(s) for s in shape)
    px = torch.arange(nx, device=x.device, dtype=torch.float32).view(1, nx, 1, 1) + disp[:, 0]
    py = torch.arange(ny, device=x.device, dtype=torch.float32).view(1, 1, ny, 1) + disp[:, 1]
    pz = torch.arange(nz, device=x.device, dtype=torch.float32).view(1, 1, 1, nz).expand(b, nx, ny, nz)

    def norm(p: torch.Tensor, n: int) -> torch.Tensor:
        return p * (2.0 / max(n - 1, 1)) - 1.0

    grid = torch.stack([norm(pz, nz), norm(py, ny), norm(px, nx)], dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def one_of_four(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly one Models Genesis perturbation per sample, each with probability 1/4 (TransVW data loader).

    0: local pixel shuffling, 1: non-linear intensity, 2: in-painting, 3: out-painting. Returns
    (perturbed x, kind [B] int64). All four are computed for the batch and one is kept per sample.
    """
    b = x.shape[0]
    dev = generator.device if generator is not None else x.device
    kind = torch.randint(0, 4, (b,), generator=generator, device=dev).to(x.device)
    variants = (local_pixel_shuffle(x, prob=1.0, generator=generator),
                nonlinear_intensity(x, prob=1.0, generator=generator),
                paint(x, prob=1.0, inpaint_rate=1.0, generator=generator),
                paint(x, prob=1.0, inpaint_rate=0.0, generator=generator))
    out = variants[0]
    for i in (1, 2, 3):
        out = _where_sample(kind == i, variants[i], out)
    return out, kind


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean CE over the samples with weight 1 (0 when none): logits [B, C], target [B], weight [B] in {0, 1}."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    w = weight.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------

class ClassificationHead(nn.Module):
    """Visual-word classifier on the encoder's bottleneck: conv 3^3 -> BatchNorm -> ReLU -> GAP -> FC."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3, 4)))


def bottleneck(net: nn.Module, model_name: str) -> tuple[nn.Module, int]:
    """The module whose output is the encoder's bottleneck, and its channels.

    SwinUNETR: ``encoder10`` (the 1/32-scale map, 16 x feature_size channels); unet3d (MONAI BasicUNet):
    ``down_4`` (the deepest level, features[4] channels).
    """
    if model_name == "swinunetr":
        return net.encoder10, int(net.encoder10.layer.conv1.conv.out_channels)
    return net.down_4, int(net.down_4.convs.conv_1.conv.out_channels)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------

class TransVW(PretrainMethod):
    """TransVW pre-training on corpus volumes [B, 1, *resize] in [0, 1] (see the module docstring).

    Buffers (in checkpoints): ``vw_coords`` [C, 3] crop corners, ``vw_members`` [C, K] corpus indices,
    ``vw_refs`` [C, D] reference features, ``vw_radius`` [C]. ``prepare`` must run before training and
    before a checkpoint is loaded (it sizes the buffers).
    """

    name = "transvw"
    transfers_decoder = True

    def __init__(self, params: Mapping[str, Any], model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = {**TRANSVW_DEFAULTS, **self.params}
        self.resize = _size3(p["resize"], "resize", self.name)
        self.crop = _size3(p["crop"], "crop", self.name)
        self.embed_grid = _size3(p["embed_grid"], "embed_grid", self.name)
        self.model_name = str(self.model_cfg.get("name", "swinunetr"))
        check_crop(self.name, self.model_name, self.crop, self.resize)
        self.num_classes = int(p["num_classes"])
        self.instances = int(p["instances"])
        for key, value in (("num_classes", self.num_classes), ("instances", self.instances),
                           ("multires_patches", int(p["multires_patches"]))):
            if value < 1:
                raise RecipeError(f"method.params.{key}: {value} for method {self.name}; expected >= 1")
        self.min_distance = float(p["min_distance"])
        self.multires_rate = 1.0 - 1.0 / int(p["multires_patches"])
        lo, hi = (float(s) for s in p["multires_size"])
        if not 0 < lo <= hi:
            raise RecipeError(f"method.params.multires_size: {p['multires_size']} for method {self.name}; "
                              f"expected [low, high] fractions of the crop with 0 < low <= high")
        self.multires_size = (lo, hi)
        self.multires_shift = float(p["multires_shift"])
        self.elastic = bool(p["elastic"])
        self.elastic_alpha, self.elastic_sigma = float(p["elastic_alpha"]), float(p["elastic_sigma"])
        self.lambda_rec, self.lambda_cls = float(p["lambda_rec"]), float(p["lambda_cls"])

        self.net = build_restoration_net(self.model_cfg, str(p["attention"]))
        module, channels = bottleneck(self.net, self.model_name)
        self.head = ClassificationHead(channels, self.num_classes)
        self._bottleneck: torch.Tensor | None = None
        module.register_forward_hook(self._keep_bottleneck)
        self.register_buffer("vw_coords", torch.zeros(0, 3, dtype=torch.int64))
        self.register_buffer("vw_members", torch.zeros(0, 0, dtype=torch.int64))
        self.register_buffer("vw_refs", torch.zeros(0, math.prod(self.embed_grid)))
        self.register_buffer("vw_radius", torch.zeros(0))

    def _keep_bottleneck(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._bottleneck = output

    @staticmethod
    def input_size(params: Mapping[str, Any]) -> tuple[int, int, int] | None:
        return _size3(params.get("resize", TRANSVW_DEFAULTS["resize"]), "resize", "transvw")

    @torch.no_grad()
    def prepare(self, corpus: torch.Tensor, seed: int) -> None:
        """Self-discovery of the visual words on the whole corpus [N, 1, *resize] (deterministic in seed)."""
        corpus = plain_float(corpus)
        if tuple(corpus.shape[2:]) != self.resize:
            raise RecipeError(f"method.params.resize: {list(self.resize)} for method {self.name}, but the corpus "
                              f"volumes are {list(corpus.shape[2:])}")
        n = corpus.shape[0]
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        feats = torch.cat([volume_embedding(chunk, self.embed_grid).cpu() for chunk in corpus.split(64)])
        reps = -(-self.num_classes // n)
        refs = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[: self.num_classes]
        members, radius = nearest_members(feats, refs, min(self.instances, n))
        coords = draw_coordinates(self.num_classes, self.resize, self.crop, self.min_distance, g)
        dev = self.vw_coords.device
        self.vw_coords = coords.to(dev)
        self.vw_members = members.to(dev)
        self.vw_refs = feats[refs].to(dev)
        self.vw_radius = radius.to(dev)

    def visual_word_labels(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each volume: (a class it is a member of, drawn at random; whether it is a member of any).

        Membership: feature distance to the class reference <= ``vw_radius`` (+ a 1e-4 relative margin
        for recomputation rounding). A volume of no class gets a random class and False.
        """
        feats = volume_embedding(volumes, self.embed_grid)
        dist = torch.cdist(feats, self.vw_refs.float())                                    # [B, C]
        member = dist <= self.vw_radius * (1 + 1e-4) + 1e-6
        score = torch.rand(dist.shape, device=dist.device) + member.float()              # members score above 1
        return score.argmax(dim=1), member.any(dim=1)

    def instances_of(self, volumes: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Crops of each volume at its class's coordinate, multi-resolution jittered: [B, 1, *crop]."""
        b = volumes.shape[0]
        dev = volumes.device
        corner = self.vw_coords[classes].float()                                          # [B, 3]
        crop = torch.tensor(self.crop, device=dev, dtype=torch.float32)
        jitter = torch.rand(b, device=dev) < self.multires_rate
        lo = [round(c * self.multires_size[0]) for c in self.crop[:2]]
        hi = [round(c * self.multires_size[1]) for c in self.crop[:2]]
        side = torch.stack([randint_inclusive(lo[a], hi[a], (b,), None, dev) for a in range(2)], 1).float()
        reach = [max(round(c * self.multires_shift), 0) for c in self.crop[:2]]
        shift = torch.stack([randint_inclusive(-reach[a], reach[a] - 1 if reach[a] else 0, (b,), None, dev)
                             for a in range(2)], 1).float()
        sizes = crop.expand(b, 3).clone()
        sizes[:, :2] = torch.where(jitter[:, None], torch.minimum(side, torch.tensor(self.resize[:2], device=dev)),
                                   sizes[:, :2])
        starts = corner.clone()
        starts[:, :2] = torch.where(jitter[:, None], corner[:, :2] + shift, corner[:, :2])
        limit = torch.tensor(self.resize, device=dev, dtype=torch.float32) - sizes
        starts = torch.minimum(starts.clamp_min(0.0), limit)
        return crop_3d(volumes, starts, sizes, self.crop)

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.vw_coords.shape[0] != self.num_classes:
            raise RuntimeError("TransVW.forward before prepare(): the visual words are not discovered yet")
        volumes = plain_float(volumes)
        if tuple(volumes.shape[2:]) != self.resize:
            raise ValueError(f"transvw: volumes {list(volumes.shape[2:])} are not of the visual words' grid "
                             f"method.params.resize {list(self.resize)}")
        with torch.autocast(volumes.device.type, enabled=False):
            classes, has_class = self.visual_word_labels(volumes)
            target = self.instances_of(volumes, classes)
            x = elastic_deform(target, self.elastic_alpha, self.elastic_sigma) if self.elastic else target
            x, _ = one_of_four(x)
        restored = torch.sigmoid(self.net(x).float())
        logits = self.head(self._bottleneck)
        self._bottleneck = None
        mse = F.mse_loss(restored, target)
        ce = masked_cross_entropy(logits, classes, has_class)
        loss = self.lambda_rec * mse + self.lambda_cls * ce
        hit = (logits.detach().argmax(dim=1) == classes).float() * has_class
        acc = hit.sum() / has_class.float().sum().clamp_min(1.0)
        return loss, {"mse": mse.detach(), "ce": ce.detach(), "acc": acc.detach(),
                      "vw_fraction": has_class.float().mean().detach()}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder and decoder of the restoration network, fine-tuning key layout."""
        return transferable_state(self.net, self.model_name)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The classification head, and the visual words (coordinates, members) for the record."""
        out = {f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        out.update({k: getattr(self, k).detach().cpu().clone() for k in ("vw_coords", "vw_members")})
        return out
