"""Peak host memory of a pre-training against the corpus size (issue 22's memory target), on the CPU.

    python benchmarks/stream_memory.py --counts 500 2000 --control 500 --work /tmp/sm [--json out.json]

For each corpus size N this writes N small CT-like volumes (a bright ellipsoid in air, 20^3 voxels at 2 mm, the
MONAI ``dataset_0.json`` layout ``phantom-corpus`` reads with ``--corpus-root``) and runs, each in its own process
(one torch thread, ``run.device=cpu``), a SimSiam pre-training of a few steps with volumes resized to 64^3
(3.4 MiB each), measuring the peak resident memory of the run's process (VmHWM) and of its loader workers
(ru_maxrss of the children):

- ``stream cold``: ``method.pretrain.loader=stream`` with an empty case cache (the run fills it first);
- ``stream warm``: the same command again into a new run folder, the cache already filled (``--repeats`` times);
- ``memory`` (only for the sizes given by ``--control``): the memory loader, which holds every resized volume.

The target: the stream's peak does not grow with N (warm and cold); the memory loader's control shows what holding
the corpus costs. Prints one table and (``--json``) writes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PEAK = """
import json, resource, sys
from sslbench.cli import main
code = main(sys.argv[1:])
self_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": code, "self_mb": self_kb / 1024, "workers_mb": child_kb / 1024}))
"""

RUN = ["pretrain", "--method", "simsiam", "--corpus", "phantom-corpus", "--preset", "tiny", "--set", "method.pretrain.steps=3",
       "--set", "method.pretrain.log_every=1", "--set", "run.loader_workers=2", "--set", "run.num_threads=1",
       "--set", "run.device=cpu", "--set", "method.params.resize=[64,64,64]", "--no-feasibility-check"]


def write_corpus(root: Path, n: int, side: int = 24, seed: int = 0) -> Path:
    """``n`` small CT-like volumes of ``side``^3 voxels at 2 mm (HU 60 inside a random ellipsoid, -1000 outside,
    noise sd 20) in the MONAI dataset_0.json layout that phantom-corpus reads (``--corpus-root``); fast to write
    and to preprocess. Also the corpus of tests/test_stream.py."""
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, side)] * 3, indexing="ij"))
    entries = []
    for i in range(n):
        r = (g ** 2 / rng.uniform(0.3, 0.8, size=(3, 1, 1, 1)) ** 2).sum(0)
        hu = np.where(r < 1, 60.0, -1000.0) + rng.normal(0, 20, size=r.shape)
        name = f"imagesTr/img{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(hu.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(root / name))
        entries.append({"image": name})
    (root / "dataset_0.json").write_text(json.dumps({"training": entries[1:], "validation": entries[:1]}))
    return root


def peak(args: list[str], env: dict) -> dict:
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", PEAK, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {' '.join(args)}\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--control", type=int, nargs="*", default=[500], help="sizes also run with the memory loader")
    ap.add_argument("--repeats", type=int, default=1, help="warm stream runs per size (their spread is the noise)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    rows = []
    for n in a.counts:
        work = a.work / f"n{n}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SSLBENCH_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SSLBENCH_CACHE=str(work / "cache"), SSLBENCH_DATA=str(work / "data"), OMP_NUM_THREADS="1",
                   CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(repo)])))
        t0 = time.time()
        corpus = write_corpus(work / "corpus", n, side=20, seed=n)
        written_s = time.time() - t0
        base = [*RUN, "--corpus-root", str(corpus)]
        stream = ["--set", "method.pretrain.loader=stream"]
        runs = [("stream cold", stream)] + [("stream warm", stream)] * a.repeats
        if n in a.control:
            runs.append(("memory", ["--set", "method.pretrain.loader=memory"]))
        for i, (label, extra) in enumerate(runs):
            out = peak([*base, *extra, "--out", str(work / f"run{i}")], env)
            rows.append({"volumes": n, "run": label, **out, "corpus_written_s": round(written_s, 1)})
            print(json.dumps(rows[-1]), flush=True)
    resized_mb = 64 ** 3 * 4 / 2 ** 20
    print(f"\nvolumes resized to 64^3: {resized_mb:.2f} MiB each; peak resident MiB (VmHWM of the run, ru_maxrss of "
          f"its loader workers)")
    print(f"{'volumes':>8} {'run':<12} {'run MiB':>9} {'workers MiB':>12} {'wall s':>7}")
    for r in rows:
        print(f"{r['volumes']:>8} {r['run']:<12} {r['self_mb']:>9.0f} {r['workers_mb']:>12.0f} {r['wall_s']:>7.1f}")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "resized_mib": resized_mb}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
