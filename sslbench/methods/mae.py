"""Masked volume modelling: MAE on a ViT (UNETR) and SimMIM-style masked tokens on Swin (SwinUNETR).

Two forms, chosen by the fine-tuning network (``model.name``), because a Swin encoder cannot drop tokens:

* ``unetr`` -> **MAE** (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022; code
  github.com/facebookresearch/mae). A crop is cut into 16^3 patches; a random 75 % of them are removed
  (``len_keep = int(N (1 - ratio))`` per volume, the official ``random_masking``); the encoder (UNETR's
  own ``vit``: patch embedding + position embedding, transformer blocks, final norm) sees only the
  visible patches; a light transformer decoder (MONAI ``TransformerBlock``) gets the encoded patches back
  in place among learned mask tokens, adds its own fixed sin-cos position embedding and predicts the
  voxels of every patch. Loss (paper Sec. 3, "Reconstruction target" with per-patch normalisation):

      t_i = (x_i - mean(x_i)) / sqrt(var(x_i) + 1e-6)      per patch i (unbiased var, as the code)
      L   = sum_i m_i mean_v (p_iv - t_iv)^2 / sum_i m_i    m_i = 1 for removed patches only

  The encoder's position embedding is MONAI's fixed 3D sin-cos table (the MAE code's fixed embedding),
  handed over as the initial value of UNETR's learnable one. No class token: UNETR's ViT has none, and
  the paper (Appendix A.1) reports MAE working as well without it. MONAI's ``MaskedAutoEncoderViT`` is
  not used because its encoder prepends a class token that UNETR never sees, keeps the final norm inside
  ``blocks`` (keys that do not map onto ``vit.norm``) and draws its mask on the host CPU; building the
  encoder from UNETR's ``vit`` makes the handover exactly UNETR's ``vit.*`` keys. The decoder width is
  384 (MONAI's default; the paper's 512 is not divisible by 6, which the 3D sin-cos table needs).

  Position embedding and sizes: UNETR's position embedding has one row per 16^3 patch of its ``img_size``,
  so the hand-over fits a fine-tuning ROI equal to the pre-training ``crop`` (96^3 in the paper preset,
  [64, 64, 32] in the tiny one, the ROIs of the real and phantom tasks). At another ROI the load reports
  ``vit.patch_embedding.position_embeddings`` as a shape mismatch and keeps it at its random initial
  value; nothing is interpolated.

* ``swinunetr`` (default) -> **SimMIM-style** (Xie et al., "SimMIM: A Simple Framework for Masked Image
  Modeling", CVPR 2022; code github.com/microsoft/SimMIM). Masks are drawn on a grid of 16^3 voxel
  blocks, ``ceil(ratio * blocks)`` blocks per volume (ratio 0.6; the official mask generator's count);
  inside SwinUNETR's ``swinViT`` the patch embeddings (patch 2, so a block is 8^3 tokens) of masked blocks
  are replaced by one learned mask token before the first Swin stage. The prediction head is SwinUNETR's
  own decoder (encoder1..4, encoder10, decoder5..1, a 1-channel output conv): every encoder tensor that
  fine-tuning loads is trained. Because encoder1 convolves the raw input at full resolution and feeds the
  decoder through a skip connection, the masked voxels are also zeroed in the input (the Swin branch sees
  the mask token there anyway, its 2^3 patches lying inside the masked blocks). Loss (SimMIM Eq. 1):

      L = sum_v M_v |y_v - x_v| / (sum_v M_v + 1e-5) / C     (L1 on masked voxels only)

  The decoder is a pre-training head here (``head_state_dict``); fine-tuning loads ``swinViT.*`` and
  ``encoder*`` (``transfers_decoder = False``, the same for both forms).

Each step cuts one random crop of ``crop`` voxels out of every volume (integer offsets, one gather; the
corpus volumes are resized to ``resize`` by the protocol) and flips it along each axis with probability
``flip_prob`` (MAE's only augmentations are a random crop and a flip). Masks, crops and losses are drawn
and computed as batched tensors on the volumes' device; no host sync inside the step. Logs are detached
0-dim tensors.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import RecipeError
from ..models.backbones import ENCODER_PREFIXES, build_model, vit_config
from .base import PretrainMethod
from .params import Attention, MethodParams, positive, probability, refuse, rule
from .parts.views import augment_crops

#: model.name -> form of masked modelling.
FORMS = {"unetr": "mae", "swinunetr": "simmim"}
#: SwinUNETR downsamples 5 times; its decoder needs every side divisible by 32.
SWIN_DIVISOR = 32


# --------------------------------------------------------------------------------------------------
# Crops and masks
# --------------------------------------------------------------------------------------------------

def random_crops(volumes: torch.Tensor, size: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """One random crop of ``size`` voxels per volume: volumes [B, C, X, Y, Z] -> [B, C, *size].

    Offsets are integers ~ U{0, ..., S - s} per axis and volume, drawn on the volumes' device; the crop is
    one advanced-indexing gather (exact voxel values, no resampling).
    """
    b, c = volumes.shape[:2]
    dev = volumes.device
    axes = []
    for axis, s in enumerate(size):
        full = volumes.shape[2 + axis]
        if s > full:
            raise ValueError(f"crop size {tuple(size)} exceeds the volume size {tuple(volumes.shape[2:])}")
        offset = torch.randint(0, full - s + 1, (b, 1), generator=generator, device=dev)
        axes.append(offset + torch.arange(s, device=dev))                                   # [B, s]
    ix, iy, iz = axes
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1, 1)
    return volumes[bi, ci, ix[:, None, :, None, None], iy[:, None, None, :, None], iz[:, None, None, None, :]]


def random_token_masks(batch: int, n_tokens: int, n_masked: int, device: torch.device | str | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``n_masked`` of ``n_tokens`` masked per volume, uniformly at random (MAE's ``random_masking``).

    Returns (mask [B, N] bool, True = masked; ids_keep [B, N - n_masked] long, the visible token indices in
    increasing order). One ``argsort`` of uniform noise per batch.
    """
    if not 0 < n_masked < n_tokens:
        raise ValueError(f"n_masked must lie in 1..{n_tokens - 1} of {n_tokens} tokens, got {n_masked}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    noise = torch.rand(batch, n_tokens, generator=generator, device=device)
    ids_keep = noise.argsort(dim=1)[:, : n_tokens - n_masked].sort(dim=1).values
    mask = torch.ones(batch, n_tokens, dtype=torch.bool, device=device).scatter(1, ids_keep, False)
    return mask, ids_keep


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat a mask [B, gx, gy, gz] ``factor`` times along each spatial axis: [B, gx*f, gy*f, gz*f]."""
    for dim in (1, 2, 3):
        mask = mask.repeat_interleave(factor, dim=dim)
    return mask


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, X, Y, Z] -> [B, N, patch^3 * C], tokens in the order of a ViT's conv patch embedding
    (``flatten(2)`` of [B, hidden, gx, gy, gz]: index = ix * gy * gz + iy * gz + iz)."""
    b, c, sx, sy, sz = x.shape
    gx, gy, gz = sx // patch, sy // patch, sz // patch
    x = x.reshape(b, c, gx, patch, gy, patch, gz, patch).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, gx * gy * gz, patch ** 3 * c)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------

