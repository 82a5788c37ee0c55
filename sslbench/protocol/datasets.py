"""Finding a task's data (the user's copy or a synthesised phantom), its splits and labelled subset, and loading
its cases through the preprocessing transforms (threads, the case cache) with their checks."""
from __future__ import annotations

import contextvars
import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping


from ..errors import DataError


PHANTOM_MARKER = "sslbench_phantom.json"


def data_home() -> Path:
    return Path(os.environ.get("SSLBENCH_DATA", "data"))


#: set while a plan is only looked at (preflight, --dry-run): locate_data writes no phantom tree
_PLAN_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("sslbench_plan_only", default=False)


class PhantomNotWritten(Exception):
    """A phantom tree a plan needs is not written yet (raised only under :data:`_PLAN_ONLY`)."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def locate_data(task: Mapping[str, Any], root: str | Path | None, log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """The dataset root for a task, synthesising the phantom twin when the recipe says ``root: auto``."""
    data = task.get("data") or {}
    if data.get("sources"):   # a combined corpus: every source located (phantoms synthesised), their common folder
        from ..data.corpus import locate_sources

        return locate_sources(task, None if root is None else str(root), log)
    if root is None:
        from ..data.corpus import env_name

        root = os.environ.get(env_name(task["name"])) or data.get("root")
    if root in (None, ""):
        from ..data.corpus import env_name

        raise DataError(f"task '{task['name']}' needs --root DIR or ${env_name(task['name'])} (your copy of "
                        f"{task['title']} in its distributed layout: {', '.join(data.get('layouts', []))}; see the "
                        f"README's 'Real datasets'); for a demo use --task phantom-{task['name']}")
    if root == "auto":
        from ..data import phantom as phantom_mod

        like = data.get("phantom_like")
        if not like:
            raise DataError(f"task '{task['name']}': data.root is 'auto' but data.phantom_like is not set")
        cases = int(data.get("phantom_cases", 8))
        out = data_home() / "phantoms" / f"{like}-n{cases}"
        existing = next(iter(sorted(out.rglob(PHANTOM_MARKER))), None) if out.is_dir() else None
        if existing is None and _PLAN_ONLY.get():
            raise PhantomNotWritten(out)
        if existing is None:
            log(f"writing {cases} phantom cases like {like} to {out} (procedural anatomy, not patient data)")
            path = phantom_mod.synth(like, out, cases=cases, seed=0)
        else:
            path = existing.parent
        return Path(path), True
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: dataset root not found (expected a folder holding {task['title']})")
    return path, (path / PHANTOM_MARKER).is_file()


def read_splits(task: Mapping[str, Any], root: Path) -> dict[str, list[dict]]:
    from ..data import layouts

    splits = layouts.read_datalist(task, root)
    for name in ("train", "val"):
        if not splits.get(name):
            raise DataError(f"{root}: the {name} split of task '{task['name']}' is empty")
    return splits


def case_cache(run_cfg: Mapping[str, Any], task: Mapping[str, Any], with_label: bool):
    """(the preprocessed-case cache of ``task``, whether to write to it) per ``run.cache`` (read | write | none)."""
    mode = str(run_cfg.get("cache", "read"))
    if mode == "none":
        return None, False
    from ..data.cache import CaseCache

    return CaseCache(task, with_label=with_label), mode == "write"


def load_workers() -> int:
    """Threads that preprocess cases: ``$SSLBENCH_LOAD_WORKERS``, else the usable cores, at most 8."""
    env = os.environ.get("SSLBENCH_LOAD_WORKERS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def load_cases(items: list[dict], transform, desc: str, progress=None, cache=None, write: bool = False,
               keep: bool = True) -> list[dict]:
    """Apply the deterministic preprocessing to every case once (kept in memory for the run; ``keep=False``:
    only written to ``cache``, nothing kept or returned, as the streaming loader fills its cache).

    ``cache`` (a :class:`sslbench.data.cache.CaseCache` keyed by this very preprocessing) serves cases built by
    ``sslbench data cache``; with ``write`` the cases preprocessed here are stored into it too. Cases are
    preprocessed by :func:`load_workers` threads (each with its own copy of ``transform``; reading, resampling
    and decompression release the GIL), in the order of ``items`` whatever the threads' order; the first case
    that fails, in that order, raises its one-line DataError.
    """
    local = threading.local()

    def one(item: dict) -> dict:
        hit = cache.get(item) if cache is not None else None
        if hit is not None:
            hit["id"] = item["id"]
            return hit
        if not hasattr(local, "transform"):
            local.transform = copy.deepcopy(transform)
        d = {k: item[k] for k in ("image", "label") if item.get(k)}
        try:
            case = local.transform(d)
        except Exception as exc:  # MONAI wraps reader errors; one line naming the file and the cause
            from ..data.check import load_error

            raise DataError(load_error(item["image"], exc)) from None
        if cache is not None and write:
            cache.put(item, case)
        case["id"] = item["id"]
        return case

    out = []
    job = progress.add_task(desc, total=len(items), info="") if progress is not None else None
    workers = min(load_workers(), max(1, len(items)))
    if workers == 1:
        results = map(one, items)
        pool = None
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sslbench-load")
        results = pool.map(one, items)
    try:
        for case in results:
            if keep:
                out.append(case)
            if job is not None:
                progress.advance(job)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if job is not None:
        progress.remove_task(job)
    return out
