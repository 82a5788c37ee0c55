"""SwinUNETR's encoder1 on a 1-channel crop, computed faster (the same function and gradients).

encoder1 is MONAI's residual block at full resolution on the single-channel input: the costliest part of a VoCo
teacher-student step (BENCHMARKS.md, "VoCo pre-training"). Two forms, both exact up to rounding:

* ``pooled_input_block``: where a method only needs the block's output averaged over space (the pooled Swin
  encoder of VoCo's teacher-student variant and SimSiam), the two single-channel branches are linear in the crop,
  so their instance norms follow from the crop's 27 x 27 tap covariance and only conv2's map is full size.
  ``use_pooled_stems`` gives every qualifying block a ``pooled_forward`` (the methods' parts ask for it by that
  name and fall back to ``block(x).mean`` without it);
* ``conv_as_matmul``: a 1-input-channel 'same' convolution as one matrix product over shifted copies on CUDA,
  which cuDNN computes slowly; used for a pooled encoder's stem that does not qualify for the pooled form.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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


def is_pooled_input_block(block: nn.Module) -> bool:
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
    ``is_pooled_input_block`` to see whether a block qualifies.
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


class _PooledStem:
    """Mixin of a qualifying block (``is_pooled_input_block``): its spatial mean by ``pooled_input_block``."""

    def pooled_forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_input_block(self, x)


_POOLED_CLASSES: dict[type, type] = {}


def use_pooled_stems(module: nn.Module) -> int:
    """For every pooled encoder inside ``module`` (a submodule with ``pooled_stem()``, e.g. the methods'
    ``PooledSwinEncoder`` with all stages): its stem (SwinUNETR's encoder1) gets ``pooled_forward`` where
    ``is_pooled_input_block`` holds (same parameters and keys: a subclass of its own class); otherwise its
    1-channel convolutions run as ``conv_as_matmul`` on CUDA. Returns how many stems got the pooled form."""
    count = 0
    for m in list(module.modules()):
        stem = m.pooled_stem() if callable(getattr(m, "pooled_stem", None)) else None
        if stem is None or hasattr(stem, "pooled_forward"):
            continue
        if is_pooled_input_block(stem):
            cls = type(stem)
            if cls not in _POOLED_CLASSES:
                _POOLED_CLASSES[cls] = type(f"Pooled{cls.__name__}", (_PooledStem, cls), {})
            stem.__class__ = _POOLED_CLASSES[cls]
            count += 1
        else:
            use_single_channel_convs(stem)   # its 3^3 and 1^3 convolutions of the 1-channel crop
    return count
