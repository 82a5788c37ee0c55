"""The shared backbone (MONAI SwinUNETR) and the mapping of checkpoints onto it.

Every method pre-trains this backbone and every task fine-tunes it, so a checkpoint written by any
method (or by the official VoCo / SwinUNETR releases) is loaded by the same explicit key rules, and the
load reports how many backbone tensors matched: never a silent ``strict=False``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..speed.names import ATTENTIONS  # noqa: F401 - the window-attention forms a Swin backbone computes with

#: Key prefixes of SwinUNETR's encoder: the part that self-supervised pre-training transfers.
ENCODER_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
#: Key prefixes of SwinUNETR's decoder (transferred by methods that train one: MG, TransVW, PCRL).
DECODER_PREFIXES = ("decoder5.", "decoder4.", "decoder3.", "decoder2.", "decoder1.")

#: model.name -> (encoder prefixes, decoder prefixes). The task-specific output layer is never transferred.
#: * swinunetr: MONAI SwinUNETR (the shared backbone of every table).
#: * unet3d: the original 3D U-Net of Models Genesis, TransVW and PCRL (:mod:`sslbench.models.unet3d`, the official
#:   parameter names, so their released weights load), offered as a recipe option (``--set model.name=unet3d``).
#: * basicunet: MONAI BasicUNet at Models Genesis' widths (32-64-128-256-512, 4 poolings, LeakyReLU, batch norm):
#:   a modern 3D U-Net of the same size (``--set model.name=basicunet``); until 2026-12 sslbench's ``unet3d``.
#: * unetr: MONAI UNETR, whose ``vit`` is the ViT that MAE pre-trains (``--set model.name=unetr``).
TRANSFER_PREFIXES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "swinunetr": (ENCODER_PREFIXES, DECODER_PREFIXES),
    "unet3d": (("down_tr64.", "down_tr128.", "down_tr256.", "down_tr512."), ("up_tr256.", "up_tr128.", "up_tr64.")),
    "basicunet": (("conv_0.", "down_1.", "down_2.", "down_3.", "down_4."),
                  ("upcat_4.", "upcat_3.", "upcat_2.", "upcat_1.")),
    "unetr": (("vit.",), ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "decoder5.", "decoder4.",
                          "decoder3.", "decoder2.")),
    # the 2D track: PCRL's ResNet-18 U-Net (sslbench/models/unet2d.py; timm encoder, smp-style decoder)
    "unet2d": (("encoder.",), ("decoder.",)),
}
MODEL_NAMES = tuple(TRANSFER_PREFIXES)
_WRAPPERS = ("state_dict", "student", "net", "model", "network_weights", "backbone_state_dict")
_STRIP = ("module.", "backbone.", "_orig_mod.", "student.", "model.")


def build_swinunetr(model_cfg: Mapping[str, Any], in_channels: int = 1, out_channels: int = 1) -> nn.Module:
    """MONAI SwinUNETR configured from the resolved ``model`` section of a run recipe."""
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=int(model_cfg["feature_size"]),
        use_v2=bool(model_cfg.get("use_v2", True)),
        use_checkpoint=bool(model_cfg.get("use_checkpoint", False)),
        drop_rate=float(model_cfg.get("drop_rate", 0.0)),
        attn_drop_rate=float(model_cfg.get("attn_drop_rate", 0.0)),
        dropout_path_rate=float(model_cfg.get("dropout_path_rate", 0.0)),
    )


def unet3d_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``model.unet3d`` resolved: base width (official 32), norm (batch_stats = official | batch), act (relu)."""
    u = dict(model_cfg.get("unet3d") or {})
    return {"base": int(u.get("base", 32)), "norm": str(u.get("norm", "batch_stats")), "act": str(u.get("act", "relu"))}


def build_unet3d(model_cfg: Mapping[str, Any], in_channels: int = 1, out_channels: int = 1) -> nn.Module:
    """Models Genesis' 3D U-Net (:class:`sslbench.models.unet3d.UNet3D`) configured by ``model.unet3d``."""
    from .unet3d import UNet3D

    return UNet3D(in_channels=in_channels, out_channels=out_channels, **unet3d_config(model_cfg))


