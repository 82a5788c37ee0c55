"""The ``sslbench`` command line (also ``python -m sslbench``).

Every user error (unknown method/task/key, bad data, wrong checkpoint) is printed as one line naming the
file or key and what was expected, with exit status 2; never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .errors import RecipeError, sigterm_as_interrupt, SSLBenchError, stop_exit, Terminated, terminating

DEFAULT_METHOD = "scratch"
DEFAULT_TASK = "phantom-mmwhs"

EXAMPLES = {
    "run": "sslbench run --method scratch --task phantom-btcv\n  sslbench run --method voco --task mmwhs --root /data/MM-WHS --preset paper\n  sslbench run --task phantom-mmwhs --seed 1 --set task.finetune.max_steps=200",
    "pretrain": "sslbench pretrain --method voco\n  sslbench pretrain --method voco --corpus phantom-corpus --set method.params.lambda=0.5",
    "finetune": "sslbench finetune --task phantom-btcv --init runs/pretrain/voco/phantom-corpus/<hash>-s0/checkpoints/backbone.pt\n  sslbench finetune --task btcv --root /data/BTCV --init model_swinvit.pt --method swinunetr-ssl",
    "evaluate": "sslbench evaluate runs/finetune/phantom-btcv/scratch/<hash>-s0\n  sslbench evaluate RUN_DIR --checkpoint RUN_DIR/checkpoints/last.pt\n  sslbench evaluate RUN_DIR --precision fp32 --attention monai   # the reference, beside the run's own Dice",
    "predict": "sslbench predict runs/finetune/btcv/voco/<hash>-s0 --root /data/BTCV --split test\n  sslbench predict RUN_DIR --split val --out /tmp/val-predictions",
    "submit": "sslbench submit runs/finetune/amos22/voco/<hash>-s0 --leaderboard amos22 --split val",
    "sweep": "sslbench sweep lambda --task phantom-mmwhs --values 0.5 1.0 1.5",
    "report": "sslbench report --format md --out leaderboards/rendered",
    "data": "sslbench data synth --like btcv --out /tmp/btcv-phantom --cases 8\n  sslbench data check --task btcv --root /tmp/btcv-phantom",
    "list": "sslbench list methods\n  sslbench list tasks",
    "bench": "sslbench bench pretrain --method voco --variant paper --steps 10",
}


def _console():
    import os

    from rich.console import Console

    if int(os.environ.get("RANK", "0") or 0) > 0:   # torchrun: only rank 0 talks
        return Console(file=open(os.devnull, "w"), highlight=False)
    return Console(stderr=False, highlight=False)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="sslbench", formatter_class=fmt,
                                description="One pretrain -> finetune -> evaluate protocol for VoCo and its "
                                            "self-supervised baselines on 3D medical imaging tasks.",
                                epilog="examples:\n  sslbench run                      # the demo: VoCo against scratch on phantom MM-WHS (CPU, minutes)\n"
                                       "  sslbench list tasks\n  sslbench <command> --help")
    sub = p.add_subparsers(dest="command", metavar="command")

    def add(name: str, help_: str, description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=description or help_, formatter_class=fmt,
                              epilog=epilog or "example:\n  " + EXAMPLES[name])

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--preset", choices=("paper", "tiny"), help="settings profile (default: the task's; phantoms: tiny)")
        sp.add_argument("--seed", type=int, help="run seed (default 0)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any key of the resolved recipe, e.g. task.finetune.lr=1e-3 (repeatable)")
        sp.add_argument("--resume", action="store_true", help="continue an unfinished run from its last checkpoint")
        sp.add_argument("--force", action="store_true", help="replace an existing run folder")
        sp.add_argument("--out", help="folder for run records (default: runs/)")
        sp.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="run on N local processes under torchrun (DistributedDataParallel; one per GPU)")
        sp.add_argument("--dry-run", action="store_true",
                        help="print the plan (stages, settings, run folders, corpus, phantom or not) and its memory / "
                             "time estimates, write nothing")
        sp.add_argument("--no-feasibility-check", action="store_true",
                        help="run a plan the estimates say cannot fit (a warning instead; = --set run.feasibility=warn)")

    sp = add("run", "Pre-train (if the method has a pre-training; reused when an identical one finished), fine-tune and evaluate.")
    sp.add_argument("--method", help=f"method recipe name (default {DEFAULT_METHOD}; neither --method nor --task: "
                                     f"the demo, VoCo against scratch on {DEFAULT_TASK})")
    sp.add_argument("--task", help=f"task recipe name (default {DEFAULT_TASK})")
    sp.add_argument("--root", help="dataset root of the task (phantom tasks synthesise their own)")
    sp.add_argument("--corpus", help="pre-training corpus recipe (default: the method's)")
    sp.add_argument("--corpus-root", help="dataset root of the corpus; a corpus of several sources (voco-corpus): NAME=PATH,NAME=PATH")
    common(sp)

    sp = add("pretrain", "Pre-train a method's backbone on a corpus and write its checkpoint.")
    sp.add_argument("--method", required=True)
    sp.add_argument("--corpus", help="corpus recipe (default: the method's, phantom-corpus)")
    sp.add_argument("--corpus-root", "--root", dest="corpus_root",
                    help="dataset root of the corpus; a corpus of several sources (voco-corpus): NAME=PATH,NAME=PATH")
    common(sp)

    sp = add("finetune", "Fine-tune and evaluate a task from random init or from a checkpoint (--init).")
    sp.add_argument("--task", default=DEFAULT_TASK)
    sp.add_argument("--root", help="dataset root of the task")
    sp.add_argument("--init", help="backbone checkpoint (sslbench, official VoCo or SwinUNETR layouts)")
    sp.add_argument("--method", help="method label for the record (default: 'scratch' without --init, 'external' with it)")
    common(sp)

    sp = add("evaluate", "Evaluate a finished fine-tuning run again (sliding-window Dice per case).")
    sp.add_argument("run_dir", help="a run folder under runs/finetune/")
    sp.add_argument("--checkpoint", help="checkpoint to evaluate (default: best.pt, else last.pt)")
    sp.add_argument("--root", help="dataset root (default: the one recorded)")
    sp.add_argument("--precision", choices=["bf16", "fp32"],
                    help="override the run's precision for this evaluation (writes evaluation-<prec>-<attn>.json)")
    sp.add_argument("--attention", choices=["fused", "sdpa", "monai"],
                    help="override the run's window attention for this evaluation (same file naming)")
    sp.add_argument("--space", choices=("preprocessed", "original"), default="preprocessed",
                    help="original: predict the validation images in their original geometry (sslbench predict) and "
                         "score them against the original label files (writes evaluation-original.json)")

    sp = add("predict", "Write a fine-tuning run's predictions of a split as NIfTI in the original image geometry and label values.")
    sp.add_argument("run_dir", help="a run folder under runs/finetune/")
    sp.add_argument("--root", help="dataset root (default: the one recorded)")
    sp.add_argument("--split", default="test", choices=("test", "val", "train"), help="images to predict (default test)")
    sp.add_argument("--out", help="folder for the predictions and manifest.json (default: RUN_DIR/predictions/SPLIT)")
    sp.add_argument("--checkpoint", help="checkpoint to predict with (default: best.pt, else last.pt)")

    sp = add("submit", "Pack a run's predictions (sslbench predict) as a leaderboard expects; refuses a missing or malformed case.")
    sp.add_argument("run_dir", help="a run folder under runs/finetune/")
    sp.add_argument("--leaderboard", required=True, choices=("btcv", "flare23", "amos22", "msd"))
    sp.add_argument("--root", help="dataset root (default: the one recorded)")
    sp.add_argument("--split", default="test", choices=("test", "val", "train"), help="the predicted split (default test)")
    sp.add_argument("--predictions", help="predictions folder (default: RUN_DIR/predictions/SPLIT)")
    sp.add_argument("--out", help="the zip to write (default: RUN_DIR/submissions/LEADERBOARD-SPLIT.zip)")

    from . import sweep
    from .report import command as report_command

    sweep.add_arguments(add("sweep", "Optuna sweeps over recipe keys (the lambda ablation first).",
                            sweep.DESCRIPTION, sweep.EPILOG))
    report_command.add_arguments(add("report", "Render leaderboard tables from run records beside the published "
                                               "numbers.", report_command.DESCRIPTION, report_command.EPILOG))

    sp = add("data", "Write phantom datasets in real layouts, or check a dataset on disk.")
    dsub = sp.add_subparsers(dest="data_command", metavar="action")
    d = dsub.add_parser("synth", help="write a miniature phantom tree in a dataset's real layout", formatter_class=fmt,
                        epilog="example:\n  sslbench data synth --like mmwhs --out /tmp/mmwhs --cases 6 --seed 1")
    d.add_argument("--like", required=True, help="layout to imitate: btcv, btcv-raw, msd-spleen, mmwhs, msd01..msd08, msd10 (Task09 is msd-spleen), brats21, "
                   "lits, flare23, amos22, tcia-covid19, luna16, ccccii, chestxray14")
    d.add_argument("--out", required=True)
    d.add_argument("--cases", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d = dsub.add_parser("check", help="validate a dataset against its task recipe", formatter_class=fmt,
                        epilog="example:\n  sslbench data check --task mmwhs --root /data/MM-WHS")
    d.add_argument("--task", required=True)
    d.add_argument("--root", help="dataset root (phantom tasks: their synthesised folder)")

    d = dsub.add_parser("cache", help="preprocess a task's cases once into memory-mapped arrays keyed by the preprocessing",
                        formatter_class=fmt,
                        epilog="example:\n  sslbench data cache --task btcv --root /data/BTCV\n"
                               "  sslbench data cache --task phantom-corpus")
    d.add_argument("--task", required=True, help="task or corpus recipe")
    d.add_argument("--root", help="dataset root (phantom tasks: their synthesised folder)")
    d.add_argument("--preset", choices=("paper", "tiny"), help="preset whose preprocessing to cache (default: the task's)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a task key, e.g. task.preprocess.spacing=[2,2,2]")
    d.add_argument("--cache", help="cache folder (default: $SSLBENCH_CACHE or <data home>/cache)")

    sp = add("list", "List method or task recipes with their source paper and status.")
    sp.add_argument("what", choices=("methods", "tasks"))

    from . import bench

    bench.add_arguments(add("bench", "Performance benchmarks (GPU): pre-training throughput of a method, "
                                     "fine-tuning steps, sliding-window inference."))
    return p


# --------------------------------------------------------------------------------------------------
def _results_table(record, metrics: dict, console, task: str | None = None) -> None:
    """The terminal table of a finished fine-tuning, printed by its task kind (sslbench/tasks/): the kind of the
    task its recipe.yaml ran, or (a record without one) of the task recipe named by ``task`` or its metrics."""
    from . import recipes, tasks

    try:
        cfg = record.read_recipe()["task"]
    except FileNotFoundError:
        cfg = recipes.load_task(str(task or metrics["task"]))
    tasks.kind_of(cfg).print_results(metrics, console)


def _cmd_list(args, console) -> int:
    from rich.table import Table

    from . import recipes

    t = Table(title=f"sslbench {args.what}")
    kind = "methods" if args.what == "methods" else "benchmarks"
    t.add_column("name")
    t.add_column("title")
    if kind == "benchmarks":
        t.add_column("kind")
    t.add_column("source paper")
    t.add_column("status")
    for name in recipes.list_recipes(kind):
        r = recipes.load_method(name) if kind == "methods" else recipes.load_task(name)
        colour = "green" if r["status"] == "available" else "yellow"
        row = [name, r["title"]] + ([r["kind"]] if kind == "benchmarks" else []) + [r["source"], f"[{colour}]{r['status']}"]
        t.add_row(*row)
    console.print(t)
    return 0


def _resolve(args, method: str, task: str | None, corpus: str | None = None) -> dict:
    from . import recipes

    cfg = recipes.resolve(method, task, preset=args.preset, overrides=args.overrides, seed=args.seed, corpus=corpus)
    if args.out:
        cfg["run"]["out"] = args.out
    return cfg


def _say(console):
    return lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)


def _cmd_run(args, console) -> int:
    from . import protocol

    if args.method is None and args.task is None and not (args.root or args.corpus or args.corpus_root or args.preset):
        from . import demo   # `sslbench run` alone: VoCo against scratch on phantom MM-WHS, side by side

        if args.dry_run:
            return demo.dry_run(seed=args.seed, overrides=args.overrides, out=args.out, say=_say(console))
        demo.run_demo(seed=args.seed, overrides=args.overrides, out=args.out, resume=args.resume, force=args.force,
                      console=console)
        return 0
    args.method, args.task = args.method or DEFAULT_METHOD, args.task or DEFAULT_TASK
    if args.dry_run:
        cfg = _resolve(args, args.method, args.task, corpus=args.corpus)
        return protocol.dry_run(cfg, root=args.root, corpus_root=args.corpus_root, say=_say(console), gpus=args.gpus)
    out = protocol.run_protocol(args.method, args.task, preset=args.preset, overrides=args.overrides, seed=args.seed,
                                root=args.root, corpus=args.corpus, corpus_root=args.corpus_root, out=args.out,
                                resume=args.resume, force=args.force, console=console)
    if "rank" in out.metrics:   # torchrun rank > 0: rank 0 prints and records
        return 0
    _results_table(out.record, out.metrics, console, task=args.task)
    console.print(f"run record: {out.record.path}")
    return 0


def _cmd_pretrain(args, console) -> int:
    from . import protocol, recipes

    cfg = _resolve(args, args.method, None, corpus=args.corpus)
    if cfg["method"].get("pretrain") is None:
        from .errors import RecipeError

        raise RecipeError(f"method '{args.method}' has no pre-training (methods/{args.method}.yaml: pretrain is null)")
    pcfg = recipes.split_config(cfg, "corpus")
    if args.dry_run:
        return protocol.dry_run(pcfg, corpus_root=args.corpus_root, say=_say(console), gpus=args.gpus)
    protocol.preflight(pcfg, corpus_root=args.corpus_root, say=_say(console))
    out = protocol.pretrain(pcfg, root=args.corpus_root, resume=args.resume, force=args.force, console=console)
    m = out.metrics
    phantom = " on PHANTOM data" if m.get("phantom") else ""
    console.print(f"pre-trained {m.get('method')} ({m.get('variant') or 'default'}){phantom}: {m.get('steps')} steps, "
                  f"final loss {m.get('final_loss')}")
    console.print(f"backbone checkpoint: {out.record.ckpt_dir / 'backbone.pt'}")
    return 0


def _cmd_finetune(args, console) -> int:
    from . import protocol, recipes

    label = args.method or ("external" if args.init else "scratch")
    method = args.method if (args.method and args.method in recipes.list_recipes("methods")) else "scratch"
    cfg = _resolve(args, method, args.task)
    cfg["run"]["label"] = label
    init = None
    if args.init:
        path = Path(args.init)
        from .models.backbones import read_checkpoint

        read_checkpoint(path)  # fail early, with one line, on a missing or unreadable file
        init = {"path": str(path), "source": "file", "hash": protocol.file_digest(path), "method": label}
        # a backbone of an sslbench pre-training: its decoder hand-over and its PHANTOM label, as `run` does
        init.update(protocol.checkpoint_provenance(path, method))
    if args.dry_run:
        return protocol.dry_run(recipes.split_config(cfg, "task"), root=args.root, say=_say(console), init=init,
                                gpus=args.gpus)
    protocol.preflight(recipes.split_config(cfg, "task"), root=args.root, say=_say(console))
    out = protocol.finetune(recipes.split_config(cfg, "task"), root=args.root, init=init, resume=args.resume,
                            force=args.force, console=console)
    if "rank" in out.metrics:
        return 0
    _results_table(out.record, out.metrics, console, task=args.task)
    console.print(f"run record: {out.record.path}")
    return 0


def _cmd_evaluate(args, console) -> int:
    """Under the run folder's lock (sslbench/store/lock.py): never beside a training of that folder or another evaluate."""
    from .store import lock as locks

    if not (Path(args.run_dir) / "recipe.yaml").is_file():   # not a run folder: the evaluation says so, no lock file
        return _evaluate(args, console)
    with locks.folder_lock(args.run_dir):
        return _evaluate(args, console)


