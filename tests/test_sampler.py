"""The pre-training samplers (``method.pretrain.sampler``, sslbench/data/sampler.py) on hand-computed cases: under
``epoch`` global sample g = s*B*W + r*B + i reads P_{g // N}[g % N]; every volume once per epoch across ranks; rank
r of W reads rows r*B..(r+1)*B-1 of the 1-process batch W*B; a resumed step is computed alone; ``step`` is the
draw of every run before the key."""
import numpy as np
import pytest

from sslbench.data.sampler import (draw, epoch_indices, epoch_permutation, global_samples, sample_key, step_indices,
                                   volumes_of)

N, B, W, SEED = 5, 2, 2, 7
#: numpy's PCG64 permutations of range(5) from rng([7, e, 1]), pinned: a change of the stream changes every draw
P = {0: [2, 3, 4, 1, 0], 1: [4, 1, 0, 3, 2], 2: [2, 4, 1, 3, 0]}


def test_global_sample_index_of_step_rank_and_slot():
    # s * (B * W) + r * B + i
    assert list(global_samples(0, B, 0, W)) == [0, 1] and list(global_samples(0, B, 1, W)) == [2, 3]
    assert list(global_samples(1, B, 0, W)) == [4, 5] and list(global_samples(2, B, 1, W)) == [10, 11]
    assert list(global_samples(3, 4)) == [12, 13, 14, 15]                 # one process: s * B + i


def test_volumes_of_reads_the_epoch_permutation_at_g_mod_n():
    # an injected permutation: identity in even epochs, reversed in odd ones
    perm = lambda e: list(range(N)) if e % 2 == 0 else list(range(N))[::-1]
    # g 0..4 -> epoch 0 -> 0 1 2 3 4; g 5..9 -> epoch 1 -> 4 3 2 1 0; g 10, 11 -> epoch 2 -> 0 1
    assert volumes_of(range(12), N, perm) == [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 1]
    with pytest.raises(ValueError, match="at least one"):
        volumes_of([0], 0, perm)


def test_epoch_sampler_hand_computed_over_two_epochs():
    assert [epoch_permutation(N, SEED, e).tolist() for e in range(3)] == [P[0], P[1], P[2]]
    assert epoch_permutation(N, SEED, 0).tolist() != epoch_permutation(N, SEED + 1, 0).tolist()   # seeded
    # step, rank -> g -> P_{g//5}[g%5]
    want = {(0, 0): [P[0][0], P[0][1]],      # g 0, 1
            (0, 1): [P[0][2], P[0][3]],      # g 2, 3
            (1, 0): [P[0][4], P[1][0]],      # g 4, 5: the step crosses into epoch 1
            (1, 1): [P[1][1], P[1][2]],      # g 6, 7
            (2, 0): [P[1][3], P[1][4]],      # g 8, 9
            (2, 1): [P[2][0], P[2][1]]}      # g 10, 11
    assert want == {(0, 0): [2, 3], (0, 1): [4, 1], (1, 0): [0, 4], (1, 1): [1, 0], (2, 0): [3, 2], (2, 1): [2, 4]}
    for (s, r), vols in want.items():
        assert epoch_indices(N, B, SEED, s, r, W) == vols, (s, r)
        assert draw("epoch", N, B, SEED, s, r, W) == vols


def test_every_volume_once_per_epoch_across_ranks():
    read = []                                      # in global sample order, both ranks
    for s in range(5):                             # 5 steps x 2 ranks x 2 = 20 samples = 4 epochs
        for r in range(W):
            read += epoch_indices(N, B, SEED, s, r, W)
    epochs = [read[e * N:(e + 1) * N] for e in range(4)]
    assert all(sorted(e) == list(range(N)) for e in epochs)
    assert epochs[0] == P[0] and epochs[1] == P[1]
    # the step draw has no epoch: with replacement, some volume repeats within the first 5 samples
    steps = [v for s in range(3) for r in range(W) for v in step_indices(N, B, SEED, s, r)]
    assert any(sorted(steps[k:k + N]) != list(range(N)) for k in range(0, len(steps) - N, N))


def test_rank_rows_equal_the_one_process_rows_of_batch_w_times_b():
    for s in range(4):
        one = epoch_indices(N, W * B, SEED, s, 0, 1)
        assert len(one) == W * B
        for r in range(W):
            assert epoch_indices(N, B, SEED, s, r, W) == one[r * B:(r + 1) * B], (s, r)
    # four ranks of one against one process of four
    assert [v for r in range(4) for v in epoch_indices(7, 1, 3, 5, r, 4)] == epoch_indices(7, 4, 3, 5)


