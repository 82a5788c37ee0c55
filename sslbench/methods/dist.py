"""Small torch.distributed helpers for pre-training methods that also work in a single process.

Contrastive losses with in-batch negatives (SimCLR's NT-Xent, used by SwinUNETR's self-supervised
pre-training, Tang et al. CVPR 2022) see more negatives when the embeddings of every process are gathered.
The gather must carry gradients back to the process that produced each embedding, which the plain
``torch.distributed.all_gather`` does not; ``torch.distributed.nn.functional.all_gather`` does (its backward
sums the gradients of every rank's copy, so with every rank computing the same global loss and DDP
averaging the parameter gradients, the update equals the single-process update on the whole batch).

Every helper degrades to the identity / rank 0 of 1 when torch.distributed is unavailable or not
initialised, so methods call them unconditionally.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    """True when a default process group is initialised (torch.distributed available and set up)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return torch_dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return torch_dist.get_rank() if is_distributed() else 0


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [n, ...] of every process along dim 0, in rank order: Tensor[world * n, ...].

    Gradients flow back to each process's own ``x`` (summed over the ranks that used it). Every process
    must pass a tensor of the same shape. Returns ``x`` itself when there is one process.
    """
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)
