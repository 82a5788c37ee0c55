"""The streaming loaders: pre-training (``method.pretrain.loader: stream``) and fine-tuning (``task.finetune.loader``).

``loader: memory`` (the default) resizes every corpus volume once and stacks the whole corpus in memory (on the
GPU under CUDA): memory grows with the corpus. ``loader: stream`` keeps nothing of the corpus in memory:

* the corpus is preprocessed once into the memory-mapped case cache (:mod:`sslbench.data.cache`, keyed as
  ``sslbench data cache`` keys it; the protocol fills the missing cases on first use, in threads, with a
  progress bar);
* a torch ``DataLoader`` with worker processes reads each step's volumes from the cache files (pages mapped,
  nothing decompressed), resizes them to the method's ``input_size`` exactly as the memory loader does and
  collates them into pinned batches (on CUDA); the method still cuts its views on the device;
* the volumes of step ``s`` are drawn by :class:`StepSampler` with the memory loader's draw
  (:func:`sslbench.data.sampler.draw`: ``method.pretrain.sampler``), so one process streams exactly the batches
  the memory loader gathers, and a resumed run streams the batches of the steps it has left;
* under torchrun with ``sampler: step`` (the default) each rank draws from its shard of the corpus (:func:`shard`:
  every ``world_size``-th volume from its rank, as torch's ``DistributedSampler`` shards a dataset) with
  ``rng([seed, s])`` (rank r > 0: ``[seed, s, r]``); with ``sampler: epoch`` there is no fixed shard: each rank's
  workers read exactly the volumes of its global samples (every volume once per epoch across the ranks, rank r
  the rows r*B..(r+1)*B-1 of a 1-process batch W*B), and a native crop is keyed by the global sample;
* ``method.pretrain.native_crops: true`` delivers a random ``input_size`` box of each volume at the
  preprocessing spacing (:func:`native_crop`, seeded by seed, step, rank and batch slot) instead of the whole
  volume resized to ``input_size``: the voxel size the pretext task sees is then the fine-tuning's (the
  official form of Models Genesis, TransVW, PCRL, SwinUNETR-SSL and MAE; VoCo's whole-volume resize is its own);
* host memory is bounded by ``run.loader_memory_mb`` whatever the corpus size (:func:`plan_workers`): the batches
  in flight (workers x prefetch depth, plus the one being pinned and the one in use) plus one source volume per
  worker.

``task.finetune.loader: stream`` is the same style for fine-tuning (:class:`CropStream`): worker processes cut each
step's RandCropByPosNegLabel crops (and their flips, rotations, intensity shift) from the cached cases of this rank's
shard, with the memory loader's draw (:class:`StepCrops`), into pinned batches, within the same memory plan.

This module reads the cache and the recipe values it is given; it never imports the protocol.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sslbench.errors import DataError

from .sampler import draw, global_samples, sample_key, step_indices  # noqa: F401  (step_indices: its old home)

LOADERS = ("memory", "stream")

#: test hook: a folder where every pre-training read appends one JSON line per sample (reads.rank<r>.jsonl: loader,
#: rank, global sample or step and slot, volume, file, sha1 of the delivered bytes); unset in real runs
READ_LOG = "SSLBENCH_READ_LOG"


def note_read(loader: str, rank: int, volume: int, data: torch.Tensor, name: str = "", **where) -> None:
    """Append one line for one sample read to ``$SSLBENCH_READ_LOG/reads.rank<rank>.jsonl`` (no-op when unset).
    Lines are short single writes in append mode, so the loader's worker processes may share the file."""
    folder = os.environ.get(READ_LOG)
    if not folder:
        return
    digest = hashlib.sha1(data.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    line = json.dumps({"loader": loader, "rank": int(rank), **where, "volume": int(volume), "file": name,
                       "sha1": digest}) + "\n"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"reads.rank{int(rank)}.jsonl"), "a") as f:
        f.write(line)


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items rank ``rank`` of ``world_size`` reads: every ``world_size``-th from index ``rank`` (disjoint
    shards whose union is ``items``)."""
    if world_size > len(items):
        raise DataError(f"corpus of {len(items)} volumes for {world_size} processes; expected at least one "
                        f"volume per process (method.pretrain.loader=stream shards the corpus by rank)")
    return list(items[rank::world_size])


class StepSampler(Sampler):
    """Yields the index list of every step in ``[start, stop)``: deterministic in (seed, step, rank), so a run
    resumed at step ``start`` draws what the uninterrupted run drew from there on. ``sampler`` is
    ``method.pretrain.sampler`` (:func:`sslbench.data.sampler.draw`; ``epoch`` needs ``world_size``). With
    ``keys`` each entry is ``(index, step, slot)``, what a native crop is seeded by; under ``epoch`` every entry is
    ``(index, g)``, g the global sample index (what its native crop is seeded by, and what the read log names)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 keys: bool = False, sampler: str = "step", world_size: int = 1):
        self.n, self.batch_size, self.seed, self.start, self.stop, self.rank = n, batch_size, seed, start, stop, rank
        self.keys, self.sampler, self.world_size = keys, sampler, world_size

    def __iter__(self) -> Iterator[list]:
        for step in range(self.start, self.stop):
            idx = draw(self.sampler, self.n, self.batch_size, self.seed, step, self.rank, self.world_size)
            if self.sampler == "epoch":
                yield list(zip(idx, global_samples(step, self.batch_size, self.rank, self.world_size)))
            else:
                yield [(i, step, j) for j, i in enumerate(idx)] if self.keys else idx

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


