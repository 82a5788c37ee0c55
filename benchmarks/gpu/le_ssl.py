#!/usr/bin/env python3
"""The label-efficiency mini-protocol (issue 18, section 3) on one GPU machine: the SSL rows, and (in METHODS)
scratch and the two controls.

The settings of the controls' first run (BENCHMARKS.md, "the controls, 5 seeds": ``benchmarks/gpu/le_controls.sh``):
phantom MM-WHS with 20 cases (10 training cases of which 2 labelled, 10 validation cases), 400 fine-tuning steps
(validation at 200 and 400, best checkpoint), paper preset at SwinUNETR feature size 24; one pre-training per
method, seed 0, 500 steps of batch 2 on the phantom corpus (paper preset: 200 volumes). On phantom MM-WHS at 2
labelled cases, scratch and the controls need no new run: their records (same protocols, seeds 0-4) are in
``benchmarks/results/h200-2026-12-03-label-efficiency-controls/``.

Unlike ``label_efficiency.sh`` it is a scheduler: every pre-training starts at once; each method's fine-tunings
start as soon as its backbone exists, seed 0 of every method first, then seed 1, ...; at most MAXPROC processes
share the GPU; no fine-tuning starts unless FT_EST seconds remain before DEADLINE (so none is cut: the
fine-tuning checkpoints only at its end, as the controls did). Started once per machine (it survives the
device call that started it: ``le_ssl.sh`` runs it under setsid); later calls only wait and pack.

TASKS and LABELS (default: phantom-mmwhs, 2), or CELLS ("phantom-mmwhs:6 phantom-btcv:2": chosen cells, in this
order), widen it to the issue's whole grid: every backbone serves every
task x labelled-case count x seed, queued task by task (then labels, seed, method), so one session's pre-trainings
feed as many fine-tunings as its time allows. ``scratch`` in METHODS fine-tunes without a backbone; the two
controls (``supervised``: on phantom BTCV's labels; ``supervised-task``: on each task's own training split, one
pre-training per task) run with the same commands and hashes as ``label_efficiency.sh`` / ``le_controls.sh`` gave
them, so one call can run a task's whole row set. A fine-tuning that runs out of GPU memory is queued again once.

    python3 benchmarks/gpu/le_ssl.py OUT_DIR
    (environment: METHODS, SEEDS, TASKS, LABELS, CELLS, MAXPROC, DEADLINE, FT_EST, CORPUS; PRETRAIN_STEPS,
    FINETUNE_STEPS, PRESET only to try the script)
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

METHODS = os.environ.get("METHODS", "mg pcrlv1 simsiam swinunetr-ssl mae pcrlv2 transvw voco").split()
SEEDS = [int(s) for s in os.environ.get("SEEDS", "0 1 2").split()]
TASKS = os.environ.get("TASKS", "phantom-mmwhs").split()
LABELS = [int(n) for n in os.environ.get("LABELS", "2").split()]
#: the (task, labelled cases) cells to fine-tune, in queue order: CELLS="phantom-mmwhs:6 phantom-btcv:2" picks cells
#: of the grid (a session that must not redo a finished one); by default every TASKS x LABELS cell
CELLS = [(c.split(":")[0], int(c.split(":")[1])) for c in os.environ.get("CELLS", "").split()] or [
    (t, n) for t in TASKS for n in LABELS]
TASKS = list(dict.fromkeys(t for t, _ in CELLS))
BATCH = 2
PRE = int(os.environ.get("PRETRAIN_STEPS", "500"))   # the protocol's values; smaller ones only to try the script
FT = int(os.environ.get("FINETUNE_STEPS", "400"))
PRESET = os.environ.get("PRESET", "paper")
EXTRA = ["--set", "model.feature_size=24"]
#: each fine-tuning task's tree: phantom MM-WHS as on 2026-12-03 (20 cases, the last 10 validate); phantom BTCV
#: with the real BTCV's 30 labelled cases, whose datalist keeps its own 6 validation cases (0035-0040, the MONAI
#: split: a datalist's validation list wins over data.val_last, so 20 cases would validate on 4)
TASK_SETS = {"phantom-mmwhs": ["data.phantom_cases=20", "data.val_last=10"], "phantom-btcv": ["data.phantom_cases=30"]}


def _default_maxproc() -> int:
    """12 processes on a 141 GB H200 (up to 101 GB used, 2026-12-03); one per 10 GiB of the card otherwise: 12 on
    an 80 GB H100 ran out of memory (2026-12-07, six pre-trainings and six fine-tunings at once)."""
    try:
        mib = int(subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 7             # the card's memory unknown: what an 80 GB H100 holds
    return max(1, min(12, mib // 10240))


MAXPROC = int(os.environ.get("MAXPROC") or _default_maxproc())
DEADLINE = time.time() + float(os.environ.get("DEADLINE", "1500"))
FT_EST = float(os.environ.get("FT_EST", "480"))
STREAM_WORKERS = os.environ.get("STREAM_WORKERS", "2")
#: CORPUS="phantom-voco-corpus": the SSL rows pre-train on that corpus instead of their recipes' (phantom-corpus:
#: abdominal phantoms only), e.g. an arm with the chest twins of TCIA COVID-19 and LUNA16 for phantom MM-WHS; its
#: pre-training hashes differ, so the report lists those rows apart. Unset: the recipes' corpus, the grid so far.
SSL_CORPUS = os.environ.get("CORPUS", "")

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


def task_sets(section: str, task: str) -> list[str]:
    """TASK_SETS of ``task`` as --set arguments under ``section`` (task or corpus)."""
    return [a for kv in TASK_SETS.get(task, []) for a in ("--set", f"{section}.{kv}")]


#: the two controls (BENCHMARKS.md, "the controls"): supervised pre-trains by segmentation on phantom BTCV's
#: training split, supervised-task on each fine-tuning task's own (its recipe's corpus is the task)
CONTROLS = ("supervised", "supervised-task")


def corpus_of(method: str, task: str) -> str:
    """The corpus a method pre-trains on for fine-tuning task ``task`` (its recipe's; the task for supervised-task)."""
    from sslbench import recipes

    corpus = recipes.load_method(method)["pretrain"]["corpus"]
    if corpus == recipes.TASK_CORPUS:
        return task
    return SSL_CORPUS if SSL_CORPUS and method not in CONTROLS else corpus


def backbone(method: str, corpus: str) -> Path | None:
    found = sorted(out.glob(f"pretrain/{method}/{corpus}/*/checkpoints/backbone.pt"))
    return found[0] if found else None


def pretrain_cmd(m: str, corpus: str, again: bool = False) -> list[str]:
    """The pre-training of method m on corpus, as label_efficiency.sh ran the controls and le_ssl.py the SSL rows
    (the same hashes: the controls with the memory loader, on the task's 20-case tree for supervised-task)."""
    more = ["--set", f"method.params.schedule_steps={PRE}"] if m == "pcrlv2" else []
    if m == "supervised-task":
        more += ["--corpus", corpus, *task_sets("corpus", corpus)]
    elif m not in CONTROLS and m != "transvw":   # TransVW discovers its visual words on the corpus in memory
        more += ["--set", "method.pretrain.loader=stream", "--set", f"run.loader_workers={STREAM_WORKERS}"]
    if SSL_CORPUS and m not in CONTROLS:   # only when asked: the grid's hashes were made without --corpus
        more += ["--corpus", corpus]
    return sb("pretrain", "--method", m, "--preset", PRESET, "--seed", "0", "--out", str(out),
              "--force" if again else "--resume", *more,
              "--set", f"method.pretrain.steps={PRE}", "--set", f"method.pretrain.batch_size={BATCH}",
              "--set", f"method.pretrain.checkpoint_every={PRE}", "--set", "method.pretrain.log_every=50", *EXTRA)


def finetune_cmd(m: str, seed: int, init: Path | None, task: str, labels: int, again: bool = False) -> list[str]:
    start = ["--init", str(init)] if init is not None else []
    return sb("finetune", "--method", m, *start, "--task", task, "--preset", PRESET,
              "--seed", str(seed), "--out", str(out), "--force" if again else "--resume",
              "--set", f"task.finetune.labeled_cases={labels}", "--set", f"task.finetune.max_steps={FT}",
              "--set", f"task.finetune.val_every={FT // 2}", "--set", f"task.finetune.checkpoint_every={FT}",
              "--set", "task.finetune.log_every=50", *task_sets("task", task), *EXTRA)


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


def out_of_memory(log: Path) -> bool:
    """Whether a failed run's log ends in CUDA's out-of-memory error (the GPU was full, not the run wrong)."""
    try:
        tail = log.read_text(errors="replace")[-20000:]
        return "CUDA out of memory" in tail or "CUDA error: out of memory" in tail
    except OSError:
        return False


def main() -> int:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    # the fine-tuning tasks' trees (scratch and supervised-task need nothing else) and the pre-training corpora
    task_caches = [(f"cache-{t}", sb("data", "cache", "--task", t, "--preset", PRESET, *task_sets("task", t)))
                   for t in TASKS]
    corpus_caches = [("cache-corpus", sb("data", "cache", "--task", SSL_CORPUS or "phantom-corpus", "--preset",
                                         PRESET))] * any(
        m != "scratch" and m not in CONTROLS for m in METHODS)
    if "supervised" in METHODS:   # supervised's corpus: phantom BTCV at its recipe's size (not TASK_SETS')
        corpus_caches.append(("cache-phantom-btcv-corpus",
                              sb("data", "cache", "--task", "phantom-btcv", "--preset", PRESET)))
    cache_procs: list[subprocess.Popen] = []   # the running cache command (stopped at the deadline)

    def cache(name: str, cmd: list[str]) -> int:
        start = time.time()
        try:
            proc = subprocess.Popen(cmd, stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            say(f"{name}: could not start ({exc})")
            return 1
        cache_procs.append(proc)
        rc = proc.wait()
        say(f"{name} rc={rc} seconds={time.time() - start:.0f}")
        return rc

    # every cache builds at once (16 cores, at most 8 threads each): the corpora in a thread that outlives the task
    # trees', so the pre-trainings start once the corpus is cached and the GPU fine-tunes scratch meanwhile (on
    # 2026-12-07 the three caches ran one after the other for 137 s, the GPU idle)
    corpus_rc: list[int] = []
    stop_caching = threading.Event()   # a task tree failed: no further corpus cache starts

    def cache_corpora() -> None:
        try:
            for name, cmd in corpus_caches:
                if stop_caching.is_set():
                    corpus_rc.append(1)
                    return
                corpus_rc.append(cache(name, cmd))
                if corpus_rc[-1]:
                    return
        except Exception as exc:   # a crash of this thread fails the corpora, never passes for their success
            say(f"corpus caches: {exc!r}")
            corpus_rc.append(1)

    corpora = threading.Thread(target=cache_corpora, daemon=True)
    corpora.start()
    task_rc: dict[str, int] = {}

    def cache_task(name: str, cmd: list[str]) -> None:
        task_rc[name] = cache(name, cmd)

    task_threads = [threading.Thread(target=cache_task, args=(name, cmd), daemon=True) for name, cmd in task_caches]
    for thread in task_threads:
        thread.start()
    for thread in task_threads:
        thread.join()
    if any(task_rc.get(name, 1) for name, _ in task_caches):   # a task tree that failed (or whose thread died)
        stop_caching.set()
        for proc in cache_procs:
            if proc.poll() is None:
                proc.terminate()
        corpora.join(timeout=90)        # its running cache stopped, none started after it
        return 1
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    done: set[str] = set()
    failed: set[str] = set()
    def pre_name(m: str, corpus: str) -> str:   # the SSL rows' pre-trainings keep their names of 2026-12-03
        return f"pretrain-{m}" if m not in CONTROLS and not SSL_CORPUS else f"pretrain-{m}-{corpus}"

    pretrainings = list(dict.fromkeys((m, corpus_of(m, t)) for m in METHODS if m != "scratch" for t in TASKS))
    pre_runs = {pre_name(m, corpus): (m, corpus) for m, corpus in pretrainings}   # run name -> (method, corpus)
    again_pre: set[tuple[str, str]] = set()
    waiting_pre = []   # pre-trainings whose corpus is still being cached
    for m, corpus in pretrainings:
        name = pre_name(m, corpus)
        if backbone(m, corpus):
            say(f"pretrain {m} on {corpus}: backbone there")
            done.add(name)
        else:
            waiting_pre.append((m, corpus))

    def start_pretrainings() -> None:
        """Every pre-training whose corpus is ready (supervised-task's, a fine-tuning task's tree: at once; the others
        once the corpus thread is done), all at once as before; a corpus that failed to cache fails its
        pre-trainings."""
        for m, corpus in list(waiting_pre):
            name = pre_name(m, corpus)
            if m == "supervised-task":   # its corpus is the task's own tree, cached above
                pass
            elif corpora.is_alive():
                continue
            elif any(corpus_rc):
                say(f"{name}: not started (a corpus cache failed, see logs/cache-*.log)")
                done.add(name)
                failed.add(name)
                waiting_pre.remove((m, corpus))
                continue
            running[name] = (subprocess.Popen(pretrain_cmd(m, corpus), stdout=open(logs / f"{name}.log", "a"),
                                              stderr=subprocess.STDOUT, env=env), time.time())
            waiting_pre.remove((m, corpus))

    start_pretrainings()
    queue = [(t, n, s, m) for t, n in CELLS for s in SEEDS for m in METHODS]
    items: dict[str, tuple[str, int, int, str]] = {}   # fine-tuning run name -> its queue item
    again: set[tuple[str, int, int, str]] = set()      # items started a second time (after running out of memory)
    while running or queue or waiting_pre:
        start_pretrainings()
        for name, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                say(f"{name} rc={proc.returncode} seconds={time.time() - start:.0f}")
                done.add(name)
                if proc.returncode:
                    failed.add(name)
                del running[name]
                item = items.get(name)
                if proc.returncode and item is not None and item not in again and out_of_memory(logs / f"{name}.log"):
                    say(f"{name}: CUDA ran out of memory; queued again (once, --force: its record failed)")
                    again.add(item)
                    queue.insert(0, item)
                pre = pre_runs.get(name)
                if proc.returncode and pre is not None and pre not in again_pre and out_of_memory(logs / f"{name}.log"):
                    say(f"{name}: CUDA ran out of memory; started again (once, --force)")
                    again_pre.add(pre)
                    done.discard(name)
                    failed.discard(name)
                    running[name] = (subprocess.Popen(pretrain_cmd(*pre, again=True),
                                                      stdout=open(logs / f"{name}.log", "a"),
                                                      stderr=subprocess.STDOUT, env=env), time.time())
        for item in list(queue):
            t, n, s, m = item
            if len(running) + len(waiting_pre) >= MAXPROC:   # a slot kept for each pre-training still to start
                break
            control()
            what = f"{t} {n} labelled {m} s{s}"
            corpus = corpus_of(m, t) if m != "scratch" else None
            pre = pre_name(m, corpus) if corpus else None
            if pre and pre in done and (pre in failed or not backbone(m, corpus)):
                say(f"finetune {what}: no backbone (its pre-training failed)")
                queue.remove(item)
                continue
            if pre and pre not in done:   # backbone.pt is written before the record is finished
                continue
            if DEADLINE - time.time() < FT_EST:
                say(f"finetune {what}: not started ({DEADLINE - time.time():.0f} s left < FT_EST {FT_EST:.0f})")
                queue.remove(item)
                continue
            # the first task and label count keep the names of the runs before TASKS / LABELS existed
            name = f"finetune-{m}-s{s}" if (t, n) == ("phantom-mmwhs", 2) else f"finetune-{t}-l{n}-{m}-s{s}"
            init = backbone(m, corpus) if corpus else None
            items[name] = item
            running[name] = (subprocess.Popen(finetune_cmd(m, s, init, t, n, again=item in again),
                                              stdout=open(logs / f"{name}.log", "a"),
                                              stderr=subprocess.STDOUT, env=env), time.time())
            queue.remove(item)
        control()
        if time.time() > DEADLINE:
            for name, (proc, _) in running.items():
                say(f"{name}: stopped at the deadline")
                proc.terminate()
            for proc in cache_procs:
                if proc.poll() is None:
                    say("a corpus cache: stopped at the deadline")
                    proc.terminate()
            for proc in [p for p, _ in running.values()] + cache_procs:   # gone before SCHEDULER_DONE says so
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            corpora.join(timeout=60)
            break
        time.sleep(2)
    say("scheduler done")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:   # written however the scheduler ends (a failed cache, a crash), so le_ssl.sh AGAIN=1 can start again
        (out / "SCHEDULER_DONE").write_text("done\n")
    sys.exit(code)
