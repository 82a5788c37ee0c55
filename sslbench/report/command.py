"""`sslbench report [--runs DIR] [--format md|latex|html|csv] [--out DIR]`: published numbers, the collected
runs and the online answers into tables, then printed (a coloured terminal table on a terminal) or written
(one file per table, or one HTML page, and the plots)."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import RecipeError, SSLBenchError
from .cells import Table
from .efficiency import label_efficiency_plot
from .html import page
from .online import default_online, load_online
from .plots import plots
from .published import DEFAULT_LEADERBOARD, load_published
from .render import EXTENSIONS, FORMATS, print_rich, render, render_table, write_public
from .runs import collect_runs
from .tables import build_tables


def fill_hints(runs: str) -> list[str]:
    """The commands that fill the measured columns (printed when no run is found)."""
    return [
        f"no finished fine-tuning runs under {Path(runs) / 'finetune'}: the tables hold the published numbers only.",
        "Fill the measured values (repeat with --seed 0/1/2 for mean ± std):",
        "  Table 3 (λ ablation):    sslbench sweep lambda --task mmwhs   and   sslbench sweep lambda --task btcv",
        "                           (one λ by hand: sslbench run --method voco --task mmwhs --root DIR --set method.params.lambda=0.5)",
        "  Table 5 (MM-WHS organs): sslbench run --method voco --task mmwhs --root DIR",
        "  Table 7 / comparison:    sslbench run --method voco --task msd-spleen --root DIR ;"
        "  sslbench run --method scratch --task btcv --root DIR",
        "  demo on phantoms (reported as PHANTOM, never as the real dataset): sslbench run --method voco --task phantom-mmwhs",
        f"then: sslbench report --runs {runs}",
    ]


def _images(tables: Sequence[Table], runs_df, out_dir: str | Path) -> list[Path]:
    """Every figure of the report, written to ``out_dir``."""
    return plots(tables, runs_df, out_dir) + label_efficiency_plot(runs_df, out_dir)


def write_outputs(tables: Sequence[Table], runs_df, out_dir: str | Path, fmt: str,
                  source: str | None = None) -> list[Path]:
    """The PNGs, then one file per table (<id>.md|tex|csv), or for html the one self-contained page
    ``index.html`` (every table, the plots inline, notes and provenance: sslbench/report/html.py); each file
    written atomically and world-readable (store.records.PUBLIC_MODE)."""
    out_dir = Path(out_dir)
    images = _images(tables, runs_df, out_dir)
    written = []
    if fmt == "html":
        path = out_dir / "index.html"
        write_public(path, page(tables, runs_df, [(p.name, p.read_bytes()) for p in images], source=source))
        written.append(path)
    else:
        for t in tables:
            path = out_dir / f"{t.id}.{EXTENSIONS[fmt]}"
            write_public(path, render_table(t, fmt))
            written.append(path)
    return written + images


def print_tables(tables: Sequence[Table], runs_df, fmt: str, source: str) -> None:
    """The report on stdout: rich (terminal), the whole HTML page with its plots inline, or text."""
    if fmt == "rich":
        print_rich(tables)
        return
    if fmt == "html":
        with tempfile.TemporaryDirectory() as tmp:
            images = _images(tables, runs_df, tmp)
            sys.stdout.write(page(tables, runs_df, [(p.name, p.read_bytes()) for p in images], source=source))
    else:
        sys.stdout.write(render(tables, fmt))
    sys.stdout.flush()


DESCRIPTION = ("Render the leaderboard tables (published numbers of the VoCo supplement) with the measured values of "
               "the run records beside them.")
EPILOG = ("examples:\n  sslbench report\n  sslbench report --runs runs --format latex\n"
          "  sslbench report --format md --out leaderboards/rendered\n"
          "  sslbench report --online runs/leaderboards/online.yaml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslbench report", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `sslbench report` (on its own parser, or as the sub-command of sslbench's one parser)."""
    p.add_argument("--runs", default="runs", help="folder of run records (default: runs)")
    p.add_argument("--format", choices=FORMATS + ("rich",), default=None,
                   help="md | latex | html | csv (default: a coloured terminal table on a terminal, else md)")
    p.add_argument("--out", help="write one file per table (html: one page, index.html) and the PNG plots to this "
                                 "folder instead of printing")
    p.add_argument("--published", help=f"leaderboard YAML (default: leaderboards/{DEFAULT_LEADERBOARD})")
    p.add_argument("--online", help="what the leaderboards answered, for Table 6 (default: "
                                    "RUNS/leaderboards/online.yaml when it exists; format: sslbench/report/online.py)")


def _report(args: argparse.Namespace) -> None:
    published = load_published(args.published)
    runs_df = collect_runs(args.runs)
    online_df = load_online(args.online or default_online(args.runs), published, runs_df, args.runs,
                            required=bool(args.online))
    tables = build_tables(published, runs_df, online_df)
    for line in runs_df.attrs.get("skipped", []):
        print(f"skipped: {line}", file=sys.stderr)
    envs = sorted(set(runs_df["env"].dropna())) if len(runs_df) else []
    if len(envs) > 1:
        print(f"warning: the runs under {args.runs} were made under {len(envs)} package environments "
              f"({'; '.join(envs)}): tables with more than one say so in their notes", file=sys.stderr)
    if args.out:
        fmt = args.format or "md"
        if fmt == "rich":
            raise RecipeError("--format rich: only for the terminal; with --out use md, latex, html or csv")
        for path in write_outputs(tables, runs_df, args.out, fmt, source=args.runs):
            print(f"written: {path}")
    else:
        print_tables(tables, runs_df, args.format or ("rich" if sys.stdout.isatty() else "md"), args.runs)
    if len(runs_df) == 0:
        print("\n".join(fill_hints(args.runs)), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """`sslbench report [--runs DIR] [--format md|latex|html|csv] [--out DIR]`; returns the exit status."""
    try:
        args = _parser().parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    """The report of parsed options; 2 with one line on a user error."""
    try:
        _report(args)
        return 0
    except SSLBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
