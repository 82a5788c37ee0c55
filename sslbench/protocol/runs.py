"""Run folders: a run's claim (lock, new / resume / skip, the dead owner's run resumed), its scope (``failed``
with the reason on an error), the fine-tuning run being opened and resumed, checkpoint provenance, and the rank
report of a torchrun job."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .. import distributed, tasks
from ..errors import by_sigterm, DataError, RecipeError, RunError, terminating
from ..store import lock as locks
from ..store.records import atomic_write_json, load_state, prepare_run_folder, RunRecord
from ..tasks.base import check_volumes
from .plan import plan_run
from .runtime import _device_setup


def _rank_report(dist: "distributed.Dist", state: Mapping[str, torch.Tensor], **facts: Any) -> None:
    """Test hook: with SSLBENCH_RANK_REPORT=DIR every rank writes DIR/rank<r>.json (its rank, world size, a
    SHA-256 of its final trained state and ``facts``), so a test can check that the ranks of a job ended in
    agreement; the run folder stays rank 0's alone."""
    folder = os.environ.get("SSLBENCH_RANK_REPORT")
    if not folder:
        return
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(folder) / f"rank{dist.rank}.json", {"rank": dist.rank, "world_size": dist.world_size,
                                                               "state_sha256": h.hexdigest(), **facts})


@dataclass
class Outcome:
    record: RunRecord
    action: str                    # new | resume | skip
    metrics: dict[str, Any] = field(default_factory=dict)


#: the runs this process has claimed inside the current run scope: (record, lock)
_CLAIMED: contextvars.ContextVar[list | None] = contextvars.ContextVar("sslbench_claimed_runs", default=None)


_UNSCOPED: list = []   # locks taken outside any run scope: held until the process ends


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, (DataError, RecipeError, RunError)) or type(exc).__module__.startswith("sslbench"):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class _Scope:
    """What :func:`run_scope` tracks: the claimed (record, lock) pairs, and the caller's own stop (below)."""

    def __init__(self):
        self.claimed: list = []
        self.stopped: list[BaseException] = []

    def callback(self, fn: Callable | None) -> Callable | None:
        """``fn`` (e.g. a sweep's ``on_validation``), whose exceptions are the caller stopping the run (a pruned
        trial), not the run failing: the folder stays unfinished and resumable."""
        if fn is None:
            return None

        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                self.stopped.append(exc)
                raise
        return call


@contextlib.contextmanager
def run_scope():
    """Around one pre-training or fine-tuning: the run folders claimed inside are unlocked at the end, and an
    exception (not an interrupt, not one of a :meth:`_Scope.callback`) marks a claimed, unfinished folder
    ``failed`` with its one-line reason, so the next identical command starts it over (or resumes it from a
    readable last.pt with --resume). An interrupt (Ctrl-C, or SIGTERM as :class:`~sslbench.errors.Terminated`)
    marks it ``interrupted`` (``by``: ``interrupt`` or ``SIGTERM``); the next identical command resumes it from
    its last checkpoint."""
    scope = _Scope()
    claimed = scope.claimed
    token = _CLAIMED.set(claimed)
    try:
        yield scope
    except Exception as exc:
        if any(exc is e for e in scope.stopped):
            raise
        if terminating():   # raised while a SIGTERM unwound the run (a loader worker killed by the same signal)
            _mark_interrupted(claimed, "SIGTERM")
            raise
        reason = _one_line(exc)
        for record, _ in claimed:
            if record.path.is_dir() and not record.finished:
                with contextlib.suppress(Exception):   # on a full disk even this may not be written
                    record.set_status(state="failed", reason=reason, failed=time.strftime("%Y-%m-%dT%H:%M:%S"))
                    record.log(f"failed: {reason}")
        raise
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM (Terminated): resumable, so not "failed"
        _mark_interrupted(claimed, "SIGTERM" if by_sigterm(exc) else "interrupt")
        raise
    finally:
        _CLAIMED.reset(token)
        for record, lock in claimed:
            record.close_scalars()   # a run stopped unfinished (a pruned sweep trial) too
            lock.release()


