"""The whole protocol for one (method, task, seed): pretrain (if the method has one) -> finetune -> evaluate."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import recipes, tasks
from ..store.run_key import protocol_hash
from . import track2d
from .finetuning import finetune
from .plan import preflight, refuse_pretraining_for_2d
from .pretraining import pretrain
from .runs import Outcome


def run_protocol(method: str, task: str, *, preset: str | None = None, overrides=(), seed: int | None = None,
                 root: str | Path | None = None, corpus: str | None = None, corpus_root: str | Path | None = None,
                 out: str | None = None, resume: bool = False, force: bool = False, console=None,
                 on_validation: Callable[[int, float], None] | None = None) -> Outcome:
    """pretrain (if the method has one; an identical finished pre-training is reused) -> finetune -> evaluate.

    This is what ``sslbench run`` does and what every sweep trial calls.
    """
    cfg = recipes.resolve(method, task, preset=preset, overrides=overrides, seed=seed, corpus=corpus)
    if out:
        cfg["run"]["out"] = out
    corpus_root = track2d.corpus_root(cfg, root, corpus_root)   # 2D: the task's pretrain split, from its --root
    # roots, readers and feasibility of both stages before any work starts (nothing written if refused)
    preflight(cfg, root, corpus_root, say=(console.print if console is not None else print))
    init = None
    if tasks.kind_of(cfg["task"]).two_d:
        refuse_pretraining_for_2d(cfg)   # a 3D corpus, or a method without a 2D form
    if cfg["method"].get("pretrain") is not None:
        pcfg = recipes.split_config(cfg, "corpus")
        pre = pretrain(pcfg, root=corpus_root, resume=resume, force=False, console=console)
        init = {"path": str(pre.record.ckpt_dir / "backbone.pt"), "source": "pretrain",
                "pretrain_run": str(pre.record.path), "hash": protocol_hash(pcfg), "run_key": pre.record.run_key,
                "method": cfg["method"]["name"], "include_decoder": bool(pre.metrics.get("transfers_decoder", False)),
                "phantom": bool(pre.metrics.get("phantom")), "corpus": cfg["corpus"]["name"]}
    return finetune(recipes.split_config(cfg, "task"), root=root, init=init, resume=resume, force=force,
                    console=console, on_validation=on_validation)
