"""C2L (2D, sslbench/methods/c2l.py) and the 2D view augmentations (sslbench/methods/parts/aug2d.py): hand-computed values."""
import math

import pytest
import torch

from sslbench.methods.parts import aug2d
from sslbench.methods.c2l import (C2L, draw_lambda, enqueue, info_nce, mixup, momentum_update, queue_logits)
from sslbench.models.unet2d import UNet2DClassifier
from sslbench.models.backbones import load_backbone
from sslbench.errors import RecipeError


def test_queue_infonce_on_hand_computed_logits():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    logits = queue_logits(q, k, queue, t=0.5)
    assert logits[0].tolist() == pytest.approx([1.2, 0.0, 2.0])        # q.k / t, then q.queue_j / t
    expected = math.log(math.exp(1.2) + math.exp(0.0) + math.exp(2.0)) - 1.2
    assert float(info_nce(logits)) == pytest.approx(expected, abs=1e-6)   # 1.2604
    assert float(info_nce(logits)) == pytest.approx(1.2604, abs=1e-4)


def test_mixup_lambda_queue_ring_and_momentum_update():
    x = torch.tensor([[0.0], [10.0]])
    assert mixup(x, 0.7, torch.tensor([1, 0])).flatten().tolist() == pytest.approx([3.0, 7.0])
    torch.manual_seed(0)
    assert min(draw_lambda(1.0) for _ in range(200)) >= 0.5            # folded: max(lambda, 1 - lambda)
    queue, ptr = torch.zeros(3, 1), torch.tensor(2)
    enqueue(queue, ptr, torch.tensor([[1.0], [2.0]]))
    assert queue.flatten().tolist() == [2.0, 0.0, 1.0] and int(ptr) == 1   # wraps around the ring
    online, target = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        online.weight.fill_(1.0)
        target.weight.fill_(0.0)
    momentum_update(target.parameters(), online.parameters(), 0.9)   # key (target) <- query (online)
    assert float(target.weight.detach()) == pytest.approx(0.1)                 # 0.9 * 0 + 0.1 * 1


def test_affine_views_identity_flip_and_box():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    one, zero = torch.ones(1), torch.zeros(1)
    theta = aug2d.affine_theta(zero, zero, one, one, zero, torch.tensor([False]))
    grid = torch.nn.functional.affine_grid(theta, [1, 1, 4, 4], align_corners=False)
    same = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    assert torch.allclose(same, x, atol=1e-5)
    theta = aug2d.affine_theta(zero, zero, one, one, zero, torch.tensor([True]))
    grid = torch.nn.functional.affine_grid(theta, [1, 1, 4, 4], align_corners=False)
    assert torch.allclose(torch.nn.functional.grid_sample(x, grid, align_corners=False), x.flip(-1), atol=1e-5)
    torch.manual_seed(1)
    cx, cy, w, h = aug2d.crop_boxes(500, (0.2, 1.0))
    assert (cx.abs() + w <= 1 + 1e-6).all() and (cy.abs() + h <= 1 + 1e-6).all()     # boxes inside the image
    area = w * h                                                        # half-sizes: area fraction = w * h
    assert float(area.min()) >= 0.2 - 1e-6 and float(area.max()) <= 1.0 + 1e-6


