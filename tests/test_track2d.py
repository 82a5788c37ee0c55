"""The 2D track (issue 23): PCRL's ResNet-18 U-Net, the recipes of 2D runs, 3D hashes unchanged."""
import pytest
import torch

from sslbench import recipes
from sslbench.tasks import classification as classify
from sslbench.models.backbones import load_backbone
from sslbench.errors import RecipeError
from sslbench.models.unet2d import UNet2D, UNet2DClassifier, unet2d_config

CFG = {"name": "unet2d"}


def test_unet2d_is_a_resnet18_unet_with_smp_widths():
    net = UNet2D(CFG, in_channels=1, out_channels=3)
    assert net.widths == [64, 64, 128, 256, 512]                 # ResNet-18 maps at strides 2..32
    feats = net.encoder(torch.zeros(2, 1, 64, 64))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    # decoder blocks: (in + skip) -> out = (512+256) -> 256, (256+128) -> 128, (128+64) -> 64, (64+64) -> 32, 32 -> 16
    ins = [b.conv1[0].in_channels for b in net.decoder.blocks]
    outs = [b.conv2[0].out_channels for b in net.decoder.blocks]
    assert ins == [768, 384, 192, 128, 32] and outs == [256, 128, 64, 32, 16]
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 3, 64, 64)   # back at full resolution
    n_enc = sum(p.numel() for p in net.encoder.parameters())
    assert 11.0e6 < n_enc < 11.3e6                                 # ResNet-18 without its fc (11.17M)


def test_classifier_pools_the_last_map_and_loads_encoder_keys_only():
    clf = UNet2DClassifier(CFG, 14)
    assert clf(torch.rand(3, 1, 32, 32)).shape == (3, 14)
    src = UNet2D(CFG)
    rep = load_backbone(clf, {k: v for k, v in src.state_dict().items()}, "x", model_name="unet2d")
    assert len(rep.matched) == len(src.encoder.state_dict()) and not rep.missing
    assert all(k.startswith("decoder.") or k.startswith("head.") for k in rep.unexpected)
    assert torch.equal(clf.encoder.conv1.weight, src.encoder.conv1.weight)


def test_pretrained_2d_key_is_checked_and_off_by_default():
    assert unet2d_config({})["pretrained"] == "none"
    with pytest.raises(RecipeError, match="model.pretrained_2d: expected one of none, imagenet"):
        unet2d_config({"pretrained_2d": "yes"})


def test_2d_runs_use_the_unet_and_pretrain_on_the_task_itself():
    cfg = recipes.resolve("scratch", "phantom-chestxray14")
    assert cfg["model"]["name"] == "unet2d" and "model" not in cfg["task"]
    assert isinstance(classify.build_classifier(cfg["model"], 14, 2), UNet2DClassifier)
    swin = recipes.resolve("scratch", "phantom-chestxray14", overrides=["model.name=swinunetr"])
    assert isinstance(classify.build_classifier(swin["model"], 14, 2), classify.EncoderClassifier)   # still there
    with pytest.raises(RecipeError, match="--corpus phantom-corpus: task 'phantom-chestxray14' is 2D"):
        recipes.resolve("simsiam", "phantom-chestxray14", corpus="phantom-corpus")


def test_2d_only_method_and_2d_forms_resolve_or_refuse_in_one_line():
    cfg = recipes.resolve("voco", "phantom-chestxray14")
    assert cfg["corpus"]["name"] == "phantom-chestxray14" and cfg["method"]["params"]["n"] == 2   # two_d tiny
    assert "two_d" not in cfg["method"] and "resize" not in cfg["method"]["params"]
    assert recipes.resolve("voco", "phantom-mmwhs")["method"]["params"]["resize"] == [128, 128, 32]   # 3D as before
    for task, corpus, needle in (("btcv", None, "task 'btcv' is segmentation"), (None, None, "no 2D task given"),
                                 (None, "phantom-corpus", "corpus 'phantom-corpus' is not a 2D task")):
        with pytest.raises(RecipeError, match="method 'c2l' exists in 2D only") as err:
            recipes.resolve("c2l", task, corpus=corpus)
        assert needle in str(err.value) and "\n" not in str(err.value)
    assert recipes.resolve("c2l", corpus="phantom-chestxray14")["method"]["params"]["queue"] == 64   # tiny


def test_3d_protocol_hashes_are_unchanged():
    """Hashes computed with the code before the 2D track (main at b671a3c); every method x 3D task x preset
    was compared the same way (110 pairs, identical)."""
    pin = {("voco", "btcv", "paper"): ("5ca10464227e", "f72dd351fa6a"),
           ("simsiam", "mmwhs", "tiny"): ("4567807b4596", "d3544b4b115b"),
           ("pcrlv2", "phantom-mmwhs", "tiny"): ("533f7114d002", "b3a025973d67")}
    for (m, t, preset), (ft, pt) in pin.items():
        cfg = recipes.resolve(m, t, preset=preset)
        assert recipes.protocol_hash(recipes.split_config(cfg, "task")) == ft
        assert recipes.protocol_hash(recipes.split_config(cfg, "corpus")) == pt


def test_bench_pretrain2d_times_the_protocols_2d_methods_and_keeps_failures_as_rows(tmp_path, capsys):
    """`sslbench bench pretrain2d` builds each method's 2D form as the 2D track does and times real steps; a
    method without a 2D form is an error row (rc 1), not the end of the table."""
    import json

    from sslbench import cli

    out = tmp_path / "rows.json"
    rc = cli.main(["bench", "pretrain2d", "--method", "c2l", "swinunetr-ssl", "--batch", "2", "--size", "64", "64",
                   "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert rc == 1 and [r["method"] for r in rows] == ["c2l", "swinunetr-ssl"]
    c2l, ssl = rows
    assert c2l["form"] == "C2L" and c2l["model"] == "unet2d" and c2l["size"] == [64, 64] and c2l["batch"] == 2
    assert c2l["images_per_s"] == pytest.approx(2 / c2l["step_s"]) and c2l["step_s_min"] <= c2l["step_s"]
    assert c2l["loss_finite"] and c2l["valid"]
    assert "no 2D form" in ssl["error"] and "c2l" in ssl["error"]
    assert "images_per_s" in capsys.readouterr().out
