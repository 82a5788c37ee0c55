"""The streamed fine-tuning loader (``task.finetune.loader: stream``, sslbench/data/stream.py CropStream): its
step batches are the memory loader's, so one process reproduces the memory path's losses and Dice; it resumes
after kill -9 to the same metrics; data_wait is recorded for both loaders; under torchrun each rank caches and
reads only its shard of the training cases; what it cannot serve is refused in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sslbench.cli import main
from sslbench.data import phantoms

FAST = ["--task", "phantom-btcv", "--set", "task.finetune.max_steps=4", "--set", "task.finetune.roi=[64,32,32]",
        "--set", "task.finetune.num_samples=1", "--set", "task.finetune.batch_size=1",
        "--set", "task.finetune.val_every=0", "--set", "task.finetune.checkpoint_every=2",
        "--set", "task.finetune.log_every=1", "--set", "task.evaluate.overlap=0.0",
        "--set", "task.finetune.warmup_steps=1", "--set", "model.feature_size=12",
        "--set", "run.loader_workers=1", "--set", "run.num_threads=1"]   # one thread: bit-exact comparisons
STREAM = ["--set", "task.finetune.loader=stream"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A 4-case BTCV phantom: training 0001-0003, validation 0035."""
    return phantoms.synth("btcv", tmp_path_factory.mktemp("stream-ft") / "btcv", cases=4, seed=3)


@pytest.fixture()
def btcv(pristine, tmp_path, monkeypatch):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    return pristine


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process runs set torch's thread count (run.num_threads=1); give the next test of this worker its own."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run_dir(out: Path) -> Path:
    return next(out.rglob("metrics.json")).parent


def _metrics(out: Path) -> dict:
    return json.loads((_run_dir(out) / "metrics.json").read_text())


def _cli(out: Path, root: Path, env_extra=None, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "sslbench", "finetune", *FAST, *STREAM, "--root", str(root), "--out", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_stream_cuts_the_memory_loaders_crops_to_the_same_losses_and_resumes_after_kill(btcv, tmp_path, capsys):
    for name, extra in (("m", []), ("s1", STREAM)):
        assert main(["finetune", *FAST, "--root", str(btcv), "--out", str(tmp_path / name), *extra]) == 0
    m, s1 = (_metrics(tmp_path / n) for n in ("m", "s1"))
    assert m["loader"] == "memory" and s1["loader"] == "stream"
    losses = [h["loss"] for h in s1["history"] if "loss" in h]
    assert len(losses) == 4 and len(set(losses)) > 1
    # one process: the same cases, the same RandCropByPosNegLabel crops and flips, so the same losses to the bit
    assert s1["history"] == m["history"]
    assert [c["mean"] for c in s1["cases"]] == [c["mean"] for c in m["cases"]]
    # the loader is hashed when it is not the default (under torchrun the stream reads shards)
    assert s1["protocol"] != m["protocol"]
    for name in ("m", "s1"):
        run = _run_dir(tmp_path / name)
        log = (run / "log.txt").read_text()
        assert log.count(" data_wait ") == 4, log
        assert 0.0 <= json.loads((run / "status.json").read_text())["data_wait"] <= 1.0
        assert 0.0 <= _metrics(tmp_path / name)["data_wait"] < 1.0
    log = (_run_dir(tmp_path / "s1") / "log.txt").read_text()
    assert "loader stream: 1 worker(s)" in log and "rank 0 of 1 reads its shard of 3 of 3 training cases" in log
    assert "caching 4 of 4 cases (3 training, 1 validation)" in capsys.readouterr().out

    # killed (SIGKILL after step 3; last checkpoint: step 2) and resumed: the same crops, the same metrics
    killed = _cli(tmp_path / "k", btcv, {"SSLBENCH_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _cli(tmp_path / "k", btcv, None, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from step 2" in resumed.stdout and "caching" not in resumed.stdout     # the cache of s1 serves both
    k = _metrics(tmp_path / "k")
    assert k["protocol"] == s1["protocol"] and k["history"] == s1["history"]
    assert [c["mean"] for c in k["cases"]] == [c["mean"] for c in s1["cases"]]


def test_step_crops_are_the_memory_loaders_draw(tmp_path):
    """StepCrops on its own: step s's picks are rng([seed, s]) over the shard, the crops those of the transforms
    re-seeded with step_seed(seed, s, 0) applied in the drawn order; any step alone gives the same batch."""
    from monai import transforms as mt

    from sslbench.data.stream import StepCrops
    from sslbench.data.transforms import step_seed

    files, cases = [], []
    for i in range(3):
        image = np.full((1, 6, 6, 6), float(i), np.float32)
        image[0, 0, 0, 0] = 10.0 + i
        label = np.zeros((1, 6, 6, 6), np.float32)
        label[0, 2:4, 2:4, 2:4] = 1
        np.save(tmp_path / f"{i}.image.npy", image)
        np.save(tmp_path / f"{i}.label.npy", label)
        files.append((tmp_path / f"{i}.image.npy", tmp_path / f"{i}.label.npy"))
        cases.append({"image": torch.from_numpy(image), "label": torch.from_numpy(label)})
    aug = mt.Compose([mt.RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=(2, 2, 2),
                                                pos=1, neg=1, num_samples=2),
                      mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0)])
    ds = StepCrops(files, aug, batch_size=2, seed=5, rank=0)
    x, y = ds[3]
    assert x.shape == (4, 1, 2, 2, 2) and y.shape == (4, 1, 2, 2, 2)
    picks = np.random.default_rng([5, 3]).integers(0, 3, size=2).tolist()
    # the volumes are constant but for one corner voxel: each crop's value names the case it came from
    assert [int(v) for v in x[:, 0].amin(dim=(1, 2, 3))] == [p for p in picks for _ in range(2)]
    ref = mt.Compose([mt.RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=(2, 2, 2),
                                                pos=1, neg=1, num_samples=2),
                      mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0)])
    ref.set_random_state(seed=step_seed(5, 3, 0))
    want = [c for p in picks for c in ref(cases[p])]
    assert torch.equal(x, torch.stack([torch.as_tensor(c["image"]) for c in want]))
    assert torch.equal(y, torch.stack([torch.as_tensor(c["label"]) for c in want]))
    ds[0]
    x2, _ = ds[3]                                     # built again after another step: the same batch
    assert torch.equal(x, x2)


