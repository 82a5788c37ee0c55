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
