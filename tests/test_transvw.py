"""TransVW (sslbench/methods/transvw.py): self-discovery on hand-built corpora, visual-word labels and
instances, the perturbations, the loss, tiny training steps, the handover for both backbone families and
the CLI end to end. Training runs on the tiny 3D U-Net; SwinUNETR runs one step and its handover.
"""
from __future__ import annotations

import math

import pytest
import torch

from methodkit import check_handover, falls, tiny_method, train_steps
from sslbench.cli import main
from sslbench.methods import transvw as T

UNET = {"name": "unet3d", "feature_size": 12, "unet_features": [8, 16, 32, 64, 128, 8]}
SIZE = (64, 64, 32)


def constant_corpus(values) -> torch.Tensor:
    """One volume per value, every voxel equal to it: feature distances are |a - b| * sqrt(D)."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(-1, 1, *SIZE).contiguous()


def make(**kw) -> T.TransVW:
    params = dict(resize=list(SIZE), crop=[32, 32, 16], num_classes=3, instances=2, embed_grid=[2, 2, 2],
                  multires_patches=1)
    params.update(kw)
    return T.TransVW(params, UNET)


# ------------------------------------------------------------------------------------------ self-discovery

def test_nearest_members_hand_computed():
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0], [7.5]])
    members, radius = T.nearest_members(feats, torch.tensor([2, 4]), 3)
    assert members.tolist() == [[2, 1, 0], [4, 3, 2]]         # the reference first, then by distance
    torch.testing.assert_close(radius, torch.tensor([3.0, 4.5]))


def test_draw_coordinates_in_range_and_apart():
    g = torch.Generator().manual_seed(0)
    coords = T.draw_coordinates(20, (48, 48, 24), (32, 32, 16), 5.0, g)
    assert coords.shape == (20, 3)
    assert (coords >= 0).all() and (coords <= torch.tensor([16, 16, 8])).all()
    d = torch.cdist(coords.float(), coords.float()) + torch.eye(20) * 100
    assert d.min() >= 5.0
    # no room left (a 2 x 2 x 2 lattice, 5 voxels apart): the last try is kept, prepare still ends
    crowded = T.draw_coordinates(9, (33, 33, 17), (32, 32, 16), 5.0, g)
    assert crowded.shape == (9, 3) and crowded.max() <= 1


def test_prepare_is_deterministic_in_the_seed():
    corpus = constant_corpus([0.1, 0.2, 0.4, 0.7, 0.9])
    a, b, c = make(), make(), make()
    a.prepare(corpus, 3)
    b.prepare(corpus, 3)
    c.prepare(corpus, 4)
    for key in ("vw_coords", "vw_members", "vw_refs", "vw_radius"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert not torch.equal(a.vw_coords, c.vw_coords) or not torch.equal(a.vw_members, c.vw_members)
    assert a.vw_members.shape == (3, 2) and a.vw_coords.shape == (3, 3)
    assert len(set(a.vw_members[:, 0].tolist())) == 3          # references drawn without replacement
    for cls in range(3):                                        # member 2 = the reference's nearest value
        ref, other = a.vw_members[cls].tolist()
        vals = [0.1, 0.2, 0.4, 0.7, 0.9]
        nearest = min((i for i in range(5) if i != ref), key=lambda i: abs(vals[i] - vals[ref]))
        assert other == nearest
    assert "vw_coords" in a.state_dict() and "vw_members" in a.state_dict()


def test_references_repeat_when_classes_outnumber_volumes():
    m = make(num_classes=5, instances=1)
    m.prepare(constant_corpus([0.1, 0.5]), 0)
    assert sorted(m.vw_members[:, 0].tolist()) in ([0, 0, 0, 1, 1], [0, 0, 1, 1, 1])


# ------------------------------------------------------------------------------------------ labels, instances

def test_labels_are_the_class_of_a_known_volume():
    corpus = constant_corpus([0.1, 0.3, 0.6, 0.95])
    m = make(num_classes=2, instances=1)                       # each class: its reference only
    m.prepare(corpus, 0)
    classes, has_class = m.visual_word_labels(corpus)
    refs = m.vw_members[:, 0].tolist()
    for v in range(4):
        assert bool(has_class[v]) == (v in refs)
        if v in refs:
            assert int(classes[v]) == refs.index(v)


def test_masked_cross_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]])
    target = torch.tensor([0, 1, 1])
    ce = T.masked_cross_entropy(logits, target, torch.tensor([1.0, 1.0, 0.0]))
    assert ce.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, rel=1e-6)
    assert T.masked_cross_entropy(logits, target, torch.zeros(3)).item() == 0.0


def test_instances_are_crops_at_the_class_coordinate():
    x, y, z = torch.meshgrid(*(torch.arange(float(s)) for s in SIZE), indexing="ij")
    ramp = (x + 100 * y + 10000 * z)[None, None]
    m = make()
    m.prepare(torch.cat([ramp, ramp + 0.5, ramp + 0.25]), 0)
    classes = torch.tensor([2, 0])
    crops = m.instances_of(torch.cat([ramp, ramp + 0.5]), classes)
    for i, (vol, c) in enumerate(((ramp, 2), (ramp + 0.5, 0))):
        cx, cy, cz = m.vw_coords[c].tolist()
        torch.testing.assert_close(crops[i], vol[0, :, cx:cx + 32, cy:cy + 32, cz:cz + 16], atol=0.05, rtol=0)


def test_multires_instances_stay_inside_and_jitter():
    m = make(multires_patches=3)
    vols = torch.rand(1, 1, *SIZE).expand(64, -1, -1, -1, -1)
    m.prepare(vols[:3], 0)
    crops = m.instances_of(vols, torch.zeros(64, dtype=torch.long))
    m.multires_rate = 0.0                                      # multires off: the exact crop
    exact = m.instances_of(vols[:1], torch.zeros(1, dtype=torch.long))
    same = [(crops[i] - exact[0]).abs().max().item() < 1e-5 for i in range(64)]
    assert 5 < sum(same) < 45                                  # about a third exact, the rest jittered


# ------------------------------------------------------------------------------------------ perturbations

def test_elastic_deformation_moves_only_in_plane():
    z = torch.arange(16.0).view(1, 1, 1, 1, 16).expand(2, 1, 24, 24, 16)
    out = T.elastic_deform(z.contiguous(), alpha=991.0, sigma=4.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, z, atol=1e-4, rtol=0)      # a z-ramp is invariant to x-y displacements
    x = torch.rand(2, 1, 24, 24, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(T.elastic_deform(x, alpha=0.0), x, atol=1e-5)
    moved = T.elastic_deform(x, alpha=991.0, sigma=4.0, generator=torch.Generator().manual_seed(2))
    assert (moved - x).abs().mean() > 0.05


def test_one_of_four_picks_one_perturbation_per_sample():
    x = torch.full((40, 1, 32, 32, 16), 0.5)
    torch.manual_seed(0)
    out, kind = T.one_of_four(x)
    assert set(kind.tolist()) == {0, 1, 2, 3}
    flat = (out - 0.5).abs().flatten(1)
    changed = (flat > 1e-6).float().mean(1)
    # a constant cube: shuffling changes nothing; the Bezier map changes every voxel alike; in-painting a
    # few boxes; out-painting most of the cube
    assert (changed[kind == 0] == 0).all()
    assert all(out[i].unique().numel() == 1 for i in torch.nonzero(kind == 1).flatten().tolist())
    assert (changed[kind == 2] < 0.5).all() and (changed[kind == 3] > 0.5).all()


# ------------------------------------------------------------------------------------------ the method

def test_forward_before_prepare_is_an_error():
    with pytest.raises(RuntimeError, match="prepare"):
        make()(torch.rand(2, 1, *SIZE), 0)


def test_loss_falls_on_the_unet3d():
    model, corpus, _, _ = tiny_method("transvw", model_overrides={"name": "unet3d"})
    losses = train_steps(model, corpus, 16, lr=3e-3)
    assert falls(losses), losses
    _, logs = model(corpus[:2], 0)
    assert set(logs) == {"mse", "ce", "acc", "vw_fraction"}


@pytest.mark.parametrize("model_name", ["swinunetr", "unet3d"])
def test_handover_encoder_and_decoder(model_name):
    model, corpus, _, model_cfg = tiny_method("transvw", model_overrides={"name": model_name})
    train_steps(model, corpus, 1)
    report = check_handover(model, model_cfg)
    assert len(report.matched) == len(model.backbone_state_dict())
    heads = model.head_state_dict()
    assert torch.equal(heads["vw_coords"], model.vw_coords) and "head.fc.weight" in heads


def test_cli_pretrain_end_to_end(phantom_home, tmp_path):
    assert main(["pretrain", "--method", "transvw", "--preset", "tiny", "--set", "method.pretrain.steps=2",
                 "--set", "model.name=unet3d", "--out", str(tmp_path)]) == 0
    run = next((tmp_path / "pretrain" / "transvw").glob("*/*"))
    state = torch.load(run / "checkpoints" / "backbone.pt", weights_only=True)
    assert any(k.startswith("upcat_1.") for k in state)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["method"]["vw_members"].shape == (4, 4)        # tiny preset: 4 classes x 4 volumes
