"""`sslbench report`: leaderboard tables built from run records, beside the published numbers.

Published numbers are data (``leaderboards/voco_supplement.yaml``: the VoCo supplement's Tables 1, 3-7,
each cell with its source); measured numbers are the run folders under ``runs/finetune`` (their
``metrics.json``, ``status.json`` and ``recipe.yaml``). Nothing in a table is typed by hand. This follows
mmpretrain: results as data (metafile.yml), tables generated with tabulate, and a rich regression table
coloured by agreement with the expected value.

Rules the tables keep:

* **Protocols are never averaged together.** Each cell groups its runs by protocol and shows every group
  separately, inside the same cell, most runs first, each labelled ``[preset, λ, p:<hash>]`` whenever the
  cell holds more than one group (and the table gets a note saying so).
  The protocol of a run is the hash of its resolved recipe (``recipe.yaml``) without ``run.seed``, with
  the pre-training's recipe (also without its seed) standing in for ``init.hash``. sslbench records the
  same seed-free hash (``metrics.json: protocol``); recomputing it here keeps records written by other
  versions comparable. Where ``recipe.yaml`` (or the pre-training's) cannot be read, the recorded hash
  is used.
* **Comparable or not shown as comparable.** One function, ``comparability``, decides where a run stands:
  beside the published number (with Δ) only when it follows the published protocol (real data in the
  fine-tuning and its pre-training, ``--preset paper`` for both, the task's and the method's full schedule,
  the recipe's split, labelled cases and scoring). Every other run fills its own column next to the real one,
  ``<Dataset> (phantom)``, ``(tiny preset)``, ``(reduced schedule)`` or ``(other protocol)``, never with a Δ.
* **Phantoms are never the real dataset.** Runs that read phantom data anywhere (``"phantom": true`` in
  their record, their task's recipe, or their pre-training's record or recipe) fill the ``(phantom)`` column,
  their values prefixed ``PHANTOM`` in every format.
* **Scoring eras are not mixed.** A segmentation record without metrics.json's ``scoring`` block was scored
  before the empty-set rules of 2026-12-03: its group is kept apart and marked ``‡scoring``. HD95 (mm,
  ``mean_hd95``) gets its own column in the comparison table where runs record it (the supplement publishes
  no HD95).
* Dice in records is a fraction; tables are in percent like the paper. Mean ± sample std over seeds
  (runs), Δ = measured mean - published, n = number of runs.
* **Environments are never mixed silently.** Each run's torch / monai versions (its env.json, and its
  pre-training's) travel with it; a group whose runs differ is marked ``‡env`` and a table whose measured runs
  span several environments gets a note listing them, and the terminal a warning.
* Table 6 is published on hidden leaderboard test sets; sslbench evaluates validation splits, so no run
  record fills it (the YAML's ``measured: false``). Its measured values are what the leaderboards answered,
  recorded as data (``<runs>/leaderboards/online.yaml`` or ``--online FILE``; sslbench/online.py): each
  stands where its run's comparability puts it, with its provenance (run folder, date, submission id).

``--format html`` writes one self-contained page (sslbench/report_html.py); every report output is written
atomically and world-readable (0644).
"""
from __future__ import annotations

import argparse
import copy
import errno
import functools
import html
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import recipes
from .errors import RecipeError, RunError, SSLBenchError

DEFAULT_LEADERBOARD = "voco_supplement.yaml"
METRICS = ("dice", "auc", "nsd")
FORMATS = ("md", "latex", "html", "csv")
EXTENSIONS = {"md": "md", "latex": "tex", "html": "html", "csv": "csv"}
GREEN_WITHIN = 1.0      # points of Dice / AUC
YELLOW_WITHIN = 3.0
NO_VALUE = "—"
MIXED_ENV_MARK = "‡env"
#: a cell whose runs read different data (root or files: their recorded ``data_fingerprint`` differ)
MIXED_DATA_MARK = "‡data"

#: Columns every frame from collect_runs has, even when no run was found.
RUN_COLUMNS = ["task", "task_title", "base_task", "method", "method_recipe", "variant", "seed", "preset",
               "protocol", "run_protocol", "series", "phantom", "metric", "mean_dice", "score", "lambda",
               "n_cases", "finished", "env", "path", "labeled_cases", "finetune_protocol", "finetune_family",
               "pretrain_steps", "data", "data_fingerprint", "comparability", "deviations", "old_scoring",
               "pretrain_run", "pretrain_corpus"]

#: Where a measured run may stand (see ``comparability``): "" = beside the published number, with a Δ; any other
#: kind fills its own column ``<header> (<kind>)``, never compared with a published number. In priority order:
#: a run that is several of them is filed under the first.
NOT_COMPARABLE = ("phantom", "tiny preset", "reduced schedule", "other protocol")
COMPARABLE = ""
#: A segmentation record without metrics.json's ``scoring`` block was scored before the empty-set rules
#: (issue 19): marked, and never pooled with records scored under them.
OLD_SCORING_MARK = "‡scoring"
OLD_SCORING_NOTE = ("scored before the empty-set rules of 2026-12-03 (its metrics.json has no scoring block: a "
                    "structure absent from truth or prediction may count differently); kept apart from runs "
                    "scored under the rules")
#: task.data keys that define the published split, and task.evaluate keys that define how a metric is scored
SPLIT_KEYS = ("datalist", "train_split", "val_split", "val_ids", "val_last", "val_fold", "folds_dir",
              "pretrain_fraction")
SCORING_KEYS = ("empty", "hd95_empty", "nsd_tolerance")
SEGMENTATION_METRICS = ("dice", "nsd", "hd95")


# ==================================================================================================
# Published numbers: load and validate the leaderboard YAML
# ==================================================================================================
def default_leaderboard() -> Path:
    return recipes.recipe_dir("leaderboards") / DEFAULT_LEADERBOARD


