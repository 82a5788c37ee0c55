"""The worker loop of `sslbench sweep`: Optuna chooses the points, the store decides who does them.

A point is a run like any other: its folder is named by the run key the protocol computes
(``protocol.planned_runs``), and its lock is the protocol's own (``store.lock.folder_lock``). A worker:

1. **decides under the study's lock** (``<out>/sweeps/locks/<study>.lock``, a store lock held for storage calls
   only, never while training), so the workers of one machine or one shared ``--out`` never decide at once;
2. **asks Optuna for a point**: ``study.ask()`` pops a queued retry or creates a trial; ``GridSampler`` gives
   trial ``k < len(grid)`` grid point ``k``, later trials an unvisited point (workers started together take
   different points); TPE samples a value;
3. **locks the point's run folder** (without waiting):
   - held by a live process (another worker, an ``sslbench run``): the trial is closed without running
     (``sslbench:superseded``) and the point is tried again on a later pass (the plan peeks at every open grid
     point's lock first, so a held point is not asked for at all);
   - taken: the worker names itself and ``run_folder`` on the trial and keeps the lock until it has told the
     result. A finished record is told from its metrics.json, nothing trained; otherwise the protocol runs
     with ``resume=True`` (re-entering the held lock), so a folder left by a dead run continues from its last
     checkpoint.

A worker holds its point's lock from before it records ``run_folder`` until after it tells, so a RUNNING trial
with a ``run_folder`` whose lock is free was left by a worker that died (the kernel frees the flock of a dead
process, however it dies). Where this machine sees that lock (the trial's worker ran here, or the lock file
still names it: a shared file system) the trial is set to FAIL (``sslbench:stale``) and a retry is queued with its
``grid_id`` (TPE: ``fixed_params``) and Optuna's retry bookkeeping (``failed_trial``, ``retry_history``), at most
``--max-retries`` times in a row. A RUNNING trial of this machine without ``run_folder`` lost its worker between
ask and lock (live workers do both under the study lock): it is closed as superseded. Points that had failed
before this worker started are retried; one that fails while it runs is not retried by it (the next run does).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .. import distributed
from ..errors import RecipeError, SSLBenchError, terminating
from ..store import lock as locks
from ..store.records import RunRecord
from .spec import Sweep, esc, format_value, safe_name, show_value
from .storage import grid_sampler_class, open_storage, public_url

ATTR_WORKER = "sslbench:worker"           # {"host", "pid"}: who ran the trial (its lock tells whether it lives)
ATTR_STALE = "sslbench:stale"             # {"reason", "at", "by"}: its worker died (its run folder's lock was free)
ATTR_SUPERSEDED = "sslbench:superseded"   # closed without running: its point was finished or held elsewhere
ATTR_ERROR = "sslbench:error"
ATTR_SPEC = "sslbench:sweep"


def worker_gone(t, me: dict[str, Any]) -> str | None:
    """Why the worker of RUNNING trial ``t`` is dead (``me``: this worker's host and pid), from the store lock: its
    run folder's lock is free, and this machine sees that lock (the worker ran here, or the lock file still names
    it: a shared file system). None while it may be alive: the lock is held, or it is not this machine's to see."""
    folder = t.user_attrs.get("run_folder")
    if not folder:
        return None
    lock = locks.folder_lock(folder)
    if not lock.free():
        return None
    w, left = t.system_attrs.get(ATTR_WORKER) or {}, lock.left_by or {}
    if w.get("host") != me["host"] and (left.get("pid"), left.get("host")) != (w.get("pid"), w.get("host")):
        return None        # a worker of another machine whose --out is not this one's: its lock is not here
    return f"its worker (pid {w.get('pid', '?')} on {w.get('host', '?')}) is gone (its run folder's lock is free)"


class SweepStop(Exception):
    """Raised inside a trial to end the sweep (a one-line user error)."""