def _mark_interrupted(claimed, by: str) -> None:
    """Status ``interrupted`` (``by`` what) on the claimed, unfinished folders: the next command resumes them."""
    for record, _ in claimed:
        if record.path.is_dir() and not record.finished:
            with contextlib.suppress(Exception):
                record.set_status(state="interrupted", by=by, interrupted=time.strftime("%Y-%m-%dT%H:%M:%S"))
                record.log(f"interrupted ({by}) at step {(record.status or {}).get('step')}; continue with --resume")


def file_digest(path: Path) -> str:
    """The first 16 hex digits of a file's SHA-256 (:func:`sslbench.data.fingerprint.file_sha256`)."""
    from ..data.fingerprint import file_sha256

    return file_sha256(path)[:16]


@dataclass
class FinetuneRun:
    """A fine-tuning run being opened: what every fine-tuning loop (segmentation, classification) shares."""

    cfg: dict
    dist: "distributed.Dist"
    protocol: str
    record: RunRecord
    action: str
    say: Callable[..., None]
    device: torch.device
    bf16: bool
    root: Path
    phantom: bool


def check_run_cases(cfg: Mapping[str, Any], stage: str, items: list[dict], force: bool = False) -> None:
    """Check every case a run will read before its run folder is claimed, created or (``--force``) replaced.

    ``items`` are the cases :func:`plan_run` listed (a fine-tuning's train and val cases, a pre-training's
    corpus volumes, with label maps for a labelled corpus). The task's kind checks them
    (:meth:`sslbench.tasks.base.TaskKind.check_cases`: NIfTI / DICOM headers of volumes, and their voxels with
    ``force``, :func:`sslbench.tasks.base.check_volumes`; PNG/JPG images for the classification kinds); a
    corpus of no kind holds volumes. One line naming the file where a case is bad.
    """
    recipe = cfg["task"] if stage == "finetune" else cfg["corpus"]
    kind = tasks.kind_if_any(recipe)
    check = kind.check_cases if kind is not None else check_volumes   # a corpus: volumes
    check(cfg["run"], recipe, items, force)


def _claim_run(cfg: Mapping[str, Any], stage: str, resume: bool, force: bool, console=None, root=None,
               pretrain_key: str | None = None):
    """(dist, plan, record, action, say): join the torchrun job if any, locate the data and name the run
    (:func:`plan_run`, rank 0 first), lock the run folder (sslbench/store/lock.py) and let rank 0 decide new /
    resume / skip after :func:`check_run_cases` checked the cases; every rank gets its decision; only rank 0 talks.
    Nothing is written to the folder here."""
    dist = distributed.setup(cfg["run"].get("device", "auto"))
    say = (console.print if console is not None else print) if dist.is_main else (lambda *a, **k: None)
    plan = _rank0_first(dist, lambda: plan_run(cfg, stage, root, log=say, pretrain_key=pretrain_key, dist=dist))
    if dist.is_main:
        check_run_cases(cfg, stage, plan.items, force)   # data checks before the folder is claimed or replaced
    record = RunRecord(plan.path, run_key=plan.run_key, data=plan.data)
    if dist.is_main:
        lock = locks.RunLock(locks.lock_path(cfg["run"]["out"], plan.path), plan.path).acquire(say=say)
        claimed = _CLAIMED.get()
        try:
            action = prepare_run_folder(record, plan.protocol, resume, force, say=say)
        except BaseException:
            lock.release()
            raise
        (claimed if claimed is not None else _UNSCOPED).append((record, lock))
    action = dist.broadcast_object(action if dist.is_main else None)
    return dist, plan, record, action, say


def _rank0_first(dist: "distributed.Dist", find: Callable[[], Any]) -> Any:
    """``find()`` (locating data, which may synthesise a phantom tree) on rank 0 first, then on the others."""
    if not dist.is_main:
        dist.barrier()
    found = find()
    if dist.is_main:
        dist.barrier()
    return found


