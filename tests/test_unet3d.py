"""The original 3D U-Net of Models Genesis / TransVW / PCRL (``model.name=unet3d``, sslbench/models/unet3d.py).

Shapes are the official network's (MrGiovanni/ModelsGenesis pytorch/unet3d.py, read 2026-12-02): the widths
below are derived by hand from its ``_make_nConv`` (level d: 32*2^d then 32*2^(d+1); decoder: in + in/2 ->
32*2^(d+1)).
"""
import pytest
import torch
from torch import nn

from sslbench.models import backbones as B
from sslbench.errors import RecipeError
from sslbench.models.unet3d import BatchStatsNorm3d, UNet3D

# (key, shape) of the official network at base 32, one class, hand-derived from the official file
OFFICIAL_SHAPES = {
    "down_tr64.ops.0.conv1.weight": (32, 1, 3, 3, 3),
    "down_tr64.ops.1.conv1.weight": (64, 32, 3, 3, 3),
    "down_tr128.ops.0.conv1.weight": (64, 64, 3, 3, 3),
    "down_tr128.ops.1.conv1.weight": (128, 64, 3, 3, 3),
    "down_tr256.ops.1.conv1.weight": (256, 128, 3, 3, 3),
    "down_tr512.ops.0.conv1.weight": (256, 256, 3, 3, 3),
    "down_tr512.ops.1.conv1.weight": (512, 256, 3, 3, 3),
    "down_tr512.ops.1.bn1.running_var": (512,),
    "up_tr256.up_conv.weight": (512, 512, 2, 2, 2),
    "up_tr256.ops.0.conv1.weight": (256, 768, 3, 3, 3),
    "up_tr256.ops.1.conv1.weight": (256, 256, 3, 3, 3),
    "up_tr128.up_conv.weight": (256, 256, 2, 2, 2),
    "up_tr128.ops.0.conv1.weight": (128, 384, 3, 3, 3),
    "up_tr64.up_conv.weight": (128, 128, 2, 2, 2),
    "up_tr64.ops.0.conv1.weight": (64, 192, 3, 3, 3),
    "out_tr.final_conv.weight": (1, 64, 1, 1, 1),
}


def test_official_key_layout_and_widths():
    state = UNet3D().state_dict()
    for key, shape in OFFICIAL_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    convs = [k for k in state if k.endswith("conv1.weight")]
    assert len(convs) == 4 * 2 + 3 * 2            # two convolutions per level, 4 encoder + 3 decoder levels
    assert not any("maxpool" in k or "sigmoid" in k for k in state)


def test_forward_shapes_three_poolings_and_logits():
    net = UNet3D(in_channels=2, out_channels=3, base=4)
    x = torch.randn(2, 2, 8, 16, 24)
    feats = net.encode(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 8, 16, 24), (16, 4, 8, 12), (32, 2, 4, 6), (64, 1, 2, 3)]
    y = net(x)
    assert y.shape == (2, 3, 8, 16, 24)
    assert (y < 0).any() and (y > 1).any()       # logits, not the official sigmoid output
    assert torch.allclose(y, net.out_tr(net.decode(feats)))
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.randn(2, 2, 8, 12, 16))


def test_batch_stats_norm_uses_the_batch_in_eval_and_updates_running_stats():
    norm = BatchStatsNorm3d(1, momentum=0.5)
    with torch.no_grad():
        norm.weight.fill_(2.0)
        norm.bias.fill_(1.0)
    norm.eval()
    x = torch.tensor([0.0, 2.0, 4.0, 6.0]).view(2, 1, 2, 1, 1)        # mean 3, biased var 5
    y = norm(x)
    expected = (torch.tensor([0.0, 2.0, 4.0, 6.0]) - 3.0) / (5.0 + norm.eps) ** 0.5 * 2.0 + 1.0
    assert torch.allclose(y.flatten(), expected)
    # running buffers move even in eval (unbiased var 20/3), as the official layer's F.batch_norm(training=True)
    assert torch.allclose(norm.running_mean, torch.tensor([0.5 * 0 + 0.5 * 3.0]))
    assert torch.allclose(norm.running_var, torch.tensor([0.5 * 1 + 0.5 * 20.0 / 3.0]))
    standard = nn.BatchNorm3d(1).eval()
    assert torch.allclose(standard(x), x / (1 + standard.eps) ** 0.5)    # running stats (0, 1): not the batch


