"""sslbench.speed.window_attention: the fused Swin window attention against plain torch.

The kernels run on CUDA + Triton (the GPU tests are skipped on CPU-only machines such as CI; they run on
the device machine: ``python -m pytest tests/test_window_attention.py``). On a CPU their math is still
checked, in fp32, by Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess because the variable is
read when the kernels are defined); the CPU pieces (region ids from MONAI's mask, the dispatch that falls
back to SDPA) are tested everywhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sslbench.speed import window_attention as W

cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and W.triton is not None),
                                 reason="the fused kernel needs CUDA and Triton")


def _monai_mask(size, window, shift):
    from monai.networks.nets.swin_unetr import compute_mask

    return compute_mask(list(size), list(window), list(shift), torch.device("cpu"))


def test_regions_reproduce_monai_shift_mask():
    mask = _monai_mask((14, 14, 14), (7, 7, 7), (3, 3, 3))          # [8, 343, 343], 0 / -100
    rid = W.regions_from_mask(mask)
    assert rid.shape == (8, 343) and rid.dtype == torch.int32
    rebuilt = torch.where(rid[:, :, None] == rid[:, None, :], 0.0, W.MASK_VALUE)
    assert torch.equal(rebuilt, mask.float())
    assert rid[0].unique().numel() == 1             # the first window lies in a single region
    assert rid[-1].unique().numel() == 8            # the last window straddles 2 x 2 x 2 regions


def test_backward_forms_are_chosen_validated_and_restored_on_exit():
    defaults = {key: choices[0] for key, choices in W.BACKWARD_CHOICES.items()}
    assert W.backward_modes() == defaults == {"dq": "kernel", "delta": "kernel", "dbias": "slabs"}
    with W.backward_forms(dq="atomic", dbias="atomic") as now:
        assert now == W.backward_modes() == {"dq": "atomic", "delta": "kernel", "dbias": "atomic"}  # what launches read
        with pytest.raises(ValueError, match="delta mode: 'fast'; expected one of kernel, torch"):
            with W.backward_forms(dq="kernel", delta="fast"):
                pass
        assert W.backward_modes()["dq"] == "atomic"                  # a refused scope changes nothing
        with W.backward_forms(delta="torch"):                        # nested: only the form it names changes
            assert W.backward_modes() == {"dq": "atomic", "delta": "torch", "dbias": "atomic"}
        assert W.backward_modes()["delta"] == "kernel"
    assert W.backward_modes() == defaults                            # the scope's end restores the defaults
    with pytest.raises(RuntimeError):
        with W.backward_forms(dq="atomic"):
            raise RuntimeError("a failing benchmark row")
    assert W.backward_modes() == defaults                            # ... errors included


def test_reference_matches_monai_window_attention():
    from monai.networks.nets.swin_unetr import WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(dim=32, num_heads=2, window_size=(7, 7, 7)).double()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    mask = _monai_mask((14, 14, 14), (7, 7, 7), (3, 3, 3)).double()
    x = torch.randn(16, 343, 32, dtype=torch.float64)
    n, h = 343, 2
    bias = attn.relative_position_bias_table[attn.relative_position_index[:n, :n].reshape(-1)]
    bias = bias.reshape(n, n, h).permute(2, 0, 1)
    with torch.no_grad():
        for m in (None, mask):
            ref = attn.proj(W.reference(attn.qkv(x), bias, None if m is None else W.regions_from_mask(m), h,
                                        attn.scale).double())
            torch.testing.assert_close(ref, attn(x, m), rtol=1e-5, atol=1e-5)


def test_dispatch_falls_back_to_sdpa_off_cuda():
    from monai.networks.nets import SwinUNETR

    from sslbench.speed.fast_swin import _SDPAWindowAttention, use_sdpa_window_attention

    torch.manual_seed(0)
    ref = SwinUNETR(in_channels=1, out_channels=1, feature_size=12, use_v2=True)
    fused = SwinUNETR(in_channels=1, out_channels=1, feature_size=12, use_v2=True)
    fused.load_state_dict(ref.state_dict())
    use_sdpa_window_attention(fused, kernel="fused")
    attn = next(m for m in fused.modules() if isinstance(m, _SDPAWindowAttention))
    x = torch.rand(1, 1, 32, 32, 32)
    assert attn.kernel == "fused" and not attn._fused_ok(torch.zeros(1, 343, 12))   # CPU: SDPA path
    with torch.no_grad():
        torch.testing.assert_close(fused.swinViT(x)[-1], ref.swinViT(x)[-1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="expected fused or sdpa"):
        use_sdpa_window_attention(fused, kernel="flash")


def test_fused_off_cuda_takes_monai_in_training_and_sdpa_without_autograd(monkeypatch):
    """On a CPU 'fused' picks the faster of the two exact forms: MONAI's own computation when autograd records
    (training), SDPA without it (evaluation, a no-grad teacher); both give MONAI's values."""
    from monai.networks.nets import SwinUNETR

    import sslbench.speed.fast_swin as fs

    torch.manual_seed(0)
    ref = SwinUNETR(in_channels=1, out_channels=1, feature_size=12, use_v2=True).double()
    fast = SwinUNETR(in_channels=1, out_channels=1, feature_size=12, use_v2=True).double()
    fast.load_state_dict(ref.state_dict())
    fs.use_sdpa_window_attention(fast, kernel="fused")
    calls = []
    real = fs._window_sdpa
    monkeypatch.setattr(fs, "_window_sdpa", lambda *a: calls.append(1) or real(*a))
    x = torch.rand(1, 1, 32, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fast.swinViT(x)[-1], ref.swinViT(x)[-1], rtol=1e-7, atol=1e-9)
    assert calls == []                                        # autograd on: MONAI's computation
    with torch.no_grad():
        torch.testing.assert_close(fast.swinViT(x)[-1], ref.swinViT(x)[-1], rtol=1e-7, atol=1e-9)
    assert len(calls) == 8                                    # no autograd: SDPA in each of the 8 blocks


