"""SimSiam (sslbench/methods/simsiam.py): the loss and the collapse indicator on hand-computed vectors, the
batched 3D views, a few training steps on both backbone families, the handover, and the CLI.

The Swin backbone runs at feature size 12 on 32^3 views (features=last, the tiny preset) or on one 64^3
view pair (features=all); the unet3d backbone at the tiny widths. About a minute on two CPU cores.
"""
from __future__ import annotations

import math

import pytest
import torch

from methodkit import check_handover, closes_gap, fixed_batch_logs, tiny_method
from sslbench.cli import main
from sslbench.errors import RecipeError
from sslbench.methods import simsiam as S

MODEL = {"name": "swinunetr", "feature_size": 12, "use_v2": True}
NO_INTENSITY = {"p_intensity": 0.0, "p_blur": 0.0, "p_noise": 0.0}


# ---------------------------------------------------------------------------------- loss, collapse std

def test_negative_cosine_and_symmetric_loss_hand_computed():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert S.negative_cosine(p, p * 3).item() == pytest.approx(-1.0)                     # aligned
    assert S.negative_cosine(p, torch.tensor([[0.0, 1.0], [1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-7)
    assert S.negative_cosine(p, -p).item() == pytest.approx(1.0)                         # opposite
    # one sample aligned (-1), one at 60 degrees (-1/2): mean -3/4
    assert S.negative_cosine(p, torch.tensor([[1.0, 0.0], [math.sqrt(3), 1.0]])).item() == pytest.approx(-0.75)
    # L = 1/2 D(p1, z2) + 1/2 D(p2, z1): p1 aligned with z2 (-1), p2 orthogonal to z1 (0) -> -1/2
    p1 = torch.tensor([[1.0, 1.0]], requires_grad=True)
    p2 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    z1 = torch.tensor([[0.0, 5.0]], requires_grad=True)
    z2 = torch.tensor([[2.0, 2.0]], requires_grad=True)
    loss = S.simsiam_loss(p1, p2, z1, z2)
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    assert z1.grad is None and z2.grad is None                                           # stop-gradient
    assert p2.grad.abs().sum() > 0


def test_collapse_std_is_zero_when_collapsed_and_inverse_sqrt_d_when_spread():
    d = 256
    collapsed = torch.randn(1, d).expand(512, d) * torch.rand(512, 1)                     # one direction
    assert S.collapse_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    spread = torch.randn(4096, d, generator=torch.Generator().manual_seed(0))
    assert S.collapse_std(spread).item() == pytest.approx(1 / math.sqrt(d), rel=0.03)


# ------------------------------------------------------------------------------------------------ views

def _affine(rows):
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, 3, 4)


def test_resample_views_identity_flip_rot90_and_crop():
    x = torch.rand(2, 1, 8, 8, 8)
    same = S.resample_views(x, _affine([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]).expand(2, 1, 3, 4), 8)
    assert same.shape == (2, 1, 1, 8, 8, 8)
    torch.testing.assert_close(same[:, 0], x, rtol=0, atol=1e-6)
    flip_z = S.resample_views(x, _affine([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0]]).expand(2, 1, 3, 4), 8)
    torch.testing.assert_close(flip_z[:, 0], x.flip(4), rtol=0, atol=1e-6)
    # input = R u with R = [[0, -1], [1, 0]] in x-y: out[i, j] = in[-j, i], torch's rot90 by 3 quarter turns
    rot = S.resample_views(x, _affine([[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]).expand(2, 1, 3, 4), 8)
    torch.testing.assert_close(rot[:, 0], x.rot90(3, dims=(2, 3)), rtol=0, atol=1e-6)
    # the first half along x (side 1/2, centre -1/2) of a ramp x -> x, resampled to 8 voxels:
    # output voxel o reads input coordinate (o + 1/2) / 2 - 1/2 (align_corners=False), clamped at the border
    ramp = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 1, 8, 8, 8)
    half = S.resample_views(ramp, _affine([[0.5, 0, 0, -0.5], [0, 1, 0, 0], [0, 0, 1, 0]]), 8)
    expected = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25])
    torch.testing.assert_close(half[0, 0, 0, :, 3, 3], expected)
    # several views of several volumes in one call keep their volume
    vols = torch.arange(3.0).view(3, 1, 1, 1, 1).expand(3, 1, 8, 8, 8)
    theta = S.random_view_affines(3 * 4, device="cpu").view(3, 4, 3, 4)
    views = S.resample_views(vols, theta, 4)
    assert views.shape == (3, 4, 1, 4, 4, 4)
    for b in range(3):
        torch.testing.assert_close(views[b], torch.full_like(views[b], float(b)))