def build_basicunet(model_cfg: Mapping[str, Any], in_channels: int = 1, out_channels: int = 1) -> nn.Module:
    """MONAI BasicUNet at Models Genesis' UNet3D widths (``model.unet_features``; 5 levels + the last upsample)."""
    from monai.networks.nets import BasicUNet

    feats = tuple(int(f) for f in model_cfg.get("unet_features") or (32, 64, 128, 256, 512, 32))
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, features=feats,
                     norm=("batch", {"affine": True}), act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                     dropout=float(model_cfg.get("drop_rate", 0.0)))


def vit_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ViT geometry shared by MAE pre-training and UNETR fine-tuning (``model.vit``)."""
    vit = dict(model_cfg.get("vit") or {})
    return {"patch_size": int(vit.get("patch_size", 16)), "hidden_size": int(vit.get("hidden_size", 768)),
            "mlp_dim": int(vit.get("mlp_dim", 3072)), "num_layers": int(vit.get("num_layers", 12)),
            "num_heads": int(vit.get("num_heads", 12))}


def build_unetr(model_cfg: Mapping[str, Any], in_channels: int, out_channels: int,
                img_size: tuple[int, int, int]) -> nn.Module:
    """MONAI UNETR (ViT encoder at ``img_size``, the fine-tuning ROI) for MAE's ViT weights."""
    from monai.networks.nets import UNETR

    v = vit_config(model_cfg)
    if v["patch_size"] != 16:
        raise ValueError(f"model.vit.patch_size: MONAI UNETR uses 16, got {v['patch_size']}")
    return UNETR(in_channels=in_channels, out_channels=out_channels, img_size=tuple(int(s) for s in img_size),
                 feature_size=16, hidden_size=v["hidden_size"], mlp_dim=v["mlp_dim"], num_heads=v["num_heads"],
                 proj_type="conv", norm_name="instance", dropout_rate=float(model_cfg.get("drop_rate", 0.0)),
                 qkv_bias=True)


def build_model(model_cfg: Mapping[str, Any], in_channels: int = 1, out_channels: int = 1,
                img_size: tuple[int, int, int] | None = None) -> nn.Module:
    """The fine-tuning network named by ``model.name`` (pre-training methods build the same one)."""
    name = str(model_cfg.get("name", "swinunetr"))
    if name == "swinunetr":
        return build_swinunetr(model_cfg, in_channels, out_channels)
    if name == "unet3d":
        return build_unet3d(model_cfg, in_channels, out_channels)
    if name == "basicunet":
        return build_basicunet(model_cfg, in_channels, out_channels)
    if name == "unetr":
        if img_size is None:
            raise ValueError("model.name=unetr needs the input size (its ViT position embedding is fixed)")
        return build_unetr(model_cfg, in_channels, out_channels, img_size)
    raise ValueError(f"model.name: unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")


#: model.name -> the input-size multiple its encoder needs (the product of its downsamplings).
SIZE_DIVISOR = {"swinunetr": 32, "unet3d": 8, "basicunet": 16, "unetr": 16}


# ---- the encoder / decoder of each convolutional family, for methods that use its maps -------------------------
# Each function takes any module that holds the family's encoder (or decoder) submodules under the network's own
# attribute names: the network itself, or a method's encoder copy, so that a method's keys stay the fine-tuning
# keys. Methods call these, never the networks' internals.