def test_norm_batch_is_a_standard_batchnorm_in_eval():
    net = UNet3D(base=2, norm="batch").eval()
    assert not any(isinstance(m, BatchStatsNorm3d) for m in net.modules())
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.allclose(net(x), net(x))
    official = UNet3D(base=2).eval()
    official.load_state_dict(net.state_dict())
    assert not torch.allclose(official(x), net(x), atol=1e-4)      # batch statistics vs running statistics


def test_released_weights_layout_loads(tmp_path):
    """A checkpoint as the official Genesis_Chest_CT.pt stores it ({"state_dict": {"module.<key>": ...}})."""
    src = UNet3D(base=4)
    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    state = B.read_checkpoint(path)
    cfg = {"name": "unet3d", "unet3d": {"base": 4}}
    target = B.build_model(cfg, in_channels=1, out_channels=5)
    report = B.load_backbone(target, state, str(path), include_decoder=True, model_name="unet3d")
    assert not report.missing and not report.shape_mismatch
    assert {k.split(".")[0] for k in report.matched} == {"down_tr64", "down_tr128", "down_tr256", "down_tr512",
                                                         "up_tr256", "up_tr128", "up_tr64"}
    assert all(k.startswith("out_tr.") for k in report.unexpected)       # the task head is never transferred
    got = target.state_dict()
    assert torch.equal(got["up_tr64.ops.1.conv1.weight"], src.state_dict()["up_tr64.ops.1.conv1.weight"])
    enc_only = B.load_backbone(B.build_model(cfg), state, str(path), model_name="unet3d")
    assert not any(k.startswith("up_tr") for k in enc_only.matched)


@pytest.mark.parametrize("family,cfg", [("unet3d", {"unet3d": {"base": 2}}),
                                        ("basicunet", {"unet_features": [2, 2, 4, 4, 8, 2]})])
def test_family_interface_matches_the_network_forward(family, cfg):
    torch.manual_seed(0)
    net = B.build_model({"name": family, **cfg}).eval()
    if family == "unet3d":
        net = UNet3D(base=2, norm="batch").eval()          # running stats: forward is batch-independent
    holder = nn.Module()                                    # a method's copy: the modules under their names
    for prefix in B.TRANSFER_PREFIXES[family][0] + B.TRANSFER_PREFIXES[family][1]:
        setattr(holder, prefix.rstrip("."), getattr(net, prefix.rstrip(".")))
    x = torch.randn(1, 1, 16, 16, 16)
    feats = B.encoder_features(holder, family, x)
    module, channels = B.bottleneck_module(holder, family)
    assert feats[-1].shape[1] == channels and torch.allclose(feats[-1], B.bottleneck_features(holder, family, x))
    head = getattr(net, B.output_layer_name(family))
    assert torch.allclose(head(B.decoder_output(holder, family, feats)), net(x), atol=1e-6)
    widths = B.upsampling_widths({"name": family, **cfg}, family)
    assert widths[0] == channels and len(widths) - 1 == {"unet3d": 3, "basicunet": 4}[family]


def test_recipe_keys_and_hash(tmp_path):
    from sslbench.recipes import protocol_hash, resolve

    with pytest.raises(RecipeError, match=r"model\.unet3d\.norm"):
        resolve("mg", "mmwhs", preset="tiny", overrides=["model.name=unet3d", "model.unet3d.norm=instance"])
    cfg = resolve("mg", "mmwhs", preset="tiny", overrides=["model.name=unet3d"])
    assert cfg["model"]["unet3d"] == {"base": 8, "norm": "batch_stats", "act": "relu"}
    other = resolve("mg", "mmwhs", preset="tiny", overrides=["model.name=unet3d", "model.unet3d.norm=batch"])
    assert protocol_hash(cfg) != protocol_hash(other)
    swin = resolve("mg", "mmwhs", preset="tiny")
    swin_other = resolve("mg", "mmwhs", preset="tiny", overrides=["model.unet3d.base=16"])
    assert protocol_hash(swin) == protocol_hash(swin_other)    # U-Net settings do not change a SwinUNETR run