def test_jitter_and_cutout_on_hand_computed_pixels():
    x = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 1, 2, 2)
    out = aug2d.jitter(x, torch.tensor([1.0]), torch.tensor([2.0]))    # mean 0.5: (x - 0.5) * 2 + 0.5
    assert out.flatten().tolist() == pytest.approx([0.0, 0.3, 0.7, 1.0])
    out = aug2d.jitter(x, torch.tensor([1.5]), torch.tensor([1.0]))    # brightness: x * 1.5, clipped
    assert out.flatten().tolist() == pytest.approx([0.3, 0.6, 0.9, 1.0])
    mask = aug2d.cutout_mask(1, (4, 4), torch.tensor([[[0, 3]]]), 2)   # a 2-px square at the top-right corner
    assert mask[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_c2l_tiny_batch_step_queue_and_transfer():
    torch.manual_seed(0)
    params = {"queue": 16, "dim": 8}
    m = C2L(params, {"name": "unet2d"})
    x = torch.rand(4, 1, 32, 32)
    before = [p.clone() for p in m.key_encoder.parameters()]
    loss, logs = m(x, 0)
    assert torch.isfinite(loss) and set(logs) >= {"nce", "nce_mixed", "nce_mixed_keys", "lambda"}
    assert float(loss) == pytest.approx((float(logs["nce"]) + float(logs["nce_mixed"])
                                         + float(logs["nce_mixed_keys"])) / 3, abs=1e-5)
    assert int(m.queue_ptr) == (3 * 4) % 16                            # three comparisons enqueued 4 keys each
    loss.backward()
    assert m.encoder.conv1.weight.grad is not None and m.key_encoder.conv1.weight.grad is None
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    m.after_step(0)
    moved = next(m.key_encoder.parameters())
    assert torch.allclose(moved, before[0] * 0.999 + 0.001 * next(m.encoder.parameters()), atol=1e-6)
    clf = UNet2DClassifier({"name": "unet2d"}, 14)
    rep = load_backbone(clf, m.backbone_state_dict(), "c2l", model_name="unet2d")
    assert not rep.missing and not rep.unexpected


# ----------------------------------------------------------------------------- the official default's NCE criterion

def test_nce_normaliser_and_loss_on_hand_computed_scores():
    from sslbench.methods.c2l import NCE_EPS, nce_loss, nce_normaliser

    logits = torch.tensor([[math.log(4.0), math.log(2.0), 0.0]])     # exp: 4, 2, 1 (positive first, K = 2)
    assert nce_normaliser(logits, 3) == 7                              # mean 7/3 * n_data 3
    assert nce_normaliser(logits, 4) == 9                              # 28/3 = 9.33, truncated (int64 buffer)
    # Z = 7, n_data = 3: P = 4/7, 2/7, 1/7; K P_n = 2/3
    # -[log (4/7)/(4/7 + 2/3) + log (2/3)/(2/7 + 2/3) + log (2/3)/(1/7 + 2/3)] = -log(6/13 * 7/10 * 14/17)
    expected = -math.log(6 / 13 * 7 / 10 * 14 / 17)
    assert float(nce_loss(logits, 7, 3, eps=0.0)) == pytest.approx(expected, abs=1e-6)
    assert float(nce_loss(logits, 7, 3, eps=0.0)) == pytest.approx(1.3240, abs=1e-4)
    assert float(nce_loss(logits, 7, 3)) == pytest.approx(expected, abs=1e-5) and NCE_EPS == 1e-7
    # the batch mean: two copies of the sample give the same loss, one positive score raised lowers it
    assert float(nce_loss(logits.repeat(2, 1), 7, 3)) == pytest.approx(float(nce_loss(logits, 7, 3)), abs=1e-6)
    better = logits.clone()
    better[0, 0] = math.log(40.0)
    assert float(nce_loss(better, 7, 3)) < float(nce_loss(logits, 7, 3))


def test_c2l_nce_criterion_fixes_z_once_and_checkpoints_it():
    torch.manual_seed(0)
    m = C2L({"queue": 16, "dim": 8, "criterion": "nce"}, {"name": "unet2d"})
    x = torch.rand(4, 1, 32, 32)
    with pytest.raises(RuntimeError, match="before prepare"):
        m(x, 0)
    m.prepare(torch.rand(10, 1, 32, 32), seed=0)
    assert int(m.nce_data) == 10 and int(m.nce_z) == -1
    loss, logs = m(x, 0)
    z = int(m.nce_z)
    assert z >= 1 and logs["nce_z"] == z and torch.isfinite(loss)
    loss.backward()
    assert m.encoder.conv1.weight.grad is not None
    m(x, 1)
    assert int(m.nce_z) == z                                           # fixed on the first comparison, then kept
    assert {"nce_z", "nce_data"} <= set(m.state_dict())
    soft = C2L({"queue": 16, "dim": 8}, {"name": "unet2d"})
    assert soft.criterion == "softmax" and "nce_z" not in soft.state_dict()   # softmax checkpoints keep their keys
    with pytest.raises(RecipeError, match="method.params.criterion"):
        C2L({"criterion": "nce-softmax"}, {"name": "unet2d"})


def test_c2l_criterion_key_keeps_earlier_hashes():
    from sslbench import recipes

    cfg = recipes.resolve("c2l", corpus="phantom-chestxray14")
    assert cfg["method"]["params"]["criterion"] == "softmax"
    old = recipes.split_config(cfg, "corpus")
    del old["method"]["params"]["criterion"]                           # a run recorded before the key
    assert recipes.protocol_hash(recipes.split_config(cfg, "corpus")) == recipes.protocol_hash(old)
    nce = recipes.resolve("c2l", corpus="phantom-chestxray14", overrides=["method.params.criterion=nce"])
    assert recipes.protocol_hash(recipes.split_config(nce, "corpus")) != recipes.protocol_hash(old)
