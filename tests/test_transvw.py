"""TransVW (sslbench/methods/transvw.py): self-discovery on hand-built corpora, visual-word labels and
instances, the perturbations, the loss, tiny training steps, the handover for both backbone families and
the CLI end to end. Training runs on the tiny 3D U-Net; SwinUNETR runs one step and its handover.
"""
from __future__ import annotations

import math

import pytest
import torch

from methodkit import check_handover, closes_gap, tiny_method, train_steps
from sslbench.cli import main
from sslbench.errors import RecipeError
from sslbench.methods.parts import perturbations as PT
from sslbench.methods import transvw as T

UNET = {"name": "basicunet", "feature_size": 12, "unet_features": [8, 16, 32, 64, 128, 8]}
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


@pytest.mark.parametrize("forms", T.PERTURBATIONS)
def test_one_of_four_picks_one_perturbation_per_sample(forms):
    x = torch.full((40, 1, 32, 32, 16), 0.5)
    torch.manual_seed(0)
    out, kind = T.one_of_four(x, perturbations=forms)
    assert set(kind.tolist()) == {0, 1, 2, 3}
    flat = (out - 0.5).abs().flatten(1)
    changed = (flat > 1e-6).float().mean(1)
    # a constant cube: shuffling changes nothing; the Bezier map changes every voxel alike; in-painting a
    # few boxes; out-painting most of the cube
    assert (changed[kind == 0] == 0).all()
    assert all(out[i].unique().numel() == 1 for i in torch.nonzero(kind == 1).flatten().tolist())
    assert (changed[kind == 2] < 0.5).all() and (changed[kind == 3] > 0.5).all()


def distinct(*shape) -> torch.Tensor:
    """Every voxel a different value (its raster index)."""
    return torch.arange(float(math.prod(shape))).view(*shape)


