"""The image transformations of Models Genesis, shared by the methods that reuse them (mg, its 2D form, PCRL,
TransVW with ``perturbations: genesis``, the supervised controls' crops).

Zhou, Sodha, Pang, Gotway, Liang. "Models Genesis", Medical Image Analysis 67:101840, 2021; official code
github.com/MrGiovanni/ModelsGenesis (``pytorch/utils.py``, ``pytorch/config.py``). A sub-volume x (intensities in
[0, 1]) goes through the paper's transformations g(.) in this order (its Fig. 1; probabilities of the official
``config.py``): flip of input AND target (``flip_pair``), local pixel shuffling (``local_pixel_shuffle``), the
Bezier non-linear intensity map (``nonlinear_intensity``), in- / out-painting (``paint``); ``genesis_views``
chains them (the official ``generate_pair``).

Every transformation is batched: each sample's random choices are drawn as tensors on the device and applied
with masks, ``torch.where``, ``gather``/``scatter`` and one ``grid_sample``; nothing loops over samples. MONAI's
``RandCoarseShuffle`` / ``RandCoarseDropout`` are per-sample array transforms (one random draw per call, run on
the loader's CPU), so they cannot transform a device batch with per-sample randomness; and neither matches the
paper exactly (see the functions' docstrings).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

#: the official ``config.py`` rates, paper order of application.
GENESIS_DEFAULTS: dict[str, float] = {"flip_rate": 0.4, "local_rate": 0.5, "nonlinear_rate": 0.9,
                                      "paint_rate": 0.9, "inpaint_rate": 0.2}
#: smallest spatial size the painting boxes fit in (out-painting windows keep 3 voxels off each border).
MIN_PAINT_SIZE = 14
#: samples of the Bezier curve's look-up table (the official uses 100,000 with np.interp; 1,000 with linear
#: interpolation is within 1e-6 of it for these smooth cubic curves)
BEZIER_POINTS = 1000



# --------------------------------------------------------------------------------------------------
# Random numbers as tensors
# --------------------------------------------------------------------------------------------------

def _device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    """Where random tensors are drawn: the generator's device (it must match x's), else x's."""
    return generator.device if generator is not None else x.device


