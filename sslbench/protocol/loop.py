"""The one training loop of sslbench: pre-training and both fine-tuning kinds (segmentation, classification) run
their steps through :class:`Loop`.

A stage hands the loop what differs between stages - how a step's batch is fetched, the step's loss, what a
validation measures, what a checkpoint holds - and the loop does the rest the same way for all of them: the
optimiser and schedule steps, the mean of the logged values over the logging interval and over ranks, the stop on
a non-finite loss, history, log.txt and TensorBoard lines, the best validation checkpoint, the periodic last
checkpoint, the progress bar, the kill point of the resume tests and a sweep's pruning callback.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import RunError
from ..tasks.base import Validation


class DataWait:
    """The fraction of step time spent waiting for the step's batch (``data_wait`` in log.txt, status.json and
    metrics.json): host wall time from a step's start until its batch is on its way to the device, over the
    step's wall time (CUDA work is asynchronous, so a GPU-bound step shows its time in the step, not the wait)."""

    def __init__(self):
        self.wait = self.total = self.wait_i = self.total_i = 0.0
        self._t0 = self._t1 = None

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def got_data(self) -> None:
        self._t1 = time.perf_counter()

    def end_step(self) -> None:
        now = time.perf_counter()
        w, t = self._t1 - self._t0, now - self._t0
        self.wait, self.total, self.wait_i, self.total_i = self.wait + w, self.total + t, self.wait_i + w, self.total_i + t

    def fraction(self) -> float:
        """Over the steps of this session so far (the step being logged counts up to its data)."""
        return self.wait / self.total if self.total > 0 else 0.0

    def interval(self) -> float:
        """Over the steps since the last call (then restarts)."""
        out = self.wait_i / self.total_i if self.total_i > 0 else 0.0
        self.wait_i = self.total_i = 0.0
        return out


def kill_point(step: int) -> None:
    """Test hook: SSLBENCH_KILL_AFTER_STEP=N kills the process right after step N, with SIGKILL, or with
    the signal SSLBENCH_KILL_SIGNAL names (``TERM``: a scheduler's or batch system's stop)."""
    at = os.environ.get("SSLBENCH_KILL_AFTER_STEP")
    if at is not None and int(at) == step:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("SSLBENCH_KILL_SIGNAL", "KILL").upper()))


def stop_if_not_finite(loss: float, step: int, record, run_cfg: Mapping[str, Any], stage: str) -> None:
    """A NaN / inf training loss ends the run with a one-line error instead of training on (and scoring)
    garbage; the run is marked failed (run_scope), with its last checkpoint from before the logging window."""
    if math.isfinite(loss):
        return
    msg = (f"{record.path}: the {stage} loss is {loss} at step {step} (precision "
           f"{run_cfg.get('precision', 'auto')}, compile {bool(run_cfg.get('compile'))}, attention "
           f"{run_cfg.get('attention', 'fused')}); the run was stopped unfinished. Try a lower learning rate or "
           f"--set run.precision=fp32, then run again (the failed folder starts over)")
    record.log(msg)
    raise RunError(msg)


@dataclass
class Loop:
    """Steps ``start .. total - 1`` of one stage (see the module docstring).

    ``batch(step)`` returns the step's input (its time counts as data wait); ``loss(batch, step)`` returns the
    loss to minimise and a dict of further values to log; ``save(done)`` writes the last checkpoint (on rank 0;
    it may meet the other ranks in a barrier); ``validate(done)`` (or None) measures the validation split;
    ``save_best(done, validation)`` writes best.pt; ``after_step(step)`` runs after the optimiser step (a
    method's EMA update). ``show_total`` writes ``step N/T`` in the log lines (fine-tuning) instead of
    ``step N``; ``wait`` (or None) measures the data wait and appends it to the log lines.
    """

    stage: str
    prefix: str
    total: int
    log_every: int
    checkpoint_every: int
    record: Any
    dist: Any
    run_cfg: Mapping[str, Any]
    optimizer: torch.optim.Optimizer
    schedule: Any
    progress: Any
    job: Any
    device: torch.device
    batch: Callable[[int], Any]
    loss: Callable[[Any, int], tuple[torch.Tensor, dict]]
    save: Callable[[int], None]
    history: list = field(default_factory=list)
    validate: Callable[[int], Validation] | None = None
    val_every: int = 0
    save_best: Callable[[int, Validation], None] | None = None
    after_step: Callable[[int], None] | None = None
    on_validation: Callable[[int, float], None] | None = None
    wait: DataWait | None = None
    show_total: bool = False
    best: float = -1.0
    best_step: int = 0
    _acc: dict = field(default_factory=dict, init=False, repr=False)
    _n: int = field(default=0, init=False, repr=False)

    def run(self, start: int) -> None:
        for step in range(start, self.total):
            self.step(step)

    def step(self, step: int) -> None:
        wait = self.wait
        if wait is not None:
            wait.start_step()
        data = self.batch(step)
        if wait is not None:
            wait.got_data()
        loss, logs = self.loss(data, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        if self.after_step is not None:
            self.after_step(step)
        if wait is not None:
            wait.end_step()
        for k, v in {"loss": loss, **logs}.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self._acc[k] = self._acc.get(k, 0) + v
        self._n += 1
        done = step + 1
        if done % self.log_every == 0 or done == self.total:
            self._log(done)
        validated = bool(self.validate) and bool(self.val_every) and (done % self.val_every == 0 or done == self.total)
        result = self._validate(done) if validated else None
        if done % self.checkpoint_every == 0 or done == self.total:
            self.save(done)
        self.progress.update(self.job, advance=1)
        kill_point(done)
        if result is not None and self.on_validation is not None:
            self.on_validation(done, result.value)

    def _log(self, done: int) -> None:
        entry = {"step": done, **{k: float(self.dist.mean(v.to(self.device) / self._n)) for k, v in self._acc.items()}}
        stop_if_not_finite(entry["loss"], done, self.record, self.run_cfg, self.stage)
        self.history.append(entry)
        self._acc, self._n = {}, 0
        if self.dist.is_main:
            head = f"step {done}/{self.total} " if self.show_total else f"step {done} "
            tail = f" data_wait {self.wait.interval():.3f}" if self.wait is not None else ""
            self.record.log(head + " ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "step") + tail)
            self.record.scalars(done, {**{f"{self.prefix}/{k}": v for k, v in entry.items() if k != "step"},
                                       f"{self.prefix}/lr": self.optimizer.param_groups[0]["lr"]})
        self.progress.update(self.job, info=f"loss {entry['loss']:.4f}" + self._best_text())

    def _validate(self, done: int) -> Validation:
        result = self.validate(done)
        self.history.append(result.entry)
        self.record.log(f"step {done} {result.text}")
        self.record.scalars(done, result.scalars)
        if result.score > self.best:
            self.best, self.best_step = result.score, done
            if self.dist.is_main and self.save_best is not None:
                self.save_best(done, result)
        self.progress.update(self.job, info=result.text + self._best_text())
        return result

    def _best_text(self) -> str:
        return f" best {self.best:.3f}" if self.best_step > 0 else ""
