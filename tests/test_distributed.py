"""torchrun / DDP on CPU (gloo): collectives, gradient equality with one process, and a 2-process CLI run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from sslbench import distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Toy(nn.Module):
    """A deterministic stand-in for a method: conv + BatchNorm-free head, mean squared error."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        return ((self.head(h).squeeze(1) - x.mean(dim=(1, 2, 3, 4))) ** 2).mean()


def _worker(rank: int, world: int, port: int, batch: torch.Tensor, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d = distributed.setup("cpu")
    model = _Toy()
    ddp = distributed.wrap(model, d, torch.device("cpu"))
    part = d.shard(list(range(batch.shape[0])))
    loss = ddp(batch[part])
    loss.backward()
    mean_loss = d.mean(loss.detach())
    rows = d.gather_rows([{"rank": rank, "cases": part}])
    decision = d.broadcast_object({"prune": rank == 0})
    anyflag = d.any(rank == 1)
    if d.is_main:
        torch.save({"grad": model.conv.weight.grad.clone(), "loss": mean_loss, "rows": rows,
                    "decision": decision, "any": anyflag}, out)
    distributed.cleanup()


def test_two_processes_average_gradients_like_one_process_on_the_whole_batch(tmp_path):
    batch = torch.rand(4, 1, 6, 6, 6, generator=torch.Generator().manual_seed(1))
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), batch, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)

    ref = _Toy()
    # ranks see cases [0, 2] and [1, 3]: equal halves, so the mean of their mean losses is the full-batch mean
    loss = 0.5 * (ref(batch[[0, 2]]) + ref(batch[[1, 3]]))
    loss.backward()
    torch.testing.assert_close(got["grad"], ref.conv.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert got["rows"] == [{"rank": 0, "cases": [0, 2]}, {"rank": 1, "cases": [1, 3]}]
    assert got["decision"] == {"prune": True}     # rank 0's decision reached rank 1 and came back unchanged
    assert got["any"] is True                     # rank 1's flag reached rank 0


def test_single_process_is_a_no_op():
    d = distributed.setup("cpu") if "WORLD_SIZE" not in os.environ else distributed.current()
    assert not d.enabled and d.is_main
    t = torch.tensor([3.0])
    assert d.mean(t) is t and d.gather_rows([1, 2]) == [1, 2] and d.shard([1, 2, 3]) == [1, 2, 3]
    m = nn.Linear(2, 2)
    assert distributed.wrap(m, d, torch.device("cpu")) is m


def test_launch_forwards_the_command_without_gpus(monkeypatch):
    seen = {}

    class Done:
        def __init__(self, cmd):
            seen["cmd"] = cmd

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Done)
    assert distributed.launch(2, ["pretrain", "--method", "voco", "--gpus", "2", "--preset", "tiny"]) == 0
    cmd = seen["cmd"]
    assert "--nproc_per_node=2" in cmd and "--gpus" not in cmd
    assert cmd[-5:] == ["pretrain", "--method", "voco", "--preset", "tiny"]


def test_torchrun_pretrain_two_processes_writes_one_record(phantom_home, tmp_path):
    """`sslbench pretrain --gpus 2` on CPU: rank 0 writes the record; the protocol hash names the world size."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SSLBENCH_DATA=str(phantom_home))
    cmd = [sys.executable, "-m", "sslbench", "pretrain", "--method", "voco", "--preset", "tiny", "--gpus", "2",
           "--set", "method.pretrain.steps=2", "--set", "method.pretrain.log_every=1", "--set", "run.device=cpu",
           "--set", "method.params.resize=[64,64,32]", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((tmp_path / "pretrain" / "voco" / "phantom-corpus").iterdir())
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2 and len(metrics["history"]) == 2
    assert (runs[0] / "checkpoints" / "backbone.pt").is_file()
    assert json.loads((runs[0] / "env.json").read_text())["world_size"] == 2
    assert proc.stdout.count("pre-trained voco") == 1          # only rank 0 talks
    # the same recipe on one process is another protocol (global batch differs): a different folder
    from sslbench import recipes
    from sslbench.store.run_key import protocol_hash as run_protocol_hash

    cfg = recipes.split_config(recipes.resolve("voco", None, preset="tiny", overrides=[
        "method.pretrain.steps=2", "method.pretrain.log_every=1", "run.device=cpu",
        "method.params.resize=[64,64,32]"]), "corpus")
    assert metrics["protocol"] == run_protocol_hash(cfg, distributed.Dist(rank=0, world_size=2))
    assert metrics["protocol"] != run_protocol_hash(cfg, distributed.SINGLE)


def test_sweep_trials_on_two_processes(phantom_home, tmp_path):
    """`sslbench sweep ... --gpus 2`: rank 0 drives the Optuna study and broadcasts each trial's value; every
    trial is one 2-process fine-tuning run with its own record, and the study ends with both points done."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SSLBENCH_DATA=str(phantom_home))
    cmd = [sys.executable, "-m", "sslbench", "sweep", "task.finetune.lr", "--method", "scratch", "--task", "phantom-btcv",
           "--values", "0.001", "0.002", "--gpus", "2", "--out", str(tmp_path),
           "--set", "task.finetune.max_steps=2", "--set", "task.finetune.roi=[64,32,32]",
           "--set", "task.preprocess.spacing=[6,6,6]",
           "--set", "task.finetune.num_samples=1", "--set", "task.finetune.val_every=2",
           "--set", "task.evaluate.overlap=0.0", "--set", "task.finetune.warmup_steps=1", "--set", "run.device=cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-2000:]
    runs = sorted((tmp_path / "finetune" / "phantom-btcv" / "scratch").iterdir())
    assert len(runs) == 2
    lrs = set()
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["world_size"] == 2
        import yaml

        lrs.add(yaml.safe_load((run / "recipe.yaml").read_text())["task"]["finetune"]["lr"])
    assert lrs == {0.001, 0.002}                               # each rank ran the value rank 0 drew
    import optuna

    journal = next((tmp_path / "sweeps").glob("*.journal"))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]


