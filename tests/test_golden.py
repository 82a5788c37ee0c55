"""Issue 21's golden test: today's tiny CPU phantom runs (scratch, VoCo and Models Genesis pre-training +
fine-tuning, a resumed run, the classification and the 2D kinds) give the metrics.json of ``tests/golden.json``.

A refactor that changes a number or a field of these records fails here; a change meant to change records
regenerates the file (``python tests/golden.py``) so that its diff is reviewed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import golden  # noqa: E402


@pytest.fixture(scope="module")
def expected():
    return json.loads(golden.GOLDEN.read_text())


@pytest.mark.parametrize("name", list(golden.RUNS))
def test_a_golden_run_gives_the_golden_record(name, expected, tmp_path, phantom_home):
    assert golden.run_in_process(name, tmp_path, phantom_home) == 0
    found = golden.records(name, tmp_path, phantom_home)
    problems = golden.differences(expected[name], found, name)
    assert not problems, "\n".join(problems[:20])
    _the_report_groups_by_the_recorded_protocol(tmp_path)


def _the_report_groups_by_the_recorded_protocol(out: Path) -> None:
    """One protocol hash per record: the report's protocol of each fine-tuning, recomputed from recipe.yaml (and
    its pre-training's), is the ``protocol`` the run recorded, for every kind of golden run."""
    from sslbench.report.runs import collect_runs

    df = collect_runs(out)
    recorded = {str(p.parent): json.loads(p.read_text())["protocol"] for p in (out / "finetune").rglob("metrics.json")}
    assert recorded and set(df["path"]) == set(recorded)
    for row in df.itertuples():
        assert row.protocol == recorded[row.path], row.path


def test_a_killed_golden_run_resumes_to_the_golden_record(expected, tmp_path, phantom_home):
    """Killed (SIGKILL) after step 5, its last checkpoint at step 4; the same command resumes it to the record
    of the uninterrupted run."""
    cmd = [sys.executable, "-m", "sslbench", *golden.command("scratch-btcv", tmp_path, phantom_home)]
    env = dict(os.environ, SSLBENCH_DATA=str(phantom_home), SSLBENCH_KILL_AFTER_STEP="5", OMP_NUM_THREADS="1")
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-1500:]
    assert golden.run_in_process("scratch-btcv", tmp_path, phantom_home) == 0
    found = golden.records("scratch-btcv", tmp_path, phantom_home)
    problems = golden.differences(expected["scratch-btcv"], found, "resumed")
    assert not problems, "\n".join(problems[:20])


def test_the_comparison_sees_a_changed_number_and_a_changed_field():
    record = {"history": [{"step": 2, "loss": 1.25}], "protocol": "abc", "cases": [{"mean": 0.5}]}
    assert golden.differences(record, json.loads(json.dumps(record))) == []
    assert golden.differences(record, {**record, "cases": [{"mean": 0.5 + 1e-6}]}) == []   # float noise
    assert golden.differences(record, {**record, "cases": [{"mean": 0.52}]}) == ["/cases[0]/mean: expected 0.5, found 0.52"]
    assert golden.differences(record, {**record, "history": [{"step": 2, "loss": 1.26}]}) == [
        "/history[0]/loss: expected 1.25, found 1.26"]
    assert golden.differences(record, {**record, "protocol": "abd"}) == ["/protocol: expected 'abc', found 'abd'"]
    assert golden.differences(record, {**record, "extra": 1}) == ["/extra: unexpected"]
    assert golden.reduce({"finished": "x", "source": "/t/a/pretrain/voco/c/0123456789ab-s0/b.pt"}, ("/t/a",)) == {
        "source": "<root>/pretrain/voco/c/<run>/b.pt"}
