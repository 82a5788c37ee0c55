"""Shared checks every pre-training method must pass (imported by tests/test_<method>.py).

    from methodkit import tiny_method, train_steps, check_handover

A method is exercised exactly as the protocol runs it: built from its recipe's ``tiny`` preset params and
the tiny model section, ``prepare``d on a small corpus, trained with AdamW, its ``after_step`` hook called,
and the weights it hands over loaded into the fine-tuning network with every expected tensor matched.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from sslbench import recipes
from sslbench.backbones import TRANSFER_PREFIXES, build_model, load_backbone
from sslbench.bench import phantom_volumes
from sslbench.methods import get_method_class


def tiny_config(method: str, overrides: Mapping[str, Any] | None = None,
                model_overrides: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """(params, model_cfg) of ``method`` under the tiny preset (what `sslbench run --preset tiny` uses)."""
    cfg = recipes.resolve(method, "phantom-btcv", preset="tiny")
    params = dict(cfg["method"].get("params") or {})
    params.update(overrides or {})
    model_cfg = dict(cfg["model"])
    model_cfg.update(model_overrides or {})
    return params, model_cfg


def tiny_method(method: str, overrides: Mapping[str, Any] | None = None,
                model_overrides: Mapping[str, Any] | None = None, seed: int = 0, corpus_size: int = 6):
    """The method's module at the tiny preset, prepared on ``corpus_size`` phantom volumes; and the corpus."""
    cls = get_method_class(method)
    assert cls is not None, f"method {method!r} is not registered or its module is missing"
    params, model_cfg = tiny_config(method, overrides, model_overrides)
    size = cls.input_size(params)
    assert size is not None, f"{method}: input_size must give the corpus volume size"
    torch.manual_seed(seed)
    corpus = phantom_volumes(corpus_size, size, "cpu", seed=seed)
    model = cls(params, model_cfg)
    model.prepare(corpus, seed)
    return model, corpus, params, model_cfg


def train_steps(model: torch.nn.Module, corpus: torch.Tensor, steps: int, batch: int = 2, lr: float = 1e-3,
                seed: int = 0) -> list[float]:
    """Train ``steps`` AdamW steps on batches drawn from ``corpus``; returns every step's loss."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, corpus.shape[0], (batch,), generator=g)
        loss, logs = model(corpus[idx], step)
        assert loss.ndim == 0 and torch.isfinite(loss), f"step {step}: loss {loss}"
        for k, v in logs.items():
            assert torch.isfinite(torch.as_tensor(v)).all(), f"step {step}: log {k} = {v}"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_step(step)
        losses.append(float(loss.detach()))
    return losses


def falls(losses: list[float], window: int = 5, ratio: float = 0.9) -> bool:
    """The mean of the last ``window`` losses is below ``ratio`` x the mean of the first ``window``."""
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    return last < ratio * first


def check_handover(model, model_cfg: Mapping[str, Any], in_channels: int = 1, out_channels: int = 3,
                   img_size=(64, 64, 64)):
    """Load the method's backbone_state_dict into the fine-tuning network; every transferable tensor must match.

    Returns the LoadReport. The network is a different task head (``out_channels``) than pre-training used.
    """
    state = {k: v.detach().cpu() for k, v in model.backbone_state_dict().items()}
    name = str(model_cfg.get("name", "swinunetr"))
    include_decoder = bool(getattr(model, "transfers_decoder", False))
    target = build_model(model_cfg, in_channels, out_channels, img_size=tuple(img_size))
    report = load_backbone(target, state, "handover", include_decoder=include_decoder, model_name=name)
    assert not report.missing, f"backbone tensors the method did not hand over: {report.missing[:5]}"
    assert not report.shape_mismatch, report.shape_mismatch[:5]
    assert not report.unexpected, f"handed-over tensors that fit nothing: {report.unexpected[:5]}"
    enc, dec = TRANSFER_PREFIXES[name]
    loaded = target.state_dict()
    for key in report.matched:   # the values really arrived
        assert torch.equal(loaded[key].float(), state[key].float()), key
    assert any(k.startswith(enc) for k in report.matched)
    if include_decoder:
        assert any(k.startswith(dec) for k in report.matched), "transfers_decoder is set but no decoder tensor moved"
    return report