def checkpoint_provenance(path: str | Path, method: str | None = None) -> dict[str, Any]:
    """What a backbone file's own pre-training record says of it, when it sits in one
    (``<run>/checkpoints/backbone.pt`` next to ``<run>/metrics.json`` of kind pretrain): ``include_decoder`` (the
    method trained the decoder), ``phantom`` (the corpus held phantoms), ``pretrain_run``. For any other file:
    ``include_decoder`` of the registered ``method`` named for it ({} without one)."""
    run = Path(path).resolve().parent.parent
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = None
    if not isinstance(metrics, dict) or metrics.get("kind") != "pretrain":
        from ..methods import get_method_class

        cls = get_method_class(method) if method and method != "scratch" else None
        return {"include_decoder": bool(getattr(cls, "transfers_decoder", False))} if cls is not None else {}
    return {"include_decoder": bool(metrics.get("transfers_decoder")), "phantom": bool(metrics.get("phantom")),
            "pretrain_run": str(run), **({"run_key": metrics["run_key"]} if metrics.get("run_key") else {}),
            **({"corpus": metrics["corpus"]} if metrics.get("corpus") else {})}


def open_finetune(cfg: dict, init: dict | None, root: str | Path | None, resume: bool, force: bool,
                  console=None) -> "FinetuneRun | Outcome":
    """Find the data, name the run (protocol + data: its run key), lock and decide new / resume / skip, pick the
    device (an Outcome: skipped).

    Under torchrun (sslbench/distributed.py) rank 0 owns the run folder and the others follow its decision,
    wait while it synthesises a phantom task, stay silent and get a record whose writes do nothing.
    """
    task = cfg["task"]
    cfg = dict(cfg)
    cfg["init"] = {k: v for k, v in (init or {}).items() if k in ("source", "hash", "method")} or None
    dist, plan, record, action, say = _claim_run(cfg, "finetune", resume, force, console, root,
                                                 pretrain_key=(init or {}).get("run_key"))
    protocol, root_path, phantom = plan.protocol, plan.root, plan.phantom
    if action == "skip":
        say(f"already finished: {record.path} (identical protocol {protocol} on identical data); pass --force to "
            f"run it again")
        return Outcome(record, "skip", record.metrics or {})
    device, bf16 = _device_setup(cfg["run"], dist)
    if not dist.is_main:   # the other ranks never write to the run folder
        record = _SilentRecord(record.path)
    # PHANTOM when the task's data or the pre-training the run starts from touched phantoms
    return FinetuneRun(cfg, dist, protocol, record, action, say, device, bf16, Path(root_path),
                       phantom or bool(task.get("phantom")) or bool((init or {}).get("phantom")))


def resume_last(record, action: str, say, key: str, module, opt, sched, total: int) -> dict | None:
    """A resumed run's checkpoints/last.pt loaded into ``module`` (its state under ``key``), the optimiser and the
    schedule; None for a new run (or one killed before its first checkpoint)."""
    last = record.ckpt_dir / "last.pt"
    if action != "resume" or not last.is_file():
        return None
    state = load_state(last)
    module.load_state_dict(state[key])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    say(f"resuming {record.path} from step {int(state['step'])}/{total}")
    return state


def resume_finetune(run: FinetuneRun, model, opt, sched, total: int, best: float) -> tuple[int, float, int, list]:
    """(start step, best score, its step, history): from checkpoints/last.pt when resuming, else a fresh start."""
    state = resume_last(run.record, run.action, run.say, "model", model, opt, sched, total)
    if state is None:
        return 0, best, -1, []
    run.record.log(f"resumed from step {int(state['step'])}")
    return int(state["step"]), float(state["best"]), int(state["best_step"]), list(state.get("history", []))


class _SilentRecord(RunRecord):
    """The run record seen by ranks other than 0: reads work, writes do nothing."""

    def write_recipe(self, *a, **k) -> None: ...
    def write_env(self, *a, **k) -> None: ...
    def set_status(self, *a, **k) -> None: ...
    def log(self, *a, **k) -> None: ...
    def scalars(self, *a, **k) -> None: ...
