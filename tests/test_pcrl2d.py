"""PCRL v1 and v2 in 2D (sslbench/methods/pcrl.py: PCRLv1_2D, PCRLv2_2D; the ChestX-ray14 track of issue 23):
hand-computed transforms and losses, tiny-batch steps, the hand-over, and `sslbench run` on phantom ChestX-ray14."""
import json
import math

import pytest
import torch

from sslbench.cli import main
from sslbench.data import phantoms
from sslbench.errors import RecipeError
from sslbench.methods import get_method_class
from sslbench.methods.parts import aug2d
from sslbench.methods.parts.blur import blur_2d
from sslbench.methods.pcrl import (PCRLv1_2D, PCRLv2_2D, SkiplessDecoder2D, TransformGate, apply_spatial,
                                   grey_normalize, pcrlv2_objective, random_spatial_codes)
from sslbench.models.backbones import load_backbone
from sslbench.models.unet2d import UNet2DClassifier

MODEL = {"name": "unet2d"}


def test_grey_normalize_is_imagenet_normalisation_averaged_over_channels():
    x = torch.tensor([0.449, 1.0, 0.0])
    assert grey_normalize(x).tolist() == pytest.approx([0.0, (1 - 0.449) / 0.226, -0.449 / 0.226])


def test_2d_transformation_and_its_6d_code():
    x = torch.arange(4.0).view(1, 1, 2, 2)                          # [[0, 1], [2, 3]]
    flips, k = torch.tensor([[True, False]]), torch.tensor([1])
    out = apply_spatial(x, flips, k)                                # rows flipped -> [[2, 3], [0, 1]], then rot90
    assert out[0, 0].tolist() == [[3.0, 1.0], [2.0, 0.0]]
    assert torch.equal(apply_spatial(x, torch.tensor([[False, True]]), torch.tensor([0])), x.flip(3))
    torch.manual_seed(0)
    flips, k, code = random_spatial_codes(64, axes=2)
    assert flips.shape == (64, 2) and code.shape == (64, 6)           # [flip_rows, flip_cols, onehot(k)]
    assert torch.equal(code[:, :2].bool(), flips) and torch.equal(code[:, 2:].argmax(1), k)
    assert torch.equal(code.sum(1), flips.sum(1).float() + 1)


def test_2d_gate_shape_and_value():
    gate = TransformGate(8, hidden=4, code_dim=6, spatial_dims=2)
    for prm in gate.parameters():
        torch.nn.init.zeros_(prm)
    g = gate(torch.ones(3, 6))
    assert g.shape == (3, 8, 1, 1) and torch.all(g == 0.5)          # sigmoid(0)


def test_crop_then_rotation_keeps_the_unrotated_crop():
    torch.manual_seed(0)
    img = torch.rand(3, 1, 16, 16)
    crops, moved = aug2d.random_crop_then_rotation(img, (0.3, 0.6), 0.0, 1.0, size=(8, 8))
    assert crops.shape == moved.shape == (3, 1, 8, 8)
    assert torch.allclose(moved, crops.flip(3), atol=1e-6)          # no rotation, always flipped
    assert float(crops.min()) >= 0 and float(crops.max()) <= 1    # read inside the image
    ones = torch.ones(64, 1, 16, 16)
    _, turned = aug2d.random_crop_then_rotation(ones, (1.0, 1.0), 45.0, 0.0)
    assert float(turned[:, :, 0, 0].min()) < 0.5                    # a rotated crop's corner: zero fill


def test_random_blur_scales_sigma_with_the_image_side():
    img = torch.zeros(1, 1, 31, 31)
    img[..., 15, 15] = 1.0
    assert torch.equal(aug2d.random_blur(img, 0.0, (1.0, 1.0)), img)
    twice = aug2d.random_blur(img, 1.0, (1.0, 1.0), image_side=448)   # sigma 1 px at 224 -> 2 px at 448
    assert torch.allclose(twice, blur_2d(img, torch.tensor([2.0]), radius=6), atol=1e-7)
    g = [math.exp(-0.5 * (o / 2.0) ** 2) for o in range(-6, 7)]
    assert float(twice[0, 0, 15, 15]) == pytest.approx((g[6] / sum(g)) ** 2, abs=1e-6)