class _Checker:
    """One-line errors: '<file>: key '<dotted key>': expected ..., got ...'."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, expected: str, got: Any = None, show_got: bool = True) -> None:
        tail = f", got {got!r}" if show_got else ""
        raise RecipeError(f"{self.where}: key '{key}': expected {expected}{tail}")

    def mapping(self, value: Any, key: str, required: Iterable[str], optional: Iterable[str] = ()) -> dict:
        if not isinstance(value, Mapping):
            self.fail(key, "a mapping", value)
        required, allowed = tuple(required), tuple(required) + tuple(optional)
        for k in value:
            if k not in allowed:
                sub = f"{key}.{k}" if key else str(k)
                raise RecipeError(f"{self.where}: unknown key '{sub}'{recipes.did_you_mean(k, allowed)}; "
                                  f"expected one of {', '.join(allowed)}")
        for k in required:
            if k not in value:
                raise RecipeError(f"{self.where}: missing key '{f'{key}.{k}' if key else k}'")
        return dict(value)

    def text(self, value: Any, key: str, nullable: bool = False) -> None:
        if value is None and nullable:
            return
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "a non-empty string" + (" or null" if nullable else ""), value)

    def number(self, value: Any, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, "a number", value)

    def integer(self, value: Any, key: str, minimum: int = 0) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, f"an integer >= {minimum}", value)

    def boolean(self, value: Any, key: str) -> None:
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)

    def choice(self, value: Any, key: str, choices: Sequence[str]) -> None:
        if value not in choices:
            raise RecipeError(f"{self.where}: key '{key}': expected one of {', '.join(choices)}, got {value!r}"
                              f"{recipes.did_you_mean(value, choices)}")

    def list_(self, value: Any, key: str, nonempty: bool = True) -> list:
        if not isinstance(value, list) or (nonempty and not value):
            self.fail(key, "a non-empty list" if nonempty else "a list", value)
        return value

    def strings(self, value: Any, key: str, nonempty: bool = False) -> None:
        self.list_(value, key, nonempty)
        for i, item in enumerate(value):
            self.text(item, f"{key}[{i}]")


_TABLE_HEAD = ("id", "kind", "title", "caption")
_DATASET_ROW = ("dataset", "stage", "modality", "task", "train", "valid", "sslbench_task", "source")


def _check_params(c: _Checker, params: Any, key: str) -> None:
    for k, v in c.mapping(params, key, (), ("lambda",)).items():
        c.number(v, f"{key}.{k}")


def _check_results(c: _Checker, t: dict, key: str) -> None:
    c.mapping(t, key, _TABLE_HEAD + ("number", "source", "row_header", "evaluated_on", "measured", "digits",
                                     "columns", "rows"), ("measured_note", "marks_legend", "params", "online"))
    c.integer(t["number"], f"{key}.number", 1)
    for k in ("source", "row_header", "evaluated_on"):
        c.text(t[k], f"{key}.{k}")
    c.boolean(t["measured"], f"{key}.measured")
    if "online" in t:
        c.boolean(t["online"], f"{key}.online")
    c.integer(t["digits"], f"{key}.digits")
    if "measured_note" in t:
        c.text(t["measured_note"], f"{key}.measured_note")
    if "params" in t:
        _check_params(c, t["params"], f"{key}.params")
    legend = t.get("marks_legend", {})
    c.mapping(legend, f"{key}.marks_legend", (), tuple(legend) if isinstance(legend, Mapping) else ())
    for mark, meaning in legend.items():
        c.text(meaning, f"{key}.marks_legend.{mark}")
    columns: dict[str, dict] = {}
    for j, col in enumerate(c.list_(t["columns"], f"{key}.columns")):
        ck = f"{key}.columns[{j}]"
        c.mapping(col, ck, ("id", "header", "task", "metric"))
        for k in ("id", "header", "task"):
            c.text(col[k], f"{ck}.{k}")
        c.choice(col["metric"], f"{ck}.metric", METRICS)
        if col["id"] in columns:
            c.fail(f"{ck}.id", "an id not used by another column", col["id"])
        columns[col["id"]] = col
    row_ids: set[str] = set()
    for r, row in enumerate(c.list_(t["rows"], f"{key}.rows")):
        rk = f"{key}.rows[{r}]"
        c.mapping(row, rk, ("id", "label", "method", "cells"), ("params", "class", "marks"))
        for k in ("id", "label", "method"):
            c.text(row[k], f"{rk}.{k}")
        if row["id"] in row_ids:
            c.fail(f"{rk}.id", "an id not used by another row", row["id"])
        row_ids.add(row["id"])
        if "params" in row:
            _check_params(c, row["params"], f"{rk}.params")
        if "class" in row:
            c.text(row["class"], f"{rk}.class")
        if "marks" in row:
            c.strings(row["marks"], f"{rk}.marks")
        cells = c.mapping(row["cells"], f"{rk}.cells", (), tuple(columns))
        for col_id, cell in cells.items():
            ek = f"{rk}.cells.{col_id}"
            c.mapping(cell, ek, ("value", "metric", "marks", "source"), ("digits", "note"))
            c.number(cell["value"], f"{ek}.value")
            c.choice(cell["metric"], f"{ek}.metric", METRICS)
            if cell["metric"] != columns[col_id]["metric"]:
                c.fail(f"{ek}.metric", f"'{columns[col_id]['metric']}' (the metric of column '{col_id}')",
                       cell["metric"])
            c.strings(cell["marks"], f"{ek}.marks")
            c.text(cell["source"], f"{ek}.source")
            if "digits" in cell:
                c.integer(cell["digits"], f"{ek}.digits")
            if "note" in cell:
                c.text(cell["note"], f"{ek}.note")


def _check_datasets(c: _Checker, t: dict, key: str) -> None:
    c.mapping(t, key, _TABLE_HEAD + ("number", "source", "rows"))
    c.integer(t["number"], f"{key}.number", 1)
    c.text(t["source"], f"{key}.source")
    for r, row in enumerate(c.list_(t["rows"], f"{key}.rows")):
        rk = f"{key}.rows[{r}]"
        c.mapping(row, rk, _DATASET_ROW, ("note",))
        for k in ("dataset", "stage", "modality", "task", "source"):
            c.text(row[k], f"{rk}.{k}")
        c.integer(row["train"], f"{rk}.train")
        c.integer(row["valid"], f"{rk}.valid")
        c.text(row["sslbench_task"], f"{rk}.sslbench_task", nullable=True)
        if "note" in row:
            c.text(row["note"], f"{rk}.note")


def _check_comparison(c: _Checker, t: dict, key: str, tables: Mapping[str, dict]) -> None:
    c.mapping(t, key, _TABLE_HEAD + ("methods", "tasks", "published"), ("method_params",))
    c.strings(t["methods"], f"{key}.methods", nonempty=True)
    mp = t.get("method_params", {})
    for method, params in c.mapping(mp, f"{key}.method_params", (), tuple(mp) if isinstance(mp, Mapping) else ()).items():
        _check_params(c, params, f"{key}.method_params.{method}")
    tasks: dict[str, dict] = {}
    for j, task in enumerate(c.list_(t["tasks"], f"{key}.tasks")):
        tk = f"{key}.tasks[{j}]"
        c.mapping(task, tk, ("task", "header", "metric"))
        c.text(task["task"], f"{tk}.task")
        c.text(task["header"], f"{tk}.header")
        c.choice(task["metric"], f"{tk}.metric", METRICS)
        tasks[task["task"]] = task
    for j, ref in enumerate(c.list_(t["published"], f"{key}.published", nonempty=False)):
        pk = f"{key}.published[{j}]"
        c.mapping(ref, pk, ("method", "task", "ref"))
        c.choice(ref["method"], f"{pk}.method", t["methods"])
        c.choice(ref["task"], f"{pk}.task", list(tasks))
        r = c.mapping(ref["ref"], f"{pk}.ref", ("table", "row", "column"))
        results = [i for i, s in tables.items() if s.get("kind") == "results"]
        c.choice(r["table"], f"{pk}.ref.table", results)
        src = tables[r["table"]]
        rows = {row["id"]: row for row in src["rows"]}
        c.choice(str(r["row"]), f"{pk}.ref.row", list(rows))
        cells = rows[str(r["row"])]["cells"]
        c.choice(r["column"], f"{pk}.ref.column", list(cells))
        if cells[r["column"]]["metric"] != tasks[ref["task"]]["metric"]:
            c.fail(f"{pk}.ref", f"a {tasks[ref['task']]['metric']} cell (the metric of task '{ref['task']}')",
                   cells[r["column"]]["metric"])


def validate_published(data: Any, where: str) -> None:
    """Raise RecipeError (one line naming the file and the key) when the leaderboard data is malformed."""
    c = _Checker(where)
    c.mapping(data, "", ("schema", "paper", "tables"), ("references",))
    if data["schema"] != 1:
        c.fail("schema", "1", data["schema"])
    c.text(data["paper"], "paper")
    if "references" in data:
        refs = c.mapping(data["references"], "references", (), tuple(map(str, data["references"] or {})))
        for k, v in refs.items():
            c.text(v, f"references.{k}")
    seen: dict[str, dict] = {}
    for i, t in enumerate(c.list_(data["tables"], "tables")):
        key = f"tables[{i}]"
        if not isinstance(t, Mapping):
            c.fail(key, "a mapping", t)
        for k in _TABLE_HEAD:
            if k not in t:
                raise RecipeError(f"{where}: missing key '{key}.{k}'")
            c.text(t[k], f"{key}.{k}")
        c.choice(t["kind"], f"{key}.kind", ("datasets", "results", "comparison"))
        if t["id"] in seen:
            c.fail(f"{key}.id", "an id not used by another table", t["id"])
        if t["kind"] == "results":
            _check_results(c, t, key)
        elif t["kind"] == "datasets":
            _check_datasets(c, t, key)
        else:
            _check_comparison(c, t, key, seen)
        seen[t["id"]] = t


def load_published(path: str | Path | None = None) -> dict:
    """The published tables (leaderboards/voco_supplement.yaml unless ``path``), validated.

    Raises RecipeError with one line naming the file and the key at fault.
    """
    path = Path(path) if path is not None else default_leaderboard()
    if not path.is_file():
        raise RecipeError(f"{path}: leaderboard file not found")
    data = recipes._read_yaml(path)
    validate_published(data, str(path))
    out = copy.deepcopy(data)
    out["_file"] = str(path)
    return out


# ==================================================================================================
# Measured numbers: the run folders
# ==================================================================================================
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_recipe(folder: Path) -> dict | None:
    import yaml

    try:
        cfg = yaml.safe_load((folder / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _pretrain_folder(metrics: Mapping, runs_dir: Path) -> Path | None:
    """The folder of the pre-training a fine-tuning started from (found even when runs/ was moved)."""
    where = (metrics.get("init") or {}).get("pretrain_run") if isinstance(metrics.get("init"), Mapping) else None
    if not where:
        return None
    p = Path(where)
    candidates = [p, runs_dir.parent / p]
    if "pretrain" in p.parts:
        i = len(p.parts) - 1 - p.parts[::-1].index("pretrain")
        candidates.append(runs_dir.joinpath(*p.parts[i:]))
    for cand in candidates:
        if (cand / "recipe.yaml").is_file():
            return cand
    return None


def _pretrain_facts(metrics: Mapping, runs_dir: Path) -> tuple[bool, int | None]:
    """(read phantom data, steps) of the pre-training a fine-tuning started from, from its record read once;
    (init's own ``phantom`` flag, None) where that record is not found."""
    init = metrics.get("init") if isinstance(metrics.get("init"), Mapping) else {}
    folder = _pretrain_folder(metrics, runs_dir)
    pre = _read_json(folder / "metrics.json") if folder is not None else None
    if not isinstance(pre, Mapping):
        return bool(init.get("phantom")), None
    steps = pre.get("steps")
    return bool(init.get("phantom") or pre.get("phantom")), steps if isinstance(steps, int) else None


def _pretrain_recipe(metrics: Mapping, runs_dir: Path) -> dict | None:
    """The recipe of the pre-training a fine-tuning started from."""
    folder = _pretrain_folder(metrics, runs_dir)
    return _read_recipe(folder) if folder is not None else None


#: The packages whose versions name a run's environment in the report (env.json keys).
ENV_PACKAGES = ("torch", "monai")
UNRECORDED_ENV = "versions unrecorded"


def _env_of(folder: Path) -> str:
    """'torch 2.14.1 + monai 1.6.1' from a run folder's env.json (UNRECORDED_ENV without one)."""
    env = _read_json(folder / "env.json")
    if not isinstance(env, Mapping) or not any(env.get(k) for k in ENV_PACKAGES):
        return UNRECORDED_ENV
    return " + ".join(f"{k} {env.get(k) or '?'}" for k in ENV_PACKAGES)


def run_environment(folder: Path, metrics: Mapping, runs_dir: Path) -> str:
    """The package environment a result depends on: the fine-tuning run's, and its pre-training's where that
    ran under other versions ('torch A + monai B (pre-training: torch C + monai D)')."""
    env = _env_of(folder)
    pre = _pretrain_folder(metrics, runs_dir)
    if pre is not None:
        pre_env = _env_of(pre)
        if pre_env != env:
            env += f" (pre-training: {pre_env})"
    return env


def _protocol_keys(cfg: Mapping, metrics: Mapping, runs_dir: Path) -> tuple[str, str] | None:
    """(protocol, series): seed-free hashes of a run's recipe; ``series`` also leaves out λ.

    None when the pre-training a run started from cannot be read (its recorded hash includes its seed).
    """
    c = {k: v for k, v in cfg.items() if k != "data"}        # data.root: where the data lives, not what ran
    init = c.get("init")
    pre = None
    if isinstance(init, Mapping) and init.get("source") == "pretrain":
        pre = _pretrain_recipe(metrics, runs_dir)
        if pre is None:
            return None
        pre = {k: v for k, v in pre.items() if k != "data"}
    keys = []
    for extra in ((), ("method.params.lambda",)):
        exclude = ("run.seed",) + extra
        cc = copy.deepcopy(c)
        if pre is not None:
            cc["init"] = dict(cc["init"], hash="pretrain:" + recipes.protocol_hash(pre, exclude=exclude))
        keys.append(recipes.protocol_hash(cc, exclude=exclude))
    return keys[0], keys[1]


def _finetune_keys(cfg: Mapping | None) -> dict[str, Any]:
    """labeled_cases, and two seed-free hashes of what the fine-tuning itself did (task, model and run sections;
    not the method, not the initialisation): ``finetune_protocol``, and ``finetune_family`` without
    ``task.finetune.labeled_cases`` (what a label-efficiency curve joins). See sslbench/efficiency.py."""
    if not isinstance(cfg, Mapping):
        return {"labeled_cases": None, "finetune_protocol": None, "finetune_family": None}
    part = {k: copy.deepcopy(cfg.get(k)) for k in ("task", "model", "run")}
    labeled = ((part.get("task") or {}).get("finetune") or {}).get("labeled_cases")
    same = ("run.seed", "run.label")            # run.label names the initialisation (the method), not the fine-tuning
    return {"labeled_cases": labeled,
            "finetune_protocol": recipes.protocol_hash(part, exclude=same),
            "finetune_family": recipes.protocol_hash(part, exclude=same + ("task.finetune.labeled_cases",))}


def _base_task(name: str, cfg: Mapping | None) -> str:
    task = (cfg or {}).get("task") or {}
    if isinstance(task, Mapping) and isinstance(task.get("extends"), str):
        return task["extends"]
    return name[len("phantom-"):] if name.startswith("phantom-") else name


def _float(v: Any) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _recorded_fingerprint(folder: Path) -> str | None:
    """The data fingerprint in a run folder's data.json (None for runs recorded before it existed)."""
    data = _read_json(folder / "data.json")
    return data.get("fingerprint") if isinstance(data, Mapping) else None


# --------------------------------------------------------------------------------------------------
# Comparable or not: may a measured run stand beside a published number?
# --------------------------------------------------------------------------------------------------
def _paper_recipe(kind: str, name: str) -> dict | None:
    """A task ("benchmarks") or method ("methods") recipe at the paper preset (its ``presets.paper`` applied);
    None when there is no such recipe. Cached: read-only."""
    return _paper_recipe_cached(kind, name)


@functools.lru_cache(maxsize=None)
def _paper_recipe_cached(kind: str, name: str) -> dict | None:
    try:
        data = recipes.load_task(name) if kind == "benchmarks" else recipes.load_method(name)
    except SSLBenchError:
        return None
    data = copy.deepcopy(data)
    for key, value in ((data.get("presets") or {}).get("paper") or {}).items():
        recipes.set_dotted(data, key, value, data.get("_file", name), parse=False)
    return data


def _same_value(a: Any, b: Any) -> bool:
    """Equal recipe values, NaN (or YAML's 'nan') equal to NaN, 1 equal to 1.0."""
    def norm(v):
        if isinstance(v, str) and v.strip().lower() == "nan":
            return math.nan
        return v
    a, b = norm(a), norm(b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def _short_finetune(ft: Mapping, paper: Mapping, metrics: Mapping) -> str | None:
    """Why a fine-tuning schedule is shorter than the paper recipe's (None when it is not)."""
    p_max, r_max = paper.get("max_steps") or 0, ft.get("max_steps") or 0
    steps = metrics.get("steps") if isinstance(metrics.get("steps"), int) else None
    if p_max:
        done = r_max or steps
        if done is None or done < p_max:
            return f"task.finetune.max_steps = {done} < the recipe's {p_max}"
        return None
    p_epochs = int(paper.get("epochs") or 0)
    if r_max:
        cases = metrics.get("train_cases")
        batch = int(ft.get("batch_size") or paper.get("batch_size") or 1)
        if isinstance(cases, int) and cases > 0:
            need = p_epochs * math.ceil(cases / batch)
            if (steps or r_max) < need:
                return (f"task.finetune.max_steps = {r_max} < the recipe's {p_epochs} epochs "
                        f"({need} steps on {cases} training cases)")
            return None
        return f"task.finetune.max_steps = {r_max} instead of the recipe's {p_epochs} epochs"
    epochs = ft.get("epochs", p_epochs)
    if isinstance(epochs, (int, float)) and epochs < p_epochs:
        return f"task.finetune.epochs = {epochs} < the recipe's {p_epochs}"
    return None


def comparability(cfg: Mapping | None, metrics: Mapping, *, phantom: bool = False,
                  pretrain_cfg: Mapping | None = None) -> tuple[str, list[str]]:
    """The one rule that decides whether a run may stand beside a published number: ``(kind, reasons)``.

    ``kind`` is COMPARABLE ("") when the run follows the published protocol: real data everywhere (task and
    pre-training), ``--preset paper`` for the fine-tuning and its pre-training, the task's full fine-tuning
    schedule (no ``max_steps`` / ``epochs`` shorter than the recipe's at the paper preset) and the method's
    full pre-training (``method.pretrain.steps``), every labelled case, the recipe's split (``task.data``:
    SPLIT_KEYS) and scoring (``task.evaluate``: SCORING_KEYS). Otherwise it is the first of NOT_COMPARABLE
    that applies ("phantom", "tiny preset", "reduced schedule", "other protocol"), and ``reasons`` lists every
    deviation found, in that order, as one-line texts. A recipe key missing from an older record counts as
    the recipe's; an unreadable recipe.yaml is "other protocol" (nothing can be checked).
    """
    found: dict[str, list[str]] = {}

    def add(kind: str, why: str) -> None:
        found.setdefault(kind, []).append(why)

    if phantom:
        add("phantom", "phantom data (the task's or its pre-training's)")
    if not isinstance(cfg, Mapping):
        add("other protocol", "recipe.yaml unreadable: the protocol cannot be checked")
    else:
        preset = (cfg.get("run") or {}).get("preset") or metrics.get("preset")
        if preset != "paper":
            add("tiny preset", f"preset {preset}")
        task_cfg = cfg.get("task") if isinstance(cfg.get("task"), Mapping) else {}
        base = _base_task(str(metrics.get("task") or task_cfg.get("name") or ""), cfg)
        paper = _paper_recipe("benchmarks", base)
        if paper is None:
            add("other protocol", f"no task recipe '{base}' to compare with")
        else:
            ft = task_cfg.get("finetune") if isinstance(task_cfg.get("finetune"), Mapping) else {}
            paper_ft = paper.get("finetune") or {}
            short = _short_finetune(ft, paper_ft, metrics)
            if short:
                add("reduced schedule", short)
            labeled, want = ft.get("labeled_cases"), paper_ft.get("labeled_cases")
            if "labeled_cases" in ft and not _same_value(labeled, want):
                add("other protocol", f"task.finetune.labeled_cases = {labeled} "
                                      f"(the recipe's: {'all' if want is None else want})")
            for section, keys in (("data", SPLIT_KEYS), ("evaluate", SCORING_KEYS)):
                have = task_cfg.get(section) if isinstance(task_cfg.get(section), Mapping) else {}
                want = paper.get(section) or {}
                for k in keys:
                    if k in have and not _same_value(have[k], want.get(k)):
                        add("other protocol", f"task.{section}.{k} = {have[k]!r} (the recipe's: {want.get(k)!r})")
    if isinstance(pretrain_cfg, Mapping):
        pre_preset = (pretrain_cfg.get("run") or {}).get("preset")
        if pre_preset != "paper":
            add("tiny preset", f"pre-training preset {pre_preset}")
        method = pretrain_cfg.get("method") if isinstance(pretrain_cfg.get("method"), Mapping) else {}
        steps = (method.get("pretrain") or {}).get("steps") if isinstance(method.get("pretrain"), Mapping) else None
        recipe = _paper_recipe("methods", str(method.get("name"))) if method.get("name") else None
        want = ((recipe or {}).get("pretrain") or {}).get("steps")
        if isinstance(steps, int) and isinstance(want, int) and steps < want:
            add("reduced schedule", f"method.pretrain.steps = {steps} < the recipe's {want}")
    kind = next((k for k in NOT_COMPARABLE if k in found), COMPARABLE)
    return kind, [why for k in NOT_COMPARABLE for why in found.get(k, [])]


def collect_runs(runs_dir: str | Path):
    """One row per finished fine-tuning run under ``runs_dir/finetune/**`` (a pandas DataFrame).

    Columns: RUN_COLUMNS plus ``dice:<class>`` per foreground class (fractions, as recorded). ``env`` names the
    torch / monai versions of the run and of its pre-training (from their env.json, see run_environment). A run that
    records NSD too (``metrics`` lists ``nsd``) has a second row with ``metric`` nsd, ``score`` its mean_nsd
    and its per-class NSD in the ``dice:<class>`` columns; one recording HD95 a row with ``metric`` hd95 (mm).
    ``comparability`` is the run's kind from ``comparability`` ("" = may stand beside a published number),
    ``deviations`` its reasons; ``old_scoring`` marks a segmentation record scored before the empty-set rules
    (no ``scoring`` block); ``pretrain_run`` / ``pretrain_corpus`` name the pre-training it started from.
    ``protocol`` is the seed-free protocol (see the module docstring), ``run_protocol`` the recorded hash,
    ``series`` the protocol without λ (what a λ curve joins), ``data`` / ``data_fingerprint`` the root and the
    fingerprint of the data it read (metrics.json or data.json; None before runs recorded them), ``score`` the recorded mean of the run's
    metric (``mean_dice`` for Dice). Unreadable folders are skipped and listed in ``df.attrs['skipped']``.
    """
    import pandas as pd

    runs_dir = Path(runs_dir)
    rows: list[dict] = []
    skipped: list[str] = []
    base = runs_dir / "finetune"
    for mfile in sorted(base.rglob("metrics.json")) if base.is_dir() else []:
        folder = mfile.parent
        status = _read_json(folder / "status.json")
        if not isinstance(status, Mapping) or status.get("state") != "finished":
            continue
        m = _read_json(mfile)
        if not isinstance(m, Mapping):
            skipped.append(f"{mfile}: not readable JSON")
            continue
        if m.get("kind", "finetune") != "finetune":
            continue
        if not m.get("task") or not m.get("method"):
            skipped.append(f"{mfile}: no task or method recorded")
            continue
        cfg = _read_recipe(folder)
        keys = _protocol_keys(cfg, m, runs_dir) if cfg is not None else None
        recorded = str(m.get("protocol") or status.get("protocol") or folder.name)
        protocol, series = keys if keys is not None else (recorded, recorded)
        params = (((cfg or {}).get("method") or {}).get("params") or {}) if cfg else {}
        metric = str(m.get("metric") or "dice")
        task_cfg = (cfg or {}).get("task") or {}
        pre_phantom, pre_steps = _pretrain_facts(m, runs_dir)
        phantom = (bool(m.get("phantom")) or bool(task_cfg.get("phantom") if isinstance(task_cfg, Mapping) else False)
                   or pre_phantom)
        init = cfg.get("init") if isinstance(cfg, Mapping) else None
        pre_cfg = (_pretrain_recipe(m, runs_dir)
                   if isinstance(init, Mapping) and init.get("source") == "pretrain" else None)
        if isinstance(pre_cfg, Mapping):            # what the pre-training read, from its own recipe.yaml too
            pre_data = pre_cfg.get("data") if isinstance(pre_cfg.get("data"), Mapping) else {}
            pre_corpus = pre_cfg.get("corpus") if isinstance(pre_cfg.get("corpus"), Mapping) else {}
            phantom = phantom or bool(pre_data.get("phantom") or pre_corpus.get("phantom"))
        kind, deviations = comparability(cfg, m, phantom=phantom, pretrain_cfg=pre_cfg)
        m_init = m.get("init") if isinstance(m.get("init"), Mapping) else {}
        corpus = ((pre_cfg or {}).get("corpus") or {}).get("name") if isinstance((pre_cfg or {}).get("corpus"), Mapping) \
            else m_init.get("corpus")
        row = {
            "task": m["task"],
            "task_title": m.get("task_title") or m["task"],
            "base_task": _base_task(m["task"], cfg),
            "method": m["method"],
            "method_recipe": m.get("method_recipe") or m["method"],
            "variant": m.get("variant"),
            "seed": m.get("seed"),
            "preset": m.get("preset"),
            "protocol": protocol,
            "run_protocol": recorded,
            "series": series,
            "phantom": phantom,
            "metric": metric,
            "mean_dice": _float(m.get("mean_dice")),
            "score": _float(m.get(f"mean_{metric}")),
            "lambda": _float(params.get("lambda")) if isinstance(params, Mapping) else math.nan,
            "n_cases": m.get("n_cases"),
            "finished": m.get("finished") or status.get("finished"),
            "env": run_environment(folder, m, runs_dir),
            "path": str(folder),
            **_finetune_keys(cfg),
            "pretrain_steps": pre_steps,
            "data": m.get("data_root"),
            "data_fingerprint": m.get("data_fingerprint") or _recorded_fingerprint(folder),
            "comparability": kind,
            "deviations": "; ".join(deviations),
            "old_scoring": metric in SEGMENTATION_METRICS and not isinstance(m.get("scoring"), Mapping),
            "pretrain_run": m_init.get("pretrain_run"),
            "pretrain_corpus": corpus,
        }
        for cls, v in (m.get("per_class") or {}).items():
            row[f"dice:{cls}"] = _float(v)
        rows.append(row)
        for extra in ("nsd", "hd95"):
            # Runs scored with NSD / HD95 as well (metrics.json: mean_nsd, per_class_nsd, mean_hd95 in mm, ...)
            # give one more row each whose metric is nsd / hd95; its per-class columns (same "dice:<class>"
            # names) hold the per-class values.
            if extra not in (m.get("metrics") or ()) or m.get(f"mean_{extra}") is None:
                continue
            extra_row = {k: v for k, v in row.items() if not k.startswith("dice:")}
            extra_row.update({"metric": extra, "score": _float(m.get(f"mean_{extra}"))})
            for cls, v in (m.get(f"per_class_{extra}") or {}).items():
                extra_row[f"dice:{cls}"] = _float(v)
            rows.append(extra_row)
    df = pd.DataFrame(rows)
    for col in RUN_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=object)
    extra = [c for c in df.columns if c not in RUN_COLUMNS]
    df = df[RUN_COLUMNS + extra]
    df.attrs["skipped"] = skipped
    return df


# ==================================================================================================
# Tables
# ==================================================================================================
@dataclass
class Group:
    """The runs of one protocol in one cell (values in percent)."""

    protocol: str
    values: list[float]
    seeds: list[Any]
    preset: str | None = None
    lam: float | None = None
    series: str | None = None
    paths: list[str] = field(default_factory=list)
    envs: list[str] = field(default_factory=list)
    fingerprints: list[str | None] = field(default_factory=list)
    #: scored before the empty-set rules (no ``scoring`` block in metrics.json): marked OLD_SCORING_MARK
    old_scoring: bool = False
    #: leaderboard answers (sslbench/online.py): where each value came from (run folder, date, submission)
    provenance: list[str] = field(default_factory=list)

    @property
    def mixed_env(self) -> bool:
        """The group's runs (or their pre-trainings) ran under more than one torch / monai version."""
        return len(set(self.envs)) > 1

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        if self.n < 2:
            return math.nan
        mu = self.mean
        return math.sqrt(sum((v - mu) ** 2 for v in self.values) / (self.n - 1))

    def label(self) -> str:
        parts = [self.preset] if self.preset else []
        if self.lam is not None and math.isfinite(self.lam):
            parts.append(f"λ={self.lam:g}")
        parts.append(f"p:{self.protocol[:6]}")
        if self.old_scoring:
            parts.append("old scoring")
        return ", ".join(parts)


@dataclass
class Cell:
    """A published value (or none) and the measured protocol groups of one table cell.

    ``kind`` is the comparability of the cell's column: COMPARABLE ("") beside the published value, or one of
    NOT_COMPARABLE (the cell then holds no published value and its groups get no Δ)."""

    metric: str = "dice"
    published: float | None = None
    digits: int = 2
    marks: tuple[str, ...] = ()
    source: str | None = None
    kind: str = COMPARABLE
    groups: list[Group] = field(default_factory=list)

    @property
    def phantom(self) -> bool:
        return self.kind == "phantom"

    @property
    def comparable(self) -> bool:
        return self.kind == COMPARABLE

    @property
    def mixed_data(self) -> bool:
        """The cell's runs read different data (fingerprints that differ; unrecorded ones are not counted)."""
        return len({f for g in self.groups for f in g.fingerprints if f}) > 1

    def published_text(self) -> str:
        if self.published is None:
            return NO_VALUE
        return "".join(self.marks) + f"{self.published:.{self.digits}f}"

    def diff(self, g: Group) -> float | None:
        if not self.comparable or self.published is None:
            return None
        return g.mean - self.published

    def agreement(self, g: Group | None = None) -> str:
        """'green' within 1 point, 'yellow' within 3, 'red' beyond, 'grey' without a measurement,
        'magenta' for phantom data and 'none' for a measurement without a published value."""
        if g is None:
            if not self.groups:
                return "grey"
            g = self.groups[0]
        if self.phantom:
            return "magenta"
        d = self.diff(g)
        if d is None:
            return "none"
        d = abs(round(d, 6))
        return "green" if d <= GREEN_WITHIN else "yellow" if d <= YELLOW_WITHIN else "red"

    def group_text(self, g: Group) -> str:
        s = ("PHANTOM " if self.phantom else "") + f"{g.mean:.2f}"
        if g.n > 1:
            s += f" ± {g.std:.2f}"
        info = []
        d = self.diff(g)
        if d is not None:
            info.append(f"Δ {d:+.2f}")
        info.append(f"n={g.n}")
        s += f" ({', '.join(info)})"
        if g.mixed_env:
            s += f" {MIXED_ENV_MARK}"
        if self.mixed_data:
            s += f" {MIXED_DATA_MARK}"
        if g.old_scoring:
            s += f" {OLD_SCORING_MARK}"
        if len(self.groups) > 1:
            s += f" [{g.label()}]"
        if g.provenance:
            s += " {" + "; ".join(g.provenance) + "}"
        return s

    def text(self) -> str:
        measured = "; ".join(self.group_text(g) for g in self.groups)
        if not self.comparable:
            return measured or NO_VALUE
        if not measured:
            return self.published_text()
        return f"{self.published_text()} / {measured}"


@dataclass
class Row:
    id: str
    label: str
    cells: list[Any]          # Cell, or str for descriptive tables


@dataclass
class Table:
    id: str
    title: str
    caption: str
    row_header: str
    column_ids: list[str]
    headers: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def cell(self, row_id: str, column_id: str) -> Any:
        j = self.column_ids.index(column_id)
        for row in self.rows:
            if row.id == row_id:
                return row.cells[j]
        raise KeyError(f"{self.id}: no row '{row_id}'")

    @property
    def measured(self) -> bool:
        return any(isinstance(c, Cell) and c.groups for r in self.rows for c in r.cells)

    def text_rows(self) -> list[list[str]]:
        return [[r.label] + [c.text() if isinstance(c, Cell) else str(c) for c in r.cells] for r in self.rows]

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.text_rows(), columns=[self.row_header] + self.headers)


