"""Models Genesis in 2D (the Table 4 row "MG"): restore a radiograph from its transformed copy with PCRL's
ResNet-18 U-Net (sslbench/models/unet2d.py), L = MSE(sigmoid(f(g(x))), x).

The transformations g are :mod:`sslbench.methods.genesis`'s own (``genesis_views``: flip of input and target,
local pixel shuffling, the Bezier non-linear intensity map, in-/out-painting, the official ``config.py`` rates),
which work on any number of spatial axes; here on the whole image [B, 1, H, W] (PCRL's 2D protocol trains on
whole 224 x 224 radiographs; no sub-crop).

Ledger (2D form): the official Models Genesis code is 3D; its 2D form here keeps the 3D official rules per axis:
painting boxes of side dim//6..dim//3 (in) and dim - 4 dim//7 .. dim - 3 dim//7 (out), local shuffling blocks of
side 1..dim//10 with the official's 10,000 blocks' coverage (nearly every pixel at 224 x 224), flips of a random
axis while u < 0.4 (at most 3 times). No key restores another 2D rule. The optimiser rows of the 3D table apply.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import RecipeError
from ..models.unet2d import UNet2D
from .base import PretrainMethod
from .genesis import GENESIS_DEFAULTS, MIN_PAINT_SIZE, genesis_views


class ModelsGenesis2D(PretrainMethod):
    name = "mg"
    transfers_decoder = True

    def __init__(self, params: Mapping[str, Any], model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        for key in GENESIS_DEFAULTS:
            rate = float(self.params.get(key, GENESIS_DEFAULTS[key]))
            if not 0.0 <= rate <= 1.0:
                raise RecipeError(f"method.params.{key}: {rate} for method mg; expected a probability in [0, 1]")
        self.net = UNet2D(model_cfg, in_channels=1, out_channels=1)

    @staticmethod
    def pixels_per_image(params: Mapping[str, Any], size: tuple[int, int]) -> float:
        return size[0] * size[1]

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = volumes.float()
        if min(x.shape[2:]) < MIN_PAINT_SIZE:
            raise ValueError(f"mg: images {list(x.shape[2:])} are smaller than {MIN_PAINT_SIZE} px (painting boxes)")
        with torch.autocast(x.device.type, enabled=False):   # views in fp32 under the protocol's bf16
            inp, target = genesis_views(x, self.params)
        restored = torch.sigmoid(self.net(inp).float())
        loss = F.mse_loss(restored, target)
        return loss, {"mse": loss.detach()}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The U-Net's encoder and decoder (``encoder.*``, ``decoder.*``; the output conv is not transferred)."""
        return {k: v for k, v in self.net.state_dict().items() if k.startswith(("encoder.", "decoder."))}
