"""Where a task's data lives, whether it is a phantom, and its train / val splits.

A task recipe names its root (``--root``, ``$SSLBENCH_ROOT_<NAME>`` or ``data.root``); ``data.root: auto`` means
the task's phantom twin, synthesised on first use under ``<data home>/phantoms`` (data home: ``$SSLBENCH_DATA``
or ``./data``). A combined corpus (``data.sources``) is located source by source
(:mod:`sslbench.data.sources` says where each root comes from). A root holding the phantom marker
(:data:`sslbench.data.marker.MARKER`) is a phantom: every result on it is labelled so.
"""
from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from sslbench.data.marker import MARKER
from sslbench.data.sources import env_name, source_roots
from sslbench.errors import DataError


def data_home() -> Path:
    return Path(os.environ.get("SSLBENCH_DATA", "data"))


#: set while a plan is only looked at (preflight, --dry-run): locate_data writes no phantom tree
PLAN_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("sslbench_plan_only", default=False)


class PhantomNotWritten(Exception):
    """A phantom tree a plan needs is not written yet (raised only under :data:`PLAN_ONLY`)."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def locate_data(task: Mapping[str, Any], root: str | Path | None, log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """The dataset root for a task, synthesising the phantom twin when the recipe says ``root: auto``."""
    data = task.get("data") or {}
    if data.get("sources"):   # a combined corpus: every source located (phantoms synthesised), their common folder
        return locate_sources(task, None if root is None else str(root), log)
    if root is None:
        root = os.environ.get(env_name(task["name"])) or data.get("root")
    if root in (None, ""):
        raise DataError(f"task '{task['name']}' needs --root DIR or ${env_name(task['name'])} (your copy of "
                        f"{task['title']} in its distributed layout: {', '.join(data.get('layouts', []))}; see the "
                        f"README's 'Real datasets'); for a demo use --task phantom-{task['name']}")
    if root == "auto":
        from sslbench.data import phantoms   # the generators (scipy, nibabel) only when a phantom is written


        like = data.get("phantom_like")
        if not like:
            raise DataError(f"task '{task['name']}': data.root is 'auto' but data.phantom_like is not set")
        cases = int(data.get("phantom_cases", 8))
        out = data_home() / "phantoms" / f"{like}-n{cases}"
        existing = next(iter(sorted(out.rglob(MARKER))), None) if out.is_dir() else None
        if existing is None and PLAN_ONLY.get():
            raise PhantomNotWritten(out)
        if existing is None:
            log(f"writing {cases} phantom cases like {like} to {out} (procedural anatomy, not patient data)")
            path = phantoms.synth(like, out, cases=cases, seed=0)
        else:
            path = existing.parent
        return Path(path), True
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: dataset root not found (expected a folder holding {task['title']})")
    return path, (path / MARKER).is_file()


def locate_sources(corpus: Mapping[str, Any], root: str | None,
                   log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """Locate every source of a combined corpus (synthesising phantom sources); (their common folder, any phantom).

    What :func:`locate_data` answers for a combined corpus (e.g. before a sweep's trials).
    """
    found = [locate_data(task, src_root, log=log) for task, src_root in source_roots(corpus, root)]
    return Path(os.path.commonpath([str(p) for p, _ in found])), any(ph for _, ph in found)


def read_splits(task: Mapping[str, Any], root: Path) -> dict[str, list[dict]]:
    """The task's splits under ``root`` (:func:`sslbench.data.layouts.read_datalist`); empty train or val refused."""
    from sslbench.data import layouts

    splits = layouts.read_datalist(task, root)
    for name in ("train", "val"):
        if not splits.get(name):
            raise DataError(f"{root}: the {name} split of task '{task['name']}' is empty")
    return splits
