"""Models Genesis (sslbench/methods/genesis.py): the four transformations on hand-built volumes, crops,
recipe checks, tiny training steps, the handover for both backbone families and the CLI end to end.

Training runs on the tiny 3D U-Net (fast on a CPU); SwinUNETR (feature size 12, 64x32x32 crops) runs one
step and its handover.
"""
from __future__ import annotations

import pytest
import torch

from methodkit import check_handover, closes_gap, tiny_method, train_steps
from sslbench.cli import main
from sslbench.errors import RecipeError
from sslbench.methods import genesis as G
from sslbench.methods.parts import perturbations as PT
from sslbench.methods.parts import views as VW

UNET = {"name": "basicunet"}     # the restoration-curve test's U-Net (calibrated on it; see test_unet3d.py)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def raster(b: int, shape=(32, 32, 16)) -> torch.Tensor:
    """Volumes whose voxel values are unique (the value tells where a voxel came from)."""
    n = shape[0] * shape[1] * shape[2]
    return (torch.arange(b * n, dtype=torch.float64) / (b * n)).view(b, 1, *shape)


# ------------------------------------------------------------------------------------------ random ints

def test_randint_inclusive_hits_both_bounds_per_sample():
    v = PT.randint_inclusive(torch.tensor([[0], [5]]), torch.tensor([[2], [5]]), (2, 4000), gen(), torch.device("cpu"))
    assert set(v[0].tolist()) == {0, 1, 2}
    assert set(v[1].tolist()) == {5}


# ------------------------------------------------------------------------------------------ flips

def test_flip_pair_flips_input_and_target_identically():
    x = torch.rand(16, 1, 8, 6, 4, generator=gen(1))
    xo, yo = PT.flip_pair(x, 2 * x + 1, prob=0.6, generator=gen(2))
    torch.testing.assert_close(yo, 2 * xo + 1)
    flips = {(a, b, c): x.flip([d + 2 for d, f in enumerate((a, b, c)) if f]) for a in (0, 1) for b in (0, 1)
             for c in (0, 1)}
    seen = set()
    for i in range(16):
        match = [k for k, v in flips.items() if torch.equal(xo[i], v[i])]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 2                                   # per-sample randomness


def test_flip_pair_rates():
    x = torch.rand(8, 1, 4, 4, 4, generator=gen(3))
    xo, _ = PT.flip_pair(x, x, prob=0.0, generator=gen())
    assert torch.equal(xo, x)
    xo, _ = PT.flip_pair(x, x, prob=1.0, generator=gen())   # 3 flips: some axis is flipped an odd number of times
    assert all(not torch.equal(xo[i], x[i]) for i in range(8))


# ------------------------------------------------------------------------------------------ shuffling

def test_block_shuffle_keeps_each_blocks_multiset():
    x = torch.arange(2 * 4 * 4 * 2, dtype=torch.float32).view(2, 1, 4, 4, 2)
    ids = torch.zeros(2, 4, 4, 2, dtype=torch.int64)
    ids[:, 2:] = 1                                         # two slabs along x
    ids[1, :, :, 1] += 10                                  # sample 1: four blocks
    out = PT.block_shuffle(x, ids, gen(4))
    assert not torch.equal(out, x)
    for b in range(2):
        for block in ids[b].unique():
            m = ids[b] == block
            assert torch.equal(out[b, 0][m].sort().values, x[b, 0][m].sort().values)


def test_local_pixel_shuffle_moves_voxels_only_within_small_blocks():
    x = raster(2, (40, 30, 20))
    out = PT.local_pixel_shuffle(x, prob=1.0, generator=gen(5))
    for b in range(2):
        assert torch.equal(out[b].flatten().sort().values, x[b].flatten().sort().values)
    n = x[0].numel()
    src = torch.round((out - x[:, :, :1, :1, :1]) * 2 * n).long().flatten(1)  # source raster index per voxel
    sx, sy, sz = src // (30 * 20), (src // 20) % 30, src % 20
    gx, gy, gz = torch.meshgrid(torch.arange(40), torch.arange(30), torch.arange(20), indexing="ij")
    for s, grid, side in ((sx, gx, 4), (sy, gy, 3), (sz, gz, 2)):   # block sides 1..dim//10
        assert (s - grid.flatten()).abs().max() < side
    moved = (out != x).float().mean().item()
    # 10,000 official blocks cover 1 - exp(-10000 * 2.5*2*1.5 / 24000) = 95% of this volume
    assert 0.6 < moved < 0.95
    assert torch.equal(PT.local_pixel_shuffle(x, prob=0.0, generator=gen(5)), x)


