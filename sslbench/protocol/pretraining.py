"""Pre-training: a method's pretext task on a corpus, through the one loop; writes checkpoints/backbone.pt (the
backbone in SwinUNETR's key layout, or the 2D U-Net's) and heads.pt, and the record.

The corpus is held on the device (memory loader: every volume resized to the method's input size) or streamed
from the case cache by worker processes (``method.pretrain.loader: stream``). Under torchrun DDP averages the
gradients and each rank draws its own batch, so the global batch is world_size x batch_size: with
``method.pretrain.sampler: step`` (the default) rank 0 draws what a single process would; with ``epoch`` rank r
reads the rows r*B..(r+1)*B-1 of a single process of batch W*B (sslbench/data/sampler.py), both loaders alike.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .. import distributed
from ..data.cases import case_cache, load_cases
from ..data.prefetch import upload
from ..errors import RecipeError
from ..speed import inductor
from ..store.records import atomic_torch_save, atomic_write_json
from . import track2d
from .loop import DataWait, Loop
from .optim import pretrain_optimizer, pretrain_schedule
from .plan import check_loader, method_class
from .runs import _claim_run, _rank_report, Outcome, resume_last, run_scope
from .runtime import (align_optimizer_state, check_compiled_method, make_progress, plain_float, pretrain_attention,
                      Runtime)


def pretrain(cfg: dict, root: str | Path | None = None, resume: bool = False, force: bool = False,
             console=None) -> Outcome:
    """:func:`_pretrain` inside a :func:`run_scope` (its folder locked while it runs; ``failed`` on an error); the
    run's :class:`sslbench.protocol.runtime.Runtime` is applied inside (torch switches restored afterwards)."""
    with run_scope():
        return _pretrain(cfg, root=root, resume=resume, force=force, console=console)


def pretrain_stream(cfg: Mapping[str, Any], cls, items: list[dict], size, with_label: bool,
                    dist: "distributed.Dist", device: torch.device, progress=None,
                    log: Callable[[str], None] = print):
    """The streaming loader (``method.pretrain.loader: stream``) of this rank's shard of the corpus.

    The shard's cases missing from the case cache are preprocessed into it first (threads, progress bar; every
    rank fills only its own shard), so nothing of the corpus is kept in memory (``cls`` None: no check of the
    method's corpus-level set-up, as ``bench pretrain --from-disk`` times the loader); :class:`sslbench.data.stream.Stream`
    then reads step batches from the cache files in ``run.loader_workers`` processes within ``run.loader_memory_mb``.
    With ``method.pretrain.sampler: epoch`` a rank reads any volume its global samples name (no fixed shard): it
    fills its shard, waits for the other ranks' (a barrier: on a shared cache everything is then in), and fills
    what it reads that is still missing (a node-local cache: the other nodes' shards); then it streams from the
    whole corpus's cache files.
    """
    from ..data.cache import CaseCache
    from ..data.stream import Stream, shard

    run_cfg, pt = cfg["run"], cfg["method"]["pretrain"]
    check_loader(cfg, cls)
    cache = CaseCache(cfg["corpus"], with_label=with_label)
    mine = shard(items, dist.rank, dist.world_size)
    files = _fill_cache(cfg, cache, mine, with_label, progress, log, "corpus volumes")
    sampler, own = pt.get("sampler", "step"), None
    if sampler == "epoch":
        from ..data.sampler import draw

        dist.barrier()
        reads = sorted({i for s in range(int(pt["steps"])) for i in draw(
            "epoch", len(items), int(pt["batch_size"]), int(run_cfg["seed"]), s, dist.rank, dist.world_size)})
        _fill_cache(cfg, cache, [items[i] for i in reads], with_label, progress, log,
                    "volumes this rank reads (other shards missing from a node-local cache)")
        files, own = [cache.files(it) for it in items], shard(range(len(items)), dist.rank, dist.world_size)
    return Stream(files, size, int(pt["batch_size"]), int(run_cfg["seed"]), rank=dist.rank, with_label=with_label,
                  budget_mb=float(run_cfg.get("loader_memory_mb", 2048)), workers=int(run_cfg.get("loader_workers", 0)),
                  pin_memory=device.type == "cuda", native=bool(pt.get("native_crops", False)), sampler=sampler,
                  world_size=dist.world_size, own=own)


