"""The pooled Swin encoder that VoCo, SimSiam and SwinUNETR's self-supervised pre-training train.

The parts of a MONAI SwinUNETR that these methods use, under SwinUNETR's own attribute names (so the state dict
is the fine-tuning key layout), and the globally pooled features they project.
"""
from __future__ import annotations

import torch
from torch import nn


def spatial_mean(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block(x) averaged over space: [N, C]. A block that knows a cheaper exact form of it (``pooled_forward``,
    which the runtime's speed layer gives SwinUNETR's encoder1 where it qualifies) computes it that way."""
    pooled = getattr(block, "pooled_forward", None)
    return pooled(x) if pooled is not None else block(x).mean(dim=(2, 3, 4))


class PooledSwinEncoder(nn.Module):
    """SwinUNETR's encoder with globally pooled features.

    ``all_stages=False``: ``swinViT`` only; features = pooled, layer-normed last stage (16fs).
    ``all_stages=True``: also encoder1..4 and encoder10; features = pooled and concatenated
    encoder1(x), encoder2(hs0), encoder3(hs1), encoder4(hs2), encoder10(hs4) (24fs).
    Its state_dict keys are SwinUNETR's (``swinViT.*``, ``encoder1.*``...).
    """

    def __init__(self, net: nn.Module, all_stages: bool):
        super().__init__()
        self.all_stages = all_stages
        self.swinViT = net.swinViT
        if all_stages:
            self.encoder1, self.encoder2, self.encoder3 = net.encoder1, net.encoder2, net.encoder3
            self.encoder4, self.encoder10 = net.encoder4, net.encoder10
        #: layout of the maps between stages (the speed layer's ``channels_last`` sets channels-last 3D)
        self.memory_format = torch.contiguous_format

    def pooled_stem(self) -> nn.Module | None:
        """encoder1, the full-resolution block on the input whose output only enters pooled (all stages), else None."""
        return self.encoder1 if self.all_stages else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SwinTransformer.forward, minus the layer norms of stage outputs that are not used
        swin = self.swinViT
        h = swin.pos_drop(swin.patch_embed(x))
        stages = [h]
        for i in range(1, 5):
            if swin.use_v2:
                h = getattr(swin, f"layers{i}c")[0](h.contiguous(memory_format=self.memory_format))
            h = getattr(swin, f"layers{i}")[0](h.contiguous(memory_format=self.memory_format))
            stages.append(h)

        def hs(i: int) -> torch.Tensor:
            return swin.proj_out(stages[i], True)

        if not self.all_stages:
            return hs(4).mean(dim=(2, 3, 4))
        enc1 = spatial_mean(self.encoder1, x)
        encs = (self.encoder2(hs(0)), self.encoder3(hs(1)), self.encoder4(hs(2)), self.encoder10(hs(4)))
        return torch.cat([enc1] + [e.mean(dim=(2, 3, 4)) for e in encs], dim=1)
