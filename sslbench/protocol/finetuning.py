"""Fine-tuning and evaluation, once for every task kind (sslbench/tasks/: segmentation, classification).

The flow: find the data and claim the run folder (:func:`sslbench.protocol.runs.open_finetune`) -> the kind loads
its cases -> the model, seeded by the run seed, with the ``--init`` backbone -> the run folder and its record
-> the optimiser and schedule (resumed from last.pt) -> :class:`sslbench.protocol.loop.Loop` over the kind's
steps -> the best validation checkpoint scored on the validation split -> metrics.json by the kind.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from .. import tasks
from ..errors import RecipeError
from ..store.records import atomic_torch_save
from .loop import DataWait, Loop
from .optim import make_optimizer, make_schedule
from .plan import check_finetune_loader
from .runs import FinetuneRun, Outcome, open_finetune, resume_finetune, run_scope
from .runtime import Runtime, make_progress


def finetune(cfg: dict, root: str | Path | None = None, init: dict | None = None, resume: bool = False,
             force: bool = False, console=None, on_validation: Callable[[int, float], None] | None = None) -> Outcome:
    """:func:`_finetune` inside a :func:`run_scope` (its folder locked while it runs; ``failed`` on an error); the
    run's :class:`sslbench.protocol.runtime.Runtime` is applied inside (torch switches restored afterwards)."""
    with run_scope() as scope:
        return _finetune(cfg, root=root, init=init, resume=resume, force=force, console=console,
                         on_validation=scope.callback(on_validation))


def _finetune(cfg: dict, root: str | Path | None = None, init: dict | None = None, resume: bool = False,
              force: bool = False, console=None, on_validation: Callable[[int, float], None] | None = None) -> Outcome:
    """Fine-tune the task's model (optionally from pre-trained backbone weights) and evaluate it.

    ``init``: {"path": checkpoint, "source": "pretrain"|"file", "pretrain_run": folder, "hash": ...} or None.
    ``on_validation(step, score)`` is called after each periodic validation (Dice, accuracy or mean AUC), after
    the checkpoint of that step is safe on disk (a sweep reports intermediate values there and may raise to prune).
    """
    task = cfg["task"]
    if task["status"] != "available":
        raise RecipeError(f"task '{task['name']}' is {task['status']} (not implemented yet); "
                          f"see `sslbench list tasks` for the available ones")
    check_finetune_loader(cfg)
    kind_cls = tasks.kind_of(task)
    kind_cls.check(cfg)
    run = open_finetune(cfg, init, root, resume, force, console)
    if isinstance(run, Outcome):
        return run
    rt = Runtime(run.device, run.bf16, run.dist, run.cfg["run"])   # the device open_finetune chose
    with rt.applied():
        return _finetune_with(run, kind_cls(run.cfg, rt, run.say), init, console, on_validation)


def _finetune_with(run: FinetuneRun, kind, init: dict | None, console, on_validation) -> Outcome:
    """The claimed fine-tuning ``run`` by its task ``kind`` under its runtime (``kind.rt``): cases, model, loop,
    checkpoint selection, evaluation and record."""
    progress = make_progress(console)
    with progress:
        kind.load(run.root, progress)
        torch.manual_seed(int(run.cfg["run"]["seed"]))
        model = kind.build_model()
        kind.rt.use_attention(model)
        load_report = kind.load_init(model, init)
        _start_record(run, kind, load_report)
        model.to(run.device)
        loop = _train(run, kind, model, progress, on_validation)
        run.dist.barrier()   # best.pt is on disk for every rank
        chosen = _select_checkpoint(run, model, loop.best_step)
        result = kind.evaluate(model, progress)
    if not run.dist.is_main:
        run.dist.barrier()
        return Outcome(run.record, run.action, {"kind": "finetune", "rank": run.dist.rank})
    extra = {"checkpoint": chosen, "steps": loop.total, "train_cases": len(kind.train_items),
             "init": {**(init or {}), "load": load_report.as_dict() if load_report else None},
             "history": loop.history, "world_size": run.dist.world_size,
             **({"data_wait": loop.wait.fraction()} if loop.wait is not None else {}), **kind.record_fields()}
    kind.write_results(run.record, result, protocol=run.protocol, phantom=run.phantom, root=run.root, extra=extra)
    run.dist.barrier()
    return Outcome(run.record, run.action, run.record.metrics or {})


