"""Errors that sslbench reports to the user as one line (no traceback).

Every message names the file or key at fault and what was expected.
"""
import contextlib
import difflib
import os
import signal
import threading
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


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While a command runs, SIGTERM raises :class:`~sslbench.errors.Terminated` (a KeyboardInterrupt) in the
    main thread, so the run stops as after Ctrl-C instead of dying mid-write: temporary files are removed, the
    TensorBoard writer and the run folder's lock are closed. The first signal restores the default action, so a
    second SIGTERM during that cleanup ends the process at once. Installed only where SIGTERM still has its
    default action and only in the main thread (an embedding program's own handler is left alone); the earlier
    handler is put back afterwards."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    owner = os.getpid()

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getpid() != owner:   # a forked loader or pool worker inherited the handler: die as it would have
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class RunError(SSLBenchError):
    """A run folder is in a state that forbids the requested action (finished, foreign, unfinished)."""
