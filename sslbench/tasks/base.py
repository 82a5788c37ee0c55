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
    #: whether the kind's images are 2D (the 2D track, sslbench/protocol/track2d.py: a method pre-trains in 2D on
    #: the task's own ``pretrain`` split, and no 3D checkpoint initialises its encoder)
    two_d: bool = False
    #: whether the kind's cases carry label maps (a method that pre-trains on label maps may read it as its corpus)
    label_maps: bool = False
    #: whether the kind's cases are volumes pre-processed into the case cache and validated by sliding windows
    #: (the plan then estimates the validations and the pre-processing, sslbench/protocol/plan.py)
    volumes: bool = False
    #: the ``finetune.loader`` values the kind can train with
    loaders: tuple[str, ...] = ("memory",)

    @classmethod
    def check(cls, cfg: Mapping[str, Any]) -> None:
        """Recipe settings the kind cannot run, refused before any work: ``finetune.loss`` must name the kind's
        loss (the key is part of the protocol hash, so it says what the run trained with)."""
        task = cfg["task"]
        loss = (task.get("finetune") or {}).get("loss")
        if loss not in cls.losses:
            where = (cfg.get("recipe_files") or {}).get("task") or task["name"]
            raise RecipeError(f"{where}: key 'finetune.loss': {loss!r}, but a {task['kind']} task trains with "
                              + " or ".join(f"{k!r} ({v})" for k, v in cls.losses.items()))

    @classmethod
    def loss_name(cls, task: Mapping[str, Any]) -> str:
        """The task's ``finetune.loss``, one of :attr:`losses`: what the kind's loss builder builds."""
        loss = (task.get("finetune") or {}).get("loss")
        if loss not in cls.losses:
            raise RecipeError(f"task '{task['name']}': key 'finetune.loss': {loss!r}; expected "
                              + " or ".join(repr(k) for k in cls.losses))
        return loss

    @classmethod
    def check_cases(cls, run_cfg: Mapping[str, Any], task: Mapping[str, Any], items: list[dict], force: bool) -> None:
        """Check every case a run will read before its run folder is claimed (sslbench/protocol/runs.py): a bad
        file refused with one line naming it; ``force`` (an old folder is replaced) checks what loading checks."""
        raise NotImplementedError

    @classmethod
    def step_input(cls, task: Mapping[str, Any]) -> tuple[int, str]:
        """For the feasibility estimates (sslbench/protocol/feasibility.py): (voxels, or pixels in 2D, that one
        fine-tuning step feeds the model; the model family they cost: ``segmentation`` for an encoder and decoder,
        ``encoder`` for an encoder and a head)."""
        raise NotImplementedError

    @classmethod
    def refuse_init(cls, task: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None, source: str) -> None:
        """Raise a one-line CheckpointError where a backbone (``state``; None: a pre-training that has not run
        yet, by ``source``) cannot initialise the kind's model; nothing by default."""

    @classmethod
    def print_results(cls, metrics: Mapping[str, Any], console) -> None:
        """The terminal table of a finished run's metrics (``sslbench run / finetune / evaluate``)."""
        raise NotImplementedError

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


def check_volumes(run_cfg: Mapping[str, Any], recipe: Mapping[str, Any], items: list[dict], force: bool) -> None:
    """The checks of NIfTI / DICOM volumes before a run reads them (a segmentation task's cases, a corpus's volumes).

    The header checks of ``sslbench data check`` (:func:`sslbench.data.check.check_case_headers`) refuse a missing,
    truncated or non-NIfTI file, a DICOM folder without a usable series, an image and label whose shapes or affines
    differ, with one line naming the file. Voxel checks (NaN / infinite intensities, label values outside the
    task's classes) run as each case is loaded (:class:`sslbench.data.check.LoadChecked`); with ``force`` they run
    here too, on every case not in the case cache (a cached case passed them), so a refused ``--force`` keeps the
    old folder."""
    from ..data.cases import case_cache
    from ..data.check import check_case_headers

    check_case_headers(items, recipe)
    if force:
        from ..data.check import LoadChecked
        from ..data.layouts.ct import DicomSeriesReader, SimpleITKReader

        keys = ["image", "label"] if items and items[0].get("label") else ["image"]
        cache, _ = case_cache(run_cfg, recipe, with_label="label" in keys)
        load = LoadChecked(recipe, keys, readers=(SimpleITKReader(), DicomSeriesReader()))
        for it in items:
            if cache is None or cache.get(it) is None:
                load({k: it[k] for k in keys})


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
