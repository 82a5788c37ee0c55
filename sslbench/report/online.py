"""What the public leaderboards answered, recorded as data: Table 6's measured rows (issue 24).

Table 6 of the VoCo supplement (BTCV, FLARE23, AMOS22: DSC and NSD on hidden test sets) can only be
measured by a leaderboard. A user who submitted a run's test predictions (``sslbench predict``, then
``sslbench submit``) writes down what the leaderboard answered, one entry per number, in
``<runs>/leaderboards/online.yaml`` (read by ``sslbench report --runs <runs>`` when it exists) or in any
file given with ``sslbench report --online FILE``::

    schema: 1
    entries:
      - leaderboard: btcv            # one of Table 6's leaderboards (btcv, flare23, amos22)
        run: 3f2a9c0d1e2b4a5f-s0     # the fine-tuning run folder (run key + seed) or its run key
        metric: dice                 # one of the leaderboard's Table 6 columns (dice; amos22 also nsd)
        value: 85.12                 # as the leaderboard shows it, in percent
        date: 2026-12-01             # when it answered (YYYY-MM-DD)
        submission: "1234"           # optional: the leaderboard's submission id
        note: "validation phase"     # optional

The file lives beside the runs it names (not in the repository's ``leaderboards/``, which holds the
published numbers and ships with the package): entries point at run folders of that runs root.

Every entry is checked before anything is rendered; the first fault is one line naming the file and the key
(``entries[2].run``): unknown or missing keys, a leaderboard / metric pair Table 6 has no column for, a value
outside 0-100 or one that looks like a fraction (0 < value <= 1), a date that is not a date, lies in the
future or before the run finished, a run that is no finished fine-tuning run under ``<runs>/finetune`` (or
whose task is not the leaderboard's), and a second entry for the same leaderboard, run and metric.

An entry then stands for its run in Table 6: the run's own comparability (``runs.comparability``: only a
run at the paper protocol, on real data, stands beside the published number with a Δ; a phantom run fills
the ``(phantom)`` column and is labelled PHANTOM; the others their labelled columns) and its provenance
(run folder, date, submission id) printed in the cell.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Mapping

from .. import recipes
from ..errors import RecipeError
from ..recipes import S, Spec, check
from ..store.records import try_read_json

#: where ``sslbench report`` looks for the answers when no ``--online`` is given (relative to ``--runs``)
DEFAULT_ONLINE = Path("leaderboards") / "online.yaml"


def default_online(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / DEFAULT_ONLINE


def board_columns(spec: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """(leaderboard, metric) -> column id of a published table whose ``online`` flag is set (its column tasks
    are the leaderboards)."""
    return {(str(c["task"]), str(c["metric"])): str(c["id"]) for c in spec["columns"]}


def _fail(where: str, key: str, expected: str, got: Any = None, show: bool = True) -> None:
    raise RecipeError(f"{where}: key '{key}': expected {expected}" + (f", got {got!r}" if show else ""))


def _date(value: Any, where: str, key: str, today: _dt.date) -> _dt.date:
    if isinstance(value, _dt.datetime):
        value = value.date()
    if isinstance(value, str):
        try:
            value = _dt.date.fromisoformat(value.strip())
        except ValueError:
            _fail(where, key, "a date YYYY-MM-DD", value)
    if not isinstance(value, _dt.date):
        _fail(where, key, "a date YYYY-MM-DD", value)
    if value > today:
        _fail(where, key, f"a date not after today ({today.isoformat()})", value.isoformat())
    return value


def _find_run(runs_df, name: str) -> list[str]:
    """Paths of the runs whose folder name is ``name`` or whose recorded run key is ``name``."""
    paths = []
    for path in dict.fromkeys(runs_df["path"]) if len(runs_df) else ():
        folder = Path(path)
        if folder.name == name:
            paths.append(path)
            continue
        for record in ("status.json", "metrics.json"):
            data = try_read_json(folder / record)
            if isinstance(data, Mapping) and data.get("run_key") == name:
                paths.append(path)
                break
    return paths


#: One entry's own keys, as a recipes.Spec schema (the recipes' validator words the errors); which leaderboard /
#: metric pairs exist (the online table's columns), the date's meaning and the run it names are checked after it.
ENTRY_SCHEMA = Spec(fields={
    "leaderboard": S(str, nonempty=True, required=True),
    "run": S(str, nonempty=True, required=True, expect="a run folder name or run key as a string (quoted)"),
    "metric": S(str, nonempty=True, required=True),
    "value": S(float, minimum=0, maximum=100, required=True, expect="a number in percent, 0-100"),
    "date": S(str, _dt.date, required=True, expect="a date YYYY-MM-DD"),
    "submission": S(str, int, nonempty=True), "note": S(str, int, nonempty=True),
})
ONLINE_SCHEMA = Spec(fields={"schema": Spec(choices=(1,)),
                             "entries": Spec(items=Spec(free=True), nullable=True, required=True)})


def _check_entry(e: Mapping, where: str, key: str, columns: Mapping[tuple[str, str], str],
                 today: _dt.date) -> tuple[float, _dt.date, str]:
    """(value, date, run) of one entry whose own keys are checked (its run is not looked up yet)."""
    check(e, ENTRY_SCHEMA, where, key)
    boards = sorted({b for b, _ in columns})
    pairs = ", ".join(f"{b}/{m}" for b, m in columns)
    board, metric, value = e["leaderboard"], e["metric"], e["value"]
    check(board, Spec(choices=tuple(boards)), where, f"{key}.leaderboard")
    if (board, metric) not in columns:
        _fail(where, f"{key}.metric", f"a metric Table 6 shows for {board} (one of {pairs})", metric)
    if 0 < value <= 1:
        _fail(where, f"{key}.value", f"percent as the leaderboard shows it ({value!r} looks like a fraction: "
                                     f"write {100 * value:g})", show=False)
    date = _date(e["date"], where, f"{key}.date", today)
    return float(value), date, e["run"].strip()


def _entry_run(where: str, key: str, run: str, board: str, date: _dt.date, runs_df, runs_dir: str | Path) -> str:
    """The folder of the one finished fine-tuning run of ``board`` that an entry names, finished by ``date``."""
    found = _find_run(runs_df, run)
    finetune = Path(runs_dir) / "finetune"
    if not found:
        _fail(where, f"{key}.run", f"a finished fine-tuning run under {finetune} (its folder name "
                                   f"<run key>-s<seed>, or its run key)", run)
    if len(found) > 1:
        _fail(where, f"{key}.run", f"one run; {run!r} names {len(found)} ({', '.join(found[:3])}): give the "
                                   f"folder name", show=False)
    path = found[0]
    row = runs_df[runs_df["path"] == path].iloc[0]
    task = str(row["base_task"])
    if task != board:
        _fail(where, f"{key}.run", f"a {board} fine-tuning run ({path} fine-tuned {task})", run)
    try:                 # an answer older than the run cannot be about this run's predictions
        finished = _dt.date.fromisoformat(str(row.get("finished") or "")[:10])
    except ValueError:
        finished = None
    if finished is not None and date < finished:
        _fail(where, f"{key}.date", f"a date on or after the run finished ({finished.isoformat()}, "
                                    f"{Path(path).name})", date.isoformat())
    return path


def validate_online(data: Any, where: str, spec: Mapping[str, Any], runs_df, runs_dir: str | Path,
                    today: _dt.date | None = None) -> list[dict]:
    """The entries of an online-results file, checked (one-line RecipeError naming ``where`` and the key).

    Each returned entry has its run folder resolved (``path``) and its date as ``datetime.date``.
    """
    today = today or _dt.date.today()
    check(data, ONLINE_SCHEMA, where, "")
    entries = data["entries"] or []
    columns = board_columns(spec)
    out: list[dict] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, e in enumerate(entries):
        key = f"entries[{i}]"
        value, date, run = _check_entry(e, where, key, columns, today)
        board, metric = e["leaderboard"], e["metric"]
        path = _entry_run(where, key, run, board, date, runs_df, runs_dir)
        ident = (board, path, metric)
        if ident in seen:
            _fail(where, key, f"one entry per leaderboard, run and metric (entries[{seen[ident]}] has this "
                              f"one: {board}, {run}, {metric})", show=False)
        seen[ident] = i
        out.append({"leaderboard": board, "run": run, "path": path, "metric": metric, "value": value,
                    "date": date, "submission": str(e["submission"]) if "submission" in e else None,
                    "note": str(e["note"]) if "note" in e else None, "column": columns[(board, metric)]})
    return out


def provenance(entry: Mapping[str, Any]) -> str:
    """The cell's provenance of one answer: run folder, date, submission id (and note)."""
    parts = [f"run {Path(entry['path']).name}", entry["date"].isoformat()]
    if entry.get("submission"):
        parts.append(f"submission {entry['submission']}")
    if entry.get("note"):
        parts.append(str(entry["note"]))
    return f"{entry['leaderboard']}: " + ", ".join(parts)


