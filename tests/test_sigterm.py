"""SIGTERM (a scheduler's deadline, a batch system's time limit or pre-emption) stops a run as Ctrl-C does: no
temporary file is left, the folder is marked ``interrupted`` and the next identical command resumes it to the
record an uninterrupted run writes. Before, the process died mid-write and left a checkpoint-sized ``.tmp``."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import golden  # noqa: E402

from sslbench import distributed  # noqa: E402
from sslbench.errors import sigterm_as_interrupt, Terminated  # noqa: E402
from sslbench.store.records import atomic_torch_save  # noqa: E402

main_thread_only = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                      reason="signal handlers can only be installed from the main thread")


@main_thread_only
def test_sigterm_raises_terminated_inside_and_the_default_action_is_back_after():
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("not reached: the handler raises at once")   # pragma: no cover
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert issubclass(Terminated, KeyboardInterrupt)   # every interrupt path (Ctrl-C) handles it


@main_thread_only
def test_an_error_raised_while_a_sigterm_unwinds_marks_the_run_interrupted_not_failed(tmp_path):
    """Under a batch system every process of the job gets the signal: a loader worker dies of it and torch
    raises a RuntimeError in the main process while the Terminated unwinds; a repeat SIGTERM comes too."""
    from sslbench.errors import terminating
    from sslbench.protocol.runs import run_scope
    from sslbench.store.records import RunRecord

    rec = RunRecord(tmp_path / "run")
    rec.path.mkdir()
    rec.set_status(state="running", step=4, protocol="p1")
    released = []

    class Lock:
        def release(self):
            released.append(True)

    with pytest.raises(RuntimeError, match="killed by signal"):
        with sigterm_as_interrupt():
            with run_scope() as scope:
                scope.claimed.append((rec, Lock()))
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)   # the repeat, during the cleanup: ignored
                    assert terminating()
                    raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Terminated.")
    assert not terminating() and released == [True]
    status = json.loads((rec.path / "status.json").read_text())
    assert (status["state"], status["by"], status["step"]) == ("interrupted", "SIGTERM", 4)
    assert "reason" not in status


def test_an_interrupted_run_of_another_host_is_taken_over(tmp_path):
    """It wrote `interrupted` itself on its way out, so it is gone (a requeued job lands on another node);
    `running` from another host may still be alive there and is refused."""
    from sslbench.errors import RunError
    from sslbench.store.records import prepare_run_folder, RunRecord

    rec = RunRecord(tmp_path / "run")
    rec.path.mkdir()
    (rec.path / "status.json").write_text(json.dumps({"state": "interrupted", "by": "SIGTERM", "step": 3,
                                                      "protocol": "p1", "pid": 7, "host": "elsewhere"}))
    said = []
    assert prepare_run_folder(rec, "p1", resume=False, force=False, say=said.append) == "new"   # no last.pt
    assert said and "its run was stopped (SIGTERM at step 3, pid 7 on elsewhere" in said[0]
    rec.path.mkdir()
    (rec.path / "status.json").write_text(json.dumps({"state": "running", "step": 3, "protocol": "p1", "pid": 7,
                                                      "host": "elsewhere"}))
    with pytest.raises(RunError, match="recorded by pid 7 on elsewhere"):
        prepare_run_folder(rec, "p1", resume=False, force=False, say=said.append)


@main_thread_only
def test_a_handler_installed_by_the_caller_is_left_alone():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


class _StopsTheProcess:
    """Pickled halfway through a checkpoint: the process gets SIGTERM while the file is being written."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return (int, (0,))


@main_thread_only
def test_a_checkpoint_write_stopped_by_sigterm_leaves_neither_the_file_nor_a_temporary(tmp_path):
    target = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            atomic_torch_save({"model": {"w": torch.zeros(4096)}, "stop": _StopsTheProcess()}, target)
    assert list(target.parent.iterdir()) == []


def test_launch_passes_sigterm_to_torchrun_and_waits_for_it(monkeypatch):
    class Proc:
        def __init__(self, cmd):
            self.cmd, self.signals, self.waits = cmd, [], 0

        def wait(self, timeout=None):
            self.waits += 1
            if self.waits == 1:
                raise Terminated()       # SIGTERM reached `sslbench ... --gpus 2` while torchrun ran
            return -15

        def poll(self):
            return None if self.waits < 2 else -15

        def send_signal(self, signum):
            self.signals.append(signum)

    made = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd: made.append(Proc(cmd)) or made[-1])
    with pytest.raises(Terminated):
        distributed.launch(2, ["finetune", "--task", "btcv", "--gpus", "2"])
    assert made[0].signals == [signal.SIGTERM] and made[0].waits == 2
    assert "--nproc_per_node=2" in made[0].cmd and "--gpus" not in made[0].cmd

    class CtrlC(Proc):   # Ctrl-C reached torchrun and its ranks from the terminal: waited for, not signalled again
        def wait(self, timeout=None):
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt()
            return -2

    monkeypatch.setattr(subprocess, "Popen", lambda cmd: made.append(CtrlC(cmd)) or made[-1])
    with pytest.raises(KeyboardInterrupt):
        distributed.launch(2, ["finetune", "--task", "btcv", "--gpus", "2"])
    assert made[1].signals == [] and made[1].waits == 2


def test_a_run_stopped_by_sigterm_is_marked_interrupted_and_resumes_to_the_golden_record(tmp_path, phantom_home):
    """SIGTERM right after step 5 (last checkpoint: step 4): exit status 143, one line, no temporary file; the next
    identical command (no --resume) continues it from step 4 to the record of the uninterrupted golden run."""
    cmd = [sys.executable, "-m", "sslbench", *golden.command("scratch-btcv", tmp_path, phantom_home)]
    env = dict(os.environ, SSLBENCH_DATA=str(phantom_home), SSLBENCH_KILL_AFTER_STEP="5", SSLBENCH_KILL_SIGNAL="TERM",
               OMP_NUM_THREADS="1")
    stopped = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-1500:]
    assert stopped.stderr.strip().splitlines()[-1] == ("terminated (SIGTERM): the run folder keeps its last "
                                                       "checkpoint; continue with --resume")
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []
    run = next((tmp_path / "finetune" / "phantom-btcv" / "scratch").iterdir())
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["by"], status["step"]) == ("interrupted", "SIGTERM", 4)
    assert "interrupted (SIGTERM) at step 4" in (run / "log.txt").read_text()
    assert golden.run_in_process("scratch-btcv", tmp_path, phantom_home) == 0
    assert (f"{run}: its run was stopped (SIGTERM at step 4, pid {status['pid']} on {status['host']}, "
            f"{status['interrupted']}): resumed automatically") in (run / "log.txt").read_text()
    done = json.loads((run / "status.json").read_text())
    assert done["state"] == "finished" and "by" not in done and "interrupted" not in done
    expected = json.loads(golden.GOLDEN.read_text())["scratch-btcv"]
    problems = golden.differences(expected, golden.records("scratch-btcv", tmp_path, phantom_home), "resumed")
    assert not problems, "\n".join(problems[:20])


def test_stop_exit_words_and_statuses():
    from sslbench.errors import stop_exit, Terminated

    assert stop_exit(Terminated()) == ("terminated (SIGTERM)", 143)
    assert stop_exit(KeyboardInterrupt()) == ("interrupted", 130)
