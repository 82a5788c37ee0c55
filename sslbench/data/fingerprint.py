"""The identity of the data a run reads: where it lives and a fingerprint of the files of its split.

A run's key (sslbench.store.run_key.run_key) hashes its protocol together with this fingerprint, so a run on another
copy of a dataset, or on the same root after its files changed, gets its own run folder instead of being
answered "already finished" with the other data's results.

* Real datasets: the resolved root and a digest of (path relative to the root, size, mtime in ns) of every file
  the split lists (images and label maps; a folder listed as one image, e.g. a CC-CCII scan of slices, counts
  with every file under it). ``SSLBENCH_DATA_FINGERPRINT=content`` digests each file's bytes (SHA-256)
  instead of its size and mtime: slower, but a copy with new mtimes keeps its fingerprint apart from the root.
* Phantom trees (a folder holding ``sslbench_phantom.json``): the generator settings of that marker and the
  file names, without root, sizes or mtimes. Phantoms are deterministic in their settings, so a phantom run
  keeps its key across machines and data folders.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from sslbench.data.marker import MARKER
from sslbench.errors import DataError, RecipeError

ENV = "SSLBENCH_DATA_FINGERPRINT"
MODES = ("stat", "content")


def mode() -> str:
    """``$SSLBENCH_DATA_FINGERPRINT``: ``stat`` (default: size and mtime) or ``content`` (checksums)."""
    value = os.environ.get(ENV, "stat").strip().lower() or "stat"
    if value not in MODES:
        raise RecipeError(f"${ENV}: {value!r}; expected one of {', '.join(MODES)}")
    return value


def item_files(items: Iterable[Mapping[str, Any]]) -> list[Path]:
    """The files a list of datalist items names: every ``image`` (a path or a list of paths) and every
    ``label`` that is a path on disk (classification labels are class names or numbers, not files)."""
    out: list[Path] = []
    for item in items:
        images = item.get("image")
        for p in images if isinstance(images, (list, tuple)) else [images]:
            if isinstance(p, (str, Path)) and str(p):
                out.append(Path(p))
        label = item.get("label")
        if isinstance(label, (str, Path)) and str(label) and ("/" in str(label) or os.sep in str(label)):
            out.append(Path(label))
    return out


def _expand(files: Iterable[Path]) -> list[Path]:
    """Files as listed, a listed folder replaced by the files under it; sorted, without repeats."""
    seen: set[Path] = set()
    for f in files:
        if f.is_dir():
            seen.update(p for p in f.rglob("*") if p.is_file())
        else:
            seen.add(f)
    return sorted(seen)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks: the one file checksum of sslbench."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:          # a file outside the root (a datalist may point anywhere): its full path
        return path.resolve().as_posix()


class _Phantoms:
    """The phantom tree (its marker's settings and folder) a file lies in, looked up once per folder."""

    def __init__(self):
        self.by_dir: dict[Path, tuple[Path, dict] | None] = {}

    def tree(self, path: Path) -> tuple[Path, dict] | None:
        chain = []
        d = path.resolve().parent
        found = None
        while True:
            if d in self.by_dir:
                found = self.by_dir[d]
                break
            chain.append(d)
            marker = d / MARKER
            if marker.is_file():
                try:
                    settings = json.loads(marker.read_text())
                except (OSError, ValueError):
                    raise DataError(f"{marker}: not readable JSON (a phantom tree's marker)") from None
                found = (d, settings if isinstance(settings, dict) else {"marker": settings})
                break
            if d.parent == d:
                break
            d = d.parent
        for c in chain:
            self.by_dir[c] = found
        return found


def fingerprint(root: str | Path, items: Iterable[Mapping[str, Any]], files: Iterable[Path] = ()) -> dict[str, Any]:
    """``{"root", "fingerprint", "files", "mode"}`` of the data a run reads (written to the run's data.json).

    ``items`` are the datalist items of the split(s) used; ``files`` any further files. ``mode`` is
    ``phantom`` when every file lies in a phantom tree, else ``stat`` or ``content`` (:func:`mode`). A listed
    file that does not exist is a DataError naming it.
    """
    root_path = Path(root).expanduser().resolve()
    # a combined corpus names its roots in words ("btcv=/a, luna16=/b"): its files count by their full paths
    root_text = str(root_path) if root_path.is_dir() else str(root)
    how = mode()
    paths = _expand([*item_files(items), *files])
    phantoms = _Phantoms()
    h = hashlib.sha256()
    all_phantom = bool(paths)
    for p in paths:
        tree = phantoms.tree(p)
        if tree is not None:     # deterministic in its settings: names only, not where or when written
            base, settings = tree
            entry = ["phantom", json.dumps(settings, sort_keys=True), _relative(p, base)]
        else:
            all_phantom = False
            try:
                st = p.stat()
            except OSError:
                raise DataError(f"{p}: listed by the datalist of {root_path} but not found") from None
            entry = [_relative(p, root_path), st.st_size, file_sha256(p) if how == "content" else st.st_mtime_ns]
        h.update(json.dumps(entry).encode() + b"\n")
    if not all_phantom:          # real data: where it lives is part of its identity
        h.update(f"root {root_text} mode {how}".encode())
    return {"root": root_text, "fingerprint": h.hexdigest()[:16], "files": len(paths),
            "mode": "phantom" if all_phantom else how}