def test_random_view_affines_stay_inside_the_volume():
    torch.manual_seed(0)
    ident = S.random_view_affines(5, crop_scale=(1.0, 1.0), p_flip=0.0, p_rot90=0.0)
    torch.testing.assert_close(ident, torch.eye(3, 4).expand(5, 3, 4))
    theta = S.random_view_affines(400, crop_scale=(0.5, 1.0))
    linear, centre = theta[..., :3], theta[..., 3]
    # every row and column of the linear part has exactly one non-zero: +-s of its input axis
    assert torch.equal((linear != 0).sum(-1), torch.full((400, 3), 1))
    assert torch.equal((linear != 0).sum(-2), torch.full((400, 3), 1))
    side = linear.abs().amax(-1)
    assert side.min() >= 0.5 - 1e-6 and side.max() <= 1.0 + 1e-6
    assert (centre.abs() + side <= 1 + 1e-6).all()                                         # the box stays inside
    assert (linear[:, 2, 2] != 0).all()                                                    # rotations keep z
    assert (linear[:, 0, 1] != 0).any() and (linear[:, 0, 0] < 0).any()                     # some rot90s, some flips


def test_gaussian_blur_per_view():
    x = torch.zeros(3, 1, 9, 9, 9)
    x[:, :, 4, 4, 4] = 1.0
    out = S.gaussian_blur(x, torch.tensor([0.0, 1.0, 2.0]), radius=4)
    assert torch.equal(out[0], x[0])                                                       # sigma 0: untouched
    for i, sigma in ((1, 1.0), (2, 2.0)):
        k = torch.exp(-0.5 * (torch.arange(-4.0, 5.0) / sigma) ** 2)
        k = k / k.sum()
        expected = k[:, None, None] * k[None, :, None] * k[None, None, :]                  # separable 3D Gaussian
        torch.testing.assert_close(out[i, 0], expected, rtol=1e-5, atol=1e-7)
    flat = torch.full((2, 1, 6, 6, 6), 0.7)
    torch.testing.assert_close(S.gaussian_blur(flat, torch.tensor([1.5, 0.5]), radius=3), flat)   # replicate padding


def test_augment_intensity_probabilities():
    x = torch.rand(6, 1, 8, 8, 8)
    assert torch.equal(S.augment_intensity(x, **NO_INTENSITY), x)
    torch.manual_seed(0)
    out = S.augment_intensity(x, p_intensity=1.0, scale=0.1, shift=0.1, p_blur=0.0, p_noise=0.0)
    for i in range(6):                                                                     # a x + b per view
        a = (out[i, 0, 1, 0, 0] - out[i, 0, 0, 0, 0]) / (x[i, 0, 1, 0, 0] - x[i, 0, 0, 0, 0])
        b = out[i, 0, 0, 0, 0] - a * x[i, 0, 0, 0, 0]
        assert 0.9 - 1e-4 <= a.item() <= 1.1 + 1e-4 and abs(b.item()) <= 0.1 + 1e-5
        torch.testing.assert_close(out[i], a * x[i] + b, rtol=1e-5, atol=1e-5)
    noisy = S.augment_intensity(x, p_intensity=0.0, p_blur=0.0, p_noise=1.0, noise_std=0.05) - x
    assert noisy.std().item() == pytest.approx(0.05, rel=0.1)


