"""`sslbench sweep KEY [options]`: the options (on its own parser, or as the sub-command of sslbench's one
parser), the torchrun re-launch for --gpus, and the command's output and exit status."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .. import distributed, recipes
from ..errors import sigterm_as_interrupt, SSLBenchError, stop_exit
from .spec import build_sweep, esc, show_value
from .storage import public_url
from .summary import print_summary
from .worker import SweepStop, Worker, check_data, command, follow

EPILOG = """examples:
  sslbench sweep lambda --task phantom-mmwhs                      # λ grid 0.5 1.0 1.5 on phantoms (CPU)
  sslbench sweep lambda --task mmwhs --root /data/MM-WHS          # Table 3, MM-WHS column
  sslbench sweep lambda --task btcv --root /data/BTCV --values 0.5 1.0 1.5 --seed 1
  sslbench sweep task.finetune.lr --method scratch --task phantom-btcv --values 1e-3 3e-3
  sslbench sweep task.finetune.lr --sampler tpe --trials 20 --low 1e-4 --high 1e-2 --log
  sslbench sweep lambda --task mmwhs --root /data/MM-WHS --storage postgresql://user:pw@db/optuna
  sslbench sweep lambda --task phantom-mmwhs --status              # show the study, run nothing

Re-running a command continues its study: finished points are kept, failed ones and those of killed
workers are run again (continuing their run folders). Start the same command in several terminals (or
on several machines with --storage URL and one shared --out) to share the work: a worker takes a point
by locking its run folder. Then: sslbench report"""

DESCRIPTION = ("Optuna sweep over one recipe key: every trial pre-trains (if the method does), fine-tunes and "
               "evaluates with --set KEY=VALUE and is scored by its validation Dice (maximised). Each trial is a "
               "normal run record under --out.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslbench sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `sslbench sweep` (on its own parser, or as the sub-command of sslbench's one parser)."""
    p.add_argument("key", help="alias (lambda = method.params.lambda) or any dotted key of the resolved recipe, "
                               "e.g. task.finetune.lr")
    p.add_argument("--method", default="voco", help="method recipe (default: voco)")
    p.add_argument("--task", default="phantom-mmwhs", help="task recipe (default: phantom-mmwhs)")
    p.add_argument("--root", help="dataset root of the task (phantom tasks synthesise their own)")
    p.add_argument("--corpus", help="pre-training corpus recipe (default: the method's)")
    p.add_argument("--corpus-root", help="dataset root of the corpus")
    p.add_argument("--preset", choices=recipes.PRESETS, help="settings profile (default: the task's; phantoms: tiny)")
    p.add_argument("--seed", type=int, help="run seed of every trial (default 0); one study per seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any other key of the base recipe (repeatable)")
    p.add_argument("--out", default="runs", help="folder for run records and the journal (default: runs)")
    g = p.add_argument_group("search")
    g.add_argument("--sampler", choices=("grid", "tpe"), help="grid (default; --values) or tpe (--low/--high)")
    g.add_argument("--values", nargs="+", metavar="V", help="grid values (λ default: 0.5 1.0 1.5, the seed's Table 3)")
    g.add_argument("--trials", type=int, help="tpe: number of finished trials the study should reach (default 20)")
    g.add_argument("--low", type=float, help="tpe: lower end of the range")
    g.add_argument("--high", type=float, help="tpe: upper end of the range")
    g.add_argument("--log", action="store_true", help="tpe: sample on a log scale")
    g.add_argument("--int", action="store_true", help="tpe: integer values")
    g.add_argument("--pruner", choices=("median", "hyperband", "none"),
                   help="prune on intermediate validation Dice (tpe default: median; grids never prune)")
    s = p.add_argument_group("study")
    s.add_argument("--study", help="study name (default: key-method-task-preset-seed-<hash of protocol and search>)")
    s.add_argument("--storage", help="journal file path (default: <out>/sweeps/<study>.journal) or a database URL "
                                     "such as postgresql://user:pw@host/db for workers on several machines")
    s.add_argument("--max-retries", type=int, default=3,
                   help="retries in a row of a point whose worker died (default 3)")
    s.add_argument("--status", action="store_true", help="print the study's trials and exit (runs nothing)")
    s.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="each trial runs on N local processes under torchrun (DDP); rank 0 drives the study "
                        "and broadcasts every trial's parameters and pruning decision")


def _console():
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)   # long paths stay on one line (copy-paste)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160                              # logs and CI: room for the run folders
    return console


def main(argv: Sequence[str] | None = None) -> int:
    """`sslbench sweep KEY [options]`; returns the exit status (0 done or left to other workers, 1 points
    failed, 2 user error, 130 interrupted, 143 terminated by SIGTERM)."""
    raw = list(argv) if argv is not None else sys.argv[1:]
    try:
        args = _parser().parse_args(raw)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    with sigterm_as_interrupt():   # for a direct call; under `sslbench sweep` the CLI installed it (a no-op)
        return run(args, raw)


def run(args: argparse.Namespace, raw: Sequence[str]) -> int:
    """The sweep of parsed options (``raw``: the command's own arguments, for the torchrun re-launch)."""
    if args.gpus is not None and distributed.env_world_size() <= 1:
        if args.gpus < 1:
            print(f"error: --gpus: expected a positive number of processes, got {args.gpus}", file=sys.stderr)
            return 2
        return distributed.launch(args.gpus, ["sweep", *list(raw)])
    device = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("run.device=")), "auto")
    dist = distributed.setup(device)
    if not dist.is_main:
        code = follow(dist)
        distributed.cleanup()
        return code
    try:
        return _main(args)
    finally:
        command(dist, ("stop",))
        distributed.cleanup()


def _main(args: argparse.Namespace) -> int:
    console = _console()
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sw = build_sweep(args)
        if args.status:
            print_summary(Worker(sw, console, create=False), console, None)
            return 0
        what = (f"grid {', '.join(show_value(v) for v in sw.values)}" if sw.sampler == "grid" else
                f"TPE over [{show_value(sw.low)}, {show_value(sw.high)}]{' (log)' if sw.log else ''}"
                f"{' (integers)' if sw.integer else ''}, {sw.trials} trials, pruner {sw.pruner}")
        console.print(f"[bold]sweep {esc(sw.display)}[/bold] " + esc(f"({sw.key}) of {sw.method} on {sw.task} "
                      f"[preset {sw.preset}, seed {sw.seed if sw.seed is not None else 0}]: {what}"))
        console.print(esc(f"study {sw.study} in {public_url(sw.storage)} (start this command again elsewhere to add workers)"))
        if sw.phantom:
            console.print(f"[magenta]PHANTOM data[/magenta]: {esc(sw.task_title)} is procedurally generated; "
                          f"these are phantom results, not results on the real dataset")
        check_data(sw, console)
        worker = Worker(sw, console)
        try:
            plan = worker.run()
        except SweepStop as exc:
            print_summary(worker, console, None)
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if plan["done"] and not worker.ran:
            console.print("nothing to run: every point of this study is finished")
        elif not plan["done"] and not worker.ran and not plan.get("failed"):
            console.print("nothing to run here: the remaining points are running in other workers")
        print_summary(worker, console, plan)
        if plan["done"] or not plan.get("failed"):
            return 0
        return 1
    except SSLBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM (sslbench.errors.Terminated)
        word, status = stop_exit(exc)
        print(f"{word}: the trial is marked failed and its run folder keeps its last checkpoint; run the same "
              "command again to continue", file=sys.stderr)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
