"""The demo: ``sslbench run`` without arguments.

VoCo against scratch on phantom MM-WHS at the tiny preset: VoCo pre-trains briefly on the tiny phantom corpus,
then both fine-tune with the same budget and seed, and a side-by-side table ends it (Dice per structure and mean,
marked PHANTOM). The demo's settings are overrides of the tiny preset (:data:`DEMO_OVERRIDES`), so the tiny
preset the test suite runs on stays as light as it is; they are recorded in each run's recipe like any --set.

A tiny demo shows the harness working end to end; it is no evidence about the methods (one seed, two
validation cases, a few hundred steps on procedural phantoms), and the table says so.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from . import protocol

TASK = "phantom-mmwhs"
METHODS = ("scratch", "voco")

#: fine-tuning settings of the demo, for both methods, on top of the task's tiny preset (3 mm grid, roi 64 x 64 x 32,
#: 150 steps at lr 2e-3, validation every 75 steps): a 4 mm grid, on which a 64 x 32 x 32 crop (256 x 128 x 128 mm,
#: half the voxels of the tiny crop, the smallest SwinUNETR v2 takes) holds most of the heart, so that the same CPU
#: time buys twice the steps; the final evaluation only (no periodic validation: sliding-window passes are a third
#: of a tiny run's time). At this budget scratch leaves the left atrium, left ventricle and pulmonary artery at 0
#: (README "Fresh machine"): a 6 mm grid, on which the crop holds the whole heart, did no better in 200 steps
#: (19.8% mean, the same three at 0; 5 mm alike at step 120, 2026-12-03), so the measured settings stay. With 480
#: steps on the 6 mm grid scratch learns all seven (65.9% mean, 2026-12-07) in 294 s for one row: two such rows
#: would double the demo's 5 minutes (README "What it learns").
DEMO_OVERRIDES: tuple[str, ...] = (
    "task.preprocess.spacing=[4.0,4.0,4.0]",
    "task.finetune.roi=[64,32,32]",
    "task.finetune.max_steps=160",
    "task.finetune.lr=2e-3",
    "task.finetune.warmup_steps=10",
    "task.finetune.val_every=0",
    "task.finetune.log_every=10",
    "task.finetune.checkpoint_every=20",
)
#: the pre-training of the demo (VoCo only): 10 steps of the tiny preset's VoCo on the tiny phantom-corpus (12
#: phantoms; the tiny preset: 40 steps), to keep the demo within 5 minutes of a 2-core CPU
PRETRAIN_OVERRIDES: dict[str, tuple[str, ...]] = {
    "voco": ("method.pretrain.steps=10", "method.pretrain.warmup_steps=2", "method.pretrain.checkpoint_every=10"),
}


def method_overrides(method: str, overrides: Sequence[str] = ()) -> list[str]:
    """The --set list the demo gives ``method``: its fine-tuning settings, the method's pre-training ones, then the
    user's (which win)."""
    return [*DEMO_OVERRIDES, *PRETRAIN_OVERRIDES.get(method, ()), *overrides]


def settings_line() -> str:
    """The demo's own settings, as it prints them before it starts."""
    pre = "; ".join(f"{m}'s pre-training: {' '.join(o)}" for m, o in PRETRAIN_OVERRIDES.items())
    return f"demo settings (on top of the tiny preset, the same for both fine-tunings): {' '.join(DEMO_OVERRIDES)}" + (
        f"; {pre}" if pre else "")


def plan(*, seed: int | None = None, overrides: Sequence[str] = (), out: str | None = None) -> dict[str, dict]:
    """The resolved recipe of each demo run, as :func:`run_demo` would run it."""
    from . import recipes

    cfgs = {}
    for method in METHODS:
        cfg = recipes.resolve(method, TASK, preset="tiny", overrides=method_overrides(method, overrides), seed=seed)
        if out:
            cfg["run"]["out"] = out
        cfgs[method] = cfg
    return cfgs


def dry_run(*, seed: int | None = None, overrides: Sequence[str] = (), out: str | None = None,
            say=print) -> int:
    """``sslbench run --dry-run`` alone: the demo's settings, then each run's plan and estimates (nothing written)."""
    say(settings_line())
    for cfg in plan(seed=seed, overrides=overrides, out=out).values():
        protocol.dry_run(cfg, say=say)
    return 0


def run_demo(*, seed: int | None = None, overrides: Sequence[str] = (), out: str | None = None,
             resume: bool = False, force: bool = False, console=None) -> dict[str, Any]:
    """Run every demo method on :data:`TASK` (same seed, same fine-tuning budget), print the comparison table
    and return ``{"outcomes": {method: Outcome}, "seconds": {method: wall s}, "cpu_seconds": {method: CPU s}}``
    (the CPU time of this process, all threads: on a shared machine a better measure of the work than the wall). ``overrides`` (--set)
    apply to every method, after the demo's own."""
    say = console.print if console is not None else print
    say(f"demo: {' against '.join(reversed(METHODS))} on {TASK} at the tiny preset (PHANTOM data; "
        f"`sslbench run --method M --task T` runs one method)")
    say(settings_line())
    outcomes, seconds, cpu = {}, {}, {}
    for method in METHODS:
        t0, c0 = time.perf_counter(), time.process_time()
        outcomes[method] = protocol.run_protocol(
            method, TASK, preset="tiny", seed=seed, out=out, resume=resume, force=force, console=console,
            overrides=method_overrides(method, overrides))
        seconds[method], cpu[method] = time.perf_counter() - t0, time.process_time() - c0
    if not any("rank" in o.metrics for o in outcomes.values()):   # torchrun: rank 0 prints
        print_comparison(outcomes, seconds, console, cpu)
    return {"outcomes": outcomes, "seconds": seconds, "cpu_seconds": cpu}


