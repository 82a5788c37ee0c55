"""The streaming pre-training loader (``method.pretrain.loader: stream``, sslbench/data/stream.py): its sampler,
shards and memory plan; the protocol reproduces the memory loader's batches, itself, and itself after a kill;
peak host memory does not grow with the corpus."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sslbench.cli import main
from sslbench.data.stream import CachedVolumes, StepSampler, native_crop, plan_workers, shard, step_indices

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from stream_memory import write_corpus  # noqa: E402  (the benchmark's corpus writer: one copy)

MB = 2 ** 20


# ---------------------------------------------------------------------------------------------- units
def test_step_indices_are_the_memory_loaders_draw_and_resume_mid_run():
    # the memory loader's rng: default_rng([seed, step]) (rank r > 0: [seed, step, r]), integers(0, n, batch)
    assert step_indices(10, 3, 7, 5) == np.random.default_rng([7, 5]).integers(0, 10, size=3).tolist()
    assert step_indices(10, 3, 7, 5, rank=2) == np.random.default_rng([7, 5, 2]).integers(0, 10, size=3).tolist()
    whole = list(StepSampler(10, 3, 7, 0, 6))
    assert len(whole) == 6 and list(StepSampler(10, 3, 7, 4, 6)) == whole[4:]   # a run resumed at step 4
    assert whole[0] != whole[1]


def test_shards_are_disjoint_and_cover_the_corpus():
    items = list(range(7))
    assert shard(items, 0, 2) == [0, 2, 4, 6] and shard(items, 1, 2) == [1, 3, 5]
    assert shard(items, 0, 1) == items
    with pytest.raises(Exception, match="at least one volume per process"):
        shard([0], 1, 2)


def test_plan_keeps_batches_in_flight_within_the_budget():
    # batch 10 MB, source volume 5 MB, 4 workers wanted: (4 x 1 + 2) x 10 + 4 x 5 = 80 MB <= 100; prefetch 2 would
    # need (4 x 2 + 2) x 10 + 20 = 120 MB
    p = plan_workers(10 * MB, 5 * MB, 100, workers=4)
    assert (p.workers, p.prefetch, p.bound_bytes) == (4, 1, 80 * MB)
    # 1000 MB: 4 workers, prefetch up to (4p + 2) x 10 + 20 <= 1000 -> p = 8 (the cap)
    assert plan_workers(10 * MB, 5 * MB, 1000, workers=4).prefetch == 8
    # 50 MB: 3 workers need 65, 2 need 50 -> 2 workers, prefetch 1
    p = plan_workers(10 * MB, 5 * MB, 50, workers=4)
    assert (p.workers, p.prefetch, p.bound_bytes) == (2, 1, 50 * MB)
    # below one worker's minimum (35 MB): one worker, prefetch 1, said so
    p = plan_workers(10 * MB, 5 * MB, 30, workers=4)
    assert (p.workers, p.prefetch) == (1, 1) and "below" in p.describe()


def test_cached_volumes_resize_image_trilinear_and_labels_nearest(tmp_path):
    image = np.zeros((1, 2, 2, 2), np.float32)
    image[0, 1] = 1.0                          # x = 1 half bright
    label = np.zeros((1, 2, 2, 2), np.float32)
    label[0, :, 1] = 3                         # y = 1 half label 3
    np.save(tmp_path / "a.image.npy", image)
    np.save(tmp_path / "a.label.npy", label)
    ds = CachedVolumes([(tmp_path / "a.image.npy", tmp_path / "a.label.npy")], (4, 2, 2), with_label=True)
    out = ds[0]
    assert type(out) is torch.Tensor and out.shape == (2, 4, 2, 2)
    # trilinear (align_corners False) 2 -> 4 along x: 0, 0.25, 0.75, 1
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])
    assert out[1, 0, :, 0].tolist() == [0.0, 3.0] and set(out[1].unique().tolist()) == {0.0, 3.0}


def test_native_crop_cuts_a_seeded_box_at_the_stored_spacing_and_pads_short_axes():
    volume = torch.arange(6 * 3 * 2, dtype=torch.float32).reshape(1, 6, 3, 2) + 1   # no zero voxel
    out = native_crop(volume, (4, 3, 4), seed=1, step=2, rank=0, slot=1)
    assert out.shape == (1, 4, 3, 4)
    # x: offset in 0..2 drawn from rng([1, 2, 0, 1, 3]); y: whole (3 = 3); z: 2 voxels kept, 2 padded with 0
    off = int(np.random.default_rng([1, 2, 0, 1, 3]).integers(0, 3))
    assert torch.equal(out[:, :, :, :2], volume[:, off:off + 4]) and not out[:, :, :, 2:].any()
    assert torch.equal(native_crop(volume, (4, 3, 4), 1, 2, 0, 1), out)          # deterministic in its key
    others = {int(native_crop(volume, (4, 3, 4), 1, s, 0, 0)[0, 0, 0, 0]) for s in range(12)}
    assert others == {1, 7, 13}                       # x offsets 0, 1, 2 (6 voxels per x slab) all drawn


def test_a_native_crop_never_reuses_the_random_number_that_picked_its_volume():
    """Slot 0's crop key must not seed the step's volume draw (numpy ignores trailing zero seed words: [s, t, 0, 0]
    seeds like [s, t]): with 3 volumes and 3 crop offsets the two draws would then be equal at every step."""
    volume = torch.arange(5 * 2 * 2, dtype=torch.float32).reshape(1, 5, 2, 2) + 1
    same = 0
    for step in range(40):
        for rank in (0, 1):
            picked = step_indices(3, 1, 11, step, rank=rank)[0]
            offset = int(native_crop(volume, (3, 2, 2), 11, step, rank, 0)[0, 0, 0, 0] - 1) // 4   # 4 voxels per x slab
            same += picked == offset
    assert same < 40          # independent draws agree about 1 time in 3 (80 pairs); the shared stream: 80 of 80


# ---------------------------------------------------------------------------------------------- protocol
FAST = ["--method", "simsiam", "--corpus", "phantom-corpus", "--set", "method.pretrain.steps=4",
        "--set", "method.pretrain.log_every=1", "--set", "method.pretrain.checkpoint_every=2",
        "--set", "run.loader_workers=1", "--set", "run.num_threads=1"]   # one thread: bit-exact comparisons
STREAM = ["--set", "method.pretrain.loader=stream"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process runs set torch's thread count (run.num_threads=1); give the next test of this worker its own."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _metrics(out):
    return json.loads(next(out.rglob("metrics.json")).read_text())


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus", 6)


def test_stream_reproduces_itself_and_the_memory_loader(corpus, tmp_path, capsys):
    for name, extra in (("s1", STREAM), ("s2", STREAM), ("m", [])):
        assert main(["pretrain", *FAST, "--corpus-root", str(corpus), "--out", str(tmp_path / name), *extra]) == 0
    s1, s2, m = (_metrics(tmp_path / n) for n in ("s1", "s2", "m"))
    assert s1["loader"] == "stream" and m["loader"] == "memory"
    assert len(s1["history"]) == 4 and s1["history"] == s2["history"]
    # one process: the stream delivers the memory loader's batches, so the same losses to the last bit
    assert s1["history"] == m["history"]
    assert s1["protocol"] != m["protocol"]          # the loader is part of the protocol (shards under torchrun)
    run = next((tmp_path / "s1").rglob("metrics.json")).parent
    log = (run / "log.txt").read_text()
    assert "loader stream: 1 worker(s)" in log and "rank 0 of 1 reads its shard of 6 of 6 volumes" in log
    assert log.count(" data_wait ") == 4
    assert 0.0 <= json.loads((run / "status.json").read_text())["data_wait"] <= 1.0
    assert 0.0 <= m["data_wait"] <= 1.0
    # the case cache was filled on first use and reused: the second run caches nothing
    out = capsys.readouterr().out
    assert out.count("caching 6 of 6 corpus volumes") == 1


def test_native_crops_stream_reproducible_boxes_and_need_the_stream(corpus, tmp_path, capsys):
    native = [*STREAM, "--set", "method.pretrain.native_crops=true", "--set", "method.pretrain.steps=2"]
    for name in ("n1", "n2"):
        assert main(["pretrain", *FAST, *native, "--corpus-root", str(corpus), "--out", str(tmp_path / name)]) == 0
    a, b = _metrics(tmp_path / "n1"), _metrics(tmp_path / "n2")
    assert len(a["history"]) == 2 and a["history"] == b["history"]
    capsys.readouterr()
    code = main(["pretrain", *FAST, "--set", "method.pretrain.native_crops=true", "--corpus-root", str(corpus),
                 "--out", str(tmp_path / "m")])
    assert code == 2 and "needs pretrain.loader stream" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


TRANSVW = ["--method", "transvw", "--preset", "tiny", "--corpus", "phantom-corpus", "--set", "model.name=unet3d",
           "--set", "method.pretrain.steps=2", "--set", "method.pretrain.log_every=1",
           "--set", "run.loader_workers=1", "--set", "run.num_threads=1"]


def test_transvw_streams_its_self_discovery_to_the_memory_loaders_visual_words(corpus, tmp_path):
    """TransVW's prepare needs one embedding per volume (streams_prepare): the stream computes them from the case
    cache, so one process discovers the memory loader's visual words and trains to the same losses."""
    for name, extra in (("m", []), ("s", STREAM)):
        assert main(["pretrain", *TRANSVW, "--corpus-root", str(corpus), "--out", str(tmp_path / name), *extra]) == 0
    m, s = _metrics(tmp_path / "m"), _metrics(tmp_path / "s")
    assert s["loader"] == "stream" and len(s["history"]) == 2 and s["history"] == m["history"]
    words = [torch.load(next((tmp_path / n).rglob("last.pt")), weights_only=True)["method"] for n in ("m", "s")]
    for key in ("vw_coords", "vw_members", "vw_refs", "vw_radius"):
        assert torch.equal(words[0][key], words[1][key]), key
    assert words[0]["vw_members"].shape == (4, 4)               # tiny preset: 4 classes x 4 of the 6 volumes