#: the last SeedSequence word of a native crop's key under ``sampler: step``. Without it the key of slot 0,
#: ``[seed, step, rank, 0]``, seeds exactly the step's own volume draw (``[seed, step]`` on rank 0, ``[seed,
#: step, r]`` on rank r: numpy's SeedSequence ignores trailing zero words), so that sample's crop offset came from
#: the very random number that picked its volume (2026-12-07: fixed; no recorded run used native crops before).
_CROP = 3


def native_crop(volume: torch.Tensor, size: Sequence[int], seed: int, step: int, rank: int, slot: int) -> torch.Tensor:
    """A ``size`` box of ``volume`` [C, X, Y, Z] at its stored (preprocessing) spacing: along each axis a uniform
    offset in [0, extent - size] from ``rng([seed, step, rank, slot, 3])`` (its own stream, never the step's
    volume draw); an axis shorter than ``size`` is kept whole and padded with 0 (air, after the [0, 1] scaling)
    at its end."""
    return native_box(volume, size, [int(seed), int(step), int(rank), int(slot), _CROP])


def native_box(volume: torch.Tensor, size: Sequence[int], key: Sequence[int]) -> torch.Tensor:
    """:func:`native_crop`'s box with its offsets drawn from ``rng(key)`` (``sampler: epoch``: the global sample's
    :func:`sslbench.data.sampler.sample_key`)."""
    rng = np.random.default_rng(list(key))
    out = torch.zeros((volume.shape[0], *size), dtype=torch.float32)
    src, dst = [slice(None)], [slice(None)]
    for extent, want in zip(volume.shape[1:], size):
        off = int(rng.integers(0, extent - want + 1)) if extent > want else 0
        keep = min(extent, want)
        src.append(slice(off, off + keep))
        dst.append(slice(0, keep))
    out[tuple(dst)] = torch.as_tensor(volume[tuple(src)]).float()
    return out


