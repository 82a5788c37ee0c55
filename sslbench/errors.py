"""Errors that sslbench reports to the user as one line (no traceback).

Every message names the file or key at fault and what was expected.
"""
import difflib
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


class RunError(SSLBenchError):
    """A run folder is in a state that forbids the requested action (finished, foreign, unfinished)."""