def _of_kind(runs_df, kind: str):
    """The rows whose comparability is ``kind`` (a row without one, from a frame built by hand: phantom or
    comparable by its phantom flag)."""
    col = runs_df["phantom"].astype(bool).map({True: "phantom", False: COMPARABLE})
    if "comparability" in runs_df.columns:
        col = runs_df["comparability"].where(runs_df["comparability"].notna(), col)
    return col == kind


def _select(runs_df, *, method: str, task: str, metric: str, kind: str, params: Mapping | None = None):
    if runs_df is None or len(runs_df) == 0:
        return runs_df.iloc[0:0] if runs_df is not None else None
    sel = runs_df[(runs_df["method"] == method) & (runs_df["base_task"] == task) & (runs_df["metric"] == metric)
                  & _of_kind(runs_df, kind)]
    for k, v in (params or {}).items():
        col = "lambda" if k == "lambda" else k
        if col not in sel.columns:
            return sel.iloc[0:0]
        sel = sel[(sel[col].astype(float) - float(v)).abs() < 1e-9]
    return sel


def _groups(sel, value_col: str, scale: float = 100.0) -> list[Group]:
    """The cell's runs grouped by protocol (and by scoring era: records scored before the empty-set rules
    are a group of their own); values times ``scale`` (percent; 1 for HD95 in mm)."""
    if sel is None or len(sel) == 0 or value_col not in sel.columns:
        return []
    sel = sel[sel[value_col].notna()].copy()
    sel["_old"] = sel["old_scoring"].fillna(False).astype(bool) if "old_scoring" in sel.columns else False
    groups = []
    for (protocol, old), part in sel.groupby(["protocol", "_old"], sort=True):
        lam = part["lambda"].dropna()
        groups.append(Group(protocol=str(protocol), values=[scale * float(v) for v in part[value_col]],
                            old_scoring=bool(old),
                            seeds=list(part["seed"]), preset=next(iter(part["preset"].dropna()), None),
                            lam=float(lam.iloc[0]) if len(lam) else None, series=str(part["series"].iloc[0]),
                            paths=list(part["path"]),
                            envs=[str(e) for e in part["env"]] if "env" in part.columns else [],
                            fingerprints=([None if f is None or f != f else str(f) for f in part["data_fingerprint"]]
                                          if "data_fingerprint" in part.columns else []),
                            provenance=list(part["provenance"]) if "provenance" in part.columns else []))
    groups.sort(key=lambda g: (g.old_scoring, -g.n, g.protocol))
    return groups


