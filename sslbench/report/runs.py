"""The measured numbers: the finished fine-tuning records under ``<runs>/finetune`` collected into one
DataFrame (``collect_runs``), each row with the one rule that decides where it may stand (``comparability``).

Records are read through the store (sslbench/store/records.py: metrics.json, status.json, recipe.yaml, env.json,
data.json) and their protocols hashed by sslbench/store/run_key.py; nothing here parses or hashes on its own.
"""
from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

from .. import recipes
from ..errors import SSLBenchError
from ..store import run_key
from ..store.records import try_read_json, try_read_recipe

#: Columns every frame from collect_runs has, even when no run was found.
RUN_COLUMNS = ["task", "task_title", "base_task", "method", "method_recipe", "variant", "seed", "preset",
               "protocol", "series", "phantom", "metric", "mean_dice", "score", "lambda",
               "n_cases", "finished", "env", "path", "labeled_cases", "finetune_protocol", "finetune_family",
               "pretrain_steps", "data", "data_fingerprint", "comparability", "deviations", "old_scoring",
               "pretrain_run", "pretrain_corpus"]

#: Where a measured run may stand (see ``comparability``): "" = beside the published number, with a Δ; any other
#: kind fills its own column ``<header> (<kind>)``, never compared with a published number. In priority order:
#: a run that is several of them is filed under the first.
NOT_COMPARABLE = ("phantom", "tiny preset", "reduced schedule", "other protocol")
COMPARABLE = ""
#: task.data keys that define the published split, and task.evaluate keys that define how a metric is scored
SPLIT_KEYS = ("datalist", "train_split", "val_split", "val_ids", "val_last", "val_fold", "folds_dir",
              "pretrain_fraction")
SCORING_KEYS = ("empty", "hd95_empty", "nsd_tolerance")
SEGMENTATION_METRICS = ("dice", "nsd", "hd95")


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
    pre = try_read_json(folder / "metrics.json") if folder is not None else None
    if not isinstance(pre, Mapping):
        return bool(init.get("phantom")), None
    steps = pre.get("steps")
    return bool(init.get("phantom") or pre.get("phantom")), steps if isinstance(steps, int) else None


def _pretrain_recipe(metrics: Mapping, runs_dir: Path) -> dict | None:
    """The recipe of the pre-training a fine-tuning started from."""
    folder = _pretrain_folder(metrics, runs_dir)
    return try_read_recipe(folder) if folder is not None else None


#: The packages whose versions name a run's environment in the report (env.json keys).
ENV_PACKAGES = ("torch", "monai")
UNRECORDED_ENV = "versions unrecorded"


def _env_of(folder: Path) -> str:
    """'torch 2.14.1 + monai 1.6.1' from a run folder's env.json (UNRECORDED_ENV without one)."""
    env = try_read_json(folder / "env.json")
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


def _protocol_keys(cfg: Mapping, metrics: Mapping, runs_dir: Path, pre: Mapping | None) -> tuple[str, str] | None:
    """(protocol, series) of a run (store.run_key.seed_free_protocols: a record of today's own ``protocol``);
    ``series`` also leaves out λ. ``pre``: the recipe of the pre-training it started from
    (:func:`_init_pretraining`). The number of processes of the fine-tuning and of its pre-training (their
    metrics.json ``world_size``) is part of the protocol where there were several.

    None when the pre-training a run started from cannot be read (its recorded hash includes its seed).
    """
    init = cfg.get("init")
    pre_world = 1
    if isinstance(init, Mapping) and init.get("source") == "pretrain" and pre is None:
        return None
    if isinstance(init, Mapping) and init.get("source") == "file" and pre is not None:
        cfg = {**cfg, "init": {**init, "source": "pretrain"}}   # named like a start from `sslbench run`
    if pre is not None:
        folder = _pretrain_folder(metrics, runs_dir)
        pre_metrics = try_read_json(folder / "metrics.json") if folder is not None else None
        pre_world = _world_size(pre_metrics)
    return run_key.seed_free_protocols(cfg, pre, world_size=_world_size(metrics), pretrain_world_size=pre_world)


