"""Speed: the same functions computed faster. Nothing here changes what a method or a network computes, only
how (kernels, layouts, compiled graphs); parameter names and state-dict keys stay the networks' own.

* ``window_attention``: fused Triton kernels of Swin's window attention; ``fast_swin``: MONAI's WindowAttention
  switched to them (or to SDPA), ``run.attention`` / ``method.params.attention``;
* ``pooled_stem``: SwinUNETR's encoder1 on a 1-channel crop, pooled from the crop's statistics (or as a matmul);
* ``compile``: ``run.compile`` for a pre-training method (its ``compile_parts``, channels-last, the compiled
  features checked against eager); ``inductor``: the Inductor settings every compile uses.

The runtime calls ``apply(method, attention)`` once a pre-training method is built; methods never import this package. A
method only names its parts (``PretrainMethod.teachers``, ``compile_parts``, ``feature_encoders``,
``encoder_inputs``; a pooled encoder's ``pooled_stem``).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .names import ATTENTIONS  # noqa: F401,E402 (the forms of Swin window attention a run may name)


def apply(method: nn.Module, attention: str | None = None) -> dict[str, int]:
    """The speed settings a pre-training method runs with, applied to its modules (same function):

    * ``attention``, the runtime's kernel of the stage (``Runtime.attention``: the recipe's
      ``method.params.attention``); None reads ``method.p.attention`` (default ``fused``; ``fused`` | ``sdpa`` |
      ``monai``): every Swin transformer's window attention is switched by ``fast_swin.apply_attention`` and every
      MONAI ViT self-attention block runs its own SDPA path (MAE's encoder and decoder); with ``monai`` the method's
      ``teachers`` (trained by EMA, never by autograd) use MONAI's own SDPA path, which runs only without autograd;
    * the stems of pooled encoders (``pooled_stem.use_pooled_stems``).

    Returns how many modules each setting switched."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    from .fast_swin import apply_attention, use_monai_sdpa
    from .pooled_stem import use_pooled_stems

    # the method's typed params (``method.p``, sslbench/methods/params.py), read by name: this layer imports no method
    if attention is None:
        attention = str(getattr(getattr(method, "p", None), "attention", "fused"))

    swins = [m for m in method.modules() if isinstance(m, SwinTransformer)]
    if swins and attention not in ATTENTIONS:
        raise ValueError(f"method.params.attention: unknown value {attention!r}; expected one of "
                         f"{', '.join(ATTENTIONS)}")
    counts = {"window_attention": sum(apply_attention(m, attention) for m in swins), "vit_attention": 0,
              "teacher_attention": 0}
    if attention != "monai":
        counts["vit_attention"] = use_monai_sdpa(method, self_attention_only=True)
    else:
        teachers = [getattr(method, name, None) for name in getattr(method, "teachers", ())]
        counts["teacher_attention"] = sum(use_monai_sdpa(t) for t in teachers if t is not None)
    counts["pooled_stems"] = use_pooled_stems(method)
    return counts


def compile_method(method: nn.Module, **kwargs: Any) -> None:
    """``compile.compile_method``: torch.compile a pre-training method (its ``compile_parts``, else its forward)."""
    from .compile import compile_method as compile_parts_or_forward

    compile_parts_or_forward(method, **kwargs)


def compile_agreement(method: nn.Module, volumes: Any) -> dict[str, float]:
    """``compile.compile_agreement``: the compiled encoders' features against eager on one batch."""
    from .compile import compile_agreement as agreement

    return agreement(method, volumes)
