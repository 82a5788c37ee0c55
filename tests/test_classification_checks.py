"""Issue 19 for the classification tasks (CC-CCII, ChestX-ray14): every run checks its images and labels before
its run folder exists (missing, empty, non-image, truncated, damaged or wrong-size files; labels outside the
classes), one line naming the file; a refused --force keeps the old folder; `evaluate` holds the run folder's lock."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslbench import recipes
from sslbench.store import lock as locks
from sslbench.cli import main
from sslbench.data import layouts, phantoms
from sslbench.data.classification_check import image_problem, label_problem

CC = ["--task", "phantom-ccccii", "--set", "task.preprocess.size=[32,32,32]", "--set", "task.finetune.max_steps=2",
      "--set", "task.finetune.val_every=2", "--set", "task.finetune.checkpoint_every=2",
      "--set", "task.finetune.log_every=2", "--set", "task.evaluate.batch_size=8"]
CX = ["--task", "phantom-chestxray14", "--set", "task.preprocess.size=[32,32]", "--set", "task.finetune.max_steps=2",
      "--set", "task.finetune.val_every=2", "--set", "task.finetune.batch_size=8"]


@pytest.fixture(scope="module")
def pristine_cc(tmp_path_factory) -> Path:
    return phantoms.synth("ccccii", tmp_path_factory.mktemp("pristine-cc") / "cc", cases=6, seed=0)


@pytest.fixture
def cc(pristine_cc, tmp_path) -> Path:
    """A fresh copy of a 6-patient CC-CCII phantom to damage."""
    root = tmp_path / "cc"
    shutil.copytree(pristine_cc, root)
    return root


def refused(capsys, task_args, root: Path, out: Path, *extra) -> str:
    """Run the fine-tuning; assert it is refused with one line and left no run folder; return the line."""
    assert main(["finetune", *task_args, "--root", str(root), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not (out / "finetune").exists()
    return err[len("error: "):]


def damage_inside(png: Path) -> None:
    """Flip bytes inside the compressed pixel data (IDAT) of a PNG; its header and IEND chunk stay intact."""
    data = bytearray(png.read_bytes())
    start = data.index(b"IDAT") + 4 + 20
    for k in range(start, start + 40):
        data[k] ^= 0x5A
    png.write_bytes(bytes(data))


def test_image_problem_on_hand_made_files(tmp_path):
    arr = np.arange(48, dtype=np.uint8).reshape(6, 8)
    png, jpg, gif = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.gif"
    Image.fromarray(arr).save(png)
    Image.fromarray(arr).save(jpg, quality=90)
    Image.fromarray(arr).save(gif)
    assert image_problem(png, "slice") == (None, (6, 8)) and image_problem(jpg, "slice", decode=True) == (None, (6, 8))
    assert image_problem(gif, "slice")[0] == f"{gif}: a GIF image; expected a PNG/JPG slice"
    cut = tmp_path / "cut.jpg"
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)).save(noise, format="JPEG")
    cut.write_bytes(noise.getvalue()[:-100])
    assert image_problem(cut, "slice")[0] == (f"{cut}: truncated JPEG (no end-of-image marker at its end); "
                                              f"expected a complete download")
    assert image_problem(tmp_path / "none.png", "radiograph")[0] == (
        f"{tmp_path / 'none.png'}: file not found; expected the radiograph file to exist")
    (tmp_path / "empty.png").write_bytes(b"")
    assert image_problem(tmp_path / "empty.png")[0] == f"{tmp_path / 'empty.png'}: empty file (0 bytes); expected a PNG/JPG image"
    # damage inside the compressed data: the header and the end marker are fine, only decoding finds it
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(big)
    damage_inside(big)
    assert image_problem(big) == (None, (64, 64))
    assert image_problem(big, decode=True)[0] == (f"{big}: cannot be read as an image (broken data stream when "
                                                  f"reading image file); expected a PNG/JPG image")


def test_labels_outside_the_classes_on_hand_made_cases():
    cc, cx = recipes.load_task("ccccii"), recipes.load_task("chestxray14")
    ok = {"id": "p1-s2", "image": "/d/NCP/1/2", "label": 2}
    assert label_problem(cc, ok) is None
    for bad in (3, -1, True, "1", None):
        assert label_problem(cc, {**ok, "label": bad}) == (
            f"case 'p1-s2' (/d/NCP/1/2): label {bad!r} is not a class index of task 'ccccii'; expected 0..2 "
            f"(0 Normal, 1 CP, 2 NCP)")
    assert label_problem(cx, {"id": "x", "image": "/i/x.png", "label": [0] * 13 + [1]}) is None
    for bad in ([0] * 13, [0] * 13 + [2], 1):
        line = label_problem(cx, {"id": "x", "image": "/i/x.png", "label": bad})
        assert line.startswith(f"case 'x' (/i/x.png): label {bad!r} is not one 0/1 entry per finding of task "
                               f"'chestxray14'; expected 14 values 0 or 1 (Atelectasis, "), line


def test_ccccii_bad_slices_are_refused_before_any_run_folder(phantom_home, cc, pristine_cc, tmp_path, capsys):
    out = tmp_path / "runs"
    scan = sorted(cc.glob("CP/*/*"))[0]
    slices = sorted(scan.iterdir())
    pristine = lambda p: pristine_cc / p.relative_to(cc)  # noqa: E731
    s = slices[3]
    s.write_bytes(pristine(s).read_bytes()[:-200])                          # a download cut short
    assert refused(capsys, CC, cc, out) == f"{s}: truncated PNG (no IEND chunk at its end); expected a complete download"
    s.write_bytes(b"<html>404 Not Found</html>")                            # an error page under the slice's name
    line = refused(capsys, CC, cc, out)
    assert line.startswith(f"{s}: cannot be read as an image (") and line.endswith("; expected a PNG/JPG slice")
    s.write_bytes(b"")
    assert refused(capsys, CC, cc, out) == f"{s}: empty file (0 bytes); expected a PNG/JPG slice"
    h, w = np.asarray(Image.open(slices[0])).shape
    Image.open(pristine(s)).resize((w // 2, h // 2)).save(s)                # a slice of another size
    assert refused(capsys, CC, cc, out) == (f"{s}: slice of {h // 2}x{w // 2} pixels in a scan of {h}x{w}; "
                                            f"expected equal slice sizes")
    shutil.copy(pristine(s), s)
    s.unlink()                                                              # a slice missing from the scan
    assert refused(capsys, CC, cc, out) == (f"{scan}: slice numbers jump from {slices[2].name} to {slices[4].name} "
                                            f"(1 missing); expected consecutive slices")
    shutil.copy(pristine(s), s)
    slices[-1].unlink()                                                     # the last slice: no gap, a short count
    line = refused(capsys, CC, cc, out)
    assert line.startswith(f"{scan}: {len(slices) - 1} slices, but unzip_filenames.csv line ") and \
        line.endswith(f"lists {len(slices)}; expected every slice of the scan (incomplete download?)")
    shutil.copy(pristine(slices[-1]), slices[-1])
    damage_inside(s)                      # intact header and IEND: found as the split loads, still before the folder
    line = refused(capsys, CC, cc, out)
    assert line == (f"{s}: cannot be read as an image (broken data stream when reading image file); "
                    f"expected an 8-bit PNG/JPG slice")
    assert not list(out.rglob("status.json"))


def test_ccccii_fold_target_outside_the_classes_is_refused(phantom_home, cc, tmp_path, capsys):
    csv = cc / "csv" / "CC_CCII_fold0_valid.csv"
    lines = csv.read_text().splitlines()
    cols = lines[1].split(",")
    assert cols[1] == str(["Normal", "CP", "NCP"].index(cols[2]))            # the official target column
    want = cols[1]
    cols[1] = "3"
    csv.write_text("\n".join([lines[0], ",".join(cols), *lines[2:]]) + "\n")
    assert refused(capsys, CC, cc, tmp_path / "runs") == (
        f"{csv} line 2: target '3' of scan p{cols[3]}-s{cols[4]} ({cols[2]}) is not its class index; expected {want} "
        f"(0 Normal, 1 CP, 2 NCP)")


def test_chestxray_missing_and_corrupt_radiographs_are_refused_before_any_run_folder(phantom_home, tmp_path, capsys):
    root = phantoms.synth("chestxray14", tmp_path / "cx", cases=24, seed=0)
    splits = layouts.read_datalist(recipes.load_task("phantom-chestxray14"), root)
    out = tmp_path / "runs"
    image = Path(splits["val"][0]["image"])
    whole = image.read_bytes()
    image.unlink()                        # not in images/ nor images_NNN/images/: the reader names images/<name>
    assert refused(capsys, CX, root, out) == (f"{root / 'images' / image.name}: file not found; expected the "
                                              f"radiograph file to exist")
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)                        # a PNG signature, then nothing
    line = refused(capsys, CX, root, out)
    assert line.startswith(f"{image}: cannot be read as an image (") and line.endswith("expected a PNG/JPG radiograph")
    image.write_bytes(whole[: len(whole) // 2])
    assert refused(capsys, CX, root, out) == (f"{image}: truncated PNG (no IEND chunk at its end); "
                                              f"expected a complete download")
    image.write_bytes(whole)
    other = Path(splits["train"][0]["image"])
    rgb = io.BytesIO()
    Image.open(other).convert("RGB").save(rgb, format="TIFF")
    other.write_bytes(rgb.getvalue())                                           # a TIFF named .png
    assert refused(capsys, CX, root, out) == f"{other}: a TIFF image; expected a PNG/JPG radiograph"


def test_force_keeps_the_old_folder_and_evaluate_holds_the_run_folders_lock(phantom_home, cc, pristine_cc,
                                                                            tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["finetune", *CC, "--root", str(cc), "--out", str(out)]
    assert main(args) == 0
    (run,) = (out / "finetune" / "phantom-ccccii" / "scratch").iterdir()
    before = json.loads((run / "status.json").read_text())
    assert before["state"] == "finished"
    s = sorted(sorted(cc.glob("NCP/*/*"))[0].iterdir())[1]
    damage_inside(s)
    capsys.readouterr()
    assert main([*args, "--force"]) == 2                   # --force decodes every image before it deletes anything
    assert capsys.readouterr().err.strip() == (f"error: {s}: cannot be read as an image (broken data stream when "
                                               f"reading image file); expected a PNG/JPG slice")
    assert json.loads((run / "status.json").read_text()) == before and (run / "metrics.json").is_file()
    shutil.copy(pristine_cc / s.relative_to(cc), s)

    # evaluate takes the lock file the training took, however the folder is spelled
    trained = locks.lock_path(out, run)
    assert trained.is_file() and locks.folder_lock(run).path == trained
    assert os.path.samefile(locks.folder_lock(os.path.relpath(run)).path, trained)
    # beside a training of the folder (another process holding its lock): refused with the holder's line
    code = ("import sys, time; from sslbench.store import lock as locks; held = locks.RunLock(sys.argv[1], sys.argv[2]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(trained), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["evaluate", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {run} is in use by pid {holder.pid} on ") and len(err.splitlines()) == 1, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not (run / "evaluation.json").exists()
    # while an evaluate holds it: a second evaluate and a training of that folder are refused
    with locks.folder_lock(run):
        for cmd in (["evaluate", str(run)], args, [*args, "--force"]):
            assert main(cmd) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: {run} is in use by pid {os.getpid()} on ") and "\n" not in err, err
    assert json.loads((run / "status.json").read_text()) == before
    assert main(["evaluate", str(run)]) == 0                                    # the lock free: it evaluates
    assert json.loads((run / "evaluation.json").read_text())["checkpoint"].endswith("best.pt")