class CachedVolumes(Dataset):
    """Volumes read from case-cache files [(image .npy, label .npy or None)], each resized to ``size``
    (image: trilinear, label ids: nearest, stacked as channel 1), as the memory loader resizes them; with
    ``native`` a random ``size`` box at the stored spacing instead (:func:`native_crop`; items are then
    ``(index, step, slot)``, or ``(index, g)`` under ``sampler: epoch``: the box keyed by the global sample g)."""

    def __init__(self, files: Sequence[tuple[str, str | None]], size: Sequence[int], with_label: bool = False,
                 native: bool = False, seed: int = 0, rank: int = 0):
        self.files = [(str(a), None if b is None else str(b)) for a, b in files]
        self.size = tuple(int(s) for s in size)
        self.with_label = with_label
        self.native, self.seed, self.rank = native, int(seed), int(rank)
        self._resize = None

    def __len__(self) -> int:
        return len(self.files)

    def _resizers(self):
        if self._resize is None:
            from monai import transforms as mt

            self._resize = (mt.Resize(spatial_size=self.size, mode="trilinear"),
                            mt.Resize(spatial_size=self.size, mode="nearest"))
        return self._resize

    def __getitem__(self, key) -> torch.Tensor:
        out = self._read(key).contiguous()
        if os.environ.get(READ_LOG):
            where = ({"sample": int(key[1])} if len(key) == 2 else {"step": int(key[1]), "slot": int(key[2])}) \
                if isinstance(key, tuple) else {}
            i = key[0] if isinstance(key, tuple) else key
            note_read("stream", self.rank, i, out, os.path.basename(self.files[i][0]), **where)
        return out

    def _read(self, key) -> torch.Tensor:
        sample = None
        if isinstance(key, tuple) and len(key) == 2:     # sampler epoch: (index, global sample)
            (i, sample), step, slot = key, 0, 0
        else:
            i, step, slot = key if isinstance(key, tuple) else (key, 0, 0)
        image_path, label_path = self.files[i]
        trilinear, nearest = self._resizers()
        try:
            image = torch.from_numpy(np.load(image_path, mmap_mode="c"))
            if self.native:
                if self.with_label:
                    label = torch.from_numpy(np.load(label_path, mmap_mode="c"))
                    image = torch.cat([torch.as_tensor(image).float(), torch.as_tensor(label).float()])
                if sample is not None:
                    return native_box(image, self.size, sample_key(self.seed, sample))
                return native_crop(image, self.size, self.seed, step, self.rank, slot)
            out = _plain(torch.as_tensor(trilinear(torch.as_tensor(image).float())).float())
            if self.with_label:
                label = torch.from_numpy(np.load(label_path, mmap_mode="c"))
                out = torch.cat([out, _plain(torch.as_tensor(nearest(torch.as_tensor(label).float())).float())])
        except (OSError, ValueError) as exc:
            raise DataError(f"{image_path}: cannot be read from the case cache ({exc})") from None
        return out


@dataclass
class Plan:
    """How many workers and batches a stream keeps in flight, and the host memory that bounds."""
    workers: int
    prefetch: int
    batch_bytes: int
    volume_bytes: int      # the largest cached source volume (one per worker while it is resized)
    budget_bytes: int

    @property
    def bound_bytes(self) -> int:
        """Batches in flight (workers x prefetch, + the one pinned + the one in use) + one source per worker."""
        return (self.workers * self.prefetch + 2) * self.batch_bytes + self.workers * self.volume_bytes

    def describe(self) -> str:
        mb = 2 ** 20
        return (f"loader stream: {self.workers} worker(s) x prefetch {self.prefetch}, batch {self.batch_bytes / mb:.1f} "
                f"MB, host memory in flight <= {self.bound_bytes / mb:.1f} MB (run.loader_memory_mb "
                f"{self.budget_bytes / mb:.0f})" + (" - the budget is below one batch per worker; using the minimum"
                                                    if self.bound_bytes > self.budget_bytes else ""))


