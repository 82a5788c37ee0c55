"""Label efficiency: every method against scratch, per task and number of labelled fine-tuning cases.

Generated from the run records only (no published numbers: the VoCo supplement has no such table). A column is
one (task, ``task.finetune.labeled_cases``, fine-tuning protocol): runs whose fine-tuning differed in anything
but the initialisation (steps, roi, preset, model...) never share a column, and phantom and real runs never share
a table. A cell gives, over the seeds of one protocol group:

* the mean Dice (%) with its 95% t-interval:  mean +- t_{0.975, n-1} * s / sqrt(n);
* the difference to scratch, paired by seed (the same seed draws the same labelled cases, the same crops and the
  same head initialisation for every method):  d_s = Dice_method(s) - Dice_scratch(s) over the seeds both ran,
  mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n). An interval that excludes 0 is marked with ``*``.

Runs scored before the empty-set rules of 2026-12-03 that cannot be shown to score alike under them
(report/runs.py ``scored_alike_by_the_rules``) are a group of their own, marked ``‡scoring``, paired only with
scratch runs of the same era.

``sslbench report`` prints these tables after the leaderboard tables and, with ``--out``, writes
``label_efficiency.png`` (Dice against labelled cases, one panel per task, 95% intervals as error bars).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from .cells import OLD_SCORING_MARK, OLD_SCORING_NOTE, Row, Table
from .plots import save_png

#: Row order: the reference and the two controls first, then the self-supervised methods, then anything else.
METHOD_ORDER = ("scratch", "supervised-task", "supervised", "voco", "mg", "transvw", "simsiam", "pcrlv1", "pcrlv2",
                "mae", "swinunetr-ssl")
REFERENCE = "scratch"


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided Student-t interval of the mean; (mean, nan, nan) for fewer than 2 values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_difference(method: Mapping[Any, float], reference: Mapping[Any, float],
                      level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, pairs) of method - reference over the seeds both have (``t_interval`` of the d_s)."""
    seeds = sorted(set(method) & set(reference), key=str)
    mean, lo, hi = t_interval([method[s] - reference[s] for s in seeds], level)
    return mean, lo, hi, len(seeds)