@cuda_triton
@pytest.mark.parametrize("modes", [("kernel", "kernel", "slabs"), ("kernel", "torch", "slabs"),
                                   ("atomic", "torch", "slabs"), ("kernel", "kernel", "atomic"),
                                   ("atomic", "kernel", "atomic")])
@pytest.mark.parametrize("n,heads,d,masked", [(343, 3, 16, False), (343, 3, 16, True), (343, 2, 32, True),
                                              (64, 4, 16, False), (100, 2, 16, True)])
def test_fused_matches_reference_values_and_gradients(n, heads, d, masked, modes):
    with W.backward_forms(*modes):
        _fused_matches_reference(n, heads, d, masked)


def _fused_matches_reference(n, heads, d, masked):
    torch.manual_seed(0)
    dev = "cuda"
    nw = 4
    b = 3 * nw
    c = heads * d
    qkv = (torch.randn(b, n, 3 * c, device=dev) * 0.5).to(torch.bfloat16).requires_grad_()
    table = torch.randn(heads, n, n, device=dev, requires_grad=True)
    region = torch.randint(0, 3, (nw, n), device=dev, dtype=torch.int32) if masked else None
    scale = d ** -0.5
    out = W.window_attention(qkv, table * 1.0, region, heads, scale)
    g = torch.randn_like(out)
    (out.float() * g.float()).sum().backward()
    grads = (qkv.grad.float().clone(), table.grad.clone())
    qkv.grad, table.grad = None, None
    ref = W.reference(qkv.float(), table, region, heads, scale)
    (ref * g.float()).sum().backward()
    rel = lambda a, r: float((a.float() - r).norm() / r.norm())   # noqa: E731
    assert rel(out, ref) < 1e-2
    assert rel(grads[0], qkv.grad.float()) < 2e-2
    assert rel(grads[1], table.grad) < 2e-2


