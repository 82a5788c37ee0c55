"""The published numbers: the leaderboard YAML (``leaderboards/voco_supplement.yaml``: the VoCo supplement's
Tables 1, 3-7, each cell with its source), loaded and validated with one-line errors naming the file and the key.
Nothing here is measured; the report's tables (sslbench/report/tables.py) put the run records beside it."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .. import recipes
from ..errors import RecipeError

DEFAULT_LEADERBOARD = "voco_supplement.yaml"
METRICS = ("dice", "auc", "nsd")


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
