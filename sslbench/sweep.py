"""`sslbench sweep`: Optuna studies over one recipe key, each trial a normal protocol run.

    sslbench sweep lambda --task mmwhs --root /data/MM-WHS             # Table 3: grid 0.5, 1.0, 1.5
    sslbench sweep task.finetune.lr --sampler tpe --trials 20 --low 1e-4 --high 1e-2 --log

Each trial resolves the base recipe plus ``--set <key>=<value>``, calls
:func:`sslbench.protocol.run_protocol` with ``resume=True`` (pre-train with that value if the method
pre-trains, fine-tune, evaluate) and returns the validation Dice (maximised). The run folder is an ordinary
run record, so ``sslbench report`` reads trials like any run (the λ grid fills Table 3). Trial user
attributes: ``run_folder``, ``value``, ``protocol`` (the fine-tuning protocol hash), ``dice``, ``phantom``.

Storage and study
-----------------
Default storage: an Optuna journal file ``<out>/sweeps/<study>.journal`` (``JournalStorage`` over
``JournalFileBackend``: an append-only log behind a lock file, safe for several worker processes on one
machine or on a shared file system; Optuna's FAQ advises against SQLite for parallel work). ``--storage``
takes any RDB URL (``postgresql://...``, for workers on several machines; a driverless PostgreSQL URL gets
the driver installed, psycopg or psycopg2, and printed URLs hide the password) or another journal path;
``optuna-dashboard <journal>`` opens the journal as it is (tests/test_sweep_storage.py). The
default study name joins key, method, task, preset and seed with a hash of the resolved base protocol (the
swept key left out) and of the search space, so a sweep with another protocol never shares a study, and
the same command always finds its own study again.

How a study is continued, shared and repaired (the worker loop)
---------------------------------------------------------------
Optuna's ``optimize()`` loop cannot provide what a re-runnable sweep needs (a finished study must not be
run again, failed points must be retried, a killed worker's point must be taken over), so each worker runs
its own loop over Optuna's ask/tell interface:

1. **Reap dead trials.** A trial left RUNNING by a worker that died is *stale*. Every trial records its
   worker (host, boot id, pid and the pid's start time) and a heartbeat timestamp that a thread refreshes
   every ``--heartbeat`` seconds. A RUNNING trial is stale when its worker was on this machine and that
   process no longer exists (checked at once through ``/proc``: no grace period to wait out after a
   ``kill -9`` or an OOM kill, and no false positive from a reused pid, thanks to the start time), or
   when its heartbeat is older than 4 heartbeats (workers on other machines; needs clocks within a minute
   of each other, as NTP gives). Optuna's own heartbeat (``RDBStorage(heartbeat_interval=...)`` +
   ``RetryFailedTrialCallback``) is not used because ``JournalStorage`` does not implement it, and because
   it could only detect a dead worker after the grace period even on the same machine. The stale trial is
   set to FAIL (the storage lets only one worker do that: the others get ``UpdateFinishedTrialError``)
   with a ``sslbench:stale`` note.
2. **Queue retries.** A grid point with no COMPLETE, RUNNING or WAITING trial whose latest trial failed is
   re-queued as a WAITING trial carrying the same ``grid_id`` (TPE: ``fixed_params``) and Optuna's retry
   bookkeeping (``failed_trial``, ``retry_history``, as ``RetryFailedTrialCallback`` writes them).
   Retried: trials that had failed before this worker started (re-running the command retries failures)
   and trials of dead workers (at most ``--max-retries`` times in a row). A trial that fails with an error
   while this worker runs is not retried by it (it would most likely fail again); the next run retries it.
   The retry continues the point's run folder from its last checkpoint (``resume=True``).
3. **Take work.** ``study.ask()`` pops a WAITING trial, or creates one; ``GridSampler`` gives trial number
   ``k < len(grid)`` the grid point ``k`` (shuffled with a fixed seed) and later trials an unvisited point,
   so workers started together on one storage take different points (trial numbers are unique). A worker
   only asks while a point is queued or was never started; when the rest is running elsewhere it exits.
4. **No point is run twice.** Right after ``ask()``, a trial whose point already has a COMPLETE trial, or
   has another RUNNING or WAITING trial with a smaller number, is closed at once (FAIL, marked
   ``sslbench:superseded``) without running anything. Trial numbers follow creation order, so of two
   workers racing for one point exactly one proceeds. On top of that every run folder (the fine-tuning, a
   shared pre-training) is guarded by the protocol's own run lock (sslbench/store/lock.py, on the folder its
   run key names), which a trial waits for: if a worker wrongly declared dead is in fact alive, the retry
   waits for it and then reads its finished run instead of training beside it.

Pruning: trials report the validation Dice of every periodic validation (``on_validation``) with
``trial.report(dice, step)``; searches prune with ``MedianPruner`` (default) or ``HyperbandPruner``
(resource = training steps), grids never prune (Table 3 needs every point to the end). A pruned trial
leaves an unfinished run folder (resumable, ignored by the report).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import distributed, recipes
from .errors import RecipeError, SSLBenchError
from .store.lock import RunLock
from .store.lock import waiting as waiting_for_run_locks
from .store.run_key import protocol_hash


def esc(text: Any) -> str:
    """Text shown inside rich markup (paths, values, errors may hold '[...]')."""
    from rich.markup import escape

    return escape(str(text))

#: Short names of keys worth sweeping (the key is otherwise any dotted key of the resolved recipe).
ALIASES = {"lambda": "method.params.lambda"}
#: Grid values used when --values is not given (the seed's Table 3 for λ).
DEFAULT_VALUES = {"method.params.lambda": ["0.5", "1.0", "1.5"]}
LABELS = {"method.params.lambda": "λ"}

ATTR_WORKER = "sslbench:worker"
ATTR_BEAT = "sslbench:heartbeat"
ATTR_STALE = "sslbench:stale"
ATTR_SUPERSEDED = "sslbench:superseded"
ATTR_ERROR = "sslbench:error"
ATTR_SPEC = "sslbench:sweep"
MISSED_BEATS = 4          # a worker on another machine is dead after this many missed heartbeats

EPILOG = """examples:
  sslbench sweep lambda --task phantom-mmwhs                      # λ grid 0.5 1.0 1.5 on phantoms (CPU)
  sslbench sweep lambda --task mmwhs --root /data/MM-WHS          # Table 3, MM-WHS column
  sslbench sweep lambda --task btcv --root /data/BTCV --values 0.5 1.0 1.5 --seed 1
  sslbench sweep task.finetune.lr --method scratch --task phantom-btcv --values 1e-3 3e-3
  sslbench sweep task.finetune.lr --sampler tpe --trials 20 --low 1e-4 --high 1e-2 --log
  sslbench sweep lambda --task mmwhs --root /data/MM-WHS --storage postgresql://user:pw@db/optuna
  sslbench sweep lambda --task phantom-mmwhs --status              # show the study, run nothing