@cuda_triton
def test_fused_swin_training_step_is_as_close_to_fp32_as_sdpa():
    """A SwinUNETR-B encoder step under bf16 autocast: the fused kernel's loss and gradients differ from an
    fp32 SDPA reference no more than SDPA's own bf16 step does (up to a small factor)."""
    from monai.networks.nets import SwinUNETR

    from sslbench.speed.fast_swin import use_sdpa_window_attention

    x = torch.rand(2, 1, 64, 64, 64, device="cuda")
    results = {}
    for name, kernel, bf16 in (("ref", "sdpa", False), ("sdpa", "sdpa", True), ("fused", "fused", True)):
        torch.manual_seed(0)
        net = SwinUNETR(in_channels=1, out_channels=1, feature_size=48, use_v2=True).cuda()
        use_sdpa_window_attention(net.swinViT, kernel=kernel)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            y = sum(h.float().square().mean() for h in net.swinViT(x))
        y.backward()
        grads = torch.cat([p.grad.flatten() for p in net.swinViT.parameters() if p.grad is not None])
        results[name] = (float(y), grads)
    ref_loss, ref_grad = results["ref"]
    err = {k: float((results[k][1] - ref_grad).norm() / ref_grad.norm()) for k in ("sdpa", "fused")}
    assert abs(results["fused"][0] - ref_loss) <= 3 * abs(results["sdpa"][0] - ref_loss) + 1e-3 * abs(ref_loss)
    assert err["fused"] <= 2 * err["sdpa"] + 1e-3, err