def normalized_patch_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's per-patch normalised target: (x - mean) / sqrt(var + eps) over each patch's voxels (last dim).

    The variance is the unbiased one (``Tensor.var``), as in the official ``forward_loss``.
    """
    patches = patches.float()
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE loss: per-patch mean squared error, averaged over the masked patches only.

    pred, target [B, N, V]; mask [B, N] (True / 1 = masked).
    """
    per_patch = (pred.float() - target.float()).square().mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


def masked_l1(pred: torch.Tensor, target: torch.Tensor, voxel_mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """SimMIM loss: L1 over masked voxels, sum |y - x| M / (sum M + eps) / C.

    pred, target [B, C, X, Y, Z]; voxel_mask [B, X, Y, Z] or [B, 1, X, Y, Z] (True / 1 = masked).
    """
    m = voxel_mask.to(torch.float32)
    if m.dim() == pred.dim() - 1:
        m = m.unsqueeze(1)
    err = (pred.float() - target.float()).abs() * m
    return err.sum() / (m.sum() + eps) / pred.shape[1]


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------

def _sincos_table(grid: Sequence[int], dim: int) -> nn.Parameter:
    """MONAI's fixed 3D sin-cos position embedding [1, prod(grid), dim] (requires_grad False)."""
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    with warnings.catch_warnings():   # MONAI calls torch.meshgrid without indexing= (its "ij" default is meant)
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        return build_sincos_position_embedding(list(grid), dim, 3)


class MAEDecoder(nn.Module):
    """MAE's light decoder: embed, put the encoded patches back among mask tokens, add a fixed sin-cos
    position embedding, transformer blocks, norm, a linear prediction of each patch's voxels."""

    def __init__(self, hidden_size: int, grid: Sequence[int], patch_voxels: int, decoder_hidden_size: int,
                 num_layers: int, num_heads: int, mlp_dim: int):
        super().__init__()
        from monai.networks.blocks import TransformerBlock
        from monai.networks.layers import trunc_normal_

        self.decoder_embed = nn.Linear(hidden_size, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02, a=-2.0, b=2.0)
        self.position_embeddings = _sincos_table(grid, decoder_hidden_size)
        self.blocks = nn.ModuleList(TransformerBlock(decoder_hidden_size, mlp_dim, num_heads, qkv_bias=True)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(decoder_hidden_size)
        self.pred = nn.Linear(decoder_hidden_size, patch_voxels)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """latent [B, n_keep, hidden] of the visible tokens ids_keep [B, n_keep] -> prediction [B, N, V]."""
        x = self.decoder_embed(latent)
        b, _, d = x.shape
        n = self.position_embeddings.shape[1]
        full = self.mask_token.to(x.dtype).expand(b, n, d).scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), x)
        x = full + self.position_embeddings.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class MAEViT(nn.Module):
    """UNETR's ``vit`` as MAE's encoder (visible patches only) + ``MAEDecoder``."""

    def __init__(self, model_cfg: Mapping[str, Any], crop: Sequence[int], decoder: "MAEDecoderParams"):
        super().__init__()
        v = vit_config(model_cfg)
        self.patch = v["patch_size"]
        self.grid = tuple(s // self.patch for s in crop)
        unetr = build_model(model_cfg, 1, 1, img_size=tuple(crop))
        self.vit = unetr.vit                              # UNETR's decoder convs are not pre-trained
        pos = self.vit.patch_embedding.position_embeddings
        with torch.no_grad():   # MAE's fixed sin-cos table (MONAI's 3D form), in place of the random init
            pos.copy_(_sincos_table(self.grid, v["hidden_size"]))
        pos.requires_grad_(False)
        self.decoder = MAEDecoder(v["hidden_size"], self.grid, self.patch ** 3, decoder.hidden_size,
                                  decoder.num_layers, decoder.num_heads, decoder.mlp_dim)

    def encode(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Embed every patch (+ position), keep the visible ones, run the ViT blocks and its final norm."""
        tokens = self.vit.patch_embedding(x)                                               # [B, N, H]
        h = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        for blk in self.vit.blocks:
            h = blk(h)
        return self.vit.norm(h)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x, ids_keep), ids_keep)


class SimMIMSwin(nn.Module):
    """A SwinUNETR whose patch embeddings at masked tokens are replaced by a learned mask token.

    Holds the SwinUNETR itself as ``net`` (its state dict keys are SwinUNETR's under ``net.``).
    """

    def __init__(self, model_cfg: Mapping[str, Any]):
        super().__init__()
        from monai.networks.layers import trunc_normal_

        self.net = build_model(model_cfg, 1, 1)
        embed_dim = int(self.net.swinViT.patch_embed.proj.out_channels)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, 1, 1, 1))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02, a=-2.0, b=2.0)

    def embed(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Swin patch embeddings [B, C, x/2, y/2, z/2] with the mask token at masked tokens (SimMIM).

        token_mask [B, x/2, y/2, z/2] bool (True = masked).
        """
        h = self.net.swinViT.patch_embed(x)
        return torch.where(token_mask.unsqueeze(1), self.mask_token.to(h.dtype), h)

    def swin_stages(self, x: torch.Tensor, token_mask: torch.Tensor) -> list[torch.Tensor]:
        """MONAI SwinTransformer.forward (normalize=True) on ``embed``'s masked patch embeddings."""
        swin = self.net.swinViT
        h = swin.pos_drop(self.embed(x, token_mask))
        outs = [swin.proj_out(h, True)]
        for i in range(1, 5):
            if swin.use_v2:
                h = getattr(swin, f"layers{i}c")[0](h.contiguous())
            h = getattr(swin, f"layers{i}")[0](h.contiguous())
            outs.append(swin.proj_out(h, True))
        return outs

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """SwinUNETR.forward on the masked input x [B, 1, X, Y, Z] -> reconstruction [B, 1, X, Y, Z]."""
        n = self.net
        hs = self.swin_stages(x, token_mask)
        enc0, enc1, enc2, enc3 = n.encoder1(x), n.encoder2(hs[0]), n.encoder3(hs[1]), n.encoder4(hs[2])
        dec3 = n.decoder5(n.encoder10(hs[4]), hs[3])
        out = n.decoder1(n.decoder2(n.decoder3(n.decoder4(dec3, enc3), enc2), enc1), enc0)
        return n.out(out)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------

_RATIO = rule(lambda v: 0.0 < v < 1.0, "a value in (0, 1)")
_POSITIVE = positive("a positive integer")


@dataclass(frozen=True)
class MAEDecoderParams(MethodParams):
    """MAE's light decoder (``params.decoder``; official models_mae.py decoder_embed_dim 512, depth 8, heads 16)."""

    hidden_size: int = field(default=384, metadata=rule(lambda v: v > 0 and v % 6 == 0,
                                                        "a positive multiple of 6 (3D sin-cos position embedding)"))
    """decoder width (512 is not divisible by 6, which the 3D sin-cos table needs: 384)."""
    num_layers: int = field(default=8, metadata=_POSITIVE)
    """transformer blocks (official decoder_depth 8)."""
    num_heads: int = field(default=12, metadata=_POSITIVE)
    """attention heads (official 16 at width 512; 12 divides 384)."""
    mlp_dim: int = field(default=1536, metadata=_POSITIVE)
    """MLP width (official mlp_ratio 4)."""

    def check(self) -> None:
        if self.hidden_size % self.num_heads:
            refuse("num_heads", self.num_heads, f"a divisor of decoder.hidden_size {self.hidden_size}")


@dataclass(frozen=True)
class MAEParams(MethodParams):
    """MAE's ``method.params`` (methods/mae.yaml holds the defaults; equal to these, tests check). Official:
    facebookresearch/mae main_pretrain.py, models_mae.py; the SimMIM form microsoft/SimMIM data/data_simmim.py."""

    resize: tuple[int, int, int] = field(default=(192, 192, 128), metadata=positive("a list of 3 positive integers"))
    """every corpus volume resized to this; one random crop of ``crop`` per volume a step."""
    crop: tuple[int, int, int] = field(default=(96, 96, 96), metadata=positive("a list of 3 positive integers"))
    """= the fine-tuning ROI (UNETR's position embedding is per patch; official input_size 224)."""
    flip_prob: float = field(default=0.5, metadata=probability())
    """flip along each axis (the official augmentation: RandomResizedCrop + RandomHorizontalFlip)."""
    attention: Attention = "fused"
    """the Swin window-attention kernel the runtime applies (same function; not hashed)."""
    mae_mask_ratio: float = field(default=0.75, metadata=_RATIO)
    """unetr: share of 16^3 patches removed (official --mask_ratio 0.75, random_masking)."""
    norm_pix_loss: bool = True
    """unetr: per-patch normalised targets (official --norm_pix_loss, the README's pre-training recipe)."""
    decoder: MAEDecoderParams = MAEDecoderParams()
    """unetr: the light decoder (hidden_size, num_layers, num_heads, mlp_dim)."""
    simmim_mask_ratio: float = field(default=0.6, metadata=_RATIO)
    """swinunetr: share of mask blocks masked (official SimMIM MASK_RATIO 0.6)."""
    simmim_mask_patch: int = field(default=16, metadata=rule(lambda v: v > 0 and v % 2 == 0,
                                                             "a positive multiple of SwinUNETR's patch size 2"))
    """swinunetr: mask blocks of this many voxels per side (official MASK_PATCH_SIZE 32 px at 192)."""

    def check(self) -> None:
        if any(c > r for c, r in zip(self.crop, self.resize)):
            refuse("crop", list(self.crop), f"at most method.params.resize {list(self.resize)} (it exceeds it)")


class MAE(PretrainMethod):
    """Masked volume modelling on volumes [B, 1, *resize] in [0, 1]: MAE (unetr) or SimMIM-style (swinunetr).

    params: :class:`MAEParams` (typed, checked; a line per field on the official code it follows).
    """

    name = "mae"
    Params = MAEParams
    transfers_decoder = False

    def __init__(self, params: "MAEParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        model_name = str(self.model_cfg.get("name", "swinunetr"))
        if model_name not in FORMS:
            raise RecipeError(f"model.name: {model_name!r} for method mae; expected one of {', '.join(FORMS)} "
                              f"(MAE on UNETR's ViT, SimMIM-style masked tokens on SwinUNETR)")
        self.form = FORMS[model_name]
        self.crop, self.flip_prob = p.crop, p.flip_prob

        if self.form == "mae":
            self.patch = vit_config(self.model_cfg)["patch_size"]
            ratio_key, divisor, ratio = "mae_mask_ratio", self.patch, p.mae_mask_ratio
        else:
            self.patch = p.simmim_mask_patch
            ratio_key, divisor = "simmim_mask_ratio", math.lcm(SWIN_DIVISOR, self.patch)
            ratio = p.simmim_mask_ratio
        if any(s % divisor for s in self.crop):   # against the backbone's patches
            raise RecipeError(f"method.params.crop: {list(self.crop)} for method mae ({self.form} on {model_name}); "
                              f"expected every side divisible by {divisor}")
        self.grid = tuple(s // self.patch for s in self.crop)
        n_tokens = math.prod(self.grid)
        # MAE keeps int(N (1 - ratio)) patches; SimMIM masks ceil(ratio N) blocks
        self.n_masked = (n_tokens - int(n_tokens * (1.0 - ratio)) if self.form == "mae"
                         else math.ceil(ratio * n_tokens))
        if not 0 < self.n_masked < n_tokens:
            raise RecipeError(f"method.params.{ratio_key}: {ratio} masks {self.n_masked} of {n_tokens} patches of "
                              f"crop {list(self.crop)}; expected at least one masked and one visible")

        if self.form == "mae":
            self.norm_pix_loss = p.norm_pix_loss
            self.model = MAEViT(self.model_cfg, self.crop, p.decoder)
        else:
            self.model = SimMIMSwin(self.model_cfg)

    @classmethod
    def input_size(cls, params: "MAEParams | Mapping[str, Any]") -> tuple[int, int, int] | None:
        return cls.typed(params).resize

    def views(self, volumes: torch.Tensor) -> torch.Tensor:
        """One random crop per volume, flipped along each axis with probability ``flip_prob``."""
        crops = random_crops(volumes, self.crop)
        if self.flip_prob > 0:
            crops = augment_crops(crops, p_flip=self.flip_prob, p_rot90=0.0, p_shift=0.0)
        return crops

    def mae_loss(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mask [B, N]) of MAE on crops [B, 1, *crop]."""
        mask, ids_keep = random_token_masks(crops.shape[0], math.prod(self.grid), self.n_masked, crops.device)
        pred = self.model(crops, ids_keep)
        target = patchify(crops, self.patch)
        if self.norm_pix_loss:
            target = normalized_patch_targets(target)
        return masked_patch_mse(pred, target, mask), mask

    def simmim_loss(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, block mask [B, N]) of SimMIM on crops [B, 1, *crop]."""
        b = crops.shape[0]
        mask, _ = random_token_masks(b, math.prod(self.grid), self.n_masked, crops.device)
        blocks = mask.view(b, *self.grid)
        voxel_mask = upsample_mask(blocks, self.patch)
        token_mask = upsample_mask(blocks, self.patch // 2)
        pred = self.model(crops * (~voxel_mask).unsqueeze(1).to(crops.dtype), token_mask)
        return masked_l1(pred, crops, voxel_mask), mask

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        crops = self.views(volumes)
        loss, mask = self.mae_loss(crops) if self.form == "mae" else self.simmim_loss(crops)
        return loss, {"loss": loss.detach(), "mask_ratio": mask.float().mean().detach()}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """unetr: UNETR's ``vit.*``; swinunetr: ``swinViT.*`` + ``encoder1..4, encoder10`` (SwinUNETR's keys)."""
        if self.form == "mae":
            state = {f"vit.{k}": v for k, v in self.model.vit.state_dict().items()}
        else:
            state = {k: v for k, v in self.model.net.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """unetr: the MAE decoder; swinunetr: the mask token and SwinUNETR's decoder5..1 + output conv."""
        if self.form == "mae":
            state = {f"decoder.{k}": v for k, v in self.model.decoder.state_dict().items()}
        else:
            state = {f"net.{k}": v for k, v in self.model.net.state_dict().items()
                     if not k.startswith(ENCODER_PREFIXES)}
            state["mask_token"] = self.model.mask_token
        return {k: v.detach().cpu().clone() for k, v in state.items()}
