"""Per-view Gaussian blur, batched: every view of a batch with its own sigma, one grouped convolution per axis.

Shared by SimSiam (3D views, its 2D form) and the 2D forms of PCRL v1 / v2 (the SimCLR ``GaussianBlur`` of their
official ChestX-ray loaders).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each view of x [N, C, X, Y, Z] with its own isotropic Gaussian sigma[N] (voxels), truncated at
    ``radius``; sigma <= 0 leaves the view unchanged. Separable: one grouped conv per axis, replicate padding."""
    n, c = x.shape[:2]
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    safe = sigma.clamp_min(1e-3).to(torch.float32).unsqueeze(-1)
    kernel = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernel = kernel / kernel.sum(dim=-1, keepdim=True)
    delta = (offsets == 0).to(torch.float32).expand_as(kernel)
    kernel = torch.where((sigma > 0).unsqueeze(-1), kernel, delta).repeat_interleave(c, dim=0)   # [N*C, K]
    out = x.reshape(1, n * c, *x.shape[2:])
    for axis in range(3):
        shape = [n * c, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape).to(out.dtype), groups=n * c)
    return out.view_as(x)


def blur_2d(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-image isotropic Gaussian blur of x [N, C, H, W] (the 3D ``gaussian_blur`` on a depth of 1, where its
    replicate-padded third axis leaves the image unchanged)."""
    return gaussian_blur(x.unsqueeze(-1), sigma, radius).squeeze(-1)
