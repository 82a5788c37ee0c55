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
   redrawn (the official ``distance_threshold``). Only one feature per volume is needed (``volume_features``,
   then ``discover``), so ``method.pretrain.loader: stream`` streams the features from the case cache instead of
   holding the corpus: the same visual words.
2. Self-classification + self-restoration (``forward``; the paper's "self-classification" and
   "self-restoration"): an instance x of class c is perturbed (elastic deformation, then ONE of four
   transformations, p = 1/4 each, as the official ``TransVW_Dataset.luna_loader``); the encoder's
   bottleneck feeds a classification head (conv -> BN -> ReLU -> GAP -> FC) and the decoder restores x
   (sigmoid output). The paper's joint objective, with the official weights ``lambda_rec`` = 1 and
   ``lambda_cls`` = 0.01 (``pytorch/train.py``):

       L = lambda_rec * MSE(sigmoid(f(x~)), x) + lambda_cls * CE(head(f_enc(x~)), c).

The perturbations (``perturbations: transvw``, the default) are TransVW's own, from ``utils/purturbation.py``
(``pytorch/utils/purturbation.py``, imported by the official ``pytorch/data_loader.py`` with
``from utils.purturbation import *``). That file is missing from the stored snapshot of fhaghighi/TransVW
this code was written against (commit d996eeb; the snapshot also lacks ``pytorch/models/ynet3d.py``, which
``train.py`` imports, so it is incomplete). Its functions were therefore read from the same authors' copy in
fhaghighi/SemanticGenesis ``pytorch/utils/purturbation.py`` (commit 5f7368c), whose ``data_loader.py`` is the
TransVW one with the class renamed, and whose ``elastic_transform`` has the alpha and sigma already cited here; an
independent reproduction (tingxuanhu/TransVW_reproduction ``utils/purturbation.py``) has the same constants.
Each sample gets exactly one of:

