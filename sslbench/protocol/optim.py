"""Optimisers and learning-rate schedules of both stages, from the recipes' keys (``task.finetune.*`` and
``method.pretrain.*``: AdamW or the official SGD, parameter groups without weight decay, fixed-lr groups, warmup +
cosine or step schedules)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..errors import RecipeError


def make_optimizer(params, lr: float, weight_decay: float, device: torch.device, amsgrad: bool = False,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA, foreach elsewhere) over ``params``: tensors, or groups whose own ``weight_decay``
    overrides ``weight_decay``. ``amsgrad``: keep the running maximum of the second moment (Reddi et al. 2018);
    ``betas``: the moment decays (torch's default; MAE's official (0.9, 0.95))."""
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad,
                             betas=(float(betas[0]), float(betas[1])), **kw)


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Whether the no-decay rule exempts a parameter: a bias (name ends in ``.bias``) or a 1-D tensor (the
    weights of LayerNorm / BatchNorm / InstanceNorm). The rule of timm 0.3.2's ``add_weight_decay``, which the
    official MAE pre-training calls (facebookresearch/mae ``main_pretrain.py``, no skip list); SimMIM's
    ``get_pretrain_param_groups`` has the same test. Multi-dimensional tokens ([1, 1, D] mask tokens) decay."""
    return param.ndim == 1 or name.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_bias_norm: bool) -> list[dict[str, Any]]:
    """The AdamW parameter groups of ``model``'s trainable parameters (``requires_grad``), in module order.

    ``no_decay_bias_norm`` false: one group with ``weight_decay`` (the earlier behaviour: every tensor
    decays). True: ``{weight_decay: 0}`` for the tensors of :func:`no_decay`, then ``{weight_decay}`` for
    the rest (MAE's order); an empty group is left out.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay_bias_norm:
        return [{"params": [p for _, p in trainable], "weight_decay": float(weight_decay)}]
    groups = [{"params": [p for n, p in trainable if no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in trainable if not no_decay(n, p)], "weight_decay": float(weight_decay)}]
    return [g for g in groups if g["params"]]


def split_fixed_lr(method: torch.nn.Module, groups: list[dict[str, Any]], prefixes: Sequence[str]) -> list[dict[str, Any]]:
    """``groups`` with the parameters under the module-name ``prefixes`` (e.g. ``["predictor"]``) moved into
    groups of their own, marked ``fixed_lr`` (kept at the base lr by :func:`pretrain_schedule`), appended after
    the scheduled groups so that group 0 (the logged lr) stays a scheduled one. SimSiam's ``--fix-pred-lr``."""
    if not prefixes:
        return groups
    named = list(method.named_parameters())
    for f in prefixes:
        if not any(n == f or n.startswith(f + ".") for n, _ in named):
            raise RecipeError(f"method.pretrain.fixed_lr: '{f}' names no parameters of method "
                              f"{getattr(method, 'name', type(method).__name__)}; expected module names such as "
                              f"{', '.join(sorted({n.split('.')[0] for n, _ in named})[:6])}")
    fixed_ids = {id(p) for n, p in named if any(n == f or n.startswith(f + ".") for f in prefixes)}
    scheduled, fixed = [], []
    for g in groups:
        keep = [p for p in g["params"] if id(p) not in fixed_ids]
        move = [p for p in g["params"] if id(p) in fixed_ids]
        if keep:
            scheduled.append({**g, "params": keep})
        if move:
            fixed.append({**g, "params": move, "fixed_lr": True})
    return scheduled + fixed


def pretrain_optimizer(method: torch.nn.Module, pt: Mapping[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """The pre-training optimizer of a method from its recipe's ``pretrain`` section, over :func:`param_groups`
    (``weight_decay``, ``no_decay_bias_norm``) split by ``fixed_lr`` (:func:`split_fixed_lr`).

    ``optimizer: adamw`` (default): AdamW at ``lr`` with ``amsgrad``, ``betas``; ``sgd``: SGD with ``momentum``
    and L2 ``weight_decay`` (torch's coupled form, as the official Models Genesis / TransVW / SimSiam / PCRL code).
    A section without the keys (a run recorded before they existed) gets what every run had then: AdamW, decay on
    every tensor, no AMSGrad."""
    groups = param_groups(method, pt["weight_decay"], bool(pt.get("no_decay_bias_norm", False)))
    groups = split_fixed_lr(method, groups, list(pt.get("fixed_lr") or []))
    if pt.get("optimizer", "adamw") == "sgd":
        return torch.optim.SGD(groups, lr=pt["lr"], momentum=float(pt.get("momentum", 0.9)),
                               weight_decay=pt["weight_decay"], foreach=True)
    return make_optimizer(groups, pt["lr"], pt["weight_decay"], device, amsgrad=bool(pt.get("amsgrad", False)),
                          betas=tuple(pt.get("betas") or (0.9, 0.999)))


def pretrain_schedule(opt: torch.optim.Optimizer, pt: Mapping[str, Any], total: int):
    """The pre-training lr schedule of a recipe's ``pretrain`` section (a LambdaLR, stepped once per step).

    ``schedule: warmup_cosine`` (default): MONAI's ``WarmupCosineSchedule`` (linear warm-up over ``warmup_steps``,
    then a half cosine to 0 at ``total``); ``step``: lr x ``step_gamma`` ** (step // ``step_every``), torch's StepLR
    (Models Genesis / TransVW: gamma 0.5 every 40 epochs), no warm-up. Groups marked ``fixed_lr`` keep the base
    lr throughout. Without ``fixed_lr`` groups the warm-up-cosine form is MONAI's scheduler itself."""
    form = pt.get("schedule", "warmup_cosine")
    fixed = [bool(g.get("fixed_lr")) for g in opt.param_groups]
    if form == "warmup_cosine" and not any(fixed):
        return make_schedule(opt, pt["warmup_steps"], total)
    if form == "step":
        every, gamma = max(int(pt.get("step_every") or 1), 1), float(pt.get("step_gamma", 0.5))

        def scheduled(step: int) -> float:
            return gamma ** (step // every)
    else:
        from monai.optimizers import WarmupCosineSchedule

        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)   # only to borrow MONAI's formula
        scheduled = WarmupCosineSchedule(probe, warmup_steps=min(pt["warmup_steps"], max(total - 1, 0)),
                                         t_total=max(total, 1)).lr_lambda

    def constant(step: int) -> float:
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, [constant if f else scheduled for f in fixed])


def make_schedule(opt, warmup: int, total: int):
    from monai.optimizers import WarmupCosineSchedule

    return WarmupCosineSchedule(opt, warmup_steps=min(warmup, max(total - 1, 0)), t_total=max(total, 1))
