"""The report's tables built from data: each table of the leaderboard YAML (sslbench/report/published.py) with
the collected runs (sslbench/report/runs.py) in its cells, then the label-efficiency tables
(sslbench/report/efficiency.py). Protocols are never averaged together: a cell holds one Group per protocol."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .. import recipes
from ..errors import SSLBenchError
from .cells import (MIXED_DATA_MARK, MIXED_ENV_MARK, NO_VALUE, OLD_SCORING_MARK, OLD_SCORING_NOTE, Cell, Group, Row,
                    Table)
from .efficiency import label_efficiency_tables
from .runs import COMPARABLE, NOT_COMPARABLE, RUN_COLUMNS


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
    for how protocols and phantoms are kept apart). ``online_df`` (sslbench/report/online.py) fills the table marked
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
    return out + label_efficiency_tables(runs_df)      # generated from the records alone (no published numbers)
