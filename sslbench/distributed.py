"""Multi-process training on PyTorch's own engine: torchrun + DistributedDataParallel.

    torchrun --nproc_per_node=2 -m sslbench pretrain --method voco      # or: sslbench pretrain --gpus 2 ...
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 -m sslbench run --method voco --task btcv

Every process runs the same command. torchrun sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; :func:`setup`
joins the process group (NCCL on GPUs, gloo on CPUs), pins each process to ``cuda:LOCAL_RANK``, and returns a
:class:`Dist` the protocol asks for everything rank-dependent:

* data: each rank draws its own batch from its own random stream (``rng([seed, step, rank])``), so the global
  batch is ``world_size x batch_size`` (as in the official VoCo DDP runs) and one process reproduces rank 0;
* gradients: DistributedDataParallel averages them; metrics and logged losses are averaged with all_reduce;
* evaluation: cases are split across ranks by index and the rows gathered to every rank;
* records: only rank 0 writes run folders, checkpoints and logs; the others wait at barriers.

Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op and single-process code paths run
unchanged.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as tdist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of ``value`` over ranks (a copy; the input is untouched)."""
        if not self.enabled:
            return value
        out = value.detach().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out / self.world_size

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (a sweep trial's parameters, a pruning decision, a run action)."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_rows(self, rows: list) -> list:
        """Every rank's list concatenated in rank order, on every rank."""
        if not self.enabled:
            return list(rows)
        parts: list[list | None] = [None] * self.world_size
        tdist.all_gather_object(parts, list(rows))
        return [r for part in parts for r in (part or [])]

    def shard(self, items: Sequence) -> list:
        """This rank's share of ``items`` (index ``rank``, ``rank + world``, ...): evaluation cases by rank."""
        return list(items[self.rank::self.world_size])

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (e.g. a failure that must stop all ranks)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device(self))
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)


SINGLE = Dist()


class Float32SyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm computed in float32 under bf16 autocast.

    torch's SyncBatchNorm kernels reject bf16 inputs with float32 counts ("Expected counts to have type
    BFloat16"); batch statistics belong in float32 anyway. The output returns in the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


def _collective_device(d: Dist) -> torch.device:
    return torch.device("cuda", d.local_rank) if d.backend == "nccl" else torch.device("cpu")


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


_CURRENT: Dist = SINGLE


def current() -> Dist:
    """The Dist set up by :func:`setup` in this process (single-process when none)."""
    return _CURRENT


def setup(device_setting: str = "auto") -> Dist:
    """Join the torchrun job this process belongs to (idempotent); a no-op for a single process.

    ``device_setting`` is the recipe's ``run.device``: GPUs use NCCL and ``cuda:LOCAL_RANK``; ``cpu`` (or no
    CUDA) uses gloo.
    """
    global _CURRENT
    world = env_world_size()
    if world <= 1:
        _CURRENT = SINGLE
        return SINGLE
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not str(device_setting).startswith("cpu")
    backend = "nccl" if cuda else "gloo"
    if not tdist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        tdist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        # every command that joined a job leaves it before the interpreter is torn down: gloo's worker threads
        # still holding tensors at finalisation abort the process (SIGABRT, "terminate called without an
        # active exception"), which turned a finished two-process sweep into a failed one
        atexit.register(cleanup)
    _CURRENT = Dist(rank=rank, world_size=world, local_rank=local, backend=tdist.get_backend())
    return _CURRENT


def device_for(d: Dist, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when the run is on CUDA and distributed."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def wrap(module: nn.Module, d: Dist, device: torch.device, sync_bn: bool = True) -> nn.Module:
    """DistributedDataParallel around ``module`` (BatchNorm -> SyncBatchNorm when ``sync_bn``).

    SimSiam's projector and VoCo's head use batch statistics, so under DDP they must see the global batch.
    A module whose steps leave some trainable parameters unused sets ``find_unused_parameters = True`` (frozen
    or EMA parameters without gradients are not tracked by DDP and need nothing). BatchNorm layers are
    converted in place, so the caller's reference to ``module`` stays the trained module.
    """
    if not d.enabled:
        return module
    # SyncBatchNorm needs CUDA; CPU (gloo) runs keep per-rank batch statistics (a test-scale path only).
    if sync_bn and device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        for m in module.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = Float32SyncBatchNorm
    ids = [device.index] if device.type == "cuda" else None
    unused = bool(getattr(module, "find_unused_parameters", False))
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=unused)


def cleanup() -> None:
    """Leave the job: on gloo, first wait (at most a minute) until every rank is here, so that no rank tears
    down its process group while a peer's last collective with it is in flight; then destroy the group."""
    global _CURRENT
    if tdist.is_initialized():
        if tdist.get_backend() == "gloo" and tdist.get_world_size() > 1:
            try:
                tdist.monitored_barrier(timeout=timedelta(seconds=60))
            except Exception:  # noqa: BLE001 - a peer that already left or died: leave anyway
                pass
        tdist.destroy_process_group()
    _CURRENT = SINGLE


#: seconds `launch` gives torchrun and its workers to stop after an interrupt before it kills torchrun
_STOP_GRACE_S = 60


def launch(gpus: int, argv: Sequence[str]) -> int:
    """``sslbench <cmd> --gpus N ...``: re-run the same command under torchrun on N local processes.

    Returns torchrun's exit status. ``--gpus`` itself is removed from the forwarded arguments. An interrupt of
    this process is waited out, up to ``_STOP_GRACE_S``, before it goes on: a SIGTERM (turned into
    :class:`~sslbench.errors.Terminated`) is passed to torchrun first, which passes it to its ranks; Ctrl-C
    reached torchrun and the ranks from the terminal already.
    """
    forwarded: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if a.startswith("--gpus="):
            continue
        # torchrun's own parser would take an abbreviation of its options (e.g. --n for --nnodes)
        forwarded.append({"--n": "--grid"}.get(a, a))
    torchrun = shutil.which("torchrun")
    head = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*head, "--standalone", f"--nproc_per_node={int(gpus)}", "-m", "sslbench", *forwarded]
    import signal
    import subprocess

    from .errors import by_sigterm

    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt as exc:
        if proc.poll() is None:
            if by_sigterm(exc):
                # torchrun passes it to its ranks, which stop as interrupted runs; Ctrl-C reached them all already
                # (one process group): a SIGTERM on top would hit the ranks in their cleanup
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