def encoder_features(m: nn.Module, family: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's maps, shallow to deep, the bottleneck last.

    swinunetr: [enc0, enc1, enc2, enc3, hs3, dec4] (SwinUNETR.forward's skips, then encoder10's map);
    unet3d: [skip 1/1, 1/2, 1/4, bottleneck 1/8]; basicunet: [x0, x1, x2, x3, x4 (1/16)].
    """
    if family == "swinunetr":
        hs = m.swinViT(x, True)
        return [m.encoder1(x), m.encoder2(hs[0]), m.encoder3(hs[1]), m.encoder4(hs[2]), hs[3], m.encoder10(hs[4])]
    if family == "unet3d":
        from .unet3d import encode_unet3d

        return encode_unet3d(m, x)
    if family == "basicunet":
        x0 = m.conv_0(x)
        x1 = m.down_1(x0)
        x2 = m.down_2(x1)
        x3 = m.down_3(x2)
        return [x0, x1, x2, x3, m.down_4(x3)]
    raise ValueError(f"model.name: no encoder interface for {family!r}")


def bottleneck_features(m: nn.Module, family: str, x: torch.Tensor) -> torch.Tensor:
    """Only the path input -> bottleneck (on swinunetr swinViT -> encoder10, without the skip blocks)."""
    if family == "swinunetr":
        return m.encoder10(m.swinViT(x, True)[4])
    return encoder_features(m, family, x)[-1]


def decoder_output(m: nn.Module, family: str, feats: list[torch.Tensor]) -> torch.Tensor:
    """The last decoder map (before the output layer) from :func:`encoder_features`, as the network's forward."""
    if family == "swinunetr":
        enc0, enc1, enc2, enc3, hs3, dec4 = feats
        d = m.decoder5(dec4, hs3)
        d = m.decoder4(d, enc3)
        d = m.decoder3(d, enc2)
        d = m.decoder2(d, enc1)
        return m.decoder1(d, enc0)
    if family == "unet3d":
        from .unet3d import decode_unet3d

        return decode_unet3d(m, feats)
    if family == "basicunet":
        x0, x1, x2, x3, x4 = feats
        u = m.upcat_4(x4, x3)
        u = m.upcat_3(u, x2)
        u = m.upcat_2(u, x1)
        return m.upcat_1(u, x0)
    raise ValueError(f"model.name: no decoder interface for {family!r}")


def bottleneck_module(m: nn.Module, family: str) -> tuple[nn.Module, int]:
    """The submodule whose output is the bottleneck map, and its channels (for forward hooks)."""
    if family == "swinunetr":
        return m.encoder10, int(m.encoder10.layer.conv1.conv.out_channels)
    if family == "unet3d":
        return m.down_tr512, int(m.down_tr512.out_channels)
    if family == "basicunet":
        return m.down_4, int(m.down_4.convs.conv_1.conv.out_channels)
    raise ValueError(f"model.name: no bottleneck for {family!r}")


def output_layer_name(family: str) -> str:
    """The attribute of the task-specific output layer (never transferred)."""
    return {"swinunetr": "out", "unet3d": "out_tr", "basicunet": "final_conv"}[family]


def upsampling_widths(model_cfg: Mapping[str, Any], family: str) -> list[int]:
    """The bottleneck's width, then the width after each of the decoder's upsamplings (deep to shallow)."""
    if family == "swinunetr":
        fs = int(model_cfg["feature_size"])
        return [16 * fs, 8 * fs, 4 * fs, 2 * fs, fs, fs]
    if family == "unet3d":
        b = unet3d_config(model_cfg)["base"]
        return [16 * b, 8 * b, 4 * b, 2 * b]
    f = [int(v) for v in (model_cfg.get("unet_features") or (32, 64, 128, 256, 512, 32))]
    return [f[4], f[3], f[2], f[1], f[5]]


def is_transferable(key: str, include_decoder: bool = False, model_name: str = "swinunetr") -> bool:
    enc, dec = TRANSFER_PREFIXES.get(model_name, (ENCODER_PREFIXES, DECODER_PREFIXES))
    prefixes = enc + (dec if include_decoder else ())
    return key.startswith(prefixes)


def transferable_state(net: nn.Module, model_name: str) -> dict[str, torch.Tensor]:
    """Encoder + decoder tensors of ``net`` (its output layer excluded), fine-tuning key layout."""
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()
            if is_transferable(k, include_decoder=True, model_name=model_name)}