def total_steps(ft: dict, train_cases: int) -> int:
    """``finetune.max_steps``, or ``finetune.epochs`` x the steps of one pass over the training cases."""
    return int(ft["max_steps"]) if ft.get("max_steps") else int(ft["epochs"]) * math.ceil(train_cases / ft["batch_size"])


def _start_record(run: FinetuneRun, kind, load_report) -> None:
    """The run folder, once every case loaded and passed its checks and the --init checkpoint matched (a refused
    run leaves none): recipe, env and status of a new run, the log's first lines."""
    record, cfg, task = run.record, run.cfg, run.cfg["task"]
    record.path.mkdir(parents=True, exist_ok=True)
    if run.action == "new":
        record.write_recipe({**cfg, "data": {"root": str(run.root), "phantom": run.phantom}})
        record.write_env(str(run.device), runtime=kind.rt.settings(),
                         **({"world_size": run.dist.world_size} if run.dist.enabled else {}))
        record.set_status(state="running", stage="finetune", step=0, protocol=run.protocol,
                          started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        kind.on_new_record(record)
    else:   # resumed: this process is its owner now (pid, host), no longer the interrupted or failed one
        record.set_status(state="running", resumed=time.strftime("%Y-%m-%dT%H:%M:%S"))
    record.log(f"{run.action}: finetune {cfg['method']['name']} on {task['name']} "
               f"({'PHANTOM data' if run.phantom else 'real data'} at {run.root}), protocol {run.protocol}, "
               f"device {run.device}")
    line = kind.describe_loader()
    if line:
        record.log(line)
    if load_report is not None:
        run.say(load_report.summary())
        record.log(load_report.summary())


def _train(run: FinetuneRun, kind, model: torch.nn.Module, progress, on_validation) -> Loop:
    """The optimiser, the schedule and the loop over the kind's steps, resumed from last.pt where one exists."""
    ft, record, dist = kind.ft, run.record, run.dist
    total = total_steps(ft, len(kind.train_items))
    opt = make_optimizer(model.parameters(), ft["lr"], ft["weight_decay"], run.device)
    sched = make_schedule(opt, ft["warmup_steps"], total)
    start, best, best_step, history = resume_finetune(run, model, opt, sched, total, best=kind.initial_best)
    wait = DataWait() if kind.measures_data_wait else None

    def save_last(done: int) -> None:
        if dist.is_main:
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "step": done, "best": loop.best,
                               "best_step": loop.best_step, "history": history}, record.ckpt_dir / "last.pt")
            record.set_status(step=done, **({"data_wait": wait.fraction()} if wait is not None else {}))

    def save_best(done: int, result) -> None:
        atomic_torch_save({"model": model.state_dict(), "step": done, **result.best_state}, record.ckpt_dir / "best.pt")

    model.train()
    steps = kind.steps(model, start, total)
    loop = Loop("fine-tuning", "finetune", total, int(ft.get("log_every", 10)),
                max(1, int(ft.get("checkpoint_every") or total)), record, dist, run.cfg["run"], opt, sched, progress,
                progress.add_task("finetune", total=total, completed=start, info=""), run.device, steps.batch,
                steps.loss, save_last, history=history, validate=steps.validate, val_every=ft.get("val_every") or 0,
                save_best=save_best, on_validation=on_validation, wait=wait, show_total=True, best=best,
                best_step=best_step)
    try:
        loop.run(start)
    finally:
        steps.close()
    return loop


def _select_checkpoint(run: FinetuneRun, model: torch.nn.Module, best_step: int) -> str:
    """The model of the best validation step (best.pt) where there was one, else the last step's."""
    best = run.record.ckpt_dir / "best.pt"
    if best_step > 0 and best.is_file():
        model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["model"])
        return f"best (step {best_step})"
    return "last"
