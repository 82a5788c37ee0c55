"""How a run runs on this machine: its device and precision, allocator and thread settings, torch.compile of its
modules (checked against eager), the window-attention kernel, and :class:`Runtime`, the object the task kinds
receive instead of importing the protocol."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch

from .. import distributed, speed
from ..errors import RecipeError, RunError
from ..speed import inductor
from ..tasks.base import autocast


def keep_freed_memory() -> None:
    """Ask glibc to keep freed tensor memory instead of returning it to the kernel after every step.

    A CPU training step allocates and frees the same activation buffers each time; with glibc's defaults
    buffers above 128 KiB are mmap-ed and unmapped, and the page faults that follow cost ~40% of a tiny
    SwinUNETR step on a 2-core machine (measured: 1.6 s -> 0.9 s per step). No effect off glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Undo :func:`keep_freed_memory` when a run ends: glibc's default thresholds again (128 KiB) and the freed
    memory handed back to the kernel (``malloc_trim``), so that a process running several runs (a sweep's
    in-process trials, the demo, a test worker) does not keep every run's high-water mark. No effect off glibc."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def select_device(run_cfg: Mapping[str, Any]) -> torch.device:
    want = run_cfg.get("device", "auto")
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"run.device: '{want}' asked for, but no CUDA device is visible (use run.device=cpu)")
    return torch.device(want)


def use_bf16(run_cfg: Mapping[str, Any], device: torch.device) -> bool:
    p = run_cfg.get("precision", "auto")
    return p == "bf16" or (p == "auto" and device.type == "cuda")


def plain_float(volumes: torch.Tensor) -> torch.Tensor:
    """A batch as a method receives it: a plain tensor (a MONAI MetaTensor's data: cheaper, and it compiles),
    integer input as float32. Pre-training hands every method its corpus, batches and feature chunks through it
    (:meth:`Runtime.batch`), so that no method converts its input."""
    if hasattr(volumes, "as_tensor"):
        volumes = volumes.as_tensor()
    return volumes if volumes.is_floating_point() else volumes.float()


def make_progress(console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=False)