Re-running a command continues its study: finished points are kept, failed ones and those of killed
workers are run again (continuing their run folders). Start the same command in several terminals (or
on several machines with --storage URL) to share the work. Then: sslbench report"""


# ==================================================================================================
# The sweep definition
# ==================================================================================================
@dataclass
class Sweep:
    key: str                                  # dotted recipe key
    label: str                                # what the user typed (alias or key)
    method: str
    task: str
    preset: str
    seed: int | None
    overrides: list[str]
    out: str
    root: str | None
    corpus: str | None
    corpus_root: str | None
    sampler: str                              # grid | tpe
    values: list[Any] = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    trials: int = 20
    pruner: str = "none"
    study: str = ""
    storage: str = ""
    heartbeat: float = 60.0
    max_retries: int = 3
    phantom: bool = False
    task_title: str = ""
    base_protocol: str = ""
    val_every: int = 0
    total_steps: int | None = None

    @property
    def display(self) -> str:
        return LABELS.get(self.key, self.label)

    def spec(self) -> dict[str, Any]:
        """What identifies the sweep (stored on the study; a second run must agree)."""
        search: dict[str, Any] = {"sampler": self.sampler}
        if self.sampler == "grid":
            search["values"] = self.values
        else:
            search.update(low=self.low, high=self.high, log=self.log, int=self.integer)
        return {"key": self.key, "method": self.method, "task": self.task, "preset": self.preset,
                "seed": self.seed if self.seed is not None else 0, "protocol": self.base_protocol,
                "search": search}

    def override(self, value: Any) -> str:
        return f"{self.key}={format_value(value)}"

    def resolve(self, value: Any = ...) -> dict:
        extra = [self.override(value)] if value is not ... else []
        cfg = recipes.resolve(self.method, self.task, preset=self.preset, overrides=self.overrides + extra,
                              seed=self.seed, corpus=self.corpus)
        cfg["run"]["out"] = self.out
        return cfg


def format_value(value: Any) -> str:
    """A value as a --set right-hand side that reads back as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def show_value(value: Any) -> str:
    """Short and unambiguous: 1.0 (not 1) for a float, 6 significant digits."""
    if isinstance(value, float):
        text = f"{value:.6g}"
        return text + ".0" if text.lstrip("-").isdigit() else text
    return "—" if value is None else str(value)


def _leaf_keys(node: Any, prefix: str = "") -> tuple[list[str], list[str]]:
    """(dotted keys holding values, dotted keys of sections) of a resolved recipe."""
    leaves, sections = [], []
    if isinstance(node, dict):
        for k, v in node.items():
            if str(k).startswith("_") or (not prefix and k == "recipe_files"):
                continue
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                sections.append(path)
                sub_l, sub_s = _leaf_keys(v, path)
                leaves += sub_l
                sections += sub_s
            else:
                leaves.append(path)
    return leaves, sections


def check_key(cfg: dict, key: str, typed: str) -> Any:
    """The current value of ``key``; one-line RecipeError (with did-you-mean) when it is not sweepable."""
    leaves, sections = _leaf_keys(cfg)
    if key in sections:
        below = [k for k in leaves if k.startswith(key + ".")][:3]
        raise RecipeError(f"sweep key '{typed}': '{key}' is a section of the recipe, not a value; "
                          f"sweep one of its keys, e.g. {', '.join(below)}")
    if key not in leaves:
        options = leaves + list(ALIASES)
        hint = recipes.did_you_mean(typed, options)
        raise RecipeError(f"sweep key '{typed}': unknown{hint}; expected an alias ({', '.join(ALIASES)}) or a "
                          f"dotted key of the resolved recipe, e.g. method.params.lambda or task.finetune.lr")
    current = recipes.get_dotted(cfg, key)
    if isinstance(current, (list, dict)):
        raise RecipeError(f"sweep key '{typed}': holds {type(current).__name__} {current!r}; only numbers, "
                          f"integers, booleans and strings can be swept")
    return current