def test_pcrlv2_objective_hand_computed():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    pros_g = [torch.tensor([e1, e2])]                              # view 1, view 2 (B = 1, one scale)
    preds_g = [torch.tensor([e2, e1])]
    pros_l, preds_l = [torch.tensor([e1])], [torch.tensor([e1])]
    out, gt1 = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    masks = [torch.full((1, 1, 2, 2), 0.5)]
    loss, logs = pcrlv2_objective(pros_g, preds_g, pros_l, preds_l, out, masks, gt1, num_local=1, beta=0.5)
    # L_cos(global) = -1/2 [cos(e1, e1) + cos(e2, e2)] = -1 (pre1 = e2 vs pro2 = e2; pre2 = e1 vs pro1 = e1)
    assert float(logs["cos_global"]) == pytest.approx(-1.0)
    # (g1, l): -1/2 [cos(e2, e1) + cos(e1, e1)] = -1/2; (g2, l): -1/2 [cos(e1, e1) + cos(e1, e2)] = -1/2
    assert float(logs["cos_local"]) == pytest.approx(-0.5)
    assert float(logs["rec"]) == pytest.approx(1.0)
    assert float(logs["deep_supervision"]) == pytest.approx(0.5 * 0.25)
    assert float(loss) == pytest.approx(1.0 - 1.0 + 0.125 - 0.5)


def test_skipless_decoder_2d_scales():
    dec = SkiplessDecoder2D([64, 64, 128, 256, 512], [256, 128, 64, 32, 16])
    pros, preds, out, masks = dec(torch.rand(2, 512, 2, 2), restore=True)
    assert [p.shape[1] for p in pros] == [256, 128, 64, 32, 16] == [p.shape[1] for p in preds]
    assert out.shape == (2, 1, 64, 64) and all(m.shape == (2, 1, 64, 64) for m in masks)
    assert dec(torch.rand(2, 512, 1, 1))[2] is None


def test_both_are_registered_in_2d():
    assert get_method_class("pcrlv1", 2) is PCRLv1_2D and get_method_class("pcrlv2", 2) is PCRLv2_2D
    assert get_method_class("pcrlv1", 3).__name__ == "PCRLv1"


def test_pcrlv1_2d_views_targets_are_the_coded_transform_of_the_inputs():
    torch.manual_seed(0)
    m = PCRLv1_2D({"queue_size": 16, "normalize": "none"}, MODEL)
    v = m.make_views(torch.rand(2, 1, 32, 32))
    assert v["c"].shape == v["x"].shape == v["t"].shape == (4, 1, 32, 32) and v["code"].shape == (4, 6)
    assert float(v["c"].min()) >= 0 and float(v["c"].max()) <= 1
    flips, k = v["code"][:, :2].bool(), v["code"][:, 2:].argmax(1)
    assert torch.equal(v["t"], apply_spatial(v["x"], flips, k))     # target: corrupted (the official mask)


def test_pcrlv1_2d_tiny_step_gradients_queue_and_handover():
    torch.manual_seed(0)
    m = PCRLv1_2D({"queue_size": 16}, MODEL)
    m.train()
    key_before = m.key_encoder.conv1.weight.clone()
    loss, logs = m(torch.rand(2, 1, 64, 64), 0)
    assert torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(float(logs["contrast"]) + float(logs["rec"]), abs=1e-5)
    assert int(m.queue.ptr) == 6 and float(m.nce_z) > 0              # three comparisons of B = 2 keys each
    loss.backward()
    for prm in (m.encoder.conv1.weight, m.decoder.blocks[0].conv1[0].weight, m.decoder.blocks[-1].conv2[0].weight,
                m.out_layer.weight, m.gate.fc1.weight, m.head.fc1.weight):
        assert prm.grad is not None and torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0
    assert m.key_encoder.conv1.weight.grad is None
    with torch.no_grad():
        m.encoder.conv1.weight.add_(1.0)
    m.after_step(0)                                                  # key <- 0.999 key + 0.001 query
    assert torch.allclose(m.key_encoder.conv1.weight, key_before + 0.001, atol=1e-6)
    state = m.backbone_state_dict()
    assert any(k.startswith("decoder.") for k in state) and all(k.startswith(("encoder.", "decoder.")) for k in state)
    rep = load_backbone(UNet2DClassifier(MODEL, 14), state, "pcrlv1-2d", model_name="unet2d")
    assert not rep.missing and rep.matched and all(k.startswith("decoder.") for k in rep.unexpected)