def compiled(module: torch.nn.Module, run_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """``run.compile``: ``torch.compile(module, dynamic=False)`` (the crops and windows have fixed shapes) under
    sslbench's Inductor settings (sslbench/speed/inductor.py), else ``module`` itself. The compiled wrapper shares the
    module's parameters; checkpoints are always written from the module itself, so their keys carry no
    ``_orig_mod.`` prefix. The Swin attention's SDPA branch (head dims the fused kernel does not take, e.g. the
    tiny preset's 4) is kept out of the compiled graph, as in the methods' compiled pre-training: compiled, it
    gave NaN losses on an H100 (2026-11-27, tiny preset on phantom BTCV, eager finite)."""
    if not run_cfg.get("compile"):
        return module
    from ..speed.fast_swin import keep_sdpa_out_of_compile

    keep_sdpa_out_of_compile(module)
    return inductor.compile(module, dynamic=False)


#: largest max |compiled - eager| / max |eager| of a method's encoder features (``compile_agreement``) that
#: still counts as the same computation in bf16; a zeroed encoder or permuted crops give ~0.5-1
COMPILE_FEATURE_TOLERANCE = 0.05


#: with an fp32 reference: the compiled bf16 features may be this many times as far from the fp32 computation
#: as the eager bf16 features are (two roundings of the same function, fused differently), or
#: COMPILE_FEATURE_TOLERANCE, whichever is larger. What it catches: non-finite features and gross faults (wrong
#: weights, permuted crops: ~0.5-1). What it may not: the miscompiled Swin stages of torch 2.11's padding bug
#: were 0.4-0.8 off in their own outputs but only 0.064 in the pooled backbone features (H100, 2026-11-27),
#: about what bf16 rounding gives there; stage-level comparisons (``benchmarks/compile_agreement.py``) see it.
COMPILE_ROUNDING_FACTOR = 2.0


def compiled_feature_problems(diffs: Mapping[str, float]) -> list[str]:
    """What is wrong with a method's compiled features (``compile_agreement``'s dict), one phrase each; []
    when they count as the eager computation. Compiled features must be finite; where an fp32 reference was
    computed (``<key>_vs_fp32``, ``<key>_eager_vs_fp32``) the compiled ones may be at most
    max(COMPILE_FEATURE_TOLERANCE, COMPILE_ROUNDING_FACTOR x the eager ones) from it, else at most
    COMPILE_FEATURE_TOLERANCE from the eager features."""
    problems = []
    for key, diff in diffs.items():
        if key.endswith("_vs_fp32"):
            continue
        if not math.isfinite(diff):
            problems.append(f"compiled {key} features are not finite")
            continue
        to_fp32, eager_to_fp32 = diffs.get(f"{key}_vs_fp32"), diffs.get(f"{key}_eager_vs_fp32")
        if to_fp32 is not None and eager_to_fp32 is not None:
            if not (math.isfinite(to_fp32) and math.isfinite(eager_to_fp32)):
                problems.append(f"the fp32 comparison of the {key} features is not finite (compiled {to_fp32:.3g}, "
                                f"eager {eager_to_fp32:.3g}): the eager or the fp32 computation gave NaN/inf")
                continue
            allowed = max(COMPILE_FEATURE_TOLERANCE, COMPILE_ROUNDING_FACTOR * eager_to_fp32)
            if not to_fp32 <= allowed:
                problems.append(f"compiled {key} features are {to_fp32:.3g} from the fp32 computation (max relative), "
                                f"eager's {eager_to_fp32:.3g} (allowed {allowed:.3g})")
        elif diff > COMPILE_FEATURE_TOLERANCE:
            problems.append(f"compiled {key} features differ from eager (max relative {diff:.3g} > "
                            f"{COMPILE_FEATURE_TOLERANCE})")
    return problems


def seeded_probe(fn: Callable[[], Any], bf16: bool, device: torch.device, seed: int) -> Any:
    """fn() under the run's autocast with the random number generators seeded by ``seed`` and restored
    afterwards: two calls draw the same crops and augmentations (a compiled-against-eager comparison)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with autocast(bf16, device):
            return fn()


def check_compiled_method(method: torch.nn.Module, volumes: torch.Tensor, bf16: bool, device: torch.device,
                          seed: int, where: str) -> dict[str, float]:
    """``run.compile``: before the first step, the compiled encoders of a method that can say
    (``compile_agreement``: VoCo) must give the eager encoders' features on one batch, as
    ``compiled_feature_problems`` judges them; otherwise a one-line RunError (a compiler fault must not train
    silently). Returns the relative differences ({} for methods without the check)."""
    if not getattr(method, "feature_encoders", None):
        return {}
    diffs = seeded_probe(lambda: speed.compile_agreement(method, volumes), bf16, device, seed)
    problems = compiled_feature_problems(diffs)
    if problems:
        raise RunError(f"{where}: run.compile: on the first batch, {'; '.join(problems)}; run again with "
                       f"--set run.compile=false")
    return diffs


def align_optimizer_state(opt: torch.optim.Optimizer) -> int:
    """Give every optimizer state tensor of a parameter's shape that parameter's memory layout; returns how many
    were copied. Fused AdamW pairs elements by memory position: after a parameter goes channels-last (a
    compiled VoCo), a contiguous exp_avg would update it with other elements' moments, silently."""
    moved = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    moved += 1
    return moved


def compile_method(method: torch.nn.Module, run_cfg: Mapping[str, Any]) -> None:
    """``run.compile`` for a pre-training method: its own ``compile_encoders`` where it has one (VoCo
    compiles the student and teacher encoders and leaves the batched crop / loss code eager), else its
    ``forward``; the benchmark (``sslbench bench pretrain --compile``) compiles the same way."""
    if not run_cfg.get("compile"):
        return
    speed.compile_method(method, dynamic=False)


def use_run_attention(model: torch.nn.Module, run_cfg: Mapping[str, Any]) -> int:
    """``run.attention`` (fused | sdpa | monai) for the Swin window attention of a network to fine-tune or
    evaluate (sslbench/speed/fast_swin.py: the same function computed faster; parameters and keys unchanged)."""
    from ..speed.fast_swin import apply_attention

    return apply_attention(model, str(run_cfg.get("attention", "fused")))


def _device_setup(run_cfg: Mapping[str, Any], dist: "distributed.Dist") -> tuple[torch.device, bool]:
    """This rank's device and bf16 choice (the allocator policy of :func:`keep_freed_memory` with it); torch's
    process-wide switches of the stage are :func:`run_settings`' (entered by the stage's entry point)."""
    device = distributed.device_for(dist, select_device(run_cfg))
    keep_freed_memory()
    return device, use_bf16(run_cfg, device)


@contextlib.contextmanager
def run_settings(run_cfg: Mapping[str, Any]) -> Iterator[dict]:
    """The torch switches a stage runs under, set on entry and restored on exit (so that nothing of one run leaks
    into the next one of the same process: a sweep's trials, the demo's two rows, in-process tests):

    - ``torch.backends.cudnn.benchmark`` on CUDA (fixed crop geometry: cuDNN picks the fastest convolution once
      per shape); left as it is on the CPU;
    - ``run.num_threads`` (when set): torch's intra-op thread count.

    On exit it also undoes the run's glibc allocator policy (:func:`release_freed_memory`). Yields the values in
    force (what env.json's ``runtime`` records). Not scoped, on purpose: sslbench's Inductor settings (sslbench/speed/
    inductor.py: set once per process before any compile, a correctness fix that a compile outside a scope must
    not miss). The fused attention's backward forms are the benchmark's knobs, scoped by
    ``speed.window_attention.backward_forms`` (``sslbench bench``), never set by a run."""
    before = {"cudnn_benchmark": torch.backends.cudnn.benchmark, "threads": torch.get_num_threads()}
    try:
        if select_device(run_cfg).type == "cuda":
            torch.backends.cudnn.benchmark = True
        if run_cfg.get("num_threads"):
            torch.set_num_threads(int(run_cfg["num_threads"]))
        yield {"cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "threads": torch.get_num_threads()}
    finally:
        release_freed_memory()   # the allocator policy the run's device set-up chose (keep_freed_memory)
        torch.backends.cudnn.benchmark = before["cudnn_benchmark"]
        if torch.get_num_threads() != before["threads"]:
            torch.set_num_threads(before["threads"])


@dataclass
class Runtime:
    """How this rank runs a stage: its device, bf16 autocast, ranks, the window-attention kernel and the run's speed
    settings (``run.*``: compile, cuDNN autotuning, threads).

    Both stages build one (:meth:`for_rank`) and run inside :meth:`applied`, the context that sets torch's
    process-wide switches of the run and restores them afterwards (:func:`run_settings`); env.json's ``runtime``
    is :meth:`settings`. The task kinds (sslbench/tasks/) receive one instead of importing the protocol: they
    autocast, compile and wrap their models through it; pre-training applies the method's speed settings through
    it (:meth:`apply_speed`), so that the speed settings are applied by the runtime in one place.

    ``attention`` is the one kernel the stage's networks run and env.json records: fine-tuning and evaluation take
    ``run.attention`` (the fine-tuned network's), pre-training takes ``method.params.attention``
    (:func:`pretrain_attention`; the method's modules). The two keys are not aliases: one recipe's ``run``
    section goes to both stages of ``sslbench run``, so that ``--set run.attention=monai`` checks the fine-tuned
    network against MONAI's modules without switching what pre-trains it. Neither is part of the protocol hash.

    Not scoped, on purpose: sslbench's Inductor settings (sslbench/speed/inductor.py: set once per process before
    the first compile, a correctness fix that a compile outside any run must not miss)."""

    device: torch.device
    bf16: bool
    dist: "distributed.Dist"
    run_cfg: Mapping[str, Any]
    attention: str = ""

    def __post_init__(self):
        if not self.attention:
            self.attention = str(self.run_cfg.get("attention", "fused"))

    @classmethod
    def for_rank(cls, run_cfg: Mapping[str, Any], dist: "distributed.Dist", attention: str = "") -> "Runtime":
        """This rank's runtime: its device (``run.device``, the rank's GPU under torchrun), ``run.precision``."""
        device, bf16 = _device_setup(run_cfg, dist)
        return cls(device, bf16, dist, run_cfg, attention)

    @contextlib.contextmanager
    def applied(self) -> Iterator["Runtime"]:
        """The run's torch switches (:func:`run_settings`: cuDNN autotuning on CUDA, ``run.num_threads``) and its
        allocator policy (:func:`keep_freed_memory`) for the stage, restored on exit, errors included."""
        with run_settings(self.run_cfg):
            keep_freed_memory()
            yield self

    def autocast(self):
        return autocast(self.bf16, self.device)

    def batch(self, volumes: torch.Tensor) -> torch.Tensor:
        """``volumes`` as a method receives them: a plain float tensor (:func:`plain_float`) on this rank's device."""
        return plain_float(volumes).to(self.device, non_blocking=True)

    def compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        return compiled(module, self.run_cfg)

    def train_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` as it trains: DDP under torchrun, compiled when the run asks."""
        return compiled(distributed.wrap(module, self.dist, self.device), self.run_cfg)

    def use_attention(self, model: torch.nn.Module) -> int:
        """The stage's ``attention`` for the Swin window attention of a network to fine-tune or evaluate."""
        from ..speed.fast_swin import apply_attention

        return apply_attention(model, self.attention)

    def apply_speed(self, method: torch.nn.Module) -> dict[str, int]:
        """A pre-training method's speed settings (``speed.apply``) with the stage's ``attention``."""
        return speed.apply(method, attention=self.attention)

    def compile_method(self, method: torch.nn.Module) -> None:
        compile_method(method, self.run_cfg)

    def settings(self) -> dict:
        """What env.json records of how the run ran (``runtime``): none of it is part of the protocol."""
        return runtime_settings(self.run_cfg, self.device, self.bf16, self.attention)


def pretrain_attention(params: Mapping[str, Any]) -> str:
    """The kernel a pre-training runs: ``method.params.attention`` (``fused`` for a method without the key, as
    ``speed.apply`` reads it)."""
    return str((params or {}).get("attention", "fused"))


def runtime_settings(run_cfg: Mapping[str, Any], device: torch.device, bf16: bool, attention: str | None = None) -> dict:
    """The speed settings a stage ran with (env.json's ``runtime``): precision, window-attention kernel (the
    stage's: ``attention``, else ``run.attention``), torch.compile, cuDNN autotuning, threads."""
    return {"device": str(device), "precision": "bf16" if bf16 else "fp32",
            "attention": str(attention or run_cfg.get("attention", "fused")), "compile": bool(run_cfg.get("compile")),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "threads": torch.get_num_threads()}
