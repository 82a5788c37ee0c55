"""Supervised pre-training: the positive control of the transfer path (no paper; sslbench's control).

A backbone that has learnt to segment abdominal organs must help a fine-tuning task with few labelled cases
more than a random one, whatever the self-supervised methods do. ``supervised`` pre-trains the fine-tuning
network by segmentation on a *labelled* corpus (a segmentation task recipe, e.g. ``--corpus phantom-btcv``)
and hands its encoder and decoder over like every method, through the same ``finetune --init`` path. If it
does not beat scratch, the transfer path is broken, not the methods. Two recipes:

* ``supervised``: pre-trains on another labelled task (``method.pretrain.corpus``, default BTCV / its phantom
  twin): the transfer control;
* ``supervised-task``: pre-trains on the training split of the fine-tuning task itself
  (``method.pretrain.corpus: "@task"``): the trivial control (an upper bound of what initialisation can give
  a task with few labelled cases: all its training labels have been seen).

Per step, for a batch of B labelled volumes [B, 2, *resize] from the protocol (channel 0: the image in
[0, 1]; channel 1: the label ids, resized with nearest-neighbour interpolation) — the layout the protocol
builds for a method with ``needs_labels`` — one random crop of ``crop`` voxels per volume (integer corner,
exact voxels), random flips (each axis with probability ``flip_prob``), and

    L = DiceCE(f(x), y) = Dice(softmax(f(x)), onehot(y)) + CE(f(x), y)

(MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``, the loss of the fine-tuning protocol's segmentation
tasks), f the full network with ``num_classes`` outputs. ``num_classes`` (background included) is the number of
classes of the labelled corpus; the protocol sets it from that recipe's ``classes``, the method never reads a
task. The output layer is never handed over (its classes are the corpus's, not the task's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import RecipeError
from ..models.backbones import SIZE_DIVISOR, build_model, transferable_state
from .base import PretrainMethod
from .params import Attention, MethodParams, positive, probability, rule
from .parts.views import random_crop_starts


@dataclass(frozen=True)
class SupervisedParams(MethodParams):
    """The supervised controls' ``method.params`` (methods/supervised.yaml and supervised-task.yaml hold the defaults;
    equal to these, tests check). sslbench's own control: no paper, no official code; the fine-tuning protocol's."""

    resize: tuple[int, int, int] = field(default=(128, 128, 96), metadata=positive("a list of 3 positive integers"))
    """corpus volumes (and their label maps) resized to this before batching."""
    crop: tuple[int, int, int] = field(default=(96, 96, 96), metadata=positive("a list of 3 positive integers"))
    """the training crop (= the fine-tuning roi)."""
    flip_prob: float = field(default=0.5, metadata=probability())
    """flip image and label along each axis (the fine-tuning protocol's RandFlipd)."""
    attention: Attention = "fused"
    """the Swin window-attention kernel the runtime applies (same function; not hashed)."""
    num_classes: int | None = field(default=None, metadata={
        **rule(lambda v: v >= 2, "the labelled corpus's class count (>= 2, background included), set by the "
                                 "protocol"), "set_by": "protocol"})
    """never in a recipe: the protocol sets it from the labelled corpus's classes (the method knows no task)."""


def random_flips(x: torch.Tensor, y: torch.Tensor, prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip image and label crops together: each spatial axis of each sample with probability ``prob``."""
    flips = torch.rand(x.shape[0], 3, device=x.device) < prob
    xs, ys = [], []
    for i in range(x.shape[0]):
        dims = [2 + a for a in range(3) if bool(flips[i, a])]
        xs.append(x[i:i + 1].flip(dims) if dims else x[i:i + 1])
        ys.append(y[i:i + 1].flip(dims) if dims else y[i:i + 1])
    return torch.cat(xs), torch.cat(ys)


def labelled_crops(volumes: torch.Tensor, crop: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One random crop per labelled volume [B, 2, X, Y, Z]: (images [B, 1, *crop], labels [B, 1, *crop] int64)."""
    b = volumes.shape[0]
    starts = random_crop_starts(b, volumes.shape[2:], crop, device=volumes.device).tolist()
    boxes = [volumes[i:i + 1, :, s[0]:s[0] + crop[0], s[1]:s[1] + crop[1], s[2]:s[2] + crop[2]]
             for i, s in enumerate(starts)]
    both = torch.cat(boxes)
    return both[:, :1].float(), both[:, 1:2].round().long()


class Supervised(PretrainMethod):
    """Segmentation pre-training on a labelled corpus (module docstring).

    params: :class:`SupervisedParams` (resize, crop, flip_prob, attention; num_classes set by the protocol from the
    labelled corpus).
    """

    name = "supervised"
    Params = SupervisedParams
    transfers_decoder = True
    #: the protocol loads the corpus's label maps and passes [B, 2, ...] (image, label ids)
    needs_labels = True

    def __init__(self, params: "SupervisedParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.resize, self.crop, self.flip_prob = p.resize, p.crop, p.flip_prob
        self.model_name = str(self.model_cfg.get("name", "swinunetr"))
        if self.model_name not in SIZE_DIVISOR or self.model_name == "unetr":
            raise RecipeError(f"model.name: {self.model_name!r} for method {self.name}; expected one of "
                              f"swinunetr, unet3d, basicunet")
        step = SIZE_DIVISOR[self.model_name]   # the crop against the backbone
        if any(c % step or c > r for c, r in zip(self.crop, self.resize)):
            raise RecipeError(f"method.params.crop: {list(self.crop)} for method {self.name} on {self.model_name}; "
                              f"expected multiples of {step}, at most method.params.resize {list(self.resize)}")
        classes = p.num_classes
        if classes is None:
            raise RecipeError(f"method.params.num_classes: None for method {self.name}; expected the labelled "
                              f"corpus's class count (>= 2, background included), set by the protocol")
        self.num_classes = classes
        self.net = build_model(self.model_cfg, in_channels=1, out_channels=classes)
        from monai.losses import DiceCELoss

        self.loss_fn: nn.Module = DiceCELoss(to_onehot_y=True, softmax=True)

    @classmethod
    def input_size(cls, params: "SupervisedParams | Mapping[str, Any]") -> tuple[int, int, int] | None:
        return cls.typed(params).resize

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if volumes.shape[1] != 2:
            raise ValueError(f"supervised: expected labelled volumes [B, 2, X, Y, Z] (image, label), got "
                             f"{list(volumes.shape)}")
        x, y = labelled_crops(volumes, self.crop)
        if int(y.max()) >= self.num_classes or int(y.min()) < 0:
            raise ValueError(f"supervised: label ids {int(y.min())}..{int(y.max())} outside 0..{self.num_classes - 1}")
        x, y = random_flips(x, y, self.flip_prob)
        logits = self.net(x)
        with torch.autocast(logits.device.type, enabled=False):
            loss = self.loss_fn(logits.float(), y)
        fg = (y > 0).float().mean()
        return loss, {"dicece": loss.detach(), "foreground": fg}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder and decoder in the fine-tuning layout (the corpus-specific output layer is not handed over)."""
        return transferable_state(self.net, self.model_name)