# ------------------------------------------------------------------------------------------ Bezier map

def test_bezier_map_hand_computed():
    v = torch.linspace(0, 1, 11).view(1, 11)
    straight = torch.tensor([[1 / 3, 1 / 3, 2 / 3, 2 / 3]])    # control points on the diagonal: P(t) = (t, t)
    torch.testing.assert_close(PT.bezier_map(v, straight, torch.tensor([False])), v, atol=1e-5, rtol=0)
    torch.testing.assert_close(PT.bezier_map(v, straight, torch.tensor([True])), 1 - v, atol=1e-5, rtol=0)
    # a curved map: at t = 1/2, x = 3/8 (x1 + x2) + 1/8 and y = 3/8 (y1 + y2) + 1/8
    c = torch.tensor([[0.9, 0.1, 0.7, 0.2]])
    x_half = torch.tensor([[3 / 8 * 1.6 + 1 / 8]])
    assert PT.bezier_map(x_half, c, torch.tensor([False])).item() == pytest.approx(3 / 8 * 0.3 + 1 / 8, abs=1e-4)
    # inverted: y control values reversed (1, y2, y1, 0): y(1/2) = 1/8 + 3/8 (y2 + y1)
    assert PT.bezier_map(x_half, c, torch.tensor([True])).item() == pytest.approx(1 / 8 + 3 / 8 * 0.3, abs=1e-4)


def test_bezier_map_endpoints_fixed_and_monotone():
    control = torch.rand(64, 4, generator=gen(6))
    v = torch.linspace(0, 1, 201).expand(64, 201)
    up = PT.bezier_map(v, control, torch.zeros(64, dtype=torch.bool))
    down = PT.bezier_map(v, control, torch.ones(64, dtype=torch.bool))
    torch.testing.assert_close(up[:, 0], torch.zeros(64)); torch.testing.assert_close(up[:, -1], torch.ones(64))
    torch.testing.assert_close(down[:, 0], torch.ones(64)); torch.testing.assert_close(down[:, -1], torch.zeros(64))
    assert (up.diff(dim=1) >= -1e-6).all() and (down.diff(dim=1) <= 1e-6).all()


def test_nonlinear_intensity_is_a_monotone_map_per_sample():
    x = torch.rand(12, 1, 6, 6, 6, generator=gen(7))
    out = PT.nonlinear_intensity(x, prob=1.0, generator=gen(8))
    assert out.min() >= 0 and out.max() <= 1
    signs = set()
    for i in range(12):
        order = x[i].flatten().argsort()
        d = out[i].flatten()[order].diff()
        assert (d >= -1e-6).all() or (d <= 1e-6).all()
        signs.add(bool((d >= -1e-6).all()))
    assert signs == {True, False}                          # some inverted, some not
    assert torch.equal(PT.nonlinear_intensity(x, prob=0.0, generator=gen(8)), x)


# ------------------------------------------------------------------------------------------ painting

def test_box_mask_hand_computed():
    starts = torch.tensor([[[1, 0, 2], [0, 0, 0]]])
    sizes = torch.tensor([[[2, 1, 1], [4, 4, 4]]])
    m = PT._box_mask(starts, sizes, torch.tensor([[True, False]]), (4, 3, 4))
    expected = torch.zeros(1, 1, 4, 3, 4, dtype=torch.bool)
    expected[0, 0, 1:3, 0:1, 2:3] = True
    assert torch.equal(m, expected)


def test_inpainting_changes_only_boxes_inside_the_border():
    x = torch.full((8, 1, 36, 36, 24), 2.0)                # outside the noise range [0, 1)
    out = PT.paint(x, prob=1.0, inpaint_rate=1.0, generator=gen(9))
    changed = out != 2.0
    assert (out[changed] < 1).all() and (out[changed] >= 0).all()
    border = torch.ones_like(changed)
    border[:, :, 3:-3, 3:-3, 3:-3] = False
    assert not changed[border].any()
    per = changed.flatten(1).sum(1)
    assert (per >= 6 * 6 * 4).all() and (per <= 5 * 12 * 12 * 8).all()   # 1..5 boxes of side dim//6..dim//3


def test_outpainting_keeps_only_boxes_of_the_original():
    x = torch.full((8, 1, 35, 35, 21), 2.0)
    out = PT.paint(x, prob=1.0, inpaint_rate=0.0, generator=gen(10))
    kept = out == 2.0
    assert ((out[~kept] >= 0) & (out[~kept] < 1)).all()
    border = torch.ones_like(kept)
    border[:, :, 3:-3, 3:-3, 3:-3] = False
    assert not kept[border].any()
    # at least one window of side dim - 4 dim//7 (= 15, 15, 9) is kept
    assert (kept.flatten(1).sum(1) >= 15 * 15 * 9).all()
    assert torch.equal(PT.paint(x, prob=0.0, generator=gen(10)), x)


