"""Planning before any work: which runs a command would do (their keys, cases, and whether they are finished),
the pre-flight checks of roots, readers, loaders and feasibility (one line, nothing written when refused), and
``--dry-run``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import distributed, recipes, tasks
from ..data.loaded import labeled_subset
from ..data.locate import locate_data, PhantomNotWritten, PLAN_ONLY as _PLAN_ONLY
from ..errors import DataError, RecipeError
from ..store.records import RunRecord
from ..store.run_key import protocol_hash, run_dir, run_key
from . import track2d


@dataclass
class PlannedRun:
    """Where a run goes and why: its folder, protocol hash, run key, data identity (data.json), the located
    root, whether it reads phantoms, and the items it reads (pre-training: the corpus volumes)."""

    stage: str
    path: Path
    protocol: str
    run_key: str
    data: dict
    root: Path
    phantom: bool
    items: list = field(default_factory=list)


def _stage_items(cfg: Mapping[str, Any], stage: str, root, log) -> tuple[Path, bool, list]:
    """(root, phantom, items read) of a run's data: the corpus volumes of a pre-training, the train and val
    cases of a fine-tuning (only located and listed here; nothing is preprocessed)."""
    if stage == "pretrain" and track2d.is_2d(cfg.get("corpus")):   # the 2D track: the task's pretrain split
        return track2d.pretrain_items(cfg["corpus"], *locate_data(cfg["corpus"], root, log=log))
    if stage == "pretrain":
        from ..data.corpus import corpus_items, labelled_items
        from ..methods import get_method_class

        cls = get_method_class(cfg["method"]["name"])
        read = labelled_items if getattr(cls, "needs_labels", False) else corpus_items
        where, phantom, items = read(cfg["corpus"], None if root is None else str(root), log=log)
        return Path(where), phantom or bool(cfg["corpus"].get("phantom")), items
    from ..data import layouts

    root_path, phantom = locate_data(cfg["task"], root, log=log)
    splits = layouts.load_datalist(cfg["task"], root_path).splits
    return Path(root_path), phantom, [*splits.get("train", []), *splits.get("val", [])]


def plan_run(cfg: Mapping[str, Any], stage: str, root: str | Path | None = None, log: Callable[[str], None] = print,
             pretrain_key: str | None = None, dist: "distributed.Dist | None" = None) -> PlannedRun:
    """The one computation of a run's identity (used by the protocol, the sweep and, through the records, the
    report): locate and list the data (a phantom task synthesises its tree), fingerprint it, and name the folder.

    ``cfg`` is a pre-training ('pretrain') or fine-tuning ('finetune') view of a resolved recipe, as the
    protocol runs it (a fine-tuning's ``init`` set); ``pretrain_key`` the run key of the pre-training a
    fine-tuning starts from."""
    from ..data.fingerprint import fingerprint

    root_path, phantom, items = _stage_items(cfg, stage, root, log)
    data = fingerprint(root_path, items)
    protocol = protocol_hash(cfg, dist)
    key = run_key(protocol, data, pretrain_key)
    return PlannedRun(stage, run_dir(cfg, stage, key), protocol, key, data, root_path, phantom, items)


def planned_runs(cfg: Mapping[str, Any], root: str | Path | None = None, corpus_root: str | Path | None = None,
                 log: Callable[[str], None] = print) -> tuple[PlannedRun | None, PlannedRun, dict]:
    """(pre-training plan or None, fine-tuning plan, the fine-tuning config) that :func:`run_protocol` will use
    for a resolved recipe ``cfg``."""
    fcfg = finetune_view(cfg)
    pre = None
    corpus_root = track2d.corpus_root(cfg, root, corpus_root)
    if cfg["method"].get("pretrain") is not None:
        pre = plan_run(recipes.split_config(cfg, "corpus"), "pretrain", corpus_root, log)
    return pre, plan_run(fcfg, "finetune", root, log, pretrain_key=pre.run_key if pre else None), fcfg


def _listed(cfg: Mapping[str, Any], stage: str, root) -> tuple[list | None, bool, Path | None]:
    """(items, phantom, root) of a stage's data, located and listed without writing anything (items None: a
    phantom tree not written yet). A real dataset without its root raises the one-line DataError here."""
    token = _PLAN_ONLY.set(True)
    try:
        where, phantom, items = _stage_items(cfg, stage, root, log=lambda *a, **k: None)
        return items, phantom, where
    except PhantomNotWritten:
        return None, True, None
    finally:
        _PLAN_ONLY.reset(token)


def _estimates(cfg: Mapping[str, Any], root, corpus_root, machine) -> tuple[list, dict]:
    from . import feasibility

    ests, seen = [], {}
    if "corpus" in cfg and cfg["method"].get("pretrain") is not None:
        pcfg = cfg if "task" not in cfg else recipes.split_config(cfg, "corpus")
        try:
            items, phantom, where = _listed(pcfg, "pretrain", corpus_root)
        except DataError as exc:
            if pcfg["corpus"].get("phantom"):
                raise
            raise DataError(f"{exc}; a real task pre-trains on the paper's corpus ('{pcfg['corpus']['name']}'); "
                            f"--corpus phantom-corpus pre-trains on phantoms (the run is then PHANTOM)") from None
        seen["pretrain"] = (items, phantom, where)
        ests.append(feasibility.estimate_pretrain(pcfg, machine, None if items is None else len(items)))
        from ..methods import get_method_class

        labelled = bool(getattr(get_method_class(pcfg["method"]["name"]), "needs_labels", False))
        volumes = int((pcfg["corpus"].get("data") or {}).get("phantom_total")
                      or (pcfg["corpus"].get("data") or {}).get("phantom_cases") or 0)
        voxels, _, write, notes = feasibility.case_sizes(pcfg["corpus"], items, pcfg["run"], labelled, volumes)
        ests.append(feasibility.estimate_preprocessing(pcfg["corpus"], machine, voxels, write, notes=notes))
    if "task" in cfg:
        fcfg = cfg if "corpus" not in cfg else recipes.split_config(cfg, "task")
        items, phantom, where = _listed(fcfg, "finetune", root)
        seen["finetune"] = (items, phantom, where)
        task = fcfg["task"]
        train = task["data"].get("phantom_cases") if items is None else None   # a phantom not written yet
        train_items, val_items = None, None
        if items is not None:
            from ..data import layouts

            splits = layouts.load_datalist(task, where).splits
            train_items = labeled_subset(splits.get("train", []), task["finetune"].get("labeled_cases"))
            val_items, train = splits.get("val", []), len(train_items)
        est = feasibility.estimate_finetune(fcfg, machine, train)
        ests.append(est)
        if not tasks.kind_of(task).volumes:
            return ests, seen   # e.g. images and labels: no sliding window, no case cache to size
        # a phantom not written yet: its validation cases are data.val_last (else about a fifth) of its cases
        n = int(task["data"].get("phantom_cases") or 0)
        n_val = int(task["data"].get("val_last") or max(1, n // 5)) if items is None else 0
        _, val_shapes, _, vnotes = feasibility.case_sizes(task, val_items, fcfg["run"], True, n_val)
        ests.append(feasibility.estimate_validation(fcfg, machine, val_shapes, est.steps, notes=vnotes))
        everything = None if items is None else [*train_items, *val_items]
        voxels, shapes, write, notes = feasibility.case_sizes(task, everything, fcfg["run"], True, n)
        ests.append(feasibility.estimate_preprocessing(task, machine, voxels, write, held=shapes, notes=notes))
    return ests, seen


def check_loader(cfg: Mapping[str, Any], cls) -> None:
    """One-line errors for ``method.pretrain.loader`` / ``native_crops`` settings that cannot run (before any run
    folder exists); ``cls`` None skips the check of the method's corpus-level set-up."""
    from ..methods.base import PretrainMethod

    pt = cfg["method"].get("pretrain") or {}
    where = (cfg.get("recipe_files") or {}).get("method") or cfg["method"]["name"]
    if pt.get("loader", "memory") != "stream":
        if pt.get("native_crops"):
            raise RecipeError(f"{where}: key 'pretrain.native_crops': true needs pretrain.loader stream (the memory "
                              f"loader keeps whole resized volumes); expected --set method.pretrain.loader=stream")
        return
    if cls is not None and cls.prepare is not PretrainMethod.prepare and not getattr(cls, "streams_prepare", False):
        raise RecipeError(f"{where}: key 'pretrain.loader': stream, but method '{cfg['method']['name']}' sets itself up "
                          f"on the whole corpus in memory (prepare); expected loader memory")
    if cls is not None and getattr(cls, "streams_prepare", False) and pt.get("native_crops"):
        raise RecipeError(f"{where}: key 'pretrain.native_crops': true, but method '{cfg['method']['name']}' discovers "
                          f"its set-up on whole resized volumes and trains on that grid; expected native_crops false")
    if str(cfg["run"].get("cache", "read")) == "none":
        raise RecipeError("run.cache: none, but method.pretrain.loader=stream reads the corpus from the case cache; "
                          "expected read or write")


