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

from .errors import CheckpointError

#: Key prefixes of SwinUNETR's encoder: the part that self-supervised pre-training transfers.
ENCODER_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
#: Key prefixes of SwinUNETR's decoder (transferred by methods that train one: MG, TransVW, PCRL).
DECODER_PREFIXES = ("decoder5.", "decoder4.", "decoder3.", "decoder2.", "decoder1.")
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


def is_transferable(key: str, include_decoder: bool = False) -> bool:
    prefixes = ENCODER_PREFIXES + (DECODER_PREFIXES if include_decoder else ())
    return key.startswith(prefixes)


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

    def summary(self) -> str:
        return (f"{self.source}: {len(self.matched)} backbone tensors matched, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.shape_mismatch)} with another shape (kept random)")

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "matched": len(self.matched), "missing": len(self.missing),
                "unexpected": len(self.unexpected), "shape_mismatch": self.shape_mismatch}


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


def load_backbone(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                  include_decoder: bool = False) -> LoadReport:
    """Copy the checkpoint tensors that match the model's transferable keys; report the rest.

    Raises CheckpointError when no backbone tensor matches (a wrong file must never load silently).
    """
    target = model.state_dict()
    report = LoadReport(source=source)
    wanted = {k for k in target if is_transferable(k, include_decoder)}
    update = {}
    for key, value in state.items():
        if key in wanted:
            if tuple(value.shape) == tuple(target[key].shape):
                update[key] = value
                report.matched.append(key)
            else:
                report.shape_mismatch.append(f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}")
        else:
            report.unexpected.append(key)
    report.missing = sorted(wanted - set(update) - {m.split(" ")[0] for m in report.shape_mismatch})
    if not update:
        raise CheckpointError(f"{source}: matches no backbone tensor of SwinUNETR "
                              f"(expected keys like swinViT.patch_embed.proj.weight; got e.g. {list(state)[:3]})")
    target.update({k: v.to(target[k].dtype) for k, v in update.items()})
    model.load_state_dict(target)
    return report
