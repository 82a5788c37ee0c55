"""Which loader feeds streamed pre-training: torch's DataLoader with worker processes (sslbench's stream loader)
against MONAI's loaders over the same dataset, sampler and worker count (issue 22: "torch DataLoader or MONAI's
loaders; choose by measurement").

Every candidate reads the same step batches of the same case cache (``sslbench.data.stream.CachedVolumes`` with
``StepSampler``: the volumes of steps 0..N, resized to the method's pre-training size) and is timed draining them,
after its first batch (workers started), in alternation over ``--repeats`` rounds so that a busy machine
disturbs every candidate alike:

* ``torch-processes``: ``torch.utils.data.DataLoader(num_workers=W)`` (what ``method.pretrain.loader=stream``
  uses);
* ``monai-processes``: ``monai.data.DataLoader(num_workers=W)`` (torch's, with MONAI's worker seeding);
* ``monai-threads``: ``monai.data.ThreadDataLoader(num_workers=W, use_thread_workers=True)`` (workers are threads
  of the training process: no pickling, but the GIL between the resize calls);
* ``monai-thread-buffer``: ``monai.data.ThreadDataLoader(num_workers=0, buffer_size=2)`` (one background thread).

    python benchmarks/loader_choice.py --corpus-cases 16 --workers 1 2 --steps 12 --repeats 3 --json out.json

Prints volumes/s per candidate (median over rounds) and writes the rows to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHOD_SIZES = {"voco": (384, 384, 64), "swinunetr-ssl": (160, 160, 128), "mg": (192, 192, 128)}


def candidates(dataset, sampler_of, workers: int, prefetch: int):
    """{name: a function of (start, stop) giving that loader over steps start..stop-1}."""
    import monai.data as md
    from torch.utils.data import DataLoader

    def torch_processes(a, b):
        return DataLoader(dataset, batch_sampler=sampler_of(a, b), num_workers=workers, prefetch_factor=prefetch)

    def monai_processes(a, b):
        return md.DataLoader(dataset, batch_sampler=sampler_of(a, b), num_workers=workers, prefetch_factor=prefetch)

    def monai_threads(a, b):
        return md.ThreadDataLoader(dataset, batch_sampler=sampler_of(a, b), num_workers=workers,
                                   prefetch_factor=prefetch, use_thread_workers=True)

    def monai_thread_buffer(a, b):
        return md.ThreadDataLoader(dataset, batch_sampler=sampler_of(a, b), num_workers=0, buffer_size=2)

    return {"torch-processes": torch_processes, "monai-processes": monai_processes,
            "monai-threads": monai_threads, "monai-thread-buffer": monai_thread_buffer}


def drain_rate(make, steps: int, batch: int) -> float:
    """Volumes/s of one loader over ``steps`` batches, after its first (workers started)."""
    it = iter(make(0, steps + 1))
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n * batch / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="voco", choices=sorted(METHOD_SIZES))
    ap.add_argument("--corpus", default="phantom-corpus")
    ap.add_argument("--corpus-cases", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from sslbench import bench, distributed
    from sslbench.data.stream import StepSampler

    size = METHOD_SIZES[args.method]
    stream = bench.disk_stream({"corpus": args.corpus, "cases": args.corpus_cases, "workers": 1}, size, args.batch,
                               0, distributed.setup("cpu"), torch.device("cpu"))
    ds = stream.dataset

    def sampler_of(a, b):
        return StepSampler(len(ds), args.batch, 0, a, b, 0)

    rows = []
    for w in args.workers:
        rates: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, make in candidates(ds, sampler_of, w, args.prefetch).items():
                if name == "monai-thread-buffer" and w != args.workers[0]:
                    continue                      # no worker count of its own: measured once per round
                rates.setdefault(name, []).append(drain_rate(make, args.steps, args.batch))
        for name, r in rates.items():
            rows.append({"loader": name, "workers": 0 if name == "monai-thread-buffer" else w,
                         "method": args.method, "size": list(size), "batch": args.batch, "steps": args.steps,
                         "volumes": len(ds), "volumes_per_s": statistics.median(r), "rounds": r})
            print(f"{name:22s} workers {rows[-1]['workers']}: {rows[-1]['volumes_per_s']:6.2f} volumes/s "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in r)})", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "torch": torch.__version__, "cores": len(os.sched_getaffinity(0))}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
