"""The task-kind interface: what fine-tuning and evaluating one kind of task (segmentation, classification, ...)
does, as the protocol's one fine-tuning flow (:func:`sslbench.protocol.finetuning.finetune`) asks for it.

A kind is chosen from the table :data:`sslbench.tasks.KINDS` by the task recipe's ``kind``; it knows nothing of
methods (an ``--init`` checkpoint arrives as a file) and nothing of the protocol above it: the run's device,
precision, ranks and compile setting come in as a runtime object (:class:`sslbench.protocol.runtime.Runtime`:
``device``, ``bf16``, ``dist``, ``autocast()``, ``compiled(module)``, ``train_module(module)``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import RecipeError


def autocast(enabled: bool, device: torch.device):
    """bf16 autocast on ``device`` when ``enabled`` (the run's ``run.precision``), else nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class Validation:
    """What one periodic validation measured: ``score`` decides the best checkpoint (higher is better),
    ``value`` is what a sweep's ``on_validation`` receives, ``entry`` goes into the history, ``text`` into
    log.txt, ``scalars`` to TensorBoard, ``best_state`` into best.pt beside the model."""

    score: float
    value: float
    entry: dict
    text: str
    scalars: dict
    best_state: dict


@dataclass
class Steps:
    """A kind's training steps for the loop (:class:`sslbench.protocol.loop.Loop`): ``batch(step)`` (its time is
    the data wait), ``loss(batch, step)`` -> (loss, further values to log), ``validate(done)`` -> Validation,
    ``close()`` when the loop ends (background loaders)."""

    batch: Callable[[int], Any]
    loss: Callable[[Any, int], tuple]
    validate: Callable[[int], Validation]
    close: Callable[[], None] = field(default=lambda: None)


class TaskKind:
    """One kind of fine-tuning task. The flow calls, in order: :meth:`load` (inside the progress display, before
    the run folder exists: a refused case leaves none), :meth:`build_model`, :meth:`load_init`,
    :meth:`on_new_record` (a new run's folder was just created), :meth:`steps`, then after training
    :meth:`evaluate` (every rank) and :meth:`write_results` (rank 0)."""

    #: the record's headline metric (``metric`` in metrics.json)
    metric: str = ""
    #: whether the kind's loader reports its data wait (``data_wait`` in status.json and metrics.json)
    measures_data_wait: bool = False
    #: whether ``sslbench evaluate --precision/--attention`` may override the run's settings
    overrides_runtime: bool = False
    #: the initial best validation score (a resumed run reads its own from last.pt)
    initial_best: float = -1.0

    #: the ``finetune.loss`` values the kind trains with: {recipe value: what it means}
    losses: Mapping[str, str] = {}

    @classmethod
    def check(cls, cfg: Mapping[str, Any]) -> None:
        """Recipe settings the kind cannot run, refused before any work: ``finetune.loss`` must name the kind's
        loss (the key is part of the protocol hash, so it says what the run trained with)."""
        task = cfg["task"]
        loss = (task.get("finetune") or {}).get("loss")
        if loss not in cls.expected_losses(task):
            where = (cfg.get("recipe_files") or {}).get("task") or task["name"]
            raise RecipeError(f"{where}: key 'finetune.loss': {loss!r}, but a {task['kind']} task trains with "
                              + " or ".join(f"{k!r} ({v})" for k, v in cls.expected_losses(task).items()))

    @classmethod
    def expected_losses(cls, task: Mapping[str, Any]) -> Mapping[str, str]:
        return cls.losses

    def __init__(self, cfg: Mapping[str, Any], rt, say: Callable[..., None]):
        self.cfg, self.task, self.rt, self.say = cfg, cfg["task"], rt, say
        self.ft = self.task["finetune"]
        self.train_items: list[dict] = []
        self.val_items: list[dict] = []

    def load(self, root: Path, progress) -> None:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def load_init(self, model: nn.Module, init: Mapping[str, Any] | None):
        raise NotImplementedError

    def on_new_record(self, record) -> None:
        """A new run's folder exists (rank 0 and the others: the others' record writes nothing)."""

    def describe_loader(self) -> str | None:
        """A line for log.txt about the training loader, or None."""
        return None

    def steps(self, model: nn.Module, start: int, total: int) -> Steps:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, progress) -> Any:
        raise NotImplementedError

    def load_validation(self, root: Path, progress) -> None:
        """Only the validation split (``sslbench evaluate RUN``)."""
        raise NotImplementedError

    def evaluation(self, result: Any) -> dict:
        """evaluation.json's scores of :meth:`evaluate`'s result (summary and per-case rows)."""
        raise NotImplementedError

    def record_fields(self) -> dict:
        """The kind's own fields of metrics.json beside the flow's (checkpoint, steps, history, ...)."""
        return {}

    def write_results(self, record, result: Any, protocol: str, phantom: bool, root: Path, extra: Mapping) -> None:
        raise NotImplementedError


def write_finetune_record(record, cfg: Mapping[str, Any], rows: list[dict], fields: Mapping[str, Any],
                          protocol: str, phantom: bool, root: Path, extra: Mapping[str, Any]) -> dict:
    """metrics.json of a finished fine-tuning (what every kind records: the run's identity and provenance, then
    the kind's ``fields`` - its metric, summary -, the per-case ``rows`` and the flow's ``extra``) and cases.csv,
    both atomically; the status becomes finished. Returns the metrics."""
    import time

    import pandas as pd

    from ..store.records import atomic_write_json

    task = cfg["task"]
    metrics = {
        "kind": "finetune",
        "task": task["name"],
        "task_title": task["title"],
        "method": cfg["run"].get("label", cfg["method"]["name"]),
        "method_recipe": cfg["method"]["name"],
        "variant": (cfg["method"].get("params") or {}).get("variant"),
        "preset": cfg["run"]["preset"],
        "seed": cfg["run"]["seed"],
        "protocol": protocol,
        **record.identity(),
        "phantom": phantom,
        "data_root": str(root),
        **fields,
        "cases": rows,
        **extra,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = record.path / ".cases.csv.tmp"
    pd.DataFrame(rows).to_csv(tmp, index=False)
    tmp.replace(record.path / "cases.csv")
    atomic_write_json(record.path / "metrics.json", metrics)
    record.set_status(state="finished", finished=metrics["finished"])
    return metrics
