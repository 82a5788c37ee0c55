"""sslbench's Inductor settings (sslbench/speed/inductor.py): set once, applied on every compile path, overridable."""
from __future__ import annotations

import pytest
import torch
import torch._inductor.config as config

from sslbench import protocol, speed
from sslbench.speed import inductor
from sslbench.methods import voco as V


@pytest.fixture
def fresh_settings(monkeypatch):
    """As in a new process: sslbench has not configured Inductor, and comprehensive padding is on (its default
    on a GPU build); records (function, padding setting at the time) of every torch.compile call."""
    monkeypatch.setattr(inductor, "_configured", False)
    calls = []

    def recording_compile(fn, **kwargs):
        calls.append((fn, config.comprehensive_padding, kwargs))
        return fn
    monkeypatch.setattr(torch, "compile", recording_compile)
    with config.patch(comprehensive_padding=True):     # restored afterwards, whatever the test set
        yield calls


def test_configure_turns_comprehensive_padding_off_once_and_leaves_later_choices(fresh_settings):
    assert inductor.configure() == {"comprehensive_padding": False}
    assert config.comprehensive_padding is False
    config.comprehensive_padding = True            # an explicit later choice, e.g. bench --inductor ...=true
    assert inductor.configure() == {"comprehensive_padding": True} and config.comprehensive_padding is True


def _as_new_process() -> None:
    inductor._configured = False                   # (the fixture's monkeypatch restores it afterwards)
    config.comprehensive_padding = True


def test_every_compile_path_compiles_without_comprehensive_padding(fresh_settings):
    """run.compile of a network, of a method's forward, VoCo's compiled encoders: each path, taken first in a
    new process, calls torch.compile with comprehensive padding off and static shapes."""
    net = torch.nn.Linear(3, 2)
    _as_new_process()
    assert protocol.compiled(net, {"compile": True}) is net                # the recording 'compiler' returns it
    assert protocol.compiled(net, {"compile": False}) is net and len(fresh_settings) == 1
    _as_new_process()
    protocol.compile_method(torch.nn.Linear(3, 2), {"compile": True})
    params = {"variant": "teacher-student", "n": 2, "sw_batch_size": 1, "resize": [96, 96, 64], "crop_size": 64,
              "head_dim": 32}
    model = V.VoCo(params, {"feature_size": 12, "use_v2": True})
    speed.apply(model)
    _as_new_process()
    speed.compile_method(model)
    assert {name for name in model.compile_parts if "forward" in vars(getattr(model, name))} == {
        "backbone", "head", "teacher", "teacher_head"}
    assert len(fresh_settings) == 2 + 4
    assert all(padding is False and kwargs.get("dynamic") is False for _, padding, kwargs in fresh_settings)