def _evaluate(args, console) -> int:
    from . import protocol

    if args.space == "original":
        from . import predict

        res = predict.evaluate_original(args.run_dir, root=args.root, checkpoint=args.checkpoint, console=console)
    else:
        res = protocol.reevaluate(args.run_dir, checkpoint=args.checkpoint, root=args.root, console=console,
                                  precision=args.precision, attention=args.attention)
    rec = json.loads((Path(args.run_dir) / "metrics.json").read_text()) if (Path(args.run_dir) / "metrics.json").is_file() else {}
    from .store.records import RunRecord

    _results_table(RunRecord(args.run_dir), {**rec, **res, "method": rec.get("method", "?"),
                                             "task_title": rec.get("task_title", "?"), "checkpoint": res["checkpoint"]},
                   console)
    if "precision" in res:
        console.print(f"evaluated with {res['precision']}, attention {res['attention']} on {res['device']}")
    console.print(f"written: {res.get('written', Path(args.run_dir) / 'evaluation.json')}")
    return 0


def _cmd_predict(args, console) -> int:
    from .store import lock as locks

    if not (Path(args.run_dir) / "recipe.yaml").is_file():   # not a run folder: predict says so, no lock file
        return _predict(args, console)
    with locks.folder_lock(args.run_dir):   # the training's lock: no prediction from a folder still being written
        return _predict(args, console)


