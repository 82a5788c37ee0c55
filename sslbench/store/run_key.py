"""A run's identity, computed here only: protocol hash -> run key -> run folder.

The protocol (``sslbench.protocol.plan_run``), the sweep and the report all name a run through these three
functions, so a run folder found on disk and a run about to start agree on what they are:

* :func:`protocol_hash`: what a run computes, the seed-free hash of its resolved recipe view
  (``recipes.protocol_hash``), with the number of processes where there are several. Recorded as ``protocol``
  in status.json and metrics.json; the report compares runs by it.
* :func:`run_key`: what a run computes *on which data*: the protocol hash, the data fingerprint
  (sslbench/data/fingerprint.py) and the run key of the pre-training a fine-tuning starts from. Recorded as
  ``run_key``; it names the folder.
* :func:`run_dir`: where that run lives below ``run.out``.

A record carries one protocol hash. Reading records back, the report recomputes it from each folder's recipe.yaml
(:func:`seed_free_protocols`: for a record of today exactly the recorded ``protocol``, a test checks it on real
runs; records of older versions, whose ``init.hash`` held the pre-training's seed, join today's protocol), with
the λ-free series beside it, and :func:`finetune_protocols` (what the fine-tuning alone did, for
label-efficiency curves).
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .. import recipes

if TYPE_CHECKING:      # distributed imports torch; the store is read without it (the report)
    from ..distributed import Dist


def protocol_hash(cfg: Mapping[str, Any], dist: "Dist | None" = None) -> str:
    """The protocol hash of a run: the recipe's, plus the number of processes when there are several.

    Under torchrun every process draws its own batch, so N processes train with an N times larger global batch:
    another protocol, which must never be mixed with (or reused as) the single-process one.
    """
    if dist is None:
        from .. import distributed

        dist = distributed.current()
    if dist.world_size > 1:
        return recipes.protocol_hash({**cfg, "world_size": dist.world_size})
    return recipes.protocol_hash(cfg)


def run_key(protocol: str, data: Mapping[str, Any], pretrain_key: str | None = None) -> str:
    """The run key: a short SHA-256 of the protocol hash, the data fingerprint (sslbench/data/fingerprint.py)
    and, for a fine-tuning from a pre-training, that pre-training's run key. Runs of one protocol on other data
    (another copy, changed files) get other keys, so other folders; ``protocol`` alone still names the
    protocol (status.json, metrics.json), which the report compares."""
    text = json.dumps({"protocol": protocol, "data": data["fingerprint"], "pretrain": pretrain_key}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_dir(cfg: Mapping[str, Any], stage: str, key: str) -> Path:
    """``<out>/pretrain/<method>/<corpus>/<run key>-s<seed>`` or ``<out>/finetune/<task>/<label>/<run key>-s<seed>``."""
    out = Path(cfg["run"]["out"])
    seed = cfg["run"]["seed"]
    if stage == "pretrain":
        return out / "pretrain" / cfg["method"]["name"] / cfg["corpus"]["name"] / f"{key}-s{seed}"
    return out / "finetune" / cfg["task"]["name"] / cfg["run"].get("label", cfg["method"]["name"]) / f"{key}-s{seed}"


def seed_free_protocols(cfg: Mapping[str, Any], pretrain_cfg: Mapping[str, Any] | None = None, *,
                        world_size: int = 1, pretrain_world_size: int = 1) -> tuple[str, str]:
    """(protocol, series) of a recorded fine-tuning, recomputed from its recipe.yaml: its seed-free protocol hash
    and the same without ``method.params.lambda`` (what a λ curve joins).

    For a record of today the protocol is the one it recorded (``metrics.json: protocol``, :func:`protocol_hash`):
    the ``data`` section (where the data lives, not what ran) is left out, the number of processes is hashed when
    there were several (``world_size`` of the fine-tuning, ``pretrain_world_size`` of its pre-training), and
    ``init.hash`` is the protocol hash of the pre-training it started from, recomputed from ``pretrain_cfg``
    (that pre-training's recipe.yaml) without its seed, so records of older versions, whose ``init.hash`` held
    the seed, join the same protocol as today's."""
    c = {k: v for k, v in cfg.items() if k != "data"}
    pre = {k: v for k, v in pretrain_cfg.items() if k != "data"} if pretrain_cfg is not None else None
    if world_size > 1:
        c["world_size"] = world_size
    if pre is not None and pretrain_world_size > 1:
        pre["world_size"] = pretrain_world_size
    keys = []
    for extra in ((), ("method.params.lambda",)):
        exclude = ("run.seed",) + extra
        cc = copy.deepcopy(c)
        if pre is not None:
            cc["init"] = dict(cc["init"], hash=recipes.protocol_hash(pre, exclude=exclude))
        keys.append(recipes.protocol_hash(cc, exclude=exclude))
    return keys[0], keys[1]


def finetune_protocols(cfg: Mapping[str, Any]) -> tuple[str, str]:
    """(finetune_protocol, finetune_family): seed-free hashes of what a fine-tuning itself did (its task, model
    and run sections; not the method, not the initialisation, not ``run.label``, which names the method);
    ``finetune_family`` also leaves out ``task.finetune.labeled_cases`` (what a label-efficiency curve joins)."""
    part = {k: copy.deepcopy(cfg.get(k)) for k in ("task", "model", "run")}
    same = ("run.seed", "run.label")
    return (recipes.protocol_hash(part, exclude=same),
            recipes.protocol_hash(part, exclude=same + ("task.finetune.labeled_cases",)))
