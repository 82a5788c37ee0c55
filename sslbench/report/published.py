"""The published numbers: the leaderboard YAML (``leaderboards/voco_supplement.yaml``: the VoCo supplement's
Tables 1, 3-7, each cell with its source), loaded and validated with one-line errors naming the file and the key.
Nothing here is measured; the report's tables (sslbench/report/tables.py) put the run records beside it."""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import recipes
from ..errors import RecipeError
from ..recipes import BOOL, S, Spec, check

DEFAULT_LEADERBOARD = "voco_supplement.yaml"
METRICS = ("dice", "auc", "nsd")


def default_leaderboard() -> Path:
    return recipes.recipe_dir("leaderboards") / DEFAULT_LEADERBOARD


# --------------------------------------------------------------------------------------------------
# The file's format, as recipes.Spec schemas (the recipes' own validator words the one-line errors); the rules
# between fields (ids unique, a cell under a column that exists, a reference to a row that exists) follow them.
# --------------------------------------------------------------------------------------------------
def _req(spec: Spec) -> Spec:
    return replace(spec, required=True)


TEXT = S(str, nonempty=True)
NUMBER = S(float, finite=True)
DIGITS = S(int, minimum=0)
PARAMS = Spec(fields={"lambda": NUMBER})
TEXTS = Spec(items=TEXT)
METRIC = Spec(choices=METRICS, required=True)
KINDS = ("datasets", "results", "comparison")
_HEAD = {"id": _req(TEXT), "kind": Spec(choices=KINDS, required=True), "title": _req(TEXT), "caption": _req(TEXT)}

CELL_SCHEMA = Spec(fields={"value": _req(NUMBER), "metric": METRIC, "marks": _req(TEXTS), "source": _req(TEXT),
                           "digits": DIGITS, "note": TEXT})
RESULTS_SCHEMA = Spec(fields={
    **_HEAD, "number": S(int, minimum=1, required=True), "source": _req(TEXT), "row_header": _req(TEXT),
    "evaluated_on": _req(TEXT), "measured": S(bool, required=True), "digits": _req(DIGITS),
    "measured_note": TEXT, "marks_legend": Spec(free=True, values=TEXT), "params": PARAMS, "online": BOOL,
    "columns": Spec(items=Spec(fields={"id": _req(TEXT), "header": _req(TEXT), "task": _req(TEXT), "metric": METRIC}),
                    nonempty=True, required=True),
    # each row's cells are checked against its table's columns (_cells_schema) once the columns are known
    "rows": Spec(items=Spec(fields={"id": _req(TEXT), "label": _req(TEXT), "method": _req(TEXT),
                                    "cells": Spec(free=True, required=True), "params": PARAMS, "class": TEXT,
                                    "marks": TEXTS}), nonempty=True, required=True),
})
DATASETS_SCHEMA = Spec(fields={
    **_HEAD, "number": S(int, minimum=1, required=True), "source": _req(TEXT),
    "rows": Spec(items=Spec(fields={
        **{k: _req(TEXT) for k in ("dataset", "stage", "modality", "task")},
        "train": S(int, minimum=0, required=True), "valid": S(int, minimum=0, required=True),
        "sslbench_task": S(str, nonempty=True, nullable=True, required=True), "source": _req(TEXT), "note": TEXT,
    }), nonempty=True, required=True),
})
COMPARISON_SCHEMA = Spec(fields={
    **_HEAD, "methods": Spec(items=TEXT, nonempty=True, required=True),
    "method_params": Spec(free=True, values=PARAMS),
    "tasks": Spec(items=Spec(fields={"task": _req(TEXT), "header": _req(TEXT), "metric": METRIC}), nonempty=True,
                  required=True),
    "published": Spec(items=Spec(fields={
        "method": _req(TEXT), "task": _req(TEXT),
        "ref": Spec(fields={"table": _req(TEXT), "row": S(str, int, required=True), "column": _req(TEXT)},
                    required=True)}), required=True),
})
TABLE_SCHEMAS = {"results": RESULTS_SCHEMA, "datasets": DATASETS_SCHEMA, "comparison": COMPARISON_SCHEMA}
LEADERBOARD_SCHEMA = Spec(fields={
    "schema": Spec(choices=(1,), required=True), "paper": _req(TEXT),
    "references": Spec(free=True, values=TEXT),
    # each table is checked against the schema of its kind (TABLE_SCHEMAS)
    "tables": Spec(items=Spec(free=True), nonempty=True, required=True),
})