def _fill_cache(cfg: Mapping[str, Any], cache, items: list[dict], with_label: bool, progress,
                log: Callable[[str], None], what: str) -> list:
    """The cache files of ``items``, preprocessing those missing into the cache first (threads, progress bar).
    Writes are atomic, so two ranks that fill one volume of a shared folder waste work but never tear a file."""
    from ..data.transforms import preprocess_transforms

    files = [cache.files(it) for it in items]
    todo = [it for it, (image, label) in zip(items, files)
            if not image.is_file() or (label is not None and not label.is_file())]
    if todo:
        log(f"caching {len(todo)} of {len(items)} {what} in {cache.folder}")
        load_cases(todo, preprocess_transforms(cfg["corpus"], with_label=with_label), "cache corpus", progress,
                   cache=cache, write=True, keep=False)
    return files


@torch.no_grad()
def stream_features(method: torch.nn.Module, stream, dist: "distributed.Dist", rt: Runtime) -> torch.Tensor:
    """Every corpus volume's ``method.volume_features`` [N, D] in corpus order, without holding the corpus: this rank
    reads its shard (volumes r, r + W, ...) from the case cache in chunks; the shards are gathered to every rank and
    interleaved back, so every rank discovers the same set-up the memory loader's ``prepare`` does."""
    mine = torch.cat([method.volume_features(rt.batch(chunk)) for chunk in stream.whole_volumes()])
    if not dist.enabled:
        return mine
    parts = dist.gather_rows([mine])
    out = torch.empty((sum(len(p) for p in parts), mine.shape[1]), dtype=mine.dtype)
    for r, part in enumerate(parts):
        out[r::dist.world_size] = part
    return out


@dataclass
class PretrainRun:
    """A pre-training being run: its method class and parameters, run folder, runtime (device, precision, attention
    kernel, compile) and data."""

    cfg: dict
    cls: type
    params: dict
    needs_labels: bool
    two_d: bool
    dist: Any
    plan: Any
    record: Any
    action: str
    say: Callable[..., None]
    rt: Runtime = None
    stream: Any = None
    stack: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def bf16(self) -> bool:
        return self.rt.bf16

    @property
    def seed(self) -> int:
        return int(self.cfg["run"]["seed"])


def _pretrain(cfg: dict, root: str | Path | None = None, resume: bool = False, force: bool = False,
              console=None) -> Outcome:
    """Pre-train a method's backbone on a corpus; writes checkpoints/backbone.pt in SwinUNETR's key layout."""
    cls, params, needs_labels, two_d = method_class(cfg)
    # one root, or the roots of data.sources (a labelled corpus: its training split, images and labels)
    dist, plan, record, action, say = _claim_run(cfg, "pretrain", resume, force, console, root)
    if action == "skip":
        say(f"pre-training already finished: {record.path} (protocol {plan.protocol}); reusing it")
        return Outcome(record, "skip", record.metrics or {})
    run = PretrainRun(cfg, cls, params, needs_labels, two_d, dist, plan, record, action, say,
                      Runtime.for_rank(cfg["run"], dist, attention=pretrain_attention(params)))
    with run.rt.applied():
        return _pretrain_with(run, console)


def _pretrain_with(run: PretrainRun, console=None) -> Outcome:
    """The claimed pre-training ``run`` under its runtime: corpus, method, loop, weights and record."""
    cfg, cls, params, dist, record, action = run.cfg, run.cls, run.params, run.dist, run.record, run.action
    size = track2d.input_size(cfg["corpus"]) if run.two_d else cls.input_size(params)
    if size is None:
        raise RecipeError(f"method '{cfg['method']['name']}': random-crop corpora are not supported yet (input_size is None)")
    progress = make_progress(console)
    with progress:
        _load_corpus(run, size, progress)
        _start_record(run)
        torch.manual_seed(run.seed)
        method = cls(params, cfg["model"]).to(run.device)
        run.rt.apply_speed(method)
        if run.stack is not None:
            method.prepare(run.stack, run.seed)   # corpus-level set-up (e.g. TransVW's visual words); deterministic
        elif getattr(cls, "streams_prepare", False):   # the same set-up from features streamed volume by volume
            method.discover(stream_features(method, run.stream, dist, run.rt), run.seed)
        loop = _train(run, method, progress)
    _rank_report(dist, method.backbone_state_dict(), steps=loop.total, history=loop.history)
    if not dist.is_main:   # rank 0 writes the weights and the record; the others wait for them
        dist.barrier()
        return Outcome(record, action, {"kind": "pretrain", "rank": dist.rank,
                                        "transfers_decoder": bool(getattr(cls, "transfers_decoder", False))})
    metrics = _write_results(run, method, loop)
    dist.barrier()
    return Outcome(record, action, metrics)


