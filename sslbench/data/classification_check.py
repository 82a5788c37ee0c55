"""The checks a classification run (CC-CCII, NIH ChestX-ray14) makes of its cases before its run folder is claimed.

The classification twin of :func:`sslbench.data.check.check_case_headers` (issue 19: data that cannot lie).
What is cheap runs for every run, up front, on every image file of the train and val cases:

* the file exists and is not empty;
* Pillow identifies it from its header as a PNG or JPEG (not an HTML error page saved under the image's name,
  not a TIFF or GIF);
* its end marker is there (PNG: the ``IEND`` chunk, JPEG: the ``EOI`` marker ``FF D9``, looked for in the last
  KiB): a download cut short has none;
* the slices of one CC-CCII scan share one size (read from their headers), the size :func:`load_scan` stacks;
* the label is a class of the task: a CC-CCII class index ``0..len(classes) - 1``, a ChestX-ray14 0/1 vector
  of one entry per finding.

Decoding every pixel (damage inside the compressed data, with an intact end marker) is the expensive check:
the loader does it as it loads the split (:func:`sslbench.data.classification.load_split`), still before the run
folder is created (:func:`sslbench.protocol.finetuning.finetune`). With ``decode=True`` (``--force``, which deletes an old
run folder as the run is claimed) it runs here too, so that a refused ``--force`` keeps the old folder.
Classification tasks keep no case cache, so there is no checked case to skip (the segmentation path skips cases
its case cache holds: they passed these checks when they were cached).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

from sslbench.errors import DataError

#: the last 8 bytes of a PNG's IEND chunk (type + CRC), and JPEG's end-of-image marker
PNG_END = b"IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"
_TAIL = 1024
_FORMATS = {"PNG": ("PNG", PNG_END), "JPEG": ("JPEG", JPEG_END), "MPO": ("JPEG", JPEG_END)}


def _cause(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:120] or type(exc).__name__


def image_problem(path: str | Path, what: str = "image", decode: bool = False) -> tuple[str | None, tuple[int, int] | None]:
    """(the first problem of one PNG / JPEG file as a line naming it, or None; its (height, width) when read).

    ``what`` names the file's role in the messages ("slice", "radiograph"). ``decode`` also decodes every
    pixel (the loader's read), which finds damage inside the compressed data.
    """
    from PIL import Image

    path = str(path)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return f"{path}: file not found; expected the {what} file to exist", None
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc}); expected a readable {what} file", None
    if size == 0:
        return f"{path}: empty file (0 bytes); expected a PNG/JPG {what}", None
    try:
        with Image.open(path) as im:
            fmt, (width, height) = im.format, im.size
            if decode:
                im.convert("L")
    except (OSError, ValueError, SyntaxError) as exc:   # UnidentifiedImageError is an OSError
        return f"{path}: cannot be read as an image ({_cause(exc)}); expected a PNG/JPG {what}", None
    if fmt not in _FORMATS:
        return f"{path}: a {fmt} image; expected a PNG/JPG {what}", None
    name, end = _FORMATS[fmt]
    with open(path, "rb") as f:
        f.seek(max(0, size - _TAIL))
        tail = f.read()
    if end not in tail:
        return (f"{path}: truncated {name} (no {'IEND chunk' if name == 'PNG' else 'end-of-image marker'} at its "
                f"end); expected a complete download"), (height, width)
    if width < 1 or height < 1:
        return f"{path}: {height}x{width} pixels; expected a non-empty {what}", (height, width)
    return None, (height, width)


def label_problem(task: Mapping[str, Any], item: Mapping[str, Any]) -> str | None:
    """A label that is not a class of the task, as one line naming the case, or None."""
    classes = list(task.get("classes") or [])
    where = f"case '{item.get('id', '?')}' ({item.get('image', '?')})"
    label = item.get("label")
    if task.get("kind") == "classification2d":
        values = list(label) if isinstance(label, (list, tuple)) else None
        if values is None or len(values) != len(classes) or any(v not in (0, 1) for v in values):
            return (f"{where}: label {label!r} is not one 0/1 entry per finding of task '{task.get('name', '?')}'; "
                    f"expected {len(classes)} values 0 or 1 ({', '.join(classes)})")
        return None
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(classes):
        return (f"{where}: label {label!r} is not a class index of task '{task.get('name', '?')}'; expected "
                f"0..{len(classes) - 1} ({', '.join(f'{k} {c}' for k, c in enumerate(classes))})")
    return None


def case_problems(task: Mapping[str, Any], item: Mapping[str, Any], decode: bool = False) -> list[str]:
    """Every problem of one case: its label, then each of its image files (a CC-CCII scan's slices)."""
    problems = []
    line = label_problem(task, item)
    if line:
        problems.append(line)
    scan = task.get("kind") == "classification"
    files: Sequence[str] = (item.get("slices") or []) if scan else [item["image"]]
    if scan and not files:
        return problems + [f"{item['image']}: no slice images (case '{item.get('id', '?')}'); expected *.png or *.jpg slices"]
    first = None
    for f in files:
        line, shape = image_problem(f, "slice" if scan else "radiograph", decode)
        if line:
            problems.append(line)
            break
        if first is None:
            first = shape
        elif shape != first:
            problems.append(f"{f}: slice of {shape[0]}x{shape[1]} pixels in a scan of {first[0]}x{first[1]}; "
                            f"expected equal slice sizes")
            break
    return problems


def check_cases(task: Mapping[str, Any], items: list[Mapping[str, Any]], decode: bool = False,
                workers: int | None = None) -> None:
    """Check every case a classification run reads (:func:`case_problems`, threads: the checks wait on the
    disk); raises one DataError line naming the first file at fault, in case order, and how many more problems
    `sslbench data check` would list."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [line for lines in pool.map(lambda it: case_problems(task, it, decode), items) for line in lines]
    if problems:
        more = (f" (and {len(problems) - 1} more problem(s): sslbench data check --task {task.get('name', '?')} "
                f"lists them)") if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
