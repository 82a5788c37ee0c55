#!/usr/bin/env python3
"""Phantom synthesis time by thread count, and the tree's digest (the same bytes whatever the count).

    python benchmarks/phantom_synth.py                      (btcv 40 cases, mmwhs 12, msd-spleen 12; 1 and 2 threads)
    python benchmarks/phantom_synth.py --like btcv --cases 200 --workers 1 8

Each tree is written to a fresh temporary folder; ``SSLBENCH_LOAD_WORKERS`` sets synth's threads.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--like", nargs="+", default=["btcv", "mmwhs", "msd-spleen"])
    ap.add_argument("--cases", type=int, nargs="+", default=None, help="one per --like (default 40 12 12)")
    ap.add_argument("--workers", nargs="+", default=["1", "2"])
    args = ap.parse_args()
    cases = args.cases or [40 if like.startswith("btcv") else 12 for like in args.like]
    if len(cases) != len(args.like):
        ap.error(f"--cases: expected {len(args.like)} values (one per --like), got {len(cases)}")
    from sslbench.data import phantoms

    print(f"{'like':<12} {'cases':>5} {'threads':>7} {'seconds':>8}  digest")
    for like, n in zip(args.like, cases):
        for w in args.workers:
            os.environ["SSLBENCH_LOAD_WORKERS"] = str(w)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                phantoms.synth(like, Path(tmp) / like, cases=n, seed=0)
                seconds = time.perf_counter() - start
                print(f"{like:<12} {n:>5} {w:>7} {seconds:>8.1f}  {digest(Path(tmp) / like)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