def expected_run(cfg: dict, root=None, corpus_root=None) -> tuple[Path, str, dict | None]:
    """(fine-tuning run folder, its protocol hash, pre-training config or None) that run_protocol will use
    (protocol.planned_runs: the run keys of the protocol on this data)."""
    from . import protocol

    pre, plan, _ = protocol.planned_runs(cfg, root=root, corpus_root=corpus_root, log=lambda *a, **k: None)
    return plan.path, plan.protocol, recipes.split_config(cfg, "corpus") if pre is not None else None


def _safe_name(text: str) -> str:
    return "".join(c if (c.isalnum() or c in "._-") else "_" for c in text)


def build_sweep(args: argparse.Namespace) -> Sweep:
    """Validate everything up front (key, values, range, options): every problem is one RecipeError."""
    from . import protocol

    typed = args.key
    key = ALIASES.get(typed, typed)
    for item in args.overrides:
        if item.split("=", 1)[0].strip() == key:
            raise RecipeError(f"--set {item}: '{key}' is the swept key; give its values with --values "
                              f"(or --low/--high), not --set")
    if key == "run.seed" and args.seed is not None:
        raise RecipeError("--seed: not with the sweep key run.seed (each trial sets the seed)")
    sampler = args.sampler or ("tpe" if (args.low is not None or args.high is not None) else "grid")
    if sampler == "grid":
        for opt, val in (("--low", args.low), ("--high", args.high), ("--trials", args.trials)):
            if val is not None:
                raise RecipeError(f"{opt}: only for --sampler tpe (a grid runs every value of --values)")
        if args.log or args.int:
            raise RecipeError(f"{'--log' if args.log else '--int'}: only for --sampler tpe")
        if args.pruner not in (None, "none"):
            raise RecipeError(f"--pruner {args.pruner}: grids never prune (every point of an ablation runs to the end)")
    else:
        if args.values:
            raise RecipeError("--values: only for a grid (--sampler grid); a TPE search takes --low/--high")
        if args.low is None or args.high is None:
            raise RecipeError("--sampler tpe: needs --low and --high (the search range)")
        if not args.low < args.high:
            raise RecipeError(f"--low/--high: expected low < high, got {args.low:g} and {args.high:g}")
        if args.log and args.low <= 0:
            raise RecipeError(f"--log: expected --low > 0, got {args.low:g}")
        if args.trials is not None and args.trials < 1:
            raise RecipeError(f"--trials: expected a positive number of trials, got {args.trials}")

    sw = Sweep(key=key, label=typed, method=args.method, task=args.task, preset=args.preset or "", seed=args.seed,
               overrides=list(args.overrides), out=args.out, root=args.root, corpus=args.corpus,
               corpus_root=args.corpus_root, sampler=sampler, log=bool(args.log), integer=bool(args.int),
               trials=args.trials or 20, heartbeat=float(args.heartbeat), max_retries=int(args.max_retries))
    if sw.heartbeat <= 0:
        raise RecipeError(f"--heartbeat: expected a positive number of seconds, got {args.heartbeat}")
    base = recipes.resolve(sw.method, sw.task, preset=args.preset, overrides=sw.overrides, seed=sw.seed,
                           corpus=sw.corpus)
    sw.preset = base["run"]["preset"]
    base["run"]["out"] = sw.out
    current = check_key(base, key, typed)
    if "task" not in base:
        raise RecipeError(f"--task: '{sw.task}' is needed for a sweep (trials are fine-tuning runs)")
    sw.phantom = bool(base["task"].get("phantom"))
    sw.task_title = base["task"].get("title", sw.task)
    ft = base["task"].get("finetune") or {}
    sw.val_every = int(ft.get("val_every") or 0)
    sw.total_steps = int(ft["max_steps"]) if ft.get("max_steps") else None

    # Values: each resolved through the recipe (type coercion, schema checks), distinct runs only.
    folders: dict[Path, Any] = {}
    if sampler == "grid":
        raw = args.values or DEFAULT_VALUES.get(key)
        if not raw:
            raise RecipeError(f"--values: needed for the sweep key '{typed}' (e.g. --values "
                              f"{format_value(current)} ...); only λ has default values")
        candidates = [recipes._parse_value(v) for v in raw]
    else:
        lo, hi = (int(math.ceil(args.low)), int(math.floor(args.high))) if sw.integer else (args.low, args.high)
        if sw.integer and lo >= hi:
            raise RecipeError(f"--low/--high with --int: no two integers in [{args.low:g}, {args.high:g}]")
        if isinstance(current, bool) or not isinstance(current, (int, float)) and current is not None:
            raise RecipeError(f"sweep key '{typed}': holds {current!r}; a TPE search needs a numeric key "
                              f"(use a grid: --values ...)")
        if isinstance(current, int) and not isinstance(current, bool) and not sw.integer:
            raise RecipeError(f"sweep key '{typed}': holds an integer ({current}); add --int")
        sw.low, sw.high = (lo, hi) if sw.integer else (float(lo), float(hi))
        candidates = [sw.low, sw.high]
    coerced = []
    for raw_v in candidates:
        cfg = sw.resolve(raw_v)
        v = recipes.get_dotted(cfg, key)
        if isinstance(v, (list, dict)):
            raise RecipeError(f"--values: '{typed}' must take numbers, integers, booleans or strings, got {v!r}")
        # every value reads the same data: the fine-tuning protocol alone tells their runs apart
        folder = protocol_hash(protocol.finetune_view(cfg))
        if folder in folders:
            same = folders[folder]
            if same == v:
                raise RecipeError(f"--values: {show_value(v)} is given twice")
            raise RecipeError(f"sweep key '{typed}': {show_value(same)} and {show_value(v)} give the same run "
                              f"(protocol {folder}); this key does not change what a run computes")
        folders[folder] = v
        coerced.append(v)
    if sampler == "grid":
        sw.values = coerced
    sw.pruner = "none" if sampler == "grid" else (args.pruner or "median")

    sw.base_protocol = recipes.protocol_hash(base, exclude=(key,))
    digest = hashlib.sha256(json.dumps(sw.spec(), sort_keys=True, default=str).encode()).hexdigest()[:10]
    seed = sw.seed if sw.seed is not None else base["run"]["seed"]
    sw.study = args.study or _safe_name(f"{typed}-{sw.method}-{sw.task}-{sw.preset}-s{seed}-{digest}")
    if args.storage:
        sw.storage = args.storage
    else:
        sw.storage = str(Path(sw.out) / "sweeps" / f"{_safe_name(sw.study)}.journal")
    return sw


