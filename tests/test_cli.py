"""The command line: help with examples, one-line errors, list tables, not-yet-built commands."""
import subprocess
import sys

import pytest

from sslbench.cli import EXAMPLES, main


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_command_has_help_with_an_example(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    assert code in (0, None)
    out = capsys.readouterr().out
    assert "example" in out and f"sslbench {command}" in out


def test_list_tables(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    for name in ("voco", "scratch", "mg", "transvw", "simsiam", "pcrlv1", "pcrlv2", "mae", "swinunetr-ssl"):
        assert name in out
    assert "available" in out and "planned" not in out          # every method of the brief is built
    assert main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("btcv", "mmwhs", "msd-spleen", "phantom-btcv", "brats21", "ccccii", "chestxray14"):
        assert name in out


@pytest.mark.parametrize("argv, needle", [
    (["run", "--method", "vocoo"], "unknown method 'vocoo' (did you mean 'voco'?)"),
    (["run", "--task", "btcvv"], "unknown task 'btcvv' (did you mean 'btcv'?)"),
    (["run", "--set", "task.finetune.lrr=1"], "unknown key 'task.finetune.lrr'"),
    (["run", "--task", "btcv"], "task 'btcv' needs --root DIR"),
    (["run", "--task", "btcv", "--root", "/nonexistent/btcv"], "/nonexistent/btcv: dataset root not found"),
    (["run", "--task", "lits", "--root", "."], "no known layout of task 'lits' found; expected lits: "),
    (["pretrain", "--method", "scratch"], "method 'scratch' has no pre-training"),
    (["pretrain", "--method", "mg", "--gpus", "0"], "--gpus: expected a positive number of processes, got 0"),
    (["finetune", "--init", "/nonexistent.pt"], "/nonexistent.pt: checkpoint file not found"),
    (["data", "synth", "--like", "btcvv", "--out", "/tmp/x"], "btcvv"),
])
def test_user_errors_are_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err and "Traceback" not in err


def test_report_and_sweep_are_reachable_from_the_cli(tmp_path, capsys):
    assert main(["report", "--runs", str(tmp_path / "none"), "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert "Table 5" in out and "91.32" in out and "Table 3" in out
    assert main(["sweep", "lamda", "--task", "phantom-mmwhs"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and "lambda" in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "sslbench", "list", "methods"], capture_output=True, text=True)
    assert out.returncode == 0 and "voco" in out.stdout