def _predict(args, console) -> int:
    from . import predict

    m = predict.predict_run(args.run_dir, root=args.root, split=args.split, out=args.out, checkpoint=args.checkpoint,
                            console=console)
    console.print(f"{len(m['cases'])} {args.split} predictions in {m['out']} ({m['_written']} written, "
                  f"{m['_skipped']} already there); manifest: {Path(m['out']) / predict.MANIFEST}", soft_wrap=True)
    return 0


def _cmd_submit(args, console) -> int:
    from . import submit

    res = submit.submit_run(args.run_dir, args.leaderboard, root=args.root, split=args.split,
                            predictions=args.predictions, out=args.out)
    rule = "" if res["verified"] else (f" (NOT verified against the leaderboard's instructions: {res['unconfirmed']}; "
                                       f"see sslbench/submit.py)")
    console.print(f"{len(res['files'])} predictions packed for {args.leaderboard} in {res['archive']}{rule}")
    return 0


def _cmd_data(args, console) -> int:
    from rich.table import Table

    if args.data_command == "synth":
        from .data import phantoms

        root = phantoms.synth(args.like, Path(args.out), cases=args.cases, seed=args.seed)
        console.print(f"wrote {args.cases} phantom cases like '{args.like}' to {root} "
                      f"(procedurally generated anatomy, NOT patient data)")
        return 0
    if args.data_command == "check":
        from .data import check as check_mod
        from .data.locate import locate_data

        # the recipe as a run resolves it under its default preset (phantom twins: tiny, their few cases)
        task = getattr(args, "resolved", None) or _resolved_task(args.task)
        if (task.get("data") or {}).get("sources"):   # a combined corpus (voco-corpus): check each source
            from .data.sources import source_roots

            return max(_cmd_data(argparse.Namespace(data_command="check", task=src["name"], root=src_root,
                                                    resolved=src), console)
                       for src, src_root in source_roots(task, args.root))
        root, _ = locate_data(task, args.root, log=console.print)
        report = check_mod.check_dataset(task, root)
        rows = check_mod.summarize(report)
        if rows:
            # One column per split, one row per field: fits a terminal whatever the number of classes.
            t = Table(title=f"{task['title']} at {root} (layout {report.layout})" + (" [PHANTOM]" if report.phantom else ""))
            t.add_column("")
            for r in rows:
                t.add_column(str(r.get("split", "")), justify="right")
            for key in [k for k in rows[0] if k != "split"]:
                t.add_row(str(key), *[str(r.get(key, "")) for r in rows])
            console.print(t)
        for note in getattr(report, "notes", []) or []:
            console.print(f"note: {note}")
        if report.problems:
            for line in report.problems:
                print(f"problem: {line}", file=sys.stderr)
            print(f"{len(report.problems)} problem(s) found in {root}", file=sys.stderr)
            return 1
        console.print(f"[green]ok[/green]: {len(report.rows)} cases checked, no problems")
        return 0
    if args.data_command == "cache":
        from . import protocol, recipes
        from .data import cases

        # The task section exactly as a run resolves it (preset, --set), so the cache key matches the run's.
        if recipes.load_task(args.task)["kind"] == "corpus":
            task = recipes.resolve("voco", None, preset=args.preset, overrides=args.overrides, corpus=args.task)["corpus"]
        else:
            task = recipes.resolve("scratch", args.task, preset=args.preset, overrides=args.overrides)["task"]
        progress = protocol.make_progress(console)
        with progress:
            info = cases.build(task, args.root, cache_root=args.cache, progress=progress)
        phantom = " [PHANTOM]" if info["phantom"] else ""
        console.print(f"{info['task']}{phantom}: {info['cases']} cases cached in {info['folder']} "
                      f"({info['written']} written, {info['reused']} already there, {info['bytes'] / 2**20:.1f} MiB); "
                      f"runs with run.cache=read (the default) now map them instead of preprocessing")
        return 0
    print("usage: sslbench data {synth,check,cache} ... (see sslbench data --help)", file=sys.stderr)
    return 2