def test_a_resumed_step_reads_what_the_uninterrupted_run_read():
    from sslbench.data import sampler

    whole = [epoch_indices(N, B, SEED, s, 1, W) for s in range(6)]
    sampler._permutation.cache_clear()            # a fresh process: no cached permutation
    assert [epoch_indices(N, B, SEED, s, 1, W) for s in range(3, 6)] == whole[3:]


def test_step_sampler_is_todays_draw_and_bad_names_are_one_line():
    assert draw("step", 10, 3, 7, 5) == np.random.default_rng([7, 5]).integers(0, 10, size=3).tolist()
    assert draw("step", 10, 3, 7, 5, rank=2, world_size=4) == \
        np.random.default_rng([7, 5, 2]).integers(0, 10, size=3).tolist()
    with pytest.raises(ValueError, match="method.pretrain.sampler: 'epochs'; expected one of step, epoch"):
        draw("epochs", 10, 3, 7, 5)


def test_sample_key_is_distinct_from_the_permutation_stream():
    # numpy drops trailing zero words: [7, 0] seeds as [7]; the tags keep g = e = 0 apart
    assert np.random.default_rng([7, 0]).integers(0, 10 ** 9) == np.random.default_rng([7]).integers(0, 10 ** 9)
    a = np.random.default_rng(sample_key(7, 0)).integers(0, 10 ** 9, size=4).tolist()
    b = np.random.default_rng([7, 0, 1]).integers(0, 10 ** 9, size=4).tolist()
    assert sample_key(7, 0) == [7, 0, 2] and a != b


def test_the_streams_step_sampler_yields_volume_and_global_sample_and_resumes():
    from sslbench.data.stream import StepSampler

    whole = list(StepSampler(N, B, SEED, 0, 3, rank=1, sampler="epoch", world_size=W))
    assert whole == [[(4, 2), (1, 3)], [(1, 6), (0, 7)], [(2, 10), (4, 11)]]   # (P_{g//5}[g%5], g), g = 4s + 2 + i
    assert list(StepSampler(N, B, SEED, 2, 3, rank=1, sampler="epoch", world_size=W)) == whole[2:]
    # the default is today's draw, untouched by world_size
    assert list(StepSampler(10, 3, 7, 0, 2, rank=1, world_size=4)) == [step_indices(10, 3, 7, s, 1) for s in (0, 1)]


def test_native_crops_under_epoch_are_keyed_by_the_global_sample_not_the_rank(tmp_path):
    import torch

    from sslbench.data.stream import CachedVolumes, native_box

    volume = np.arange(1 * 9 * 8 * 7, dtype=np.float32).reshape(1, 9, 8, 7)
    np.save(tmp_path / "v.image.npy", volume)
    ranks = [CachedVolumes([(tmp_path / "v.image.npy", None)], (4, 4, 4), native=True, seed=SEED, rank=r)
             for r in (0, 1)]
    box = native_box(torch.from_numpy(volume), (4, 4, 4), sample_key(SEED, 6))
    assert torch.equal(ranks[0][(0, 6)], box) and torch.equal(ranks[1][(0, 6)], box)
    assert not torch.equal(ranks[0][(0, 6)], ranks[0][(0, 7)]) or not torch.equal(ranks[0][(0, 7)], ranks[0][(0, 8)])
    # the step keys (index, step, slot) still seed by the rank, as before the key
    assert not all(torch.equal(ranks[0][(0, s, 0)], ranks[1][(0, s, 0)]) for s in range(4))


# ---------------------------------------------------------------------------------------------- protocol, 2 processes
# Supervised is the method whose step is deterministic given its volumes once its one crop is the whole volume
# (crop = resize) and it never flips (flip_prob 0): SwinUNETR has no batch statistics, DiceCE of B samples is the
# mean of its per-sample Dice and voxel CE, so 2 ranks x 2 averaged by DDP are 1 process x 4 up to summation order.
# SGD (not AdamW, whose m / sqrt(v) turns rounding noise in a near-zero gradient into a full-size step) keeps the
# weight change proportional to the gradients.
SUPERVISED = ["--method", "supervised", "--corpus", "phantom-btcv", "--preset", "tiny",
              "--set", "method.params.resize=[64,64,64]", "--set", "method.params.crop=[64,64,64]",
              "--set", "method.params.flip_prob=0", "--set", "model.feature_size=12",
              "--set", "corpus.preprocess.spacing=[6,6,6]", "--set", "method.pretrain.steps=3",
              "--set", "method.pretrain.log_every=1", "--set", "method.pretrain.sampler=epoch",
              "--set", "method.pretrain.optimizer=sgd", "--set", "method.pretrain.lr=0.01",
              "--set", "run.loader_workers=1", "--set", "run.num_threads=1"]
