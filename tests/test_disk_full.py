"""Issue 19: a real full disk (a 1 MiB tmpfs as the run's --out) stops a run with one line, status ``failed`` and no
half-written file; the identical command, space back, starts the folder over and finishes.

The tmpfs is mounted inside an unprivileged user + mount namespace (``unshare --user --map-root-user --mount``),
so no root is needed; where the kernel or a container forbids that, the test is skipped with the reason and
tests/test_runkey.py's injected ENOSPC remains. tmpfs reports the full disk as ENOSPC from the write itself:
torch's zip writer turns it into a RuntimeError ("unexpected pos ...") whose context holds the OSError.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sslbench.data import phantoms

DRIVER = r'''
import json, subprocess, sys
from pathlib import Path
from sslbench.cli import main

out, result, args = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
def state():
    return {"status": {str(p.parent): json.loads(p.read_text()) for p in out.glob("finetune/*/*/*/status.json")},
            "temporary": [str(p) for p in out.rglob(".*.tmp")],
            "logs": {str(p.parent): p.read_text() for p in out.glob("finetune/*/*/*/log.txt")}}
rc_full = main(args)
full = state()
sys.stderr.write("--- space back ---\n")
subprocess.run(["mount", "-o", "remount,size=256m", str(out)], check=True)
rc_retry = main(args)
result.write_text(json.dumps({"rc_full": rc_full, "full": full, "rc_retry": rc_retry, "retry": state()}))
'''


def _namespace_tmpfs(where: Path) -> str | None:
    """None when a tmpfs can be mounted in a user + mount namespace here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    where.mkdir()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs '{where}'"], capture_output=True, text=True)
    where.rmdir()
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


def test_a_real_full_disk_fails_the_run_with_one_line_and_a_retry_starts_clean(phantom_home, tmp_path):
    why = _namespace_tmpfs(tmp_path / "probe")
    if why:
        pytest.skip(why)
    root = phantoms.synth("ccccii", tmp_path / "cc", cases=6, seed=0)
    out, result = tmp_path / "full", tmp_path / "result.json"
    out.mkdir()
    (tmp_path / "driver.py").write_text(DRIVER)
    args = ["finetune", "--task", "phantom-ccccii", "--root", str(root), "--out", str(out),
            "--set", "task.preprocess.size=[32,32,32]", "--set", "task.finetune.max_steps=2",
            "--set", "task.finetune.val_every=2", "--set", "task.finetune.checkpoint_every=2",
            "--set", "task.finetune.log_every=2"]
    # 1 MiB: the run's records fit, its first checkpoint (13 MB at this size) does not
    script = (f"mount -t tmpfs -o size=1m tmpfs '{out}' && exec '{sys.executable}' '{tmp_path / 'driver.py'}' "
              f"'{out}' '{result}' '{json.dumps(args)}'")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and result.is_file(), proc.stderr[-3000:]
    r = json.loads(result.read_text())
    full_err = proc.stderr.split("--- space back ---")[0]
    (run,) = r["full"]["status"]
    best = Path(run) / "checkpoints" / "best.pt"
    assert r["rc_full"] == 2
    errors = [ln for ln in full_err.splitlines() if ln.startswith("error: ") or "Traceback" in ln]
    assert errors == [f"error: disk full writing {best}"], full_err[-3000:]
    status = r["full"]["status"][run]
    assert status["state"] == "failed" and status["reason"] == f"disk full writing {best}" and status["step"] == 0
    assert r["full"]["temporary"] == []                          # the partial checkpoint went with the error
    assert r["rc_retry"] == 0 and list(r["retry"]["status"]) == [run]
    assert r["retry"]["status"][run]["state"] == "finished"
    assert "failed" not in r["retry"]["logs"][run]               # started over: the failed run's log went with it