class _Stop(Exception):
    pass


def _prune_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), SSLBENCH_DATA=data, OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from sslbench import protocol, sweep

    d = distributed.setup("cpu")
    if rank > 0:
        sweep.follow(d)            # returns when rank 0 says stop
        distributed.cleanup()
        return
    kwargs = dict(method="scratch", task="phantom-btcv", out=out, resume=True, force=False, overrides=[
        "task.finetune.max_steps=6", "task.finetune.roi=[64,32,32]", "task.preprocess.spacing=[6,6,6]",
        "task.finetune.num_samples=1",
        "task.finetune.val_every=2", "task.finetune.checkpoint_every=2", "task.evaluate.overlap=0.0",
        "task.finetune.warmup_steps=1", "run.device=cpu"])
    seen = []

    def on_validation(step, dice):   # what Worker._execute does: decide, broadcast, stop together
        seen.append(step)
        d.broadcast_object(step == 4)
        if step == 4:
            raise _Stop()

    sweep.command(d, ("run", kwargs))
    try:
        protocol.run_protocol(**kwargs, on_validation=on_validation)
    except _Stop:
        pass
    sweep.command(d, ("stop",))
    torch.save(seen, os.path.join(out, "seen.pt"))
    distributed.cleanup()


def test_a_pruning_decision_of_rank_0_stops_every_rank(phantom_home, tmp_path):
    mp.spawn(_prune_worker, args=(2, _free_port(), str(phantom_home), str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / "seen.pt") == [2, 4]           # stopped at step 4 of 6, on both ranks (join)
    run = next((tmp_path / "finetune" / "phantom-btcv" / "scratch").iterdir())
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "running" and status["step"] == 4     # resumable from the pruned step's checkpoint


def test_torchrun_classification_finetune_two_processes(phantom_home, tmp_path):
    """CC-CCII (3D classification) under `--gpus 2` on CPU: one record, written by rank 0, every case scored."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SSLBENCH_DATA=str(phantom_home))
    cmd = [sys.executable, "-m", "sslbench", "run", "--method", "scratch", "--task", "phantom-ccccii", "--gpus", "2",
           "--set", "task.finetune.max_steps=4", "--set", "task.finetune.val_every=2", "--set", "task.finetune.log_every=2",
           "--set", "task.finetune.warmup_steps=1", "--set", "run.device=cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((tmp_path / "finetune" / "phantom-ccccii" / "scratch").iterdir())
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["metric"] == "accuracy"
    assert metrics["n_cases"] == len(metrics["cases"]) > 0 and 0.0 <= metrics["mean_accuracy"] <= 1.0
    assert (runs[0] / "log.txt").read_text().count("validation accuracy") == 2


def test_a_killed_two_process_run_resumes_on_both_ranks_to_one_record_of_all_cases(phantom_home, tmp_path):
    """`sslbench run --method scratch --gpus 2` on CPU, both ranks SIGKILLed after step 3 (validation and
    checkpoint at step 2): `--resume` continues the same folder from step 2 on both ranks and finishes with one
    record, by rank 0; validation cases split over the ranks and gathered back, every case scored once, in the
    split's order. (One launch pair checks what a clean 2-process run and a resumed one did before.)"""
    env = dict(os.environ, OMP_NUM_THREADS="1", SSLBENCH_DATA=str(phantom_home))
    cmd = [sys.executable, "-m", "sslbench", "run", "--method", "scratch", "--task", "phantom-btcv", "--gpus", "2",
           "--set", "task.finetune.max_steps=4", "--set", "task.finetune.roi=[64,32,32]",
           "--set", "task.preprocess.spacing=[6,6,6]",
           "--set", "task.finetune.num_samples=1", "--set", "task.finetune.val_every=2",
           "--set", "task.finetune.log_every=2",
           "--set", "task.finetune.checkpoint_every=2", "--set", "task.evaluate.overlap=0.0",
           "--set", "task.finetune.warmup_steps=1", "--set", "run.device=cpu", "--out", str(tmp_path)]
    killed = subprocess.run(cmd, env=dict(env, SSLBENCH_KILL_AFTER_STEP="3"), capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode != 0
    run = next((tmp_path / "finetune" / "phantom-btcv" / "scratch").iterdir())
    assert json.loads((run / "status.json").read_text())["step"] == 2
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in (tmp_path / "finetune" / "phantom-btcv" / "scratch").iterdir()] == [run.name]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    log = (run / "log.txt").read_text()
    assert "resumed from step 2" in log
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    from sslbench import recipes
    from sslbench.data.locate import locate_data, read_splits

    task = recipes.resolve("scratch", "phantom-btcv")["task"]
    root, _ = locate_data(task, None, log=lambda *_: None)
    val_ids = [it["id"] for it in read_splits(task, root)["val"]]
    assert [c["case"] for c in metrics["cases"]] == val_ids          # all cases, once each, in order
    assert sum("val_dice" in h for h in metrics["history"]) == 2     # step 2 (before the kill) and step 4
    assert log.count("validation dice") == 2                          # rank 0 alone writes the log
    assert done.stdout.count("run record") == 1