STEPS = 3    # 3 steps x global batch 4 = 12 samples over 5 volumes: epochs 0 (g 0-4) and 1 (g 5-9) whole, 2 begun


@pytest.fixture(scope="module")
def btcv(tmp_path_factory):
    """A 5-volume labelled corpus: a BTCV phantom, training 0001-0005 (0035 is its validation case)."""
    from sslbench.data import phantoms

    return phantoms.synth("btcv", tmp_path_factory.mktemp("sampler-btcv") / "btcv", cases=6, seed=3)


@pytest.fixture(scope="module")
def one_process(btcv, tmp_path_factory):
    """The 1-process batch-4 memory-loader run on ``btcv``: (corpus root, cache folder, its reads by global sample,
    its history, its weight change)."""
    import torch

    from sslbench.cli import main
    from sslbench.data.stream import READ_LOG

    home, root = tmp_path_factory.mktemp("sampler"), btcv
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSLBENCH_CACHE", str(home / "cache"))
        mp.setenv(READ_LOG, str(home / "reads-one"))
        assert main(["pretrain", *SUPERVISED, "--set", "method.pretrain.batch_size=4", "--corpus-root", str(root),
                     "--out", str(home / "one")]) == 0
    torch.set_num_threads(threads)
    (row,) = _reads(home / "reads-one", 1)
    return root, home / "cache", {r["sample"]: (r["volume"], r["sha1"]) for r in row}, \
        _metrics(home / "one")["history"], _moved(home / "one")


def _reads(folder, world):
    import json

    return [[json.loads(line) for line in (folder / f"reads.rank{r}.jsonl").read_text().splitlines()]
            for r in range(world)]


def _metrics(out):
    import json

    return json.loads(next(out.rglob("metrics.json")).read_text())


def _moved(out):
    """backbone.pt minus the backbone the protocol starts from (torch.manual_seed(run.seed) before the method)."""
    import torch

    from sslbench import recipes
    from sslbench.protocol.pretraining import method_class

    overrides = [a for a in SUPERVISED[SUPERVISED.index("--set"):] if a != "--set"]
    cfg = recipes.split_config(recipes.resolve("supervised", None, preset="tiny", overrides=overrides,
                                               corpus="phantom-btcv"), "corpus")
    cls, params, _, _ = method_class(cfg)
    torch.manual_seed(0)
    start = cls(params, cfg["model"]).backbone_state_dict()
    end = torch.load(next(out.rglob("backbone.pt")), weights_only=True)
    assert end.keys() == start.keys()
    return {k: end[k].float() - start[k].float() for k in end}


