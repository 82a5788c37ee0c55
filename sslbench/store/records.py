"""Run records: one folder per run, written atomically, readable by the report without the code.

Layout of a run folder::

    recipe.yaml      the resolved configuration (what ran)
    env.json         python / torch / monai versions, git commit, device, host
    status.json      {"state": "running" | "finished" | "failed" | "interrupted", "step": ..., timestamps, protocol
                     hash, run key; a failed run: "reason", its one-line error; an interrupted one (Ctrl-C or
                     SIGTERM, resumable): "by" ("interrupt" | "SIGTERM")}
    data.json        the data it read: root, fingerprint, file count (sslbench/data/fingerprint.py)
    metrics.json     the summary (like nnU-Net's summary.json): mean and per-class metrics, per case too
    cases.csv        one row per evaluated case
    log.txt          what the run printed
    tb/              TensorBoard event files: loss, lr and validation scores by step (``tensorboard --logdir runs``)
    checkpoints/     last.pt (resume), best.pt (selected on validation); pre-training: backbone.pt, heads.pt
"""
from __future__ import annotations

import errno
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from ..errors import RunError


#: below this many free bytes, a failed checkpoint write is taken for a full disk (torch's zip writer raises a
#: RuntimeError "file write failed" without the errno)
_NEARLY_FULL = 64 << 20


def _disk_full(exc: BaseException, path: Path) -> bool:
    seen, chain = set(), exc        # torch's writer raises a RuntimeError whose context is the OSError of the write
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    if isinstance(exc, RuntimeError) and "write" in str(exc).lower():
        import shutil

        try:
            return shutil.disk_usage(path.parent).free < _NEARLY_FULL
        except OSError:
            return False
    return False


@contextmanager
def _writing(path: Path):
    """Write to a temporary file next to ``path``, then rename it over ``path``; on failure the temporary file
    is removed and a full disk is one RunError line ("disk full writing <path>")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _disk_full(exc, path):
            raise RunError(f"disk full writing {path}") from None
        raise


#: the mode of files written for everyone to read (report outputs; mkstemp alone would leave them 0600)
PUBLIC_MODE = 0o644


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 less the process's umask (mkstemp's 0600 would
    make run records unreadable to the rest of a group sharing a results folder, unlike log.txt beside them).

    The umask is read, not set: Linux reports it in /proc/self/status. Setting it to read it back would leave a
    window in which another thread of the process (a loader, the TensorBoard writer) creates files unmasked."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):   # not Linux: the set-and-restore form
        mask = os.umask(0o077)   # a strict mask in the window, never a looser one
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, then rename), with file ``mode`` when given, else
    the mode a plain ``open`` would give it (the umask's)."""
    path = Path(path)
    mode = new_file_mode() if mode is None else mode
    with _writing(path) as (fd, tmp):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (RFC 8259: no bare NaN / Infinity): a NaN or infinite number is written as
    null (a score left out), numpy scalars and arrays as numbers and lists, paths as strings."""
    atomic_write_text(path, json.dumps(strict_json(obj), indent=2, sort_keys=False, allow_nan=False,
                                       default=_json_default) + "\n")


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float (numpy's too, inside arrays as well) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    try:
        import numpy as np

        if isinstance(obj, (np.generic, np.ndarray)):
            return strict_json(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    return obj


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a file object of ours: a full disk raises its errno (in the exception's context)
    and the file is closed on the way out, so the space of the removed temporary file is free again at once
    (torch's own handle of a named file stays open in the traceback, and the ``failed`` status then cannot be
    written)."""
    import torch

    path = Path(path)
    with _writing(path) as (fd, tmp):
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())


