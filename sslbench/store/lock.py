"""Run-folder locks: one process at a time trains into (or replaces) a run folder.

Every run holds an ``flock`` on ``<out>/locks/<run path>.lock`` from the moment it claims its folder until it
finishes or fails. The lock file names its owner (pid, host, start time) for the message a second invocation
gets: "<run dir> is in use by pid N on HOST since T", or, inside :func:`waiting` (sweeps), it waits. The kernel
drops the lock of a process that dies, however it dies, so the stale lock of a dead owner is simply taken
over. Lock files are left in place (truncated) when released: removing them would let two processes lock two
different files of one name. So a lock taken while its file still names someone (:attr:`RunLock.left_by`) was
last held by a process that died holding it: that is how a sweep tells a killed worker's point from a free one.

A process that holds a lock and runs work which locks the same folder again (a sweep's trial: the protocol
locks the run folder the sweep holds) lends it to that work with :func:`holding`: inside, acquiring the same
lock file re-enters the held lock instead of waiting for itself.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Iterator

from ..errors import RunError

_WAIT: contextvars.ContextVar[bool] = contextvars.ContextVar("sslbench_lock_wait", default=False)
#: the locks lent by :func:`holding` to the work inside it: real path of the lock file -> the held RunLock
_LENT: contextvars.ContextVar[dict] = contextvars.ContextVar("sslbench_lock_lent", default={})


@contextlib.contextmanager
def waiting(wait: bool = True) -> Iterator[None]:
    """Inside this block a run whose folder is locked by another process waits for it instead of failing."""
    token = _WAIT.set(wait)
    try:
        yield
    finally:
        _WAIT.reset(token)


@contextlib.contextmanager
def holding(lock: "RunLock") -> Iterator["RunLock"]:
    """Lend ``lock`` (acquired by the caller) to the block: a RunLock of the same file acquired inside re-enters
    it (its release does nothing); ``lock`` itself is released when the block ends."""
    token = _LENT.set({**_LENT.get(), _key(lock.path): lock})
    try:
        yield lock
    finally:
        _LENT.reset(token)
        lock.release()


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _named(text: str) -> dict | None:
    """The owner a lock file names (pid, host, since, run), None for an empty (released) or unreadable one."""
    try:
        info = json.loads(text or "{}")
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get("pid") else None


def lock_path(out: str | Path, run_dir: str | Path) -> Path:
    """``<out>/locks/<run dir relative to out>.lock`` (a run folder outside ``out``: its full path below locks/)."""
    out, run_dir = Path(out), Path(run_dir)
    try:
        rel = run_dir.relative_to(out)
    except ValueError:
        rel = Path(*[p for p in run_dir.resolve().parts if p not in ("/", "\\")])
    return out / "locks" / rel.parent / f"{rel.name}.lock"


class RunLock:
    """An exclusive flock on a lock file, naming its owner inside; ``what`` is the run folder it guards."""

    def __init__(self, path: str | Path, what: str | Path):
        self.path = Path(path)
        self.what = str(what)
        self._file = None
        self._lent = False          # re-entered a lock lent by :func:`holding`
        self.left_by: dict | None = None

    @property
    def held(self) -> bool:
        return self._file is not None or self._lent

    def owner(self) -> dict:
        """What the lock file says of its holder ({} while it is being written or when unreadable)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def in_use(self) -> str:
        info = {}
        for _ in range(10):          # the holder writes its name right after locking
            info = self.owner()
            if info.get("pid"):
                break
            time.sleep(0.05)
        return (f"{self.what} is in use by pid {info.get('pid', '?')} on {info.get('host', '?')} since "
                f"{info.get('since', '?')}")

    def acquire(self, wait: bool | None = None, say: Callable[[str], None] | None = None) -> "RunLock":
        """Take the lock; when another process holds it, wait (``wait``, default: inside :func:`waiting`) or
        raise a one-line RunError naming the holder."""
        import fcntl

        if self.try_acquire():
            return self
        message = self.in_use()
        if not (_WAIT.get() if wait is None else wait):
            raise RunError(f"{message}; wait for it to end (or stop it) and run again")
        if say is not None:
            say(f"waiting: {message}")
        f = self._open()
        fcntl.flock(f, fcntl.LOCK_EX)
        self._own(f)
        return self

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it (True), else leave it (False) without waiting."""
        import fcntl

        if self._reenter():
            return True
        f = self._open()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self._own(f)
        return True

    def free(self) -> bool:
        """Whether no process holds the lock now (this one included), the file left as it is; ``left_by`` then
        names the holder that died holding it (None: released, or never taken)."""
        import fcntl

        self.left_by = None
        if _key(self.path) in _LENT.get():
            return False
        try:
            f = open(self.path)
        except FileNotFoundError:
            return True
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self.left_by = _named(f.read())
        return True

    def _reenter(self) -> bool:
        lent = _LENT.get().get(_key(self.path))
        self._lent = lent is not None and lent.held
        return self._lent

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.path, "a+")

    def _own(self, f) -> None:
        """Locked: note who the file still names (a holder that died holding it), then name this process."""
        f.seek(0)
        self.left_by = _named(f.read())
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": platform.node(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "run": self.what}) + "\n")
        f.flush()
        self._file = f

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        import fcntl

        f, self._file, self._lent = self._file, None, False
        if f is None:
            return
        try:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
        finally:
            f.close()


def folder_lock(run_dir: str | Path) -> RunLock:
    """The lock of an existing run folder, the very file its training holds (``sslbench evaluate`` takes it, so
    an evaluation beside a running training of that folder, or a second evaluation, is refused with the holder).

    A run folder ``<out>/{pretrain,finetune}/<a>/<b>/<run>`` (the layout the protocol names its folders in) is
    locked at :func:`lock_path` ``(<out>, folder)``, however the path is spelled (relative, absolute, through a
    link: one directory, one lock file); a folder outside that layout at ``<its parent>/locks/<name>.lock``.
    """
    run_dir = Path(run_dir)
    inside = len(run_dir.parts) >= 4 and run_dir.parts[-4] in ("pretrain", "finetune")
    return RunLock(lock_path(run_dir.parents[3] if inside else run_dir.parent, run_dir), run_dir)
