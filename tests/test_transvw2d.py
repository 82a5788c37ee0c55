"""TransVW's 2D form (sslbench/methods/transvw.py ``TransVW2D``, the ChestX-ray14 track): self-discovery and
visual-word labels on hand-built images, instance windows, the perturbations in 2D, a tiny-batch step, the handover
to the fine-tuning network and `sslbench run` end to end on the phantom ChestX-ray14."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sslbench.cli import main
from sslbench.data import phantoms
from sslbench.errors import RecipeError
from sslbench.methods import get_method_class
from sslbench.methods import transvw as T
from sslbench.methods.parts import views as VW
from sslbench.models.backbones import load_backbone
from sslbench.models.unet2d import UNet2DClassifier

MODEL = {"name": "unet2d"}


def make(**kw) -> T.TransVW2D:
    params = dict(crop=[32, 32], num_classes=3, instances=2, embed_grid=[2, 2], head_width=16, multires_patches=1)
    params.update(kw)
    return T.TransVW2D(params, MODEL)


def constant_images(values, size=(64, 64)) -> torch.Tensor:
    """One image per value, every pixel equal to it: feature distances are |a - b| * sqrt(D)."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, *size).contiguous()


# ------------------------------------------------------------------------------------------ self-discovery

def test_image_embedding_is_the_block_means():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    assert T.image_embedding(img, (2, 2)).tolist() == [[2.5, 4.5, 10.5, 12.5]]


def test_discover_visual_words_on_hand_built_features():
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    refs, members, radius, coords = T.discover_visual_words(feats, 2, 2, (64, 48), (32, 32), 5.0, seed=0)
    assert len(set(refs.tolist())) == 2                                   # drawn without replacement
    nearest = {0: [0, 1], 1: [1, 0], 2: [2, 1], 3: [3, 2]}                 # the reference first, then its neighbour
    by_distance = {0: 1.0, 1: 1.0, 2: 2.0, 3: 4.0}
    assert members.tolist() == [nearest[r] for r in refs.tolist()]
    assert radius.tolist() == pytest.approx([by_distance[r] for r in refs.tolist()])
    assert coords.shape == (2, 2) and coords.dtype == torch.int64
    assert (coords[:, 0] <= 32).all() and (coords[:, 1] <= 16).all() and (coords >= 0).all()   # crops inside
    assert float((coords[0] - coords[1]).float().norm()) >= 5.0
    again = T.discover_visual_words(feats, 2, 2, (64, 48), (32, 32), 5.0, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again, (refs, members, radius, coords)))    # deterministic in seed


def test_assign_visual_words_membership_by_radius():
    refs = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    radius = torch.tensor([1.0, 2.0])
    feats = torch.tensor([[0.5, 0.5], [11.0, 1.0], [5.0, 5.0], [1.0, 0.0]])   # class 0, class 1, none, class 0 (edge)
    classes, has = T.assign_visual_words(feats, refs, radius)
    assert has.tolist() == [True, True, False, True]
    assert classes[[0, 1, 3]].tolist() == [0, 1, 0]
    assert 0 <= int(classes[2]) < 2                                        # no class: a random one, CE weight 0


def test_prepare_sizes_the_buffers_and_checks_the_images():
    m = make()
    m.prepare(constant_images([0.0, 0.1, 0.5, 0.9]), seed=0)
    assert m.vw_coords.shape == (3, 2) and m.vw_members.shape == (3, 2) and m.vw_refs.shape == (3, 4)
    assert m.image_size == (64, 64) and (m.vw_coords <= 32).all()
    with pytest.raises(RecipeError, match=r"method.params.crop: \[32, 32\].*images are \[1, 16, 16\]"):
        make().prepare(constant_images([0.0, 1.0], size=(16, 16)), seed=0)
    with pytest.raises(RecipeError, match="method.params.crop.*multiples of 32"):
        make(crop=[48, 48])
    with pytest.raises(RecipeError, match="method.params.perturbations"):
        make(perturbations="rubik")
    with pytest.raises(RuntimeError, match="before prepare"):
        make()(constant_images([0.0, 1.0]), 0)


# ------------------------------------------------------------------------------------------ instances