def box_of(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """(corner, side) of the bounding box of a bool [X, Y, Z] mask, asserting the mask IS that box."""
    idx = torch.nonzero(mask)
    lo, hi = idx.min(0).values, idx.max(0).values
    side = (hi - lo + 1).tolist()
    assert int(mask.sum()) == math.prod(side), "the changed voxels are not one box"
    return lo.tolist(), side


def test_shuffle_boxes_official_count_and_ranges():
    corners, sides = T.shuffle_boxes(200, (40, 30, 14), generator=torch.Generator().manual_seed(0))
    assert T.SHUFFLE_BLOCKS == 5 and corners.shape == sides.shape == (200, 5, 3)
    for axis, (dim, top) in enumerate(zip((40, 30, 14), (4, 3, 1))):       # sides U{1 .. dim // 10}
        assert set(sides[..., axis].unique().tolist()) == set(range(1, top + 1))
        assert corners[..., axis].min() == 0
        assert (corners[..., axis] + sides[..., axis] <= dim).all()
        assert (corners[..., axis] + sides[..., axis] == dim).any()           # the last corner is reachable
    _, small = T.shuffle_boxes(8, (6, 6, 6), generator=torch.Generator().manual_seed(0))
    assert (small == 1).all()                                                # dim < 10: 1-voxel blocks


def test_shuffle_within_boxes_permutes_inside_each_box_only():
    x = distinct(2, 1, 8, 8, 6)
    x = torch.cat([x, x + 1000.0], dim=1)                                    # 2 channels, 1000 apart
    corners = torch.tensor([[[0, 0, 0], [4, 4, 2]], [[5, 5, 5], [1, 1, 1]]])
    sides = torch.tensor([[[2, 2, 2], [3, 2, 2]], [[1, 1, 1], [3, 3, 3]]])
    out = T.shuffle_within_boxes(x, corners, sides, torch.Generator().manual_seed(0))
    inside = torch.zeros(2, 8, 8, 6, dtype=torch.bool)
    for i in range(2):
        for (cx, cy, cz), (sx, sy, sz) in zip(corners[i].tolist(), sides[i].tolist()):
            box = (i, slice(None), slice(cx, cx + sx), slice(cy, cy + sy), slice(cz, cz + sz))
            assert torch.equal(out[box].flatten().sort().values, x[box].flatten().sort().values)
            inside[i, cx:cx + sx, cy:cy + sy, cz:cz + sz] = True
    outside = ~inside[:, None].expand_as(x)
    assert torch.equal(out[outside], x[outside])                              # untouched outside the boxes
    torch.testing.assert_close(out[:, 1], out[:, 0] + 1000.0)                # one permutation for all channels
    assert not torch.equal(out[1, :, 1:4, 1:4, 1:4], x[1, :, 1:4, 1:4, 1:4])  # 27 voxels: identity ~ 1 / 27!
    assert out[1, 0, 5, 5, 5] == x[1, 0, 5, 5, 5]                             # a 1-voxel block stays


def test_shuffle_within_boxes_later_box_wins_overlaps():
    x = distinct(1, 1, 4, 4, 1)
    corners, sides = torch.tensor([[[0, 0, 0], [1, 1, 0]]]), torch.tensor([[[3, 3, 1], [2, 2, 1]]])
    for seed in range(20):
        out = T.shuffle_within_boxes(x, corners, sides, torch.Generator().manual_seed(seed))[0, 0, :, :, 0]
        late = out[1:3, 1:3].flatten().sort().values                       # box 1, written last: its own values
        assert torch.equal(late, x[0, 0, 1:3, 1:3, 0].flatten().sort().values)
        early = torch.cat([out[0, 0:3], out[1:3, 0]])                      # box 0 minus box 1: 5 distinct values
        assert early.unique().numel() == 5 and set(early.tolist()) <= set(x[0, 0, :3, :3, 0].flatten().tolist())
        assert torch.equal(out[3], x[0, 0, 3, :, 0]) and torch.equal(out[:, 3], x[0, 0, :, 3, 0])


def test_transvw_local_shuffle_touches_only_its_five_blocks():
    x = distinct(4, 1, 30, 20, 20)
    out = T.transvw_local_shuffle(x, torch.Generator().manual_seed(3))
    corners, sides = T.shuffle_boxes(4, (30, 20, 20), generator=torch.Generator().manual_seed(3))  # the same draw
    inside = torch.zeros(4, 1, 30, 20, 20, dtype=torch.bool)
    for i in range(4):
        for (cx, cy, cz), (sx, sy, sz) in zip(corners[i].tolist(), sides[i].tolist()):
            inside[i, :, cx:cx + sx, cy:cy + sy, cz:cz + sz] = True
    assert torch.equal(out[~inside], x[~inside])
    assert (out != x).any()
    for i in range(4):                                                      # a permutation of the sample's voxels
        assert torch.equal(out[i].flatten().sort().values, x[i].flatten().sort().values)
    assert inside.flatten(1).sum(1).max() <= 5 * 3 * 2 * 2                  # 5 blocks of side <= dim // 10


def test_transvw_inpaint_fills_exactly_one_box():
    dims = (21, 18, 14)
    x = torch.full((30, 2, *dims), 2.0)                                    # outside the noise's [0, 1)
    out = T.transvw_inpaint(x, torch.Generator().manual_seed(0))
    sides_seen = set()
    for i in range(30):
        changed = out[i] != 2.0
        assert torch.equal(changed[0], changed[1])
        corner, side = box_of(changed[0])
        for c, s, d in zip(corner, side, dims):
            assert d // 6 <= s <= d // 3 and 3 <= c and c + s <= d - 3
        sides_seen.add(tuple(side))
        noise = out[i][changed]
        assert (noise >= 0).all() and (noise < 1).all()
        assert torch.equal(out[i, 0][changed[0]], out[i, 1][changed[1]])    # one noise array for all channels
    assert len(sides_seen) > 1


def test_transvw_outpaint_keeps_exactly_one_window():
    dims = (21, 18, 14)
    x = torch.full((30, 2, *dims), 2.0)
    out = T.transvw_outpaint(x, torch.Generator().manual_seed(0))
    for i in range(30):
        kept = out[i] == 2.0
        assert torch.equal(kept[0], kept[1])
        corner, side = box_of(kept[0])
        for c, s, d in zip(corner, side, dims):                             # side dim - U{3 dim//7 .. 4 dim//7}
            assert d - 4 * d // 7 <= s <= d - 3 * d // 7 and 3 <= c and c + s <= d - 3
        noise = out[i][~kept]
        assert (noise >= 0).all() and (noise < 1).all()
        assert not torch.equal(out[i, 0][~kept[0]], out[i, 1][~kept[1]])   # noise drawn per channel
    with pytest.raises(ValueError, match=">= 14"):
        T.transvw_outpaint(torch.zeros(1, 1, 13, 20, 20))


def test_one_of_four_forms_are_the_named_functions():
    x = torch.rand(6, 1, 28, 28, 14, generator=torch.Generator().manual_seed(0))

    def by_hand(forms, seed):
        g = torch.Generator().manual_seed(seed)
        kind = torch.randint(0, 4, (6,), generator=g)
        if forms == "genesis":                                              # the earlier sslbench behaviour
            variants = [PT.local_pixel_shuffle(x, prob=1.0, generator=g), PT.nonlinear_intensity(x, 1.0, g),
                        PT.paint(x, 1.0, 1.0, g), PT.paint(x, 1.0, 0.0, g)]
        else:
            variants = [T.transvw_local_shuffle(x, g), PT.nonlinear_intensity(x, 1.0, g),
                        T.transvw_inpaint(x, g), T.transvw_outpaint(x, g)]
        return torch.stack([variants[int(k)][i] for i, k in enumerate(kind)]), kind

    for forms in T.PERTURBATIONS:
        out, kind = T.one_of_four(x, torch.Generator().manual_seed(1), perturbations=forms)
        want, want_kind = by_hand(forms, 1)
        assert torch.equal(kind, want_kind) and torch.equal(out, want), forms
    default, _ = T.one_of_four(x, torch.Generator().manual_seed(1))
    assert torch.equal(default, T.one_of_four(x, torch.Generator().manual_seed(1), perturbations="transvw")[0])
    # TransVW shuffles 5 small blocks (sides <= 2, 2, 1 here); Models Genesis tiles most of the cube
    moved_transvw = (T.transvw_local_shuffle(x, torch.Generator().manual_seed(0)) != x).float().mean()
    moved_genesis = (PT.local_pixel_shuffle(x, 1.0, torch.Generator().manual_seed(0)) != x).float().mean()
    assert 0 < moved_transvw <= 5 * 2 * 2 * 1 / (28 * 28 * 14) and moved_genesis > 0.3
    with pytest.raises(ValueError, match="perturbations"):
        T.one_of_four(x, perturbations="mg")


def test_perturbations_key_default_transvw_genesis_by_key_and_bad_value(monkeypatch):
    assert T.TransVWParams().perturbations == "transvw" and make().perturbations == "transvw"
    with pytest.raises(RecipeError, match=r"method\.params\.perturbations: 'mg' for method transvw; expected one of "
                                          r"transvw, genesis"):
        make(perturbations="mg")
    seen = []
    real = T.one_of_four

    def spy(x, generator=None, perturbations="transvw"):
        seen.append(perturbations)
        return real(x, generator, perturbations)

    monkeypatch.setattr(T, "one_of_four", spy)
    corpus = constant_corpus([0.1, 0.4, 0.8])
    for forms in ("transvw", "genesis"):
        m = make(perturbations=forms) if forms == "genesis" else make()
        m.prepare(corpus, 0)
        with torch.no_grad():
            m(corpus[:2], 0)
    assert seen == ["transvw", "genesis"]


# ------------------------------------------------------------------------------------------ the method

def test_forward_before_prepare_is_an_error():
    with pytest.raises(RuntimeError, match="prepare"):
        make()(torch.rand(2, 1, *SIZE), 0)


def fixed_loss(model, corpus) -> float:
    """The loss on the same instances and perturbations every call (the global RNG is re-seeded)."""
    torch.manual_seed(1234)
    with torch.no_grad():
        return float(model(corpus, 0)[0])


def test_loss_falls_on_a_unet():
    model, corpus, _, _ = tiny_method("transvw", model_overrides={"name": "basicunet"})   # calibrated on it
    before = fixed_loss(model, corpus)
    train_steps(model, corpus, 16, lr=3e-3)              # random batches: each step's loss is another batch's
    probe = [before, fixed_loss(model, corpus)]          # so the property is judged on one fixed probe batch
    assert closes_gap(probe, floor=0.0, fraction=0.2, window=1), probe       # MSE + 0.01 CE: floor 0
    _, logs = model(corpus[:2], 0)
    assert set(logs) == {"mse", "ce", "acc", "vw_fraction"}


@pytest.mark.parametrize("model_name", ["swinunetr", "unet3d", "basicunet"])
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
    assert any(k.startswith("up_tr64.") for k in state)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["method"]["vw_members"].shape == (4, 4)        # tiny preset: 4 classes x 4 volumes
