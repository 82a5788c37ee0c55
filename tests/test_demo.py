"""The demo (`sslbench run` alone): both methods with the same seed and budget, the side-by-side table."""
import json

from sslbench import demo
from sslbench.cli import main
from sslbench.protocol import Outcome
from sslbench.store.records import RunRecord


def _metrics(method, per_class, mean, steps=300, pretrain_run=None):
    return {"method": method, "task_title": "MM-WHS (phantom)", "phantom": True, "n_cases": 2, "seed": 0,
            "steps": steps, "per_class": per_class, "mean_dice": mean,
            "init": {"pretrain_run": pretrain_run} if pretrain_run else {}}


def test_rows_put_methods_side_by_side_with_the_delta_and_say_why_a_structure_is_at_zero():
    scratch = _metrics("scratch", {"left atrium": 0.5, "whole aorta": 0.0, "pulmonary artery": None}, 0.25)
    voco = _metrics("voco", {"left atrium": 0.625, "whole aorta": 0.1, "pulmonary artery": 0.00004, "myo": 0.0}, 0.3)
    scratch["per_class"]["myo"] = 0.0
    rows = demo.comparison_rows({"scratch": scratch, "voco": voco})
    assert rows[0] == ["left atrium", "50.00", "62.50", "+12.50", ""]
    assert rows[1] == ["whole aorta", "0.00", "10.00", "+10.00", "not learnt in 300 steps (scratch)"]
    # absent from every validation case for scratch (n/a), 0.00 once rounded for voco: said so, no delta
    assert rows[2] == ["pulmonary artery", "n/a", "0.00", "n/a", "not learnt in 300 steps (voco)"]
    assert rows[3] == ["myo", "0.00", "0.00", "+0.00", "not learnt in 300 steps (scratch, voco)"]
    assert rows[4] == ["mean (per case, then over cases)", "25.00", "30.00", "+5.00", ""]
    # with the record's confusion counts the note says where the structure's voxels went
    scratch["confusion"] = {"labels": ["background", "left atrium", "whole aorta", "pulmonary artery", "myo"],
                            "counts": [[90, 0, 0, 0, 0], [2, 6, 0, 0, 0], [0, 8, 2, 0, 0], [0, 0, 0, 0, 0],
                                       [3, 0, 0, 0, 1]]}
    rows = demo.comparison_rows({"scratch": scratch, "voco": voco})
    assert rows[1][-1] == "not learnt in 300 steps (scratch: its voxels labelled left atrium (80%))"
    assert rows[3][-1] == "not learnt in 300 steps (scratch: its voxels labelled background (75%), voco)"


def test_run_without_arguments_runs_voco_and_scratch_alike_and_prints_the_phantom_table(tmp_path, monkeypatch, capsys):
    pre = tmp_path / "pretrain-run"
    pre.mkdir()
    (pre / "metrics.json").write_text(json.dumps({"steps": 40, "volumes": 12, "corpus": "phantom-corpus",
                                                  "phantom": True, "final_loss": 1.5, "seconds_this_session": 7.0}))
    calls = []

    def fake(method, task, **kw):
        calls.append((method, task, kw))
        per_class = {"left atrium": 0.5, "whole aorta": 0.0} if method == "scratch" else {"left atrium": 0.6,
                                                                                           "whole aorta": 0.2}
        m = _metrics(method, per_class, 0.25 if method == "scratch" else 0.4,
                     pretrain_run=str(pre) if method == "voco" else None)
        return Outcome(RunRecord(tmp_path / method), "new", m)

    monkeypatch.setattr(demo.protocol, "run_protocol", fake)
    monkeypatch.setenv("COLUMNS", "200")   # one table row a line
    assert main(["run", "--seed", "3", "--out", str(tmp_path), "--set", "run.num_threads=1"]) == 0
    assert [c[:2] for c in calls] == [("scratch", "phantom-mmwhs"), ("voco", "phantom-mmwhs")]
    for _, _, kw in calls:   # same seed, preset and fine-tuning budget; the user's --set after the demo's own
        assert kw["seed"] == 3 and kw["preset"] == "tiny" and kw["out"] == str(tmp_path)
        assert kw["overrides"][:len(demo.DEMO_OVERRIDES)] == list(demo.DEMO_OVERRIDES)
        assert kw["overrides"][-1] == "run.num_threads=1"
    out = " ".join(capsys.readouterr().out.split())
    assert "PHANTOM" in out and "not learnt in 300 steps (scratch)" in out and "+15.00" in out
    assert "pre-trained 40 steps on 12 volumes of phantom-corpus (PHANTOM)" in out
    assert "no evidence about the methods" in out

    calls.clear()   # a task named: one run, of the default method, as before
    assert main(["run", "--task", "phantom-mmwhs", "--out", str(tmp_path)]) == 0
    assert [c[:2] for c in calls] == [("scratch", "phantom-mmwhs")]


def test_the_demo_plan_gives_both_methods_one_budget_and_fits_five_minutes_of_two_cpu_cores(tmp_path, monkeypatch,
                                                                                          capsys):
    """The real demo takes minutes: its plan is tested (the feasibility estimates, training + validation +
    pre-processing, on a 2-core CPU), not the run."""
    import yaml

    from sslbench import protocol, recipes
    from sslbench.protocol import feasibility

    monkeypatch.setenv("SSLBENCH_DATA", str(tmp_path / "home"))
    monkeypatch.setattr(feasibility, "gpu_memory", lambda: (0, 0.0, ""))
    monkeypatch.setattr(feasibility, "cpu_cores", lambda: 2)
    cfgs = demo.plan(out=str(tmp_path / "runs"))
    assert list(cfgs) == ["scratch", "voco"]
    scratch, voco = cfgs["scratch"], cfgs["voco"]
    # the same fine-tuning budget, grid, network and seed for both rows; only VoCo pre-trains
    assert scratch["task"] == voco["task"] and scratch["model"] == voco["model"]
    assert scratch["run"]["seed"] == voco["run"]["seed"] and scratch["run"]["preset"] == "tiny"
    assert scratch["method"]["pretrain"] is None and voco["method"]["pretrain"]["steps"] > 0
    for key in demo.DEMO_OVERRIDES:   # the demo's settings, applied to the tiny preset
        name, value = key.split("=", 1)
        want = yaml.safe_load(value)   # YAML 1.1 reads 2e-3 as a string; the recipe coerces it to a float
        assert recipes.get_dotted(scratch, name) == (float(want) if isinstance(want, str) else want), key
    ests = {m: protocol.preflight(cfg, say=lambda *a: None) for m, cfg in cfgs.items()}
    stages = {m: [e.stage for e in es] for m, es in ests.items()}
    assert stages == {"scratch": ["finetune", "validate", "preprocess"],
                      "voco": ["pretrain", "preprocess", "finetune", "validate", "preprocess"]}
    total = sum(e.seconds for es in ests.values() for e in es)
    assert 60 < total < 300, [e.line() for es in ests.values() for e in es]
    assert max(e.memory for es in ests.values() for e in es) < 4 * 1024 ** 3
    assert not (tmp_path / "home").exists() and not (tmp_path / "runs").exists()   # a plan writes nothing

    # `sslbench run --dry-run` alone prints the demo's settings and both plans
    assert main(["run", "--dry-run", "--out", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("demo settings (on top of the tiny preset, the same for both fine-tunings): "
                           + " ".join(demo.DEMO_OVERRIDES))
    assert "finetune: scratch on task phantom-mmwhs (PHANTOM)" in text and "pretrain: method voco" in text
    assert not (tmp_path / "runs").exists()