def _fmt_interval(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    m = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    if math.isnan(lo):
        return m
    return f"{m} [{lo:+.1f}, {hi:+.1f}]" if signed else f"{m} [{lo:.1f}, {hi:.1f}]"


def _labeled(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "all"
    f = float(v)
    return str(int(f)) if f >= 1 and f == int(f) else f"{f:g}"


def _method_key(name: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(name), name) if name in METHOD_ORDER else (len(METHOD_ORDER), name)


def efficiency_frame(runs_df):
    """The Dice rows of runs that set ``task.finetune.labeled_cases`` (the label-efficiency protocol), with a
    ``labeled`` text column; empty when there are none."""
    if runs_df is None or len(runs_df) == 0 or "labeled_cases" not in runs_df.columns:
        return None
    df = runs_df[(runs_df["metric"] == "dice") & runs_df["labeled_cases"].notna() & runs_df["score"].notna()].copy()
    if len(df) == 0:
        return None
    df["labeled"] = [_labeled(v) for v in df["labeled_cases"]]
    return df


def _columns(df) -> list[tuple[str, str, str]]:
    cols = {(str(r.base_task), str(r.labeled), str(r.finetune_protocol)) for r in df.itertuples()}
    return sorted(cols, key=lambda c: (c[0], float(c[1]) if c[1] != "all" else math.inf, c[2]))


def label_efficiency_tables(runs_df) -> list:
    """One Table per data kind present (PHANTOM runs, real runs), rows = methods, columns = the label-efficiency
    columns (module docstring). [] when no run set ``task.finetune.labeled_cases``."""
    df = efficiency_frame(runs_df)
    if df is None:
        return []
    out = []
    for phantom in (True, False):
        part = df[df["phantom"].astype(bool) == phantom]
        if len(part) == 0:
            continue
        cols = _columns(part)
        per_col_protocols: dict[tuple[str, str], int] = {}
        for task, lab, _ in cols:
            per_col_protocols[(task, lab)] = per_col_protocols.get((task, lab), 0) + 1
        headers = []
        for task, lab, fp in cols:
            h = f"{task} · {lab} labelled"
            if per_col_protocols[(task, lab)] > 1:
                h += f" [ft:{fp[:6]}]"
            headers.append(h)
        methods = sorted(set(part["method"]), key=_method_key)
        rows = []
        for method in methods:
            cells = []
            for task, lab, fp in cols:
                cells.append(_cell_text(part, method, task, lab, fp, phantom))
            rows.append(Row(id=method, label=method, cells=cells))
        kind = "PHANTOM" if phantom else "measured"
        notes = [f"{kind}: mean Dice (%) [95% t-interval over seeds]; Δ = paired difference to scratch over the "
                 f"seeds both ran [95% t-interval], * where the interval excludes 0; n = seeds. One column per "
                 f"fine-tuning protocol (ft: its hash where a task and label count have several); pre-training "
                 f"protocols of one method are listed apart (p: hash)."]
        if phantom:
            notes.append("PHANTOM: procedural phantoms, never a result on the real datasets.")
        if any(OLD_SCORING_MARK in c for r in rows for c in r.cells):
            notes.append(f"{OLD_SCORING_MARK}: {OLD_SCORING_NOTE}.")
        out.append(Table(id="label_efficiency" + ("_phantom" if phantom else ""),
                         title=f"Label efficiency ({kind})", caption="", row_header="Method",
                         column_ids=[f"{t}:{lab}:{fp}" for t, lab, fp in cols], headers=headers, rows=rows,
                         notes=notes))
    return out


def _by_seed(df) -> tuple[dict, list]:
    """({seed: Dice %}, seeds with several records): a seed recorded more than once (one protocol run twice, on two
    machines) counts once, at the mean of its records, so n stays the number of seeds and pairs stay by seed."""
    values: dict[Any, list[float]] = {}
    for r in df.itertuples():
        values.setdefault(r.seed, []).append(100.0 * float(r.score))
    return ({k: sum(v) / len(v) for k, v in values.items()},
            sorted((k for k, v in values.items() if len(v) > 1), key=str))


def _old(df):
    """The frame's ``old_scoring`` column as booleans (False where a frame has none)."""
    if "old_scoring" not in df.columns:
        return df["protocol"].map(lambda _: False).rename("old_scoring")
    return df["old_scoring"].fillna(False).astype(bool)


def _cell_text(part, method: str, task: str, lab: str, fp: str, phantom: bool) -> str:
    sel = part[(part["method"] == method) & (part["base_task"] == task) & (part["labeled"] == lab)
               & (part["finetune_protocol"] == fp)]
    if len(sel) == 0:
        return "—"
    ref = part[(part["method"] == REFERENCE) & (part["base_task"] == task) & (part["labeled"] == lab)
               & (part["finetune_protocol"] == fp)]
    texts = []
    groups = list(sel.groupby(["protocol", _old(sel)], sort=True))
    for (protocol, old), g in sorted(groups, key=lambda kv: (kv[0][1], -len(kv[1]))):
        # scratch of the same scoring era only: a record scored before the empty-set rules is never paired
        # with one scored under them (report/runs.py scored_alike_by_the_rules admits those that provably agree)
        ref_by_seed, _ = _by_seed(ref[_old(ref) == old])
        by_seed, repeated = _by_seed(g)
        mean, lo, hi = t_interval(list(by_seed.values()))
        s = ("PHANTOM " if phantom else "") + _fmt_interval(mean, lo, hi)
        if method != REFERENCE and ref_by_seed:
            d, dlo, dhi, pairs = paired_difference(by_seed, ref_by_seed)
            if pairs:
                star = "*" if not math.isnan(dlo) and (dlo > 0 or dhi < 0) else ""
                s += f" Δ {_fmt_interval(d, dlo, dhi, signed=True)}{star}"
        s += f" n={len(by_seed)}" + (f" {OLD_SCORING_MARK}" if old else "")
        if repeated:       # e.g. two results folders merged, each with a seed-0 fine-tuning of that protocol
            s += f" (seed {', '.join(str(k) for k in repeated)}: several records, their mean)"
        if len({key[0] for key, _ in groups}) > 1:     # several protocols (not only two scoring eras of one)
            steps = g["pretrain_steps"].dropna() if "pretrain_steps" in g.columns else []
            s += f" (p:{str(protocol)[:6]}" + (f", {int(steps.iloc[0])} pre-training steps" if len(steps) else "") + ")"
        texts.append(s)
    return "; ".join(texts)


def label_efficiency_plot(runs_df, out_dir: str | Path) -> list[Path]:
    """``label_efficiency[_phantom].png``: mean Dice against labelled cases (95% intervals), a line per method
    (its largest protocol group), one panel per task and fine-tuning protocol. [] without matplotlib or runs."""
    df = efficiency_frame(runs_df)
    if df is None:
        return []
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return []
    written = []
    for phantom in (True, False):
        part = df[(df["phantom"].astype(bool) == phantom) & (df["labeled"] != "all")]
        if len(part) == 0:
            continue
        panels = sorted({(str(r.base_task), str(r.finetune_family)) for r in part.itertuples()})
        fig = Figure(figsize=(5.5 * len(panels), 5.4))
        FigureCanvasAgg(fig)
        for k, (task, family) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), k + 1)
            sub = part[(part["base_task"] == task) & (part["finetune_family"] == family)]
            names = sorted(set(sub["method"]), key=_method_key)
            for idx, method in enumerate(names):
                shift = 1.0 + 0.04 * (idx - (len(names) - 1) / 2)       # side by side at each label count (log x)
                pts, old_era = [], False
                for lab, g in sub[sub["method"] == method].groupby("labeled"):
                    # the records scored under the empty-set rules where there are any (then the largest
                    # protocol group), as the table's first group; a point of the old era marks the line
                    (_, old), chosen = max(g.groupby(["protocol", _old(g)]), key=lambda kv: (not kv[0][1], len(kv[1])))
                    old_era = old_era or bool(old)
                    mean, lo, hi = t_interval(list(_by_seed(chosen)[0].values()))
                    pts.append((float(lab) * shift, mean, 0.0 if math.isnan(lo) else mean - lo))
                pts.sort()
                style = "k--" if method == REFERENCE else "-"
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                            marker="o", capsize=3, label=method + (f" {OLD_SCORING_MARK}" if old_era else ""))
            ax.set_xscale("log")
            xs = sorted({float(v) for v in sub["labeled"]})
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
            ax.minorticks_off()          # the log axis' minor labels (1.6 x 10^0 ...) say nothing here
            ax.set_xlabel("labelled fine-tuning cases")
            ax.set_ylabel("Dice (%)")
            ax.set_title(("PHANTOM " if phantom else "") + task + (f" [ft:{family[:6]}]" if len(panels) > len(
                {p[0] for p in panels}) else ""))
            # below the panel, where it hides no interval
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
        fig.suptitle("Label efficiency" + (" (PHANTOM data)" if phantom else "") + ": mean Dice, 95% intervals")
        path = Path(out_dir) / ("label_efficiency" + ("_phantom" if phantom else "") + ".png")
        save_png(fig, path)
        written.append(path)
    return written