* local pixel shuffling (``local_pixel_shuffling`` -> ``transvw_local_shuffle``): 5 blocks, side
  U{1 .. dim//10} per axis, corner U{0 .. dim - side}, each block's voxels permuted from the unshuffled input,
  later blocks overwriting earlier ones where they overlap;
* the non-linear (Bezier) intensity transformation (``nonlinear_transformation``): identical to Models
  Genesis' (two uniform control points, inverted half the time), so Models Genesis' ``nonlinear_intensity``
  (sslbench/methods/parts/perturbations.py);
* in-painting (``image_in_painting`` -> ``transvw_inpaint``): ONE box of side U{dim//6 .. dim//3}, corner
  U{3 .. dim - side - 3}, filled with uniform noise in [0, 1);
* out-painting (``image_out_painting`` -> ``transvw_outpaint``): the whole cube becomes uniform noise in
  [0, 1) except ONE window of side dim - U{3 dim//7 .. 4 dim//7}, corner U{3 .. dim - side - 3}, where the
  input is kept.

The restoration target is the undeformed, unperturbed crop (``x_ori`` is copied before ``elastic_transform``).

Choices where the shared protocol differs from the official pipeline (documented, not hidden; each says
which key, if any, gives the official behaviour):

* Features for self-discovery: the official uses the global-average-pooled bottleneck (512-d) of an
  auto-encoder trained on whole volumes at 128x128x64. Here the feature is a fixed, training-free stand-in:
  the volume average-pooled to ``embed_grid`` (8x8x8 = 512-d, a coarse intensity layout of the anatomy;
  ``volume_embedding``). It is deterministic, costs one pooling, and ranks volumes by anatomical
  similarity at the same coarse scale the auto-encoder's bottleneck summarises; it does not learn
  invariances an auto-encoder might. No key: the auto-encoder is not part of the protocol.
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
* Perturbations: TransVW's own, the official behaviour, by default (``perturbations: transvw``, above).
  ``perturbations: genesis`` restores this module's earlier form: Models Genesis' local shuffling (10,000 blocks, as a tiling), in-painting (up to 5 boxes) and
  out-painting (1 + up to 4 windows) from sslbench/methods/parts/perturbations.py, each applied with probability 1
  in place of TransVW's. Kept as an option for comparison with runs made before the TransVW forms were implemented.
* Local shuffling of an axis shorter than 10 voxels: block sides U{1 .. max(dim//10, 1)} (the official
  ``random.randint(1, 0)`` raises); no effect at the recipe crops (>= 14 voxels per axis, ``check_crop``),
  so no key.
* Random numbers: torch generators on the device, one batched draw per quantity, instead of Python's
  ``random`` and NumPy per sample; the distributions are the official ones (ties of the random sort keys that
  order a block's voxels have probability ~0). No key: the streams differ, the distributions do not.
* The elastic deformation follows the official ``elastic_transform`` (alpha 991, sigma 8 voxels, x-y
  displacement, linear interpolation, reflected borders) with the defaults ``elastic: true``,
  ``elastic_alpha: 991``, ``elastic_sigma: 8``; the noise is smoothed by MONAI's ``GaussianFilter`` rather than
  scipy's ``gaussian_filter`` (both zero-padded). ``elastic: false`` is the official ``data_augmentation=False``.

All of ``forward`` is batched on the volumes' device (membership by one ``cdist``, classes by a masked
random argmax, one ``grid_sample`` for the crops, one for the elastic deformation, and gathers / scatters /
masks for the perturbations: no loop over samples or blocks).

The 2D form (``TransVW2D``, the ChestX-ray14 track of issue 23: visual words as patches at fixed coordinates of
similar radiographs, the same perturbations per axis, PCRL's ResNet-18 U-Net) is at the end of this file, with its
ledger.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError
from ..models.backbones import bottleneck_module, build_model, transferable_state
from ..models.unet2d import UNet2D
from .base import PretrainMethod
from .params import Attention, MethodParams, positive, rule
from .parts.perturbations import MIN_PAINT_SIZE, local_pixel_shuffle, nonlinear_intensity, paint, randint_inclusive
from .parts.views import check_crop, crop_boxes

#: ``perturbations`` values: TransVW's own forms (official ``utils/purturbation.py``) | Models Genesis' forms
PERTURBATIONS = ("transvw", "genesis")
_MULTIRES_SIZE = rule(lambda v: 0 < v[0] <= v[1], "[low, high] fractions of the crop with 0 < low <= high")


@dataclass(frozen=True)
class TransVWParams(MethodParams):
    """TransVW's ``method.params`` (methods/transvw.yaml holds the defaults; equal to these, tests check). The official
    values are fhaghighi/TransVW pytorch/config.py and train.py's, self_discovery/pattern_generator_3D.py's."""

    resize: tuple[int, int, int] = field(default=(192, 192, 128), metadata=positive("a list of 3 positive integers"))
    """corpus volume size (the visual words' coordinates live on this grid; sslbench's, the official crops LUNA16)."""
    crop: tuple[int, int, int] = field(default=(64, 64, 64), metadata=positive("a list of 3 positive integers"))
    """instance size (official input_rows x cols x deps 64 x 64 x 32; 64^3 on SwinUNETR, methods/mg.yaml says why)."""
    num_classes: int = field(default=44, metadata=positive("an integer >= 1"))
    """visual-word classes C (official cls_classes 44)."""
    instances: int = field(default=200, metadata=positive("an integer >= 1"))
    """nearest volumes per class K, the reference included (official nb_instances 200)."""
    min_distance: float = 5.0
    """voxels between class coordinates (official distance_threshold)."""
    embed_grid: tuple[int, int, int] = field(default=(8, 8, 8), metadata=positive("a list of 3 positive integers"))
    """self-discovery feature: the volume average-pooled to this grid (512-d; official: an auto-encoder's 512-d
    bottleneck, ledger)."""
    multires_patches: int = field(default=3, metadata=positive("an integer >= 1"))
    """1 exact + (n - 1) jittered crops per instance (official nb_multires_patch 3)."""
    multires_size: tuple[float, float] = field(default=(0.78125, 1.234375), metadata=_MULTIRES_SIZE)
    """jittered x-y side as fractions of the crop (official 50..79 voxels of 64)."""
    multires_shift: float = 0.15625
    """jittered x-y shift up to this fraction of the crop (official -10..9 voxels of 64)."""
    elastic: bool = True
    """elastic deformation before the perturbation (official data_augmentation, elastic_transform)."""
    elastic_alpha: float = 991.0
    """elastic_transform's alpha (official 991)."""
    elastic_sigma: float = 8.0
    """elastic_transform's sigma in voxels (official 8)."""
    lambda_rec: float = 1.0
    """L = lambda_rec MSE + lambda_cls CE: the restoration weight (official train.py 1)."""
    lambda_cls: float = 0.01
    """the self-classification weight (official train.py 0.01)."""
    perturbations: Literal["transvw", "genesis"] = "transvw"
    """transvw: TransVW's own (utils/purturbation.py) | genesis: Models Genesis' forms (earlier sslbench)."""
    attention: Attention = "fused"
    """the Swin window-attention kernel the runtime applies (same function; not hashed)."""


@dataclass(frozen=True)
class TransVW2DParams(MethodParams):
    """TransVW2D's ``method.params`` (methods/transvw.yaml ``two_d.params``): the 3D official rules per axis (no
    official 2D code; TransVW2D's ledger)."""

    crop: tuple[int, int] = field(default=(64, 64), metadata=rule(
        lambda v: all(c > 0 and c % 32 == 0 for c in v),
        "two multiples of 32 (the 2D U-Net halves the instance 5 times)"))
    """instance size (the official instance's in-plane 64 x 64)."""
    num_classes: int = field(default=44, metadata=positive("an integer >= 1"))
    """visual-word classes (official cls_classes 44)."""
    instances: int = field(default=200, metadata=positive("an integer >= 1"))
    """nearest images per class, the reference included (official nb_instances 200)."""
    min_distance: float = 5.0
    """pixels between class coordinates (official distance_threshold)."""
    embed_grid: tuple[int, int] = field(default=(16, 16), metadata=positive("a list of 2 positive integers"))
    """self-discovery feature: the image average-pooled to this grid (256-d)."""
    multires_patches: int = field(default=3, metadata=positive("an integer >= 1"))
    """1 exact + (n - 1) jittered instances (official nb_multires_patch 3)."""
    multires_size: tuple[float, float] = field(default=(0.78125, 1.234375), metadata=_MULTIRES_SIZE)
    """jittered square side as fractions of the crop (official 50..79 of 64)."""
    multires_shift: float = 0.15625
    """jittered shift up to this fraction of the crop (official -10..9 of 64)."""
    elastic: bool = True
    """elastic deformation before the perturbation (official elastic_transform)."""
    elastic_alpha: float = 991.0
    """elastic_transform's alpha (official 991)."""
    elastic_sigma: float = 8.0
    """elastic_transform's sigma in pixels (official 8)."""
    lambda_rec: float = 1.0
    """the restoration weight (official train.py 1)."""
    lambda_cls: float = 0.01
    """the self-classification weight (official train.py 0.01)."""
    perturbations: Literal["transvw", "genesis"] = "transvw"
    """transvw: TransVW's own, per axis | genesis: Models Genesis' forms."""
    head_width: int = field(default=1024, metadata=positive("an integer >= 1"))
    """the classification head's conv width (the official 3D head's 1024)."""


#: official TransVW ``local_pixel_shuffling``: blocks per sample (Models Genesis: 10,000)
SHUFFLE_BLOCKS = 5
#: tries per class to find a coordinate min_distance away from the earlier ones (official: 200)
COORDINATE_TRIES = 200


def _per_sample(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a[i] where mask[i] else b[i] (mask [B], a / b [B, ...])."""
    return torch.where(mask.view((-1,) + (1,) * (a.dim() - 1)), a, b)


def _rng_device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    """Where random tensors are drawn: the generator's device, else x's (results are moved to x's)."""
    return generator.device if generator is not None else x.device


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
    try is kept so that prepare always ends). Tensor[n, D] int64 on the CPU (D = len(size): 3, or 2 for images).
    """
    hi = torch.tensor([int(s) - int(c) for s, c in zip(size, crop)])
    coords: list[torch.Tensor] = []
    for _ in range(n):
        for _ in range(COORDINATE_TRIES):
            cand = randint_inclusive(0, hi, (len(hi),), generator, torch.device("cpu"))
            if not coords or torch.cdist(cand[None].float(), torch.stack(coords).float()).min() >= min_distance:
                break
        coords.append(cand)
    return torch.stack(coords)


def discover_visual_words(feats: torch.Tensor, num_classes: int, instances: int, size: Sequence[int],
                          crop: Sequence[int], min_distance: float,
                          seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-discovery from every corpus item's feature [N, D] (corpus order; deterministic in seed).

    Returns (refs [C] reference indices, drawn without replacement and repeated only when N < C; members [C, K]
    their K = min(instances, N) nearest items; radius [C]; coords [C, len(size)] one crop corner per class).
    """
    n = feats.shape[0]
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    reps = -(-num_classes // n)
    refs = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:num_classes]
    members, radius = nearest_members(feats, refs, min(instances, n))
    coords = draw_coordinates(num_classes, size, crop, min_distance, g)
    return refs, members, radius, coords


def store_visual_words(module: nn.Module, feats: torch.Tensor, refs: torch.Tensor, members: torch.Tensor,
                       radius: torch.Tensor, coords: torch.Tensor) -> None:
    """Put :func:`discover_visual_words`' result into the module's checkpoint buffers (``vw_coords``,
    ``vw_members``, ``vw_refs``: the reference features, ``vw_radius``) on the module's device."""
    dev = module.vw_coords.device
    module.vw_coords, module.vw_members = coords.to(dev), members.to(dev)
    module.vw_refs, module.vw_radius = feats[refs].to(dev), radius.to(dev)


def assign_visual_words(feats: torch.Tensor, refs: torch.Tensor,
                        radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each item's feature [B, D]: (a class it is a member of, drawn at random from the global generator;
    whether it is a member of any) against the class references [C, D] and radii [C].

    Membership: feature distance to the class reference <= the radius (+ a 1e-4 relative margin for
    recomputation rounding). An item of no class gets a random class and False.
    """
    dist = torch.cdist(feats, refs.float())                                          # [B, C]
    member = dist <= radius * (1 + 1e-4) + 1e-6
    score = torch.rand(dist.shape, device=dist.device) + member.float()              # members score above 1
    return score.argmax(dim=1), member.any(dim=1)


# --------------------------------------------------------------------------------------------------
# Perturbation
# --------------------------------------------------------------------------------------------------

def elastic_deform(x: torch.Tensor, alpha: float = 991.0, sigma: float = 8.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Elastic deformation in the x-y plane of every sample of x [B, C, X, Y, Z] or [B, C, H, W] (TransVW
    ``elastic_transform``).

    Displacements along the first two spatial axes (x and y; both axes of an image): uniform noise in [-1, 1] per
    voxel, Gaussian-smoothed with ``sigma`` voxels (MONAI ``GaussianFilter``, zero padding as scipy's
    ``mode="constant"``), times ``alpha``; a third axis (z) is not displaced; linear interpolation with reflected
    borders. One noise draw and one ``grid_sample`` for the whole batch (MONAI's ``Rand3DElastic`` deforms one
    array per call on the CPU).
    """
    from monai.networks.layers import GaussianFilter

    b, _, *shape = x.shape
    dims = [int(s) for s in shape]
    if len(dims) not in (2, 3):
        raise ValueError(f"elastic_deform: expected [B, C, X, Y, Z] or [B, C, H, W], got {tuple(x.shape)}")
    dev = generator.device if generator is not None else x.device
    noise = (torch.rand((b, 2, *dims), generator=generator, device=dev) * 2 - 1).to(x.device, torch.float32)
    disp = GaussianFilter(len(dims), float(sigma)).to(x.device)(noise) * float(alpha)     # [B, 2, *shape]
    positions = []
    for axis, n in enumerate(dims):
        view = [1] * (len(dims) + 1)
        view[axis + 1] = n
        p = torch.arange(n, device=x.device, dtype=torch.float32).view(view)
        positions.append(p + disp[:, axis] if axis < 2 else p.expand(b, *dims))

    def norm(p: torch.Tensor, n: int) -> torch.Tensor:
        return p * (2.0 / max(n - 1, 1)) - 1.0

    # grid_sample's last dimension lists the coordinates fastest axis first (z, y, x)
    grid = torch.stack([norm(p, n) for p, n in zip(positions[::-1], dims[::-1])], dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def shuffle_boxes(batch: int, shape: Sequence[int], num_blocks: int = SHUFFLE_BLOCKS,
                  generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks of TransVW's local pixel shuffling: (corners, sides), int64 [batch, num_blocks, D] (D = 3 for
    volumes, 2 for images).

    Official ``local_pixel_shuffling``: per block and axis, side U{1 .. dim//10} (here at least 1 voxel when
    dim < 10), then corner U{0 .. dim - side}; all bounds inclusive.
    """
    d = len(shape)
    dims = torch.tensor([int(n) for n in shape], device=device)
    top = torch.tensor([max(int(n) // 10, 1) for n in shape], device=device)
    sides = randint_inclusive(1, top, (batch, num_blocks, d), generator, torch.device(device))
    corners = randint_inclusive(0, dims - sides, (batch, num_blocks, d), generator, torch.device(device))
    return corners, sides


def shuffle_within_boxes(x: torch.Tensor, corners: torch.Tensor, sides: torch.Tensor,
                         generator: torch.Generator | None = None,
                         max_side: Sequence[int] | None = None) -> torch.Tensor:
    """Permute, at random, the voxels of each box of each sample among themselves: x [B, C, X, Y, Z] (or
    [B, C, H, W] with boxes of 2 axes).

    corners / sides [B, k, D] (half-open boxes [corner, corner + side)); ``max_side`` (D ints), an upper
    bound of the sides, saves reading them back from the device. As the official loop, every box
    permutes the values of the INPUT x inside it, and where boxes overlap the later box (higher k) is what
    remains. Every channel gets the same permutation. One scatter resolves the overlaps (the last box
    covering a voxel wins) and one gather moves the values; no loop over samples or boxes.
    """
    b, c, *shape = x.shape
    dims = [int(n) for n in shape]
    d = len(dims)
    n = math.prod(dims)
    dev = x.device
    corners, sides = corners.to(dev, torch.int64), sides.to(dev, torch.int64)
    k = corners.shape[1]
    if k == 0 or b == 0:
        return x.clone()
    if max_side is None:
        max_side = sides.reshape(-1, d).amax(0).clamp_min(1).tolist()
    reach = [max(int(v), 1) for v in max_side]
    local = torch.stack(torch.meshgrid(*[torch.arange(r, device=dev) for r in reach], indexing="ij"),
                        -1).reshape(-1, d)
    m = local.shape[0]
    valid = (local < sides[:, :, None, :]).all(-1)                                    # [B, k, M]
    pos = corners[:, :, None, :] + local
    flat = pos[..., 0]
    for axis in range(1, d):
        flat = flat * dims[axis] + pos[..., axis]                                     # [B, k, M] raster index
    keys = torch.rand((b, k, m), generator=generator, device=_rng_device(x, generator)).to(dev)
    random_order = torch.where(valid, keys, 2.0).argsort(-1)                          # a box's voxels first, shuffled
    ar = torch.arange(m, device=dev)
    raster_order = torch.where(valid, ar, m + ar).argsort(-1)                         # a box's voxels first, in order
    ok = valid.gather(-1, raster_order)
    target = torch.where(ok, flat.gather(-1, raster_order), n).reshape(b, -1)        # n: a dummy voxel
    source = torch.where(ok, flat.gather(-1, random_order), n).reshape(b, -1)
    box = torch.arange(k, device=dev).view(1, k, 1).expand(b, k, m).reshape(b, -1)
    box = torch.where(ok.reshape(b, -1), box, -1)
    last = torch.full((b, n + 1), -1, dtype=torch.int64, device=dev).scatter_reduce(1, target, box, "amax")
    keep = (box >= 0) & (last.gather(1, target) == box)
    index = torch.arange(n + 1, device=dev).expand(b, n + 1).clone()
    index.scatter_(1, torch.where(keep, target, n), torch.where(keep, source, n))
    values = x.reshape(b, c, n).gather(2, index[:, None, :n].expand(b, c, n))
    return values.view_as(x)


def transvw_local_shuffle(x: torch.Tensor, generator: torch.Generator | None = None,
                          num_blocks: int = SHUFFLE_BLOCKS) -> torch.Tensor:
    """TransVW's local pixel shuffling of every sample of x [B, C, X, Y, Z] (official ``local_pixel_shuffling``).

    ``num_blocks`` (official 5) blocks from ``shuffle_boxes`` (drawn first, from ``generator``), shuffled by
    ``shuffle_within_boxes``. Applied to every sample (the loader chooses it with probability 1/4).
    """
    corners, sides = shuffle_boxes(x.shape[0], x.shape[2:], num_blocks, generator, _rng_device(x, generator))
    return shuffle_within_boxes(x, corners, sides, generator, [max(int(n) // 10, 1) for n in x.shape[2:]])


def painting_box(batch: int, shape: Sequence[int], low: Sequence[int], high: Sequence[int],
                 generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """One box per sample, side U{low .. high} per axis, corner U{3 .. dim - side - 3}: (corners, sides) [B, D]."""
    dev = torch.device(device)
    sides = torch.stack([randint_inclusive(lo, hi, (batch,), generator, dev) for lo, hi in zip(low, high)], -1)
    dims = torch.tensor([int(n) for n in shape], device=dev)
    corners = randint_inclusive(3, dims - sides - 3, (batch, len(shape)), generator, dev)
    return corners, sides


def box_mask(corners: torch.Tensor, sides: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """bool [B, 1, *shape]: True inside each sample's box [corner, corner + side) (corners / sides [B, D])."""
    d = len(shape)
    inside = None
    for a, n in enumerate(shape):
        ar = torch.arange(int(n), device=corners.device)
        along = (ar >= corners[:, a, None]) & (ar < corners[:, a, None] + sides[:, a, None])   # [B, n]
        view = [along.shape[0]] + [1] * d
        view[a + 1] = int(n)
        along = along.view(view)
        inside = along if inside is None else inside & along
    return inside[:, None]


def _check_paint_size(shape: Sequence[int], name: str) -> list[int]:
    dims = [int(s) for s in shape]
    if min(dims) < MIN_PAINT_SIZE:
        raise ValueError(f"{name}: every spatial size must be >= {MIN_PAINT_SIZE} voxels, got {tuple(dims)}")
    return dims


def transvw_inpaint(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """TransVW's in-painting of every sample of x [B, C, X, Y, Z] (official ``image_in_painting``).

    ONE box per sample of side U{dim//6 .. dim//3} per axis, corner U{3 .. dim - side - 3}, filled with
    uniform noise in [0, 1) (the same noise in every channel, as the official fills ``x[:, box]`` with one
    array); the rest is the input.
    """
    b = x.shape[0]
    dims = _check_paint_size(x.shape[2:], "transvw_inpaint")
    dev = _rng_device(x, generator)
    corners, sides = painting_box(b, dims, [d // 6 for d in dims], [d // 3 for d in dims], generator, dev)
    noise = torch.rand((b, 1, *dims), generator=generator, device=dev).to(x.device, x.dtype)
    return torch.where(box_mask(corners, sides, dims).to(x.device), noise, x)


def transvw_outpaint(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """TransVW's out-painting of every sample of x [B, C, X, Y, Z] (official ``image_out_painting``).

    Uniform noise in [0, 1) everywhere (drawn per channel, as the official's ``np.random.rand(*x.shape)``)
    except ONE window per sample of side dim - U{3 dim//7 .. 4 dim//7} per axis, corner
    U{3 .. dim - side - 3}, where the input is kept.
    """
    b = x.shape[0]
    dims = _check_paint_size(x.shape[2:], "transvw_outpaint")
    dev = _rng_device(x, generator)
    corners, sides = painting_box(b, dims, [d - 4 * d // 7 for d in dims], [d - 3 * d // 7 for d in dims],
                                  generator, dev)
    noise = torch.rand(x.shape, generator=generator, device=dev).to(x.device, x.dtype)
    return torch.where(box_mask(corners, sides, dims).to(x.device), x, noise)


def one_of_four(x: torch.Tensor, generator: torch.Generator | None = None,
                perturbations: str = "transvw") -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly one of four perturbations per sample, each with probability 1/4 (official ``TransVW_Dataset``).

    0: local pixel shuffling, 1: non-linear intensity, 2: in-painting, 3: out-painting. ``perturbations``:
    ``transvw`` (TransVW's own forms: ``transvw_local_shuffle``, ``nonlinear_intensity``, ``transvw_inpaint``,
    ``transvw_outpaint``) or ``genesis`` (Models Genesis' forms from parts/perturbations.py, each with probability 1).
    Returns (perturbed x, kind [B] int64). All four are computed for the batch and one is kept per sample.
    """
    if perturbations not in PERTURBATIONS:
        raise ValueError(f"one_of_four: perturbations {perturbations!r}; expected one of {', '.join(PERTURBATIONS)}")
    b = x.shape[0]
    kind = torch.randint(0, 4, (b,), generator=generator, device=_rng_device(x, generator)).to(x.device)
    if perturbations == "genesis":
        variants = (local_pixel_shuffle(x, prob=1.0, generator=generator),
                    nonlinear_intensity(x, prob=1.0, generator=generator),
                    paint(x, prob=1.0, inpaint_rate=1.0, generator=generator),
                    paint(x, prob=1.0, inpaint_rate=0.0, generator=generator))
    else:
        variants = (transvw_local_shuffle(x, generator),
                    nonlinear_intensity(x, prob=1.0, generator=generator),
                    transvw_inpaint(x, generator),
                    transvw_outpaint(x, generator))
    out = variants[0]
    for i in (1, 2, 3):
        out = _per_sample(kind == i, variants[i], out)
    return out, kind


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean CE over the samples with weight 1 (0 when none): logits [B, C], target [B], weight [B] in {0, 1}."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    w = weight.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------

def transvw_objective(restored: torch.Tensor, target: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor,
                      has_class: torch.Tensor, lambda_rec: float, lambda_cls: float
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TransVW's joint objective (the module docstring's L; official weights 1 and 0.01 in ``pytorch/train.py``),
    L = lambda_rec MSE(restored, target) + lambda_cls CE(logits, visual word), the CE over the samples that belong
    to a visual word (``has_class``); with the logged terms, the word accuracy and the fraction of samples in a
    word. Shared by the 3D and the 2D form."""
    mse = F.mse_loss(restored, target)
    ce = masked_cross_entropy(logits, classes, has_class)
    loss = lambda_rec * mse + lambda_cls * ce
    hit = (logits.detach().argmax(dim=1) == classes).float() * has_class
    acc = hit.sum() / has_class.float().sum().clamp_min(1.0)
    return loss, {"mse": mse.detach(), "ce": ce.detach(), "acc": acc.detach(),
                  "vw_fraction": has_class.float().mean().detach()}


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
    """The module whose output is the encoder's bottleneck, and its channels
    (:func:`sslbench.models.backbones.bottleneck_module`: SwinUNETR ``encoder10``, the 1/32-scale map; unet3d
    ``down_tr512``, 1/8; basicunet ``down_4``, 1/16)."""
    return bottleneck_module(net, model_name)


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
    Params = TransVWParams
    transfers_decoder = True

    def __init__(self, params: "TransVWParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.resize, self.crop, self.embed_grid = p.resize, p.crop, p.embed_grid
        self.model_name = str(self.model_cfg.get("name", "swinunetr"))
        check_crop(self.name, self.model_name, self.crop, self.resize)   # the crop against the backbone
        self.num_classes, self.instances, self.min_distance = p.num_classes, p.instances, p.min_distance
        self.multires_rate = 1.0 - 1.0 / p.multires_patches
        self.multires_size, self.multires_shift = p.multires_size, p.multires_shift
        self.elastic, self.elastic_alpha, self.elastic_sigma = p.elastic, p.elastic_alpha, p.elastic_sigma
        self.lambda_rec, self.lambda_cls, self.perturbations = p.lambda_rec, p.lambda_cls, p.perturbations

        # the fine-tuning network itself (1 input, 1 output channel), so its keys are the fine-tuning layout
        self.net = build_model(self.model_cfg, in_channels=1, out_channels=1)
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

    @classmethod
    def input_size(cls, params: "TransVWParams | Mapping[str, Any]") -> tuple[int, int, int] | None:
        return cls.typed(params).resize

    #: self-discovery needs only each volume's embedding: the streaming loader computes them from the case cache
    streams_prepare = True

    @torch.no_grad()
    def prepare(self, corpus: torch.Tensor, seed: int) -> None:
        """Self-discovery of the visual words on the whole corpus [N, 1, *resize] (deterministic in seed)."""
        self.discover(torch.cat([self.volume_features(chunk) for chunk in corpus.split(64)]), seed)

    @torch.no_grad()
    def volume_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """Each volume's self-discovery feature (:func:`volume_embedding`), [B, D] on the CPU."""
        if tuple(volumes.shape[2:]) != self.resize:
            raise RecipeError(f"method.params.resize: {list(self.resize)} for method {self.name}, but the corpus "
                              f"volumes are {list(volumes.shape[2:])}")
        return volume_embedding(volumes, self.embed_grid).cpu()

    @torch.no_grad()
    def discover(self, feats: torch.Tensor, seed: int) -> None:
        """Self-discovery from every corpus volume's feature [N, D] (corpus order; deterministic in seed): class
        references, their K nearest members and radius, one coordinate per class."""
        refs, members, radius, coords = discover_visual_words(feats, self.num_classes, self.instances, self.resize,
                                                              self.crop, self.min_distance, seed)
        store_visual_words(self, feats, refs, members, radius, coords)

    def visual_word_labels(self, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each volume: (a class it is a member of, drawn at random; whether it is a member of any).

        Membership: feature distance to the class reference <= ``vw_radius`` (+ a 1e-4 relative margin
        for recomputation rounding). A volume of no class gets a random class and False.
        """
        return assign_visual_words(volume_embedding(volumes, self.embed_grid), self.vw_refs, self.vw_radius)

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
        return crop_boxes(volumes, starts, sizes, self.crop)

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.vw_coords.shape[0] != self.num_classes:
            raise RuntimeError("TransVW.forward before prepare(): the visual words are not discovered yet")
        if tuple(volumes.shape[2:]) != self.resize:
            raise ValueError(f"transvw: volumes {list(volumes.shape[2:])} are not of the visual words' grid "
                             f"method.params.resize {list(self.resize)}")
        with torch.autocast(volumes.device.type, enabled=False):
            classes, has_class = self.visual_word_labels(volumes)
            target = self.instances_of(volumes, classes)
            x = elastic_deform(target, self.elastic_alpha, self.elastic_sigma) if self.elastic else target
            x, _ = one_of_four(x, perturbations=self.perturbations)
        restored = torch.sigmoid(self.net(x).float())
        logits = self.head(self._bottleneck)
        self._bottleneck = None
        return transvw_objective(restored, target, logits, classes, has_class, self.lambda_rec, self.lambda_cls)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder and decoder of the restoration network, fine-tuning key layout."""
        return transferable_state(self.net, self.model_name)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The classification head, and the visual words (coordinates, members) for the record."""
        out = {f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        out.update({k: getattr(self, k).detach().cpu().clone() for k in ("vw_coords", "vw_members")})
        return out


# --------------------------------------------------------------------------------------------------
# The 2D form (ChestX-ray14 track, issue 23)
# --------------------------------------------------------------------------------------------------
# The ledger of the 2D form is TransVW2D's docstring.

def image_embedding(images: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Training-free image feature: [N, 1, H, W] average-pooled to ``grid`` and flattened, [N, prod(grid)] fp32."""
    return F.adaptive_avg_pool2d(images.float(), tuple(int(g) for g in grid)).flatten(1)


def multires_windows(corner: torch.Tensor, crop: Sequence[int], image: Sequence[int], jitter: torch.Tensor,
                     side_range: tuple[int, int], reach: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, sizes) [B, 2] of each instance's window: the exact crop at ``corner`` [B, 2] where not ``jitter``,
    else a square of side U{side_range} shifted by U{-reach .. reach - 1} per axis (official randint(-d, d)), both
    clamped into the image."""
    b, dev = corner.shape[0], corner.device
    exact = torch.tensor([float(c) for c in crop], device=dev).expand(b, 2)
    side = randint_inclusive(side_range[0], side_range[1], (b, 1), None, dev).float().expand(b, 2)
    side = torch.minimum(side, torch.tensor([float(s) for s in image], device=dev))
    shift = randint_inclusive(-reach, max(reach - 1, -reach), (b, 2), None, dev).float()
    sizes = torch.where(jitter[:, None], side, exact)
    starts = torch.where(jitter[:, None], corner.float() + shift, corner.float())
    limit = torch.tensor([float(s) for s in image], device=dev) - sizes
    return torch.minimum(starts.clamp_min(0.0), limit), sizes


class ClassificationHead2D(nn.Module):
    """Visual-word classifier on the encoder's last map: conv 3x3 (to ``width``) -> BatchNorm -> ReLU -> GAP -> FC."""

    def __init__(self, channels: int, num_classes: int, width: int = 1024):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))


class TransVW2D(PretrainMethod):
    """TransVW pre-training on the 2D track's images [B, 1, H, W] in [0, 1].

    TransVW in 2D (the Table 4 row "TransVW"): the same three steps on the 2D track's image stack [N, 1, H, W]
    (whole radiographs at the task's ``preprocess.size``), with PCRL's ResNet-18 U-Net (sslbench/models/unet2d.py).

    1. Self-discovery (``prepare``): every pre-training image gets a feature (``image_embedding``, the image
       average-pooled to ``embed_grid``); C references drawn without replacement, each with its K nearest images
       (the reference first) and one crop corner drawn on the image grid, at least ``min_distance`` px from the
       earlier classes' (``discover_visual_words``, the 3D form's rule). Visual word c = the patch at class c's
       coordinate of each of its K images: an anatomical pattern at a fixed position of similar radiographs.
    2. Self-classification + self-restoration (``forward``): a batch image gets one class it is a member of
       (``assign_visual_words``); its instance is the patch at that class's coordinate (exact with probability
       1 / ``multires_patches``, else a square of side 50..79 px of 64 shifted by -10..9 px per axis, resized to the
       crop); the instance is elastically deformed and then perturbed by ONE of TransVW's four perturbations
       (``one_of_four``); the U-Net restores the undeformed instance (sigmoid, MSE) and a classification head on the
       encoder's last map (conv 3x3 -> BN -> ReLU -> GAP -> FC) names the class:

           L = lambda_rec * MSE(sigmoid(f(x~)), x) + lambda_cls * CE(head(f_enc(x~)), c).

    Ledger (2D form; the module docstring's 3D rows apply where they are not repeated here):
    * No official 2D code: fhaghighi/TransVW holds 3D code only (self_discovery/pattern_generator_3D.py,
      feature_extractor.py, train_autoencoder.py, pytorch/ and keras/ train.py, data_loader.py, config.py; files
      listed), and so does fhaghighi/SemanticGenesis. The paper (IEEE TMI 2021) reports 2D results on ChestX-ray14;
      the stored copies of its text available here stop at the abstract, so no 2D setting of the paper is taken
      from it. Every rule below is the 3D official rule per axis (derived, not transcribed). No key.
    * Instance size: 64 x 64 px (``crop``), the official instance's in-plane size (``input_rows`` x ``input_cols``
      = 64 x 64 of the 64 x 64 x 32 cube), so the multi-resolution ranges keep the official pixel numbers
      (side 50..79, shift -10..9). On a 224 px radiograph a word covers ~29% of the side. Any two multiples of 32
      (the U-Net's depth): ``--set method.params.crop=[96,96]``.
    * Multi-resolution side: ONE side for both axes (the official ``randPatchSize`` squares); a window that leaves
      the image is clamped into it (the official draws again until it fits). No key.
    * Coordinates: uniform over the image, >= ``min_distance`` px apart. The official 3D draw also keeps 100 px
      from the x-y borders and rejects windows by a CT lung-air test (HU -150 over 3 slices); neither has a
      radiograph meaning. No key.
    * Self-discovery feature: the image average-pooled to ``embed_grid`` = 16 x 16 (256-d, a coarse layout of the
      chest) instead of the global-average-pooled bottleneck of an auto-encoder (512-d in 3D). No key.
    * Perturbations: TransVW's own (``perturbations: transvw``) on the 2D instance: local shuffling of 5 blocks of
      side 1..dim//10 per axis, one in-painted box of side dim//6..dim//3, one out-painting window of side
      dim - (3 dim//7 .. 4 dim//7), the Bezier intensity map; the 3D functions run per axis unchanged (3D results
      bit-identical). The elastic deformation displaces both image axes (the official's x-y plane), alpha 991,
      sigma 8 px. ``perturbations: genesis`` gives Models Genesis' forms, as in 3D.
    * Classification head: conv 3x3 to ``head_width`` = 1024 channels (the official ``ClassificationHead``'s
      1024) -> BatchNorm -> ReLU -> GAP -> FC on the encoder's 1/32 map (2 x 2 at 64 px), the head as the
      official YNet's on its 512-channel bottleneck. Logits + cross-entropy (the official Softmax then log + CE is
      the same function).
    * Batch 64 instances (the official ``train.py``'s argparse default, which overrides config.py's 12); AdamW +
      warmup-cosine, the shared protocol (official Adam 1e-3, StepLR, early stopping), as in 3D.

    Buffers (in checkpoints): ``vw_coords`` [C, 2] crop corners (row, column), ``vw_members`` [C, K] image indices,
    ``vw_refs`` [C, D] reference features, ``vw_radius`` [C]. ``prepare`` must run before training and before a
    checkpoint is loaded (it sizes the buffers).
    """

    name = "transvw"
    Params = TransVW2DParams
    transfers_decoder = True

    def __init__(self, params: "TransVW2DParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.crop, self.embed_grid = p.crop, p.embed_grid
        self.num_classes, self.instances, self.min_distance = p.num_classes, p.instances, p.min_distance
        self.multires_rate = 1.0 - 1.0 / p.multires_patches
        self.side_range = (round(self.crop[0] * p.multires_size[0]), round(self.crop[0] * p.multires_size[1]))
        self.reach = max(round(self.crop[0] * p.multires_shift), 0)
        self.elastic, self.elastic_alpha, self.elastic_sigma = p.elastic, p.elastic_alpha, p.elastic_sigma
        self.lambda_rec, self.lambda_cls, self.perturbations = p.lambda_rec, p.lambda_cls, p.perturbations
        self.net = UNet2D(model_cfg, in_channels=1, out_channels=1)
        self.head = ClassificationHead2D(self.net.widths[-1], self.num_classes, p.head_width)
        self.image_size: tuple[int, int] | None = None
        self.register_buffer("vw_coords", torch.zeros(0, 2, dtype=torch.int64))
        self.register_buffer("vw_members", torch.zeros(0, 0, dtype=torch.int64))
        self.register_buffer("vw_refs", torch.zeros(0, math.prod(self.embed_grid)))
        self.register_buffer("vw_radius", torch.zeros(0))

    @classmethod
    def pixels_per_image(cls, params: "TransVW2DParams | Mapping[str, Any]", size: tuple[int, int]) -> float:
        """Encoder input pixels per image and step (feasibility): one instance of the crop's size."""
        crop = cls.typed(params).crop
        return crop[0] * crop[1]

    def _check_images(self, images: torch.Tensor) -> tuple[int, int]:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if images.dim() != 4 or any(s < c for s, c in zip(size, self.crop)):
            raise RecipeError(f"method.params.crop: {list(self.crop)} for method transvw (2D), but the images are "
                              f"{list(images.shape[1:])}; expected [1, H, W] images at least the crop's size "
                              f"(task.preprocess.size)")
        return size

    @torch.no_grad()
    def prepare(self, corpus: torch.Tensor, seed: int) -> None:
        """Self-discovery of the visual words on every pre-training image [N, 1, H, W] (deterministic in seed)."""
        images = corpus
        self.image_size = self._check_images(images)
        feats = torch.cat([image_embedding(chunk, self.embed_grid).cpu() for chunk in images.split(256)])
        refs, members, radius, coords = discover_visual_words(feats, self.num_classes, self.instances,
                                                              self.image_size, self.crop, self.min_distance, seed)
        store_visual_words(self, feats, refs, members, radius, coords)

    def instances_of(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Each image's patch at its class's coordinate, multi-resolution jittered: [B, 1, *crop]."""
        jitter = torch.rand(images.shape[0], device=images.device) < self.multires_rate
        starts, sizes = multires_windows(self.vw_coords[classes], self.crop, images.shape[-2:], jitter,
                                         self.side_range, self.reach)
        return crop_boxes(images, starts, sizes, self.crop)

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.vw_coords.shape[0] != self.num_classes:
            raise RuntimeError("TransVW2D.forward before prepare(): the visual words are not discovered yet")
        images = volumes
        if self._check_images(images) != self.image_size:
            raise ValueError(f"transvw (2D): images {list(images.shape[-2:])} are not of the visual words' grid "
                             f"{list(self.image_size or ())}")
        with torch.autocast(images.device.type, enabled=False):   # views in fp32 under the protocol's bf16
            classes, has_class = assign_visual_words(image_embedding(images, self.embed_grid), self.vw_refs,
                                                     self.vw_radius)
            target = self.instances_of(images, classes)
            x = elastic_deform(target, self.elastic_alpha, self.elastic_sigma) if self.elastic else target
            x, _ = one_of_four(x, perturbations=self.perturbations)
        feats = self.net.encoder(x)
        restored = torch.sigmoid(self.net.head(self.net.decoder(feats)).float())
        logits = self.head(feats[-1])
        return transvw_objective(restored, target, logits, classes, has_class, self.lambda_rec, self.lambda_cls)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The U-Net's encoder and decoder (``encoder.*``, ``decoder.*``; the restoration conv is not transferred)."""
        return {k: v for k, v in self.net.state_dict().items() if k.startswith(("encoder.", "decoder."))}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The classification head and restoration conv, and the visual words (coordinates, members)."""
        out = {f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        out.update({f"restore.{k}": v.detach().cpu().clone() for k, v in self.net.head.state_dict().items()})
        out.update({k: getattr(self, k).detach().cpu().clone() for k in ("vw_coords", "vw_members")})
        return out