def default_workers() -> int:
    """Loader worker processes when ``run.loader_workers`` is 0: the usable cores less one, 1 to 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def plan_workers(batch_bytes: int, volume_bytes: int, budget_mb: float, workers: int = 0) -> Plan:
    """The most workers (at most ``workers``; 0: :func:`default_workers`) and the deepest prefetch that keep
    :attr:`Plan.bound_bytes` within ``budget_mb``; at least one worker with a prefetch of one."""
    budget = int(float(budget_mb) * 2 ** 20)
    want = int(workers) if workers and workers > 0 else default_workers()
    w = want
    while w > 1 and (w + 2) * batch_bytes + w * volume_bytes > budget:
        w -= 1
    prefetch = 1
    while prefetch < 8 and (w * (prefetch + 1) + 2) * batch_bytes + w * volume_bytes <= budget:
        prefetch += 1
    return Plan(workers=w, prefetch=prefetch, batch_bytes=int(batch_bytes), volume_bytes=int(volume_bytes),
                budget_bytes=budget)


class Stream:
    """A corpus streamed from the case cache: ``batches(start, stop)`` yields step batches [B, C, *size].

    ``files`` are the volumes this rank draws from: its shard under ``sampler: step``, the whole corpus under
    ``sampler: epoch`` (which reads, per step, only the volumes of this rank's global samples; ``own`` then names
    the files of this rank's shard, which :meth:`whole_volumes` reads)."""

    def __init__(self, files: Sequence[tuple[str, str | None]], size: Sequence[int], batch_size: int, seed: int,
                 rank: int = 0, with_label: bool = False, budget_mb: float = 1024, workers: int = 0,
                 pin_memory: bool = False, native: bool = False, sampler: str = "step", world_size: int = 1,
                 own: Sequence[int] | None = None):
        if not files:
            raise DataError("method.pretrain.loader=stream: the corpus shard of this process is empty")
        self.dataset = CachedVolumes(files, size, with_label, native=native, seed=seed, rank=rank)
        self.native, self.sampler, self.world_size = native, sampler, int(world_size)
        self.own = list(range(len(files))) if own is None else [int(i) for i in own]
        self.batch_size, self.seed, self.rank, self.pin_memory = int(batch_size), int(seed), int(rank), pin_memory
        channels = 2 if with_label else 1
        batch_bytes = self.batch_size * channels * int(np.prod(self.dataset.size)) * 4
        # the largest source volume in the cache (under sampler epoch a node-local cache holds only what this rank
        # reads; a file missing when read is the worker's one-line DataError)
        volume_bytes = max([sum(os.path.getsize(p) for p in pair if p) for pair in self.dataset.files
                            if all(os.path.exists(p) for p in pair if p)] or [0])
        self.plan = plan_workers(batch_bytes, volume_bytes, budget_mb, workers)

    def __len__(self) -> int:
        return len(self.dataset)

    def loader(self, start: int, stop: int) -> DataLoader:
        sampler = StepSampler(len(self.dataset), self.batch_size, self.seed, start, stop, self.rank, keys=self.native,
                              sampler=self.sampler, world_size=self.world_size)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.plan.workers,
                          prefetch_factor=self.plan.prefetch, pin_memory=self.pin_memory,
                          persistent_workers=False)

    def batches(self, start: int, stop: int) -> Iterator[torch.Tensor]:
        """The batches of steps ``start`` .. ``stop - 1`` in order; a worker's error is one line."""
        yield from _one_line_errors(self.loader(start, stop))

    def whole_volumes(self) -> Iterator[torch.Tensor]:
        """The shard's volumes in order (:attr:`own`), whole and resized to ``size`` as the memory loader stacks them
        (never native crops), in chunks of ``batch_size`` [k, C, *size] read by the workers: a corpus-level set-up's
        one pass (TransVW's self-discovery features) within the same memory plan as the step batches."""
        ds = CachedVolumes(self.dataset.files, self.dataset.size, self.dataset.with_label)
        own, b = self.own, self.batch_size
        chunks = [own[i:i + b] for i in range(0, len(own), b)]
        yield from DataLoader(ds, batch_sampler=chunks, num_workers=self.plan.workers,
                              prefetch_factor=self.plan.prefetch, persistent_workers=False)

    def first_batch(self) -> torch.Tensor:
        """Step 0's batch, read in this process (the compiled-step check)."""
        idx = draw(self.sampler, len(self.dataset), self.batch_size, self.seed, 0, self.rank, self.world_size)
        if self.sampler == "epoch":
            keys = list(zip(idx, global_samples(0, self.batch_size, self.rank, self.world_size)))
        else:
            keys = [(i, 0, j) for j, i in enumerate(idx)]
        return torch.stack([self.dataset._read(k) for k in keys])