@cuda_triton
def test_fused_operator_registration_is_consistent():
    """The kernels are PyTorch operators: fake (meta) shapes, autograd formula and schema agree with the
    real kernels (torch.library.opcheck)."""
    torch.manual_seed(0)
    heads, d, n, nw = 3, 16, 343, 2
    qkv = torch.randn(2 * nw, n, 3 * heads * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(heads, n, n, device="cuda", requires_grad=True)
    region = torch.randint(0, 3, (nw, n), device="cuda", dtype=torch.int32)
    for reg in (region, None):
        torch.library.opcheck(W._fwd_op, (qkv, bias, reg, heads, d ** -0.5),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@cuda_triton
def test_compiled_swin_has_no_graph_breaks_and_matches_eager():
    """torch.compile (under sslbench's Inductor settings) keeps a Swin encoder with the fused kernels in one
    graph, and every stage's compiled bf16 output is as close to the fp32 computation as the eager bf16 one
    (protocol.compiled_feature_problems, the judgement of VoCo's compile check): stages 1 and 2 at 64^3 have
    windows whose qkv rows are not 128-byte aligned, where torch 2.11's comprehensive padding gave wrong values
    (0.78 and 0.40 from eager; sslbench/speed/inductor.py). bf16 alone moves a stage's output by a few % of its
    largest value (H100, 2026-11-27: 0.031 compiled-vs-eager at stage 3), so compiled-vs-eager is no bound."""
    from monai.networks.nets import SwinUNETR

    from sslbench.speed import inductor
    from sslbench.speed.compile import max_relative_difference
    from sslbench.speed.fast_swin import full_precision, use_sdpa_window_attention
    from sslbench.protocol import compiled_feature_problems

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=1, feature_size=48, use_v2=True).cuda()
    use_sdpa_window_attention(net.swinViT, kernel="fused")
    x = torch.rand(2, 1, 64, 64, 64, device="cuda")

    def f(t):
        return net.swinViT(t)

    with torch.autocast("cuda", torch.bfloat16):          # with autograd, as in training
        explained = torch._dynamo.explain(f)(x)
        eager = f(x)
        compiled = inductor.compile(f)(x)
    with torch.no_grad(), full_precision(net):
        reference = f(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    diffs = {}
    for stage, (c, e, r) in enumerate(zip(compiled, eager, reference)):
        diffs[f"stage{stage}"] = max_relative_difference(c, e)
        diffs[f"stage{stage}_vs_fp32"] = max_relative_difference(c, r)
        diffs[f"stage{stage}_eager_vs_fp32"] = max_relative_difference(e, r)
    assert compiled_feature_problems(diffs) == [], diffs


_INTERPRETED = r"""
import json, sys
import torch
from sslbench.speed import window_attention as W
torch.manual_seed(0)
rows = []
# (windows, tokens, heads, head dim, windows per image or 0 = no mask, configs)
cases = [(6, 100, 2, 16, 3, None), (6, 100, 2, 16, 0, None), (5, 64, 1, 32, 5, None),
         (7, 50, 2, 16, 7, dict(G=2, BM=16, BN=32))]
for b, n, h, d, nw, cfg in cases:
    saved = [dict(c) for c in (W.FWD_CONFIG, W.DQ_CONFIG, W.DKV_CONFIG)]
    if cfg:
        for c in (W.FWD_CONFIG, W.DQ_CONFIG, W.DKV_CONFIG):
            c.update(cfg)
    qkv = torch.randn(b, n, 3 * h * d) * 0.5
    bias = torch.randn(h, n, n)
    region = torch.randint(0, 3, (nw, n), dtype=torch.int32) if nw else None
    out, lse = W._launch_fwd(qkv, bias, region, h, d ** -0.5)
    q = qkv.clone().requires_grad_()
    bb = bias.clone().requires_grad_()
    ref = W.reference(q, bb, region, h, d ** -0.5)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    rel = lambda a, r: float((a - r).norm() / r.norm())
    for dq_mode, delta_mode, dbias_mode in (("kernel", "torch", "slabs"), ("atomic", "torch", "slabs"),
                                            ("kernel", "kernel", "slabs"), ("kernel", "torch", "atomic"),
                                            ("atomic", "kernel", "atomic")):
        with W.backward_forms(dq_mode, delta_mode, dbias_mode):
            dqkv, dbias = W._launch_bwd(g, qkv, bias, region, out, lse, h, d ** -0.5)
        rows.append([rel(out, ref.detach()), rel(dqkv, q.grad), rel(dbias, bb.grad)])
    for c, old in zip((W.FWD_CONFIG, W.DQ_CONFIG, W.DKV_CONFIG), saved):
        c.clear(); c.update(old)
json.dump(rows, sys.stdout)
"""


@pytest.mark.skipif(W.triton is None, reason="Triton is not installed")
def test_kernels_match_reference_in_triton_interpreter():
    """Forward, delta, dQ/dK/dV and the bias gradient of the Triton kernels (and of the backward that adds dQ
    with atomics, dq "atomic", the one whose delta comes from torch ops, delta "torch", and the
    one that adds the bias gradient with atomics, dbias "atomic"), run by Triton's CPU interpreter in fp32: masked and unmasked windows, token counts that are not block multiples, a last window group
    that is only partly filled, head dim 32 and a second launch configuration."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 20     # 4 cases x (delta by torch, dQ by atomics, the defaults, bias gradient by atomics, dQ and bias by atomics)
    for out_err, dqkv_err, dbias_err in rows:
        assert out_err < 1e-5 and dqkv_err < 1e-5 and dbias_err < 1e-5, rows


@pytest.mark.parametrize("dims", [2, 3])
def test_run_attention_switches_swin_in_fine_tuning_networks(dims):
    """run.attention: the fine-tuning network's window attention (2D and 3D Swin) is switched, computes
    MONAI's function (values and gradients; SDPA path on CPU) and keeps its state-dict keys."""
    from monai.networks.nets import SwinUNETR

    from sslbench.models.backbones import build_basicunet, build_unet3d
    from sslbench.speed.fast_swin import _SDPAWindowAttention
    from sslbench.protocol import use_run_attention

    torch.manual_seed(0)
    ref = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, spatial_dims=dims, use_v2=True).double()
    fast = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, spatial_dims=dims, use_v2=True).double()
    fast.load_state_dict(ref.state_dict())
    keys = list(fast.state_dict())
    assert use_run_attention(fast, {"attention": "fused"}) == 8
    assert list(fast.state_dict()) == keys
    assert sum(isinstance(m, _SDPAWindowAttention) for m in fast.modules()) == 8
    assert use_run_attention(fast, {"attention": "sdpa"}) == 8        # switching again only changes the kernel
    assert {m.kernel for m in fast.modules() if isinstance(m, _SDPAWindowAttention)} == {"sdpa"}
    x = torch.rand((1, 1) + (64,) * dims, dtype=torch.float64)
    y_ref, y_fast = ref(x), fast(x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-7, atol=1e-9)
    y_ref.square().mean().backward()
    y_fast.square().mean().backward()
    g_ref = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[name].grad, rtol=1e-6, atol=1e-10, msg=name)
    assert use_run_attention(build_basicunet({"unet_features": [4, 4, 8, 8, 16, 4]}), {"attention": "fused"}) == 0
    assert use_run_attention(build_unet3d({"unet3d": {"base": 2}}), {"attention": "fused"}) == 0
    untouched = SwinUNETR(in_channels=1, out_channels=1, feature_size=12, spatial_dims=dims)
    assert use_run_attention(untouched, {"attention": "monai"}) == 0
    assert not any(isinstance(m, _SDPAWindowAttention) for m in untouched.modules())