def method_class(cfg: Mapping[str, Any]) -> tuple[type, dict, bool, bool]:
    """(method class, its parameters, whether it pre-trains on label maps, whether it is the 2D track), with one
    line for a method or corpus that cannot pre-train."""
    from ..methods import get_method_class

    method_cfg, corpus = cfg["method"], cfg["corpus"]
    if method_cfg.get("pretrain") is None:
        raise RecipeError(f"method '{method_cfg['name']}' has no pre-training (its recipe's 'pretrain' is null)")
    two_d = track2d.is_2d(corpus)   # the 2D track (sslbench/protocol/track2d.py): images of a 2D task
    if two_d:
        track2d.check(cfg)
    cls = track2d.method_class(cfg) if two_d else get_method_class(method_cfg["name"])
    if cls is None or method_cfg["status"] != "available":
        raise RecipeError(f"method '{method_cfg['name']}' is {method_cfg['status']}: its pre-training is not implemented yet")
    # a method that pre-trains on label maps (the supervised controls) reads a segmentation task as its corpus
    needs_labels = bool(getattr(cls, "needs_labels", False))
    kind = tasks.kind_if_any(corpus)
    if needs_labels and (kind is None or not kind.label_maps or len(corpus.get("classes") or []) < 2):
        where = (cfg.get("recipe_files") or {}).get("corpus") or corpus["name"]
        raise RecipeError(f"{where}: method '{method_cfg['name']}' pre-trains on label "
                          f"maps; corpus '{corpus['name']}' is a {corpus.get('kind')} recipe without classes; expected "
                          f"a segmentation task (e.g. --corpus phantom-btcv)")
    params = dict(method_cfg.get("params") or {})
    if needs_labels:   # the method knows no task: its class count is the labelled corpus's
        params["num_classes"] = len(corpus["classes"])
    check_loader(cfg, cls)
    return cls, params, needs_labels, two_d


