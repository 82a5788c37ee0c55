"""Shared checks every pre-training method must pass (imported by tests/test_<method>.py).

    from methodkit import tiny_method, train_steps, check_handover

A method is exercised exactly as the protocol runs it: built from its recipe's ``tiny`` preset params and
the tiny model section, its speed settings applied (``sslbench.speed.apply``), ``prepare``d on a small corpus, trained with AdamW, its ``after_step`` hook called,
and the weights it hands over loaded into the fine-tuning network with every expected tensor matched.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from sslbench import recipes, speed
from sslbench.models.backbones import TRANSFER_PREFIXES, build_model, load_backbone
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
    speed.apply(model)                  # as the protocol does once it has built the method
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


def fixed_batch_logs(model: torch.nn.Module, volumes: torch.Tensor, steps: int, lr: float = 1e-3,
                     view_seed: int = 123) -> list[dict[str, float]]:
    """Train ``steps`` AdamW steps on ONE batch with the same random views every step (the RNG is re-seeded
    with ``view_seed`` before each forward), calling ``after_step`` like the protocol; every step's logs as
    floats (``loss`` always among them). Step 0's loss is the loss of the untrained network."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = []
    model.train()
    for step in range(steps):
        torch.manual_seed(view_seed)
        loss, logs = model(volumes, step)
        assert loss.ndim == 0 and torch.isfinite(loss), f"step {step}: loss {loss} ({logs})"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_step(step)
        out.append({"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}})
    return out


def closes_gap(losses: list[float], floor: float, fraction: float, window: int = 3) -> bool:
    """Training closed at least ``fraction`` of the gap between the untrained network's loss and the loss's
    lower bound ``floor`` (from the loss's definition: 0 for MSE / L1 / cross-entropy / InfoNCE, -1 for a
    negative cosine, their sum for a sum):

        mean(losses[-window:]) - floor <= (1 - fraction) * (losses[0] - floor)

    Why against ``losses[0]`` and a floor, not the first steps' mean against the last steps' (issue 17):
    losses[0] comes before any optimiser step, so it is the same on every machine to float rounding. The
    steps after it are not: on a tiny batch (BatchNorm over 2 samples, a few voxels) differences of 1e-6 in
    summation order (the CPU's vector ISA, the thread count, the day's kernels) grow into visibly different
    trajectories within 2-3 steps. SimSiam's 8-step test passed under ATEN_CPU_CAPABILITY=avx2/avx512 and
    failed under ``default`` with 2 threads, on the same package versions. Each test's ``fraction`` is about
    half the smallest fraction closed measured across ATEN_CPU_CAPABILITY default / avx2 / avx512 x 1 / 2
    threads (2026-12-02, torch 2.14.1), so that a kernel change moves a test far from its bound, and only a
    method that stops learning crosses it.
    """
    assert losses and losses[0] > floor, f"the first loss {losses[:1]} must lie above the floor {floor}"
    last = sum(losses[-window:]) / window
    return last - floor <= (1.0 - fraction) * (losses[0] - floor)


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