def _has_runs(runs_df, task: str, metric: str, kind: str, methods: Iterable[str]) -> bool:
    if runs_df is None or len(runs_df) == 0:
        return False
    sel = runs_df[(runs_df["base_task"] == task) & (runs_df["metric"] == metric)
                  & _of_kind(runs_df, kind) & runs_df["method"].isin(list(methods))]
    return len(sel) > 0


def _kind_suffix(kind: str) -> tuple[str, str]:
    """(column id suffix, header suffix) of a comparability kind: ('', '') for comparable runs,
    ('@phantom', ' (phantom)'), ('@tiny-preset', ' (tiny preset)'), ..."""
    if kind == COMPARABLE:
        return "", ""
    return "@" + kind.replace(" ", "-"), f" ({kind})"


def _scale(metric: str) -> float:
    return 1.0 if metric == "hd95" else 100.0


def _fmt_title(spec: Mapping) -> str:
    return f"Table {spec['number']}: {spec['title']}" if spec.get("number") else spec["title"]


_PARAM_NAMES = {"lambda": "λ"}

CELL_LEGEND = ("cells: published / measured mean ± std over seeds (Δ = measured - published, n = runs); "
               "Dice and AUC in %")
#: what a column of each NOT_COMPARABLE kind holds (its table note)
KIND_NOTES = {
    "tiny preset": "(tiny preset) columns: runs at --preset tiny (or from a tiny-preset pre-training): small "
                   "model, ROI and schedule for CPUs; never compared with a published number",
    "reduced schedule": "(reduced schedule) columns: runs at the paper preset that fine-tuned (or pre-trained) "
                        "for fewer steps than the recipe; never compared with a published number",
    "other protocol": "(other protocol) columns: runs that changed the published split, labelled cases or "
                      "scoring; never compared with a published number",
}


