"""Issue 19, the rest of "refused runs leave half-written folders" and "waits or says in use": an --init checkpoint
that matches no backbone tensor (classification: refused before its folder exists; segmentation: status failed
with the one-line reason, and the identical command starts cleanly), and a lock waited for inside a sweep."""
from __future__ import annotations

import threading
import time

import torch

from sslbench.store import lock as locks
from sslbench.cli import main
from sslbench.data import phantoms


def _resnet_like(path):
    torch.save({"conv1.weight": torch.zeros(4, 1, 3, 3), "fc.bias": torch.zeros(2)}, path)
    return path


def test_a_checkpoint_matching_no_tensor_is_refused_with_one_line(phantom_home, tmp_path, capsys):
    ckpt = _resnet_like(tmp_path / "resnet.pt")
    # classification: the checkpoint is matched before the run folder is created
    cc = phantoms.synth("ccccii", tmp_path / "cc", cases=6, seed=0)
    out = tmp_path / "runs"
    assert main(["finetune", "--task", "phantom-ccccii", "--root", str(cc), "--init", str(ckpt), "--out", str(out),
                 "--set", "task.preprocess.size=[32,32,32]", "--set", "task.finetune.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {ckpt}: matches no backbone tensor of swinunetr") and "\n" not in err, err
    assert not (out / "finetune").exists()
    # segmentation too (one fine-tuning flow for every task kind): the checkpoint is matched once the cases are
    # loaded and before the run folder is created, so a refused run leaves none and the identical command is
    # refused the same way
    args = ["finetune", "--task", "phantom-btcv", "--init", str(ckpt), "--out", str(out),
            "--set", "task.finetune.max_steps=1", "--set", "task.finetune.roi=[64,32,32]",
            "--set", "task.finetune.num_samples=1", "--set", "run.cache=none"]
    for _ in range(2):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {ckpt}: matches no backbone tensor of swinunetr") and "\n" not in err, err
        assert not (out / "finetune").exists()


def test_inside_a_sweep_a_locked_folder_is_waited_for(tmp_path):
    path = locks.lock_path(tmp_path, tmp_path / "finetune" / "t" / "m" / "k-s0")
    held = locks.RunLock(path, "RUN").acquire()
    said, got = [], []

    def second():
        with locks.waiting():
            got.append(locks.RunLock(path, "RUN").acquire(say=said.append))

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)
    assert t.is_alive() and not got                       # waiting, not failing
    assert said and said[0].startswith("waiting: RUN is in use by pid ")
    held.release()
    t.join(10)
    assert got and got[0].held
    got[0].release()


def test_voxel_checks_run_once_per_case_and_are_cached_with_it(phantom_home, tmp_path, monkeypatch):
    """'Voxel checks once per case, cached with the case': a cached case passed them (their version is in the
    cache key), so the up-front checks of --force skip it; a case that fails them is never cached."""
    import nibabel as nib
    import numpy as np
    import pytest

    from sslbench import protocol, recipes
    from sslbench.data.cases import load_cases
    from sslbench.data.locate import locate_data, read_splits
    from sslbench.data import check
    from sslbench.data.cache import CaseCache, preprocessing_key
    from sslbench.data.transforms import preprocess_transforms
    from sslbench.errors import DataError

    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    cfg = recipes.resolve("scratch", "phantom-btcv", preset="tiny", overrides=[])
    task = cfg["task"]
    root, _ = locate_data(task, None, log=lambda *_: None)
    splits = read_splits(task, root)
    items = [*splits["train"], *splits["val"]]
    key = preprocessing_key(task, True)
    monkeypatch.setattr(check, "VOXEL_CHECKS", check.VOXEL_CHECKS + 1)
    assert preprocessing_key(task, True) != key                    # another version of the checks: a cache miss
    monkeypatch.setattr(check, "VOXEL_CHECKS", check.VOXEL_CHECKS - 1)

    checked = []
    real_call = check.LoadChecked.__call__
    monkeypatch.setattr(check.LoadChecked, "__call__", lambda self, d: checked.append(d["image"]) or real_call(self, d))
    protocol.check_run_cases(cfg, "finetune", items, force=True)
    assert sorted(checked) == sorted(it["image"] for it in items)  # nothing cached: every case checked once
    load_cases(items[:1], preprocess_transforms(task), "cache", cache=CaseCache(task), write=True)
    checked.clear()
    protocol.check_run_cases(cfg, "finetune", items, force=True)
    assert sorted(checked) == sorted(it["image"] for it in items[1:])   # the cached case is not read again

    bad = tmp_path / "nan.nii.gz"
    img = nib.load(items[1]["image"])
    data = np.asarray(img.dataobj).astype(np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), bad)
    item = {**items[1], "id": "nan", "image": str(bad)}
    with pytest.raises(DataError, match=r"contains 1 NaN or infinite voxel"):
        load_cases([item], preprocess_transforms(task), "cache", cache=CaseCache(task), write=True)
    assert CaseCache(task).get(item) is None                       # a refused case is never cached


def test_a_loss_the_task_kind_does_not_train_with_is_refused_before_any_work(phantom_home, tmp_path, capsys):
    """task.finetune.loss is read: it must name the kind's loss (it is part of the protocol hash), one line naming
    the recipe file and the key, before a pre-training or a run folder exists."""
    out = tmp_path / "runs"
    for task, loss, expected in (("phantom-btcv", "ce", "'dicece'"), ("phantom-ccccii", "dicece", "'ce'"),
                                 ("phantom-chestxray14", "ce", "'bce'")):
        assert main(["run", "--method", "voco", "--task", task, "--out", str(out),
                     "--set", f"task.finetune.loss={loss}"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{task}.yaml: key 'finetune.loss': '{loss}'" in err and expected in err and "\n" not in err, err
        assert not out.exists()
