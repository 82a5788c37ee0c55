"""Report output as text: Markdown, LaTeX, HTML fragments (tabulate) and CSV (pandas), the coloured terminal
table with mmpretrain-style regression rows (rich), and the atomic, world-readable write of an output file."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

from ..errors import RecipeError
from ..store.records import PUBLIC_MODE, atomic_write_bytes
from .cells import NO_VALUE, Cell, Table
from .runs import NOT_COMPARABLE

FORMATS = ("md", "latex", "html", "csv")
EXTENSIONS = {"md": "md", "latex": "tex", "html": "html", "csv": "csv"}


def write_public(path: str | Path, data: bytes | str) -> None:
    """Write a report output atomically (temporary file, then rename) and world-readable (PUBLIC_MODE)."""
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data, mode=PUBLIC_MODE)


_LATEX_ESCAPE = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}
_LATEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "λ": r"$\lambda$", "†": r"$^\dagger$", "—": "---",
                  "×": r"$\times$", "‡": r"$^\ddagger$", "≥": r"$\geq$", "≤": r"$\leq$", "·": r"$\cdot$"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_ESCAPE.get(ch, ch) for ch in str(text))
    for k, v in _LATEX_UNICODE.items():
        out = out.replace(k, v)
    return out


def render_table(table: Table, fmt: str) -> str:
    """One table as Markdown, LaTeX, HTML (tabulate) or CSV (pandas)."""
    from tabulate import tabulate

    if fmt not in FORMATS:
        raise RecipeError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    headers = [table.row_header] + table.headers
    body = table.text_rows()
    if fmt == "csv":
        return table.frame().to_csv(index=False)
    if fmt == "md":
        grid = tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)
        notes = "".join(f"- {n}\n" for n in table.notes)
        return f"### {table.title}\n\n{grid}\n\n{table.caption}\n\n{notes}"
    if fmt == "latex":
        grid = tabulate([[latex_escape(c) for c in r] for r in body], headers=[latex_escape(h) for h in headers],
                        tablefmt="latex_raw", disable_numparse=True)
        notes = "".join(f"\\par\\footnotesize {latex_escape(n)}\n" for n in table.notes)
        return (f"% {latex_escape(table.title)}\n\\begin{{table}}[ht]\n\\centering\n"
                f"\\caption{{{latex_escape(table.caption)}}}\n\\label{{tab:sslbench-{table.id}}}\n"
                f"\\resizebox{{\\linewidth}}{{!}}{{%\n{grid}}}\n{notes}\\end{{table}}\n")
    grid = tabulate(body, headers=headers, tablefmt="html", disable_numparse=True)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
    return (f'<section id="{html.escape(table.id)}">\n<h3>{html.escape(table.title)}</h3>\n{grid}\n'
            f'<p class="caption">{html.escape(table.caption)}</p>\n<ul class="notes">{notes}</ul>\n</section>\n')


def render(tables: Sequence[Table], fmt: str) -> str:
    """All tables in one text (CSV tables are separated by '# <title>' lines)."""
    if fmt == "csv":
        return "\n".join(f"# {t.title}\n{render_table(t, 'csv')}" for t in tables)
    return "\n".join(render_table(t, fmt) for t in tables)


_RICH_STYLE = {"green": "green", "yellow": "yellow", "red": "red", "grey": "grey50", "magenta": "magenta",
               "none": "cyan"}


def print_rich(tables: Sequence[Table], console=None) -> None:
    """Tables in the terminal, measured values coloured by agreement with the published one (green within
    1 point, yellow within 3, red beyond; grey: no measurement; magenta: PHANTOM), then mmpretrain-style
    regression rows (published vs measured) for every measured group."""
    from rich import box
    from rich.console import Console
    from rich.table import Table as RichTable
    from rich.text import Text

    console = console or Console()
    regression = []
    for table in tables:
        # Text, not markup: labels such as "[tiny, λ=1, p:…]" or "[10]" must print as they are.
        rt = RichTable(title=Text(table.title, style="bold"), caption=Text("\n".join([table.caption] + table.notes)),
                       box=box.SIMPLE_HEAD, caption_justify="left", title_justify="left")
        rt.add_column(Text(table.row_header), style="bold")
        for h in table.headers:
            apart = any(h.endswith(f"({k})") for k in NOT_COMPARABLE[1:])
            rt.add_column(Text(h), justify="right",
                          style="magenta" if h.endswith("(phantom)") else "cyan" if apart else None)
        for row in table.rows:
            out = [Text(row.label)]
            for j, c in enumerate(row.cells):
                if not isinstance(c, Cell):
                    out.append(Text(str(c)))
                    continue
                text = Text()
                if c.comparable:
                    text.append(c.published_text(), style=None if c.groups else _RICH_STYLE["grey"])
                for k, g in enumerate(c.groups):
                    text.append(" / " if k == 0 and c.comparable else "\n" if k else "")
                    text.append(c.group_text(g), style=_RICH_STYLE[c.agreement(g)])
                    regression.append((table.title.split(":")[0], row.label, table.headers[j], c, g))
                if not c.comparable and not c.groups:
                    text.append(NO_VALUE, style=_RICH_STYLE["grey"])
                out.append(text)
            rt.add_row(*out)
        console.print(rt)
    if regression:
        rt = RichTable(title=Text("Regression: published vs measured", style="bold"), box=box.SIMPLE_HEAD,
                       title_justify="left")
        for h in ("table", "row", "column", "published", "measured", "Δ", "n", "preset", "protocol"):
            rt.add_column(h, justify="right" if h in ("published", "measured", "Δ", "n") else "left")
        for tname, rlabel, col, c, g in regression:
            style = _RICH_STYLE[c.agreement(g)]
            d = c.diff(g)
            measured = ("PHANTOM " if c.phantom else "") + f"{g.mean:.2f}" + (f" ± {g.std:.2f}" if g.n > 1 else "")
            rt.add_row(Text(tname), Text(rlabel), Text(col), NO_VALUE if not c.comparable else c.published_text(), Text(measured, style=style),
                       Text(NO_VALUE if d is None else f"{d:+.2f}", style=style), str(g.n), g.preset or "",
                       g.protocol[:12])
        console.print(rt)