def _measurement_notes(table: Table) -> list[str]:
    notes = []
    cells = [c for r in table.rows for c in r.cells if isinstance(c, Cell)]
    if any(c.groups for c in cells):
        notes.append(CELL_LEGEND)
    if any(len(c.groups) > 1 for c in cells):
        notes.append("cells listing several [preset, λ, p:hash] groups hold runs of different protocols: each "
                     "group is shown separately and never averaged with another")
    if any(c.phantom and c.groups for c in cells):
        notes.append("PHANTOM: measured on procedurally generated phantom data, not the real dataset; never "
                     "compared with a published number")
    for kind, note in KIND_NOTES.items():
        if any(c.kind == kind and c.groups for c in cells):
            notes.append(note)
    if any(c.metric == "hd95" and c.groups for c in cells):
        notes.append("HD95 columns: 95th-percentile Hausdorff distance in mm (lower is better), mean over cases")
    if any(g.old_scoring for c in cells for g in c.groups):
        notes.append(f"{OLD_SCORING_MARK}: {OLD_SCORING_NOTE}")
    notes += environment_notes([g for c in cells for g in c.groups])
    if any(c.mixed_data for c in cells):
        notes.append(f"{MIXED_DATA_MARK}: this cell's runs read different data (another root or changed files: "
                     f"their data_fingerprint differ)")
    return notes