def check_method_params(cfg: Mapping[str, Any]) -> None:
    """The pre-training method's params checked against its typed ``Params`` (an unknown key, a wrong type, a value
    not allowed: one line naming the recipe file), then its constructor's own checks (a crop the backbone cannot
    take, ...), before any work: the method is built
    once on the CPU and dropped, under a forked random state, so that the run draws what it would have drawn
    without this check. Nothing for a run without pre-training."""
    import torch

    if "corpus" not in cfg or cfg["method"].get("pretrain") is None:
        return
    cls, params, _, two_d = method_class(cfg)
    # the typed params (sslbench/methods/params.py): one line naming the recipe file
    where = Path((cfg.get("recipe_files") or {}).get("method") or f"methods/{cfg['method']['name']}.yaml")
    cls.Params.build(params, cls.name, f"{where.parent.name}/{where.name}{' (2D form)' if two_d else ''}")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        cls(params, cfg["model"])


def preflight(cfg: Mapping[str, Any], root=None, corpus_root=None, say: Callable[[str], None] = print,
              gpus: int | None = None) -> list:
    """Check everything before any work starts (issue 20), writing nothing: the fine-tuning task's root (a real
    task without --root or $SSLBENCH_ROOT_<NAME>: one line naming the dataset, its layout and the phantom
    twin), then the corpus's roots (one line naming the corpus), the optional readers its files need
    (SimpleITK for .mhd, pydicom for DICOM), and the feasibility of the plan (memory and time estimates,
    refused with the way out unless ``run.feasibility`` says otherwise); the pre-training method's own parameter
    checks (its constructor, run once on the CPU). ``cfg``: a resolved recipe or one
    stage's view of it. Returns the stage estimates."""
    from . import feasibility

    fcfg = recipes.split_config(cfg, "task") if "task" in cfg and "corpus" in cfg else cfg
    if "task" in cfg:   # the fine-tuning data first: its missing root is the first thing to say
        check_finetune_loader(fcfg)   # refused before any pre-training runs for a loader the task cannot use
        tasks.kind_of(fcfg["task"]).check(fcfg)   # and for a fine-tuning the task's kind cannot run
        _listed(fcfg, "finetune", root)
    check_method_params(cfg)   # the method's own parameter checks, before any data is written
    machine = feasibility.machine(cfg["run"], gpus)
    ests, seen = _estimates(cfg, root, corpus_root, machine)
    missing = feasibility.missing_readers([it for items, phantom, _ in seen.values() if items and not phantom
                                           for it in items])
    if missing:
        raise DataError(missing)
    feasibility.check(ests, machine, cfg["run"], say=say)
    return ests


