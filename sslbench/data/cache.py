"""A cache of preprocessed volumes as uncompressed, memory-mapped arrays (``sslbench data cache``).

Preprocessing a CT (orientation, 1.5 mm resampling, window, foreground crop) costs seconds per case; a large
corpus or many sweep trials repeat it. ``sslbench data cache --task T --root R`` runs it once and writes each
case as ``.npy`` arrays; runs then map them (``numpy.load(mmap_mode="c")``: pages are read on first touch,
nothing is decompressed) instead of preprocessing again.

A stale cache is never read (the known failure of MONAI's PersistentDataset in the official VoCo code, whose
cache survives a changed transform or MONAI version). The cache folder is keyed by a SHA-256 of

* everything in the task recipe that preprocessing reads (``preprocess``, ``kind``, ``channels``, ``data``
  minus the keys that only choose files or splits),
* the source code of the modules of :mod:`sslbench.data` that preprocessing runs (a changed transform or
  reader is a new key),
* the MONAI and sslbench versions, this cache's format version and the version of the voxel checks
  (:data:`sslbench.data.check.VOXEL_CHECKS`: a case is cached only after it passed them, so a cache written
  before they changed is revalidated, not trusted);

and each case file by its id plus the path, size and modification time of its image and label files, so a
replaced file is a miss, not a stale hit. Writes are atomic (a temporary file renamed into place), so a run
killed while caching leaves no half-written array behind.

Where: ``$SSLBENCH_CACHE`` if set, else ``<data home>/cache`` (data home: ``$SSLBENCH_DATA`` or ``./data``).
Runs use the cache according to ``run.cache``: ``read`` (default: use cached cases, preprocess the rest in
memory), ``write`` (also store the cases it had to preprocess), ``none`` (never use it).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..store.records import new_file_mode
from .layouts.ct import SERIES_SEP

FORMAT = 1
MODES = ("read", "write", "none")
#: data keys that choose files or splits, not how a case is preprocessed.
_NOT_PREPROCESSING = ("root", "layouts", "datalist", "train_split", "val_split", "val_ids", "val_last",
                      "phantom_like", "phantom_cases", "phantom_total", "sources", "fold", "split_file")


def cache_home() -> Path:
    env = os.environ.get("SSLBENCH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("SSLBENCH_DATA", "data")) / "cache"


def preprocessing_key(task: Mapping[str, Any], with_label: bool) -> str:
    """The SHA-256 (16 hex) naming a task's preprocessing: recipe keys, transform code, library versions."""
    import monai

    from .. import __version__
    from .check import VOXEL_CHECKS

    data = {k: v for k, v in (task.get("data") or {}).items() if k not in _NOT_PREPROCESSING}
    spec = {
        "format": FORMAT,
        "voxel_checks": VOXEL_CHECKS,   # cases cached before these checks (or an older version) are a miss
        "kind": task.get("kind"),
        "preprocess": task.get("preprocess"),
        "channels": task.get("channels"),
        "data": data,
        "with_label": bool(with_label),
        "code": _preprocessing_code_digest(),
        "monai": monai.__version__,
        "sslbench": __version__,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _preprocessing_code_digest() -> str:
    """SHA-256 of the code that preprocessing may run: every module of sslbench/data and of its layouts/ readers
    except the phantom writers (phantoms/), the checker, this cache and the streaming loader, which reads the
    cache (a changed transform, reader or layout is a new cache key)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(here.rglob("*.py")):
        rel = path.relative_to(here)
        if rel.parts[0] == "phantoms" or path.name.startswith(("check", "cache", "stream")):
            continue
        h.update(rel.as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _file_identity(path) -> list:
    if isinstance(path, (list, tuple)):   # one file per channel (BraTS modalities)
        return [_file_identity(p) for p in path]
    if not path:
        return [None]
    if SERIES_SEP in str(path):   # one series of a DICOM folder: the folder's files, and the series
        folder, uid = str(path).split(SERIES_SEP, 1)
        return [_file_identity(folder), uid]
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return [str(p), None]
    if p.is_dir():   # a DICOM series or slice folder: its files' sizes and times
        files = sorted(q for q in p.rglob("*") if q.is_file())
        return [str(p), [(q.name, q.stat().st_size, q.stat().st_mtime_ns) for q in files]]
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class CaseCache:
    """The cached cases of one (task preprocessing, with_label) key."""

    def __init__(self, task: Mapping[str, Any], with_label: bool = True, root: str | Path | None = None):
        self.key = preprocessing_key(task, with_label)
        self.folder = Path(root) if root is not None else cache_home()
        self.folder = self.folder / str(task.get("name", "task")) / self.key
        self.with_label = with_label

    def _stem(self, item: Mapping[str, Any]) -> Path:
        ident = json.dumps([_file_identity(item.get("image")),
                            _file_identity(item.get("label") if self.with_label else None)], default=str)
        digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
        return self.folder / f"{_safe(str(item['id']))}-{digest}"

    def files(self, item: Mapping[str, Any]) -> tuple[Path, Path | None]:
        """(image .npy, label .npy or None) of a case in this cache (present or not): what the streaming
        pre-training loader (:mod:`sslbench.data.stream`) maps in its workers."""
        stem = self._stem(item)
        label = stem.with_name(stem.name + ".label.npy") if self.with_label and item.get("label") else None
        return stem.with_name(stem.name + ".image.npy"), label

    def get(self, item: Mapping[str, Any]) -> dict | None:
        """The cached case (tensors backed by copy-on-write memory maps), or None on a miss."""
        stem = self._stem(item)
        image = stem.with_name(stem.name + ".image.npy")
        label = stem.with_name(stem.name + ".label.npy")
        if not image.is_file() or (self.with_label and item.get("label") and not label.is_file()):
            return None
        out: dict[str, Any] = {"image": torch.from_numpy(np.load(image, mmap_mode="c"))}
        if self.with_label and item.get("label"):
            out["label"] = torch.from_numpy(np.load(label, mmap_mode="c"))
        return out

    def put(self, item: Mapping[str, Any], case: Mapping[str, Any]) -> None:
        """Store a preprocessed case atomically (arrays first, so a reader never sees a partial case)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self._stem(item)
        keys = ["label", "image"] if self.with_label and case.get("label") is not None else ["image"]
        for key in keys:   # the image last: get() treats the image file as the case's presence
            value = case[key]
            arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            target = stem.with_name(f"{stem.name}.{key}.npy")
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".npy")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(arr))
                os.chmod(tmp, new_file_mode())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        from .check import VOXEL_CHECKS

        meta = {"id": item["id"], "image": item.get("image"), "label": item.get("label") if self.with_label else None,
                "key": self.key, "voxel_checks": VOXEL_CHECKS}   # put() follows LoadChecked: the case passed them
        (self.folder / "index").mkdir(exist_ok=True)
        (self.folder / "index" / f"{stem.name}.json").write_text(json.dumps(meta))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.npy")) if self.folder.is_dir() else 0
