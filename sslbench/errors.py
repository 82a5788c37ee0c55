"""Errors that sslbench reports to the user as one line (no traceback).

Every message names the file or key at fault and what was expected.
"""
import contextlib
import difflib
import os
import signal
import threading
import time
from typing import Iterable


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options`` to ``word``, else ''."""
    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class SSLBenchError(Exception):
    """Base class: the CLI prints str(error) on one line and exits with status 2."""


class RecipeError(SSLBenchError):
    """A recipe file or a --set override is wrong (unknown key, wrong type, unknown method/task)."""


class DataError(SSLBenchError):
    """A dataset on disk is missing, corrupt or inconsistent with its task recipe."""


class CheckpointError(SSLBenchError):
    """A checkpoint cannot be read or matches no backbone tensor."""


class Terminated(KeyboardInterrupt):
    """The process was sent SIGTERM (a scheduler's deadline, a batch system's time limit or pre-emption).

    The CLI turns the signal into this interrupt, so a stopped run cleans up as after Ctrl-C: temporary files
    are removed, its TensorBoard writer and run-folder lock are closed, and its folder keeps the last
    checkpoint for ``--resume``. The command then exits with 143 (128 + SIGTERM), the status of a process
    killed by that signal."""


#: seconds after a first SIGTERM during which a repeat is ignored (cleanup runs); a later repeat ends the process
REPEAT_GRACE_S = 30.0
_terminating: list[float] = []   # monotonic time of the SIGTERM being handled in this process, if any


def terminating() -> bool:
    """Whether this process is stopping on a SIGTERM (see :func:`sigterm_as_interrupt`): an exception raised
    while it unwinds (a DataLoader worker killed by the same signal, a collective whose peer left) is part of
    that stop, not a failure of the run."""
    return bool(_terminating)


def by_sigterm(exc: BaseException) -> bool:
    """Whether ``exc`` ends a stop on SIGTERM: the :class:`Terminated` itself, or any exception raised while
    it unwinds (:func:`terminating`)."""
    return isinstance(exc, Terminated) or terminating()


def stop_exit(exc: BaseException) -> tuple[str, int]:
    """(word for the CLI's one line, exit status) of a command ended by ``exc``, an interrupt: SIGTERM (see
    :func:`by_sigterm`) gives ("terminated (SIGTERM)", 143 = 128 + SIGTERM), Ctrl-C ("interrupted", 130)."""
    return ("terminated (SIGTERM)", 143) if by_sigterm(exc) else ("interrupted", 130)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While a command runs, SIGTERM raises :class:`~sslbench.errors.Terminated` (a KeyboardInterrupt) in the
    main thread, so the run stops as after Ctrl-C instead of dying mid-write: temporary files are removed, the
    TensorBoard writer and the run folder's lock are closed.

    A batch system often signals every process of the job, and torchrun passes its own SIGTERM on to its ranks,
    so a process may get the signal twice: a repeat within ``REPEAT_GRACE_S`` of the first is ignored while the
    cleanup runs, a later one ends the process (schedulers escalate to SIGKILL in any case). Installed only
    where SIGTERM still has its default action and only in the main thread (an embedding program's own handler
    is left alone); the default action is put back afterwards. A forked child that inherited the handler (a
    loader or pool worker) gets the default action: it dies of the signal as it would have."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    owner = os.getpid()

    def on_term(signum, frame):
        if os.getpid() != owner or (_terminating and time.monotonic() - _terminating[0] > REPEAT_GRACE_S):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if _terminating:
            return   # a repeat while the first one's cleanup runs
        _terminating.append(time.monotonic())
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _terminating.clear()


class RunError(SSLBenchError):
    """A run folder is in a state that forbids the requested action (finished, foreign, unfinished)."""
