"""MAE (unetr) and SimMIM-style (swinunetr) masked modelling, sslbench/methods/mae.py.

Hand-computed masks, patch order, targets and losses; the invariances that make the masking real (the
content of masked voxels reaches neither encoder); tiny training on a fixed phantom batch; the handover
for both forms; the CLI end to end. Swin crops are 64x32x32 (the smallest where SwinUNETR's encoder10 has
more than one voxel at 1/32 scale) so the file stays short on two CPU cores.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from methodkit import check_handover, closes_gap, tiny_method

from sslbench.models.backbones import build_model, load_backbone
from sslbench.bench import phantom_volumes
from sslbench.cli import main
from sslbench.errors import RecipeError
from sslbench.methods import mae as M

SWIN = {"name": "swinunetr", "feature_size": 12, "use_v2": True}
VIT = {"name": "unetr", "vit": {"patch_size": 16, "hidden_size": 96, "mlp_dim": 192, "num_layers": 2, "num_heads": 4}}
SMALL_DECODER = {"hidden_size": 48, "num_layers": 1, "num_heads": 4, "mlp_dim": 96}


def make(model_cfg, **kw) -> M.MAE:
    params = dict(crop=[64, 32, 32], resize=[64, 32, 32], flip_prob=0.0, decoder=SMALL_DECODER)
    params.update(kw)
    return M.MAE(params, model_cfg)


# ------------------------------------------------------------------------------------------ crops, masks

def test_random_crops_are_exact_blocks_inside_the_volume():
    x, y, z = torch.meshgrid(torch.arange(20.0), torch.arange(12.0), torch.arange(10.0), indexing="ij")
    ramp = (x * 10000 + y * 100 + z)[None, None]
    vols = torch.cat([ramp, ramp + 0.5, ramp + 0.25])
    g = torch.Generator().manual_seed(0)
    crops = M.random_crops(vols, (8, 12, 4), generator=g)
    assert crops.shape == (3, 1, 8, 12, 4)
    for i, off in enumerate((0.0, 0.5, 0.25)):
        c = crops[i, 0] - off
        x0, y0, z0 = int(c[0, 0, 0] // 10000), int(c[0, 0, 0] % 10000 // 100), int(c[0, 0, 0] % 100)
        assert 0 <= x0 <= 12 and y0 == 0 and 0 <= z0 <= 6
        assert torch.equal(c, ramp[0, 0, x0:x0 + 8, y0:y0 + 12, z0:z0 + 4])
    assert torch.equal(M.random_crops(vols, (20, 12, 10)), vols)
    with pytest.raises(ValueError, match="exceeds"):
        M.random_crops(vols, (24, 12, 10))


def test_token_masks_have_the_exact_ratio():
    g = torch.Generator().manual_seed(0)
    mask, ids_keep = M.random_token_masks(5, 216, 162, generator=g)      # MAE: 75 % of a 6^3 patch grid
    assert mask.dtype == torch.bool and mask.shape == (5, 216) and ids_keep.shape == (5, 54)
    assert mask.sum(1).tolist() == [162] * 5
    assert torch.all(ids_keep[:, 1:] > ids_keep[:, :-1])                  # sorted, distinct
    assert not mask.gather(1, ids_keep).any()                             # the kept ones are exactly the unmasked
    assert len({tuple(r) for r in mask.int().tolist()}) == 5              # drawn per volume
    again, _ = M.random_token_masks(5, 216, 162, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    with pytest.raises(ValueError):
        M.random_token_masks(1, 8, 8)


def test_mask_counts_of_both_forms():
    # MAE keeps int(N (1 - r)); SimMIM masks ceil(r N). 64x32x32 crop: 4 x 2 x 2 = 16 patches / blocks
    assert make(VIT).n_masked == 16 - int(16 * 0.25) == 12
    simmim = make(SWIN, simmim_mask_ratio=0.6)
    assert simmim.n_masked == math.ceil(0.6 * 16) == 10
    # the paper geometry: 96^3 -> 216 patches; 162 removed (MAE), 130 masked (SimMIM)
    assert 216 - int(216 * (1 - 0.75)) == 162 and math.ceil(0.6 * 216) == 130
    torch.manual_seed(0)
    _, logs = simmim(phantom_volumes(2, (64, 32, 32), "cpu"), 0)
    assert logs["mask_ratio"].item() == pytest.approx(10 / 16)


def test_upsample_mask_and_patchify_order():
    m = torch.tensor([[[[True, False]], [[False, True]]]])                # [1, 2, 1, 2]
    up = M.upsample_mask(m, 3)
    assert up.shape == (1, 6, 3, 6)
    assert up[0, :3, :, :3].all() and not up[0, :3, :, 3:].any() and up[0, 3:, :, 3:].all()
    # patchify's token order is the one of a ViT conv patch embedding (flatten of [gx, gy, gz])
    x = torch.rand(2, 1, 32, 16, 48)
    conv = torch.nn.Conv3d(1, 1, 16, stride=16, bias=False)
    torch.nn.init.constant_(conv.weight, 1.0 / 16 ** 3)
    tokens = M.patchify(x, 16)
    assert tokens.shape == (2, 2 * 1 * 3, 16 ** 3)
    torch.testing.assert_close(tokens.mean(-1), conv(x).flatten(2)[:, 0])
    # token 4 = (ix 1, iy 0, iz 1): voxels [16:32, 0:16, 16:32]
    torch.testing.assert_close(tokens[1, 4].sort().values, x[1, 0, 16:32, 0:16, 16:32].flatten().sort().values)


# --------------------------------------------------------------------------------------------- losses

def test_normalized_patch_targets_hand_computed():
    patch = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]])
    t = M.normalized_patch_targets(patch)
    var = (1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3                  # unbiased, as the MAE code
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(var + 1e-6)
    torch.testing.assert_close(t[0, 0], expected)
    assert torch.equal(t[0, 1], torch.zeros(4))                          # a flat patch: 0, not NaN


def test_masked_patch_mse_counts_masked_patches_only():
    target = torch.zeros(1, 3, 2)
    pred = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [10.0, 10.0]]])
    mask = torch.tensor([[True, True, False]])
    # per patch: (1 + 9) / 2 = 5, (4 + 4) / 2 = 4, (ignored); mean over the 2 masked = 4.5
    assert M.masked_patch_mse(pred, target, mask).item() == pytest.approx(4.5)
    moved = pred.clone()
    moved[0, 2, 0] = -7.0                                                  # an unmasked patch's voxel
    assert M.masked_patch_mse(moved, target, mask).item() == pytest.approx(4.5)
    moved[0, 0, 0] = 0.0                                                   # a masked one
    assert M.masked_patch_mse(moved, target, mask).item() == pytest.approx((4.5 + 4) / 2)


def test_masked_l1_counts_masked_voxels_only():
    target = torch.zeros(1, 1, 2, 2, 1)
    pred = torch.tensor([1.0, -2.0, 5.0, 7.0]).view(1, 1, 2, 2, 1)
    voxel_mask = torch.tensor([True, True, False, False]).view(1, 2, 2, 1)
    assert M.masked_l1(pred, target, voxel_mask).item() == pytest.approx(3 / (2 + 1e-5))
    moved = pred.clone()
    moved[0, 0, 1, 1, 0] = 100.0                                           # unmasked voxel
    assert M.masked_l1(moved, target, voxel_mask).item() == pytest.approx(3 / (2 + 1e-5))
    moved[0, 0, 0, 0, 0] = 4.0                                             # masked voxel
    assert M.masked_l1(moved, target, voxel_mask).item() == pytest.approx(6 / (2 + 1e-5))


# ------------------------------------------------------------------------------------------- networks

def test_mask_token_replaces_masked_embeddings_in_swin():
    torch.manual_seed(0)
    model = make(SWIN).model.eval()
    x = torch.rand(1, 1, 64, 32, 32)
    blocks = torch.zeros(1, 4, 2, 2, dtype=torch.bool)
    blocks[0, 1, 0, 1] = blocks[0, 3, 1, 0] = True
    token_mask = M.upsample_mask(blocks, 8)                                # 16^3 voxel block = 8^3 tokens
    emb = model.embed(x, token_mask)
    plain = model.net.swinViT.patch_embed(x)
    token = model.mask_token.view(-1)
    assert torch.equal(emb[0, :, 8, 0, 8], token) and torch.equal(emb[0, :, 31, 15, 0], token)
    assert torch.equal(emb[0, :, 0, 0, 0], plain[0, :, 0, 0, 0])
    assert torch.equal(emb[:, :, ~token_mask[0]], plain[:, :, ~token_mask[0]])
    # so the content of masked voxels reaches no Swin stage
    voxel_mask = M.upsample_mask(blocks, 16).unsqueeze(1)
    noisy = torch.where(voxel_mask, torch.rand_like(x), x)
    with torch.no_grad():
        for a, b in zip(model.swin_stages(x, token_mask), model.swin_stages(noisy, token_mask)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mae_encoder_sees_visible_patches_only():
    torch.manual_seed(0)
    model = make(VIT).model.eval()
    grid = model.grid
    assert grid == (4, 2, 2)
    mask, ids_keep = M.random_token_masks(1, 16, 12, generator=torch.Generator().manual_seed(1))
    x = torch.rand(1, 1, 64, 32, 32)
    voxel_mask = M.upsample_mask(mask.view(1, *grid), 16).unsqueeze(1)
    noisy = torch.where(voxel_mask, torch.rand_like(x), x)
    with torch.no_grad():
        latent = model.encode(x, ids_keep)
        assert latent.shape == (1, 4, 96)
        torch.testing.assert_close(model.encode(noisy, ids_keep), latent, rtol=0, atol=0)
        assert model(x, ids_keep).shape == (1, 16, 16 ** 3)
    # MAE's fixed sin-cos position embedding, not trained
    pos = model.vit.patch_embedding.position_embeddings
    assert not pos.requires_grad and pos.shape == (1, 16, 96)
    assert pos.abs().max() <= 1.0 and pos[0, 0, 1::2].ne(0).any()


def test_bad_configuration_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"model\.name.*unetr, swinunetr"):
        make({"name": "unet3d"})
    with pytest.raises(RecipeError, match=r"method\.params\.crop.*divisible by 32"):
        make(SWIN, crop=[48, 32, 32], resize=[64, 64, 64])
    with pytest.raises(RecipeError, match=r"method\.params\.mae_mask_ratio"):
        make(VIT, mae_mask_ratio=1.0)
    with pytest.raises(RecipeError, match=r"method\.params\.crop.*exceeds"):
        make(VIT, crop=[64, 64, 64], resize=[64, 32, 32])
    assert M.MAE.input_size({"resize": [192, 192, 128], "crop": [96, 96, 96]}) == (192, 192, 128)


# ------------------------------------------------------------------------------------- training, handover

@pytest.mark.parametrize("model_cfg,steps", [(SWIN, 12), (VIT, 30)], ids=["simmim-swin", "mae-vit"])
def test_loss_falls_on_a_fixed_batch(model_cfg, steps):
    torch.manual_seed(0)
    model = make(model_cfg)
    vols = phantom_volumes(1, (64, 32, 32), "cpu", seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(steps):
        torch.manual_seed(7)                                  # the same mask every step: a fixed batch
        loss, logs = model(vols, step)
        assert torch.isfinite(loss) and set(logs) == {"loss", "mask_ratio"}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert closes_gap(losses, floor=0.0, fraction=0.25), losses             # a reconstruction error: floor 0


@pytest.mark.parametrize("model_name", ["swinunetr", "unetr"])
def test_handover_loads_every_backbone_tensor(model_name):
    model, _, _, model_cfg = tiny_method("mae", model_overrides={"name": model_name}, corpus_size=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)                                      # differ from any fresh initialisation
    report = check_handover(model, model_cfg, img_size=model.crop)
    state = model.backbone_state_dict()
    assert len(report.matched) == len(state)
    heads = model.head_state_dict()
    if model_name == "unetr":
        target = build_model(model_cfg, 1, 3, img_size=model.crop)
        target_keys = {k for k in target.state_dict() if k.startswith("vit.")}
        assert set(state) == target_keys                      # every vit.* tensor, nothing else
        assert heads and all(k.startswith("decoder.") for k in heads)
        # another fine-tuning ROI: the position embedding (one row per patch) cannot load; said so
        other = build_model(model_cfg, 1, 3, img_size=(64, 64, 64))
        rep = load_backbone(other, state, "handover", model_name="unetr")
        assert [m.split(" ")[0] for m in rep.shape_mismatch] == ["vit.patch_embedding.position_embeddings"]
    else:
        assert {k.split(".")[0] for k in state} == {"swinViT", "encoder1", "encoder2", "encoder3", "encoder4",
                                                    "encoder10"}
        assert "mask_token" in heads and any(k.startswith("net.decoder1.") for k in heads)
        assert not any(k.startswith(("net.swinViT", "net.encoder")) for k in heads)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_pretrain_end_to_end(phantom_home, tmp_path):
    out = tmp_path / "runs"
    code = main(["pretrain", "--method", "mae", "--preset", "tiny", "--out", str(out),
                 "--set", "method.pretrain.steps=2", "--set", "method.pretrain.batch_size=1",
                 "--set", "method.params.crop=[64,32,32]", "--set", "method.params.resize=[64,48,32]"])
    assert code == 0
    runs = list((out / "pretrain" / "mae").glob("*/*"))
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["method"] == "mae" and metrics["steps"] == 2 and metrics["phantom"] is True
    assert math.isfinite(metrics["final_loss"])
    backbone = torch.load(runs[0] / "checkpoints" / "backbone.pt", weights_only=True)
    assert metrics["backbone_tensors"] == len(backbone) and "swinViT.patch_embed.proj.weight" in backbone
    assert "mask_token" in torch.load(runs[0] / "checkpoints" / "heads.pt", weights_only=True)