class Worker:
    def __init__(self, sw: Sweep, console, create: bool = True):
        import optuna

        self.sw, self.console = sw, console
        self.optuna = optuna
        if not create and "://" not in sw.storage and not Path(sw.storage).expanduser().is_file():
            raise RecipeError(f"--study {sw.study}: no journal {sw.storage} yet (run the sweep first)")
        self.storage = open_storage(sw.storage)
        self.me = {"host": platform.node(), "pid": os.getpid()}
        if sw.sampler == "grid":
            self.space = {sw.key: list(sw.values)}
            sampler = grid_sampler_class()(self.space, seed=0)
            self.grid = [g[0] for g in getattr(sampler, "_all_grids", [])] or None
            pruner = optuna.pruners.NopPruner()
        else:
            self.space, self.grid = {}, None
            sampler = self._tpe(0)
            pruner = self._pruner()
        try:
            if create:
                self.study = optuna.create_study(storage=self.storage, study_name=sw.study, direction="maximize",
                                                 sampler=sampler, pruner=pruner, load_if_exists=True)
            else:
                self.study = optuna.load_study(storage=self.storage, study_name=sw.study, sampler=sampler,
                                               pruner=pruner)
        except KeyError:
            raise RecipeError(f"--study {sw.study}: no such study in {public_url(sw.storage)} yet (run the sweep first)") from None
        except ValueError as exc:  # an existing study with another direction
            raise RecipeError(f"--study {sw.study}: {exc}") from None
        self.study_id = self.storage.get_study_id_from_name(sw.study)
        spec = json.loads(json.dumps(sw.spec(), default=str))
        have = self.study.user_attrs.get(ATTR_SPEC)
        if have is None and create:
            self.study.set_user_attr(ATTR_SPEC, spec)
        elif have is not None and have != spec:
            diff = [k for k in spec if have.get(k) != spec.get(k)]
            raise RecipeError(f"--study {sw.study}: this study in {public_url(sw.storage)} holds another sweep (differs in "
                              f"{', '.join(diff)}); choose another --study name")
        self.study_lock = locks.RunLock(Path(sw.out) / "sweeps" / "locks" / f"{safe_name(sw.study)}.lock",
                                        f"the study {sw.study}")
        self.folders: dict[str, tuple[Path, str]] = {}
        self.failed_at_start: set[int] = set()
        self.ran = 0
        self.failures_here = 0

    # -- helpers -----------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def _tpe(self, n: int):
        import numpy as np

        seed = self.sw.seed if self.sw.seed is not None else 0
        # One seed per trial number: reproducible for one worker, different draws for parallel workers.
        s = int(np.random.SeedSequence([int(seed), int(n)]).generate_state(1)[0])
        startup = min(10, max(2, self.sw.trials // 3))
        return self.optuna.samplers.TPESampler(seed=s, n_startup_trials=startup)

    def _pruner(self):
        if self.sw.pruner == "median":
            return self.optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
        if self.sw.pruner == "hyperband":
            return self.optuna.pruners.HyperbandPruner(min_resource=max(1, self.sw.val_every or 1),
                                                       max_resource=self.sw.total_steps or "auto")
        return self.optuna.pruners.NopPruner()

    def trials(self):
        return self.storage.get_all_trials(self.study_id, deepcopy=False)

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def point(self, t) -> Any:
        """The grid point of a trial (grid_id), or its parameter value for a search."""
        if self.sw.sampler == "grid":
            g = t.system_attrs.get("grid_id")
            if g is None and 0 <= t.number < len(self.sw.values):
                g = t.number
            return g
        if self.sw.key in t.params:
            return t.params[self.sw.key]
        return (t.system_attrs.get("fixed_params") or {}).get(self.sw.key)

    def value_of(self, t) -> Any:
        if self.sw.key in t.params:
            return t.params[self.sw.key]
        if "value" in t.user_attrs:
            return t.user_attrs["value"]
        if self.sw.sampler == "grid":
            g = self.point(t)
            if self.grid is not None and g is not None and 0 <= g < len(self.grid):
                return self.grid[g]
            return None
        return (t.system_attrs.get("fixed_params") or {}).get(self.sw.key)

    @staticmethod
    def superseded(t) -> bool:
        return ATTR_SUPERSEDED in t.system_attrs

    def close(self, t, attr: str, why: Any) -> bool:
        """Set trial ``t`` to FAIL with ``attr`` = ``why``; False where it had finished meanwhile."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            tid = self.trial_id(t.number)
            self.storage.set_trial_system_attr(tid, attr, why)
            self.storage.set_trial_state_values(tid, TrialState.FAIL)
        except (UpdateFinishedTrialError, RuntimeError):
            return False
        return True

    # -- the store's answer ------------------------------------------------------------------------
    def folder_of(self, value: Any) -> tuple[Path, str]:
        """(run folder, protocol hash) of the fine-tuning a value runs: the run key the protocol computes
        (``protocol.planned_runs``), so the lock taken here is the one the protocol's run takes."""
        from .. import protocol

        key = format_value(value)
        if key not in self.folders:
            _, plan, _ = protocol.planned_runs(self.sw.resolve(value), root=self.sw.root,
                                               corpus_root=self.sw.corpus_root, log=lambda *a, **k: None)
            self.folders[key] = (Path(os.path.abspath(plan.path)), plan.protocol)
        return self.folders[key]

    def in_use(self, g: int) -> str | None:
        """'<run dir> is in use by pid N on HOST since T' while a live process holds grid point ``g``'s folder."""
        lock = locks.folder_lock(self.folder_of(self.grid[g])[0])
        return None if lock.free() else lock.in_use()

    def check_running(self, t) -> None:
        """A RUNNING trial: FAIL it (stale) where the store lock says its worker died."""
        w = t.system_attrs.get(ATTR_WORKER) or {}
        if not t.user_attrs.get("run_folder"):
            if w.get("host", self.me["host"]) == self.me["host"]:
                self.close(t, ATTR_SUPERSEDED, "its worker stopped before it locked a run folder")
            return
        why = worker_gone(t, self.me)
        if why and self.close(t, ATTR_STALE, {"reason": why, "at": time.time(), "by": self.me}):
            self.say(f"[yellow]trial #{t.number} ({esc(self.sw.display)} = {esc(show_value(self.value_of(t)))}) was "
                     f"left running: {esc(why)}; it will be run again from its run folder's last checkpoint[/yellow]")

    # -- deciding: retries, plan, claim -------------------------------------------------------------
    def retryable(self, t) -> bool:
        from optuna.trial import TrialState

        if t.state != TrialState.FAIL or self.superseded(t):
            return False
        if t.number in self.failed_at_start:
            return True
        if ATTR_STALE in t.system_attrs:
            return len(t.system_attrs.get("retry_history", [])) < self.sw.max_retries
        return False

    def enqueue_retry(self, t, retry: bool = True) -> None:
        """Queue ``t``'s point again: with Optuna's retry bookkeeping, or (``retry`` False: ``t`` was closed
        without running) as a fresh start of the point."""
        from optuna.trial import TrialState, create_trial

        history = list(t.system_attrs.get("retry_history", [])) + [t.number]
        attrs: dict[str, Any] = {"failed_trial": t.system_attrs.get("failed_trial", t.number),
                                 "retry_history": history} if retry else {}
        if self.sw.sampler == "grid":
            attrs.update(grid_id=self.point(t), search_space=self.space)
        else:
            attrs["fixed_params"] = {self.sw.key: self.point(t)}
        self.study.add_trial(create_trial(state=TrialState.WAITING, system_attrs=attrs,
                                          intermediate_values=dict(t.intermediate_values)))

    def plan(self) -> dict[str, Any]:
        """Fail the trials of dead workers, queue the retries that are due and say what there is to do."""
        from optuna.trial import TrialState

        for t in self.trials():
            if t.state == TrialState.RUNNING:
                self.check_running(t)
        trials = self.trials()
        if self.sw.sampler == "grid":
            return self._plan_grid(trials)
        # TPE search: retry failed trials with their parameters, then sample until --trials are finished.
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
        for t in trials:
            if self.retryable(t) and t.number not in retried and self.point(t) is not None:
                self.enqueue_retry(t)
                waiting.append(t)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                    and not self.superseded(t)]
        done = len(finished) >= self.sw.trials
        work = not done and (bool(waiting) or len(finished) + len(running) + len(waiting) < self.sw.trials)
        failed = {t.number: t for t in trials if t.state == TrialState.FAIL and not self.superseded(t)
                  and not self.retryable(t) and t.number not in retried}
        return {"done": done, "work": work, "elsewhere": running, "busy": {}, "failed": failed}

    def _plan_grid(self, trials) -> dict[str, Any]:
        from optuna.trial import TrialState

        by_point: dict[Any, list] = {g: [] for g in range(len(self.sw.values))}
        for t in trials:
            if self.point(t) in by_point:
                by_point[self.point(t)].append(t)
        complete, running, busy, failed, work = set(), [], {}, {}, False
        for g, ts in by_point.items():
            real = [t for t in ts if not self.superseded(t)]
            states = {t.state for t in real}
            holder = None if states & {TrialState.COMPLETE, TrialState.RUNNING} else self.in_use(g)
            if TrialState.COMPLETE in states:
                complete.add(g)
            elif TrialState.RUNNING in states:
                running += [t for t in real if t.state == TrialState.RUNNING]     # its worker lives
            elif holder:
                busy[g] = holder                          # held by a live process: tried again on a later pass
            elif TrialState.WAITING in states or not ts:
                work = True                               # a queued retry, or a point never asked for
            elif not real:                                # only closed trials (GridSampler counts them as visited)
                self.enqueue_retry(max(ts, key=lambda t: t.number), retry=False)
                work = True
            elif self.retryable(last := max(real, key=lambda t: t.number)):
                self.enqueue_retry(last)
                work = True
            else:
                failed[g] = last
        return {"done": len(complete) == len(by_point), "work": work, "elsewhere": running, "busy": busy,
                "failed": failed, "complete": complete}

    def is_duplicate(self, me_t) -> str | None:
        from optuna.trial import TrialState

        p = self.point(me_t)
        for t in self.trials():
            if t.number == me_t.number or self.point(t) != p or self.superseded(t):
                continue
            if self.sw.sampler == "grid" and t.state == TrialState.COMPLETE:
                return f"its point is finished (trial #{t.number})"
            if t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < me_t.number:
                return f"trial #{t.number} holds the same point"
        return None

    def claim(self):
        """Ask Optuna for a point and lock its run folder: (trial, value, lock), or None when the trial was
        closed without running (its folder in use by a live process, or its point taken by another trial)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        sw = self.sw
        if sw.sampler == "tpe":
            self.study.sampler = self._tpe(len(self.trials()))
        trial = self.study.ask()
        tid = self.trial_id(trial.number)
        lock = None
        try:
            self.storage.set_trial_system_attr(tid, ATTR_WORKER, self.me)
            if sw.sampler == "grid":
                value = trial.suggest_categorical(sw.key, list(sw.values))
            elif sw.integer:
                value = trial.suggest_int(sw.key, int(sw.low), int(sw.high), log=sw.log)
            else:
                value = trial.suggest_float(sw.key, float(sw.low), float(sw.high), log=sw.log)
            folder, proto = self.folder_of(value)
            lock = locks.folder_lock(folder)
            why = None if lock.try_acquire() else lock.in_use()
            why = why or self.is_duplicate(self.storage.get_trial(tid))
            if why is None:
                for k, v in (("value", value), ("run_folder", str(folder)), ("protocol", proto),
                             ("phantom", sw.phantom)):
                    trial.set_user_attr(k, v)
                return trial, value, lock
        except UpdateFinishedTrialError:      # closed by another worker before this one locked its folder
            why = None
        except BaseException:
            if lock is not None:
                lock.release()
            with contextlib.suppress(Exception):
                self.study.tell(trial, state=TrialState.FAIL)
            raise
        if lock is not None:
            lock.release()
        if why is not None:
            self.close(trial, ATTR_SUPERSEDED, why)
        return None

    # -- doing a point -----------------------------------------------------------------------------
    def run_point(self, trial, value: Any, lock) -> str:
        """The claimed point, under its run folder's lock (lent to the protocol's run, released once the result
        is told). Returns complete | pruned | failed | superseded."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        tid = self.trial_id(trial.number)
        with locks.holding(lock):
            try:
                record = RunRecord(trial.user_attrs["run_folder"])
                if record.finished and record.metrics is not None:
                    self.say(f"[bold]trial #{trial.number}[/bold]: {esc(self.sw.display)} = "
                             f"{esc(show_value(value))}: its run is finished ({esc(record.path)}); told from its "
                             f"metrics.json, nothing trained")
                    return self.tell(trial, tid, record.metrics, "skip")
                return self.execute(trial, tid, value)
            except UpdateFinishedTrialError:
                self.say(f"[yellow]trial #{trial.number} was closed by another worker; stopping here[/yellow]")
                return "superseded"
            except BaseException as exc:
                running = True
                with contextlib.suppress(Exception):
                    running = self.storage.get_trial(tid).state == TrialState.RUNNING
                if running and not isinstance(exc, SweepStop):
                    self._fail(trial, tid, "interrupted" if isinstance(exc, KeyboardInterrupt) or terminating()
                               else f"{type(exc).__name__}: {exc}")     # never leave the trial RUNNING (Ctrl-C too)
                raise

    def tell(self, trial, tid: int, metrics: dict, action: str) -> str:
        """Tell Optuna a finished run's validation score (from its metrics)."""
        dice = float(metrics.get(f"mean_{metrics.get('metric', 'dice')}", float("nan")))
        for k, v in (("protocol", metrics.get("protocol", trial.user_attrs.get("protocol"))), ("dice", dice),
                     ("phantom", bool(metrics.get("phantom", self.sw.phantom))), ("action", action)):
            trial.set_user_attr(k, v)
        if not math.isfinite(dice):
            self.storage.set_trial_system_attr(tid, ATTR_ERROR, "the validation Dice is not a number")
        self.study.tell(trial, dice)
        return "complete" if math.isfinite(dice) else "failed"

    def execute(self, trial, tid: int, value: Any) -> str:
        """Run the protocol for one value (resume=True; the fine-tuning's folder is locked by this worker)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        from .. import protocol, recipes

        sw = self.sw
        frozen = self.storage.get_trial(tid)
        history = frozen.system_attrs.get("retry_history") or []
        if sw.sampler == "grid":
            where = f" (grid point {sw.values.index(value) + 1}/{len(sw.values)})"
        else:
            where = f" (trial {sum(1 for t in self.trials() if not self.superseded(t))}/{sw.trials})"
        retry = f", retry of #{history[-1]}: continues its run folder" if history else ""
        self.say(f"[bold]trial #{trial.number}[/bold]: {esc(sw.display)} = {esc(show_value(value))}{where}{retry} "
                 f"-> {esc(trial.user_attrs['run_folder'])}")
        on_validation = self._on_validation(trial, set(frozen.intermediate_values))
        dist = distributed.current()
        try:
            cfg = sw.resolve(value)
            # a pre-training several points share is locked by the protocol on its own folder: waited for here
            if cfg["method"].get("pretrain") is not None:
                pcfg = recipes.split_config(cfg, "corpus")
                with locks.waiting():
                    command(dist, ("pretrain", pcfg, sw.corpus_root))
                    protocol.pretrain(pcfg, root=sw.corpus_root, resume=True, force=False, console=self.console)
            run_kwargs = dict(method=sw.method, task=sw.task, preset=sw.preset,
                              overrides=sw.overrides + [sw.override(value)], seed=sw.seed, root=sw.root,
                              corpus=sw.corpus, corpus_root=sw.corpus_root, out=sw.out, resume=True, force=False)
            with locks.waiting():
                command(dist, ("run", run_kwargs))   # the trial's parameters, from rank 0 to every rank
                outcome = protocol.run_protocol(**run_kwargs, console=self.console, on_validation=on_validation)
            if Path(outcome.record.path).resolve() != Path(trial.user_attrs["run_folder"]).resolve():
                raise RuntimeError(f"the protocol ran {outcome.record.path}, not the folder this worker locked")
        except self.optuna.TrialPruned as exc:
            self.study.tell(trial, state=TrialState.PRUNED)
            self.say(f"trial #{trial.number}: {esc(exc)}")
            return "pruned"
        except UpdateFinishedTrialError:
            raise
        except SSLBenchError as exc:
            self._fail(trial, tid, str(exc))
            raise SweepStop(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - one point failing must not lose the others
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._fail(trial, tid, f"{type(exc).__name__}: {first}")
            log = Path(sw.out) / "sweeps" / f"{safe_name(sw.study)}.errors.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"--- trial #{trial.number} {sw.key}={format_value(value)} "
                        f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n{traceback.format_exc()}\n")
            self.say(f"[red]trial #{trial.number} failed[/red]: {type(exc).__name__}: {esc(first)} "
                     f"(traceback in {esc(log)})")
            return "failed"
        return self.tell(trial, tid, outcome.metrics, outcome.action)

    def _on_validation(self, trial, reported: set):
        """The protocol's validation callback: report the Dice to Optuna and prune; under torchrun rank 0's
        decision is broadcast, so every rank stops at the same validation."""
        dist = distributed.current()

        def on_validation(step: int, dice: float) -> None:
            # called once the checkpoint of this step is on disk: stopping here loses nothing
            pruned = None
            if step not in reported and math.isfinite(dice):
                reported.add(step)
                trial.report(dice, step)
                if trial.should_prune():
                    trial.set_user_attr("pruned_at", step)
                    pruned = self.optuna.TrialPruned(f"pruned at step {step} (validation Dice {dice:.4f})")
            if dist.enabled:
                dist.broadcast_object(pruned is not None)
            if pruned is not None:
                raise pruned
        return on_validation

    def _fail(self, trial, tid: int, why: str) -> None:
        from optuna.trial import TrialState

        with contextlib.suppress(Exception):
            self.storage.set_trial_system_attr(tid, ATTR_ERROR, why[:500])
        with contextlib.suppress(Exception):
            self.study.tell(trial, state=TrialState.FAIL)

    # -- the loop ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def deciding(self):
        """The study's lock, waited for: the workers of one machine (or one shared --out) decide one at a time."""
        self.study_lock.acquire(wait=True)
        try:
            yield
        finally:
            self.study_lock.release()

    def run(self) -> dict[str, Any]:
        from optuna.trial import TrialState

        self.failed_at_start = {t.number for t in self.trials()
                                if t.state == TrialState.FAIL and not self.superseded(t)}
        closed_in_a_row = 0
        while True:
            with self.deciding():
                plan = self.plan()
                if plan["done"] or not plan["work"]:
                    return plan
                claimed = self.claim()
            if claimed is None:
                closed_in_a_row += 1
                if closed_in_a_row > 20 + len(self.sw.values):  # pragma: no cover - a safety net, never seen
                    return plan
                continue
            closed_in_a_row = 0
            result = self.run_point(*claimed)
            if result == "superseded":
                continue
            self.ran += 1
            if result == "failed":
                self.failures_here += 1
                if self.sw.sampler == "tpe" and self.failures_here >= 3:
                    self.say("[red]3 trials failed in this worker: stopping[/red]")
                    with self.deciding():
                        return self.plan()
            else:
                self.failures_here = 0