# ---------------------------------------------------------------------------------------------- fine-tuning
class StepCrops(Dataset):
    """Fine-tuning's step batches (``task.finetune.loader: stream``): item ``step`` is that step's ``(image,
    label)`` crops [B x num_samples, C, *roi], cut from cached cases (image .npy, label .npy) mapped in the worker.

    The draw is the memory loader's (``Segmentation._make_batch``, sslbench/tasks/segmentation.py): the cases of step ``s`` are
    :func:`step_indices` over this shard, and the random transforms (RandCropByPosNegLabeld and its flips,
    rotations, intensity shift) are re-seeded with ``step_seed(seed, s, 1000 * rank)`` and applied to the
    cases in their drawn order; so one process cuts exactly the memory loader's crops, and any step can be built
    alone (a resumed run starts at its step). Each worker process holds its own copy of the transforms."""

    def __init__(self, files: Sequence[tuple[str, str]], augmentation, batch_size: int, seed: int, rank: int = 0):
        if not files:
            raise DataError("task.finetune.loader=stream: the training shard of this process is empty")
        self.files = [(str(a), str(b)) for a, b in files]
        self.augmentation = augmentation
        self.batch_size, self.seed, self.rank = int(batch_size), int(seed), int(rank)

    def __len__(self) -> int:
        return len(self.files)

    def case(self, i: int) -> dict:
        image_path, label_path = self.files[i]
        try:
            return {"image": torch.from_numpy(np.load(image_path, mmap_mode="c")),
                    "label": torch.from_numpy(np.load(label_path, mmap_mode="c"))}
        except (OSError, ValueError) as exc:
            raise DataError(f"{image_path}: cannot be read from the case cache ({exc})") from None

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        from .transforms import step_seed

        picks = step_indices(len(self.files), self.batch_size, self.seed, int(step), self.rank)
        self.augmentation.set_random_state(seed=step_seed(self.seed, int(step), 1000 * self.rank))
        crops = []
        for i in picks:
            out = self.augmentation(self.case(i))
            crops.extend(out if isinstance(out, list) else [out])
        x = torch.stack([_plain(c["image"]) for c in crops]).float()
        y = torch.stack([_plain(c["label"]) for c in crops]).float()
        return x.contiguous(), y.contiguous()


class CropStream:
    """A fine-tuning shard streamed from the case cache: ``batches(start, stop)`` yields each step's ``(x, y)``
    in step order, built by DataLoader worker processes within ``budget_mb`` (:func:`plan_workers`)."""

    def __init__(self, files: Sequence[tuple[str, str]], augmentation, batch_size: int, crops_per_case: int,
                 roi: Sequence[int], channels: int, seed: int, rank: int = 0, budget_mb: float = 1024,
                 workers: int = 0, pin_memory: bool = False):
        self.dataset = StepCrops(files, augmentation, batch_size, seed, rank)
        self.pin_memory = pin_memory
        crops = int(batch_size) * int(crops_per_case)
        batch_bytes = crops * (int(channels) + 1) * int(np.prod([int(r) for r in roi])) * 4
        # a worker holds its source case (image + label) and the crop sampler's foreground / background voxel
        # indices (int64: 8 bytes per voxel, twice the float32 label file): about three times the case's files
        volume_bytes = 3 * max(os.path.getsize(a) + os.path.getsize(b) for a, b in self.dataset.files)
        self.plan = plan_workers(batch_bytes, volume_bytes, budget_mb, workers)

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.dataset, sampler=range(int(start), int(stop)), batch_size=None,
                            num_workers=self.plan.workers, prefetch_factor=self.plan.prefetch,
                            pin_memory=self.pin_memory, persistent_workers=False)
        yield from _one_line_errors(loader)


def _one_line_errors(loader: DataLoader) -> Iterator:
    """The loader's batches in order; a worker's DataError (re-raised by the DataLoader with the worker's
    traceback appended) comes out as its own one line."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except DataError as exc:
            raise DataError(_worker_line(exc)) from None
        yield batch


def _worker_line(exc: BaseException) -> str:
    """The worker's own one-line DataError out of the DataLoader's re-raised message."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return next((ln.split("DataError: ", 1)[1] for ln in reversed(lines) if "DataError: " in ln),
                lines[0] if lines else "loader worker failed")
