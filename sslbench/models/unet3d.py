"""The 3D U-Net of Models Genesis, TransVW and PCRL (Zhou et al., MedIA 2021; the ``UNet3D`` of the official
``MrGiovanni/ModelsGenesis`` ``pytorch/unet3d.py``, which TransVW and PCRL reuse), written for sslbench.

Architecture (base width ``b``; the official network is ``b = 32``)::

    level d = 0..3 (encoder):  conv3x3x3(-> b*2^d) BN ReLU, conv3x3x3(-> b*2^(d+1)) BN ReLU, maxpool 2 (not at d=3)
        widths 1 -> 32 -> 64 | 64 -> 64 -> 128 | 128 -> 128 -> 256 | 256 -> 256 -> 512     (3 poolings)
    level d = 2..0 (decoder):  transposed conv 2x2x2 (stride 2, width kept), concat the skip of level d,
                               conv3x3x3(-> b*2^(d+1)) BN ReLU, conv3x3x3(-> b*2^(d+1)) BN ReLU
        widths 512+256 -> 256 | 256+128 -> 128 | 128+64 -> 64
    head:                      conv1x1x1(64 -> classes)

The parameter names are the official ones (``down_tr64.ops.0.conv1.weight``, ``up_tr256.up_conv.weight``,
``out_tr.final_conv.weight``, ...), so the released Models Genesis / TransVW / PCRL weights
(``Genesis_Chest_CT.pt``: ``{"state_dict": {"module.down_tr64...."}}``) load through ``finetune --init`` as they
are. Inputs must be multiples of 8 in every dimension.

Two differences from the official module, both on purpose:

* ``forward`` returns logits; the official ``OutputTransition`` applies a sigmoid. Every sslbench method
  applies its own output function (Genesis / TransVW / PCRL: ``sigmoid`` before the MSE, exactly the official
  composition) and the fine-tuning losses take logits.
* Normalisation: the official ``ContBatchNorm3d`` normalises with the statistics of the current batch in train
  *and* eval mode (it calls ``F.batch_norm(..., training=True)`` always, updating the running buffers even in
  eval). ``norm="batch_stats"`` (the default) is that layer (:class:`BatchStatsNorm3d`); ``norm="batch"`` is a
  standard ``BatchNorm3d`` (running statistics at inference, the usual choice for sliding-window evaluation,
  where a batch of windows is not a batch of training crops). Recipe key: ``model.unet3d.norm``.
  Under DDP, ``SyncBatchNorm.convert_sync_batchnorm`` turns either into a standard synchronised BatchNorm.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch_stats", "batch")
ACTIVATIONS = ("relu", "prelu", "elu")
#: Encoder levels (attribute names of the official network), shallow to deep; the last one does not pool.
ENCODER_LEVELS = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")
#: Decoder levels, deep to shallow; ``up_trN`` joins the skip of the encoder level of width N.
DECODER_LEVELS = ("up_tr256", "up_tr128", "up_tr64")
#: The spatial size must be a multiple of this (three 2x poolings).
DIVISOR = 8


class BatchStatsNorm3d(nn.BatchNorm3d):
    """Batch normalisation that always uses the current batch's statistics (Models Genesis' ``ContBatchNorm3d``).

    In eval mode as in training: ``y = (x - mean_B(x)) / sqrt(var_B(x) + eps) * weight + bias`` over the batch
    and spatial dimensions, and the running buffers are still updated with ``momentum``, as the official layer
    does. Its state dict is a ``BatchNorm3d``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"BatchStatsNorm3d: expected a 5-D input [B, C, D, H, W], got {x.dim()}-D")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                            self.momentum if self.momentum is not None else 0.0, self.eps)