def _resolved_task(name: str) -> dict:
    """A task or corpus recipe resolved as a run would resolve it (its default preset, no overrides)."""
    from . import recipes

    raw = recipes.load_task(name)
    try:
        if raw["kind"] == "corpus":
            return {**recipes.resolve("voco", None, corpus=name)["corpus"], "_file": raw["_file"]}
        return {**recipes.resolve("scratch", name)["task"], "_file": raw["_file"]}
    except RecipeError:          # not runnable (e.g. a planned task): its files can still be checked as written
        return raw


def _cmd_report(args, console) -> int:
    from .report import command

    return int(command.run(args) or 0)


def _cmd_bench(args, console, raw: Sequence[str] = ()) -> int:
    from . import bench

    return int(bench.run(args, raw) or 0)


def _cmd_sweep(args, console, raw: Sequence[str] = ()) -> int:
    from . import sweep

    return int(sweep.run(args, raw) or 0)


#: commands that re-launch themselves under torchrun with their own arguments (``--gpus``)
_OWN_LAUNCH = {"sweep": _cmd_sweep, "bench": _cmd_bench}


def _quiet_third_party() -> None:
    """MONAI warns on import about optional GPU codecs; irrelevant to users of sslbench."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    warnings.filterwarnings("ignore", message=".*NvImgCodec.*")
    logging.getLogger("monai").setLevel(logging.ERROR)
    for name in ("monai.data.image_reader", "pydicom"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    with sigterm_as_interrupt():
        try:
            return _main(argv)
        except KeyboardInterrupt as exc:   # where a command does not catch it itself (--gpus, an early import)
            return _stopped(exc)
        except Exception:
            if not terminating():
                raise
            # raised while a SIGTERM unwound the command (a loader worker killed by the same signal)
            return _stopped(Terminated())


def _stopped(exc: KeyboardInterrupt) -> int:
    """The one line and the exit status of a command stopped by Ctrl-C (130) or SIGTERM (143)."""
    word, status = stop_exit(exc)
    print(f"{word}: the run folder keeps its last checkpoint; continue with --resume", file=sys.stderr)
    return status


def _main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if raw[:1] and raw[0] in ("sweep", "report"):
        try:   # a usage error of these is an exit status (2), as when they run on their own
            args = parser.parse_args(raw)
        except SystemExit as exc:
            return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    else:
        args = parser.parse_args(raw)
    if args.command is None:
        parser.print_help()
        return 0
    _quiet_third_party()
    if getattr(args, "no_feasibility_check", False):
        args.overrides = [*args.overrides, "run.feasibility=warn"]
    if args.command in _OWN_LAUNCH:
        try:
            return _OWN_LAUNCH[args.command](args, None, raw[1:])
        except SSLBenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if getattr(args, "gpus", None) is not None and not getattr(args, "dry_run", False):
        import os

        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            print("error: --gpus: already running under torchrun (drop --gpus or torchrun)", file=sys.stderr)
            return 2
        if args.gpus < 1:
            print(f"error: --gpus: expected a positive number of processes, got {args.gpus}", file=sys.stderr)
            return 2
        from .distributed import launch

        return launch(args.gpus, raw)
    console = _console()
    handlers = {"run": _cmd_run, "pretrain": _cmd_pretrain, "finetune": _cmd_finetune, "evaluate": _cmd_evaluate,
                "data": _cmd_data, "list": _cmd_list, "bench": _cmd_bench, "predict": _cmd_predict,
                "submit": _cmd_submit,
                "report": _cmd_report}
    try:
        return int(handlers[args.command](args, console) or 0)
    except SSLBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _stopped(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