def test_paint_rejects_tiny_volumes():
    with pytest.raises(ValueError, match="spatial size"):
        PT.paint(torch.rand(1, 1, 32, 32, 8))


def test_genesis_views_order_and_target():
    x = torch.rand(6, 1, 32, 32, 16, generator=gen(11))
    off = {k: 0.0 for k in PT.GENESIS_DEFAULTS}
    inp, target = PT.genesis_views(x, off, generator=gen(12))
    assert torch.equal(inp, x) and torch.equal(target, x)
    inp, target = PT.genesis_views(x, {**off, "flip_rate": 1.0}, generator=gen(12))
    assert torch.equal(inp, target) and not torch.equal(target, x)   # flips only: input == target
    inp, target = PT.genesis_views(x, None, generator=gen(13))
    assert inp.shape == target.shape == x.shape and not torch.equal(inp, target)


# ------------------------------------------------------------------------------------------ crops, recipe

def test_crop_boxes_exact_and_resized():
    v = raster(2, (20, 16, 12)).float()
    starts = torch.tensor([[3, 2, 1], [0, 4, 5]])
    out = VW.crop_boxes(v, starts, torch.tensor([[8, 8, 6], [8, 8, 6]]), (8, 8, 6))
    torch.testing.assert_close(out[0], v[0, :, 3:11, 2:10, 1:7], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], v[1, :, 0:8, 4:12, 5:11], atol=1e-5, rtol=0)
    half = VW.crop_boxes(v[:1], torch.zeros(1, 3), torch.tensor([[17, 16, 12]]), (9, 16, 12))   # x: every 2nd voxel
    torch.testing.assert_close(half[0], v[0, :, 0:17:2], atol=1e-5, rtol=0)


def test_bad_crops_and_models_are_recipe_errors():
    with pytest.raises(RecipeError, match="encoder10"):
        G.ModelsGenesis({"resize": [64, 64, 64], "crop": [32, 32, 32]}, {"feature_size": 12})
    with pytest.raises(RecipeError, match="at most the corpus"):
        G.ModelsGenesis({"resize": [64, 64, 32], "crop": [64, 64, 64]}, {"feature_size": 12})
    with pytest.raises(RecipeError, match="model.name"):
        G.ModelsGenesis({"resize": [64, 64, 64], "crop": [64, 64, 64]}, {"feature_size": 12, "name": "unetr"})
    with pytest.raises(RecipeError, match="probability"):
        G.ModelsGenesis({"resize": [64, 64, 64], "crop": [64, 64, 64], "paint_rate": 2}, {"feature_size": 12})


# ------------------------------------------------------------------------------------------ the method

def fixed_loss(model, corpus) -> float:
    """The loss on the same crops and transformations every call (the global RNG is re-seeded)."""
    torch.manual_seed(1234)
    with torch.no_grad():
        return float(model(corpus, 0)[0])


def test_loss_falls_on_a_unet():
    model, corpus, _, _ = tiny_method("mg", model_overrides=UNET)
    before = fixed_loss(model, corpus)
    train_steps(model, corpus, 16, lr=3e-3)              # random batches: each step's loss is another batch's
    probe = [before, fixed_loss(model, corpus)]          # so the property is judged on one fixed probe batch
    assert closes_gap(probe, floor=0.0, fraction=0.2, window=1), probe       # MSE: floor 0


@pytest.mark.parametrize("model_name", ["swinunetr", "unet3d", "basicunet"])
def test_handover_encoder_and_decoder(model_name):
    model, corpus, _, model_cfg = tiny_method("mg", model_overrides={"name": model_name})
    train_steps(model, corpus, 1)
    report = check_handover(model, model_cfg)
    state = model.backbone_state_dict()
    assert not any(k.startswith(("out.", "out_tr.", "final_conv.")) for k in state)   # the output layer is the task's
    assert len(report.matched) == len(state)


def test_cli_pretrain_end_to_end(phantom_home, tmp_path):
    assert main(["pretrain", "--method", "mg", "--preset", "tiny", "--set", "method.pretrain.steps=2",
                 "--set", "model.name=unet3d", "--out", str(tmp_path)]) == 0
    run = next((tmp_path / "pretrain" / "mg").glob("*/*"))
    state = torch.load(run / "checkpoints" / "backbone.pt", weights_only=True)
    assert any(k.startswith("up_tr64.") for k in state) and any(k.startswith("down_tr512.") for k in state)
