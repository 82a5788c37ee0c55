"""Compiling a pre-training method (``run.compile``) and checking the compiled encoders against eager.

A method either names the submodules to compile one by one (``PretrainMethod.compile_parts``: VoCo's student and
teacher encoders and heads, so that crops and losses stay eager and an encoder can be compared with its eager
self without a head's batch norm between them to amplify rounding) or has its whole ``forward`` compiled. Each
part's compiled forward becomes the part's own ``forward`` (an instance attribute, not a submodule: the state
dict is unchanged); ``eager_forward`` still reaches the eager one. Pooled Swin encoders among the parts go
channels-last first (``channels_last``). Every compile goes through ``inductor.compile`` (static shapes,
sslbench's Inductor settings).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import inductor
from .fast_swin import full_precision, keep_sdpa_out_of_compile


def max_relative_difference(compiled: torch.Tensor, eager: torch.Tensor) -> float:
    """max |compiled - eager| / max |eager| (NaN where ``compiled`` is not finite): how far a compiled
    computation is from the eager one, relative to the eager output's scale."""
    compiled, eager = compiled.detach().float(), eager.detach().float()
    if not bool(torch.isfinite(compiled).all()):
        return float("nan")
    return float((compiled - eager).abs().max() / eager.abs().max().clamp_min(1e-12))


def _parts(method: nn.Module) -> dict[str, nn.Module]:
    """The method's ``compile_parts`` that exist (a paper-variant VoCo has no teacher): name -> module."""
    parts = {name: getattr(method, name, None) for name in getattr(method, "compile_parts", ())}
    return {name: m for name, m in parts.items() if m is not None}


def channels_last(method: nn.Module) -> int:
    """Convolution weights and the maps between stages channels-last (NDHWC) in every pooled Swin encoder with all
    stages among the method's ``compile_parts``; returns how many. The Swin stages produce their maps
    channels-last anyway and cuDNN's bf16 3D convolutions run on NDHWC, so in the NCDHW layout every convolution
    converted its input, weight and output: 6.9 of 142.7 ms of the compiled VoCo teacher-student step (H100,
    2026-11-27; 149.8 -> 141.9 ms a step with this). Done for compiled parts only: the eager step measured no
    faster with it (8.16 volumes/s against 8.25 without, same peak memory, H100), so eager runs keep MONAI's
    layout. Only for encoders with all stages (the teacher-student backbone, where it was measured): the paper
    variant's swinViT-only backbone has few convolutions, and its eager step ran slower channels-last (16.77
    against 18.52 volumes/s, two H100 machines); its compiled step was not measured either way, so it keeps
    NCDHW. Same function; the state dict's values are unchanged. Call it before the optimizer holds state, or
    align that state (``protocol.align_optimizer_state``)."""
    return sum(use_channels_last(part) for part in _parts(method).values())


def use_channels_last(module: nn.Module) -> int:
    """Every pooled Swin encoder with all stages inside ``module`` channels-last (``channels_last``); how many."""
    count = 0
    for m in module.modules():
        if callable(getattr(m, "pooled_stem", None)) and m.pooled_stem() is not None:
            m.to(memory_format=torch.channels_last_3d)
            m.memory_format = torch.channels_last_3d
            count += 1
    return count


def eager_forward(module: nn.Module, *args: Any) -> Any:
    """The module's own forward, past a compiled one that ``compile_method`` put in its place."""
    return type(module).forward(module, *args)


def compile_method(method: nn.Module, **kwargs: Any) -> None:
    """torch.compile a pre-training method: each of its ``compile_parts`` on its own (after ``channels_last``, with
    the Swin attention's SDPA branch kept out of the graph: the fused kernels are registered operators and compile
    either way), else its whole ``forward``. ``kwargs`` go to ``inductor.compile`` (static shapes by default)."""
    parts = _parts(method)
    if not parts:
        method.forward = inductor.compile(method.forward, **kwargs)
        return
    channels_last(method)
    keep_sdpa_out_of_compile(method)
    # static shapes: the stages call the same block code with four shapes, each its own entry in Dynamo's cache,
    # where automatic dynamic shapes would recompile symbolically
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for part in parts.values():
        part.forward = inductor.compile(part.forward, **kwargs)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``compile_method`` replaced the module's forward by a compiled one."""
    return "forward" in vars(module)


def compile_agreement(method: nn.Module, volumes: torch.Tensor) -> dict[str, float]:
    """After ``compile_method``: how far the compiled encoders' features (``method.feature_encoders``: report key ->
    attribute, e.g. VoCo's student and teacher) are from the eager ones on one batch of the method's encoder
    inputs (``method.encoder_inputs(volumes)``), under the caller's autocast and random state; an encoder without
    trainable parameters (a teacher) runs without autograd, as in training. Keys: max |compiled - eager| / max
    |eager| (NaN where the compiled features are not finite). Under autocast also, against the same eager encoder
    computed in full fp32 (``fast_swin.full_precision``): ``<key>_vs_fp32`` for the compiled features and
    ``<key>_eager_vs_fp32`` for the eager ones, i.e. the rounding that low precision alone costs
    (``protocol.compiled_feature_problems`` judges them). {} when no encoder is compiled."""
    encoders = {key: getattr(method, name, None) for key, name in dict(getattr(method, "feature_encoders", {})).items()}
    encoders = {key: net for key, net in encoders.items() if net is not None and is_compiled(net)}
    if not encoders:
        return {}
    views = method.encoder_inputs(volumes)
    low_precision = torch.is_autocast_enabled(views.device.type)
    out: dict[str, float] = {}
    for key, net in encoders.items():
        with torch.set_grad_enabled(any(p.requires_grad for p in net.parameters())):
            eager = eager_forward(net, views).detach()      # no graphs kept while the fp32 reference runs
            compiled = net(views).detach()
        out[key] = max_relative_difference(compiled, eager)
        if low_precision:
            with torch.no_grad(), full_precision(net):
                reference = eager_forward(net, views.float())
            out[f"{key}_vs_fp32"] = max_relative_difference(compiled, reference)
            out[f"{key}_eager_vs_fp32"] = max_relative_difference(eager, reference)
    return out