# ==================================================================================================
# Storage, workers, liveness
# ==================================================================================================
def _with_pg_driver(url: str) -> str:
    """``postgresql://`` names no driver: SQLAlchemy 2.1 then means psycopg (3), 2.0 psycopg2. Name the one that
    is installed (psycopg first, then psycopg2), so either package serves the documented URL; a URL that names
    its driver (``postgresql+psycopg2://``) is left as it is. Neither installed: one line saying what to install."""
    import importlib.util

    if not url.startswith(("postgresql://", "postgres://")):
        return url
    rest = url.split("://", 1)[1]
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise RecipeError(f"--storage {_public_url(url)}: no PostgreSQL driver is installed; expected psycopg2 or "
                      f"psycopg (pip install 'sslbench[postgresql]', i.e. psycopg2-binary)")


def _public_url(location: str) -> str:
    """A storage location as printed: a database URL without its password."""
    if "://" not in location:
        return location
    try:
        from sqlalchemy.engine import make_url

        return make_url(location).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: print it as given
        return location


def open_storage(location: str):
    """JournalStorage for a path (created), RDBStorage for a URL (postgresql://, mysql://, sqlite://)."""
    import optuna

    if "://" in location:
        location = _with_pg_driver(location)
        try:
            return optuna.storages.RDBStorage(location, engine_kwargs={"pool_pre_ping": True}
                                              if not location.startswith("sqlite") else None)
        except Exception as exc:  # noqa: BLE001 - driver missing, server down, bad URL: one line
            raise RecipeError(f"--storage {_public_url(location)}: cannot open the database ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(location).expanduser()
    if path.is_dir():
        raise RecipeError(f"--storage {location}: is a folder; give a journal file path or a database URL")
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ("?", "")
    fields = text[text.rfind(")") + 2:].split()
    return (fields[0], fields[19]) if len(fields) > 19 else ("?", "")


def _pid_alive(pid: int, start: str) -> bool:
    if Path("/proc/self/stat").exists():
        info = _proc_start(pid)
        if info is None:
            return False
        state, started = info
        if state in ("Z", "X"):
            return False
        return not (start and started and started != start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_worker() -> dict[str, Any]:
    pid = os.getpid()
    info = _proc_start(pid)
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "pid_start": info[1] if info else ""}


def stale_reason(trial, me: dict[str, Any], heartbeat: float, now: float | None = None) -> str | None:
    """Why a RUNNING trial's worker is dead, or None while it may be alive (see the module docstring)."""
    now = time.time() if now is None else now
    w = trial.system_attrs.get(ATTR_WORKER)
    if isinstance(w, dict) and w.get("host") == me["host"] and w.get("boot") == me["boot"] and w.get("pid"):
        if w["pid"] == me["pid"] and w.get("pid_start") == me["pid_start"]:
            return None
        if not _pid_alive(int(w["pid"]), str(w.get("pid_start") or "")):
            return f"its worker (pid {w['pid']} on {w['host']}) is gone"
        return None
    beat = trial.system_attrs.get(ATTR_BEAT)
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    if beat is not None and now - float(beat) > MISSED_BEATS * heartbeat:
        where = f"pid {w['pid']} on {w['host']}" if isinstance(w, dict) else "unknown worker"
        return f"no heartbeat for {now - float(beat):.0f} s ({where})"
    return None


class Heartbeat:
    """Refreshes a trial's heartbeat attribute from a daemon thread while the trial runs."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sslbench-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def _beat(self) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_system_attr(self.trial_id, ATTR_BEAT, time.time())
            except UpdateFinishedTrialError:
                return      # finished (or declared dead) elsewhere
            except Exception:  # noqa: BLE001 - a transient storage error: try again next beat
                continue

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join(timeout=10)


def _grid_sampler_class():
    import optuna

    class _Grid(optuna.samplers.GridSampler):
        """GridSampler whose after_trial never calls study.stop(): the worker loop decides when the grid is
        done (stop() only works inside optimize(), and this loop uses ask/tell)."""

        def after_trial(self, study, trial, state, values) -> None:  # noqa: D102
            return None

    return _Grid


# ==================================================================================================
# The worker
# ==================================================================================================
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
        self.me = this_worker()
        if sw.sampler == "grid":
            self.space = {sw.key: list(sw.values)}
            sampler = _grid_sampler_class()(self.space, seed=0)
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
            raise RecipeError(f"--study {sw.study}: no such study in {_public_url(sw.storage)} yet (run the sweep first)") from None
        except ValueError as exc:  # an existing study with another direction
            raise RecipeError(f"--study {sw.study}: {exc}") from None
        self.study_id = self.storage.get_study_id_from_name(sw.study)
        spec = json.loads(json.dumps(sw.spec(), default=str))
        have = self.study.user_attrs.get(ATTR_SPEC)
        if have is None and create:
            self.study.set_user_attr(ATTR_SPEC, spec)
        elif have is not None and have != spec:
            diff = [k for k in spec if have.get(k) != spec.get(k)]
            raise RecipeError(f"--study {sw.study}: this study in {_public_url(sw.storage)} holds another sweep (differs in "
                              f"{', '.join(diff)}); choose another --study name")
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

    # -- step 1: reap ------------------------------------------------------------------------------
    def reap(self) -> list[int]:
        """Fail RUNNING trials whose worker is dead; returns the numbers this worker failed."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        reaped = []
        for t in self.trials():
            if t.state != TrialState.RUNNING:
                continue
            why = stale_reason(t, self.me, self.sw.heartbeat)
            if why is None:
                continue
            try:
                tid = self.trial_id(t.number)
                self.storage.set_trial_system_attr(tid, ATTR_STALE, {"reason": why, "at": time.time(), "by": self.me})
                self.storage.set_trial_state_values(tid, TrialState.FAIL)
            except (UpdateFinishedTrialError, RuntimeError):
                continue  # another worker reaped it first (or it just finished)
            reaped.append(t.number)
            self.say(f"[yellow]trial #{t.number} ({esc(self.sw.display)} = {esc(show_value(self.value_of(t)))}) was "
                     f"left running: {esc(why)}; it will be run again from its run folder's last checkpoint[/yellow]")
        return reaped

    # -- step 2: plan and queue retries ------------------------------------------------------------
    def retryable(self, t) -> bool:
        from optuna.trial import TrialState

        if t.state != TrialState.FAIL or self.superseded(t):
            return False
        if t.number in self.failed_at_start:
            return True
        if ATTR_STALE in t.system_attrs:
            return len(t.system_attrs.get("retry_history", [])) < self.sw.max_retries
        return False

    def enqueue_retry(self, t) -> None:
        from optuna.trial import TrialState, create_trial

        history = list(t.system_attrs.get("retry_history", [])) + [t.number]
        attrs: dict[str, Any] = {"failed_trial": t.system_attrs.get("failed_trial", t.number),
                                 "retry_history": history}
        if self.sw.sampler == "grid":
            attrs.update(grid_id=self.point(t), search_space=self.space)
        else:
            attrs["fixed_params"] = {self.sw.key: self.point(t)}
        self.study.add_trial(create_trial(state=TrialState.WAITING, system_attrs=attrs,
                                          intermediate_values=dict(t.intermediate_values)))

    def plan(self) -> dict[str, Any]:
        """Queue the retries that are due and say what there is to do."""
        from optuna.trial import TrialState

        trials = self.trials()
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if self.sw.sampler == "grid":
            by_point: dict[Any, list] = {g: [] for g in range(len(self.sw.values))}
            for t in trials:
                g = self.point(t)
                if g in by_point:
                    by_point[g].append(t)
            complete, active, fresh, failed = set(), set(), set(), {}
            for g, ts in by_point.items():
                if any(t.state == TrialState.COMPLETE for t in ts):
                    complete.add(g)
                elif any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in ts):
                    active.add(g)
                elif not ts:
                    fresh.add(g)
                else:
                    real = [t for t in ts if not self.superseded(t)] or ts
                    last = max(real, key=lambda t: t.number)
                    if self.retryable(last) or all(self.superseded(t) for t in ts):
                        self.enqueue_retry(last)
                        active.add(g)
                        waiting.append(last)
                    else:
                        failed[g] = last
            return {"done": len(complete) == len(by_point), "work": bool(waiting or fresh),
                    "elsewhere": [t for t in running], "failed": failed, "complete": complete}
        # TPE search: retry failed trials with their parameters, then sample until --trials are finished.
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
        return {"done": done, "work": work, "elsewhere": running, "failed": failed}

    # -- step 3/4: one trial -----------------------------------------------------------------------
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

    def run_one(self) -> str:
        """Ask a trial, run it, tell the result. Returns complete | pruned | failed | superseded."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        sw = self.sw
        if sw.sampler == "tpe":
            self.study.sampler = self._tpe(len(self.trials()))
        trial = self.study.ask()
        tid = self.trial_id(trial.number)
        beat = Heartbeat(self.storage, tid, sw.heartbeat)
        told = False
        try:
            self.storage.set_trial_system_attr(tid, ATTR_WORKER, self.me)
            self.storage.set_trial_system_attr(tid, ATTR_BEAT, time.time())
            beat.start()
            if sw.sampler == "grid":
                value = trial.suggest_categorical(sw.key, list(sw.values))
            elif sw.integer:
                value = trial.suggest_int(sw.key, int(sw.low), int(sw.high), log=sw.log)
            else:
                value = trial.suggest_float(sw.key, float(sw.low), float(sw.high), log=sw.log)
            frozen = self.storage.get_trial(tid)
            dup = self.is_duplicate(frozen)
            if dup is not None:
                self.storage.set_trial_system_attr(tid, ATTR_SUPERSEDED, dup)
                beat.stop()
                told = True
                self.study.tell(trial, state=TrialState.FAIL)
                return "superseded"
            result, told = self._execute(trial, tid, frozen, value, beat)
            return result
        except UpdateFinishedTrialError:
            told = True   # declared dead by another worker (missed heartbeats): the retry there continues
            self.say(f"[yellow]trial #{trial.number} was declared dead by another worker (missed heartbeats); "
                     f"stopping here, its retry continues from the last checkpoint[/yellow]")
            return "superseded"
        except BaseException as exc:
            if not told and not isinstance(exc, SweepStop):   # never leave the trial RUNNING (Ctrl-C too)
                self._fail(trial, tid, beat, "interrupted" if isinstance(exc, KeyboardInterrupt)
                           else f"{type(exc).__name__}: {exc}")
            raise
        finally:
            beat.stop()

    def _execute(self, trial, tid: int, frozen, value: Any, beat: Heartbeat) -> tuple[str, bool]:
        """Run the protocol for one value under the run-folder locks; (result, told)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        from . import protocol

        sw = self.sw
        cfg = sw.resolve(value)
        folder, proto, pcfg = expected_run(cfg, sw.root, sw.corpus_root)
        for k, v in (("value", value), ("run_folder", str(folder)), ("protocol", proto), ("phantom", sw.phantom)):
            trial.set_user_attr(k, v)
        history = frozen.system_attrs.get("retry_history") or []
        if sw.sampler == "grid":
            where = f" (grid point {sw.values.index(value) + 1}/{len(sw.values)})"
        else:
            where = f" (trial {sum(1 for t in self.trials() if not self.superseded(t))}/{sw.trials})"
        retry = f", retry of #{history[-1]}: continues its run folder" if history else ""
        self.say(f"[bold]trial #{trial.number}[/bold]: {esc(sw.display)} = {esc(show_value(value))}{where}{retry} "
                 f"-> {esc(folder)}")
        reported = set(frozen.intermediate_values)

        def on_validation(step: int, dice: float) -> None:
            # Called once the checkpoint of this step is on disk: stopping here loses nothing.
            if step in reported or not math.isfinite(dice):
                return
            reported.add(step)
            trial.report(dice, step)
            if trial.should_prune():
                trial.set_user_attr("pruned_at", step)
                raise self.optuna.TrialPruned(f"pruned at step {step} (validation Dice {dice:.4f})")

        dist = distributed.current()

        def on_validation_everywhere(step: int, dice: float) -> None:
            # Under torchrun the decision is rank 0's (the only rank that talks to the study); every rank
            # receives it at the same validation and stops together.
            pruned: Exception | None = None
            try:
                on_validation(step, dice)
            except self.optuna.TrialPruned as exc:
                pruned = exc
            if dist.enabled:
                dist.broadcast_object(pruned is not None)
            if pruned is not None:
                raise pruned

        try:
            # Each run folder is locked by the protocol itself (sslbench/store/lock.py, on the folder its run key
            # names); inside waiting_for_run_locks a second worker on the same run waits for the first, then finds
            # the run finished and reads it instead of training beside it.
            if pcfg is not None:
                with waiting_for_run_locks():
                    command(dist, ("pretrain", pcfg, sw.corpus_root))
                    protocol.pretrain(pcfg, root=sw.corpus_root, resume=True, force=False, console=self.console)
            with waiting_for_run_locks():
                run_kwargs = dict(method=sw.method, task=sw.task, preset=sw.preset,
                                  overrides=sw.overrides + [sw.override(value)], seed=sw.seed, root=sw.root,
                                  corpus=sw.corpus, corpus_root=sw.corpus_root, out=sw.out, resume=True, force=False)
                command(dist, ("run", run_kwargs))   # the trial's parameters, from rank 0 to every rank
                outcome = protocol.run_protocol(**run_kwargs, console=self.console,
                                                on_validation=on_validation_everywhere)
        except self.optuna.TrialPruned as exc:
            beat.stop()
            self.study.tell(trial, state=TrialState.PRUNED)
            self.say(f"trial #{trial.number}: {esc(exc)}")
            return "pruned", True
        except UpdateFinishedTrialError:
            raise
        except SSLBenchError as exc:
            self._fail(trial, tid, beat, str(exc))
            raise SweepStop(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - one point failing must not lose the others
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._fail(trial, tid, beat, f"{type(exc).__name__}: {first}")
            log = Path(sw.out) / "sweeps" / f"{_safe_name(sw.study)}.errors.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"--- trial #{trial.number} {sw.key}={format_value(value)} "
                        f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n{traceback.format_exc()}\n")
            self.say(f"[red]trial #{trial.number} failed[/red]: {type(exc).__name__}: {esc(first)} "
                     f"(traceback in {esc(log)})")
            return "failed", True
        dice = float(outcome.metrics.get(f"mean_{outcome.metrics.get('metric', 'dice')}", float("nan")))
        for k, v in (("run_folder", str(outcome.record.path)), ("protocol", outcome.metrics.get("protocol", proto)),
                     ("dice", dice), ("phantom", bool(outcome.metrics.get("phantom", sw.phantom))),
                     ("action", outcome.action)):
            trial.set_user_attr(k, v)
        if not math.isfinite(dice):
            self.storage.set_trial_system_attr(tid, ATTR_ERROR, "the validation Dice is not a number")
        beat.stop()
        self.study.tell(trial, dice)
        return ("complete" if math.isfinite(dice) else "failed"), True

    def _fail(self, trial, tid: int, beat: Heartbeat, why: str) -> None:
        from optuna.trial import TrialState

        beat.stop()
        with contextlib.suppress(Exception):
            self.storage.set_trial_system_attr(tid, ATTR_ERROR, why[:500])
        with contextlib.suppress(Exception):
            self.study.tell(trial, state=TrialState.FAIL)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from optuna.trial import TrialState

        self.reap()
        self.failed_at_start = {t.number for t in self.trials()
                                if t.state == TrialState.FAIL and not self.superseded(t)}
        superseded_in_a_row = 0
        while True:
            self.reap()
            plan = self.plan()
            if plan["done"] or not plan["work"]:
                return plan
            result = self.run_one()
            if result == "superseded":
                superseded_in_a_row += 1
                if superseded_in_a_row > 20:  # pragma: no cover - a safety net, never seen
                    return self.plan()
                time.sleep(0.2)
                continue
            superseded_in_a_row = 0
            self.ran += 1
            if result == "failed":
                self.failures_here += 1
                if self.sw.sampler == "tpe" and self.failures_here >= 3:
                    self.say("[red]3 trials failed in this worker: stopping[/red]")
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
    collective: torchrun then ends the job.
    """
    from . import protocol

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
    from .data.locate import locate_data

    cfg = sw.resolve()
    say = (lambda text: console.print(esc(text)))
    for section, root in (("task", sw.root), ("corpus", sw.corpus_root)):
        if section not in cfg:
            continue
        lock = RunLock(Path(sw.out) / "sweeps" / "locks" / f"data-{_safe_name(cfg[section]['name'])}.lock",
                       f"the synthesis of {cfg[section]['name']}").acquire(wait=True, say=say)
        try:
            locate_data(cfg[section], root, log=say)
        finally:
            lock.release()


# ==================================================================================================
# Output
# ==================================================================================================
def _state_text(w: Worker, t, me: dict[str, Any], retried_by: dict[int, int]) -> tuple[str, str]:
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
        why = stale_reason(t, me, w.sw.heartbeat)
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
        state, note = _state_text(w, t, w.me, retried_by)
        dice = t.value if t.value is not None and t.state.name == "COMPLETE" else t.user_attrs.get("dice")
        dice_txt = "" if dice is None or (isinstance(dice, float) and math.isnan(dice)) else f"{100 * float(dice):.2f}"
        if t.state.name == "PRUNED" and t.value is not None:
            dice_txt = f"({100 * float(t.value):.2f})"
        table.add_row(f"#{t.number}", esc(show_value(w.value_of(t))), dice_txt, state,
                      esc(_short_path(t.user_attrs.get("run_folder", ""))), esc(note))
    console.print(table)
    n_sup = len(trials) - len(shown)
    if n_sup:
        console.print(f"({n_sup} duplicate trial(s) created by racing workers were closed without running)")
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
    console.print(f"study {esc(sw.study)} in {esc(_public_url(sw.storage))}")


# ==================================================================================================
# Command line
# ==================================================================================================
DESCRIPTION = ("Optuna sweep over one recipe key: every trial pre-trains (if the method does), fine-tunes and "
               "evaluates with --set KEY=VALUE and is scored by its validation Dice (maximised). Each trial is a "
               "normal run record under --out.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslbench sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `sslbench sweep` (on its own parser, or as the sub-command of sslbench's one parser)."""
    p.add_argument("key", help="alias (lambda = method.params.lambda) or any dotted key of the resolved recipe, "
                               "e.g. task.finetune.lr")
    p.add_argument("--method", default="voco", help="method recipe (default: voco)")
    p.add_argument("--task", default="phantom-mmwhs", help="task recipe (default: phantom-mmwhs)")
    p.add_argument("--root", help="dataset root of the task (phantom tasks synthesise their own)")
    p.add_argument("--corpus", help="pre-training corpus recipe (default: the method's)")
    p.add_argument("--corpus-root", help="dataset root of the corpus")
    p.add_argument("--preset", choices=recipes.PRESETS, help="settings profile (default: the task's; phantoms: tiny)")
    p.add_argument("--seed", type=int, help="run seed of every trial (default 0); one study per seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any other key of the base recipe (repeatable)")
    p.add_argument("--out", default="runs", help="folder for run records and the journal (default: runs)")
    g = p.add_argument_group("search")
    g.add_argument("--sampler", choices=("grid", "tpe"), help="grid (default; --values) or tpe (--low/--high)")
    g.add_argument("--values", nargs="+", metavar="V", help="grid values (λ default: 0.5 1.0 1.5, the seed's Table 3)")
    g.add_argument("--trials", type=int, help="tpe: number of finished trials the study should reach (default 20)")
    g.add_argument("--low", type=float, help="tpe: lower end of the range")
    g.add_argument("--high", type=float, help="tpe: upper end of the range")
    g.add_argument("--log", action="store_true", help="tpe: sample on a log scale")
    g.add_argument("--int", action="store_true", help="tpe: integer values")
    g.add_argument("--pruner", choices=("median", "hyperband", "none"),
                   help="prune on intermediate validation Dice (tpe default: median; grids never prune)")
    s = p.add_argument_group("study")
    s.add_argument("--study", help="study name (default: key-method-task-preset-seed-<hash of protocol and search>)")
    s.add_argument("--storage", help="journal file path (default: <out>/sweeps/<study>.journal) or a database URL "
                                     "such as postgresql://user:pw@host/db for workers on several machines")
    s.add_argument("--heartbeat", type=float, default=60.0, metavar="SECONDS",
                   help=f"heartbeat period of running trials; a worker on another machine is declared dead "
                        f"after {MISSED_BEATS} missed beats (default 60)")
    s.add_argument("--max-retries", type=int, default=3,
                   help="retries in a row of a point whose worker died, within one run (default 3)")
    s.add_argument("--status", action="store_true", help="print the study's trials and exit (runs nothing)")
    s.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="each trial runs on N local processes under torchrun (DDP); rank 0 drives the study "
                        "and broadcasts every trial's parameters and pruning decision")


