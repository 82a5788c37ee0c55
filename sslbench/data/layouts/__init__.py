"""Read real on-disk dataset layouts into a datalist: {"train": [...], "val": [...], ("test": [...])}.

Users point sslbench at their own copies of the datasets, in the layout they were distributed in (no
renaming by hand). A task recipe names, in ``data.layouts``, the layouts to try in order; :data:`READERS` is
the table of every layout sslbench reads (one module per dataset family beside this one; :mod:`.base` holds
what they share). Adding a layout = a reader module with a :class:`~sslbench.data.layouts.base.Reader` and
one line in :data:`READERS`.

Every item is ``{"id": str, "image": absolute path, "label": absolute path or None}`` (a list of paths where a
case's channels are separate files, as BraTS'); see :mod:`.base` for where the validation split comes from.
This package does not check that files exist; :mod:`sslbench.data.check` does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from sslbench.data.layouts import brats, btcv, classification, ct, mmwhs, msd
from sslbench.data.layouts.base import Datalist, Reader, _data, _task_name, case_id
from sslbench.errors import DataError

__all__ = ["READERS", "Datalist", "Reader", "absolute_root", "case_id", "detect_layout", "find_layout", "image_key",
           "load_datalist", "overlaps", "read_datalist"]

#: Every layout sslbench reads, in the order tried when a task names none.
READERS: dict[str, Reader] = {
    "monai-json": btcv.MONAI_JSON,
    "btcv-raw": btcv.BTCV_RAW,
    "msd": msd.MSD,
    "mmwhs": mmwhs.MMWHS,
    "brats": brats.BRATS,
    "lits": ct.LITS,
    "lits-msd": ct.LITS_MSD,
    "flare23": ct.FLARE23,
    "amos22": ct.AMOS22,
    "tcia-covid19": ct.TCIA_COVID19,
    "luna16": ct.LUNA16,
    "ccccii": classification.CCCCII,
    "chestxray14": classification.CHESTXRAY14,
}


def _task_layouts(task: Mapping[str, Any]) -> list[str]:
    names = list(_data(task).get("layouts") or READERS)
    unknown = [n for n in names if n not in READERS]
    if unknown:
        raise DataError(f"task '{_task_name(task)}': data.layouts: unknown layout '{unknown[0]}'; expected one of "
                        f"{', '.join(READERS)}")
    return names


def absolute_root(root: Path | str) -> Path:
    """The root as an absolute, normalised path (listed files then resolve to absolute paths too)."""
    return Path(os.path.normpath(os.path.abspath(Path(root).expanduser())))


def find_layout(task: Mapping[str, Any], root: Path) -> tuple[str, Path]:
    """(the first layout of the task found under ``root``, its base folder); a DataError naming the markers if none."""
    root = absolute_root(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found; expected a folder holding task '{_task_name(task)}'")
    names = _task_layouts(task)
    for name in names:
        base = READERS[name].locate(task, root)
        if base is not None:
            return name, base
    expected = "; ".join(f"{n}: {READERS[n].markers}" for n in names)
    raise DataError(f"{root}: no known layout of task '{_task_name(task)}' found; expected {expected}")


def detect_layout(task: Mapping[str, Any], root: Path) -> str:
    """The first layout of ``task["data"]["layouts"]`` whose markers exist under ``root``.

    Raises DataError naming the root and the markers expected where none matches.
    """
    return find_layout(task, root)[0]


def load_datalist(task: Mapping[str, Any], root: Path) -> Datalist:
    """Detect the layout and read it, with where every split came from; no consistency checks."""
    name, base = find_layout(task, root)
    return READERS[name].read(task, absolute_root(root), base)


def read_datalist(task: Mapping[str, Any], root: Path, *, strict: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, list[dict]]:
    """The dataset under ``root`` as ``{"train": [...], "val": [...], ("test": [...])}``.

    Each item is ``{"id": str, "image": absolute path, "label": absolute path or None}``. With ``strict``
    (the default, what training uses) an empty train or val split, or a case in two splits (same id or same
    image file), is a DataError naming the datalist; :func:`sslbench.data.check.check_dataset` reads with
    ``strict=False`` and reports those as problems instead. Files are not opened here (DICOM folders excepted:
    their slice headers split them into series). ``log`` receives the layout's notes (e.g. skipped DICOM series).
    """
    dl = load_datalist(task, root)
    for note in dl.notes if log is not None else ():
        log(note)
    if strict:
        for split in ("train", "val"):
            if not dl.splits.get(split):
                raise DataError(f"{dl.source}: the '{split}' split ({dl.origin.get(split, '?')}) is empty; "
                                f"expected at least one case")
        lines = overlaps(dl.splits)
        if lines:
            more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
            raise DataError(lines[0] + more)
    return dl.splits


def image_key(image: str | list[str]) -> str:
    """A hashable key of an item's image: the path, or the first path of a multi-file (one per channel) image."""
    return image if isinstance(image, str) else image[0]


def overlaps(splits: Mapping[str, list[dict]]) -> list[str]:
    """One line per case found in two splits (by id or by image path), naming the image file."""
    lines = []
    names = list(splits)
    for i, a in enumerate(names):
        ids = {it["id"] for it in splits[a]}
        paths = {image_key(it["image"]) for it in splits[a]}
        for b in names[i + 1:]:
            for it in splits[b]:
                if image_key(it["image"]) in paths or it["id"] in ids:
                    lines.append(f"{it['image']}: case '{it['id']}' is in both the '{a}' and '{b}' splits; "
                                 f"expected disjoint splits")
    return lines
