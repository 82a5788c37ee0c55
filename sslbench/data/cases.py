"""Preprocessed cases: each case of a split preprocessed once (threads), from or into the case cache.

:func:`load_cases` is what every run uses to hold its cases in memory (or, for the streaming loader, only to fill
the cache); :func:`build` is ``sslbench data cache``: every case of a task or corpus preprocessed into the cache.
"""
from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

from sslbench.data.locate import locate_data
from sslbench.data.threads import load_workers
from sslbench.errors import DataError


def case_cache(run_cfg: Mapping[str, Any], task: Mapping[str, Any], with_label: bool):
    """(the preprocessed-case cache of ``task``, whether to write to it) per ``run.cache`` (read | write | none)."""
    mode = str(run_cfg.get("cache", "read"))
    if mode == "none":
        return None, False
    from sslbench.data.cache import CaseCache   # (torch, MONAI's readers) only where a run reads cases

    return CaseCache(task, with_label=with_label), mode == "write"


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
            from sslbench.data.check import load_error

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


def build(task: Mapping[str, Any], root: str | Path | None, cache_root: str | Path | None = None,
          progress=None) -> dict[str, Any]:
    """Preprocess every case of a task (or corpus) into the cache; returns counts, the folder and its size.

    Cases already cached under the current key are skipped, so building twice costs nothing.
    """
    from sslbench.data import layouts
    from sslbench.data.cache import CaseCache
    from sslbench.data.transforms import preprocess_transforms

    with_label = task.get("kind") != "corpus"
    if with_label:   # what fine-tuning and evaluation read: the labelled splits
        root_path, phantom = locate_data(task, root, log=lambda *_: None)
        splits = layouts.read_datalist(task, root_path)
        items = [it for name in ("train", "val") for it in splits.get(name, [])]
    else:            # a corpus: every image pre-training reads, a combined corpus's sources included
        from sslbench.data.corpus import corpus_items

        root_path, phantom, items = corpus_items(task, None if root is None else str(root), log=lambda *_: None)
    cache = CaseCache(task, with_label=with_label, root=cache_root)
    todo = [it for it in items if cache.get(it) is None]
    if todo:
        load_cases(todo, preprocess_transforms(task, with_label=with_label), "cache", progress, cache=cache, write=True)
    return {"task": task["name"], "root": str(root_path), "phantom": phantom, "folder": str(cache.folder),
            "key": cache.key, "cases": len(items), "written": len(todo), "reused": len(items) - len(todo),
            "bytes": cache.size_bytes()}
