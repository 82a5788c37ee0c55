"""The shared protocol end to end on a tiny phantom task: records, skip, resume after a kill, seeds."""
import contextlib
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sslbench.cli import main

# Tiny enough for 2 CPU cores: a few seconds of training per run. 6 mm voxels (the tiny preset's 4 mm: 3.4x
# the voxels) make each validation a few windows; nothing here depends on the volume size.
FAST = ["--set", "task.finetune.max_steps=8", "--set", "task.finetune.roi=[64,32,32]", "--set", "task.finetune.num_samples=1",
        "--set", "task.finetune.val_every=4", "--set", "task.finetune.checkpoint_every=2",
        "--set", "task.finetune.log_every=2", "--set", "task.evaluate.overlap=0.0", "--set", "task.finetune.warmup_steps=2",
        "--set", "task.preprocess.spacing=[6,6,6]"]


def _run(out, *extra):
    return main(["run", "--method", "scratch", "--task", "phantom-btcv", "--out", str(out), *FAST, *extra])


def _only_run(out):
    runs = list((out / "finetune" / "phantom-btcv" / "scratch").iterdir())
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="module")
def fast_run(phantom_home, tmp_path_factory):
    """One finished FAST run (scratch, phantom-btcv, seed 0) for the module, trained once: the end-to-end test
    checks its record, the kill / resume test compares its resumed run with it. (out folder, run folder, the
    command's exit code and stdout.)"""
    out = tmp_path_factory.mktemp("fast-run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = _run(out)
    return SimpleNamespace(out=out, run=_only_run(out), code=code, stdout=printed.getvalue())


def test_end_to_end_run_writes_a_complete_record(fast_run, capsys):
    assert fast_run.code == 0
    out = fast_run.stdout
    assert "PHANTOM" in out and "Dice" in out
    tmp_path = fast_run.out
    run = fast_run.run
    for name in ("recipe.yaml", "env.json", "status.json", "metrics.json", "cases.csv", "log.txt",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["phantom"] is True and metrics["task"] == "phantom-btcv" and metrics["method"] == "scratch"
    assert len(metrics["per_class"]) == 13 and "liver" in metrics["per_class"]
    assert metrics["n_cases"] == len(metrics["cases"]) >= 1
    assert 0.0 <= metrics["mean_dice"] <= 1.0
    assert any("loss" in h for h in metrics["history"]) and any("val_dice" in h for h in metrics["history"])
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] and env["monai"] and env["device"] == "cpu"
    # how it ran (not part of the protocol): the runtime's settings
    assert env["runtime"] == {"device": "cpu", "precision": "fp32", "attention": "fused", "compile": False,
                              "cudnn_benchmark": False, "threads": env["runtime"]["threads"]}
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["protocol"] == metrics["protocol"]
    header = (run / "cases.csv").read_text().splitlines()[0]
    assert header.startswith("case,spleen,right kidney") and header.endswith(",mean")

    # Evaluating again with other inference settings writes its own file, never over evaluation.json; on the
    # CPU the run's own settings (fp32, 'fused' = SDPA off CUDA without autograd) give the same Dice to rounding.
    assert main(["evaluate", str(run), "--precision", "fp32", "--attention", "monai"]) == 0
    assert "evaluation-fp32-monai.json" in capsys.readouterr().out and not (run / "evaluation.json").exists()
    other = json.loads((run / "evaluation-fp32-monai.json").read_text())
    assert other["precision"] == "fp32" and other["attention"] == "monai" and other["phantom"] is True
    assert main(["evaluate", str(run)]) == 0
    own = json.loads((run / "evaluation.json").read_text())
    assert own["attention"] == "fused" and own["mean_dice"] == pytest.approx(other["mean_dice"], abs=1e-3)
    capsys.readouterr()

    # The identical run is skipped with a clear message; a different protocol (another lr; 2 steps, no
    # validation, to keep it short) gets its own folder.
    assert _run(tmp_path) == 0
    assert "already finished" in capsys.readouterr().out
    assert _run(tmp_path, "--set", "task.finetune.lr=0.01", "--set", "task.finetune.max_steps=2",
                "--set", "task.finetune.val_every=0") == 0
    assert len(list((tmp_path / "finetune" / "phantom-btcv" / "scratch").iterdir())) == 2


def _cli(out, env_extra=None, *extra):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, "-m", "sslbench", "run", "--method", "scratch", "--task", "phantom-btcv", "--out", str(out),
           *FAST, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def test_killed_run_resumes_to_the_same_metrics(fast_run, tmp_path, capsys):
    """The uninterrupted reference is the module's FAST run; the killed run is a process of its own (SIGKILL),
    and the next identical call resumes it (here in this process, as a new `sslbench run` would)."""
    killed = _cli(tmp_path / "b", {"SSLBENCH_KILL_AFTER_STEP": "5"})
    assert killed.returncode == -9                      # SIGKILL after step 5 (last checkpoint: step 4)
    run = _only_run(tmp_path / "b")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "running" and status["pid"] > 0 and status["host"]   # the dead owner, recorded
    # the next identical call (no --resume) recognises the dead run from its free lock and resumes it
    capsys.readouterr()
    assert _run(tmp_path / "b") == 0
    resumed = capsys.readouterr().out
    assert f"its run died (pid {status['pid']} on {status['host']}" in resumed
    assert "resuming from" in resumed and "from step 4" in resumed
    assert "resumed automatically" in (run / "log.txt").read_text()
    a = json.loads((fast_run.run / "metrics.json").read_text())
    b = json.loads((_only_run(tmp_path / "b") / "metrics.json").read_text())
    assert a["protocol"] == b["protocol"]
    # Bit-identical on an idle CPU; under heavy CPU contention we have seen ~1e-4 differences (float
    # summation order), hence the tolerance.
    assert [c["mean"] for c in a["cases"]] == pytest.approx([c["mean"] for c in b["cases"]], abs=5e-4)
    key = lambda m: [h.get("loss", h.get("val_dice")) for h in m["history"]]
    assert key(a) == pytest.approx(key(b), abs=5e-4)


def test_seed_reproduces_metrics(phantom_home, tmp_path):
    short = ["--set", "task.finetune.max_steps=2", "--set", "task.finetune.val_every=0"]   # scores: final eval
    assert _run(tmp_path / "s0a", "--seed", "3", *short) == 0
    assert _run(tmp_path / "s0b", "--seed", "3", *short) == 0
    assert _run(tmp_path / "s1", "--seed", "4", *short) == 0
    read = lambda p: json.loads((p / "finetune" / "phantom-btcv" / "scratch").glob("*/metrics.json").__next__().read_text())
    a, b, c = read(tmp_path / "s0a"), read(tmp_path / "s0b"), read(tmp_path / "s1")
    assert [x["mean"] for x in a["cases"]] == pytest.approx([x["mean"] for x in b["cases"]], abs=5e-4)
    assert a["history"] != c["history"]


def test_run_compile_compiles_training_and_evaluation_and_is_not_protocol(phantom_home, tmp_path, monkeypatch,
                                                                          capsys):
    """run.compile=true: the training and evaluation networks go through torch.compile (here with Dynamo's
    eager backend, to keep the CPU test short), checkpoints keep the plain keys, and the setting does not
    change the protocol: the same run without it is recognised as already finished."""
    import torch

    from sslbench import protocol

    real_compile, calls = torch.compile, []

    def eager_compile(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    short = ["--set", "task.finetune.max_steps=2", "--set", "task.finetune.val_every=0"]
    assert _run(tmp_path, *short, "--set", "run.compile=true") == 0
    assert len(calls) == 2 and all(c.get("dynamic") is False for c in calls)    # training and evaluation
    run = _only_run(tmp_path)
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert state and not any(k.startswith("_orig_mod.") for k in state)
    assert 0.0 <= json.loads((run / "metrics.json").read_text())["mean_dice"] <= 1.0
    capsys.readouterr()
    assert _run(tmp_path, *short) == 0 and "already finished" in capsys.readouterr().out

    # Pre-training methods: their compile_parts one by one where they name some, else their forward.
    class WithEncoders(torch.nn.Module):
        compile_parts = ("encoder", "missing")

        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(2, 2)

    class Plain(torch.nn.Module):
        def forward(self, x):
            return x + 1

    a, b = WithEncoders(), Plain()
    protocol.compile_method(a, {"compile": True})
    protocol.compile_method(b, {"compile": True})
    assert "forward" in vars(a.encoder) and "forward" not in vars(a) and "forward" in vars(b)
    assert calls[-2:] == [{"dynamic": False}] * 2
    assert float(b(torch.zeros(()))) == 1.0
    c = Plain()
    protocol.compile_method(c, {"compile": False})
    assert "forward" not in vars(c)


def test_a_diverging_run_stops_with_a_one_line_error(phantom_home, tmp_path, capsys):
    """A NaN / inf loss ends fine-tuning with an error naming the run, step and settings; nothing is scored."""
    code = _run(tmp_path, "--set", "task.finetune.lr=1e30", "--set", "task.finetune.max_steps=4",
                "--set", "task.finetune.val_every=0")
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "fine-tuning loss is" in err and "at step 4" in err and "run.precision=fp32" in err
    run = _only_run(tmp_path)
    assert not (run / "metrics.json").exists()
    assert json.loads((run / "status.json").read_text())["state"] != "finished"


def test_evaluation_runs_without_autograd_on_plain_tensors():
    """Sliding-window evaluation records no autograd graph and hands the network plain tensors (a MONAI
    MetaTensor would dispatch its __torch_function__ at every layer)."""
    import torch
    from monai.data import MetaTensor

    from sslbench import recipes
    from sslbench.recipes import output_channels
    from sslbench.tasks.segmentation import evaluate_segmentation

    task = recipes.resolve("scratch", "phantom-btcv")["task"]
    task["finetune"]["roi"] = [16, 16, 16]
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, output_channels(task), 1)

        def forward(self, x):
            seen.append((torch.is_grad_enabled(), type(x)))
            return self.conv(x)

    case = {"id": "c0", "image": MetaTensor(torch.rand(1, 20, 20, 20)), "label": MetaTensor(torch.zeros(1, 20, 20, 20))}
    rows = evaluate_segmentation(Probe(), [case], task, torch.device("cpu"), bf16=False)
    assert rows[0]["case"] == "c0" and seen
    assert all(grad is False and kind is torch.Tensor for grad, kind in seen)


def test_compiled_pretraining_is_checked_against_eager_before_the_first_step(phantom_home, tmp_path, monkeypatch,
                                                                              capsys):
    """run.compile=true in pre-training: VoCo's compiled encoders must give the eager features on the first
    batch; a 'compiler' that returns the same function passes (and the check is logged), one that scrambles the
    crops' features stops the run with a one-line error before it trains, leaving it unfinished."""
    import torch

    args = ["pretrain", "--method", "voco", "--preset", "tiny", "--set", "method.pretrain.steps=1",
            "--set", "run.compile=true"]
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    assert main([*args, "--out", str(tmp_path / "same")]) == 0
    run = next((tmp_path / "same" / "pretrain" / "voco").glob("*/*"))
    assert "compiled encoders against eager on the first batch (max relative difference): student 0" in \
        (run / "log.txt").read_text()
    capsys.readouterr()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda x: fn(x).roll(1, 0)))
    assert main([*args, "--out", str(tmp_path / "wrong")]) != 0
    err = capsys.readouterr().err
    assert "run.compile: on the first batch, compiled student features differ from eager" in err
    assert "--set run.compile=false" in err
    run = next((tmp_path / "wrong" / "pretrain" / "voco").glob("*/*"))
    assert not (run / "metrics.json").exists() and not (run / "checkpoints" / "backbone.pt").exists()