def environment_notes(groups: Sequence[Group]) -> list[str]:
    """Notes that say when measured groups ran under different torch / monai versions (none when they agree).

    A group mixing environments is marked MIXED_ENV_MARK in its cell; a table whose groups each ran under one
    environment, but not all the same, gets a note listing the environments and how many runs each holds."""
    runs = {(path, env) for g in groups for path, env in zip(g.paths, g.envs)}   # a run fills several rows
    counts: dict[str, int] = {}
    for _, env in runs:
        counts[env] = counts.get(env, 0) + 1
    if len(counts) < 2:
        return []
    listing = "; ".join(f"{e} ({n} run{'s' if n > 1 else ''})" for e, n in sorted(counts.items()))
    notes = [f"MIXED ENVIRONMENTS: the measured runs of this table ran under {len(counts)} package environments: "
             f"{listing}; numbers from different environments are not a like-for-like comparison"]
    if any(g.mixed_env for g in groups):
        notes.append(f"{MIXED_ENV_MARK}: this group's runs (or their pre-trainings) ran under different torch / "
                     "monai versions")
    return notes


def _results_table(spec: Mapping, runs_df, online_df=None) -> Table:
    online = bool(spec.get("online"))
    if online:          # a leaderboard table: filled by the recorded answers only, never by validation records
        runs_df = online_df
    measured = spec["measured"] or (online and runs_df is not None and len(runs_df) > 0)
    spec_rows = list(spec["rows"])
    if online and measured:      # a method answered for without a published row gets a row of its own
        spec_rows += [{"id": m, "label": m, "method": m, "cells": {}}
                      for m in sorted(set(runs_df["method"]) - {r["method"] for r in spec_rows})]
    methods = {r["method"] for r in spec_rows}
    cols: list[tuple[dict, str]] = []
    for col in spec["columns"]:
        cols.append((col, COMPARABLE))
        cols += [(col, kind) for kind in NOT_COMPARABLE
                 if measured and _has_runs(runs_df, col["task"], col["metric"], kind, methods)]
    rows = []
    for r in spec_rows:
        cells = []
        cls = r.get("class")
        value_col = "score" if cls in (None, "mean") else f"dice:{cls}"
        for col, kind in cols:
            cell = Cell(metric=col["metric"], kind=kind, digits=spec["digits"])
            pub = r["cells"].get(col["id"])
            if pub is not None and kind == COMPARABLE:
                cell.published = float(pub["value"])
                cell.digits = int(pub.get("digits", spec["digits"]))
                cell.marks = tuple(pub["marks"])
                cell.source = pub["source"]
            if measured:
                sel = _select(runs_df, method=r["method"], task=col["task"], metric=col["metric"], kind=kind,
                              params=r.get("params", spec.get("params")))
                cell.groups = _groups(sel, value_col, _scale(col["metric"]))
            cells.append(cell)
        rows.append(Row(id=r["id"], label="".join(r.get("marks", ())) + r["label"], cells=cells))
    table = Table(id=spec["id"], title=_fmt_title(spec), caption=spec["caption"], row_header=spec["row_header"],
                  column_ids=[c["id"] + _kind_suffix(k)[0] for c, k in cols],
                  headers=[c["header"] + _kind_suffix(k)[1] for c, k in cols], rows=rows)
    notes = [f"Source: {spec['source']}. Evaluated on: {spec['evaluated_on']}."]
    if spec["measured"] and spec.get("params"):
        notes.append("Measured runs counted: " + ", ".join(f"{_PARAM_NAMES.get(k, k)} = {v:g}"
                                                          for k, v in spec["params"].items()) + " only.")
    notes += [f"{mark}: {meaning}" for mark, meaning in (spec.get("marks_legend") or {}).items()]
    if not measured and spec.get("measured_note"):
        notes.append("Not measured: " + spec["measured_note"])
    if online and measured:
        notes.append(f"Measured: the leaderboards' answers recorded in {runs_df.attrs.get('file', 'the online file')} "
                     "(sslbench report --online); the braces after each value name its leaderboard, run folder, date "
                     "and submission id; a run stands beside the published number only at the published protocol on real data")
    table.notes = notes + _measurement_notes(table)
    return table


def _datasets_table(spec: Mapping) -> Table:
    headers = ["Stage", "Modality", "Task", "Train", "Valid.", "sslbench task"]
    rows = [Row(id=f"{r['stage']}:{r['dataset']}", label=r["dataset"],
                cells=[r["stage"], r["modality"], r["task"], str(r["train"]), str(r["valid"]),
                       r["sslbench_task"] or NO_VALUE]) for r in spec["rows"]]
    notes = [f"Source: {spec['source']}."] + [f"{r['dataset']} ({r['stage']}): {r['note']}" for r in spec["rows"]
                                               if r.get("note")]
    return Table(id=spec["id"], title=_fmt_title(spec), caption=spec["caption"], row_header="Dataset",
                 column_ids=["stage", "modality", "task", "train", "valid", "sslbench_task"], headers=headers,
                 rows=rows, notes=notes)


def _task_title(name: str, runs_df) -> str:
    real = runs_df[(runs_df["base_task"] == name) & ~runs_df["phantom"].astype(bool)] if len(runs_df) else runs_df
    if real is not None and len(real):
        return str(real["task_title"].iloc[0])
    try:
        return recipes.load_task(name)["title"]
    except SSLBenchError:
        return name


