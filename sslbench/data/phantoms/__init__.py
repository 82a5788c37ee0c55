"""Procedural phantom datasets written in the exact on-disk layouts of real benchmarks (``sslbench data synth``).

No dataset ships with sslbench, and no installable package ships a CT volume with organ labels, so the demo
and the tests run on *phantoms*: volumes whose anatomy is built from smooth, randomly deformed shapes at
plausible positions (:mod:`.base`: the geometry, the abdomen and chest bodies, deterministic file writing),
written in the same folder layout, file names and datalist JSON as the real dataset. The readers of
:mod:`sslbench.data.layouts` therefore cannot tell a phantom from the real thing, which is the point: the whole
pipeline is exercised. To keep results honest, every phantom root holds the marker file
:data:`~sslbench.data.marker.MARKER` that the rest of sslbench uses to label every result as a phantom result.

:data:`PHANTOMS` is the table of every layout :func:`synth` writes (one module per dataset family beside this
one). Adding one = a writer (and a body if needed) in a module, and one line in :data:`PHANTOMS`.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from sslbench.data.marker import GENERATOR, MARKER, NOTE, PARTIAL_MARKER, VERSION
from sslbench.data.phantoms import brats, btcv, classification, ct, mmwhs, msd
from sslbench.data.phantoms.base import _Job, _json_bytes, _Like, _write_atomic
from sslbench.data.threads import load_workers
from sslbench.errors import DataError

#: Every phantom layout, by the name ``synth(like=...)`` takes.
PHANTOMS: dict[str, _Like] = {
    "btcv": btcv.BTCV,
    "btcv-raw": btcv.BTCV_RAW,
    "msd-spleen": msd.SPLEEN,
    "mmwhs": mmwhs.MMWHS,
    **msd.TASK_PHANTOMS,                  # msd01 ... msd10
    "brats21": brats.BRATS21,
    "ccccii": classification.CCCCII,
    "chestxray14": classification.CHESTXRAY14,
    "lits": ct.LITS,
    "flare23": ct.FLARE23,
    "amos22": ct.AMOS22,
    "tcia-covid19": ct.TCIA_COVID19,
    "luna16": ct.LUNA16,
}
#: The layouts :func:`synth` can write.
LIKES = tuple(PHANTOMS)


def _prepare_root(root: Path, like: _Like) -> None:
    """Clear a previous phantom at ``root``; refuse to write over anything that is not a phantom."""
    previous = None
    for name in (MARKER, PARTIAL_MARKER):
        try:
            previous = json.loads((root / name).read_text())
            break
        except (OSError, ValueError):
            continue
    owned = set(like.owned)
    if isinstance(previous, dict) and previous.get("like") in PHANTOMS:
        owned |= set(PHANTOMS[previous["like"]].owned)
    if previous is None:
        clash = [name for name in sorted(owned) if (root / name).exists()]
        if clash:
            raise DataError(f"{root / clash[0]}: already exists and {root} has no {MARKER}; expected an empty "
                            f"folder or a previous sslbench phantom (refusing to overwrite a real dataset)")
        return
    for name in owned:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (root / MARKER).unlink(missing_ok=True)
    for leftover in root.glob(".*.partial-*"):  # temp files of a synth killed mid-write
        leftover.unlink()


def synth(like: str, out: Path, cases: int = 8, seed: int = 0, *, test_cases: int | None = None) -> Path:
    """Write a miniature phantom tree in the exact on-disk layout of a real dataset.

    Args:
        like: one of :data:`LIKES` (``btcv``: MONAI layout with dataset_0.json; ``btcv-raw``: RawData as
            distributed; ``msd-spleen``: Task09_Spleen; ``mmwhs``: ct_train files with raw label values).
        out: folder to write into (created if needed). A previous phantom there is replaced; a folder
            holding a real dataset of that layout (no marker) is refused with a DataError.
        cases: number of labelled cases (>= 1). ``btcv``/``btcv-raw`` keep about a fifth of them (at most 6,
            numbered 0035-0040 as in the real split) for validation, so they need at least 2 cases.
        seed: random seed; the same (like, cases, seed) gives byte-identical files.
        test_cases: unlabelled test images for layouts that have them (default ``max(1, cases // 4)``;
            ``mmwhs`` has none).

    Returns:
        The root a user passes as ``--root`` (``out``; for ``msd-spleen`` the ``out/Task09_Spleen`` folder),
        holding :data:`MARKER`. The marker is written last: its presence means the tree is complete.
    """
    if like not in PHANTOMS:
        raise DataError(f"phantom like '{like}': unknown; expected one of {', '.join(LIKES)}")
    if int(cases) < 1:
        raise DataError(f"phantom cases: expected at least 1, got {cases}")
    spec = PHANTOMS[like]
    threads = load_workers()   # a bad $SSLBENCH_LOAD_WORKERS is refused before anything is written
    if test_cases is None:
        test_cases = max(1, int(cases) // 4) if spec.test else 0
    if not spec.test:
        test_cases = 0
    root = Path(out) / spec.subdir if spec.subdir else Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _prepare_root(root, spec)
    marker = {"like": like, "cases": int(cases), "seed": int(seed), "generator": GENERATOR, "version": VERSION,
              "note": NOTE, "test_cases": int(test_cases)}
    _write_atomic(root / PARTIAL_MARKER, _json_bytes(marker))
    workers = min(threads, int(cases) + int(test_cases))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sslbench-phantom") if workers > 1 else \
            nullcontext() as pool:
        job = _Job(like=like, root=root, cases=int(cases), test_cases=int(test_cases), seed=int(seed),
                   body=spec.body, pool=pool)
        try:
            spec.write(job)
            job.wait()
        finally:
            for future in job.pending:   # a writer that failed: the queued cases are not written after it
                future.cancel()
    _write_atomic(root / MARKER, _json_bytes(marker))
    (root / PARTIAL_MARKER).unlink(missing_ok=True)
    return root