def _load_corpus(run: PretrainRun, size, progress) -> None:
    """The corpus: a stream from the case cache, the 2D track's images, or every volume resized to ``size`` (and
    held on the device)."""
    from monai import transforms as mt

    from ..data.transforms import preprocess_transforms

    cfg, dist, device, corpus, items = run.cfg, run.dist, run.device, run.cfg["corpus"], run.plan.items
    if cfg["method"]["pretrain"].get("loader", "memory") == "stream":   # batches read from the case cache by workers
        run.stream = pretrain_stream(cfg, run.cls, items, size, run.needs_labels, dist, device, progress,
                                     run.say if dist.is_main else (lambda *_: None))
        return
    if run.two_d:
        stack = track2d.load_images(corpus, items, progress)   # [N, 1, H, W] at preprocess.size
    else:
        cache, write = case_cache(cfg["run"], corpus, with_label=run.needs_labels)
        volumes = load_cases(items, preprocess_transforms(corpus, with_label=run.needs_labels), "preprocess corpus",
                             progress, cache=cache, write=write)
        resize = mt.Resize(spatial_size=tuple(size), mode="trilinear")
        stack = torch.stack([torch.as_tensor(resize(torch.as_tensor(v["image"]).float())).float()
                             for v in volumes])  # [N, 1, X, Y, Z]
        if run.needs_labels:   # [N, 2, X, Y, Z]: channel 1 holds the label ids (nearest-neighbour resize)
            nearest = mt.Resize(spatial_size=tuple(size), mode="nearest")
            labels = torch.stack([torch.as_tensor(nearest(torch.as_tensor(v["label"]).float())).float()
                                  for v in volumes])
            stack = torch.cat([stack, labels], dim=1)
        del volumes
    stack = plain_float(stack)   # what the method receives: plain float tensors (as every batch, Runtime.batch)
    run.stack = stack.to(device) if device.type == "cuda" else stack   # GPU-resident: batches gathered there


