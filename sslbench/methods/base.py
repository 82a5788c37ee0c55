"""The contract between a self-supervised method and the shared protocol.

A method knows nothing of tasks: it receives pre-processed volumes of the corpus and returns a loss; it
hands over backbone weights in SwinUNETR's own key layout (``swinViT.*``, ``encoder*``), which every
task's fine-tuning loads.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .params import NoParams, build


class PretrainMethod(nn.Module):
    """Base class of a pre-training method (one file per method under sslbench/methods/).

    Subclasses set ``name`` and implement ``forward``; they may override the rest.
    """

    name: str = ""
    #: whether the method trains SwinUNETR's decoder too, so fine-tuning should also load decoder*.
    transfers_decoder: bool = False
    #: set True when some trainable parameters get no gradient in a step (DistributedDataParallel must know).
    find_unused_parameters: bool = False
    #: set True for a method that trains on label maps (the supervised controls): the protocol reads a segmentation
    #: task's training split as the corpus, passes volumes [B, 2, ...] (image, label ids) and sets
    #: ``method.params.num_classes`` from that task's classes. The method still never reads a task.
    needs_labels: bool = False

    # What the runtime's speed layer (sslbench/speed, applied when a run asks) may act on; a method names its
    # parts here and never imports that layer. Pooled encoders (``parts.pooled_swin``) expose their own stem.
    #: attributes holding encoder copies trained by EMA only, never by autograd (VoCo's teacher)
    teachers: tuple[str, ...] = ()
    #: attributes of the submodules ``run.compile`` compiles one by one (empty: the whole ``forward``)
    compile_parts: tuple[str, ...] = ()
    #: report key -> attribute of the compiled encoders whose features are checked against eager (``encoder_inputs``)
    feature_encoders: Mapping[str, str] = {}

    #: the method's params: a frozen dataclass (sslbench/methods/params.py) declaring its recipe's ``params``, one
    #: typed field per key with the paper default (the recipe's; a test keeps the two equal)
    Params: type = NoParams

    def __init__(self, params: Mapping[str, Any] | Any, model_cfg: Mapping[str, Any]):
        super().__init__()
        #: the typed params (``self.p.<field>``), built from the recipe's mapping with one-line errors
        self.p = self.typed(params)
        self.model_cfg = dict(model_cfg)

    @classmethod
    def typed(cls, params: Mapping[str, Any] | Any):
        """``params`` (the recipe's mapping, or the dataclass already) as the method's ``Params``."""
        return build(cls.Params, params, cls.name)

    @staticmethod
    def input_size(params: Mapping[str, Any]) -> tuple[int, int, int] | None:
        """Spatial size every corpus volume is resized to before batching (None: random crops)."""
        return None

    def prepare(self, corpus: torch.Tensor, seed: int) -> None:
        """Corpus-level set-up run once before training (and again before a resume loads its state).

        ``corpus`` is every pre-processed corpus volume [N, 1, *input_size] on the training device. It must be
        deterministic given ``seed``; whatever it builds that training depends on (e.g. TransVW's visual-word
        coordinates) belongs in registered buffers so checkpoints carry it. Not called under
        ``method.pretrain.loader: stream``, which never holds the corpus: a method that overrides it refuses the
        streaming loader, unless its set-up needs only one feature vector per volume (``streams_prepare``).
        """

    #: True when :meth:`prepare` is :meth:`discover` of :meth:`volume_features`: the streaming loader then computes
    #: the features volume by volume from the case cache (every rank its shard, gathered in corpus order) and calls
    #: :meth:`discover`, so the corpus is never held
    streams_prepare = False

    def volume_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """One feature vector per volume [B, 1, *input_size] -> [B, D] (methods with ``streams_prepare``)."""
        raise NotImplementedError

    def discover(self, features: torch.Tensor, seed: int) -> None:
        """The corpus-level set-up from every corpus volume's feature [N, D], in corpus order (``streams_prepare``)."""
        raise NotImplementedError

    def encoder_inputs(self, volumes: torch.Tensor) -> torch.Tensor:
        """One step's input of the ``feature_encoders`` (e.g. VoCo's views) made from a batch of volumes."""
        raise NotImplementedError

    def forward(self, volumes: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One training step's loss on a batch of volumes [B, 1, X, Y, Z] scaled to [0, 1] ([B, 2, ...] with the
        label ids for ``needs_labels``; [B, 1, H, W] images in the 2D track): a plain float tensor on the training
        device, never a MONAI MetaTensor (the protocol converts every batch, the corpus of :meth:`prepare` and the
        chunks of :meth:`volume_features` too), so a method converts nothing it is handed."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Hook run after the optimizer step (e.g. an EMA teacher update)."""

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained backbone tensors in SwinUNETR's key layout (what fine-tuning loads)."""
        raise NotImplementedError

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Method-specific heads (projection MLPs, predictors...), saved apart from the backbone."""
        return {}


