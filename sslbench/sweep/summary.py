"""The table a sweep prints at its end and with --status: every trial's value, Dice, state, run folder and
notes, the best value, and what is left."""
from __future__ import annotations

import math
import os
from typing import Any

from .spec import esc, show_value
from .storage import public_url
from .worker import ATTR_ERROR, ATTR_STALE, ATTR_WORKER, Worker, worker_gone


def _state_text(w: Worker, t, retried_by: dict[int, int]) -> tuple[str, str]:
    from optuna.trial import TrialState

    note = ""
    hist = t.system_attrs.get("retry_history") or []
    if hist:
        note = f"retry of #{hist[-1]}"
    if t.state == TrialState.COMPLETE:
        state = "[green]complete[/green]"
        if t.user_attrs.get("action") == "resume":
            note = (note + "; " if note else "") + "resumed its run folder"
        elif t.user_attrs.get("action") == "skip":
            note = (note + "; " if note else "") + "run was already finished"
    elif t.state == TrialState.PRUNED:
        state = "[yellow]pruned[/yellow]"
        if "pruned_at" in t.user_attrs:
            note = (note + "; " if note else "") + f"at step {t.user_attrs['pruned_at']}"
    elif t.state == TrialState.RUNNING:
        wk = t.system_attrs.get(ATTR_WORKER) or {}
        why = worker_gone(t, w.me)          # its run folder's lock is free: the worker died
        state = "[red]worker gone[/red]" if why else "[cyan]running[/cyan]"
        where = f"pid {wk.get('pid')} on {wk.get('host')}" if wk else ""
        note = (note + "; " if note else "") + (why or where)
    elif t.state == TrialState.WAITING:
        state = "queued"
    else:
        if ATTR_STALE in t.system_attrs:
            state = "[red]killed[/red]"
            note = (note + "; " if note else "") + t.system_attrs[ATTR_STALE].get("reason", "worker died")
        else:
            state = "[red]failed[/red]"
            err = t.system_attrs.get(ATTR_ERROR)
            if err:
                note = (note + "; " if note else "") + err[:120]
        if t.number in retried_by:
            note += f"; retried as #{retried_by[t.number]}"
    return state, note


def _short_path(path: str) -> str:
    """A run folder relative to the working directory when it lies below it."""
    if not path:
        return ""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def print_summary(w: Worker, console, plan: dict[str, Any] | None) -> None:
    from rich.table import Table

    sw = w.sw
    trials = sorted(w.trials(), key=lambda t: t.number)
    shown = [t for t in trials if not w.superseded(t)]
    retried_by = {}
    for t in trials:
        hist = t.system_attrs.get("retry_history") or []
        if hist and not w.superseded(t):
            retried_by[hist[-1]] = t.number
    phantom = " [PHANTOM data]" if sw.phantom else ""
    table = Table(title=esc(f"sweep {sw.study}: {sw.method} on {sw.task_title}{phantom}, validation Dice"))
    table.add_column("trial", justify="right")
    table.add_column(esc(sw.display), justify="right")
    table.add_column("Dice %" + (" (PHANTOM)" if sw.phantom else ""), justify="right")
    table.add_column("state")
    table.add_column("run folder", overflow="fold")
    table.add_column("note", overflow="fold")
    key = (lambda t: (sw.values.index(w.value_of(t)) if w.value_of(t) in sw.values else len(sw.values), t.number)) \
        if sw.sampler == "grid" else (lambda t: (t.number, 0))
    for t in sorted(shown, key=key):
        state, note = _state_text(w, t, retried_by)
        dice = t.value if t.value is not None and t.state.name == "COMPLETE" else t.user_attrs.get("dice")
        dice_txt = "" if dice is None or (isinstance(dice, float) and math.isnan(dice)) else f"{100 * float(dice):.2f}"
        if t.state.name == "PRUNED" and t.value is not None:
            dice_txt = f"({100 * float(t.value):.2f})"
        table.add_row(f"#{t.number}", esc(show_value(w.value_of(t))), dice_txt, state,
                      esc(_short_path(t.user_attrs.get("run_folder", ""))), esc(note))
    console.print(table)
    n_sup = len(trials) - len(shown)
    if n_sup:
        console.print(f"({n_sup} trial(s) were closed without running: their point was finished or held by "
                      f"another process)")
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    if complete:
        best = max(complete, key=lambda t: t.value)
        console.print(f"[bold]best: {esc(sw.display)} = {esc(show_value(w.value_of(best)))}[/bold], validation "
                      f"Dice {100 * best.value:.2f} % (trial #{best.number}, "
                      f"{esc(best.user_attrs.get('run_folder', ''))})" + (" PHANTOM result" if sw.phantom else ""))
    if sw.sampler == "grid":
        done = {w.value_of(t) for t in complete}
        console.print(f"{len(done & set(sw.values))}/{len(sw.values)} grid points complete")
    else:
        fin = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and not w.superseded(t)]
        console.print(f"{len(fin)}/{sw.trials} trials finished ({len(complete)} complete, "
                      f"{len(fin) - len(complete)} pruned)")
    if plan is not None and not plan["done"]:
        others = [t for t in plan.get("elsewhere", []) if t.system_attrs.get(ATTR_WORKER, {}).get("pid") != w.me["pid"]]
        if others:
            console.print(f"{len(others)} trial(s) still running in other workers "
                          f"({', '.join('#%d' % t.number for t in others)}); they finish there. If a worker was "
                          f"killed, run this command again to take its point over.")
        for g, holder in sorted(plan.get("busy", {}).items()):
            console.print(f"{esc(sw.display)} = {esc(show_value(w.grid[g]))} left for now: {esc(holder)}; run this "
                          f"command again once it is done (a finished run is read, an unfinished one continued)")
        if plan.get("failed"):
            console.print(f"[red]{len(plan['failed'])} point(s) failed[/red]: run the same command again to retry "
                          f"them (their run folders continue from the last checkpoint)")
    if sw.phantom:
        console.print(f"[magenta]PHANTOM results[/magenta]: measured on procedurally generated phantom data, not on "
                      f"the real {esc(sw.task_title.replace(' (phantom)', ''))}; never compare them with published "
                      f"numbers.")
    runs = "" if sw.out == "runs" else f" --runs {sw.out}"
    if sw.key == "method.params.lambda":
        console.print(f"`sslbench report{esc(runs)}` renders Table 3 (λ ablation) from these runs"
                      + (" (in its phantom column)" if sw.phantom else "") + ".")
    else:
        console.print(f"every trial is a run record: `sslbench report{esc(runs)}` lists them with the other runs.")
    console.print(f"study {esc(sw.study)} in {esc(public_url(sw.storage))}")