def _start_record(run: PretrainRun) -> None:
    """The run folder only once every case loaded and passed its checks (a refused run leaves none)."""
    record, dist, plan = run.record, run.dist, run.plan
    if not dist.is_main:
        return
    record.path.mkdir(parents=True, exist_ok=True)
    if run.action == "new":
        record.write_recipe({**run.cfg, "data": {"root": str(plan.root), "phantom": plan.phantom}})
        record.write_env(str(run.device), world_size=dist.world_size,
                         runtime=run.rt.settings())
        record.set_status(state="running", stage="pretrain", step=0, protocol=plan.protocol,
                          world_size=dist.world_size, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    else:   # resumed: this process is its owner now (pid, host), no longer the interrupted or failed one
        record.set_status(state="running", resumed=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if run.stream is not None and run.stream.sampler == "epoch":
        record.log(run.stream.plan.describe() + f"; sampler epoch: rank 0 of {dist.world_size} reads the volumes of "
                   f"its global samples from all {len(plan.items)} volumes (each once per epoch across the ranks)")
    elif run.stream is not None:
        record.log(run.stream.plan.describe() + f"; rank 0 of {dist.world_size} reads its shard of "
                   f"{len(run.stream)} of {len(plan.items)} volumes")


def _resume(run: PretrainRun, method, opt, sched, total: int) -> tuple[int, list]:
    """(start step, history): from checkpoints/last.pt when resuming, else a fresh start."""
    state = resume_last(run.record, run.action, run.say, "method", method, opt, sched, total)
    return (0, []) if state is None else (int(state["step"]), list(state.get("history", [])))


def _compile(run: PretrainRun, method, opt) -> None:
    """``run.compile``: the method's encoders compiled and checked against eager on the first batch."""
    run.rt.compile_method(method)
    align_optimizer_state(opt)     # compiled VoCo's backbones went channels-last; a resumed state may not be
    if not run.cfg["run"].get("compile"):
        return
    record, dist, pt = run.record, run.dist, run.cfg["method"]["pretrain"]
    if dist.is_main:
        record.log("run.compile: Inductor settings " + ", ".join(f"{k}={v}" for k, v in inductor.current().items()))
    first = run.stack[: pt["batch_size"]] if run.stream is None else run.stream.first_batch()
    diffs = check_compiled_method(method, run.rt.batch(first), run.bf16, run.device, run.seed, str(record.path))
    if diffs and dist.is_main:
        record.log("compiled encoders against eager on the first batch (max relative difference): "
                   + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))


def _train(run: PretrainRun, method, progress) -> Loop:
    """The optimiser, the schedule and the loop over the method's steps (resumed from last.pt where one exists)."""
    from ..data.transforms import step_seed

    pt, dist, device, record, seed = run.cfg["method"]["pretrain"], run.dist, run.device, run.record, run.seed
    total = int(pt["steps"])
    opt = pretrain_optimizer(method, pt, device)
    sched = pretrain_schedule(opt, pt, total)
    start, history = _resume(run, method, opt, sched, total)
    _compile(run, method, opt)
    step_fn = distributed.wrap(method, dist, device)
    batches = run.stream.batches(start, total) if run.stream is not None else None
    stack, wait = run.stack, DataWait()

    def batch(step: int) -> torch.Tensor:
        if batches is not None:   # the StepSampler draws what the memory loader draws below
            return run.rt.batch(next(batches))
        return run.rt.batch(memory_batch(stack, pt, seed, step, dist))

    def loss_of(volumes_b: torch.Tensor, step: int):
        torch.manual_seed(step_seed(seed, step, 1 + 1000 * dist.rank))
        with run.rt.autocast():
            return step_fn(volumes_b, step)

    def save_last(done: int) -> None:
        if dist.is_main:
            atomic_torch_save({"method": method.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "step": done, "history": history},
                              record.ckpt_dir / "last.pt")
            record.set_status(step=done, data_wait=wait.fraction())
        dist.barrier()

    loop = Loop("pre-training", "pretrain", total, int(pt.get("log_every", 10)), int(pt.get("checkpoint_every", 500)),
                record, dist, run.cfg["run"], opt, sched, progress,
                progress.add_task(f"pretrain {run.cfg['method']['name']}", total=total, completed=start, info=""),
                device, batch, loss_of, save_last, history=history, after_step=method.after_step, wait=wait)
    t0 = time.perf_counter()
    loop.run(start)
    loop.seconds = time.perf_counter() - t0
    return loop


def memory_batch(stack: torch.Tensor, pt: Mapping[str, Any], seed: int, step: int, dist) -> torch.Tensor:
    """The memory loader's batch of ``step``: the rows of ``stack`` that ``method.pretrain.sampler`` draws
    (:func:`sslbench.data.sampler.draw` over the whole corpus; the read log's lines under ``SSLBENCH_READ_LOG``)."""
    from ..data.sampler import draw, global_samples
    from ..data.stream import READ_LOG, note_read

    sampler, b = pt.get("sampler", "step"), int(pt["batch_size"])
    picks = draw(sampler, stack.shape[0], b, seed, step, dist.rank, dist.world_size)
    # without waiting for the last step's GPU work (a wait the loop would count as data wait)
    index = upload(torch.as_tensor(picks, dtype=torch.long), stack.device)
    out = stack.index_select(0, index)
    if os.environ.get(READ_LOG):
        where = ([{"sample": g} for g in global_samples(step, b, dist.rank, dist.world_size)] if sampler == "epoch"
                 else [{"step": step, "slot": j} for j in range(b)])
        for i, row, w in zip(picks, out, where):
            note_read("memory", dist.rank, i, row, **w)
    return out


def _write_results(run: PretrainRun, method, loop: Loop) -> dict:
    """backbone.pt, heads.pt and metrics.json (rank 0); the status becomes finished."""
    record, cfg, plan, history = run.record, run.cfg, run.plan, loop.history
    method_cfg, pt = cfg["method"], cfg["method"]["pretrain"]
    backbone = {k: v.detach().cpu() for k, v in method.backbone_state_dict().items()}
    atomic_torch_save(backbone, record.ckpt_dir / "backbone.pt")
    atomic_torch_save({k: v.detach().cpu() for k, v in method.head_state_dict().items()}, record.ckpt_dir / "heads.pt")
    metrics = {"kind": "pretrain", "method": method_cfg["name"], "variant": (method_cfg.get("params") or {}).get("variant"),
               "corpus": cfg["corpus"]["name"], "phantom": plan.phantom, "protocol": plan.protocol, **record.identity(),
               "seed": run.seed, "preset": cfg["run"]["preset"], "steps": loop.total, "volumes": len(plan.items),
               "world_size": run.dist.world_size, "labelled": run.needs_labels,
               "final_loss": history[-1]["loss"] if history else None, "history": history,
               "seconds_this_session": loop.seconds, "data_wait": loop.wait.fraction(),
               "loader": pt.get("loader", "memory"), "backbone_tensors": len(backbone),
               "transfers_decoder": bool(getattr(run.cls, "transfers_decoder", False)),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(record.path / "metrics.json", metrics)
    record.set_status(state="finished", finished=metrics["finished"])
    return metrics
