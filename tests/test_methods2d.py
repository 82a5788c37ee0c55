"""VoCo-2D and SimSiam-2D (the 2D track): crops, labels, blur on hand-computed values; tiny-batch steps."""
import math

import pytest
import torch

from sslbench.models.backbones import load_backbone
from sslbench.methods.simsiam import SimSiam2D, blur_2d
from sslbench.methods.voco import VoCo2D, augment_crops_2d, base_crop_boxes, crop_images, position_labels
from sslbench.models.unet2d import UNet2DClassifier

MODEL = {"name": "unet2d"}


def test_crop_images_reads_exactly_the_box():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    boxes = torch.tensor([[[0.0, 2.0, 2.0, 4.0], [0.0, 0.0, 4.0, 4.0]]])    # (r0, c0, r1, c1)
    out = crop_images(img, boxes, 2)
    assert out[0, 0, 0].tolist() == [[2.0, 3.0], [6.0, 7.0]]               # rows 0-1, columns 2-3
    # the whole image at half size: bilinear at the 2x2 block centres = the block means
    assert out[0, 1, 0].flatten().tolist() == pytest.approx([2.5, 4.5, 10.5, 12.5])


def test_2d_position_labels_on_a_2x2_grid():
    bases = base_crop_boxes((8, 8), 2)
    assert bases.tolist() == [[0, 0, 4, 4], [0, 4, 4, 8], [4, 0, 8, 4], [4, 4, 8, 8]]
    centred = position_labels(torch.tensor([[2.0, 2.0, 6.0, 6.0]]), bases)
    assert centred.tolist() == [[0.25, 0.25, 0.25, 0.25]]                  # 2x2 px of each 4x4 base
    edge = position_labels(torch.tensor([[0.0, 1.0, 4.0, 5.0]]), bases)
    assert edge.tolist() == [[0.75, 0.25, 0.0, 0.0]]                       # 4x3 and 4x1 of 16


def test_crop_augmentation_chain_in_2d():
    x = torch.arange(8.0).view(2, 1, 2, 2)
    torch.manual_seed(0)
    both = augment_crops_2d(x, p_flip=1.0, p_rot90=0.0, p_shift=0.0)
    assert torch.equal(both, x.flip(2).flip(3))
    assert torch.equal(augment_crops_2d(x, p_flip=0.0, p_rot90=0.0, p_shift=0.0), x)


def test_voco2d_tiny_batch_loss_and_transfer():
    torch.manual_seed(0)
    m = VoCo2D({"n": 2, "sw_batch_size": 2, "crop_size": 32, "head_dim": 64}, MODEL)
    x = torch.rand(2, 1, 64, 64)
    views, labels = m.make_views(x)
    assert views.shape == (2 * 2 + 2 * 4, 1, 32, 32) and labels.shape == (2, 2, 4)
    assert torch.allclose(labels.sum(-1), torch.ones(2, 2))               # crops lie inside the grid
    loss, logs = m(x, 0)
    assert torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(float(logs["pred"]) + 1.0 * float(logs["reg"]), abs=1e-5)
    assert float(logs["pred"]) == pytest.approx(float(logs["pos"]) + float(logs["neg"]), abs=1e-5)
    loss.backward()
    assert m.encoder.conv1.weight.grad is not None
    rep = load_backbone(UNet2DClassifier(MODEL, 14), m.backbone_state_dict(), "voco2d", model_name="unet2d")
    assert not rep.missing and not rep.unexpected


def test_blur_2d_on_hand_computed_kernel():
    img = torch.zeros(2, 1, 7, 7)
    img[:, :, 3, 3] = 1.0
    out = blur_2d(img, torch.tensor([0.0, 1.0]), radius=2)
    assert torch.equal(out[0], img[0])                                      # sigma 0: unchanged
    g = [math.exp(-0.5 * o * o) for o in (-2, -1, 0, 1, 2)]
    g = [v / sum(g) for v in g]
    assert float(out[1, 0, 3, 3]) == pytest.approx(g[2] * g[2], abs=1e-6)   # separable: outer product
    assert float(out[1, 0, 2, 3]) == pytest.approx(g[1] * g[2], abs=1e-6)
    assert float(out[1].sum()) == pytest.approx(1.0, abs=1e-5)              # mass kept


def test_simsiam2d_tiny_batch_step():
    torch.manual_seed(0)
    m = SimSiam2D({"proj_dim": 32, "pred_dim": 8}, MODEL)
    loss, logs = m(torch.rand(4, 1, 32, 32), 0)
    assert -1.0 <= float(loss) <= 1.0 and float(logs["z_std"]) > 0
    loss.backward()
    assert m.encoder.conv1.weight.grad is not None and m.predictor[0].weight.grad is not None
    rep = load_backbone(UNet2DClassifier(MODEL, 14), m.backbone_state_dict(), "simsiam2d", model_name="unet2d")
    assert not rep.missing and not rep.unexpected


def test_genesis_transforms_in_2d_on_hand_computed_boxes_and_flips():
    from sslbench.methods.parts.perturbations import _box_mask, flip_pair

    starts = torch.tensor([[[1, 0], [0, 0]]])
    sizes = torch.tensor([[[2, 3], [1, 1]]])
    mask = _box_mask(starts, sizes, torch.tensor([[True, False]]), (4, 4))
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    x = torch.arange(32.0).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    inp, tgt = flip_pair(x, x.clone(), prob=1.0, generator=g)                 # 3 flips of axes in {0, 1}
    assert torch.equal(inp, tgt)
    assert any(torch.equal(inp[i], v) for i in range(2)
               for v in (x[i], x[i].flip(1), x[i].flip(2), x[i].flip(1).flip(2)))


def test_mg2d_tiny_batch_restores_and_hands_over_encoder_and_decoder():
    from sslbench.methods.genesis import ModelsGenesis2D

    torch.manual_seed(0)
    m = ModelsGenesis2D({}, MODEL)
    loss, logs = m(torch.rand(2, 1, 32, 32), 0)
    assert 0.0 <= float(loss.detach()) <= 1.0 and float(logs["mse"]) == pytest.approx(float(loss.detach()))
    loss.backward()
    assert m.net.decoder.blocks[0].conv1[0].weight.grad is not None
    state = m.backbone_state_dict()
    assert any(k.startswith("decoder.") for k in state) and not any(k.startswith("head.") for k in state)
    rep = load_backbone(UNet2DClassifier(MODEL, 14), state, "mg2d", model_name="unet2d")
    assert not rep.missing and all(k.startswith("decoder.") for k in rep.unexpected)