# --------------------------------------------------------------------------------------------------
# Trials that span several processes (torchrun): rank 0 runs the study, the other ranks follow it
# --------------------------------------------------------------------------------------------------
def command(dist: "distributed.Dist", message: tuple) -> None:
    """Rank 0 tells the other ranks what to run next (nothing to do in a single process)."""
    if dist.enabled:
        dist.broadcast_object(message)


class _PrunedByRank0(Exception):
    """Rank 0 pruned the trial this follower is running."""


def follow(dist: "distributed.Dist") -> int:
    """The loop of a rank > 0 in a distributed sweep: run what rank 0 broadcasts until it says stop.

    Messages: ("pretrain", corpus config, corpus root), ("run", run_protocol keyword arguments), ("stop",).
    At every periodic validation the follower receives rank 0's pruning decision (a bool) and stops the trial
    with it. A failure here is printed on this rank's stderr and the loop continues with rank 0's next order
    (rank 0 records the trial's fate in the study); a failure on one rank only leaves the others waiting in a
    collective: torchrun then ends the job. Rank 0 alone holds the run folders' locks.
    """
    from .. import protocol

    def on_validation(step: int, dice: float) -> None:
        if dist.broadcast_object(None):
            raise _PrunedByRank0()

    while True:
        message = dist.broadcast_object(None)
        if not message or message[0] == "stop":
            return 0
        try:
            if message[0] == "pretrain":
                protocol.pretrain(message[1], root=message[2], resume=True, force=False)
            elif message[0] == "run":
                protocol.run_protocol(**message[1], on_validation=on_validation)
        except _PrunedByRank0:
            continue
        except Exception as exc:  # noqa: BLE001 - rank 0 records the failure; keep following its orders
            print(f"rank {dist.rank}: {type(exc).__name__}: {str(exc).strip()[:300]}", file=sys.stderr)


def check_data(sw: Sweep, console) -> None:
    """Find (phantoms: synthesise, once, under a lock) the task's and the corpus's data before any trial, so
    that a missing --root is one line now rather than after a pre-training."""
    from ..data.locate import locate_data

    cfg = sw.resolve()
    say = (lambda text: console.print(esc(text)))
    for section, root in (("task", sw.root), ("corpus", sw.corpus_root)):
        if section not in cfg:
            continue
        lock = locks.RunLock(Path(sw.out) / "sweeps" / "locks" / f"data-{safe_name(cfg[section]['name'])}.lock",
                             f"the synthesis of {cfg[section]['name']}").acquire(wait=True, say=say)
        try:
            locate_data(cfg[section], root, log=say)
        finally:
            lock.release()