def normalize_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap a checkpoint object into a flat {key: tensor} dict in SwinUNETR's key layout.

    Accepts the official layouts: a bare state dict, or one wrapped in ``state_dict`` / ``net`` /
    ``student`` / ``model``; keys prefixed by ``module.`` (DDP) or ``backbone.``; ``swin_vit`` spelled
    for ``swinViT`` (older VoCo releases).
    """
    if isinstance(obj, Mapping):
        for wrapper in _WRAPPERS:
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        k = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP:
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        k = k.replace("swin_vit", "swinViT")
        out[k] = value
    return out


@dataclass
class LoadReport:
    """What a checkpoint load did to a model's backbone tensors."""

    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # backbone tensors the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)    # checkpoint tensors that fit nothing
    shape_mismatch: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)       # input-channel kernels repeated 1 -> C (see load_backbone)

    def summary(self) -> str:
        text = (f"{self.source}: {len(self.matched)} backbone tensors matched, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.shape_mismatch)} with another shape (kept random)")
        if self.adapted:
            text += f"; {len(self.adapted)} input kernels adapted from 1 to more channels (repeated, divided by C)"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "matched": len(self.matched), "missing": len(self.missing),
                "unexpected": len(self.unexpected), "shape_mismatch": self.shape_mismatch,
                "adapted": self.adapted}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or pickled-object files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable weights-only torch checkpoint ({first[:160]})") from None
    return normalize_state_dict(obj, source=str(path))


def adapt_input_kernel(value: torch.Tensor, channels: int) -> torch.Tensor:
    """A 1-input-channel convolution kernel ``[F, 1, k...]`` for ``channels`` inputs: repeated, divided by C.

    The common inflation of single-channel pre-trained weights to multi-channel inputs (as for RGB
    ImageNet weights on 1-channel data, in reverse): on an input whose C channels are all equal to x the
    adapted kernel gives exactly the pre-trained response to x.
    """
    return value.repeat(1, channels, *([1] * (value.dim() - 2))) / channels


def load_backbone(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                  include_decoder: bool = False, model_name: str = "swinunetr",
                  channel_adapt: str = "random") -> LoadReport:
    """Copy the checkpoint tensors that match the model's transferable keys; report the rest.

    ``channel_adapt`` decides what a 1-input-channel checkpoint gives a C-channel model (BraTS, MSD Task01
    and Task05), whose input kernels (SwinUNETR: the patch embedding and encoder1's convolutions) have
    shape ``[F, C, k...]`` instead of ``[F, 1, k...]``: ``repeat`` loads them through
    :func:`adapt_input_kernel` (listed in ``LoadReport.adapted``); ``random`` (the default) keeps them random
    (listed in ``shape_mismatch``), which is what the official VoCo BraTS fine-tuning does with its patch
    embedding. Multi-channel task recipes choose with ``finetune.channel_adapt``.
    Raises CheckpointError when no backbone tensor matches (a wrong file must never load silently).
    """
    if channel_adapt not in ("repeat", "random"):
        raise ValueError(f"channel_adapt: expected 'repeat' or 'random', got {channel_adapt!r}")
    target = model.state_dict()
    report = LoadReport(source=source)
    wanted = {k for k in target if is_transferable(k, include_decoder, model_name)}
    update = {}
    for key, value in state.items():
        if key in wanted:
            shape = tuple(target[key].shape)
            if tuple(value.shape) == shape:
                update[key] = value
                report.matched.append(key)
            elif (channel_adapt == "repeat" and value.dim() >= 3 and value.shape[1] == 1 and shape[1] > 1
                  and tuple(value.shape[:1] + value.shape[2:]) == shape[:1] + shape[2:]):
                update[key] = adapt_input_kernel(value, shape[1])
                report.matched.append(key)
                report.adapted.append(f"{key} {tuple(value.shape)} -> {shape}")
            else:
                report.shape_mismatch.append(f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}")
        else:
            report.unexpected.append(key)
    report.missing = sorted(wanted - set(update) - {m.split(" ")[0] for m in report.shape_mismatch})
    if not update:
        example = {"swinunetr": "swinViT.patch_embed.proj.weight", "unet3d": "down_tr64.ops.0.conv1.weight",
                   "basicunet": "conv_0.conv_0.conv.weight",
                   "unetr": "vit.patch_embedding.patch_embeddings.weight",
                   "unet2d": "encoder.conv1.weight"}.get(model_name, "?")
        raise CheckpointError(f"{source}: matches no backbone tensor of {model_name} "
                              f"(expected keys like {example}; got e.g. {list(state)[:3]})")
    target.update({k: v.to(target[k].dtype) for k, v in update.items()})
    model.load_state_dict(target)
    return report
