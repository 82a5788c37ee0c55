"""Checkpoint mapping onto SwinUNETR: official layouts, counts reported, refusal when nothing matches."""
import pytest
import torch

from sslbench.models.backbones import build_swinunetr, load_backbone, normalize_state_dict, read_checkpoint
from sslbench.errors import CheckpointError

TINY = {"feature_size": 12, "use_v2": True}


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    return build_swinunetr(TINY, 1, 14)


def _encoder(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith(("swinViT.", "encoder"))}


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "net", "student", "module", "backbone", "swin_vit"])
def test_official_layouts_load_with_counts(tmp_path, source, wrap):
    enc = _encoder(source)
    if wrap == "bare":
        obj = enc
    elif wrap in ("state_dict", "net", "student"):
        obj = {wrap: {f"module.{k}": v for k, v in enc.items()}, "epoch": 3}
    elif wrap == "module":
        obj = {f"module.{k}": v for k, v in enc.items()}
    elif wrap == "backbone":
        obj = {f"backbone.{k}": v for k, v in enc.items()}
    else:  # older VoCo releases spell swinViT as swin_vit
        obj = {k.replace("swinViT", "swin_vit"): v for k, v in enc.items()}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    target = build_swinunetr(TINY, 1, 8)     # another head: the decoder/out differ, the encoder matches
    report = load_backbone(target, read_checkpoint(path), str(path))
    assert len(report.matched) == len(enc) and not report.missing and not report.unexpected
    assert torch.equal(target.state_dict()["swinViT.patch_embed.proj.weight"], enc["swinViT.patch_embed.proj.weight"])
    assert f"{len(enc)} backbone tensors matched" in report.summary()


def test_partial_checkpoint_reports_missing_and_unexpected(source):
    enc = _encoder(source)
    state = {k: v for k, v in enc.items() if k.startswith("swinViT.")}
    state["contrastive_head.weight"] = torch.zeros(3)
    target = build_swinunetr(TINY, 1, 2)
    report = load_backbone(target, state, "partial")
    assert len(report.matched) == len([k for k in enc if k.startswith("swinViT.")])
    assert report.missing and all(k.startswith("encoder") for k in report.missing)
    assert report.unexpected == ["contrastive_head.weight"]


def test_shape_mismatch_is_reported_not_loaded(source):
    """BraTS-style 4-channel patch embedding: that tensor stays random, the rest loads."""
    state = _encoder(source)
    target = build_swinunetr(TINY, 4, 3)
    report = load_backbone(target, state, "ct-weights")
    assert any(m.startswith("swinViT.patch_embed.proj.weight") for m in report.shape_mismatch)
    assert len(report.matched) == len(state) - len(report.shape_mismatch)


def test_refuses_checkpoint_matching_nothing(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="matches no backbone tensor"):
        load_backbone(build_swinunetr(TINY, 1, 2), read_checkpoint(path), str(path))


def test_unreadable_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip or pickle")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        normalize_state_dict([1, 2, 3])
