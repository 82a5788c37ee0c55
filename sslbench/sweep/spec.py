"""What a sweep is: the swept key, its values or range, the base recipe and the study's name and storage,
validated up front (every problem one RecipeError line, before any storage or run folder exists)."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import recipes
from ..errors import RecipeError
from ..store.run_key import protocol_hash


def esc(text: Any) -> str:
    """Text shown inside rich markup (paths, values, errors may hold '[...]')."""
    from rich.markup import escape

    return escape(str(text))


#: Short names of keys worth sweeping (the key is otherwise any dotted key of the resolved recipe).
ALIASES = {"lambda": "method.params.lambda"}
#: Grid values used when --values is not given (the seed's Table 3 for λ).
DEFAULT_VALUES = {"method.params.lambda": ["0.5", "1.0", "1.5"]}
LABELS = {"method.params.lambda": "λ"}


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


def safe_name(text: str) -> str:
    """``text`` as a file name (study names, journal files)."""
    return "".join(c if (c.isalnum() or c in "._-") else "_" for c in text)


def build_sweep(args: argparse.Namespace) -> Sweep:
    """Validate everything up front (key, values, range, options): every problem is one RecipeError."""
    from .. import protocol

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
               trials=args.trials or 20, max_retries=int(args.max_retries))
    if sw.max_retries < 0:
        raise RecipeError(f"--max-retries: expected 0 or more, got {args.max_retries}")
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
    sw.study = args.study or safe_name(f"{typed}-{sw.method}-{sw.task}-{sw.preset}-s{seed}-{digest}")
    if args.storage:
        sw.storage = args.storage
    else:
        sw.storage = str(Path(sw.out) / "sweeps" / f"{safe_name(sw.study)}.journal")
    return sw


