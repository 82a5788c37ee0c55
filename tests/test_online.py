"""Online leaderboard answers as data (sslbench/report/online.py, issue 24): Table 6 shows each recorded answer
beside the published row with its provenance, in the column its run's comparability gives; a malformed file is
one line naming the file and the key, before anything is rendered."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from sslbench.report import command, online
from sslbench.report.published import load_published
from sslbench.report.runs import _paper_recipe, collect_runs
from sslbench.report.tables import build_tables
from sslbench.errors import RecipeError
from sslbench.store.records import RunRecord
from test_report import write_run

TODAY = dt.date(2026, 12, 3)


def _board_run(runs: Path, task: str, seed: int, method: str = "voco", preset: str = "paper",
               phantom: bool = False) -> Path:
    """A finished fine-tuning run of a leaderboard task, at the task recipe's full schedule unless tiny."""
    path = write_run(runs, task=task, seed=seed, method=method, preset=preset, phantom=phantom)
    rec = RunRecord(path)
    cfg = rec.read_recipe()
    cfg["task"]["finetune"]["epochs"] = _paper_recipe("benchmarks", task)["finetune"]["epochs"]
    cfg["task"]["title"] = task
    if phantom:
        cfg["task"]["extends"] = task
    rec.write_recipe(cfg)
    return path


def _write(path: Path, entries) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"schema": 1, "entries": entries}, sort_keys=False))
    return path


@pytest.fixture
def boards(tmp_path):
    runs = tmp_path / "runs"
    real = _board_run(runs, "btcv", 0)
    phantom = _board_run(runs, "btcv", 1, method="scratch", phantom=True)
    tiny = _board_run(runs, "amos22", 2, preset="tiny")
    amos = _board_run(runs, "amos22", 3)
    entries = [
        {"leaderboard": "btcv", "run": real.name, "metric": "dice", "value": 85.1, "date": "2026-11-30",
         "submission": 42},
        {"leaderboard": "btcv", "run": phantom.name, "metric": "dice", "value": 10.0, "date": dt.date(2026, 12, 1)},
        {"leaderboard": "amos22", "run": tiny.name, "metric": "nsd", "value": 40.5, "date": "2026-12-02",
         "note": "validation phase"},
        {"leaderboard": "amos22", "run": amos.name, "metric": "dice", "value": 88.5, "date": "2026-12-02"},
    ]
    return runs, {"real": real, "phantom": phantom, "tiny": tiny, "amos": amos}, entries


def _table6(runs: Path, file: Path):
    published = load_published()
    df = collect_runs(runs)
    odf = online.load_online(file, published, df, runs, today=TODAY)
    return {t.id: t for t in build_tables(published, df, odf)}


def test_answers_stand_beside_the_published_row_with_provenance_and_their_runs_comparability(boards):
    runs, paths, entries = boards
    file = _write(runs / "leaderboards" / "online.yaml", entries)
    tables = _table6(runs, file)
    t6 = tables["table6"]
    assert t6.measured
    # the real run at the paper protocol: beside the published VoCo value, with Δ and where it came from
    cell = t6.cell("voco", "btcv")
    assert cell.text() == (f"86.44 / 85.10 (Δ -1.34, n=1) {{btcv: run {paths['real'].name}, 2026-11-30, "
                           f"submission 42}}")
    assert t6.cell("voco", "amos22-dsc").text().startswith("89.06 / 88.50 (Δ -0.56, n=1) {amos22: run ")
    assert t6.cell("swinunetr", "btcv").text() == "†84.72"                      # nothing recorded: published only
    # the phantom run (scratch: no published row, gets its own) only in the phantom column, labelled PHANTOM
    assert "btcv@phantom" in t6.column_ids and "BTCV (phantom)" in t6.headers
    ph = t6.cell("scratch", "btcv@phantom")
    assert ph.text().startswith("PHANTOM 10.00 (n=1) {btcv: run ") and ph.diff(ph.groups[0]) is None
    assert t6.cell("scratch", "btcv").text() == "—"
    # the tiny-preset run: its own labelled column, no Δ; its note travels in the provenance
    tn = t6.cell("voco", "amos22-nsd@tiny-preset")
    assert tn.text() == f"40.50 (n=1) {{amos22: run {paths['tiny'].name}, 2026-12-02, validation phase}}"
    assert t6.cell("voco", "amos22-nsd").text() == "78.86"
    assert any(n.startswith(f"Measured: the leaderboards' answers recorded in {file}") for n in t6.notes)
    assert not any(n.startswith("Not measured") for n in t6.notes)
    # the validation records never fill Table 6, and the answers fill no other table
    groups = tables["comparison"].cell("voco", "btcv").groups
    assert [v for g in groups for v in g.values] == [90.0] and not any(g.provenance for g in groups)


