"""The report's figures (PNG, matplotlib's Agg canvas, no display needed): the λ curve of Table 3 with error
bars and the per-structure bars of MM-WHS (Table 5), measured vs published; each written atomically and
world-readable. Nothing is drawn without matplotlib or without measured runs."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

from ..store.records import PUBLIC_MODE, atomic_write_bytes
from .cells import Cell, Group, Table


def save_png(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically and world-readable (PUBLIC_MODE)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue(), mode=PUBLIC_MODE)


def _plot_kind(cell: Cell) -> str:
    """A plot's legend word for a column: 'measured', 'PHANTOM' or the kind ('tiny preset', ...)."""
    return "measured" if cell.comparable else "PHANTOM" if cell.phantom else cell.kind


def lambda_plot(t3: Table, path: Path) -> None:
    """Table 3: Dice against λ, one panel per column; published dashed, each measured series (preset and λ-free
    protocol) with mean ± std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(t3.headers), 4))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(t3.headers), j + 1) for j in range(len(t3.headers))]
    for j, ax in enumerate(axes):
        lams = [float(r.id) for r in t3.rows]
        cells = [r.cells[j] for r in t3.rows]
        pub = [(lam, c.published) for lam, c in zip(lams, cells) if c.published is not None]
        if pub:
            ax.plot([p[0] for p in pub], [p[1] for p in pub], "k--o", label="published")
        series: dict[str, list[tuple[float, Group]]] = {}
        for lam, c in zip(lams, cells):
            for g in c.groups:
                series.setdefault(f"{g.preset or ''} s:{(g.series or g.protocol)[:6]}", []).append((lam, g))
        for name, pts in sorted(series.items()):
            pts.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts],
                        yerr=[0.0 if p[1].n < 2 else p[1].std for p in pts], marker="s", capsize=4,
                        label=_plot_kind(cells[0]) + " " + name.strip())
        ax.set_title(t3.headers[j])
        ax.set_xlabel("λ")
        ax.set_ylabel("Dice (%)")
        ax.set_xticks(lams)
        ax.legend(fontsize=7)
    fig.suptitle(t3.title)
    save_png(fig, path)


def _structure_bars(t5: Table, n: int) -> list[tuple[str, list[float], list[float]]]:
    """(legend name, values, error bars) per bar series of Table 5: published, then each measured protocol."""
    pub = [r.cells[0].published for r in t5.rows]
    bars = [("published", [math.nan if v is None else v for v in pub], [0.0] * len(pub))]
    for j in range(len(t5.headers)):
        keys: dict[str, dict[int, Group]] = {}
        for i, r in enumerate(t5.rows):
            for g in r.cells[j].groups:
                keys.setdefault(g.protocol, {})[i] = g
        for protocol, by_row in sorted(keys.items()):
            some = next(iter(by_row.values()))
            name = f"{_plot_kind(t5.rows[0].cells[j])} [{some.label()}]"
            bars.append((name, [by_row[i].mean if i in by_row else math.nan for i in range(n)],
                         [by_row[i].std if i in by_row and by_row[i].n > 1 else 0.0 for i in range(n)]))
    return bars


def structures_plot(t5: Table, path: Path) -> None:
    """Table 5: Dice per MM-WHS structure, published and measured bars side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [r.label for r in t5.rows]
    fig = Figure(figsize=(max(8, 1.2 * len(labels)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bars = _structure_bars(t5, len(labels))
    width = 0.8 / len(bars)
    for k, (name, values, errs) in enumerate(bars):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(labels))]
        ax.bar(xs, values, width, yerr=errs, capsize=3, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Dice (%)")
    ax.set_title(t5.title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_png(fig, path)


def plots(tables: Sequence[Table], runs_df, out_dir: str | Path) -> list[Path]:
    """PNG figures where measured data exists: the λ curve with error bars (Table 3) and per-structure
    bars of MM-WHS (Table 5), measured vs published. Returns the paths written ([] without matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (drawn by lambda_plot, ...)
    except ImportError:
        return []
    out_dir = Path(out_dir)
    written: list[Path] = []
    by_id = {t.id: t for t in tables}
    for table_id, draw, name in (("table3", lambda_plot, "table3_lambda.png"),
                                 ("table5", structures_plot, "table5_mmwhs_structures.png")):
        table = by_id.get(table_id)
        if table is not None and table.measured:
            draw(table, out_dir / name)
            written.append(out_dir / name)
    return written