def _comparison_table(spec: Mapping, tables: Mapping[str, Mapping], runs_df) -> Table:
    import pandas as pd

    if runs_df is None:
        runs_df = pd.DataFrame(columns=RUN_COLUMNS)
    methods = list(spec["methods"])
    tasks = [dict(t) for t in spec["tasks"]]
    if len(runs_df):
        methods += sorted(set(runs_df["method"]) - set(methods))
        known = {t["task"] for t in tasks}
        for name in sorted(set(runs_df["base_task"]) - known):
            metric = str(runs_df[runs_df["base_task"] == name]["metric"].iloc[0])
            tasks.append({"task": name, "header": _task_title(name, runs_df), "metric": metric})
    if len(runs_df):
        # HD95 (mm; no published value in the supplement): a column after the task's own where runs record it
        with_hd95 = []
        for t in tasks:
            with_hd95.append(t)
            if t["metric"] != "hd95" and len(runs_df[(runs_df["base_task"] == t["task"]) & (runs_df["metric"] == "hd95")]):
                with_hd95.append({"task": t["task"], "header": f"{t['header']} HD95 (mm)", "metric": "hd95"})
        tasks = with_hd95
    cols: list[tuple[dict, str]] = []
    for t in tasks:
        cols.append((t, COMPARABLE))
        cols += [(t, kind) for kind in NOT_COMPARABLE if _has_runs(runs_df, t["task"], t["metric"], kind, methods)]
    published = {}
    for p in spec["published"]:
        src = tables[p["ref"]["table"]]
        row = next(r for r in src["rows"] if r["id"] == str(p["ref"]["row"]))
        cell = row["cells"][p["ref"]["column"]]
        published[(p["method"], p["task"])] = (cell, src)
    method_params = spec.get("method_params") or {}
    rows = []
    for method in methods:
        cells = []
        for t, kind in cols:
            cell = Cell(metric=t["metric"], kind=kind)
            ref = published.get((method, t["task"])) if t["metric"] != "hd95" else None
            if ref is not None and kind == COMPARABLE:
                pub, src = ref
                cell.published = float(pub["value"])
                cell.digits = int(pub.get("digits", src["digits"]))
                cell.marks = tuple(pub["marks"])
                cell.source = pub["source"]
            cell.groups = _groups(_select(runs_df, method=method, task=t["task"], metric=t["metric"],
                                          kind=kind, params=method_params.get(method)), "score", _scale(t["metric"]))
            cells.append(cell)
        rows.append(Row(id=method, label=method, cells=cells))
    table = Table(id=spec["id"], title=spec["title"], caption=spec["caption"], row_header="Method",
                  column_ids=[t["task"] + (":hd95" if t["metric"] == "hd95" else "") + _kind_suffix(k)[0]
                              for t, k in cols],
                  headers=[t["header"] + _kind_suffix(k)[1] for t, k in cols], rows=rows)
    sources = sorted({c.source for r in rows for c in r.cells if c.source})
    table.notes = ["Published cells: " + " | ".join(sources) + "."]
    table.notes += [f"Measured {m} runs counted: " + ", ".join(f"{_PARAM_NAMES.get(k, k)} = {v:g}" for k, v in p.items())
                    + " only (the published setting)." for m, p in method_params.items()]
    table.notes += _measurement_notes(table)
    return table


def build_tables(published: Mapping, runs_df=None, online_df=None) -> list[Table]:
    """The leaderboard tables, in the order of the YAML (Table 1, 3, 4, 5, 6, 7, then the comparison).

    Each result cell holds its published value and the measured protocol groups (see the module docstring
    for how protocols and phantoms are kept apart). ``online_df`` (sslbench/online.py) fills the table marked
    ``online: true`` (Table 6) instead of the run records.
    """
    import pandas as pd

    if runs_df is None:
        runs_df = pd.DataFrame(columns=RUN_COLUMNS)
    specs = {t["id"]: t for t in published["tables"]}
    out = []
    for spec in published["tables"]:
        if spec["kind"] == "datasets":
            out.append(_datasets_table(spec))
        elif spec["kind"] == "results":
            out.append(_results_table(spec, runs_df, online_df))
        else:
            out.append(_comparison_table(spec, specs, runs_df))
    from .efficiency import label_efficiency_tables

    return out + label_efficiency_tables(runs_df)      # generated from the records alone (no published numbers)


# ==================================================================================================
# Rendering
# ==================================================================================================
_LATEX_ESCAPE = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}
_LATEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "λ": r"$\lambda$", "†": r"$^\dagger$", "—": "---",
                  "×": r"$\times$", "‡": r"$^\ddagger$", "≥": r"$\geq$", "≤": r"$\leq$", "·": r"$\cdot$"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_ESCAPE.get(ch, ch) for ch in str(text))
    for k, v in _LATEX_UNICODE.items():
        out = out.replace(k, v)
    return out


def render_table(table: Table, fmt: str) -> str:
    """One table as Markdown, LaTeX, HTML (tabulate) or CSV (pandas)."""
    from tabulate import tabulate

    if fmt not in FORMATS:
        raise RecipeError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    headers = [table.row_header] + table.headers
    body = table.text_rows()
    if fmt == "csv":
        return table.frame().to_csv(index=False)
    if fmt == "md":
        grid = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)
        notes = "".join(f"- {n}\n" for n in table.notes)
        return f"### {table.title}\n\n{grid}\n\n{table.caption}\n\n{notes}"
    if fmt == "latex":
        grid = tabulate([[latex_escape(c) for c in r] for r in body], headers=[latex_escape(h) for h in headers],
                        tablefmt="latex_raw", disable_numparse=True)
        notes = "".join(f"\\par\\footnotesize {latex_escape(n)}\n" for n in table.notes)
        return (f"% {latex_escape(table.title)}\n\\begin{{table}}[ht]\n\\centering\n"
                f"\\caption{{{latex_escape(table.caption)}}}\n\\label{{tab:sslbench-{table.id}}}\n"
                f"\\resizebox{{\\linewidth}}{{!}}{{%\n{grid}}}\n{notes}\\end{{table}}\n")
    grid = tabulate(body, headers=headers, tablefmt="html", disable_numparse=True)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
    return (f'<section id="{html.escape(table.id)}">\n<h3>{html.escape(table.title)}</h3>\n{grid}\n'
            f'<p class="caption">{html.escape(table.caption)}</p>\n<ul class="notes">{notes}</ul>\n</section>\n')


def render(tables: Sequence[Table], fmt: str) -> str:
    """All tables in one text (CSV tables are separated by '# <title>' lines)."""
    if fmt == "csv":
        return "\n".join(f"# {t.title}\n{render_table(t, 'csv')}" for t in tables)
    return "\n".join(render_table(t, fmt) for t in tables)


_RICH_STYLE = {"green": "green", "yellow": "yellow", "red": "red", "grey": "grey50", "magenta": "magenta",
               "none": "cyan"}


def print_rich(tables: Sequence[Table], console=None) -> None:
    """Tables in the terminal, measured values coloured by agreement with the published one (green within
    1 point, yellow within 3, red beyond; grey: no measurement; magenta: PHANTOM), then mmpretrain-style
    regression rows (published vs measured) for every measured group."""
    from rich import box
    from rich.console import Console
    from rich.table import Table as RichTable
    from rich.text import Text

    console = console or Console()
    regression = []
    for table in tables:
        # Text, not markup: labels such as "[tiny, λ=1, p:…]" or "[10]" must print as they are.
        rt = RichTable(title=Text(table.title, style="bold"), caption=Text("\n".join([table.caption] + table.notes)),
                       box=box.SIMPLE_HEAD, caption_justify="left", title_justify="left")
        rt.add_column(Text(table.row_header), style="bold")
        for h in table.headers:
            apart = any(h.endswith(f"({k})") for k in NOT_COMPARABLE[1:])
            rt.add_column(Text(h), justify="right",
                          style="magenta" if h.endswith("(phantom)") else "cyan" if apart else None)
        for row in table.rows:
            out = [Text(row.label)]
            for j, c in enumerate(row.cells):
                if not isinstance(c, Cell):
                    out.append(Text(str(c)))
                    continue
                text = Text()
                if c.comparable:
                    text.append(c.published_text(), style=None if c.groups else _RICH_STYLE["grey"])
                for k, g in enumerate(c.groups):
                    text.append(" / " if k == 0 and c.comparable else "\n" if k else "")
                    text.append(c.group_text(g), style=_RICH_STYLE[c.agreement(g)])
                    regression.append((table.title.split(":")[0], row.label, table.headers[j], c, g))
                if not c.comparable and not c.groups:
                    text.append(NO_VALUE, style=_RICH_STYLE["grey"])
                out.append(text)
            rt.add_row(*out)
        console.print(rt)
    if regression:
        rt = RichTable(title=Text("Regression: published vs measured", style="bold"), box=box.SIMPLE_HEAD,
                       title_justify="left")
        for h in ("table", "row", "column", "published", "measured", "Δ", "n", "preset", "protocol"):
            rt.add_column(h, justify="right" if h in ("published", "measured", "Δ", "n") else "left")
        for tname, rlabel, col, c, g in regression:
            style = _RICH_STYLE[c.agreement(g)]
            d = c.diff(g)
            measured = ("PHANTOM " if c.phantom else "") + f"{g.mean:.2f}" + (f" ± {g.std:.2f}" if g.n > 1 else "")
            rt.add_row(Text(tname), Text(rlabel), Text(col), NO_VALUE if not c.comparable else c.published_text(), Text(measured, style=style),
                       Text(NO_VALUE if d is None else f"{d:+.2f}", style=style), str(g.n), g.preset or "",
                       g.protocol[:12])
        console.print(rt)


# ==================================================================================================
# Plots
# ==================================================================================================
#: report outputs are for everyone to read (mkstemp alone would leave them 0600, the owner's only)
OUTPUT_MODE = 0o644