def online_frame(entries: list[dict], runs_df):
    """One row per entry, shaped like ``runs.collect_runs``'s rows (so the tables select and group them):
    the run's own row (method, protocol, comparability, phantom, environment...) with ``metric`` and ``score``
    (a fraction, like the records) from the leaderboard, ``base_task`` the leaderboard, and ``provenance``."""
    import pandas as pd

    rows = []
    for e in entries:
        run_rows = runs_df[runs_df["path"] == e["path"]]
        base = run_rows[run_rows["metric"] == "dice"] if (run_rows["metric"] == "dice").any() else run_rows
        row = {k: v for k, v in base.iloc[0].to_dict().items() if not str(k).startswith("dice:")}
        row.update({"metric": e["metric"], "score": e["value"] / 100.0, "base_task": e["leaderboard"],
                    "mean_dice": e["value"] / 100.0 if e["metric"] == "dice" else float("nan"),
                    "old_scoring": False, "provenance": provenance(e), "online_date": e["date"].isoformat(),
                    "online_submission": e["submission"]})
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(runs_df.columns.drop([c for c in runs_df.columns
                                                               if str(c).startswith("dice:")]))
                      + ["provenance", "online_date", "online_submission"])
    return df


def load_online(path: str | Path, published: Mapping[str, Any], runs_df, runs_dir: str | Path,
                required: bool = True, today: _dt.date | None = None):
    """The online answers of ``path`` as a frame for Table 6 (``online_frame``), validated; None when the file
    is absent and not ``required`` (the default location). ``df.attrs['file']`` names the file."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise RecipeError(f"{path}: online results file not found (expected YAML with 'entries'; see "
                              f"sslbench/report/online.py)")
        return None
    spec = next((t for t in published["tables"] if t.get("online")), None)
    if spec is None:
        raise RecipeError(f"{published.get('_file', 'leaderboard')}: no table is marked 'online: true' for "
                          f"{path}'s entries")
    entries = validate_online(recipes._read_yaml(path), str(path), spec, runs_df, runs_dir, today=today)
    df = online_frame(entries, runs_df)
    df.attrs["file"] = str(path)
    return df