def _two_processes(one_process, tmp_path, loader):
    import os
    import subprocess
    import sys

    from sslbench.data.stream import READ_LOG

    root, cache, _, _, _ = one_process
    env = dict(os.environ, OMP_NUM_THREADS="1", SSLBENCH_CACHE=str(cache), **{READ_LOG: str(tmp_path / "reads")})
    cmd = [sys.executable, "-m", "sslbench", "pretrain", *SUPERVISED, "--gpus", "2", "--set", "run.device=cpu",
           "--set", "method.pretrain.batch_size=2", "--set", f"method.pretrain.loader={loader}",
           "--corpus-root", str(root), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _metrics(tmp_path / "two")["world_size"] == 2
    return _reads(tmp_path / "reads", 2)


def _equals_one_process(one_process, tmp_path, reads):
    root, _, ref_reads, ref_history, ref_moved = one_process
    # each rank read exactly its global samples g = 4s + 2r + i, once each (the stream's workers nothing else)
    for r, rows in enumerate(reads):
        assert sorted(row["sample"] for row in rows) == [4 * s + 2 * r + i for s in range(STEPS) for i in range(B)]
    by_g = {row["sample"]: (row["volume"], row["sha1"]) for rows in reads for row in rows}
    # across the ranks every volume once per epoch, and per global sample the volume and bytes of one process x 4
    assert sorted(by_g[g][0] for g in range(0, 5)) == sorted(by_g[g][0] for g in range(5, 10)) == list(range(5))
    assert by_g == ref_reads
    # the gradient: the same losses and the same weight change as one process on the concatenated batch
    history = _metrics(tmp_path / "two")["history"]
    assert [h["step"] for h in history] == [1, 2, 3]
    for h, ref in zip(history, ref_history):
        assert h["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    moved = _moved(tmp_path / "two")
    scale = max(float(v.abs().max()) for v in ref_moved.values())
    assert scale > 1e-3                                          # the weights did move (3 SGD steps, lr 0.01)
    # rounding (DDP sums two half-batch gradients) grows to ~4e-4 of the largest change in 3 steps (measured);
    # one other sample in the batch changes it by the order of the change itself
    assert max(float((moved[k] - ref_moved[k]).abs().max()) for k in moved) < 1e-2 * scale


def test_two_processes_stream_read_the_one_process_rows_once_per_epoch(one_process, tmp_path):
    """`pretrain --gpus 2` (gloo) with the stream and sampler epoch: every volume once per epoch across the two
    ranks, each rank the rows 2r, 2r+1 of the 1-process batch-4 run's steps (same volume, same bytes), and for
    supervised (deterministic given its volumes) the same losses and weights to rounding."""
    reads = _two_processes(one_process, tmp_path, "stream")
    assert {row["loader"] for rows in reads for row in rows} == {"stream"}
    log = (next((tmp_path / "two").rglob("metrics.json")).parent / "log.txt").read_text()
    assert "sampler epoch: rank 0 of 2 reads the volumes of its global samples from all 5 volumes" in log
    _equals_one_process(one_process, tmp_path, reads)


def test_two_processes_memory_loader_read_the_one_process_rows_once_per_epoch(one_process, tmp_path):
    """The same with the memory loader (each rank holds the corpus; it gathers the rows of its global samples)."""
    reads = _two_processes(one_process, tmp_path, "memory")
    assert {row["loader"] for rows in reads for row in rows} == {"memory"}
    _equals_one_process(one_process, tmp_path, reads)


def test_a_rank_fills_its_shard_and_what_it_reads_from_a_node_local_cache(btcv, tmp_path, monkeypatch):
    """sampler epoch on rank 1 of 2 with an empty cache of its own (a node-local cache, the other rank elsewhere):
    it caches its shard (volumes 1, 3), then the volumes its global samples read that are still missing, and
    nothing else; its stream holds the whole corpus and embeds only its shard (whole_volumes)."""
    import torch

    from sslbench import recipes
    from sslbench.data.cache import CaseCache
    from sslbench.data.corpus import labelled_items
    from sslbench.protocol.pretraining import pretrain_stream

    class Rank1:                      # rank 1 of 2 without a process group: the barrier meets nobody
        rank, world_size, is_main, enabled = 1, 2, False, True

        def barrier(self):
            pass

    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    overrides = [a for a in SUPERVISED[SUPERVISED.index("--set"):] if a != "--set"] + [
        "method.pretrain.loader=stream", "method.pretrain.batch_size=1", "method.pretrain.steps=2"]
    cfg = recipes.split_config(recipes.resolve("supervised", None, preset="tiny", overrides=overrides,
                                               corpus="phantom-btcv"), "corpus")
    _, _, items = labelled_items(cfg["corpus"], str(btcv), log=lambda *_: None)
    assert len(items) == N
    said = []
    stream = pretrain_stream(cfg, None, items, (16, 16, 16), True, Rank1(), torch.device("cpu"), log=said.append)
    # rank 1, B 1, W 2: g = 2s + 1 -> g 1, 3 -> P_0[1], P_0[3] = volumes 3, 1 (seed 0)
    reads = {epoch_indices(N, 1, 0, s, 1, 2)[0] for s in range(2)}
    assert reads == {epoch_permutation(N, 0, 0)[1], epoch_permutation(N, 0, 0)[3]}
    cache = CaseCache(cfg["corpus"], with_label=True)
    cached = {i for i, it in enumerate(items) if cache.files(it)[0].is_file()}
    assert cached == {1, 3} | reads
    assert said[0].startswith("caching 2 of 2 corpus volumes")
    assert len(said) == (2 if reads - {1, 3} else 1)
    assert len(stream) == N and stream.own == [1, 3] and stream.sampler == "epoch"