def _fail(where: str, key: str, expected: str, got: Any) -> None:
    raise RecipeError(f"{where}: key '{key}': expected {expected}, got {got!r}")


def _choice(value: Any, choices: Sequence, where: str, key: str) -> None:
    check(value, Spec(choices=tuple(choices)), where, key)


def _unique(ids: Sequence[Any], what: str, where: str, key: str) -> None:
    """The ids of a table's items (``key[i].id``) are unique."""
    seen: set = set()
    for i, item_id in enumerate(ids):
        if item_id in seen:
            _fail(where, f"{key}[{i}].id", f"an id not used by another {what}", item_id)
        seen.add(item_id)


def _results_links(t: dict, where: str, key: str) -> None:
    """Unique column and row ids; each row's cells under the table's columns, with their column's metric."""
    _unique([c["id"] for c in t["columns"]], "column", where, f"{key}.columns")
    _unique([r["id"] for r in t["rows"]], "row", where, f"{key}.rows")
    columns = {c["id"]: c for c in t["columns"]}
    cells_schema = Spec(fields={col_id: CELL_SCHEMA for col_id in columns})
    for r, row in enumerate(t["rows"]):
        check(row["cells"], cells_schema, where, f"{key}.rows[{r}].cells")
        for col_id, cell in row["cells"].items():
            if cell["metric"] != columns[col_id]["metric"]:
                _fail(where, f"{key}.rows[{r}].cells.{col_id}.metric",
                      f"'{columns[col_id]['metric']}' (the metric of column '{col_id}')", cell["metric"])


def _comparison_links(t: dict, where: str, key: str, tables: Mapping[str, dict]) -> None:
    """Each published reference names a method and a task of the comparison and a cell of a results table
    that holds the task's metric."""
    tasks = {task["task"]: task for task in t["tasks"]}
    results = [i for i, s in tables.items() if s["kind"] == "results"]
    for j, ref in enumerate(t["published"]):
        pk = f"{key}.published[{j}]"
        _choice(ref["method"], t["methods"], where, f"{pk}.method")
        _choice(ref["task"], list(tasks), where, f"{pk}.task")
        r = ref["ref"]
        _choice(r["table"], results, where, f"{pk}.ref.table")
        rows = {row["id"]: row for row in tables[r["table"]]["rows"]}
        _choice(str(r["row"]), list(rows), where, f"{pk}.ref.row")
        cells = rows[str(r["row"])]["cells"]
        _choice(r["column"], list(cells), where, f"{pk}.ref.column")
        metric = tasks[ref["task"]]["metric"]
        if cells[r["column"]]["metric"] != metric:
            _fail(where, f"{pk}.ref", f"a {metric} cell (the metric of task '{ref['task']}')",
                  cells[r["column"]]["metric"])


def validate_published(data: Any, where: str) -> None:
    """Raise RecipeError (one line naming the file and the key) when the leaderboard data is malformed."""
    check(data, LEADERBOARD_SCHEMA, where, "")
    seen: dict[str, dict] = {}
    for i, t in enumerate(data["tables"]):
        key = f"tables[{i}]"
        if "kind" not in t:
            raise RecipeError(f"{where}: missing key '{key}.kind' ({_HEAD['kind'].describe()})")
        check(t["kind"], _HEAD["kind"], where, f"{key}.kind")
        check(t, TABLE_SCHEMAS[t["kind"]], where, key)
        if t["id"] in seen:
            _fail(where, f"{key}.id", "an id not used by another table", t["id"])
        if t["kind"] == "results":
            _results_links(t, where, key)
        elif t["kind"] == "comparison":
            _comparison_links(t, where, key, seen)
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