def write_public(path: str | Path, data: bytes | str) -> None:
    """Write a report output atomically (temporary file, then rename) and world-readable (OUTPUT_MODE)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, OUTPUT_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunError(f"disk full writing {path}") from None
        raise


def _save_png(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.chmod(tmp, OUTPUT_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plot_kind(cell: Cell) -> str:
    """A plot's legend word for a column: 'measured', 'PHANTOM' or the kind ('tiny preset', ...)."""
    return "measured" if cell.comparable else "PHANTOM" if cell.phantom else cell.kind


def plots(tables: Sequence[Table], runs_df, out_dir: str | Path) -> list[Path]:
    """PNG figures where measured data exists: the λ curve with error bars (Table 3) and per-structure
    bars of MM-WHS (Table 5), measured vs published. Returns the paths written ([] without matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return []
    out_dir = Path(out_dir)
    written: list[Path] = []
    by_id = {t.id: t for t in tables}

    t3 = by_id.get("table3")
    if t3 is not None and t3.measured:
        fig = Figure(figsize=(5.5 * len(t3.headers), 4))
        FigureCanvasAgg(fig)
        axes = [fig.add_subplot(1, len(t3.headers), j + 1) for j in range(len(t3.headers))]
        for j, ax in enumerate(axes):
            lams = [float(r.id) for r in t3.rows]
            cells = [r.cells[j] for r in t3.rows]
            pub = [(lam, c.published) for lam, c in zip(lams, cells) if c.published is not None]
            if pub:
                ax.plot([p[0] for p in pub], [p[1] for p in pub], "k--o", label="published")
            series: dict[str, list[tuple[float, Group]]] = {}
            for lam, c in zip(lams, cells):
                for g in c.groups:
                    series.setdefault(f"{g.preset or ''} s:{(g.series or g.protocol)[:6]}", []).append((lam, g))
            for name, pts in sorted(series.items()):
                pts.sort(key=lambda p: p[0])
                ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts],
                            yerr=[0.0 if p[1].n < 2 else p[1].std for p in pts], marker="s", capsize=4,
                            label=_plot_kind(cells[0]) + " " + name.strip())
            ax.set_title(t3.headers[j])
            ax.set_xlabel("λ")
            ax.set_ylabel("Dice (%)")
            ax.set_xticks(lams)
            ax.legend(fontsize=7)
        fig.suptitle(t3.title)
        path = out_dir / "table3_lambda.png"
        _save_png(fig, path)
        written.append(path)

    t5 = by_id.get("table5")
    if t5 is not None and t5.measured:
        labels = [r.label for r in t5.rows]
        fig = Figure(figsize=(max(8, 1.2 * len(labels)), 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        bars: list[tuple[str, list[float], list[float]]] = []
        pub = [r.cells[0].published for r in t5.rows]
        bars.append(("published", [math.nan if v is None else v for v in pub], [0.0] * len(pub)))
        for j, header in enumerate(t5.headers):
            keys: dict[str, dict[int, Group]] = {}
            for i, r in enumerate(t5.rows):
                for g in r.cells[j].groups:
                    keys.setdefault(g.protocol, {})[i] = g
            for protocol, by_row in sorted(keys.items()):
                some = next(iter(by_row.values()))
                name = f"{_plot_kind(t5.rows[0].cells[j])} [{some.label()}]"
                bars.append((name, [by_row[i].mean if i in by_row else math.nan for i in range(len(labels))],
                             [by_row[i].std if i in by_row and by_row[i].n > 1 else 0.0 for i in range(len(labels))]))
        width = 0.8 / len(bars)
        for k, (name, values, errs) in enumerate(bars):
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(labels))]
            ax.bar(xs, values, width, yerr=errs, capsize=3, label=name)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Dice (%)")
        ax.set_title(t5.title)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        path = out_dir / "table5_mmwhs_structures.png"
        _save_png(fig, path)
        written.append(path)
    return written


# ==================================================================================================
# Command line
# ==================================================================================================
def fill_hints(runs: str) -> list[str]:
    """The commands that fill the measured columns (printed when no run is found)."""
    return [
        f"no finished fine-tuning runs under {Path(runs) / 'finetune'}: the tables hold the published numbers only.",
        "Fill the measured values (repeat with --seed 0/1/2 for mean ± std):",
        "  Table 3 (λ ablation):    sslbench sweep lambda --task mmwhs   and   sslbench sweep lambda --task btcv",
        "                           (one λ by hand: sslbench run --method voco --task mmwhs --root DIR --set method.params.lambda=0.5)",
        "  Table 5 (MM-WHS organs): sslbench run --method voco --task mmwhs --root DIR",
        "  Table 7 / comparison:    sslbench run --method voco --task msd-spleen --root DIR ;"
        "  sslbench run --method scratch --task btcv --root DIR",
        "  demo on phantoms (reported as PHANTOM, never as the real dataset): sslbench run --method voco --task phantom-mmwhs",
        f"then: sslbench report --runs {runs}",
    ]


def write_outputs(tables: Sequence[Table], runs_df, out_dir: str | Path, fmt: str,
                  source: str | None = None) -> list[Path]:
    """The PNGs, then one file per table (<id>.md|tex|csv), or for html the one self-contained page
    ``index.html`` (every table, the plots inline, notes and provenance: sslbench/report_html.py); each file
    written atomically and world-readable (OUTPUT_MODE)."""
    from .efficiency import label_efficiency_plot

    out_dir = Path(out_dir)
    images = plots(tables, runs_df, out_dir) + label_efficiency_plot(runs_df, out_dir)
    written = []
    if fmt == "html":
        from .report_html import page

        path = out_dir / "index.html"
        write_public(path, page(tables, runs_df, [(p.name, p.read_bytes()) for p in images], source=source))
        written.append(path)
    else:
        for t in tables:
            path = out_dir / f"{t.id}.{EXTENSIONS[fmt]}"
            write_public(path, render_table(t, fmt))
            written.append(path)
    return written + images


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslbench report", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Render the leaderboard tables (published numbers of the VoCo "
                                            "supplement) with the measured values of the run records beside them.",
                                epilog="examples:\n  sslbench report\n  sslbench report --runs runs --format latex\n"
                                       "  sslbench report --format md --out leaderboards/rendered\n"
                                       "  sslbench report --online runs/leaderboards/online.yaml")
    p.add_argument("--runs", default="runs", help="folder of run records (default: runs)")
    p.add_argument("--format", choices=FORMATS + ("rich",), default=None,
                   help="md | latex | html | csv (default: a coloured terminal table on a terminal, else md)")
    p.add_argument("--out", help="write one file per table (html: one page, index.html) and the PNG plots to this "
                                 "folder instead of printing")
    p.add_argument("--published", help=f"leaderboard YAML (default: leaderboards/{DEFAULT_LEADERBOARD})")
    p.add_argument("--online", help="what the leaderboards answered, for Table 6 (default: "
                                    "RUNS/leaderboards/online.yaml when it exists; format: sslbench/online.py)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`sslbench report [--runs DIR] [--format md|latex|html|csv] [--out DIR]`; returns the exit status."""
    try:
        args = _parser().parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        published = load_published(args.published)
        runs_df = collect_runs(args.runs)
        from .online import default_online, load_online

        online_df = load_online(args.online or default_online(args.runs), published, runs_df, args.runs,
                                required=bool(args.online))
        tables = build_tables(published, runs_df, online_df)
        for line in runs_df.attrs.get("skipped", []):
            print(f"skipped: {line}", file=sys.stderr)
        envs = sorted(set(runs_df["env"].dropna())) if len(runs_df) else []
        if len(envs) > 1:
            print(f"warning: the runs under {args.runs} were made under {len(envs)} package environments "
                  f"({'; '.join(envs)}): tables with more than one say so in their notes", file=sys.stderr)
        if args.out:
            fmt = args.format or "md"
            if fmt == "rich":
                raise RecipeError("--format rich: only for the terminal; with --out use md, latex, html or csv")
            for path in write_outputs(tables, runs_df, args.out, fmt, source=args.runs):
                print(f"written: {path}")
        else:
            fmt = args.format or ("rich" if sys.stdout.isatty() else "md")
            if fmt == "rich":
                print_rich(tables)
            elif fmt == "html":                    # the whole page, plots inline
                from .report_html import page

                with tempfile.TemporaryDirectory() as tmp:
                    from .efficiency import label_efficiency_plot

                    images = plots(tables, runs_df, tmp) + label_efficiency_plot(runs_df, tmp)
                    sys.stdout.write(page(tables, runs_df, [(p.name, p.read_bytes()) for p in images],
                                          source=args.runs))
                sys.stdout.flush()
            else:
                sys.stdout.write(render(tables, fmt))
                sys.stdout.flush()
        if len(runs_df) == 0:
            print("\n".join(fill_hints(args.runs)), file=sys.stderr)
        return 0
    except SSLBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