def _init_pretraining(cfg: Mapping | None, metrics: Mapping, runs_dir: Path) -> dict | None:
    """The recipe of the recorded pre-training a fine-tuning started from, or None.

    ``sslbench run`` hands its own pre-training over (init source ``pretrain``). ``finetune --init FILE`` records
    the file's hash, and, when the file is the backbone of a recorded pre-training, that run's folder and run key
    (metrics.json ``init.pretrain_run`` / ``init.run_key``: protocol/runs.py checkpoint_provenance). Such a start
    is then named like ``run``'s starts: by that pre-training's protocol (seed left out), so fine-tunings from two
    executions of one pre-training recipe join one protocol, as the seeds of ``run`` do. (``finetune`` and ``run``
    records still differ in ``run.label``, which ``finetune --method`` sets: the two commands' runs stay apart.)
    The file must be that run's ``checkpoints/backbone.pt``, its folder found beside the record and, where both
    recorded one (records before 2026-12-04 did not), hold the run key the fine-tuning names; otherwise the file's
    hash stays its name."""
    init = cfg.get("init") if isinstance(cfg, Mapping) else None
    if not isinstance(init, Mapping) or init.get("source") not in ("pretrain", "file"):
        return None
    if init.get("source") == "pretrain":
        return _pretrain_recipe(metrics, runs_dir)
    m_init = metrics.get("init") if isinstance(metrics.get("init"), Mapping) else {}
    folder = _pretrain_folder(metrics, runs_dir)
    pre_metrics = try_read_json(folder / "metrics.json") if folder is not None else None
    if not isinstance(pre_metrics, Mapping) or pre_metrics.get("kind", "pretrain") != "pretrain":
        return None
    if m_init.get("path") and Path(str(m_init["path"])).name != "backbone.pt":
        return None          # another file of that folder (a hand-placed or a training checkpoint): its hash
    if m_init.get("run_key") and pre_metrics.get("run_key") and pre_metrics.get("run_key") != m_init.get("run_key"):
        return None          # the folder holds another run than the one the fine-tuning started from
    return try_read_recipe(folder)


def _world_size(metrics: Any) -> int:
    try:
        return int(metrics.get("world_size") or 1) if isinstance(metrics, Mapping) else 1
    except (TypeError, ValueError):
        return 1


def _finetune_keys(cfg: Mapping | None) -> dict[str, Any]:
    """labeled_cases, and the two seed-free hashes of what the fine-tuning itself did
    (store.run_key.finetune_protocols): ``finetune_protocol``, and ``finetune_family`` without
    ``task.finetune.labeled_cases`` (what a label-efficiency curve joins). See sslbench/report/efficiency.py."""
    if not isinstance(cfg, Mapping):
        return {"labeled_cases": None, "finetune_protocol": None, "finetune_family": None}
    labeled = ((cfg.get("task") or {}).get("finetune") or {}).get("labeled_cases")
    protocol, family = run_key.finetune_protocols(cfg)
    return {"labeled_cases": labeled, "finetune_protocol": protocol, "finetune_family": family}


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
    data = try_read_json(folder / "data.json")
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


def _finished_records(runs_dir: Path, skipped: list[str]) -> Iterator[tuple[Path, Mapping, Mapping]]:
    """(folder, status, metrics) of every finished fine-tuning record under ``runs_dir/finetune/**``; folders
    whose metrics.json cannot be used are listed in ``skipped``."""
    base = runs_dir / "finetune"
    for mfile in sorted(base.rglob("metrics.json")) if base.is_dir() else []:
        folder = mfile.parent
        status = try_read_json(folder / "status.json")
        if not isinstance(status, Mapping) or status.get("state") != "finished":
            continue
        m = try_read_json(mfile)
        if not isinstance(m, Mapping):
            skipped.append(f"{mfile}: not readable JSON")
            continue
        if m.get("kind", "finetune") != "finetune":
            continue
        if not m.get("task") or not m.get("method"):
            skipped.append(f"{mfile}: no task or method recorded")
            continue
        yield folder, status, m


