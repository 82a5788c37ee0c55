"""``sslbench evaluate RUN``: a finished fine-tuning run scored again, by its task kind (sslbench/tasks/)."""
from __future__ import annotations

from pathlib import Path

from .. import distributed, tasks
from ..data.locate import locate_data
from ..errors import RecipeError, RunError
from ..store.records import atomic_write_json, load_state, RunRecord
from .runtime import make_progress, Runtime, select_device, use_bf16


def _run_settings(record: RunRecord, run_cfg: dict, kind_cls, task_kind: str, precision: str | None,
                  attention: str | None) -> dict:
    """The run's ``run`` settings with this evaluation's --precision / --attention overrides (checked)."""
    if precision is None and attention is None:
        return run_cfg
    if not kind_cls.overrides_runtime:
        raise RecipeError(f"{record.path}: --precision/--attention overrides apply to segmentation runs; "
                          f"this is a {task_kind} run")
    if precision is not None:
        if precision not in ("bf16", "fp32"):
            raise RecipeError(f"--precision: {precision!r}; expected bf16 or fp32")
        run_cfg = {**run_cfg, "precision": precision}
    if attention is not None:
        from ..speed import ATTENTIONS

        if attention not in ATTENTIONS:
            raise RecipeError(f"--attention: {attention!r}; expected one of {', '.join(ATTENTIONS)}")
        run_cfg = {**run_cfg, "attention": attention}
    return run_cfg


def reevaluate(run_dir: str | Path, checkpoint: str | None = None, root: str | Path | None = None,
               console=None, precision: str | None = None, attention: str | None = None) -> dict:
    """Evaluate a finished fine-tuning run again (e.g. with another checkpoint); writes evaluation.json.

    ``precision`` (bf16 | fp32) and ``attention`` (fused | sdpa | monai) override the run's own settings for
    this evaluation only (segmentation runs), to check that fast inference gives the reference's Dice; the result
    then goes to evaluation-<precision>-<attention>.json (never over the run's evaluation.json) and records both."""
    record = RunRecord(run_dir)
    if not (record.path / "recipe.yaml").is_file():
        raise RunError(f"{record.path}: not a run folder (no recipe.yaml)")
    cfg = record.read_recipe()
    task = cfg["task"]
    kind_cls = tasks.kind_of(task)
    run_cfg = _run_settings(record, dict(cfg["run"]), kind_cls, task["kind"], precision, attention)
    device = select_device(run_cfg)
    rt = Runtime(device, use_bf16(run_cfg, device), distributed.SINGLE, run_cfg)
    kind = kind_cls({**cfg, "run": run_cfg}, rt, print)
    root_path, phantom = locate_data(task, root or (cfg.get("data") or {}).get("root"))
    ckpt = Path(checkpoint) if checkpoint else next((p for p in (record.ckpt_dir / "best.pt", record.ckpt_dir / "last.pt")
                                                     if p.is_file()), None)
    if ckpt is None or not ckpt.is_file():
        raise RunError(f"{record.path}/checkpoints: no best.pt or last.pt to evaluate")
    model = kind.build_model()
    rt.use_attention(model)
    model.load_state_dict(load_state(ckpt)["model"])
    model.to(device)
    progress = make_progress(console)
    with progress:
        kind.load_validation(root_path, progress)
        result = kind.evaluate(model, progress)
    overridden = precision is not None or attention is not None
    settings = {"precision": "bf16" if rt.bf16 else "fp32", "attention": str(run_cfg.get("attention", "fused")),
                "device": str(device)}
    out = {"checkpoint": str(ckpt), "phantom": phantom or bool(task.get("phantom")),
           **(settings if kind.overrides_runtime else {}), **kind.evaluation(result)}
    name = f"evaluation-{settings['precision']}-{settings['attention']}.json" if overridden else "evaluation.json"
    if kind.overrides_runtime:
        out["written"] = str(record.path / name)
    atomic_write_json(record.path / name, out)
    return out
