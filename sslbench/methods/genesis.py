"""Models Genesis: restore the original sub-volume from a transformed copy.

Zhou, Sodha, Pang, Gotway, Liang. "Models Genesis", Medical Image Analysis 67:101840, 2021 (MICCAI 2019
version: "Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis"); official code
github.com/MrGiovanni/ModelsGenesis (``pytorch/utils.py``, ``pytorch/config.py``).

A random sub-volume x of a CT volume (intensities in [0, 1]) goes through the paper's image
transformations g(.) in this order (its Fig. 1; probabilities of the official ``config.py``):

1. flip, applied to input AND target (``flip_pair``; the four are in sslbench/methods/parts/perturbations.py,
   shared with the 2D form below, PCRL and TransVW): "while u < 0.4 and at most 3 times: flip a random
   axis" (``data_augmentation``);
2. local pixel shuffling, p = 0.5 (``local_pixel_shuffle``);
3. non-linear intensity transformation, p = 0.9: a Bezier map through (0,0), two random control points,
   (1,1), inverted half the time (``nonlinear_intensity``);
4. painting, p = 0.9: in-painting with p = 0.2, out-painting otherwise (``paint``).

The full encoder-decoder network f restores the target:  L = MSE(sigmoid(f(g(x))), x)  (the paper's
restoration objective, an L2 distance between restored and original sub-volumes). Encoder and decoder
are both transferred.

Every transformation is batched on the device (nothing loops over samples). The 2D form
(``ModelsGenesis2D``, the ChestX-ray14 track of issue 23) is at the end of this file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..models.backbones import build_model, transferable_state
from ..models.unet2d import UNet2D
from .base import PretrainMethod
from .params import Attention, MethodParams, positive, probability
from .parts.perturbations import GENESIS_DEFAULTS, MIN_PAINT_SIZE, genesis_views
from .parts.views import check_crop, crop_boxes, random_crop_starts


@dataclass(frozen=True)
class GenesisRates(MethodParams):
    """The probabilities of the four transformations (official pytorch/config.py; = GENESIS_DEFAULTS of
    parts.perturbations)."""

    flip_rate: float = field(default=0.4, metadata=probability())
    """flip input and target while u < flip_rate, at most 3 times (official flip_rate 0.4, utils.data_augmentation)."""
    local_rate: float = field(default=0.5, metadata=probability())
    """local pixel shuffling (official local_rate 0.5, utils.local_pixel_shuffling)."""
    nonlinear_rate: float = field(default=0.9, metadata=probability())
    """Bezier intensity map, inverted half the time (official nonlinear_rate 0.9, utils.nonlinear_transformation)."""
    paint_rate: float = field(default=0.9, metadata=probability())
    """painting (official paint_rate 0.9) ..."""
    inpaint_rate: float = field(default=0.2, metadata=probability())
    """... in-painting with this share, out-painting otherwise (official inpaint_rate = 1 - outpaint_rate 0.8)."""

    def rates(self) -> dict[str, float]:
        """The five rates as ``genesis_views`` reads them."""
        return {k: getattr(self, k) for k in GENESIS_DEFAULTS}


@dataclass(frozen=True)
class ModelsGenesisParams(GenesisRates):
    """Models Genesis' ``method.params`` (methods/mg.yaml holds the defaults; equal to these, tests check)."""

    resize: tuple[int, int, int] = field(default=(192, 192, 128), metadata=positive("a list of 3 positive integers"))
    """corpus volume size before cropping (sslbench's; the official pre-extracts cubes from LUNA16 at native size)."""
    crop: tuple[int, int, int] = field(default=(64, 64, 64), metadata=positive("a list of 3 positive integers"))
    """sub-volume size (official input_rows x cols x deps 64 x 64 x 32; 64^3 on SwinUNETR, methods/mg.yaml says why)."""
    attention: Attention = "fused"
    """the Swin window-attention kernel the runtime applies (same function; not hashed)."""


@dataclass(frozen=True)
class ModelsGenesis2DParams(GenesisRates):
    """The 2D form's ``method.params`` (methods/mg.yaml ``two_d.params``): the five rates on whole radiographs."""


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------

