"""Which corpus volume each sample of a pre-training step reads (``method.pretrain.sampler``): one pure function of
the run seed and the sample's position, used by both loaders (memory and stream), so neither holds a sampler state
that a resume would have to restore.

``step`` (the default, and the only draw before the key existed): the B volumes of step ``s`` on rank ``r`` are drawn
uniformly *with replacement* from ``rng([seed, s])`` (rank r > 0: ``rng([seed, s, r])``), over the whole corpus with
the memory loader and over the rank's shard (every W-th volume) with the stream. No epoch exists: a volume may be
read twice in a step and never in a run, and a run of W ranks x B is not a 1-process run of batch W x B.

``epoch``: sample ``i`` of the per-rank batch B of step ``s`` on rank ``r`` of ``W`` has the global sample index

    g = s * (B * W) + r * B + i,

its epoch is ``e = g // N`` over a corpus of N volumes, and it reads volume ``P_e[g mod N]``, where ``P_e`` is the
permutation of ``range(N)`` drawn from ``rng([seed, e, 1])`` (the trailing 1 tags the stream: numpy's SeedSequence
drops trailing zero words, so ``[seed, e]`` would be ``[seed]`` at e = 0). Hence:

* every volume is read exactly once per epoch, across all ranks together (an epoch is N consecutive g);
* rank r of W reads at step s exactly rows ``r*B .. (r+1)*B - 1`` of a 1-process run of batch ``W*B`` at step s
  (both read ``g = s*W*B + r*B + i``);
* any step, on any rank, is computed alone from (seed, g): a run resumed at step s reads what the uninterrupted
  run read from there on.

Unlike torch's ``DistributedSampler`` (torch/utils/data/distributed.py: a permutation per epoch seeded by
seed + epoch, padded to a multiple of W, rank r taking every W-th index) nothing is padded or dropped (a step may
straddle two epochs), and rank r takes B consecutive samples of each global step, which is what makes a W-rank
step the 1-process step of batch W*B.

What a sample reads besides its volume (a native crop's box, :func:`sample_key`) is keyed by (seed, g) too, so the
bytes of a global sample do not depend on the number of ranks. The methods' own random views (drawn on the device
per rank and step) are not: see the README's "At scale" section for what a W-rank run equals.

This module is pure (numpy only); it never imports the protocol.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

SAMPLERS = ("step", "epoch")

#: stream tags (last SeedSequence word, non-zero): the epoch permutations, and a sample's own draws (native crops)
_PERMUTATION, _SAMPLE = 1, 2


def step_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0) -> list[int]:
    """``step``: the corpus indices of step ``step`` on rank ``rank``, uniform with replacement over ``n`` volumes
    from ``rng([seed, step])`` (rank r > 0 ``rng([seed, step, r])``): the draw of every run before the key."""
    rng = np.random.default_rng([seed, step] if rank == 0 else [seed, step, rank])
    return rng.integers(0, n, size=batch_size).tolist()


def global_samples(step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
    """The global sample indices g of step ``step`` on rank ``rank`` of ``world_size``: ``s*B*W + r*B + i``."""
    first = int(step) * int(batch_size) * int(world_size) + int(rank) * int(batch_size)
    return range(first, first + int(batch_size))


@lru_cache(maxsize=4)   # a step spans at most two epochs unless B * W > N; 8 bytes per volume each
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    out = np.random.default_rng([seed, epoch, _PERMUTATION]).permutation(n)
    out.flags.writeable = False
    return out


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """``P_e``: the seeded permutation of ``range(n)`` of epoch ``epoch`` (``rng([seed, epoch, 1])``), read-only."""
    return _permutation(int(n), int(seed), int(epoch))


def volumes_of(samples: Sequence[int], n: int, permutation: Callable[[int], Sequence[int]]) -> list[int]:
    """The volume each global sample g reads: ``permutation(g // n)[g % n]``."""
    if n < 1:
        raise ValueError(f"a corpus of {n} volumes; expected at least one")
    return [int(permutation(g // n)[g % n]) for g in samples]


def epoch_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """``epoch``: the corpus indices of step ``step`` on rank ``rank`` of ``world_size`` (module docstring)."""
    return volumes_of(global_samples(step, batch_size, rank, world_size), n,
                      lambda e: epoch_permutation(n, seed, e))


def draw(sampler: str, n: int, batch_size: int, seed: int, step: int, rank: int = 0,
         world_size: int = 1) -> list[int]:
    """The corpus indices the step reads under ``method.pretrain.sampler`` ``sampler`` (``n``: the volumes the
    rank draws from: its shard under ``step`` with the stream, the whole corpus otherwise)."""
    if sampler == "epoch":
        return epoch_indices(n, batch_size, seed, step, rank, world_size)
    if sampler == "step":
        return step_indices(n, batch_size, seed, step, rank)
    raise ValueError(f"method.pretrain.sampler: {sampler!r}; expected one of {', '.join(SAMPLERS)}")


def sample_key(seed: int, sample: int) -> list[int]:
    """The SeedSequence words of global sample ``sample``'s own draws (its native crop under ``epoch``)."""
    return [int(seed), int(sample), _SAMPLE]