def test_a_run_key_names_the_run_and_two_answers_of_one_protocol_pool(tmp_path):
    runs = tmp_path / "runs"
    a, b = _board_run(runs, "btcv", 0), _board_run(runs, "btcv", 1)
    status = RunRecord(b).status
    RunRecord(b).set_status(**{**status, "run_key": "key-of-b"})
    file = _write(tmp_path / "answers.yaml", [
        {"leaderboard": "btcv", "run": a.name, "metric": "dice", "value": 85.0, "date": "2026-11-30"},
        {"leaderboard": "btcv", "run": "key-of-b", "metric": "dice", "value": 86.0, "date": "2026-12-01"}])
    (g,) = _table6(runs, file)["table6"].cell("voco", "btcv").groups        # seeds 0 and 1: one protocol
    assert g.n == 2 and g.mean == pytest.approx(85.5)
    assert sorted(p.split(",")[1].strip() for p in g.provenance) == ["2026-11-30", "2026-12-01"]
    assert f"run {b.name}" in " ".join(g.provenance)


def test_report_reads_the_default_file_and_without_one_table6_stays_published(boards, capsys):
    runs, paths, entries = boards
    assert command.main(["--runs", str(runs), "--format", "md"]) == 0
    out = capsys.readouterr().out
    t6 = out[out.index("Table 6"):out.index("Table 7")]
    assert "Not measured" in t6 and "85.10" not in t6
    _write(online.default_online(runs), entries[:1])
    assert command.main(["--runs", str(runs), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    t6 = out[out.index("Table 6"):out.index("Table 7")]
    assert f"86.44 / 85.10 (Δ -1.34, n=1) {{btcv: run {paths['real'].name}, 2026-11-30, submission 42}}" in t6


def _bad(entries, i, **change):
    out = [dict(e) for e in entries]
    for k, v in change.items():
        if v is None:
            out[i].pop(k)
        else:
            out[i][k] = v
    return out


@pytest.mark.parametrize("change, key, says", [
    ({"leaderbord": "btcv"}, "entries[0].leaderbord", "unknown key"),
    ({"date": None}, "entries[0].date", "missing key"),
    ({"leaderboard": "synapse"}, "entries[0].leaderboard", "one of 'amos22', 'btcv', 'flare23'"),
    ({"metric": "nsd"}, "entries[0].metric", "a metric Table 6 shows for btcv"),
    ({"value": 0.851}, "entries[0].value", "looks like a fraction: write 85.1"),
    ({"value": 120}, "entries[0].value", "0-100"),
    ({"value": float("nan")}, "entries[0].value", "0-100"),
    ({"submission": " "}, "entries[0].submission", "expected a non-empty string or an integer, got ' '"),
    ({"value": "85"}, "entries[0].value", "0-100"),
    ({"date": "FUTURE"}, "entries[0].date", "a date not after today"),
    ({"date": "last week"}, "entries[0].date", "YYYY-MM-DD"),
    ({"date": "2024-12-31"}, "entries[0].date", "on or after the run finished (2025-01-01"),
    ({"run": "0123abcd-s9"}, "entries[0].run", "a finished fine-tuning run under"),
    ({"run": 12345}, "entries[0].run", "as a string"),
    ({"leaderboard": "amos22"}, "entries[0].run", "a amos22 fine-tuning run"),
])
def test_a_bad_entry_is_one_line_naming_the_file_and_key_before_rendering(boards, capsys, change, key, says):
    runs, _, entries = boards
    if change.get("date") == "FUTURE":
        change = {"date": (dt.date.today() + dt.timedelta(days=30)).isoformat()}
    file = _write(runs / "online.yaml", _bad(entries, 0, **change))
    assert command.main(["--runs", str(runs), "--online", str(file), "--format", "md"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""                                         # nothing rendered
    line = cap.err.strip()
    assert "\n" not in line and line.startswith(f"error: {file}: ") and key in line and says in line, line


def test_a_duplicate_answer_a_bad_top_level_and_a_missing_given_file(boards, tmp_path):
    runs, _, entries = boards
    df = collect_runs(runs)
    published = load_published()
    dup = _write(tmp_path / "dup.yaml", entries + [dict(entries[0], value=80.0)])
    with pytest.raises(RecipeError, match=r"dup\.yaml: key 'entries\[4\]': expected one entry per leaderboard, "
                                          r"run and metric \(entries\[0\] has this one"):
        online.load_online(dup, published, df, runs, today=TODAY)
    top = tmp_path / "top.yaml"
    top.write_text("schema: 1\nanswers: []\n")
    with pytest.raises(RecipeError, match=r"top\.yaml: unknown key 'answers'; expected one of schema, entries"):
        online.load_online(top, published, df, runs, today=TODAY)
    with pytest.raises(RecipeError, match=r"nowhere\.yaml: online results file not found"):
        online.load_online(tmp_path / "nowhere.yaml", published, df, runs)
    assert online.load_online(tmp_path / "nowhere.yaml", published, df, runs, required=False) is None
    empty = _write(tmp_path / "empty.yaml", [])
    t6 = {t.id: t for t in build_tables(published, df, online.load_online(empty, published, df, runs))}["table6"]
    assert not t6.measured and any(n.startswith("Not measured") for n in t6.notes)