def test_crop_boxes_in_2d_exact_box_and_corner_aligned_resize():
    img = torch.arange(36.0).view(1, 1, 6, 6)
    exact = VW.crop_boxes(img, torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), (2, 3))
    # rows 1-2, columns 2-4
    assert exact[0, 0].flatten().tolist() == pytest.approx([8.0, 9.0, 10.0, 14.0, 15.0, 16.0], abs=1e-5)
    half = VW.crop_boxes(img, torch.tensor([[0, 0]]), torch.tensor([[5, 5]]), (2, 2))
    assert half[0, 0].flatten().tolist() == pytest.approx([0.0, 4.0, 24.0, 28.0], abs=1e-5)   # the 5 x 5 box corners


def test_multires_windows_exact_jittered_and_clamped():
    corner = torch.tensor([[30, 2], [4, 4]])
    jitter = torch.tensor([True, False])
    starts, sizes = T.multires_windows(corner, (32, 32), (64, 64), jitter, (40, 40), 0)
    assert sizes.tolist() == [[40.0, 40.0], [32.0, 32.0]]                  # one side for both axes; the exact crop
    assert starts.tolist() == [[24.0, 2.0], [4.0, 4.0]]                    # 30 + 40 > 64: clamped into the image
    torch.manual_seed(0)
    many = torch.tensor([[16, 16]]).expand(500, 2)
    starts, sizes = T.multires_windows(many, (64, 64), (224, 224), torch.ones(500, dtype=torch.bool), (50, 79), 10)
    assert torch.equal(sizes[:, 0], sizes[:, 1]) and int(sizes.min()) == 50 and int(sizes.max()) == 79
    shift = starts - 16
    assert int(shift.min()) == -10 and int(shift.max()) == 9                # official randint(-10, 10)


# ------------------------------------------------------------------------------------------ perturbations in 2D

def test_box_mask_and_painting_box_in_2d():
    mask = T.box_mask(torch.tensor([[1, 0]]), torch.tensor([[2, 3]]), (4, 4))
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    corners, sides = T.painting_box(300, (32, 24), [5, 4], [10, 8], torch.Generator().manual_seed(0))
    assert corners.shape == sides.shape == (300, 2)
    assert sides[:, 0].min() == 5 and sides[:, 0].max() == 10 and sides[:, 1].min() == 4 and sides[:, 1].max() == 8
    assert (corners >= 3).all() and (corners + sides <= torch.tensor([32, 24]) - 3).all()


def test_local_shuffle_in_2d_permutes_inside_its_five_blocks_only():
    x = torch.rand(3, 1, 40, 30)
    corners, sides = T.shuffle_boxes(3, (40, 30), generator=torch.Generator().manual_seed(4))
    assert corners.shape == (3, 5, 2) and int(sides[..., 0].max()) <= 4 and int(sides[..., 1].max()) <= 3
    out = T.transvw_local_shuffle(x, torch.Generator().manual_seed(4))                # the same draw
    inside = torch.zeros(3, 1, 40, 30, dtype=torch.bool)
    for i in range(3):
        for (r, c), (h, w) in zip(corners[i].tolist(), sides[i].tolist()):
            inside[i, 0, r:r + h, c:c + w] = True
    assert torch.equal(out[~inside], x[~inside])                                      # outside the blocks: untouched
    assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)    # values only moved


def test_in_and_out_painting_in_2d_one_box_each():
    x = torch.full((2, 1, 28, 28), 5.0)                                   # noise lies in [0, 1): never 5
    inp = T.transvw_inpaint(x, torch.Generator().manual_seed(0))
    out = T.transvw_outpaint(x, torch.Generator().manual_seed(0))
    for i in range(2):
        noisy = (inp[i, 0] != 5.0).nonzero()
        rows, cols = noisy[:, 0], noisy[:, 1]
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(box) == len(noisy) and 4 <= int(rows.max() - rows.min() + 1) <= 9       # one box, dim//6..dim//3
        kept = (out[i, 0] == 5.0).nonzero()
        side = int(kept[:, 0].max() - kept[:, 0].min() + 1)
        assert int(kept.shape[0]) == side * int(kept[:, 1].max() - kept[:, 1].min() + 1)   # one window kept
        assert 28 - 4 * 28 // 7 <= side <= 28 - 3 * 28 // 7