def test_a_phantom_pre_training_makes_the_fine_tuning_phantom_and_hands_its_decoder_over(phantom_home, tmp_path):
    """`finetune --init <an sslbench backbone.pt>` reads the pre-training's record: a backbone pre-trained on
    phantoms labels a fine-tuning on real data PHANTOM, and a method that trains the decoder hands it over, as
    `run` does."""
    import torch

    from sslbench.data import phantoms

    assert main(["pretrain", "--method", "mg", "--preset", "tiny", "--out", str(tmp_path / "runs"),
                 "--set", "method.pretrain.steps=1"]) == 0
    backbone = next((tmp_path / "runs" / "pretrain" / "mg").rglob("backbone.pt"))
    real = phantoms.synth("btcv", tmp_path / "btcv", cases=3, test_cases=1)
    (real / phantoms.MARKER).unlink()                               # stands in for a user's real copy
    common = ["--task", "btcv", "--root", str(real), "--preset", "tiny", *FAST, "--set", "task.finetune.max_steps=1",
              "--set", "task.finetune.val_every=0"]
    assert main(["finetune", "--method", "mg", "--init", str(backbone), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["finetune", "--out", str(tmp_path / "b"), *common]) == 0
    init_run = json.loads(next((tmp_path / "a").rglob("metrics.json")).read_text())
    scratch_run = json.loads(next((tmp_path / "b").rglob("metrics.json")).read_text())
    assert init_run["phantom"] is True and scratch_run["phantom"] is False
    assert init_run["init"]["include_decoder"] is True and init_run["init"]["load"]["matched"] == len(
        torch.load(backbone, weights_only=True))                    # encoder and decoder tensors, all loaded


def test_load_cases_keeps_the_order_of_items_across_threads_and_fails_on_the_first_bad_case(monkeypatch, tmp_path):
    import time

    from sslbench.errors import DataError
    from sslbench.data.cases import load_cases

    monkeypatch.chdir(tmp_path)
    for n in range(5):
        (tmp_path / f"case-{n}").write_text("")   # the files exist: the transform's own error is the cause

    class Slow:       # later items finish first: the output order must still be the items' order
        def __call__(self, d):
            n = int(d["image"].split("-")[1])
            time.sleep(0.02 * (5 - n))
            if n == 4:
                raise RuntimeError("broken header")
            return {"image": n}

    monkeypatch.setenv("SSLBENCH_LOAD_WORKERS", "3")
    items = [{"id": str(n), "image": f"case-{n}"} for n in range(4)]
    out = load_cases(items, Slow(), "test")
    assert [c["image"] for c in out] == [0, 1, 2, 3] and [c["id"] for c in out] == ["0", "1", "2", "3"]
    with pytest.raises(DataError, match=r"^case-4: cannot be loaded and preprocessed \(broken header\)"):
        load_cases(items + [{"id": "4", "image": "case-4"}], Slow(), "test")