def load_state(path: str | Path) -> dict[str, Any]:
    """A training state or checkpoint written by sslbench (``torch.load``, weights only), or one CheckpointError
    line for a file that cannot be one: "not a checkpoint: <path> (truncated or corrupt)"."""
    import torch

    from ..errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, ValueError ...
        raise CheckpointError(f"not a checkpoint: {path} (truncated or corrupt)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"not a checkpoint: {path} (holds a {type(state).__name__}, not a dict of tensors)")
    return state


def valid_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a readable training state (:func:`load_state`)."""
    from ..errors import CheckpointError

    try:
        load_state(path)
    except CheckpointError:
        return False
    return True


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def try_read_json(path: str | Path) -> Any:
    """A record file's JSON, None where it is missing or not JSON (a run killed mid-write, another tool's file):
    readers of many folders (the report) skip such a folder instead of failing."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def try_read_recipe(folder: str | Path) -> dict | None:
    """A run folder's recipe.yaml as a mapping, None where it is missing or not a YAML mapping."""
    try:
        cfg = yaml.safe_load((Path(folder) / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def git_commit() -> str | None:
    here = Path(__file__).resolve().parents[2]      # the repository (sslbench/store/records.py)
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment(device: str) -> dict[str, Any]:
    import numpy
    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "git_commit": git_commit(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "argv": sys.argv,
    }
    for pkg in ("monai", "timm", "optuna", "nibabel"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - optional packages
            env[pkg] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


class RunRecord:
    """A run folder. ``state`` in status.json tells whether it may be resumed, skipped or replaced."""

    def __init__(self, path: str | Path, run_key: str | None = None, data: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        #: the run's identity (sslbench.protocol.plan_run): every status.json write carries ``run_key``, the
        #: recipe write adds data.json
        self.run_key = run_key
        self.data = dict(data) if data is not None else None
        self._tb = None          # the SummaryWriter of this process (opened on the first :meth:`scalars`)

    def identity(self) -> dict[str, Any]:
        """``run_key`` and ``data_fingerprint`` for metrics.json ({} for a record opened without them)."""
        if self.run_key is None:
            return {}
        return {"run_key": self.run_key, "data_fingerprint": (self.data or {}).get("fingerprint")}

    # -- status -----------------------------------------------------------------------------------
    @property
    def status(self) -> dict[str, Any] | None:
        f = self.path / "status.json"
        return read_json(f) if f.is_file() else None

    @property
    def finished(self) -> bool:
        s = self.status
        return bool(s) and s.get("state") == "finished"

    def set_status(self, **fields: Any) -> None:
        status = self.status or {}
        status.update(fields)
        if status.get("state") == "running":   # who works on it: a later call tells a dead run by these
            status.update(pid=os.getpid(), host=platform.node())
        stale = {"running": ("by", "interrupted", "reason", "failed"), "interrupted": ("reason", "failed"),
                 "failed": ("by", "interrupted")}.get(str(status.get("state")), ())
        for key in stale:   # of an earlier stop: log.txt keeps that story
            if key not in fields:
                status.pop(key, None)
        if self.run_key is not None:
            status["run_key"] = self.run_key
        status["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.path / "status.json", status)
        if fields.get("state") in ("finished", "failed"):
            self.close_scalars()

    # -- contents ---------------------------------------------------------------------------------
    def write_recipe(self, cfg: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / "recipe.yaml", yaml.safe_dump(json.loads(json.dumps(cfg, default=str)),
                                                                     sort_keys=False))
        if self.data is not None:
            atomic_write_json(self.path / "data.json", self.data)

    def read_recipe(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / "recipe.yaml").read_text())

    def write_env(self, device: str, **extra) -> None:
        atomic_write_json(self.path / "env.json", {**environment(device), **extra})

    def log(self, line: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "log.txt", "a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line.rstrip() + "\n")

    # -- TensorBoard ------------------------------------------------------------------------------
    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Write ``{tag: value}`` at ``step`` to TensorBoard event files under ``<run dir>/tb/`` (None / NaN
        values are left out), flushed at once so that ``tensorboard --logdir runs`` shows a run while it works.

        Each process writes its own event file; the first one opened by a process passes its first step as
        ``purge_step``, so a resumed run's TensorBoard drops what the killed process had logged from that step on
        (logging steps are deterministic: the resumed process logs them again) and every step shows once.
        Without the ``tensorboard`` package nothing is written (one line in log.txt says so).
        """
        if self._tb is False:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:   # tensorboard is a dependency; a broken install must not stop a run
                self._tb = False
                self.log(f"TensorBoard event files not written: {exc}")
                return
            self._tb = SummaryWriter(log_dir=str(self.path / "tb"), purge_step=int(step), flush_secs=30)
        for tag, value in values.items():
            if value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                self._tb.add_scalar(tag, value, global_step=int(step))
        self._tb.flush()

    def close_scalars(self) -> None:
        """Close this process's TensorBoard event file (a finished or failed run; a later :meth:`scalars`
        opens a new one)."""
        if self._tb:
            self._tb.close()
        self._tb = None

    @property
    def metrics(self) -> dict[str, Any] | None:
        f = self.path / "metrics.json"
        return read_json(f) if f.is_file() else None


def prepare_run_folder(record: RunRecord, protocol: str, resume: bool, force: bool,
                       say: Callable[[str], None] | None = None) -> str:
    """Decide what to do with a run folder: 'new', 'resume' or 'skip' (finished identical run).

    A ``failed`` run starts over ('new', the folder emptied) or, with ``resume`` and a readable
    checkpoints/last.pt, resumes. The caller holds the folder's lock (sslbench/store/lock.py), so an unfinished
    (``running``) folder recorded by a process of this host is a dead run (OOM-killed, kill -9, reboot: the
    kernel freed its lock): it is resumed from a readable last.pt, else started over, with a line (``say``)
    naming the dead process (status.json's pid, host, started) and what is done.

    Raises RunError for an unfinished folder recorded on another host without --resume/--force (its lock may
    not be shared with this one), and for a folder whose recorded protocol hash differs (results are never
    mixed across protocols).
    """
    import shutil

    status = record.status
    if status is None:
        if record.path.exists() and any(record.path.iterdir()) and not force:
            raise RunError(f"{record.path}: folder exists but holds no status.json; pass --force to replace it")
        if force and record.path.exists():
            shutil.rmtree(record.path)
        return "new"
    if status.get("protocol") not in (None, protocol):
        raise RunError(f"{record.path}/status.json: protocol hash {status.get('protocol')} differs from this "
                       f"run's {protocol}; refusing to mix results (pass --force to replace the folder)")
    if force:
        shutil.rmtree(record.path)
        return "new"
    if status.get("state") == "finished":
        return "skip"
    if status.get("state") == "failed":
        # a failed run (its reason in status.json) is never half-reused: --resume continues from a readable
        # last.pt, anything else starts the folder over
        if resume and valid_checkpoint(record.ckpt_dir / "last.pt"):
            return "resume"
        shutil.rmtree(record.path)
        return "new"
    if resume:
        return "resume"
    host = status.get("host")
    # an interrupted run wrote that state itself on its way out, so it is gone wherever it ran (a batch system
    # that pre-empts a job and requeues it usually lands on another node)
    if host not in (None, platform.node()) and status.get("state") != "interrupted":
        raise RunError(f"{record.path}: an unfinished run (state {status.get('state')}, step {status.get('step')}) "
                       f"recorded by pid {status.get('pid', '?')} on {host}; if it is gone pass --resume to continue "
                       f"it or --force to start over")
    # we hold the folder's lock, so its recorded owner is gone (the kernel frees a dead process's flock)
    if status.get("state") == "interrupted":
        dead = (f"{record.path}: its run was stopped ({status.get('by', 'interrupt')} at step {status.get('step')}, "
                f"pid {status.get('pid', '?')} on {host or '?'}, {status.get('interrupted', '?')})")
    else:
        dead = (f"{record.path}: its run died (pid {status.get('pid', '?')} on {host or '?'}, started "
                f"{status.get('started', '?')}, state {status.get('state')} at step {status.get('step')}; "
                f"its lock is free)")
    last = record.ckpt_dir / "last.pt"
    if valid_checkpoint(last):
        (say or print)(f"{dead}: resuming from {last}")
        record.log(f"{dead}: resumed automatically")
        return "resume"
    (say or print)(f"{dead}: no readable checkpoints/last.pt, starting over")
    shutil.rmtree(record.path)
    return "new"