def _console():
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)   # long paths stay on one line (copy-paste)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160                              # logs and CI: room for the run folders
    return console


def main(argv: Sequence[str] | None = None) -> int:
    """`sslbench sweep KEY [options]`; returns the exit status (0 done or left to other workers, 1 points
    failed, 2 user error, 130 interrupted)."""
    raw = list(argv) if argv is not None else sys.argv[1:]
    try:
        args = _parser().parse_args(raw)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return run(args, raw)


def run(args: argparse.Namespace, raw: Sequence[str]) -> int:
    """The sweep of parsed options (``raw``: the command's own arguments, for the torchrun re-launch)."""
    if args.gpus is not None and distributed.env_world_size() <= 1:
        if args.gpus < 1:
            print(f"error: --gpus: expected a positive number of processes, got {args.gpus}", file=sys.stderr)
            return 2
        return distributed.launch(args.gpus, ["sweep", *list(raw)])
    device = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("run.device=")), "auto")
    dist = distributed.setup(device)
    if not dist.is_main:
        code = follow(dist)
        distributed.cleanup()
        return code
    try:
        return _main(args)
    finally:
        command(dist, ("stop",))
        distributed.cleanup()


def _main(args: argparse.Namespace) -> int:
    console = _console()
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sw = build_sweep(args)
        if args.status:
            print_summary(Worker(sw, console, create=False), console, None)
            return 0
        what = (f"grid {', '.join(show_value(v) for v in sw.values)}" if sw.sampler == "grid" else
                f"TPE over [{show_value(sw.low)}, {show_value(sw.high)}]{' (log)' if sw.log else ''}"
                f"{' (integers)' if sw.integer else ''}, {sw.trials} trials, pruner {sw.pruner}")
        console.print(f"[bold]sweep {esc(sw.display)}[/bold] " + esc(f"({sw.key}) of {sw.method} on {sw.task} "
                      f"[preset {sw.preset}, seed {sw.seed if sw.seed is not None else 0}]: {what}"))
        console.print(esc(f"study {sw.study} in {_public_url(sw.storage)} (start this command again elsewhere to add workers)"))
        if sw.phantom:
            console.print(f"[magenta]PHANTOM data[/magenta]: {esc(sw.task_title)} is procedurally generated; "
                          f"these are phantom results, not results on the real dataset")
        check_data(sw, console)
        worker = Worker(sw, console)
        try:
            plan = worker.run()
        except SweepStop as exc:
            print_summary(worker, console, None)
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if plan["done"] and not worker.ran:
            console.print("nothing to run: every point of this study is finished")
        elif not plan["done"] and not worker.ran and not plan.get("failed"):
            console.print("nothing to run here: the remaining points are running in other workers")
        print_summary(worker, console, plan)
        if plan["done"] or not plan.get("failed"):
            return 0
        return 1
    except SSLBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the trial is marked failed and its run folder keeps its last checkpoint; "
              "run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
