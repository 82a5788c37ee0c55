"""Per-run TensorBoard event files (<run dir>/tb/): what the run logs, once per step, across a resume."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from sslbench.cli import main  # noqa: E402
from sslbench.protocol import _SilentRecord  # noqa: E402
from sslbench.store.records import RunRecord  # noqa: E402

from test_protocol import FAST, _only_run  # noqa: E402


def _scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_scalars_of_a_resumed_process_replace_what_the_killed_one_logged_from_its_first_step(tmp_path):
    first = RunRecord(tmp_path / "run")
    for step, loss in [(2, 0.9), (4, 0.8), (6, 0.7)]:       # a process that dies after logging step 6
        first.scalars(step, {"finetune/loss": loss, "val/dice": None})
    first._tb.close()                                      # (its file as a killed process leaves it: flushed)
    second = RunRecord(tmp_path / "run")                   # resumed from the checkpoint of step 4
    second.scalars(6, {"finetune/loss": 0.5, "val/dice": float("nan")})
    second.scalars(8, {"finetune/loss": 0.4, "val/dice": 0.25})
    second.set_status(state="finished")                    # closes the writer
    assert second._tb is None
    assert len(list((tmp_path / "run" / "tb").iterdir())) == 2      # one event file per process
    got = _scalars(tmp_path / "run", "finetune/loss")
    assert [s for s, _ in got] == [2, 4, 6, 8]
    assert [v for _, v in got] == pytest.approx([0.9, 0.8, 0.5, 0.4])
    assert _scalars(tmp_path / "run", "val/dice") == [(8, pytest.approx(0.25))]   # None / NaN left out

    silent = _SilentRecord(tmp_path / "rank1")             # torchrun ranks > 0 write nothing
    silent.scalars(2, {"finetune/loss": 1.0})
    assert not (tmp_path / "rank1").exists()


def _cli(out, env_extra=None, *extra):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, "-m", "sslbench", "run", "--method", "scratch", "--task", "phantom-btcv", "--out", str(out),
           *FAST, "--set", "task.finetune.checkpoint_every=4", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def test_a_run_killed_and_resumed_has_the_loss_lr_and_dice_of_every_logged_step_once(phantom_home, tmp_path):
    killed = _cli(tmp_path, {"SSLBENCH_KILL_AFTER_STEP": "7"})   # logged 2, 4, 6; last checkpoint: step 4
    assert killed.returncode == -9, killed.stderr
    # resumed (in this process: the killed one had to be a process of its own): logs 6 and 8 again
    assert main(["run", "--method", "scratch", "--task", "phantom-btcv", "--out", str(tmp_path), *FAST,
                 "--set", "task.finetune.checkpoint_every=4", "--resume"]) == 0
    run = _only_run(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [(h["step"], h["loss"]) for h in metrics["history"] if "loss" in h]
    assert [s for s, _ in losses] == [2, 4, 6, 8]
    got = _scalars(run, "finetune/loss")
    assert [s for s, _ in got] == [2, 4, 6, 8]                  # step 6 of the killed process purged
    assert [v for _, v in got] == pytest.approx([v for _, v in losses], rel=1e-6)
    dice = [(h["step"], h["val_dice"]) for h in metrics["history"] if "val_dice" in h]
    assert [s for s, _ in _scalars(run, "val/dice")] == [s for s, _ in dice] == [4, 8]
    assert [v for _, v in _scalars(run, "val/dice")] == pytest.approx([v for _, v in dice], rel=1e-6)
    # lr 2e-3 after 2 warm-up steps, then a half cosine to 0 over the 6 others: 2e-3 * (1 + cos(pi * (s - 2) / 6)) / 2
    lr = _scalars(run, "finetune/lr")
    assert [s for s, _ in lr] == [2, 4, 6, 8]
    assert [v for _, v in lr] == pytest.approx([2e-3, 1.5e-3, 5e-4, 0.0], abs=1e-9)
    (final,) = _scalars(run, "eval/mean_dice")
    assert final == (8, pytest.approx(metrics["mean_dice"], rel=1e-6))