def randint_inclusive(low: torch.Tensor | int, high: torch.Tensor | int, shape: Sequence[int],
                      generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Integers uniform in [low, high] (both inclusive, like Python's ``random.randint``), elementwise.

    ``low`` / ``high`` may be tensors broadcastable to ``shape`` (per-sample bounds), as int64.
    """
    low_t = torch.as_tensor(low, device=device, dtype=torch.int64)
    high_t = torch.as_tensor(high, device=device, dtype=torch.int64)
    u = torch.rand(tuple(shape), generator=generator, device=device)
    span = (high_t - low_t + 1).clamp_min(1)
    return low_t + torch.minimum((u * span).long(), span - 1)


def _where_sample(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample choice: a where mask[i] else b (mask [B], a / b [B, ...])."""
    return torch.where(mask.view((-1,) + (1,) * (a.dim() - 1)), a, b)


def _box_mask(starts: torch.Tensor, sizes: torch.Tensor, active: torch.Tensor,
              shape: Sequence[int]) -> torch.Tensor:
    """Union of the active boxes of each sample: bool [B, 1, *shape] (3D: [B, 1, X, Y, Z]; 2D: [B, 1, H, W]).

    starts / sizes [B, k, d] in voxels (half-open boxes [start, start + size)), active [B, k].
    """
    nd = len(shape)
    boxes = None
    for axis, n in enumerate(shape):
        ar = torch.arange(int(n), device=starts.device)
        s, z = starts[..., axis, None], sizes[..., axis, None]
        inside = (ar >= s) & (ar < s + z)                             # [B, k, n]
        inside = inside.view(*inside.shape[:2], *([1] * axis), int(n), *([1] * (nd - 1 - axis)))
        boxes = inside if boxes is None else boxes & inside
    return (boxes & active.view(*active.shape, *([1] * nd))).any(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# The four transformations (the paper's non-linear transformation, local pixel shuffling,
# out-painting and in-painting)
# --------------------------------------------------------------------------------------------------

def flip_pair(x: torch.Tensor, y: torch.Tensor, prob: float = 0.4,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flips of input x and target y [B, C, X, Y, Z] (official ``data_augmentation``).

    Official rule per sample: ``while random() < prob and count < 3: flip a random axis``. Batched: three
    draws u_1..u_3 and three axes a_1..a_3 per sample; flip k happens iff u_1..u_k < prob; an axis chosen
    an even number of times is not flipped, so each axis is flipped by its parity (one ``where`` per axis).
    """
    b, nd = x.shape[0], x.dim() - 2                                     # nd spatial axes (3; 2 in the 2D track)
    dev = _device(x, generator)
    u = torch.rand(b, 3, generator=generator, device=dev)
    axes = torch.randint(0, nd, (b, 3), generator=generator, device=dev)
    applied = (u < prob).long().cumprod(dim=1)                         # flip k only if flips 1..k-1 happened
    counts = (F.one_hot(axes, nd) * applied[..., None]).sum(dim=1)     # [B, nd] times each axis is flipped
    flip = (counts % 2 == 1).to(x.device)
    for axis in range(nd):
        x = _where_sample(flip[:, axis], x.flip(2 + axis), x)
        y = _where_sample(flip[:, axis], y.flip(2 + axis), y)
    return x, y


def block_shuffle(x: torch.Tensor, block_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly permute the voxels inside every block: x [B, C, X, Y, Z], block_ids int [B, X, Y, Z].

    Voxels with the same id form one block (any shape); every channel gets the same permutation. Two
    sorts of the flattened ids, one in raster order (stable) and one with random tie-breaks, list each
    block's voxels at the same positions; scattering the second list's values onto the first's voxels
    permutes every block within itself.
    """
    b, c = x.shape[:2]
    ids = block_ids.reshape(b, -1).to(device=x.device, dtype=torch.int64)
    n = ids.shape[1]
    dev = _device(x, generator)
    key = ids * (1 << 20) + torch.randint(0, 1 << 20, (b, n), generator=generator, device=dev).to(x.device)
    order_random = torch.argsort(key, dim=1)
    order_raster = torch.sort(ids, dim=1, stable=True).indices
    flat = x.reshape(b, c, n)
    values = flat.gather(2, order_random.unsqueeze(1).expand(b, c, n))
    out = torch.empty_like(flat).scatter_(2, order_raster.unsqueeze(1).expand(b, c, n), values)
    return out.view_as(x)


def _slab_index(b: int, n: int, max_size: int, generator: torch.Generator | None,
                device: torch.device) -> torch.Tensor:
    """Per sample, cut an axis of n voxels into consecutive slabs of random widths 1..max_size: [B, n] slab ids."""
    widths = randint_inclusive(1, max_size, (b, n), generator, device)
    offset = randint_inclusive(0, widths[:, :1] - 1, (b, 1), generator, device)   # first slab is cut short
    edges = widths.cumsum(dim=1) - offset
    coords = torch.arange(n, device=device).expand(b, n).contiguous()
    return torch.searchsorted(edges, coords, right=True)


def local_pixel_shuffle(x: torch.Tensor, prob: float = 0.5, generator: torch.Generator | None = None,
                        num_blocks: int = 10000) -> torch.Tensor:
    """Local pixel shuffling (the paper's transformation of that name), with probability prob per sample.

    Official (``local_pixel_shuffling``): 10,000 blocks of random side 1..dim//10 per axis at random
    positions, each shuffled from the original image (later blocks overwrite earlier ones). Batched form:
    each sample's volume is tiled by a rectilinear grid whose slab widths are random in 1..dim//10 per axis
    (so block sides vary as in the official), and each tile is shuffled with probability
    1 - exp(-num_blocks * E[block volume] / volume), the fraction of voxels that the official's
    ``num_blocks`` random blocks cover (about 80% of a 64^3 cube); the other tiles stay as they are. Unlike
    the official, shuffled blocks never overlap. MONAI's ``RandCoarseShuffle`` shuffles a few large holes
    (not a dense tiling of tiny blocks) and draws once per call on the CPU, so it is not used.
    """
    b, _, *shape = x.shape
    dev = _device(x, generator)
    max_sides = [max(int(n) // 10, 1) for n in shape]
    nd = len(shape)
    slabs = [_slab_index(b, int(n), m, generator, dev) for n, m in zip(shape, max_sides)]
    tiles = None                                   # mixed radix over the axes' slab ids: [B, *shape]
    for axis, (n, sl) in enumerate(zip(shape, slabs)):
        sl = sl.view(b, *([1] * axis), int(n), *([1] * (nd - 1 - axis)))
        tiles = sl if tiles is None else tiles * (int(n) + 1) + sl
    n_tiles = math.prod(int(n) + 1 for n in shape)
    voxels = math.prod(shape)
    mean_block = math.prod((m + 1) / 2 for m in max_sides)
    coverage = 1.0 - math.exp(-num_blocks * mean_block / voxels)
    chosen = torch.rand(b, n_tiles, generator=generator, device=dev) < coverage
    chosen = chosen.gather(1, tiles.reshape(b, -1)).view_as(tiles)
    raster = torch.arange(voxels, device=dev).view(1, *shape)
    ids = torch.where(chosen, tiles, n_tiles + raster)                 # an unchosen voxel is its own block
    shuffled = block_shuffle(x, ids.to(x.device), generator)
    apply = (torch.rand(b, generator=generator, device=dev) < prob).to(x.device)
    return _where_sample(apply, shuffled, x)



def bezier_map(x: torch.Tensor, control: torch.Tensor, invert: torch.Tensor,
               points: int = BEZIER_POINTS) -> torch.Tensor:
    """The paper's non-linear transformation (a Bezier intensity map) of each sample of x [B, ...] in [0, 1].

    The cubic Bezier curve P(t) = (1-t)^3 P0 + 3t(1-t)^2 P1 + 3t^2(1-t) P2 + t^3 P3 with P0 = (0, 0),
    P1 = (control[:, 0], control[:, 1]), P2 = (control[:, 2], control[:, 3]), P3 = (1, 1) is sampled at
    ``points`` values of t and used as a look-up table with linear interpolation (``np.interp`` in the
    official ``nonlinear_transformation``, batched with ``searchsorted``). With control points in [0, 1]
    the curve's x(t) and y(t) are non-decreasing, so the map is monotone with f(0) = 0, f(1) = 1.
    ``invert`` [B] bool: the official "flip" pairs sorted x(t) with y(1 - t), i.e. the curve whose y
    control values are reversed (1, y2, y1, 0): a decreasing map with f(0) = 1, f(1) = 0.
    """
    b = x.shape[0]
    control = control.to(device=x.device, dtype=torch.float32)
    t = torch.linspace(0.0, 1.0, points, device=x.device)
    basis = torch.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3])    # [4, T]
    zeros, ones = torch.zeros(b, device=x.device), torch.ones(b, device=x.device)
    xs = torch.stack([zeros, control[:, 0], control[:, 2], ones], dim=1) @ basis                # [B, T]
    y_up = torch.stack([zeros, control[:, 1], control[:, 3], ones], dim=1)
    y_down = torch.stack([ones, control[:, 3], control[:, 1], zeros], dim=1)
    ys = torch.where(invert.to(x.device).view(b, 1), y_down, y_up) @ basis                     # [B, T]
    v = x.reshape(b, -1).float().contiguous()
    hi = torch.searchsorted(xs.contiguous(), v).clamp(1, points - 1)
    lo = hi - 1
    x0, x1, y0, y1 = xs.gather(1, lo), xs.gather(1, hi), ys.gather(1, lo), ys.gather(1, hi)
    w = ((v - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0.0, 1.0)
    return (y0 + w * (y1 - y0)).view_as(x).to(x.dtype)


def nonlinear_intensity(x: torch.Tensor, prob: float = 0.9, generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's non-linear transformation with probability prob, per sample.

    Two random control points (uniform in [0, 1]^2) and an inversion with probability 1/2 per sample, as
    the official ``nonlinear_transformation``; the map itself is ``bezier_map`` (MONAI has no Bezier map).
    """
    b = x.shape[0]
    dev = _device(x, generator)
    control = torch.rand(b, 4, generator=generator, device=dev)
    invert = torch.rand(b, generator=generator, device=dev) < 0.5
    apply = (torch.rand(b, generator=generator, device=dev) < prob).to(x.device)
    return _where_sample(apply, bezier_map(x, control, invert), x)


def _painting_boxes(b: int, k: int, shape: Sequence[int], low: Sequence[int], high: Sequence[int],
                    generator: torch.Generator | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """k boxes per sample with sides in [low, high] per axis, kept 3 voxels off the borders: (starts, sizes)."""
    sizes = torch.stack([randint_inclusive(lo, hi, (b, k), generator, device) for lo, hi in zip(low, high)], -1)
    dims = torch.tensor([int(n) for n in shape], device=device)
    starts = randint_inclusive(3, dims - sizes - 3, (b, k, len(shape)), generator, device)
    return starts, sizes


def paint(x: torch.Tensor, prob: float = 0.9, inpaint_rate: float = 0.2,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's in-painting or out-painting with probability prob, per sample.

    In-painting (probability ``inpaint_rate``), official ``image_in_painting``: up to 5 boxes (another one
    while u < 0.95) of side U{dim//6 .. dim//3} per axis, 3 voxels off the border, filled with uniform
    noise. Out-painting, official ``image_out_painting``: the whole cube becomes uniform noise except 1 + up
    to 4 boxes (another one while u < 0.95) of side dim - U{3 dim//7 .. 4 dim//7} where the original is
    kept. Overlapping in-painting boxes share one noise volume, which leaves the union i.i.d. uniform as
    the official's successive fills do. MONAI's ``RandCoarseDropout`` (fill with random values, or keep
    only the holes with ``dropout_holes=False``) draws one set of holes per call on the CPU and has no
    0.95-continuation rule; the batched masks here are what a device training step needs.
    """
    b, _, *shape = x.shape
    if min(shape) < MIN_PAINT_SIZE:
        raise ValueError(f"paint: every spatial size must be >= {MIN_PAINT_SIZE} voxels, got {tuple(shape)}")
    dev = _device(x, generator)
    n = [int(s) for s in shape]
    in_starts, in_sizes = _painting_boxes(b, 5, n, [s // 6 for s in n], [s // 3 for s in n], generator, dev)
    in_active = (torch.rand(b, 5, generator=generator, device=dev) < 0.95).long().cumprod(1).bool()
    out_starts, out_sizes = _painting_boxes(b, 5, n, [s - 4 * s // 7 for s in n], [s - 3 * s // 7 for s in n],
                                            generator, dev)
    more = (torch.rand(b, 4, generator=generator, device=dev) < 0.95).long().cumprod(1).bool()
    out_active = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), more], dim=1)
    noise = torch.rand(x.shape, generator=generator, device=dev).to(device=x.device, dtype=x.dtype)
    in_mask = _box_mask(in_starts, in_sizes, in_active, n).to(x.device)
    keep_mask = _box_mask(out_starts, out_sizes, out_active, n).to(x.device)
    inpainted = torch.where(in_mask, noise, x)
    outpainted = torch.where(keep_mask, x, noise)
    do_paint = (torch.rand(b, generator=generator, device=dev) < prob).to(x.device)
    use_in = (torch.rand(b, generator=generator, device=dev) < inpaint_rate).to(x.device)
    painted = _where_sample(use_in, inpainted, outpainted)
    return _where_sample(do_paint, painted, x)


def genesis_views(x: torch.Tensor, params: Mapping[str, Any] | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of Models Genesis for sub-volumes x [B, C, X, Y, Z] in [0, 1] (official ``generate_pair``).

    Order: flip (input and target) -> local pixel shuffling -> non-linear intensity -> in/out-painting.
    Rates from ``params`` (``flip_rate``, ``local_rate``, ``nonlinear_rate``, ``paint_rate``,
    ``inpaint_rate``), defaulting to the official ``config.py`` (GENESIS_DEFAULTS).
    """
    p = {**GENESIS_DEFAULTS, **{k: v for k, v in (params or {}).items() if k in GENESIS_DEFAULTS}}
    inp, target = flip_pair(x, x, prob=float(p["flip_rate"]), generator=generator)
    inp = local_pixel_shuffle(inp, prob=float(p["local_rate"]), generator=generator)
    inp = nonlinear_intensity(inp, prob=float(p["nonlinear_rate"]), generator=generator)
    inp = paint(inp, prob=float(p["paint_rate"]), inpaint_rate=float(p["inpaint_rate"]), generator=generator)
    return inp, target
