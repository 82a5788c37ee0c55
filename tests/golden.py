"""Golden runs (issue 21): tiny CPU phantom runs whose metrics.json must not change under a refactor.

Each run is one CLI command on phantoms synthesised with fixed seeds; its record is reduced to what the run
measured and how it is keyed (volatile fields - timestamps, data-wait fractions, absolute paths - dropped) and
compared with ``tests/golden.json`` within a small float tolerance (summation order differs between CPUs).

    python tests/golden.py            # (re)write tests/golden.json from this checkout, on purpose only

Regenerate only for a change that is meant to change records; the diff of golden.json is then the review.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).with_name("golden.json")

FAST = ["--set", "task.finetune.max_steps=8", "--set", "task.finetune.roi=[64,32,32]",
        "--set", "task.finetune.num_samples=1", "--set", "task.finetune.val_every=4",
        "--set", "task.finetune.checkpoint_every=2", "--set", "task.finetune.log_every=2",
        "--set", "task.evaluate.overlap=0.0", "--set", "task.finetune.warmup_steps=2",
        "--set", "task.preprocess.spacing=[6,6,6]"]
PRE = ["--set", "method.pretrain.steps=2", "--set", "method.pretrain.log_every=1",
       "--set", "method.pretrain.checkpoint_every=2"]
CLS = ["--set", "task.preprocess.size=[32,32,32]", "--set", "task.finetune.max_steps=4",
       "--set", "task.finetune.val_every=2", "--set", "task.finetune.checkpoint_every=2",
       "--set", "task.finetune.log_every=2", "--set", "task.evaluate.batch_size=8"]
CXR = ["--set", "task.preprocess.size=[32,32]", "--set", "task.finetune.max_steps=4",
       "--set", "task.finetune.val_every=2", "--set", "task.finetune.checkpoint_every=2",
       "--set", "task.finetune.batch_size=8", "--set", "task.finetune.labeled_cases=3"]

#: name -> (CLI arguments after `sslbench`, phantom to synthesise for --root or None, record folders to keep)
RUNS: dict[str, tuple[list[str], str | None, list[str]]] = {
    "scratch-btcv": (["run", "--method", "scratch", "--task", "phantom-btcv", *FAST], None,
                     ["finetune/phantom-btcv/scratch"]),
    "voco-btcv": (["run", "--method", "voco", "--task", "phantom-btcv", *FAST, *PRE,
                   "--set", "method.params.resize=[64,64,32]"], None,
                  ["pretrain/voco", "finetune/phantom-btcv/voco"]),
    "mg-btcv": (["run", "--method", "mg", "--task", "phantom-btcv", *FAST, *PRE], None,
                ["pretrain/mg", "finetune/phantom-btcv/mg"]),
    "scratch-ccccii": (["run", "--method", "scratch", "--task", "phantom-ccccii", *CLS], "ccccii",
                       ["finetune/phantom-ccccii/scratch"]),
    "scratch-chestxray14": (["run", "--method", "scratch", "--task", "phantom-chestxray14", *CXR], "chestxray14",
                            ["finetune/phantom-chestxray14/scratch"]),
}
SYNTH = {"ccccii": dict(cases=6, seed=0), "chestxray14": dict(cases=24, seed=0)}

#: fields of a record that are not what the run measured: when it finished, how long it waited, where it was
VOLATILE = {"finished", "started", "data_wait", "data_root", "seconds", "wall_seconds", "elapsed", "path",
            "backbone", "root", "volumes_per_second", "steps_per_second", "peak_memory", "peak_memory_gib",
            "seconds_this_session",
            # a run key is the protocol hash + the data's fingerprint, which follows files' mtimes: phantoms
            # synthesised afresh give new keys, so only the protocol hash is compared
            "run_key", "data_fingerprint"}
RUN_FOLDER = re.compile(r"[0-9a-f]{12}-s\d+")


def synth(name: str, home: Path) -> Path:
    from sslbench.data import phantoms

    return phantoms.synth(name, home / f"golden-{name}", **SYNTH[name])


def command(name: str, out: Path, home: Path) -> list[str]:
    args, phantom_name, _ = RUNS[name]
    root = ["--root", str(synth(phantom_name, home))] if phantom_name else []
    return [*args, *root, "--out", str(out)]


def run_in_process(name: str, out: Path, home: Path) -> int:
    """The golden run in this process on one thread (as golden.json was written: summation order follows the
    thread count)."""
    import torch

    from sslbench.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return main(command(name, out, home))
    finally:
        torch.set_num_threads(threads)


def reduce(doc, roots: tuple[str, ...]):
    """A record without its volatile fields; paths under ``roots`` made relative (``<root>/...``)."""
    if isinstance(doc, dict):
        return {k: reduce(v, roots) for k, v in sorted(doc.items()) if k not in VOLATILE
                and not k.endswith(("_seconds", "_time", "_s"))}
    if isinstance(doc, list):
        return [reduce(v, roots) for v in doc]
    if isinstance(doc, str):
        for r in roots:
            doc = doc.replace(r, "<root>")
        return RUN_FOLDER.sub("<run>", doc)
    return doc


def records(name: str, out: Path, home: Path) -> dict[str, dict]:
    """``{'<kind>/<task>/<method>': reduced metrics.json}`` of a finished golden run."""
    found = {}
    for folder in RUNS[name][2]:
        for path in sorted((out / folder).rglob("metrics.json")):
            key = str(path.parent.parent.relative_to(out))
            assert key not in found, f"{name}: two records under {key}"
            found[key] = reduce(json.loads(path.read_text()), (str(out), str(home)))
    return found


def differences(expected, actual, where: str = "", rel: float = 2e-3, abs_: float = 5e-3) -> list[str]:
    """Every place where ``actual`` differs from ``expected`` (floats within ``abs_`` + ``rel`` x |expected|).

    The tolerance is that of float noise, not of a changed computation: on 2 busy CPU cores two identical runs
    were seen to differ by up to 2e-3 in the Dice of a class the tiny run barely learns (a few boundary voxels);
    a changed loss, schedule, draw or metric moves the losses and scores far more."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{where}/{k}: missing" for k in expected if k not in actual]
        out += [f"{where}/{k}: unexpected" for k in actual if k not in expected]
        for k in expected:
            if k in actual:
                out += differences(expected[k], actual[k], f"{where}/{k}", rel, abs_)
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(expected)} items expected, {len(actual)} found"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{where}[{i}]", rel, abs_)]
    if isinstance(expected, float) or isinstance(actual, float):
        if isinstance(expected, (int, float)) and isinstance(actual, (int, float)) and not isinstance(expected, bool):
            if math.isnan(expected) and math.isnan(actual):
                return []
            if abs(expected - actual) <= abs_ + rel * abs(expected):
                return []
        return [f"{where}: expected {expected!r}, found {actual!r}"]
    return [] if expected == actual else [f"{where}: expected {expected!r}, found {actual!r}"]


def write() -> None:
    """Run every golden run in a fresh folder (a subprocess each, one thread) and write tests/golden.json."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        home = tmp / "data"
        env = dict(os.environ, SSLBENCH_DATA=str(home), OMP_NUM_THREADS="1")
        golden = {}
        for name in RUNS:
            out = tmp / name
            code = subprocess.call([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r});"
                                    f"import golden, pathlib; sys.exit(golden.run_in_process({name!r}, "
                                    f"pathlib.Path({str(out)!r}), pathlib.Path({str(home)!r})))"], env=env)
            if code:
                raise SystemExit(f"golden run {name} failed (exit {code})")
            golden[name] = records(name, out, home)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(golden)} runs)")


if __name__ == "__main__":
    write()
