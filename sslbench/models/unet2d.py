"""The 2D backbone of PCRL's ChestX-ray protocol: a U-Net with a ResNet-18 encoder (``model.name: unet2d``).

Facts from the official 2D code (Luchixiang/PCRL ``pytorch/models/pcrl_model.py``, which PCRLv2's 2D track and the
Table 4 numbers of the VoCo supplement follow): ``segmentation_models_pytorch.Unet('resnet18', ...)``, i.e.

    encoder:  torchvision ResNet-18 stem + layer1..4 -> maps at strides 2, 4, 8, 16, 32 with 64, 64, 128, 256, 512
              channels (here: ``timm.create_model('resnet18', features_only=True)``, the same ResNet-18)
    decoder:  5 blocks with decoder_channels (256, 128, 64, 32, 16): nearest x2 upsampling, concatenation of the
              encoder map of that stride (none in the last block), two 3x3 conv -> BatchNorm -> ReLU
    head:     3x3 conv 16 -> classes (segmentation); methods use the encoder's last map pooled (``avg_pool`` ->
              ``fc``) for their embeddings, and the ChestX-ray14 fine-tuning uses global average pool -> Linear(14)

Deviations (the ledger of this backbone):

* Input channels: the official network takes 3 channels (grey replicated) because it loads ImageNet weights by
  default; sslbench feeds the 1 grey channel (``in_chans=1``). With ``model.pretrained_2d: imagenet`` timm sums
  the ImageNet ``conv1`` kernel over its 3 input channels, which gives exactly the 3-channel response to a
  replicated grey image, so the two are the same function at initialisation.
* ImageNet weights are OFF by default (``model.pretrained_2d: none``): the official default loads them
  (``encoder_weights='imagenet'`` in PCRL's fine-tuning); ``--set model.pretrained_2d=imagenet`` restores it
  (timm's ``resnet18`` weights, which needs them in the local timm / Hugging Face cache or a network). Every row of
  Table 4, From scratch included, runs on the same setting.
* Decoder initialisation: PyTorch's default instead of the official kaiming-uniform (fan_in) decoder init.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError

#: ``model.unet2d`` defaults: the encoder (a timm model name) and the decoder widths of smp's Unet.
UNET2D_DEFAULTS: dict[str, Any] = {"encoder": "resnet18", "decoder_channels": [256, 128, 64, 32, 16]}
PRETRAINED_2D = ("none", "imagenet")


def unet2d_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``model.unet2d`` resolved with its defaults, plus ``pretrained`` from ``model.pretrained_2d``."""
    u = {**UNET2D_DEFAULTS, **dict(model_cfg.get("unet2d") or {})}
    pre = str(model_cfg.get("pretrained_2d", "none"))
    if pre not in PRETRAINED_2D:
        raise RecipeError(f"model.pretrained_2d: expected one of {', '.join(PRETRAINED_2D)}, got {pre!r}")
    return {"encoder": str(u["encoder"]), "decoder_channels": [int(c) for c in u["decoder_channels"]],
            "pretrained": pre}


def build_encoder(model_cfg: Mapping[str, Any], in_channels: int = 1) -> nn.Module:
    """The timm feature extractor (5 maps, strides 2..32) named by ``model.unet2d.encoder``."""
    import timm

    c = unet2d_config(model_cfg)
    try:
        return timm.create_model(c["encoder"], pretrained=c["pretrained"] == "imagenet", features_only=True,
                                 in_chans=in_channels)
    except (RuntimeError, OSError, ValueError) as exc:   # unknown name, or weights not reachable
        first = " ".join(str(exc).split())[:160]
        raise RecipeError(f"model.unet2d.encoder={c['encoder']!r} with model.pretrained_2d={c['pretrained']}: "
                          f"timm could not build it ({first})") from None


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Nearest x2 upsampling, concatenation of the skip (if any), two conv-BN-ReLU (smp's ``DecoderBlock``)."""

    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.conv1 = ConvBNReLU(cin + skip, cout)
        self.conv2 = ConvBNReLU(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """The decoder over the encoder's maps (shallow to deep); returns the last (full-resolution) map."""

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int]):
        super().__init__()
        deep = list(encoder_channels)[::-1]               # 512, 256, 128, 64, 64
        ins = [deep[0]] + list(decoder_channels[:-1])
        skips = deep[1:] + [0] * (len(decoder_channels) - len(deep) + 1)
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        deep = list(feats)[::-1]
        x = deep[0]
        for i, block in enumerate(self.blocks):
            x = block(x, deep[i + 1] if i + 1 < len(deep) else None)
        return x


class UNet2D(nn.Module):
    """ResNet-18 U-Net (PCRL's 2D network): ``encoder`` (timm), ``decoder`` and a 3x3 conv ``head``."""

    def __init__(self, model_cfg: Mapping[str, Any], in_channels: int = 1, out_channels: int = 1):
        super().__init__()
        c = unet2d_config(model_cfg)
        self.encoder = build_encoder(model_cfg, in_channels)
        self.widths = list(self.encoder.feature_info.channels())
        self.decoder = UNetDecoder(self.widths, c["decoder_channels"])
        self.head = nn.Conv2d(c["decoder_channels"][-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))


class UNet2DClassifier(nn.Module):
    """The ChestX-ray14 fine-tuning network: the U-Net's encoder -> global average pool of its last map -> Linear."""

    def __init__(self, model_cfg: Mapping[str, Any], n_outputs: int, in_channels: int = 1):
        super().__init__()
        self.encoder = build_encoder(model_cfg, in_channels)
        self.head = nn.Linear(self.encoder.feature_info.channels()[-1], n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1].mean(dim=(2, 3)))