def _pretraining(metrics: dict) -> dict | None:
    """The metrics.json of the pre-training a fine-tuning started from (None: from scratch)."""
    from pathlib import Path

    from .store.records import read_json

    run = ((metrics.get("init") or {}).get("pretrain_run"))
    f = Path(run) / "metrics.json" if run else None
    return read_json(f) if f is not None and f.is_file() else None


def went_to(metrics: dict, name: str) -> str:
    """Where a structure's true voxels went in a run (its metrics.json ``confusion``): ": its voxels labelled
    <class> (<share>%)", or "" when the record has no confusion counts or the class kept most of its voxels."""
    from .metrics import confused_with

    found = confused_with(metrics["confusion"], name) if metrics.get("confusion") else None
    return "" if found is None else f": its voxels labelled {found[0]} ({100 * found[1]:.0f}%)"


def comparison_rows(metrics: dict[str, dict]) -> list[list[str]]:
    """[structure, Dice (%) per method ..., delta of the last method to the first, note] per structure, then the
    mean. A structure at 0.00 Dice is never left without a word: "not learnt in N steps (method: its voxels
    labelled <the class that took most of them> (<share>%))"."""
    methods = list(metrics)
    first, last = metrics[methods[0]], metrics[methods[-1]]

    def pct(v) -> str:
        return "n/a" if v is None or v != v else f"{100 * v:.2f}"

    rows = []
    for name in first["per_class"]:
        values = [metrics[m]["per_class"].get(name) for m in methods]
        a, b = values[0], values[-1]
        delta = "n/a" if None in (a, b) or a != a or b != b else f"{100 * (b - a):+.2f}"
        missed = [m for m, v in zip(methods, values) if v is not None and v == v and round(100 * v, 2) == 0.0]
        steps = sorted({str(metrics[m].get("steps")) for m in missed})
        where = [went_to(metrics[m], name) for m in missed]
        note = (f"not learnt in {'/'.join(steps)} steps ({', '.join(f'{m}{w}' for m, w in zip(missed, where))})"
                if missed else "")
        rows.append([name, *[pct(v) for v in values], delta, note])
    means = [metrics[m].get("mean_dice") for m in methods]
    a, b = first.get("mean_dice"), last.get("mean_dice")
    rows.append(["mean (per case, then over cases)", *[pct(v) for v in means],
                 "n/a" if a is None or b is None else f"{100 * (b - a):+.2f}", ""])
    return rows


def print_comparison(outcomes: dict, seconds: dict[str, float], console=None,
                     cpu: dict[str, float] | None = None) -> None:
    """The side-by-side Dice table of the demo's runs, its caveat and where the time went."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    metrics = {m: o.metrics for m, o in outcomes.items()}
    methods = list(metrics)
    any_m = metrics[methods[0]]
    phantom = any(m.get("phantom") for m in metrics.values())
    t = Table(title=f"{' vs '.join(methods)} on {any_m['task_title']}{' [PHANTOM data]' if phantom else ''}: "
                    f"Dice (%), validation split ({any_m['n_cases']} cases), seed {any_m['seed']}, "
                    f"{any_m['steps']} fine-tuning steps each")
    t.add_column("structure")
    for m in methods:
        t.add_column(m, justify="right")
    t.add_column(f"{methods[-1]} - {methods[0]}", justify="right")
    t.add_column("note")
    for row in comparison_rows(metrics):
        t.add_row(*row)
    console.print(t)
    pre = {m: _pretraining(x) for m, x in metrics.items()}
    for m, p in pre.items():
        if p:
            console.print(f"{m}: pre-trained {p.get('steps')} steps on {p.get('volumes')} volumes of "
                          f"{p.get('corpus')}{' (PHANTOM)' if p.get('phantom') else ''}, final loss "
                          f"{p.get('final_loss', float('nan')):.4f}")
    console.print("[bold]caveat[/bold]: a tiny demo on phantoms (one seed, few steps, a tiny network) shows the "
                  "harness working; it is no evidence about the methods.")
    def stage(m: str) -> str:
        text = f"{m} {seconds[m]:.0f} s" + (f" (CPU {cpu[m]:.0f} s)" if cpu and m in cpu else "")
        if pre.get(m) and pre[m].get("seconds_this_session"):
            text += f", of which pre-training steps {pre[m]['seconds_this_session']:.0f} s"
        return text

    console.print(f"wall time: {'; '.join(stage(m) for m in seconds)}; total {sum(seconds.values()):.0f} s "
                  f"(a run already finished is reused, not timed again)")
    for m, o in outcomes.items():
        console.print(f"run record ({m}): {o.record.path}")