def dry_run(cfg: Mapping[str, Any], root=None, corpus_root=None, say: Callable[[str], None] = print,
            init: Mapping[str, Any] | None = None, gpus: int | None = None) -> int:
    """``--dry-run``: the plan (stages, the recipes' key settings, corpus, phantom or not, run folders and
    keys) and its estimates, printed; nothing is written (a phantom tree not written yet leaves its run keys
    open). Root, reader and method-parameter errors raise as in a run; an infeasible plan is printed, not raised."""
    from . import feasibility

    fcfg = recipes.split_config(cfg, "task") if "task" in cfg and "corpus" in cfg else cfg
    if "task" in cfg:
        _listed(fcfg, "finetune", root)
    check_method_params(cfg)
    machine = feasibility.machine(cfg["run"], gpus)
    corpus_root = track2d.corpus_root(cfg, root, corpus_root)   # 2D: the task's pretrain split, from its --root
    ests, seen = _estimates(cfg, root, corpus_root, machine)
    run, model = cfg["run"], cfg["model"]
    say(f"plan (dry run, nothing written): preset {run['preset']}, seed {run['seed']}, model {model['name']} "
        f"feature size {model.get('feature_size')}, device {machine.device}"
        f"{f' x {machine.gpus}' if machine.gpus > 1 else ''}, out {run['out']}")
    pre_key = (init or {}).get("run_key")
    token = _PLAN_ONLY.set(True)
    try:
        for e in ests:
            if e.stage not in seen:   # validation / pre-processing: under the stage they belong to
                say(f"    estimate: {e.line()}" + "".join(f"; {n}" for n in e.notes))
                continue
            items, phantom, where = seen[e.stage]
            view = _describe_stage(cfg, fcfg, e.stage, items, phantom, init, say)
            if items is None or (e.stage == "finetune" and "pretrain" in seen and pre_key is None):
                say("    run folder: decided once the phantom data is written (run key = protocol + data"
                    " fingerprint)")
            else:
                plan = plan_run(view, e.stage, root if e.stage == "finetune" else corpus_root,
                                log=lambda *a, **k: None, pretrain_key=pre_key if e.stage == "finetune" else None)
                if e.stage == "pretrain":
                    pre_key = plan.run_key
                state = (RunRecord(plan.path).status or {}).get("state") if plan.path.is_dir() else None
                say(f"    run folder: {plan.path} (run key {plan.run_key}, protocol {plan.protocol}"
                    f"{f', {state} there' if state else ''}); data {where}")
            say(f"    estimate: {e.line()}" + "".join(f"; {n}" for n in e.notes))
    finally:
        _PLAN_ONLY.reset(token)
    found = feasibility.problems(ests, machine, run)
    if found and run.get("feasibility", "check") != "off":
        say(f"would be refused: {'; '.join(found)}; way out: {feasibility.way_out(run, machine)}")
    else:
        say("feasible on this machine (estimates: sslbench/protocol/feasibility.py)")
    return 0


