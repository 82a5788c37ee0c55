"""C2L: Comparing to Learn (Zhou et al., MICCAI 2020), 2D only, on the ResNet-18 encoder of sslbench/models/unet2d.py.

Read from the official code (funnyzhou/C2L_MICCAI2020, ``train_C2L_res18.py`` ``train_moco``, ``NCE/NCEAverage.py``
``MemoryC2L``, ``models/resnet_mixup.py``): a query encoder f_q (ResNet-18 -> average pool -> fc 512 -> 128) and a
momentum key encoder f_k (``moment_update``: theta_k <- m theta_k + (1 - m) theta_q, m = 0.999, after every step;
its BatchNorm layers in train mode), a fixed-size queue of K = 16384 L2-normalised keys, temperature t = 0.07.
For two views x1, x2 of each image, with q = f_q(x1), k = f_k(x2) and a batch mixup of both views with one
lambda ~ Beta(1, 1), lambda <- max(lambda, 1 - lambda), and one permutation pi:

    mx1 = lambda x1 + (1 - lambda) x1[pi],    mx2 = lambda x2 + (1 - lambda) x2[pi]
    L = ( NCE(q, k) + NCE(f_q(mx1), f_k(mx2)) + NCE(f_q(mx1), lambda k + (1 - lambda) k[pi]) ) / 3

where NCE(a, b) is the queue's InfoNCE, -log softmax([a.b, a.queue_1, ..., a.queue_K] / t)[0] with a and b
L2-normalised (:func:`queue_logits`, :func:`info_nce`), and every one of the three comparisons then enqueues its
keys (the official ``MemoryC2L.forward`` updates the queue inside each call, so the second and third see the
keys the first pushed). Views: RandomResizedCrop(224, scale (0.2, 1)), RandomRotation(10), ColorJitter(0.4, 0.4,
0.4, 0.4), RandomHorizontalFlip, Cutout(3 holes of 32 px at 224) (sslbench/methods/parts/aug2d.py).

Ledger of deviations (restoring keys where one exists):

* Loss form: ``criterion: softmax`` (the default) is the softmax InfoNCE above (the official script's ``--softmax``,
  ``NCESoftmaxLoss``). ``criterion: nce`` is the script's argparse default without that flag: CMC's NCE criterion
  (``NCECriterion(n_data)``) on ``MemoryC2L``'s non-softmax output, the scores exp(q.k / t) / Z, with Z fixed on the
  first comparison of the first step to mean(exp(logits / t)) * n_data (n_data = the pre-training images), truncated
  to an integer as the official's int64 ``params`` buffer stores it (at least 1 here), and kept (a checkpointed
  buffer), and the loss (:func:`nce_loss`) with the uniform noise prior P_n = 1 / n_data over the
  K queued negatives:

      L = -(1/B) sum_i [ log P_i0 / (P_i0 + K P_n + eps) + sum_j log K P_n / (P_ij + K P_n + eps) ],  eps = 1e-7.

  Why the softmax stays the default: the official default cannot run as published. The C2L copy of
  ``NCE/NCECriterion.py`` uses ``eps`` without defining it (CMC's file, HobbitLong/CMC ``NCE/NCECriterion.py``,
  defines ``eps = 1e-7``; C2L's ``from focalloss import *`` brings no ``eps``), so without ``--softmax`` the first
  loss raises NameError: the runs behind the paper used ``--softmax`` (or a patched file). The README's command
  names neither ``--softmax`` nor ``--c2l`` (without which the script trains InsDis, not C2L), so it does not
  settle the flags either. ``criterion: nce`` builds CMC's working form (its eps; under torchrun every rank fixes
  its own Z on its first batch); ``softmax`` is elided from the protocol hash, so runs recorded before the key
  keep their hash.
* Optimiser: the shared AdamW warmup-cosine; official SGD lr 0.03, momentum 0.9, weight decay 1e-4, steps at
  epochs 60, 80, 100 (x 0.1) of 120, batch 128: ``--set method.pretrain.optimizer=sgd`` with
  ``method.pretrain.lr=0.03``, ``schedule=step``, ``step_every`` / ``step_gamma=0.1`` (evenly spaced steps only).
* Inputs: grey [0, 1], 1 channel; official: 3 replicated channels with ImageNet mean / std normalisation, and
  Cutout fills 0 after that normalisation, i.e. the mean colour: here the holes are filled with ``cutout_fill``
  (0.449, the mean of ImageNet's channel means). No key for the normalisation.
* ShuffleBN: the official query / key batches are shuffled for the key encoder's BatchNorm across GPUs; on one
  process the permutation does not change batch statistics, so it is left out (under torchrun each rank's
  BatchNorm sees its own batch, as without shuffling).
* Encoder: the U-Net's timm ResNet-18 (PCRL's Table 4 protocol) with an adaptive average pool, instead of the
  official ``AvgPool2d(7)`` (the same at 224 x 224).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..models.unet2d import build_encoder
from .base import PretrainMethod
from .params import MethodParams, positive, probability, rule
from .parts import aug2d
from .parts.ema import momentum_update


def queue_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """``[B, 1 + K]`` logits: the positive q.k, then q against every queued key, over temperature t.

    q, k: ``[B, D]`` (already L2-normalised), queue: ``[K, D]``. Column 0 holds the positives (MemoryC2L's out).
    """
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.t()
    return torch.cat([pos, neg], dim=1) / t


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy towards column 0 (NCESoftmaxLoss): -mean log softmax(logits)[:, 0]."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


#: CMC's ``eps`` of ``NCECriterion`` (C2L's copy of the file uses it undefined)
NCE_EPS = 1e-7


def nce_normaliser(logits: torch.Tensor, n_data: int) -> int:
    """MemoryC2L's constant Z, set once from the first output: mean(exp(logits)) * n_data (logits already over t),
    truncated to an integer as the official int64 ``params`` buffer holds it (at least 1: never a division by 0)."""
    return max(int(float(torch.exp(logits.detach().double()).mean()) * float(n_data)), 1)


def nce_loss(logits: torch.Tensor, z: torch.Tensor | float, n_data: int, eps: float = NCE_EPS) -> torch.Tensor:
    """CMC's NCE criterion on scores P = exp(logits) / Z, ``[B, 1 + K]`` with the positive in column 0.

    With the noise prior P_n = 1 / n_data and m = K: -(1/B) (sum_i log P_i0 / (P_i0 + m P_n + eps)
    + sum_ij log m P_n / (P_ij + m P_n + eps)).
    """
    p = torch.exp(logits.float()) / torch.as_tensor(z, dtype=torch.float32, device=logits.device)
    noise = (p.shape[1] - 1) / float(n_data)
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (p[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


def mixup(x: torch.Tensor, lam: float, index: torch.Tensor) -> torch.Tensor:
    """lam x + (1 - lam) x[index] (``mixup_data``)."""
    return lam * x + (1 - lam) * x[index]


def draw_lambda(alpha: float) -> float:
    """lambda ~ Beta(alpha, alpha) from the global torch generator, folded to max(lambda, 1 - lambda) >= 0.5."""
    lam = float(torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample())
    return max(lam, 1 - lam)


def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` [B, D] into the ring ``queue`` [K, D] at ``ptr`` (wrapping), advance ``ptr`` (in place)."""
    n, size = keys.shape[0], queue.shape[0]
    ids = (torch.arange(n, device=queue.device) + int(ptr)) % size
    queue.index_copy_(0, ids, keys.to(queue.dtype))
    ptr.fill_((int(ptr) + n) % size)


@dataclass(frozen=True)
class C2LParams(MethodParams):
    """C2L's ``method.params`` (methods/c2l.yaml holds the defaults; equal to these, tests check). Official:
    funnyzhou/C2L_MICCAI2020 train_C2L_res18.py (parse_option, train_moco), NCE/NCEAverage.py MemoryC2L."""

    dim: int = field(default=128, metadata=positive("a positive integer"))
    """the embedding: fc 512 -> 128 (official MemoryMoCo(128, ...))."""
    queue: int = field(default=16384, metadata=positive("a positive integer"))
    """K keys in the queue (official --nce_k 16384)."""
    temperature: float = field(default=0.07, metadata=positive("a positive number"))
    """t of the contrast (official --nce_t 0.07)."""
    momentum: float = field(default=0.999, metadata=rule(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"))
    """key encoder EMA, theta_k <- m theta_k + (1 - m) theta_q (official --alpha 0.999, moment_update)."""
    mixup_alpha: float = field(default=1.0, metadata=positive("a positive number"))
    """lambda ~ Beta(alpha, alpha), then max(lambda, 1 - lambda) (official mixup_data alpha 1.0)."""
    criterion: Literal["softmax", "nce"] = "softmax"
    """softmax: InfoNCE (the official --softmax, NCESoftmaxLoss) | nce: NCECriterion(n_data) (module ledger)."""
    crop_scale: tuple[float, float] = field(default=(0.2, 1.0), metadata=rule(
        lambda v: 0 < v[0] <= v[1] <= 1, "[low, high] with 0 < low <= high <= 1 (crop area / image area)"))
    """RandomResizedCrop(224, scale=(--crop 0.2, 1.))."""
    rotate_degrees: float = 10.0
    """RandomRotation(10)."""
    p_flip: float = field(default=0.5, metadata=probability())
    """RandomHorizontalFlip."""
    jitter: float = field(default=0.4, metadata=rule(lambda v: 0.0 <= v < 1.0, "a strength in [0, 1)"))
    """ColorJitter(0.4, 0.4, 0.4, 0.4): brightness / contrast (saturation and hue do nothing on grey)."""
    cutout_holes: int = 3
    """Cutout(n_holes=3, length=32)."""
    cutout_length: float = 0.142857
    """the holes' side as a fraction of the image side (32 px of 224)."""
    cutout_fill: float = 0.449
    """0 after ImageNet normalisation = the mean colour (the mean of the channel means)."""


class C2L(PretrainMethod):
    name = "c2l"
    Params = C2LParams

    def __init__(self, params: "C2LParams | Mapping[str, Any]", model_cfg: Mapping[str, Any]):
        super().__init__(params, model_cfg)
        p = self.p
        self.dim, self.t, self.m = p.dim, p.temperature, p.momentum
        self.encoder = build_encoder(model_cfg)
        width = self.encoder.feature_info.channels()[-1]
        self.fc = nn.Linear(width, self.dim)
        self.key_encoder = copy.deepcopy(self.encoder)       # moment_update(model, model_ema, 0): a copy
        self.key_fc = copy.deepcopy(self.fc)
        for prm in list(self.key_encoder.parameters()) + list(self.key_fc.parameters()):
            prm.requires_grad_(False)
        k = p.queue
        stdv = 1.0 / math.sqrt(self.dim / 3)
        self.register_buffer("queue", torch.rand(k, self.dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.criterion = p.criterion
        if self.criterion == "nce":   # only then: softmax checkpoints keep their keys
            self.register_buffer("nce_z", torch.tensor(-1, dtype=torch.long))         # MemoryC2L's params[0]
            self.register_buffer("nce_data", torch.zeros((), dtype=torch.long))       # n_data

    @torch.no_grad()
    def prepare(self, corpus: torch.Tensor, seed: int) -> None:
        """The NCE criterion's n_data: the number of pre-training images (the official ``len(train_dataset)``)."""
        if self.criterion == "nce":
            self.nce_data.fill_(int(corpus.shape[0]))

    @staticmethod
    def pixels_per_image(params: Mapping[str, Any], size: tuple[int, int]) -> float:
        """Encoder input pixels per image and step (feasibility): two views and their two mixups."""
        return 4 * size[0] * size[1]

    def embed(self, x: torch.Tensor, key: bool = False) -> torch.Tensor:
        enc, fc = (self.key_encoder, self.key_fc) if key else (self.encoder, self.fc)
        return fc(enc(x)[-1].mean(dim=(2, 3)))

    def views(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        v = aug2d.random_geometry(x, p.crop_scale, p.rotate_degrees, p.p_flip)
        v = aug2d.random_jitter(v, p.jitter)
        return aug2d.cutout(v, p.cutout_holes, p.cutout_length, p.cutout_fill)

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """One comparison against the queue, then its keys enqueued (MemoryC2L.forward)."""
        k = k.detach()
        if self.criterion == "nce":
            loss = self.nce(q, k)
        else:
            loss = info_nce(queue_logits(q.float(), k.float(), self.queue.clone(), self.t))
        with torch.no_grad():
            enqueue(self.queue, self.queue_ptr, k.float())
        return loss

    def nce(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The official default's loss of one comparison: scores exp(logits) / Z, Z set on the first call."""
        n = int(self.nce_data)
        if n < 1:
            raise RuntimeError("C2L with criterion nce before prepare(): n_data (the pre-training images) is unknown")
        with torch.autocast(q.device.type, enabled=False):   # exp of logits up to 1 / t: fp32
            logits = queue_logits(q.float(), k.float(), self.queue.clone(), self.t)
            if int(self.nce_z) < 0:
                self.nce_z.fill_(nce_normaliser(logits, n))
            return nce_loss(logits, float(self.nce_z), n)

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x1, x2 = self.views(volumes), self.views(volumes)
        self.key_encoder.train()                        # set_bn_train: the key encoder's BN uses batch statistics
        q = F.normalize(self.embed(x1), dim=1)
        with torch.no_grad():
            feat_k = self.embed(x2, key=True)
        lam = draw_lambda(self.p.mixup_alpha)
        index = torch.randperm(volumes.shape[0], device=volumes.device)
        mq = F.normalize(self.embed(mixup(x1, lam, index)), dim=1)
        with torch.no_grad():
            mk = F.normalize(self.embed(mixup(x2, lam, index), key=True), dim=1)
        k = F.normalize(feat_k, dim=1)
        mixed_keys = F.normalize(mixup(feat_k, lam, index), dim=1)
        l1 = self.contrast(q, k)
        l2 = self.contrast(mq, mk)
        l3 = self.contrast(mq, mixed_keys)
        loss = (l1 + l2 + l3) / 3
        logs = {"nce": l1.detach(), "nce_mixed": l2.detach(), "nce_mixed_keys": l3.detach(), "lambda": lam}
        if self.criterion == "nce":
            logs["nce_z"] = float(int(self.nce_z))
        return loss, logs

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        momentum_update([*self.key_encoder.parameters(), *self.key_fc.parameters()],
                        [*self.encoder.parameters(), *self.fc.parameters()], self.m)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"fc.{k}": v for k, v in self.fc.state_dict().items()}