def scored_alike_by_the_rules(m: Mapping, metric: str) -> bool:
    """Whether a record scored before the empty-set rules of 2026-12-03 (no ``scoring`` block) provably has the
    scores the rules would give it: a Dice record in which every case scored every class with a number.

    Before the rules a class absent from a case's truth scored NaN (MONAI ``compute_dice(ignore_empty=True)``),
    whatever the prediction; under them it scores 0 where the prediction holds it and NaN where it does not
    (``task.evaluate.empty``). That is the only difference: a class present in the truth scored the same Dice
    before and after, an empty prediction 0 in both. So a record whose per-case rows (metrics.json ``cases``)
    hold a finite Dice for every class of ``per_class`` in every one of its ``n_cases`` cases had no empty truth,
    and is scored as the rules score it. NSD (computed otherwise since) and HD95 (new) never qualify."""
    if metric != "dice" or m.get("metric", "dice") != "dice":
        return False
    classes, cases = m.get("per_class"), m.get("cases")
    if not isinstance(classes, Mapping) or not classes or not isinstance(cases, list) or not cases:
        return False
    if m.get("n_cases") != len(cases):
        return False
    for row in cases:
        if not isinstance(row, Mapping):
            return False
        for cls in classes:
            v = row.get(cls)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return False
    return True


def _pretraining_phantom(pre_cfg: Mapping | None, phantom: bool) -> bool:
    """Whether any data a fine-tuning read was a phantom: ``phantom`` so far, or the recipe.yaml of the
    pre-training it started from (``pre_cfg``) says so."""
    if isinstance(pre_cfg, Mapping):            # what the pre-training read, from its own recipe.yaml too
        pre_data = pre_cfg.get("data") if isinstance(pre_cfg.get("data"), Mapping) else {}
        pre_corpus = pre_cfg.get("corpus") if isinstance(pre_cfg.get("corpus"), Mapping) else {}
        phantom = phantom or bool(pre_data.get("phantom") or pre_corpus.get("phantom"))
    return phantom


def _run_row(folder: Path, status: Mapping, m: Mapping, runs_dir: Path) -> dict:
    """The Dice (or the run's own metric) row of one finished fine-tuning record (collect_runs' columns)."""
    cfg = try_read_recipe(folder)
    pre_cfg = _init_pretraining(cfg, m, runs_dir)        # read once: the protocol, PHANTOM and comparability use it
    keys = _protocol_keys(cfg, m, runs_dir, pre_cfg) if cfg is not None else None
    recorded = str(m.get("protocol") or status.get("protocol") or folder.name)
    protocol, series = keys if keys is not None else (recorded, recorded)
    params = (((cfg or {}).get("method") or {}).get("params") or {}) if cfg else {}
    metric = str(m.get("metric") or "dice")
    task_cfg = (cfg or {}).get("task") or {}
    pre_phantom, pre_steps = _pretrain_facts(m, runs_dir)
    phantom = (bool(m.get("phantom")) or bool(task_cfg.get("phantom") if isinstance(task_cfg, Mapping) else False)
               or pre_phantom)
    phantom = _pretraining_phantom(pre_cfg, phantom)
    kind, deviations = comparability(cfg, m, phantom=phantom, pretrain_cfg=pre_cfg)
    m_init = m.get("init") if isinstance(m.get("init"), Mapping) else {}
    corpus = ((pre_cfg or {}).get("corpus") or {}).get("name") if isinstance((pre_cfg or {}).get("corpus"), Mapping) \
        else m_init.get("corpus")
    row = {
        "task": m["task"], "task_title": m.get("task_title") or m["task"], "base_task": _base_task(m["task"], cfg),
        "method": m["method"], "method_recipe": m.get("method_recipe") or m["method"], "variant": m.get("variant"),
        "seed": m.get("seed"), "preset": m.get("preset"),
        "protocol": protocol, "series": series, "phantom": phantom,
        "metric": metric, "mean_dice": _float(m.get("mean_dice")), "score": _float(m.get(f"mean_{metric}")),
        "lambda": _float(params.get("lambda")) if isinstance(params, Mapping) else math.nan,
        "n_cases": m.get("n_cases"), "finished": m.get("finished") or status.get("finished"),
        "env": run_environment(folder, m, runs_dir), "path": str(folder),
        **_finetune_keys(cfg),
        "pretrain_steps": pre_steps,
        "data": m.get("data_root"), "data_fingerprint": m.get("data_fingerprint") or _recorded_fingerprint(folder),
        "comparability": kind, "deviations": "; ".join(deviations),
        "old_scoring": (metric in SEGMENTATION_METRICS and not isinstance(m.get("scoring"), Mapping)
                        and not scored_alike_by_the_rules(m, metric)),
        "pretrain_run": m_init.get("pretrain_run"), "pretrain_corpus": corpus,
    }
    for cls, v in (m.get("per_class") or {}).items():
        row[f"dice:{cls}"] = _float(v)
    return row