def test_stream_refuses_what_it_cannot_serve_in_one_line(btcv, phantom_home, tmp_path, capsys):
    code = main(["finetune", *FAST, *STREAM, "--set", "run.cache=none", "--root", str(btcv),
                 "--out", str(tmp_path / "n")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "run.cache: none" in err and "expected read or write" in err and "\n" not in err
    code = main(["finetune", "--task", "phantom-ccccii", *STREAM, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'finetune.loader': stream" in err and "classification" in err and "\n" not in err
    assert not (tmp_path / "n").exists() and not (tmp_path / "c").exists()


def test_two_processes_read_disjoint_training_shards(btcv, tmp_path):
    """`finetune --gpus 2` on CPU (gloo) with the stream: rank 0 caches and reads 2 of the 3 training cases
    (0001, 0003), rank 1 the other (0002); together they cache all 4 cases; one record, every case scored."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sslbench", "finetune", *FAST, *STREAM, "--gpus", "2", "--set", "run.device=cpu",
           "--set", "task.finetune.max_steps=2", "--root", str(btcv), "--out", str(tmp_path / "d")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("caching 3 of 3 cases (2 training, 1 validation)") == 1   # rank 0 talks: its shard only
    run = _run_dir(tmp_path / "d")
    assert "rank 0 of 2 reads its shard of 2 of 3 training cases" in (run / "log.txt").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["loader"] == "stream" and len(metrics["cases"]) == 1
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").rglob("*.image.npy"))
    assert len(cached) == 4 and len(set(cached)) == 4            # rank 1 cached its case; none twice


def test_crop_stream_plans_its_memory_from_the_crops_and_the_largest_case(tmp_path):
    """Batch: batch_size x num_samples crops of (channels + label) x roi float32; per worker: three times the
    largest case's image + label files (the case, and the crop sampler's int64 voxel indices)."""
    from sslbench.data.stream import CropStream

    files = []
    for i, side in enumerate((4, 8)):
        np.save(tmp_path / f"{i}.image.npy", np.zeros((1, side, side, side), np.float32))
        np.save(tmp_path / f"{i}.label.npy", np.zeros((1, side, side, side), np.float32))
        files.append((tmp_path / f"{i}.image.npy", tmp_path / f"{i}.label.npy"))
    largest = sum(os.path.getsize(p) for p in files[1])
    s = CropStream(files, None, batch_size=2, crops_per_case=3, roi=(4, 4, 2), channels=1, seed=0, workers=2,
                   budget_mb=1)
    assert s.plan.batch_bytes == 2 * 3 * 2 * 32 * 4 and s.plan.volume_bytes == 3 * largest
    # 1 MB holds two workers at the deepest prefetch (8): (2 x 8 + 2) batches + two workers' cases
    assert (s.plan.workers, s.plan.prefetch) == (2, 8) and s.plan.bound_bytes == 18 * 1536 + 2 * 3 * largest
    # a budget of exactly (1 + 2) batches + one worker's case: one worker, prefetch 1
    tight = CropStream(files, None, batch_size=2, crops_per_case=3, roi=(4, 4, 2), channels=1, seed=0, workers=2,
                       budget_mb=(3 * 1536 + 3 * largest) / 2 ** 20)
    assert (tight.plan.workers, tight.plan.prefetch, tight.plan.bound_bytes) == (1, 1, 3 * 1536 + 3 * largest)


def test_loader_is_hashed_only_when_it_streams():
    """task.finetune.loader at its default (memory) leaves the protocol hash of runs recorded before the key; stream
    is another protocol (under torchrun it reads shards); a pre-training's hash never sees the key."""
    from sslbench import recipes

    def hashes(*overrides):
        cfg = recipes.resolve("scratch", "phantom-btcv", overrides=list(overrides))
        return recipes.protocol_hash(recipes.split_config(cfg, "task"))

    base = recipes.split_config(recipes.resolve("scratch", "phantom-btcv"), "task")
    assert base["task"]["finetune"]["loader"] == "memory"
    without = {**base, "task": {**base["task"], "finetune": {k: v for k, v in base["task"]["finetune"].items()
                                                             if k != "loader"}}}
    assert recipes.protocol_hash(base) == recipes.protocol_hash(without) == hashes("task.finetune.loader=memory")
    assert hashes("task.finetune.loader=stream") != recipes.protocol_hash(base)
    voco = recipes.split_config(recipes.resolve("voco", "phantom-btcv"), "corpus")
    assert voco["corpus"]["finetune"]["loader"] == "memory"          # corpus recipes get the task defaults too
    corpus_without = {**voco, "corpus": {**voco["corpus"], "finetune": {
        k: v for k, v in voco["corpus"]["finetune"].items() if k != "loader"}}}
    assert recipes.protocol_hash(voco) == recipes.protocol_hash(corpus_without)


def test_a_corrupt_cache_file_is_one_line_from_the_worker(tmp_path):
    """A worker that cannot map a cached case: the DataLoader's re-raised traceback becomes the worker's own line."""
    from monai import transforms as mt

    from sslbench.data.stream import CropStream
    from sslbench.errors import DataError

    (tmp_path / "bad.image.npy").write_bytes(b"not an array")
    np.save(tmp_path / "bad.label.npy", np.zeros((1, 4, 4, 4), np.float32))
    s = CropStream([(tmp_path / "bad.image.npy", tmp_path / "bad.label.npy")], mt.Compose([]), batch_size=1,
                   crops_per_case=1, roi=(4, 4, 4), channels=1, seed=0, workers=1)
    with pytest.raises(DataError) as err:
        next(s.batches(0, 1))
    line = str(err.value)
    assert "\n" not in line and line.startswith(str(tmp_path / "bad.image.npy")) and "cannot be read" in line


def test_run_refuses_a_streamed_classification_before_pre_training(tmp_path, capsys):
    """`sslbench run` checks the fine-tuning loader in its preflight: nothing is pre-trained for a refused run."""
    code = main(["run", "--method", "simsiam", "--task", "phantom-ccccii", *STREAM, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'finetune.loader': stream" in err and "\n" not in err
    assert not (tmp_path / "r").exists()