def test_pcrlv2_2d_views_and_tiny_step_and_handover():
    torch.manual_seed(0)
    m = PCRLv2_2D({"num_local": 2}, MODEL)
    m.train()
    v = m.make_views(torch.rand(2, 1, 64, 64))
    assert v["gt"].shape == v["x"].shape == (4, 1, 64, 64) and v["local"].shape == (4, 1, 32, 32)
    assert PCRLv2_2D.local_side({}, 224) == 96 and PCRLv2_2D.local_side({}, 64) == 32
    assert PCRLv2_2D.pixels_per_image({}, (224, 224)) == 2 * 224 * 224 + 6 * 96 * 96
    loss, logs = m(torch.rand(2, 1, 64, 64), 0)
    assert torch.isfinite(loss) and float(logs["beta"]) == 1.0
    parts = sum(float(logs[k]) for k in ("rec", "cos_global", "cos_local", "deep_supervision"))
    assert float(loss.detach()) == pytest.approx(parts, abs=1e-5)
    loss.backward()
    for prm in (m.encoder.conv1.weight, m.decoder.blocks[0][0][0].weight, m.decoder.out.weight,
                m.decoder.predictors[0][0].weight):
        assert prm.grad is not None and torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0
    rep = load_backbone(UNet2DClassifier(MODEL, 14), m.backbone_state_dict(), "pcrlv2-2d", model_name="unet2d")
    assert not rep.missing and not rep.unexpected and len(rep.matched) == len(m.backbone_state_dict())


@pytest.mark.parametrize("cls,key,value", [(PCRLv1_2D, "crop_scale", [0.5, 0.2]), (PCRLv1_2D, "normalize", "zscore"),
                                           (PCRLv2_2D, "local_size", 1.5), (PCRLv2_2D, "p_blur", 2.0)])
def test_bad_2d_params_give_one_line_naming_the_key(cls, key, value):
    with pytest.raises(RecipeError) as exc:
        cls({key: value}, MODEL)
    assert f"method.params.{key}" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pcrlv1", "pcrlv2"])
def test_run_on_phantom_chestxray14_pretrains_finetunes_and_records(method, phantom_home, tmp_path, capsys):
    root = phantoms.synth("chestxray14", tmp_path / "cx", cases=24, seed=0)
    runs = tmp_path / "runs"
    flags = ["--set", "task.preprocess.size=[32,32]", "--set", "task.finetune.max_steps=2",
             "--set", "task.finetune.val_every=2", "--set", "task.finetune.checkpoint_every=2",
             "--set", "task.finetune.batch_size=4", "--set", "method.pretrain.steps=2",
             "--set", "method.pretrain.checkpoint_every=2", "--set", "method.pretrain.log_every=1",
             "--set", "method.pretrain.batch_size=4"]
    assert main(["run", "--method", method, "--task", "phantom-chestxray14", "--preset", "tiny", "--root", str(root),
                 "--out", str(runs), *flags]) == 0
    capsys.readouterr()
    pt = json.loads(next((runs / "pretrain" / method / "phantom-chestxray14").glob("*/metrics.json")).read_text())
    assert pt["steps"] == 2 and len(pt["history"]) == 2 and all(math.isfinite(h["loss"]) for h in pt["history"])
    ft = json.loads(next((runs / "finetune" / "phantom-chestxray14" / method).glob("*/metrics.json")).read_text())
    assert ft["metric"] == "auc" and ft["phantom"] is True and 0.0 <= ft["mean_auc"] <= 1.0
    load = ft["init"]["load"]
    assert ft["init"]["corpus"] == "phantom-chestxray14" and load["matched"] > 100 and load["missing"] == 0