def test_stream_refuses_what_it_cannot_set_up_in_one_line(corpus, tmp_path, capsys):
    from sslbench import recipes
    from sslbench.methods.base import PretrainMethod
    from sslbench.protocol import check_loader

    class WholeCorpus(PretrainMethod):            # a set-up on the whole corpus, not per volume
        def prepare(self, corpus, seed):
            pass

    cfg = recipes.split_config(recipes.resolve("simsiam", None, overrides=["method.pretrain.loader=stream"]), "corpus")
    with pytest.raises(Exception, match="sets itself up on the whole corpus in memory.*expected loader memory"):
        check_loader(cfg, WholeCorpus)
    check_loader(cfg, PretrainMethod)
    code = main(["pretrain", *TRANSVW, *STREAM, "--set", "method.pretrain.native_crops=true", "--corpus-root",
                 str(corpus), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "native_crops" in err and "expected native_crops false" in err and "\n" not in err
    assert not (tmp_path / "t").exists()                    # refused before any run folder exists


def _cli(out, corpus, env_extra=None, *extra):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, "-m", "sslbench", "pretrain", *FAST, *STREAM, "--corpus-root", str(corpus),
           "--out", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def test_stream_resumes_after_kill_to_the_same_metrics(corpus, tmp_path):
    assert main(["pretrain", *FAST, *STREAM, "--corpus-root", str(corpus), "--out", str(tmp_path / "a")]) == 0
    killed = _cli(tmp_path / "b", corpus, {"SSLBENCH_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9, killed.stderr            # SIGKILL after step 3 (last checkpoint: step 2)
    resumed = _cli(tmp_path / "b", corpus, None, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 2" in resumed.stdout
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert a["protocol"] == b["protocol"] and a["history"] == b["history"]


PEAK = """
import json, resource, sys
from sslbench.cli import main
code = main(sys.argv[1:])
# VmHWM: the peak of this process's own address space; ru_maxrss would carry the RSS of the (large) pytest
# process that forked it, since Linux keeps the high-water mark across exec
self_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": code, "self_mb": self_kb / 1024, "workers_mb": child_kb / 1024}))
"""


@pytest.mark.skipif(os.environ.get("SSLBENCH_BENCH") != "1",
                    reason="a memory benchmark, not a unit test (peaks are noisy on a loaded 2-core machine): "
                           "SSLBENCH_BENCH=1 python -m pytest -s tests/test_stream.py -k peak")
def test_stream_peak_host_memory_does_not_grow_with_the_corpus(tmp_path):
    """Stream against the memory loader, peak host memory (VmHWM of the run's process; ru_maxrss of the loader
    workers) at 50 and 200 volumes of 96^3 x 4 bytes resized (200 of them: 690 MB, which the memory loader holds).

    Measured 2026-12-03 on the 2-core dev machine: stream 2508 MB at 50 and 2715 MB at 200 volumes (+1.4 MB per
    volume at that noise), the memory loader 3305 MB at 200; issue 22's 500 vs 2,000 figures (flat) come from
    benchmarks/stream_memory.py (BENCHMARKS.md). What this asserts is what
    holds: the stream never holds the corpus (its peak at 200 stays 400 MB under the memory loader's) and grows
    less than half as fast as the resized corpus; the workers' peak stays flat. 50 vs 200 rather than the issue's
    500 vs 2,000: writing and caching 2,000 volumes takes minutes on a shared 2-core CI machine."""
    # a clean environment: no sslbench or torchrun variables left by earlier tests of this worker
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SSLBENCH_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SSLBENCH_CACHE=str(tmp_path / "cache"), SSLBENCH_DATA=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    big = ["--set", "method.params.resize=[96,96,96]", "--set", "method.pretrain.steps=2"]
    peaks = {}
    for loader, n in (("stream", 50), ("stream", 200), ("memory", 200)):
        corpus = tmp_path / f"c{n}"
        if not corpus.is_dir():
            write_corpus(corpus, n, side=20, seed=n)
        cmd = [sys.executable, "-c", PEAK, "pretrain", *FAST, *big, "--set", f"method.pretrain.loader={loader}",
               "--corpus-root", str(corpus), "--out", str(tmp_path / f"{loader}{n}")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[loader, n] = json.loads(done.stdout.strip().splitlines()[-1])
    print("peak RSS (MB):", {f"{k[0]} {k[1]}": v for k, v in peaks.items()})
    corpus_mb = 150 * 96 ** 3 * 4 / 2 ** 20          # the 150 more resized volumes at 200 than at 50: 527 MB
    assert peaks["stream", 200]["self_mb"] - peaks["stream", 50]["self_mb"] < corpus_mb / 2, peaks
    assert peaks["stream", 200]["workers_mb"] - peaks["stream", 50]["workers_mb"] < 60, peaks
    # the control: the memory loader's peak carries the 200 resized volumes (690 MB) the stream never holds
    assert peaks["memory", 200]["self_mb"] - peaks["stream", 200]["self_mb"] > 400, peaks


def test_bench_pretrain_from_disk_times_the_streaming_loader(corpus):
    from sslbench.bench import bench_pretrain

    out = bench_pretrain(device="cpu", feature_size=12, crop=32, batch=1, sw=1, n=2, steps=2, warmup=0,
                         precision="fp32", from_disk={"corpus": "phantom-corpus", "root": str(corpus), "workers": 1})
    assert out["corpus_volumes"] == 6 and out["loader_workers"] == 1 and out["size"] == [96, 96, 32]
    assert 0.0 <= out["data_wait"] < 1.0 and out["loader_volumes_per_s"] > 0 and out["valid"] is True


def test_two_processes_read_disjoint_shards(corpus, tmp_path):
    """`pretrain --gpus 2` on CPU (gloo) with the stream: rank 0 reads 3 of the 6 volumes and caches only those;
    the other 3 in the cache can only come from rank 1's shard; one record."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sslbench", "pretrain", *FAST, *STREAM, "--gpus", "2", "--set", "run.device=cpu",
           "--set", "method.pretrain.steps=2", "--corpus-root", str(corpus), "--out", str(tmp_path / "d")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("caching 3 of 3 corpus volumes") == 1            # rank 0 talks: its shard only
    run = next((tmp_path / "d").rglob("metrics.json")).parent
    assert "rank 0 of 2 reads its shard of 3 of 6 volumes" in (run / "log.txt").read_text()
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2
    assert len(list((tmp_path / "cache").rglob("*.image.npy"))) == 6          # both shards cached, by their ranks


def test_two_processes_discover_the_single_process_visual_words(corpus, tmp_path):
    """TransVW `--gpus 2` (gloo) with the stream: each rank embeds only its shard (volumes 0, 2, 4 | 1, 3, 5); the
    embeddings gathered and interleaved back give the visual words of one process holding the whole corpus."""
    assert main(["pretrain", *TRANSVW, "--set", "method.pretrain.steps=1", "--corpus-root", str(corpus),
                 "--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sslbench", "pretrain", *TRANSVW, *STREAM, "--gpus", "2", "--set", "run.device=cpu",
           "--set", "method.pretrain.steps=1", "--corpus-root", str(corpus), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _metrics(tmp_path / "two")["world_size"] == 2
    one, two = (torch.load(next((tmp_path / n).rglob("last.pt")), weights_only=True)["method"] for n in ("one", "two"))
    for key in ("vw_coords", "vw_members", "vw_refs", "vw_radius"):
        assert torch.equal(one[key], two[key]), key
