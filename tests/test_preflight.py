"""Issue 20: everything is checked before any work starts (roots, corpus roots, readers, feasibility), --dry-run
writes nothing, real tasks pre-train on the paper's corpus, phantom provenance reaches the record and the report,
and a dead run is recognised."""
import json
import os
from pathlib import Path

import pytest

from sslbench import recipes
from sslbench.protocol import feasibility
from sslbench.cli import main
from sslbench.errors import RunError

GIB = 1024 ** 3


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No dataset roots in the environment, a fresh (empty) data home, no GPU, 2 cores."""
    for k in list(os.environ):
        if k.startswith("SSLBENCH_ROOT_"):
            monkeypatch.delenv(k)
    home = tmp_path / "data-home"
    monkeypatch.setenv("SSLBENCH_DATA", str(home))
    monkeypatch.setattr(feasibility, "gpu_memory", lambda: (0, 0.0, ""))
    monkeypatch.setattr(feasibility, "cpu_cores", lambda: 2)
    return home


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*")) if path.exists() else []


def _real_tree(like: str, out: Path, cases: int) -> Path:
    """A tree in the real layout that is not marked as a phantom (what a user's copy looks like to sslbench)."""
    from sslbench.data import phantoms

    root = phantoms.synth(like, out, cases=cases, seed=0)
    for marker in Path(root).rglob("sslbench_phantom.json"):
        marker.unlink()
    return Path(root)


def test_real_task_without_root_is_one_line_naming_dataset_layout_and_demo(clean_env, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", "--method", "voco", "--task", "mmwhs", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err == ("error: task 'mmwhs' needs --root DIR or $SSLBENCH_ROOT_MMWHS (your copy of MM-WHS (CT) in its "
                   "distributed layout: mmwhs; see the README's 'Real datasets'); for a demo use --task phantom-mmwhs")
    assert not out.exists() and not clean_env.exists()     # nothing written: no run folder, no phantom corpus


def test_task_root_from_environment_variable(clean_env, tmp_path, monkeypatch, capsys):
    root = _real_tree("mmwhs", tmp_path / "mm", cases=4)
    monkeypatch.setenv("SSLBENCH_ROOT_MMWHS", str(root))
    assert main(["run", "--method", "scratch", "--task", "mmwhs", "--preset", "tiny", "--dry-run",
                 "--out", str(tmp_path / "runs")]) == 0
    assert f"data {root}" in capsys.readouterr().out


def test_real_task_pretrains_on_the_papers_corpus_and_refuses_without_its_roots(clean_env, tmp_path, capsys):
    assert recipes.resolve("voco", "btcv")["corpus"]["name"] == "voco-corpus-btcv"       # seed supplement Sec. 1
    assert recipes.resolve("voco", "mmwhs")["corpus"]["name"] == "voco-corpus"
    assert recipes.resolve("supervised", "mmwhs")["corpus"]["name"] == "btcv"            # the real twin
    assert recipes.resolve("voco", "phantom-mmwhs")["corpus"]["name"] == "phantom-corpus"
    assert recipes.resolve("voco", "mmwhs", corpus="phantom-corpus")["corpus"]["name"] == "phantom-corpus"
    # the corpus is not part of the fine-tuning task's hash: the key is ignored, hashes stay
    assert "pretrain_corpus" in recipes.resolve("scratch", "btcv")["task"]["data"]

    root = _real_tree("mmwhs", tmp_path / "mm", cases=4)
    out = tmp_path / "runs"
    assert main(["run", "--method", "voco", "--task", "mmwhs", "--root", str(root), "--preset", "tiny",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: corpus 'voco-corpus': no root for source 'btcv'") and "$SSLBENCH_ROOT_BTCV" in err
    assert "--corpus phantom-corpus" in err
    assert not out.exists() and not clean_env.exists()


def test_estimates_follow_the_documented_model():
    cpu = feasibility.Machine("cpu", 0, 16 * GIB, 2, "CPU")
    paper = recipes.resolve("voco", "phantom-mmwhs", preset="paper")
    pcfg = recipes.split_config(paper, "corpus")
    # VoCo paper: 4 volumes x (4 random crops + 4 x 4 bases) = 80 crops of 64^3
    assert feasibility.pretrain_voxels(pcfg["method"]) == 80 * 64 ** 3 == 20_971_520
    e = feasibility.estimate_pretrain(pcfg, cpu, volumes=200)
    act = 20_971_520 * 48 * 17.0 * 2.6                      # voxels x feature size x encoder factor x CPU factor
    weights = 72.8e6 * 16
    corpus = 200 * 384 * 384 * 64 * 4                        # the resized corpus in memory
    assert e.memory == pytest.approx(act + weights + corpus)
    assert e.seconds == pytest.approx(100_000 * 20_971_520 * 48 ** 2 * 7e-8)
    # fine-tuning: 1 x 4 crops of 96^3; 1000 epochs x 14 training cases
    f = feasibility.estimate_finetune(recipes.split_config(paper, "task"), cpu, train_cases=14)
    assert f.steps == 14_000 and f.voxels == 4 * 96 ** 3
    assert f.memory == pytest.approx(4 * 96 ** 3 * 48 * 55.0 * 2.6 + weights)
    # one H100-class GPU: the encoder factor reproduces the measured VoCo point (36 x 64^3 at 48: 8.23 GiB)
    gpu = feasibility.Machine("cuda", 1, 80 * GIB, 16, "H100")
    assert (36 * 64 ** 3 * 48 * 17.0 + weights) / GIB == pytest.approx(8.23, rel=0.1)
    g = feasibility.estimate_pretrain(pcfg, gpu, volumes=200)
    assert g.seconds == pytest.approx(100_000 * 20_971_520 * 48 ** 2 * 5.3e-12)   # ~7 h on one GPU
    assert g.memory == pytest.approx(act / 2.6 + weights + corpus)
    h = feasibility.estimate_finetune(recipes.split_config(paper, "task"), gpu, train_cases=14)
    assert h.seconds == pytest.approx(14_000 * 4 * 96 ** 3 * 48 ** 2 * 1.8e-11)    # ~34 min
    assert feasibility.problems([g, h], gpu, {"feasibility_hours": 72}) == []      # the paper preset fits a GPU
    assert len(feasibility.problems([e, f], cpu, {"feasibility_hours": 72})) == 3  # not the 2-core CPU
    two = feasibility.Machine("cuda", 2, 80 * GIB, 16, "H100")
    assert feasibility.estimate_pretrain(pcfg, two, volumes=200).seconds == pytest.approx(g.seconds / 2)


def test_paper_preset_on_a_small_cpu_is_refused_with_the_way_out_and_nothing_written(clean_env, tmp_path,
                                                                                    monkeypatch, capsys):
    monkeypatch.setattr(feasibility, "available_ram", lambda: 8.0 * GIB)
    out = tmp_path / "runs"
    assert main(["run", "--method", "voco", "--task", "phantom-mmwhs", "--preset", "paper", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: infeasible plan: pretrain needs ~")
    assert "RAM available 8.0 GiB" in err and "limit 72 h" in err and "CPU (2 cores, no GPU)" in err
    assert "way out: --preset tiny, a GPU (--gpus N for several), --no-feasibility-check" in err
    assert "pretrain voco on phantom-corpus: 100000 steps x 20.97 M voxels at feature size 48" in err
    assert not out.exists() and not clean_env.exists()     # no phantom corpus synthesised, no run folder

    # the same machine runs the tiny preset (what CI, the tests and the demo use)
    tiny = recipes.resolve("voco", "phantom-mmwhs")
    m = feasibility.machine(tiny["run"])
    assert m.device == "cpu" and m.memory == 8.0 * GIB
    ests = [feasibility.estimate_pretrain(recipes.split_config(tiny, "corpus"), m),
            feasibility.estimate_finetune(recipes.split_config(tiny, "task"), m, train_cases=4)]
    assert feasibility.problems(ests, m, tiny["run"]) == []
    assert max(e.memory for e in ests) < 1 * GIB and sum(e.seconds for e in ests) < 3600


def test_escape_hatch_warns_instead_of_refusing(monkeypatch):
    cpu = feasibility.Machine("cpu", 0, 1 * GIB, 2, "CPU")
    paper = recipes.resolve("scratch", "phantom-mmwhs", preset="paper")
    ests = [feasibility.estimate_finetune(recipes.split_config(paper, "task"), cpu, train_cases=14)]
    with pytest.raises(RunError, match="^infeasible plan: finetune needs"):
        feasibility.check(ests, cpu, paper["run"])
    said = []
    found = feasibility.check(ests, cpu, {**paper["run"], "feasibility": "warn"}, say=said.append)
    assert found and len(said) == 1 and said[0].startswith("warning: infeasible plan:")
    assert feasibility.check(ests, cpu, {**paper["run"], "feasibility": "off"}, say=said.append) == []
    # --no-feasibility-check is that setting, and no part of the protocol hash
    warn = recipes.resolve("scratch", "phantom-mmwhs", overrides=["run.feasibility=warn"])
    assert warn["run"]["feasibility"] == "warn"
    assert recipes.protocol_hash(warn) == recipes.protocol_hash(recipes.resolve("scratch", "phantom-mmwhs"))


def test_dry_run_prints_the_plan_and_writes_nothing(clean_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(feasibility, "available_ram", lambda: 8.0 * GIB)
    out = tmp_path / "runs"
    assert main(["run", "--method", "voco", "--task", "phantom-mmwhs", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "plan (dry run, nothing written): preset tiny" in text
    assert "pretrain: method voco on corpus phantom-corpus (PHANTOM): 40 steps, batch 2" in text
    assert "finetune: voco on task phantom-mmwhs (PHANTOM): 150 steps, roi [64, 64, 32]" in text
    assert "run folder: decided once the phantom data is written" in text
    assert "feasible on this machine" in text
    assert not out.exists() and not clean_env.exists()

    # on data that exists: the very folder a run would use, still nothing written
    root = _real_tree("mmwhs", tmp_path / "mm", cases=4)
    before = _files(tmp_path)
    assert main(["run", "--method", "scratch", "--task", "mmwhs", "--root", str(root), "--preset", "paper",
                 "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    from sslbench import protocol

    cfg = recipes.resolve("scratch", "mmwhs", preset="paper")
    cfg["run"]["out"] = str(out)
    plan = protocol.plan_run(protocol.finetune_view(cfg), "finetune", root, log=lambda *a: None)
    assert f"run folder: {plan.path} (run key {plan.run_key}, protocol {plan.protocol})" in text
    assert "would be refused: finetune needs ~" in text and "way out: --preset tiny" in text
    assert _files(tmp_path) == before
    # pretrain and finetune take --dry-run too
    assert main(["pretrain", "--method", "voco", "--dry-run", "--out", str(out)]) == 0
    assert "pretrain: method voco on corpus phantom-corpus (PHANTOM)" in capsys.readouterr().out
    assert main(["finetune", "--task", "phantom-btcv", "--dry-run", "--out", str(out)]) == 0
    assert "finetune: scratch on task phantom-btcv (PHANTOM)" in capsys.readouterr().out
    assert _files(tmp_path) == before


def test_missing_optional_reader_is_named():
    items = [{"id": "a", "image": "/data/LUNA16/subset0/1.3.6.mhd"}, {"id": "b", "image": "/data/x.nii.gz"}]
    assert feasibility.missing_readers(items, find=lambda name: None) == (
        "MetaImage (.mhd) files (e.g. /data/LUNA16/subset0/1.3.6.mhd) need SimpleITK: pip install SimpleITK")
    assert feasibility.missing_readers(items, find=lambda name: object()) is None
    assert feasibility.missing_readers([{"image": "/data/x.nii.gz"}], find=lambda name: None) is None


def test_dead_run_without_checkpoint_starts_over_and_another_hosts_run_is_left_alone(tmp_path, capsys):
    import platform

    from sslbench.store.records import RunRecord, prepare_run_folder

    rec = RunRecord(tmp_path / "run")
    rec.path.mkdir()
    rec.set_status(state="running", step=3, protocol="p1", started="2026-12-03T06:00:00")
    status = json.loads((rec.path / "status.json").read_text())
    assert status["pid"] == os.getpid() and status["host"] == platform.node()
    said = []
    assert prepare_run_folder(rec, "p1", resume=False, force=False, say=said.append) == "new"
    assert said == [f"{rec.path}: its run died (pid {os.getpid()} on {platform.node()}, started 2026-12-03T06:00:00, "
                    f"state running at step 3; its lock is free): no readable checkpoints/last.pt, starting over"]
    assert not rec.path.exists()
    rec.path.mkdir()
    (rec.path / "status.json").write_text(json.dumps({"state": "running", "step": 3, "protocol": "p1", "pid": 7,
                                                      "host": "elsewhere"}))
    with pytest.raises(RunError, match="recorded by pid 7 on elsewhere; if it is gone pass --resume"):
        prepare_run_folder(rec, "p1", resume=False, force=False, say=said.append)


FAST = ["--set", "task.finetune.max_steps=2", "--set", "task.finetune.roi=[64,32,32]",
        "--set", "task.finetune.num_samples=1", "--set", "task.finetune.val_every=0",
        "--set", "task.finetune.checkpoint_every=2", "--set", "task.evaluate.overlap=0.0",
        "--set", "task.finetune.warmup_steps=1", "--set", "method.pretrain.steps=2",
        "--set", "method.pretrain.warmup_steps=1", "--set", "method.pretrain.checkpoint_every=2",
        "--set", "corpus.data.phantom_cases=3"]


def test_real_task_pretrained_on_phantoms_is_phantom_in_terminal_record_and_report(phantom_home, tmp_path, capsys):
    from sslbench.report.runs import collect_runs

    root = _real_tree("btcv", tmp_path / "btcv", cases=4)
    out = tmp_path / "runs"
    assert main(["run", "--method", "voco", "--task", "btcv", "--root", str(root), "--preset", "tiny",
                 "--corpus", "phantom-corpus", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "PHANTOM" in text
    pre = json.loads(next((out / "pretrain" / "voco" / "phantom-corpus").glob("*/metrics.json")).read_text())
    m = json.loads(next((out / "finetune" / "btcv" / "voco").glob("*/metrics.json")).read_text())
    assert pre["phantom"] is True and m["phantom"] is True
    init = m["init"]
    assert init["corpus"] == "phantom-corpus" and init["phantom"] is True
    assert init["run_key"] == pre["run_key"] and init["hash"] == pre["protocol"]
    runs = collect_runs(out)
    runs_df = runs[0] if isinstance(runs, tuple) else runs
    row = runs_df[runs_df["task"] == "btcv"].iloc[0]
    assert bool(row["phantom"]) is True                    # the report's phantom column, never the real BTCV one


@pytest.mark.parametrize("args, line", [
    (["pretrain", "--method", "transvw", "--set", "method.params.perturbations=foo"],
     "error: methods/transvw.yaml: method.params.perturbations: 'foo' for method transvw; expected one of transvw, "
     "genesis"),
    (["run", "--method", "c2l", "--task", "phantom-chestxray14", "--set", "method.params.criterion=foo"],
     "error: methods/c2l.yaml (2D form): method.params.criterion: 'foo' for method c2l; expected one of softmax, nce"),
    # a check only the constructor can make (the crop against the backbone the model section names)
    (["pretrain", "--method", "simsiam", "--set", "method.params.features=all"],
     "error: method.params.crop_size: 32 for method simsiam; expected a multiple of 32, >= 64 for "
     "model.name=swinunetr, features=all"),
])
def test_a_method_param_its_constructor_refuses_is_one_line_before_any_data_is_written(clean_env, tmp_path, capsys,
                                                                                      args, line):
    """A value the method's typed params refuse (the recipe file named), or one only its constructor can judge (the
    method built once on the CPU), is refused in the pre-flight before phantoms are written or a run folder
    claimed; --dry-run says the same."""
    out = tmp_path / "runs"
    assert main([*args, "--preset", "tiny", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == line
    assert _files(out) == [] and _files(clean_env) == []
    assert main([*args, "--preset", "tiny", "--out", str(out), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == line


def test_the_parameter_check_leaves_the_runs_random_draws_alone():
    import torch

    from sslbench.protocol.plan import check_method_params

    cfg = recipes.resolve("simsiam", None, preset="tiny")
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    check_method_params(cfg)                        # builds SimSiam (random initial weights) on the CPU
    assert torch.equal(torch.rand(4), expected)
