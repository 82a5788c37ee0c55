"""Issue 19: run folders that cannot collide. Run key = protocol + data fingerprint; one process per run folder
(flock); failed runs say why in status.json and start over cleanly; a full disk and a corrupt checkpoint are
one line each."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sslbench.store import lock as locks
from sslbench.store.run_key import run_key
from sslbench.cli import main
from sslbench.data.fingerprint import fingerprint
from sslbench.errors import DataError, RecipeError, RunError

FAST = ["--preset", "tiny", "--set", "task.finetune.max_steps=4", "--set", "task.finetune.roi=[64,32,32]",
        "--set", "task.finetune.num_samples=1", "--set", "task.finetune.val_every=4",
        "--set", "task.finetune.checkpoint_every=2", "--set", "task.finetune.log_every=2",
        "--set", "task.evaluate.overlap=0.0", "--set", "task.finetune.warmup_steps=1"]


def _tree(root: Path, files: dict[str, bytes]) -> list[dict]:
    items = []
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    for img in sorted(n for n in files if n.startswith("img")):
        items.append({"id": img, "image": str(root / img), "label": str(root / img.replace("img", "lab"))})
    return items


def test_fingerprint_follows_files_sizes_mtimes_root_and_content(tmp_path, monkeypatch):
    a = tmp_path / "a"
    items = _tree(a, {"img1.nii": b"1111", "lab1.nii": b"22", "img2.nii": b"333", "lab2.nii": b"4"})
    first = fingerprint(a, items)
    assert first["files"] == 4 and first["mode"] == "stat" and first["root"] == str(a.resolve())
    assert fingerprint(a, items) == first                                   # deterministic
    assert fingerprint(a, items[:1])["fingerprint"] != first["fingerprint"]  # another split: other files
    st = os.stat(a / "lab2.nii")
    os.utime(a / "lab2.nii", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    touched = fingerprint(a, items)
    assert touched["fingerprint"] != first["fingerprint"]
    (a / "lab2.nii").write_bytes(b"44")                                    # size changed
    os.utime(a / "lab2.nii", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint(a, items)["fingerprint"] not in (first["fingerprint"], touched["fingerprint"])
    b = tmp_path / "b"                                                      # an exact copy elsewhere: another root
    shutil.copytree(a, b, copy_function=shutil.copy2)
    items_b = [{k: v.replace(str(a), str(b)) for k, v in it.items()} for it in items]
    assert fingerprint(b, items_b)["fingerprint"] != fingerprint(a, items)["fingerprint"]
    # content checksums: a touch alone changes nothing, a changed byte does
    monkeypatch.setenv("SSLBENCH_DATA_FINGERPRINT", "content")
    c0 = fingerprint(a, items)
    assert c0["mode"] == "content"
    os.utime(a / "img1.nii", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert fingerprint(a, items) == c0
    (a / "img1.nii").write_bytes(b"1112")
    assert fingerprint(a, items)["fingerprint"] != c0["fingerprint"]
    monkeypatch.setenv("SSLBENCH_DATA_FINGERPRINT", "sizes")
    with pytest.raises(RecipeError, match=r"SSLBENCH_DATA_FINGERPRINT: 'sizes'; expected one of stat, content"):
        fingerprint(a, items)
    monkeypatch.delenv("SSLBENCH_DATA_FINGERPRINT")
    with pytest.raises(DataError, match=r"img9.nii: listed by the datalist of .* but not found$"):
        fingerprint(a, items + [{"id": "9", "image": str(a / "img9.nii"), "label": None}])


def test_phantom_fingerprint_is_settings_and_names_wherever_and_whenever_written(tmp_path):
    marker = json.dumps({"like": "btcv", "cases": 2, "seed": 0, "generator": "g", "version": 3})
    trees = []
    for where in ("x", "y/deeper"):
        root = tmp_path / where
        items = _tree(root, {"img1.nii": b"1", "lab1.nii": b"2", "sslbench_phantom.json": marker.encode()})
        trees.append(fingerprint(root, items))
    assert trees[0]["mode"] == "phantom" and trees[0]["files"] == 2
    assert trees[0]["fingerprint"] == trees[1]["fingerprint"]              # other root, other mtimes: same data
    other = tmp_path / "z"
    items = _tree(other, {"img1.nii": b"1", "lab1.nii": b"2",
                          "sslbench_phantom.json": marker.replace('"seed": 0', '"seed": 1').encode()})
    assert fingerprint(other, items)["fingerprint"] != trees[0]["fingerprint"]   # other generator settings


def test_run_key_combines_protocol_data_and_pretraining():
    d1, d2 = {"fingerprint": "aaaa"}, {"fingerprint": "bbbb"}
    key = run_key("p1", d1)
    assert len(key) == 12 and key == run_key("p1", dict(d1, root="/elsewhere"))
    assert len({key, run_key("p2", d1), run_key("p1", d2), run_key("p1", d1, "pre")}) == 4


def test_a_lock_names_its_owner_and_a_dead_owners_lock_is_taken_over(tmp_path):
    path = locks.lock_path(tmp_path, tmp_path / "finetune" / "t" / "m" / "k-s0")
    assert path == tmp_path / "locks" / "finetune" / "t" / "m" / "k-s0.lock"
    first = locks.RunLock(path, "RUN").acquire()
    with pytest.raises(RunError, match=rf"^RUN is in use by pid {os.getpid()} on \S+ since \d{{4}}-\d\d-\d\dT"):
        locks.RunLock(path, "RUN").acquire()
    first.release()
    locks.RunLock(path, "RUN").acquire().release()
    # a holder killed with SIGKILL: the kernel drops its flock; the next run takes the lock over
    code = ("import sys, time; from sslbench.store import lock as locks; held = locks.RunLock(sys.argv[1], 'RUN').acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"in use by pid {holder.pid} "):
            locks.RunLock(path, "RUN").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    mine = locks.RunLock(path, "RUN").acquire()
    assert mine.owner()["pid"] == os.getpid()
    mine.release()


def test_two_identical_runs_started_together_never_share_a_folder(phantom_home, tmp_path, capsys):
    args = ["run", "--method", "scratch", "--task", "phantom-btcv", "--out", str(tmp_path), *FAST,
            "--set", "task.finetune.max_steps=400"]
    first = subprocess.Popen([sys.executable, "-m", "sslbench", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        lock = None
        for _ in range(1200):           # the first run names its folder and locks it
            found = list((tmp_path / "locks").rglob("*.lock")) if (tmp_path / "locks").is_dir() else []
            if found and locks.RunLock(found[0], "").owner().get("pid") == first.pid:
                lock = found[0]
                break
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.25)
        assert lock is not None
        for extra in ([], ["--resume"], ["--force"]):       # none of them may touch the live run's folder
            assert main([*args, *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"is in use by pid {first.pid} on " in err, err
        rel = lock.relative_to(tmp_path / "locks")
        run = tmp_path / rel.parent / rel.name[: -len(".lock")]
        assert f"error: {run} is in use by pid" in err and run.name.endswith("-s0")
        for _ in range(400):
            if (run / "status.json").is_file():
                break
            time.sleep(0.25)
        assert json.loads((run / "status.json").read_text())["state"] == "running"   # not marked failed by them
        assert [p.name for p in run.parent.iterdir()] == [run.name]                   # one folder, the live run's
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def _real_btcv(tmp_path) -> Path:
    """A phantom BTCV tree without its marker: sslbench takes it for real data (mtimes count)."""
    root = tmp_path / "btcv"
    assert main(["data", "synth", "--like", "btcv", "--out", str(root), "--cases", "4"]) == 0
    (root / "sslbench_phantom.json").unlink()
    return root


def test_changed_data_full_disk_and_corrupt_checkpoints(phantom_home, tmp_path, capsys, monkeypatch):
    import torch

    root = _real_btcv(tmp_path)
    out = tmp_path / "runs"
    args = ["run", "--method", "scratch", "--task", "btcv", "--root", str(root), "--out", str(out), *FAST]
    folder = out / "finetune" / "btcv" / "scratch"
    assert main(args) == 0
    (done,) = folder.iterdir()
    metrics = json.loads((done / "metrics.json").read_text())
    data = json.loads((done / "data.json").read_text())
    assert data["root"] == str(root.resolve()) and data["files"] == 8 and data["mode"] == "stat"   # 4 cases x 2
    assert done.name == f"{metrics['run_key']}-s0" and metrics["data_fingerprint"] == data["fingerprint"]
    status = json.loads((done / "status.json").read_text())
    assert status["run_key"] == metrics["run_key"] and status["protocol"] == metrics["protocol"] != metrics["run_key"]
    assert main(args) == 0 and "already finished" in capsys.readouterr().out

    # one label file touched: another run key, a new run (not "already finished"); a full disk stops it at its
    # first checkpoint with one line and status failed
    label = sorted((root / "labelsTr").iterdir())[0]
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    (failed,) = [p for p in folder.iterdir() if p != done]
    last = failed / "checkpoints" / "last.pt"
    assert err == f"error: disk full writing {last}"
    status = json.loads((failed / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"] == f"disk full writing {last}" and status["step"] == 0
    assert not list((failed / "checkpoints").glob("*.tmp"))       # no half-written file left
    assert json.loads((done / "status.json").read_text())["state"] == "finished"   # the other data's run untouched

    # the identical command again, space back: starts the failed folder over (no --force) and finishes
    monkeypatch.setattr(torch, "save", real_save)
    assert main(args) == 0
    assert json.loads((failed / "status.json").read_text())["state"] == "finished"
    assert "failed" not in (failed / "log.txt").read_text()       # a clean start: the old log went with the folder
    assert sorted(p.name for p in folder.iterdir()) == sorted([done.name, failed.name])
    capsys.readouterr()

    # a corrupt or truncated checkpoint: one line, for evaluate --checkpoint and for --resume
    best = failed / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:200])
    assert main(["evaluate", str(failed), "--checkpoint", str(best)]) == 2
    assert capsys.readouterr().err.strip() == f"error: not a checkpoint: {best} (truncated or corrupt)"
    last.write_bytes(b"not a zip file at all")
    st = json.loads((failed / "status.json").read_text())
    (failed / "status.json").write_text(json.dumps(dict(st, state="running")))      # as after a kill
    assert main([*args, "--resume"]) == 2
    assert capsys.readouterr().err.strip() == f"error: not a checkpoint: {last} (truncated or corrupt)"
    status = json.loads((failed / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"] == f"not a checkpoint: {last} (truncated or corrupt)"


def test_the_report_marks_a_cell_whose_runs_read_different_data(tmp_path):
    from test_report import _tables, write_run

    from sslbench.report.cells import MIXED_DATA_MARK
    from sslbench.report.render import render_table
    from sslbench.store.records import atomic_write_json

    runs = tmp_path / "runs"
    folders = [write_run(runs, seed=seed, dice=0.9) for seed in (0, 1)]
    for folder in folders:
        atomic_write_json(folder / "data.json", {"root": "/data/x", "fingerprint": "f0", "files": 8})
    df, tables = _tables(runs)
    assert list(df["data_fingerprint"]) == ["f0", "f0"] and list(df["data"]) == ["/data/x", "/data/x"]
    assert MIXED_DATA_MARK not in render_table(tables["table5"], "md")
    atomic_write_json(folders[1] / "data.json", {"root": "/data/x", "fingerprint": "f1", "files": 8})
    df, tables = _tables(runs)
    cell = tables["table5"].cell("average", "mmwhs")
    assert cell.mixed_data and cell.text() == "90.54 / 90.00 ± 0.00 (Δ -0.54, n=2) ‡data"
    assert "‡data: this cell's runs read different data" in render_table(tables["table5"], "md")