def _describe_stage(cfg: Mapping[str, Any], fcfg: Mapping[str, Any], stage: str, items, phantom: bool,
                    init: Mapping[str, Any] | None, say: Callable[[str], None]) -> Mapping[str, Any]:
    """``--dry-run``'s line of one stage (its recipe's key settings); returns the config the stage is hashed
    with."""
    run = cfg["run"]
    if stage == "pretrain":
        pt = cfg["method"]["pretrain"]
        say(f"  pretrain: method {cfg['method']['name']} on corpus {cfg['corpus']['name']}"
            f"{' (PHANTOM)' if phantom or cfg['corpus'].get('phantom') else ''}: {pt['steps']} steps, batch "
            f"{pt['batch_size']}, lr {pt['lr']}, {'?' if items is None else len(items)} volumes")
        return cfg if "task" not in cfg else recipes.split_config(cfg, "corpus")
    ft, task = cfg["task"]["finetune"], cfg["task"]
    say(f"  finetune: {run.get('label', cfg['method']['name'])} on task {task['name']}"
        f"{' (PHANTOM)' if phantom or task.get('phantom') else ''}: "
        + (f"{ft['max_steps']} steps" if ft.get("max_steps") else f"{ft['epochs']} epochs")
        + f", roi {ft.get('roi')}, batch {ft.get('batch_size')} x {ft.get('num_samples', 1)} crops, "
          f"lr {ft.get('lr')}")
    # hashed as open_finetune hashes it: with its init (None: from scratch)
    return finetune_view(cfg) if "corpus" in cfg else {
        **fcfg, "init": {k: v for k, v in (init or {}).items() if k in ("source", "hash", "method")} or None}


def finetune_view(cfg: Mapping[str, Any]) -> dict:
    """The fine-tuning config :func:`run_protocol` hashes for a resolved recipe: its ``init`` names the
    pre-training's protocol hash, with the number of processes where there are several (or None for a method
    without one)."""
    fcfg = recipes.split_config(cfg, "task")
    fcfg["init"] = None
    if cfg["method"].get("pretrain") is not None:
        fcfg["init"] = {"source": "pretrain", "hash": protocol_hash(recipes.split_config(cfg, "corpus")),
                        "method": cfg["method"]["name"]}
    return fcfg


def check_finetune_loader(cfg: Mapping[str, Any]) -> None:
    """One-line errors for a ``task.finetune.loader`` that cannot run (before any run folder exists)."""
    task = cfg["task"]
    if (task.get("finetune") or {}).get("loader", "memory") != "stream":
        return
    where = (cfg.get("recipe_files") or {}).get("task") or task["name"]
    if "stream" not in tasks.kind_of(task).loaders:
        raise RecipeError(f"{where}: key 'finetune.loader': stream, but task '{task['name']}' is a {task['kind']} "
                          f"task (the stream cuts RandCropByPosNegLabel crops of segmentation cases); expected "
                          f"loader memory")
    if str(cfg["run"].get("cache", "read")) == "none":
        raise RecipeError("run.cache: none, but task.finetune.loader=stream reads the cases from the case cache; "
                          "expected read or write")


def refuse_pretraining_for_2d(cfg: Mapping[str, Any]) -> None:
    """Called before a pre-training starts for a 2D task: the corpus must be 2D images (the task's pretrain split)
    and the method needs a 2D form on the 2D U-Net (sslbench/protocol/track2d.py); one line otherwise, nothing written."""
    task = cfg.get("task") or {}
    kind = tasks.kind_if_any(task)
    if kind is None or not kind.two_d or cfg["method"].get("pretrain") is None:
        return
    if not track2d.is_2d(cfg.get("corpus")):
        kind.refuse_init(task, None, f"method '{cfg['method']['name']}'")
    track2d.method_class(cfg)
    track2d.check(cfg)