def _activation(name: str, channels: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "prelu":
        return nn.PReLU(channels)
    if name == "elu":
        return nn.ELU(inplace=True)
    raise ValueError(f"model.unet3d.act: expected one of {', '.join(ACTIVATIONS)}, got {name!r}")


class ConvNormAct(nn.Module):
    """conv 3x3x3 (padding 1, with bias) -> batch norm -> activation (the official ``LUConv``)."""

    def __init__(self, cin: int, cout: int, norm: str, act: str):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.bn1 = BatchStatsNorm3d(cout) if norm == "batch_stats" else nn.BatchNorm3d(cout)
        self.activation = _activation(act, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class EncoderLevel(nn.Module):
    """Two ConvNormAct at level ``depth``; ``forward`` returns the map before pooling (the skip)."""

    def __init__(self, cin: int, depth: int, base: int, norm: str, act: str):
        super().__init__()
        mid = base * 2 ** depth
        self.ops = nn.Sequential(ConvNormAct(cin, mid, norm, act), ConvNormAct(mid, 2 * mid, norm, act))
        self.out_channels = 2 * mid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x)


class DecoderLevel(nn.Module):
    """Transposed conv (x2, width kept), concat the skip, two ConvNormAct to ``base * 2^(depth+1)``."""

    def __init__(self, cin: int, depth: int, base: int, norm: str, act: str):
        super().__init__()
        out = base * 2 ** (depth + 1)
        self.up_conv = nn.ConvTranspose3d(cin, cin, kernel_size=2, stride=2)
        self.ops = nn.Sequential(ConvNormAct(cin + cin // 2, out, norm, act), ConvNormAct(out, out, norm, act))
        self.out_channels = out

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class Head(nn.Module):
    """conv 1x1x1 to the classes (logits; the official ``OutputTransition`` adds a sigmoid)."""

    def __init__(self, cin: int, classes: int):
        super().__init__()
        self.final_conv = nn.Conv3d(cin, classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)


class UNet3D(nn.Module):
    """Models Genesis' 3D U-Net (module docstring). ``encode`` / ``decode`` split the forward for methods
    that use the encoder's maps (SimSiam, PCRL, TransVW's classification head)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base: int = 32, norm: str = "batch_stats",
                 act: str = "relu"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"model.unet3d.norm: expected one of {', '.join(NORMS)}, got {norm!r}")
        if act not in ACTIVATIONS:
            raise ValueError(f"model.unet3d.act: expected one of {', '.join(ACTIVATIONS)}, got {act!r}")
        if base < 1:
            raise ValueError(f"model.unet3d.base: expected a width >= 1, got {base}")
        self.base = int(base)
        self.down_tr64 = EncoderLevel(in_channels, 0, base, norm, act)
        self.down_tr128 = EncoderLevel(2 * base, 1, base, norm, act)
        self.down_tr256 = EncoderLevel(4 * base, 2, base, norm, act)
        self.down_tr512 = EncoderLevel(8 * base, 3, base, norm, act)
        self.up_tr256 = DecoderLevel(16 * base, 2, base, norm, act)
        self.up_tr128 = DecoderLevel(8 * base, 1, base, norm, act)
        self.up_tr64 = DecoderLevel(4 * base, 0, base, norm, act)
        self.out_tr = Head(2 * base, out_channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return encode_unet3d(self, x)

    def decode(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return decode_unet3d(self, feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, s in enumerate(x.shape[2:]):
            if int(s) % DIVISOR:
                raise ValueError(f"unet3d: input size {list(x.shape[2:])} is not a multiple of {DIVISOR} "
                                 f"(axis {i}; the network pools three times)")
        return self.out_tr(self.decode(self.encode(x)))


def encode_unet3d(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's maps [skip 1/1, skip 1/2, skip 1/4, bottleneck 1/8] of any module holding the
    ``down_tr*`` levels under their names (the network itself, or a method's encoder copy)."""
    feats = []
    h = x
    for i, name in enumerate(ENCODER_LEVELS):
        h = getattr(m, name)(h)
        feats.append(h)
        if i < len(ENCODER_LEVELS) - 1:
            h = F.max_pool3d(h, 2)
    return feats


def decode_unet3d(m: nn.Module, feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """The last decoder map (before the head) from :func:`encode_unet3d`'s maps, for any module holding the
    ``up_tr*`` levels under their names."""
    s64, s128, s256, h = feats
    for name, skip in zip(DECODER_LEVELS, (s256, s128, s64)):
        h = getattr(m, name)(h, skip)
    return h
