"""`sslbench sweep`: a λ grid fills Table 3; a killed sweep is finished by the next run without running a
point twice; two workers split one journal; TPE reports intermediate Dice; bad keys give one line. A worker
decides by the point's run-folder lock: held by a live process, the point is left alone; left by a dead holder,
it is resumed; a finished run is told from its metrics.json, not trained again.

Everything runs on tiny phantom settings (2 fine-tuning steps, coarse spacing) so the file stays within a
few minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sslbench import recipes, sweep
from sslbench.data.locate import locate_data
from sslbench.report.published import load_published
from sslbench.report.runs import collect_runs
from sslbench.report.tables import build_tables
from sslbench.store import lock as locks

# One validation (at step 2): a validation after step 1 makes the next CPU steps much slower. One torch
# thread per process: on 2 shared cores, 2-thread workers slow down 3x as soon as anything else runs.
FAST = ["--set", "run.num_threads=1", "--set", "task.finetune.max_steps=2", "--set", "task.finetune.roi=[64,32,32]",
        "--set", "task.finetune.val_every=2", "--set", "task.finetune.num_samples=1",
        "--set", "task.finetune.checkpoint_every=1", "--set", "task.finetune.log_every=1",
        "--set", "task.evaluate.overlap=0.0", "--set", "task.preprocess.spacing=[6,6,6]"]
VOCO = ["--set", "method.pretrain.steps=1", "--set", "method.pretrain.batch_size=1",
        "--set", "method.params.sw_batch_size=1", "--set", "method.params.n=2",
        "--set", "method.params.resize=[64,64,32]"]
LR_GRID = ["task.finetune.lr", "--method", "scratch", "--task", "phantom-mmwhs", "--values", "1e-3", "2e-3", "3e-3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process trials run on one torch thread (as --set run.num_threads=1 asks); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mmwhs_data(phantom_home):
    """Synthesise the phantom once, before any worker subprocess could race to write it."""
    root, phantom = locate_data(recipes.load_task("phantom-mmwhs"), None, log=lambda s: None)
    assert phantom
    return root


def _study(out: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journals = list((out / "sweeps").glob("*.journal"))
    assert len(journals) == 1, journals
    storage = JournalStorage(JournalFileBackend(str(journals[0])))
    return optuna.load_study(study_name=journals[0].stem, storage=storage)


def _by_state(study, state: str):
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == state]


def _finished_count(run_folder: str) -> int:
    return Path(run_folder, "log.txt").read_text().count("finished:")


def _cli(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "sslbench.sweep", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------------------------------
def test_unknown_key_is_one_line_with_did_you_mean(tmp_path, capsys):
    out = tmp_path / "runs"
    assert sweep.main(["lamda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: sweep key 'lamda'") and "did you mean 'lambda'" in err
    assert sweep.main(["method.params.lamda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'method.params.lambda'" in err
    assert sweep.main(["task.finetune", "--method", "scratch", "--out", str(out)]) == 2
    assert "is a section" in capsys.readouterr().err
    # a key that does not change what a run computes, and a TPE option on a grid
    assert sweep.main(["run.device", "--values", "cpu", "cuda", "--method", "scratch", "--out", str(out)]) == 2
    assert "does not change what a run computes" in capsys.readouterr().err
    assert sweep.main(["lambda", "--trials", "5", "--out", str(out)]) == 2
    assert "only for --sampler tpe" in capsys.readouterr().err
    assert not out.exists()                       # validated before any storage or run folder is made
    assert sweep.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: sslbench sweep") and "examples:\n  sslbench sweep lambda" in text


def _hold(path: Path, what: str) -> subprocess.Popen:
    """A live process holding the store lock at ``path`` (until killed), as a worker or `sslbench run` does."""
    code = ("import sys, time; from sslbench.store import lock as locks; "
            "held = locks.RunLock(sys.argv[1], sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path), what], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _point_folder(args, value) -> Path:
    """The run folder of one point of a sweep command: the run key the protocol computes (what a worker locks)."""
    import argparse

    from sslbench import protocol

    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    sw = sweep.build_sweep(parser.parse_args(args))
    _, plan, _ = protocol.planned_runs(sw.resolve(value), root=sw.root, corpus_root=sw.corpus_root,
                                       log=lambda *a, **k: None)
    return plan.path


def test_the_store_lock_tells_a_live_worker_from_a_dead_one(tmp_path):
    """Liveness is the run folder's lock: a RUNNING trial's worker lives while the lock is held (by this process,
    or by another one on this host), and is gone at once when it dies (kill -9: the kernel drops the flock; a pid
    reused since holds no lock); a worker of another machine is judged only by a lock file that names it."""
    folder = tmp_path / "runs" / "finetune" / "t" / "m" / "k-s0"
    me = {"host": platform.node(), "pid": os.getpid()}

    def trial(worker):
        return SimpleNamespace(user_attrs={"run_folder": str(folder)}, system_attrs={sweep.ATTR_WORKER: worker})

    held = locks.folder_lock(folder).acquire()
    with locks.holding(held):                                              # this very process
        assert not locks.folder_lock(folder).free() and sweep.worker_gone(trial(me), me) is None
        inner = locks.folder_lock(folder).acquire()           # the protocol's own lock inside: re-entered, no wait
        assert inner.held
        inner.release()
        assert held.held and not locks.folder_lock(folder).free()
    assert not held.held and locks.folder_lock(folder).free()              # released where the block ends

    holder = _hold(locks.folder_lock(folder).path, str(folder))
    alive = {"host": platform.node(), "pid": holder.pid}
    try:
        assert not locks.folder_lock(folder).try_acquire()
        assert sweep.worker_gone(trial(alive), me) is None                 # alive on this host
        assert f"{folder} is in use by pid {holder.pid} on " in locks.folder_lock(folder).in_use()
    finally:
        _kill(holder)
    assert "is gone" in sweep.worker_gone(trial(alive), me)               # dead on this host: at once
    assert "is gone" in sweep.worker_gone(trial(dict(alive, pid=os.getppid())), me)   # a live pid holding no
    #                                                                   lock (a pid reused since) is no sign of life
    probe = locks.folder_lock(folder)
    assert probe.free() and probe.left_by["pid"] == holder.pid            # its name is still in the lock file
    far = {"host": "elsewhere", "pid": 4321}
    assert sweep.worker_gone(trial(far), me) is None                      # not this machine's lock to judge
    probe.path.write_text(json.dumps({"pid": 4321, "host": "elsewhere", "since": "T", "run": str(folder)}))
    assert "is gone" in sweep.worker_gone(trial(far), me)                 # a shared --out: its file names it
    taker = locks.folder_lock(folder)
    assert taker.try_acquire() and taker.left_by["pid"] == 4321
    taker.release()
    assert locks.folder_lock(folder).free() and locks.folder_lock(folder).left_by is None   # released: empty


def test_lambda_grid_fills_table3_with_phantom_cells(mmwhs_data, tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["lambda", "--task", "phantom-mmwhs", "--out", str(out), *FAST, *VOCO]
    assert sweep.main(args) == 0
    text = capsys.readouterr().out
    assert "3/3 grid points complete" in text and "PHANTOM results" in text
    assert "renders Table 3" in text and f"sslbench report --runs {out}" in text

    study = _study(out)
    done = _by_state(study, "COMPLETE")
    assert sorted(t.params["method.params.lambda"] for t in done) == [0.5, 1.0, 1.5]
    for t in done:
        metrics = json.loads(Path(t.user_attrs["run_folder"], "metrics.json").read_text())
        assert t.user_attrs["value"] == t.params["method.params.lambda"]
        assert t.user_attrs["protocol"] == metrics["protocol"] and t.value == pytest.approx(metrics["mean_dice"])
        assert metrics["phantom"] is True and metrics["method"] == "voco"

    tables = {t.id: t for t in build_tables(load_published(), collect_runs(out))}
    t3 = tables["table3"]
    assert "mmwhs@phantom" in t3.column_ids
    for row in ("0.5", "1.0", "1.5"):
        cell = t3.cell(row, "mmwhs@phantom")
        assert cell.phantom and len(cell.groups) == 1 and cell.groups[0].n == 1
        assert cell.text().startswith("PHANTOM ")
        assert not t3.cell(row, "mmwhs").groups                       # never shown as the real MM-WHS

    # The same command again: the study is finished, nothing runs, no trial is added.
    assert sweep.main(args) == 0
    assert "nothing to run" in capsys.readouterr().out
    assert len(_study(out).trials) == 3


def test_killed_sweep_is_finished_without_running_a_point_twice(mmwhs_data, tmp_path, capsys):
    out = tmp_path / "runs"
    args = [*LR_GRID, "--out", str(out), *FAST]
    killed = _cli(args, {"SSLBENCH_KILL_AFTER_STEP": "1"})
    stdout, stderr = killed.communicate(timeout=600)
    assert killed.returncode == -9, stderr[-2000:]               # SIGKILL after step 1 of the first trial
    (left,) = _study(out).trials
    assert left.state.name == "RUNNING"

    assert sweep.main(args) == 0                                 # started again (another process: this one)
    text = capsys.readouterr().out
    assert "was left running" in text and "is gone" in text and f"retry of #{left.number}" in text
    study = _study(out)
    done = _by_state(study, "COMPLETE")
    values = [t.params["task.finetune.lr"] for t in done]
    assert sorted(values) == [1e-3, 2e-3, 3e-3]                  # each point completed exactly once
    (dead,) = _by_state(study, "FAIL")
    assert dead.number == left.number and sweep.ATTR_STALE in dead.system_attrs
    retry = next(t for t in done if t.system_attrs.get("retry_history") == [left.number])
    assert retry.params["task.finetune.lr"] == left.params["task.finetune.lr"]
    assert retry.user_attrs["run_folder"] == left.user_attrs["run_folder"]
    assert "resumed from step 1" in Path(retry.user_attrs["run_folder"], "log.txt").read_text()
    for t in done:
        assert _finished_count(t.user_attrs["run_folder"]) == 1

    assert sweep.main(args) == 0                                 # and once more: nothing to do
    assert "nothing to run" in capsys.readouterr().out
    assert len(_study(out).trials) == len(study.trials)


def test_two_workers_split_the_grid(mmwhs_data, tmp_path):
    out = tmp_path / "runs"
    args = [*LR_GRID, "--out", str(out), *FAST, "--set", "run.num_threads=1"]
    workers = [_cli(args), _cli(args)]
    results = [w.communicate(timeout=600) for w in workers]
    for w, (stdout, stderr) in zip(workers, results):
        assert w.returncode == 0, stderr[-2000:]
    study = _study(out)
    done = _by_state(study, "COMPLETE")
    assert sorted(t.params["task.finetune.lr"] for t in done) == [1e-3, 2e-3, 3e-3]
    assert len({t.system_attrs[sweep.ATTR_WORKER]["pid"] for t in done}) == 2    # both workers ran trials
    assert {t.system_attrs[sweep.ATTR_WORKER]["pid"] for t in done} == {w.pid for w in workers}
    for t in done:
        assert _finished_count(t.user_attrs["run_folder"]) == 1
    assert not _by_state(study, "RUNNING") and not _by_state(study, "WAITING")


def test_tpe_search_reports_validation_dice(mmwhs_data, tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["task.finetune.lr", "--method", "scratch", "--task", "phantom-mmwhs", "--sampler", "tpe",
            "--trials", "2", "--low", "1e-3", "--high", "1e-2", "--log", "--seed", "3", "--out", str(out), *FAST]
    assert sweep.main(args) == 0
    text = capsys.readouterr().out
    assert "2/2 trials finished" in text and "pruner median" in text
    study = _study(out)
    done = _by_state(study, "COMPLETE")
    assert len(done) == 2 and study.study_name.startswith("task.finetune.lr-scratch-phantom-mmwhs-tiny-s3-")
    for t in done:
        assert 1e-3 <= t.params["task.finetune.lr"] <= 1e-2
        assert list(t.intermediate_values) == [2]            # reported by on_validation at step 2
        assert t.intermediate_values[2] == pytest.approx(
            json.loads(Path(t.user_attrs["run_folder"], "metrics.json").read_text())["history"][-1]["val_dice"])


def test_a_point_locked_by_a_live_process_is_not_trained_by_a_second_worker(mmwhs_data, tmp_path, capsys):
    out = tmp_path / "runs"
    args = [*LR_GRID[:5], "--values", "1e-3", "2e-3", "--out", str(out), *FAST]
    held = _point_folder(args, 2e-3)
    holder = _hold(locks.folder_lock(held).path, str(held))     # another worker, or an `sslbench run` of the point
    try:
        assert sweep.main(args) == 0
        text = capsys.readouterr().out
        assert "1/2 grid points complete" in text and "left for now" in text
        assert f"{held} is in use by pid {holder.pid} on " in text
        assert not held.exists()                                           # never trained beside its holder
        study = _study(out)
        assert [t.params["task.finetune.lr"] for t in _by_state(study, "COMPLETE")] == [1e-3]
        assert not _by_state(study, "RUNNING") and not _by_state(study, "WAITING")
    finally:
        _kill(holder)
    assert sweep.main(args) == 0                                 # its holder gone: the next run takes the point
    assert "2/2 grid points complete" in capsys.readouterr().out
    done = _by_state(_study(out), "COMPLETE")
    assert sorted(t.params["task.finetune.lr"] for t in done) == [1e-3, 2e-3]
    assert {Path(t.user_attrs["run_folder"]) for t in done if t.params["task.finetune.lr"] == 2e-3} == {held.resolve()}
    for t in done:
        assert _finished_count(t.user_attrs["run_folder"]) == 1


def test_a_point_whose_lock_holder_died_is_resumed(mmwhs_data, tmp_path, capsys):
    """A point's run killed while it held its folder's lock (an `sslbench run`, kill -9 after step 1): the lock
    is free, its file still names the dead holder, and the sweep continues that folder from its checkpoint."""
    out = tmp_path / "runs"
    args = [*LR_GRID[:5], "--values", "1e-3", "--out", str(out), *FAST]
    folder = _point_folder(args, 1e-3)
    killed = subprocess.Popen([sys.executable, "-m", "sslbench", "run", "--method", "scratch", "--task", "phantom-mmwhs",
                               "--out", str(out), *FAST, "--set", "task.finetune.lr=1e-3"],
                              env=dict(os.environ, SSLBENCH_KILL_AFTER_STEP="1"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    _, stderr = killed.communicate(timeout=600)
    assert killed.returncode == -9, stderr[-2000:]
    assert json.loads((folder / "status.json").read_text())["state"] == "running"
    lock = locks.folder_lock(folder)
    assert lock.free() and lock.left_by["pid"] == killed.pid

    assert sweep.main(args) == 0
    assert "1/1 grid points complete" in capsys.readouterr().out
    (t,) = _by_state(_study(out), "COMPLETE")
    assert Path(t.user_attrs["run_folder"]) == folder.resolve() and t.user_attrs["action"] == "resume"
    assert "resumed from step 1" in (folder / "log.txt").read_text() and _finished_count(folder) == 1
    assert t.value == pytest.approx(json.loads((folder / "metrics.json").read_text())["mean_dice"])


def test_a_completed_point_is_told_from_its_metrics_without_training(mmwhs_data, tmp_path, capsys):
    """A point whose run is already finished (here by `sslbench run`; or a study whose journal was lost) is told
    to Optuna from its metrics.json, and nothing runs in its folder."""
    from sslbench.cli import main as cli_main

    out = tmp_path / "runs"
    args = [*LR_GRID[:5], "--values", "1e-3", "--out", str(out), *FAST]
    folder = _point_folder(args, 1e-3)
    assert cli_main(["run", "--method", "scratch", "--task", "phantom-mmwhs", "--out", str(out), *FAST,
                     "--set", "task.finetune.lr=1e-3"]) == 0
    log, metrics = (folder / "log.txt").read_text(), json.loads((folder / "metrics.json").read_text())
    capsys.readouterr()
    assert sweep.main(args) == 0
    text = capsys.readouterr().out
    assert "told from its metrics.json, nothing trained" in text and "1/1 grid points complete" in text
    (t,) = _by_state(_study(out), "COMPLETE")
    assert t.user_attrs["action"] == "skip" and t.value == pytest.approx(metrics["mean_dice"])
    assert Path(t.user_attrs["run_folder"]) == folder.resolve()
    assert (folder / "log.txt").read_text() == log                        # nothing ran in it