def _extra_rows(row: Mapping, m: Mapping) -> list[dict]:
    """Runs scored with NSD / HD95 as well (metrics.json: mean_nsd, per_class_nsd, mean_hd95 in mm, ...) give
    one more row each whose metric is nsd / hd95; its per-class columns (same "dice:<class>" names) hold the
    per-class values."""
    rows = []
    for extra in ("nsd", "hd95"):
        if extra not in (m.get("metrics") or ()) or m.get(f"mean_{extra}") is None:
            continue
        extra_row = {k: v for k, v in row.items() if not k.startswith("dice:")}
        extra_row.update({"metric": extra, "score": _float(m.get(f"mean_{extra}")),
                          # NSD / HD95 of a record before the rules never join (scored_alike_by_the_rules)
                          "old_scoring": not isinstance(m.get("scoring"), Mapping)})
        for cls, v in (m.get(f"per_class_{extra}") or {}).items():
            extra_row[f"dice:{cls}"] = _float(v)
        rows.append(extra_row)
    return rows


def collect_runs(runs_dir: str | Path):
    """One row per finished fine-tuning run under ``runs_dir/finetune/**`` (a pandas DataFrame).

    Columns: RUN_COLUMNS plus ``dice:<class>`` per foreground class (fractions, as recorded). ``env`` names the
    torch / monai versions of the run and of its pre-training (from their env.json, see run_environment). A run that
    records NSD too (``metrics`` lists ``nsd``) has a second row with ``metric`` nsd, ``score`` its mean_nsd
    and its per-class NSD in the ``dice:<class>`` columns; one recording HD95 a row with ``metric`` hd95 (mm).
    ``comparability`` is the run's kind from ``comparability`` ("" = may stand beside a published number),
    ``deviations`` its reasons; ``old_scoring`` marks a segmentation record scored before the empty-set rules
    (no ``scoring`` block); ``pretrain_run`` / ``pretrain_corpus`` name the pre-training it started from.
    ``protocol`` is the run's protocol hash (recomputed from recipe.yaml: a record of today's own, see the
    package docstring), ``series`` the protocol without λ (what a λ curve joins), ``data`` / ``data_fingerprint`` the root and the
    fingerprint of the data it read (metrics.json or data.json; None before runs recorded them), ``score`` the
    recorded mean of the run's metric (``mean_dice`` for Dice). Unreadable folders are skipped and listed in
    ``df.attrs['skipped']``.
    """
    import pandas as pd

    runs_dir = Path(runs_dir)
    rows: list[dict] = []
    skipped: list[str] = []
    for folder, status, m in _finished_records(runs_dir, skipped):
        row = _run_row(folder, status, m, runs_dir)
        rows += [row] + _extra_rows(row, m)
    df = pd.DataFrame(rows)
    for col in RUN_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=object)
    extra = [c for c in df.columns if c not in RUN_COLUMNS]
    df = df[RUN_COLUMNS + extra]
    df.attrs["skipped"] = skipped
    return df
