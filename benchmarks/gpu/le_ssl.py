#!/usr/bin/env python3
"""The eight SSL rows of the label-efficiency mini-protocol (issue 18, section 3) on one GPU machine.

The same settings as the controls (BENCHMARKS.md, "the controls, 5 seeds": ``benchmarks/gpu/le_controls.sh``):
phantom MM-WHS with 20 cases (10 training cases of which 2 labelled, 10 validation cases), 400 fine-tuning steps
(validation at 200 and 400, best checkpoint), paper preset at SwinUNETR feature size 24; one pre-training per
method, seed 0, 500 steps of batch 2 on the phantom corpus (paper preset: 200 volumes). Scratch and the controls
are not re-run: their records (same fine-tuning protocol, same seeds) are in
``benchmarks/results/h200-2026-12-03-label-efficiency-controls/``.

Unlike ``label_efficiency.sh`` it is a scheduler: every pre-training starts at once; each method's fine-tunings
start as soon as its backbone exists, seed 0 of every method first, then seed 1, ...; at most MAXPROC processes
share the GPU; no fine-tuning starts unless FT_EST seconds remain before DEADLINE (so none is cut: the
fine-tuning checkpoints only at its end, as the controls did). Started once per machine (it survives the
device call that started it: ``le_ssl.sh`` runs it under setsid); later calls only wait and pack.

TASKS and LABELS (default: phantom-mmwhs, 2) widen it to the issue's whole grid: every backbone serves every
task x labelled-case count x seed, queued task by task (then labels, seed, method), so one session's pre-trainings
feed as many fine-tunings as its time allows. ``scratch`` in METHODS fine-tunes without a backbone. The two
controls keep their own script (``le_controls.sh``: supervised-task pre-trains on each task's own labels).

    python3 benchmarks/gpu/le_ssl.py OUT_DIR
    (environment: METHODS, SEEDS, TASKS, LABELS, MAXPROC, DEADLINE, FT_EST; PRETRAIN_STEPS, FINETUNE_STEPS, PRESET
    only to try the script)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = os.environ.get("METHODS", "mg pcrlv1 simsiam swinunetr-ssl mae pcrlv2 transvw voco").split()
SEEDS = [int(s) for s in os.environ.get("SEEDS", "0 1 2").split()]
TASKS = os.environ.get("TASKS", "phantom-mmwhs").split()
LABELS = [int(n) for n in os.environ.get("LABELS", "2").split()]
BATCH = 2
PRE = int(os.environ.get("PRETRAIN_STEPS", "500"))   # the protocol's values; smaller ones only to try the script
FT = int(os.environ.get("FINETUNE_STEPS", "400"))
PRESET = os.environ.get("PRESET", "paper")
EXTRA = ["--set", "model.feature_size=24"]
TASK_SETS = ["data.phantom_cases=20", "data.val_last=10"]
MAXPROC = int(os.environ.get("MAXPROC", "12"))
DEADLINE = time.time() + float(os.environ.get("DEADLINE", "1500"))
FT_EST = float(os.environ.get("FT_EST", "480"))
STREAM_WORKERS = os.environ.get("STREAM_WORKERS", "2")

out = Path(sys.argv[1])
logs = out / "logs"
logs.mkdir(parents=True, exist_ok=True)
t0 = time.time()


def say(text: str) -> None:
    line = f"[{time.time() - t0:7.1f} s] {text}"
    print(line, flush=True)
    with open(out / "summary.txt", "a") as f:
        f.write(line + "\n")


def sb(*args: str) -> list[str]:
    return [sys.executable, "-m", "sslbench", *args]


def task_sets(section: str) -> list[str]:
    return [a for kv in TASK_SETS for a in ("--set", f"{section}.{kv}")]


def backbone(method: str) -> Path | None:
    found = sorted(out.glob(f"pretrain/{method}/phantom-corpus/*/checkpoints/backbone.pt"))
    return found[0] if found else None


def pretrain_cmd(m: str) -> list[str]:
    more = ["--set", f"method.params.schedule_steps={PRE}"] if m == "pcrlv2" else []
    if m != "transvw":   # TransVW discovers its visual words on the whole corpus in memory (prepare)
        more += ["--set", "method.pretrain.loader=stream", "--set", f"run.loader_workers={STREAM_WORKERS}"]
    return sb("pretrain", "--method", m, "--preset", PRESET, "--seed", "0", "--out", str(out), "--resume", *more,
              "--set", f"method.pretrain.steps={PRE}", "--set", f"method.pretrain.batch_size={BATCH}",
              "--set", f"method.pretrain.checkpoint_every={PRE}", "--set", "method.pretrain.log_every=50", *EXTRA)


def finetune_cmd(m: str, seed: int, init: Path | None, task: str, labels: int) -> list[str]:
    start = ["--init", str(init)] if init is not None else []
    return sb("finetune", "--method", m, *start, "--task", task, "--preset", PRESET,
              "--seed", str(seed), "--out", str(out), "--resume",
              "--set", f"task.finetune.labeled_cases={labels}", "--set", f"task.finetune.max_steps={FT}",
              "--set", f"task.finetune.val_every={FT // 2}", "--set", f"task.finetune.checkpoint_every={FT}",
              "--set", "task.finetune.log_every=50", *task_sets("task"), *EXTRA)


def control() -> None:
    """A later device call may write OUT/CONTROL (lines KEY=VALUE: DEADLINE_AT epoch seconds, FT_EST, MAXPROC)
    to adjust a scheduler that is already running."""
    global DEADLINE, FT_EST, MAXPROC
    path = out / "CONTROL"
    if not path.is_file():
        return
    for line in path.read_text().split():
        key, _, value = line.partition("=")
        if key == "DEADLINE_AT":
            DEADLINE = float(value)
        elif key == "FT_EST":
            FT_EST = float(value)
        elif key == "MAXPROC":
            MAXPROC = int(value)


def main() -> int:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    caches = [("cache-corpus", sb("data", "cache", "--task", "phantom-corpus", "--preset", PRESET))] * any(
        m != "scratch" for m in METHODS)
    caches += [(f"cache-{t}", sb("data", "cache", "--task", t, "--preset", PRESET, *task_sets("task"))) for t in TASKS]
    for name, cmd in caches:
        start = time.time()
        rc = subprocess.call(cmd, stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env)
        say(f"{name} rc={rc} seconds={time.time() - start:.0f}")
        if rc:
            return rc
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    done: set[str] = set()
    failed: set[str] = set()
    for m in METHODS:
        if m == "scratch":
            done.add("pretrain-scratch")
            continue
        if backbone(m):
            say(f"pretrain {m}: backbone there")
            done.add(f"pretrain-{m}")
            continue
        running[f"pretrain-{m}"] = (subprocess.Popen(pretrain_cmd(m), stdout=open(logs / f"pretrain-{m}.log", "a"),
                                                     stderr=subprocess.STDOUT, env=env), time.time())
    queue = [(t, n, s, m) for t in TASKS for n in LABELS for s in SEEDS for m in METHODS]
    while running or queue:
        for name, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                say(f"{name} rc={proc.returncode} seconds={time.time() - start:.0f}")
                done.add(name)
                if proc.returncode:
                    failed.add(name)
                del running[name]
        for item in list(queue):
            t, n, s, m = item
            if len(running) >= MAXPROC:
                break
            control()
            what = f"{t} {n} labelled {m} s{s}"
            if m != "scratch" and f"pretrain-{m}" in done and (f"pretrain-{m}" in failed or not backbone(m)):
                say(f"finetune {what}: no backbone (its pre-training failed)")
                queue.remove(item)
                continue
            if f"pretrain-{m}" not in done:   # backbone.pt is written before the record is finished
                continue
            if DEADLINE - time.time() < FT_EST:
                say(f"finetune {what}: not started ({DEADLINE - time.time():.0f} s left < FT_EST {FT_EST:.0f})")
                queue.remove(item)
                continue
            # the first task and label count keep the names of the runs before TASKS / LABELS existed
            name = f"finetune-{m}-s{s}" if (t, n) == (TASKS[0], LABELS[0]) else f"finetune-{t}-l{n}-{m}-s{s}"
            init = None if m == "scratch" else backbone(m)
            running[name] = (subprocess.Popen(finetune_cmd(m, s, init, t, n),
                                              stdout=open(logs / f"{name}.log", "a"),
                                              stderr=subprocess.STDOUT, env=env), time.time())
            queue.remove(item)
        control()
        if time.time() > DEADLINE:
            for name, (proc, _) in running.items():
                say(f"{name}: stopped at the deadline")
                proc.terminate()
            break
        time.sleep(2)
    say("scheduler done")
    (out / "SCHEDULER_DONE").write_text("done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