def test_make_views_pairs_two_views_of_the_same_volume():
    model = S.SimSiam({"resize": [40, 40, 40], "crop_size": 32, "sw_batch_size": 3, "features": "last",
                       "proj_dim": 32, "pred_dim": 8, **NO_INTENSITY}, MODEL)
    vols = torch.arange(1.0, 3.0).view(2, 1, 1, 1, 1).expand(2, 1, 40, 40, 40)
    views = model.make_views(vols)
    assert views.shape == (2, 6, 1, 32, 32, 32)
    for i in range(6):
        for v in (0, 1):
            torch.testing.assert_close(views[v, i], torch.full_like(views[v, i], 1.0 + i // 3))


def test_bad_recipes_are_one_line_errors():
    base = {"resize": [48, 48, 48], "crop_size": 32, "features": "last"}
    with pytest.raises(RecipeError, match=r"batch_size x method\.params\.sw_batch_size.*>= 2"):
        S.SimSiam({**base, "sw_batch_size": 1}, MODEL)(torch.rand(1, 1, 48, 48, 48), 0)
    with pytest.raises(RecipeError, match=r"features.*all, last"):
        S.SimSiam({**base, "features": "middle"}, MODEL)
    with pytest.raises(RecipeError, match=r"crop_size: 32.*>= 64"):
        S.SimSiam({**base, "features": "all"}, MODEL)
    with pytest.raises(RecipeError, match=r"model\.name.*swinunetr, unet3d"):
        S.SimSiam(base, {**MODEL, "name": "unetr"})
    with pytest.raises(RecipeError, match=r"crop_scale"):
        S.SimSiam({**base, "crop_scale": [0.0, 1.0]}, MODEL)


# ---------------------------------------------------------------------------------------- the method

def _train_fixed_batch(model, vols, steps, lr=1e-3):
    logs = fixed_batch_logs(model, vols, steps, lr=lr, view_seed=3)       # the same views every step
    assert all(set(e) == {"loss", "z_std"} for e in logs)
    return [e["loss"] for e in logs], [e["z_std"] for e in logs]          # L = -cos in [-1, 1]: floor -1


def test_swin_last_stage_steps_loss_falls_and_handover():
    model, corpus, params, model_cfg = tiny_method("simsiam")
    assert params["features"] == "last" and params["crop_size"] == 32 and params["sw_batch_size"] == 1
    before = {k: v.clone() for k, v in model.backbone_state_dict().items()}
    # 4 volumes: BatchNorm over 2 samples maps every projector output to +-1 and the loss only jitters
    losses, stds = _train_fixed_batch(model, corpus[:4], 16, lr=2e-3)
    assert closes_gap(losses, floor=-1.0, fraction=0.2), losses
    assert all(0 < s < 1 for s in stds)
    check_handover(model, model_cfg)
    after = model.backbone_state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"swinViT"}                            # features=last: encoder1..4, encoder10 untouched
    assert {k.split(".")[0] for k in model.head_state_dict()} == {"projector", "predictor"}


def test_swin_all_stages_step_trains_every_handed_over_block():
    torch.manual_seed(0)
    model = S.SimSiam({"resize": [64, 64, 64], "crop_size": 64, "sw_batch_size": 1, "features": "all",
                       "proj_dim": 32, "pred_dim": 8}, MODEL)
    assert model.projector[0].in_features == 24 * 12
    model.eval()                                             # BatchNorm on running statistics: one pair suffices
    loss, logs = model(torch.rand(1, 1, 64, 64, 64), 0)
    loss.backward()
    for name in ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"):
        grads = [p.grad for p in getattr(model.backbone, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    check_handover(model, MODEL)


def test_unet_steps_loss_falls_and_handover():
    model, corpus, _, model_cfg = tiny_method("simsiam", overrides={"sw_batch_size": 2},
                                              model_overrides={"name": "basicunet"})
    assert model.bn_backbone and model.projector[0].in_features == 128                    # tiny bottleneck width
    losses, stds = _train_fixed_batch(model, corpus[:2], 20)
    assert closes_gap(losses, floor=-1.0, fraction=0.2, window=4), losses
    report = check_handover(model, model_cfg)
    assert {k.split(".")[0] for k in report.matched} == {"conv_0", "down_1", "down_2", "down_3", "down_4"}


def test_unet3d_step_and_handover():
    model, corpus, _, model_cfg = tiny_method("simsiam", overrides={"sw_batch_size": 2},
                                              model_overrides={"name": "unet3d"})
    assert model.bn_backbone and model.projector[0].in_features == 128                    # 16 x base 8
    _train_fixed_batch(model, corpus[:2], 1)
    report = check_handover(model, model_cfg)
    assert {k.split(".")[0] for k in report.matched} == {"down_tr64", "down_tr128", "down_tr256", "down_tr512"}


def test_cli_pretrain_end_to_end(phantom_home, tmp_path):
    from sslbench.models.backbones import build_model, load_backbone

    assert main(["pretrain", "--method", "simsiam", "--preset", "tiny", "--set", "method.pretrain.steps=2",
                 "--out", str(tmp_path)]) == 0
    runs = list((tmp_path / "pretrain" / "simsiam").glob("*/*"))
    assert len(runs) == 1
    state = torch.load(runs[0] / "checkpoints" / "backbone.pt", weights_only=True)
    report = load_backbone(build_model(MODEL, 1, 3), state, "cli")
    assert not report.missing and not report.unexpected
    heads = torch.load(runs[0] / "checkpoints" / "heads.pt", weights_only=True)
    assert heads["projector.0.weight"].shape == (256, 16 * 12) and heads["predictor.0.weight"].shape == (64, 256)