def test_elastic_deformation_in_2d():
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(T.elastic_deform(x, alpha=0.0), x, atol=1e-5)               # no displacement: identity
    flat = torch.full((1, 1, 32, 32), 0.3)
    assert torch.allclose(T.elastic_deform(flat, 991.0, 4.0, torch.Generator().manual_seed(0)), flat, atol=1e-6)
    rows = torch.arange(32.0).view(1, 1, 32, 1).expand(1, 1, 32, 32).contiguous()    # varies along rows only
    cols = rows.transpose(2, 3).contiguous()                                          # along columns only
    assert not torch.allclose(T.elastic_deform(rows, 991.0, 4.0, torch.Generator().manual_seed(1)), rows, atol=0.1)
    assert not torch.allclose(T.elastic_deform(cols, 991.0, 4.0, torch.Generator().manual_seed(1)), cols, atol=0.1)


# ------------------------------------------------------------------------------------------ the method

def test_transvw2d_tiny_batch_step_gradients_and_handover():
    torch.manual_seed(0)
    m = make(multires_patches=3)
    images = torch.rand(4, 1, 64, 64)
    m.prepare(images, seed=0)
    loss, logs = m(images, 0)
    assert torch.isfinite(loss) and 0.0 <= float(logs["mse"]) <= 1.0
    assert float(loss.detach()) == pytest.approx(float(logs["mse"]) + 0.01 * float(logs["ce"]), abs=1e-6)
    assert 0.0 < float(logs["vw_fraction"]) <= 1.0 and 0.0 <= float(logs["acc"]) <= 1.0
    loss.backward()
    for name, prm in (("encoder", m.net.encoder.conv1.weight), ("decoder", m.net.decoder.blocks[0].conv1[0].weight),
                      ("head", m.head.fc.weight)):
        assert prm.grad is not None and float(prm.grad.abs().sum()) > 0, name
    state = m.backbone_state_dict()
    assert any(k.startswith("decoder.") for k in state) and not any(k.startswith("head.") for k in state)
    rep = load_backbone(UNet2DClassifier(MODEL, 14), state, "transvw2d", model_name="unet2d")
    assert not rep.missing and rep.matched and all(k.startswith("decoder.") for k in rep.unexpected)
    assert {"vw_coords", "vw_members"} <= set(m.head_state_dict())
    with pytest.raises(ValueError, match="visual words' grid"):
        m(torch.rand(2, 1, 96, 96), 1)


def test_transvw_is_registered_in_2d_and_its_feasibility_pixels():
    assert get_method_class("transvw", spatial_dims=2) is T.TransVW2D
    assert get_method_class("transvw") is T.TransVW
    assert T.TransVW2D.pixels_per_image({}, (224, 224)) == 64 * 64
    assert T.TransVW2D.pixels_per_image({"crop": [32, 32]}, (64, 64)) == 32 * 32


@pytest.mark.slow
def test_transvw_runs_on_phantom_chestxray14_to_a_record(phantom_home, tmp_path):
    root = phantoms.synth("chestxray14", tmp_path / "cx", cases=24, seed=0)
    runs = tmp_path / "runs"
    assert main(["run", "--method", "transvw", "--task", "phantom-chestxray14", "--preset", "tiny", "--root", str(root),
                 "--out", str(runs), "--set", "task.preprocess.size=[32,32]", "--set", "task.finetune.max_steps=2",
                 "--set", "task.finetune.val_every=2", "--set", "task.finetune.checkpoint_every=2",
                 "--set", "task.finetune.batch_size=4", "--set", "method.pretrain.steps=2",
                 "--set", "method.pretrain.checkpoint_every=2", "--set", "method.pretrain.log_every=1",
                 "--set", "method.pretrain.batch_size=4"]) == 0
    pt = json.loads(next((runs / "pretrain" / "transvw" / "phantom-chestxray14").glob("*/metrics.json")).read_text())
    assert pt["steps"] == 2 and len(pt["history"]) == 2 and all(math.isfinite(h["loss"]) for h in pt["history"])
    recipe = next((runs / "pretrain" / "transvw" / "phantom-chestxray14").glob("*/recipe.yaml")).read_text()
    assert "head_width: 64" in recipe                                    # the two_d block's tiny preset
    ft = json.loads(next((runs / "finetune" / "phantom-chestxray14" / "transvw").glob("*/metrics.json")).read_text())
    assert ft["metric"] == "auc" and ft["init"]["corpus"] == "phantom-chestxray14"
    assert ft["init"]["load"]["matched"] > 100 and ft["init"]["load"]["missing"] == 0