class ModelsGenesis(PretrainMethod):
    """Models Genesis pre-training on corpus volumes [B, 1, *resize] in [0, 1].

    params: :class:`ModelsGenesisParams` (resize, crop, the five rates, attention). Each step takes one random crop
    per volume (integer corner, exact voxels), makes (input, target) with ``genesis_views`` and restores the target
    with the full network.
    """

    name = "mg"
    Params = ModelsGenesisParams
    transfers_decoder = True

    def __init__(self, params: "ModelsGenesisParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        self.resize, self.crop = self.p.resize, self.p.crop
        self.model_name = str(self.model_cfg.get("name", "swinunetr"))
        check_crop(self.name, self.model_name, self.crop, self.resize)   # the crop against the backbone
        # the fine-tuning network itself (1 input, 1 output channel), so its keys are the fine-tuning layout
        self.net = build_model(self.model_cfg, in_channels=1, out_channels=1)

    @classmethod
    def input_size(cls, params: "ModelsGenesisParams | Mapping[str, Any]") -> tuple[int, int, int] | None:
        return cls.typed(params).resize

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = volumes.shape[0]
        if any(int(s) < c for s, c in zip(volumes.shape[2:], self.crop)):
            raise ValueError(f"mg: volumes {list(volumes.shape[2:])} are smaller than the crop {list(self.crop)}")
        with torch.autocast(volumes.device.type, enabled=False):   # views in fp32 under the protocol's bf16
            starts = random_crop_starts(b, volumes.shape[2:], self.crop, device=volumes.device)
            cubes = crop_boxes(volumes, starts, torch.tensor(self.crop).expand(b, 3), self.crop)
            inp, target = genesis_views(cubes, self.p.rates())
        restored = torch.sigmoid(self.net(inp).float())
        loss = F.mse_loss(restored, target)
        return loss, {"mse": loss.detach()}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder and decoder (SwinUNETR: swinViT, encoder*, decoder*; unet3d: down_tr*, up_tr*; basicunet: conv_0,
        down_*, upcat_*)."""
        return transferable_state(self.net, self.model_name)


# --------------------------------------------------------------------------------------------------
# The 2D form (ChestX-ray14 track, issue 23)
# --------------------------------------------------------------------------------------------------
# Models Genesis in 2D (the Table 4 row "MG"): restore a radiograph from its transformed copy with PCRL's
# ResNet-18 U-Net (sslbench/models/unet2d.py), L = MSE(sigmoid(f(g(x))), x).
#
# The transformations g are the 3D method's own (``genesis_views``: flip of input and target,
# local pixel shuffling, the Bezier non-linear intensity map, in-/out-painting, the official ``config.py`` rates),
# which work on any number of spatial axes; here on the whole image [B, 1, H, W] (PCRL's 2D protocol trains on
# whole 224 x 224 radiographs; no sub-crop).
#
# Ledger (2D form): the official Models Genesis code is 3D; its 2D form here keeps the 3D official rules per axis:
# painting boxes of side dim//6..dim//3 (in) and dim - 4 dim//7 .. dim - 3 dim//7 (out), local shuffling blocks of
# side 1..dim//10 with the official's 10,000 blocks' coverage (nearly every pixel at 224 x 224), flips of a random
# axis while u < 0.4 (at most 3 times). No key restores another 2D rule. The optimiser rows of the 3D table apply.

class ModelsGenesis2D(PretrainMethod):
    name = "mg"
    Params = ModelsGenesis2DParams
    transfers_decoder = True

    def __init__(self, params: "ModelsGenesis2DParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        self.net = UNet2D(model_cfg, in_channels=1, out_channels=1)

    @staticmethod
    def pixels_per_image(params: Mapping[str, Any], size: tuple[int, int]) -> float:
        return size[0] * size[1]

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = volumes.float()
        if min(x.shape[2:]) < MIN_PAINT_SIZE:
            raise ValueError(f"mg: images {list(x.shape[2:])} are smaller than {MIN_PAINT_SIZE} px (painting boxes)")
        with torch.autocast(x.device.type, enabled=False):   # views in fp32 under the protocol's bf16
            inp, target = genesis_views(x, self.p.rates())
        restored = torch.sigmoid(self.net(inp).float())
        loss = F.mse_loss(restored, target)
        return loss, {"mse": loss.detach()}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The U-Net's encoder and decoder (``encoder.*``, ``decoder.*``; the output conv is not transferred)."""
        return {k: v for k, v in self.net.state_dict().items() if k.startswith(("encoder.", "decoder."))}
