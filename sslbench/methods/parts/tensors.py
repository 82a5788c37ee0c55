"""What a method's ``forward`` receives, as a plain tensor: the protocol's batches may be MONAI MetaTensors."""
from __future__ import annotations

import torch


def plain_float(volumes: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor batch as a plain tensor (cheaper, and it compiles); integer input as float32."""
    if hasattr(volumes, "as_tensor"):
        volumes = volumes.as_tensor()
    return volumes if volumes.is_floating_point() else volumes.float()
