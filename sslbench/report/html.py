"""`sslbench report --format html`: one self-contained page (index.html) that people open.

Everything is inside the one file: the stylesheet, every table of the report with the agreement colours of
the terminal table (green within 1 point of the published value, yellow within 3, red beyond, grey: nothing
measured, magenta: PHANTOM, cyan: measured without a published value or in a column that is not comparable),
the plots as inline base64 PNG, the notes of each table, the rules that decide which runs stand beside a
published number, and the provenance of every run counted (preset, comparability and its reasons, phantom
flag, pre-training corpus and run, data fingerprint, package environment, folder). No script, no external
file, so it renders the same from a mail attachment or a CI artefact.
"""
from __future__ import annotations

import base64
import html
import time
from typing import Any, Mapping, Sequence

from .cells import MIXED_DATA_MARK, MIXED_ENV_MARK, NO_VALUE, OLD_SCORING_MARK, OLD_SCORING_NOTE, Cell, Table

#: agreement -> CSS colour (the terminal table's rich styles, render._RICH_STYLE)
COLOURS = {"green": "#1a7f37", "yellow": "#9a6700", "red": "#cf222e", "grey": "#8c959f", "magenta": "#a21caf",
           "none": "#0969a8"}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #1f2328; max-width: 1400px; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; }
th { background: #f6f8fa; text-align: left; } td.num { text-align: right; white-space: nowrap; }
th.phantom, td.phantom { background: #fdf4ff; } th.apart, td.apart { background: #f0f7ff; }
p.caption { font-style: italic; margin: 0.3em 0; } ul.notes { font-size: 0.85em; color: #57606a; }
.legend span { margin-right: 1.2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
code { font-size: 0.9em; }
""" + "".join(f".{k} {{ color: {v}; font-weight: 600; }}\n" for k, v in COLOURS.items()) + \
    ".grey { font-weight: normal; }\n"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _cell_html(cell: Any, css: str) -> str:
    """A table cell: published value, then each measured group in its agreement colour (one per line)."""
    if not isinstance(cell, Cell):
        return f"<td>{_e(cell)}</td>"
    groups = "<br>".join(f'<span class="{cell.agreement(g)}">{_e(cell.group_text(g))}</span>' for g in cell.groups)
    if cell.comparable:
        inner = _e(cell.published_text()) if cell.groups else f'<span class="grey">{_e(cell.published_text())}</span>'
        inner += f" / {groups}" if groups else ""
    else:
        inner = groups or f'<span class="grey">{_e(NO_VALUE)}</span>'
    return f'<td class="{" ".join(c for c in ("num", css) if c)}">{inner}</td>'


def _column_class(table: Table, j: int) -> str:
    cells = [r.cells[j] for r in table.rows if isinstance(r.cells[j], Cell)]
    if not cells or cells[0].comparable:
        return ""
    return "phantom" if cells[0].phantom else "apart"


def table_html(table: Table) -> str:
    """One report table as an HTML section (title, table, caption, notes)."""
    classes = [_column_class(table, j) for j in range(len(table.headers))]
    head = f"<th>{_e(table.row_header)}</th>" + "".join(
        f'<th class="{c}">{_e(h)}</th>' if c else f"<th>{_e(h)}</th>" for h, c in zip(table.headers, classes))
    body = "".join("<tr><th>" + _e(r.label) + "</th>" + "".join(_cell_html(c, classes[j]) for j, c in enumerate(r.cells))
                   + "</tr>\n" for r in table.rows)
    notes = "".join(f"<li>{_e(n)}</li>" for n in table.notes)
    return (f'<section id="{_e(table.id)}">\n<h2>{_e(table.title)}</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n'
            f'<tbody>\n{body}</tbody>\n</table>\n<p class="caption">{_e(table.caption)}</p>\n'
            f'<ul class="notes">{notes}</ul>\n</section>\n')


PROVENANCE_COLUMNS = (("method", "method"), ("task", "task"), ("seed", "seed"), ("preset", "preset"),
                      ("comparability", "stands"), ("deviations", "why not comparable"), ("phantom", "data"),
                      ("pretrain_corpus", "pre-training corpus"), ("scoring", "scoring"),
                      ("data_fingerprint", "data fingerprint"), ("env", "environment"), ("path", "run folder"))


def _provenance_value(row: Mapping, key: str) -> str:
    v = row.get(key)
    if key == "comparability":
        return "beside the published number" if not v else f"own column: {v}"
    if key == "phantom":
        return "PHANTOM" if v else "real"
    if key == "scoring":
        return "before the empty-set rules of 2026-12-03" if row.get("old_scoring") else "empty-set rules"
    if key == "data_fingerprint" and isinstance(v, str):
        return v[:16]
    if v is None or (isinstance(v, float) and v != v) or v == "":
        return NO_VALUE
    return str(v)


def provenance_html(runs_df) -> str:
    """One row per run counted (a run's NSD / HD95 rows are the same run)."""
    if runs_df is None or len(runs_df) == 0:
        return "<p>No finished fine-tuning run was found: the tables hold the published numbers only.</p>\n"
    runs = runs_df.drop_duplicates("path")
    head = "".join(f"<th>{_e(h)}</th>" for _, h in PROVENANCE_COLUMNS)
    body = []
    for _, row in runs.iterrows():
        cls = ' class="phantom"' if row.get("phantom") else ' class="apart"' if row.get("comparability") else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(_provenance_value(row, k))}</td>" for k, _ in PROVENANCE_COLUMNS)
                    + "</tr>\n")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{''.join(body)}</tbody>\n</table>\n"


RULES = [
    "A measured value stands beside a published one, with Δ = measured - published, only when its run follows "
    "the published protocol: real data everywhere (task and pre-training), --preset paper for the fine-tuning "
    "and its pre-training, the full schedule of the task (and of the method's pre-training), every labelled "
    "case, the published split and scoring (sslbench.report.runs.comparability).",
    "Every other run fills its own column, labelled (phantom), (tiny preset), (reduced schedule) or "
    "(other protocol), and never gets a Δ.",
    "Runs of different protocols are never averaged together: a cell lists each protocol group apart.",
    f"{MIXED_ENV_MARK}: a group whose runs ran under different torch / monai versions; "
    f"{MIXED_DATA_MARK}: a cell whose runs read different data; "
    f"{OLD_SCORING_MARK}: {OLD_SCORING_NOTE}.",
]


def page(tables: Sequence[Table], runs_df=None, images: Sequence[tuple[str, bytes]] = (),
         title: str = "sslbench report", source: str | None = None) -> str:
    """The whole report as one HTML document (``images``: (name, PNG bytes), shown inline)."""
    legend = "".join(f'<span class="{k}">■ {_e(v)}</span>' for k, v in (
        ("green", "within 1 point"), ("yellow", "within 3 points"), ("red", "beyond 3 points"),
        ("grey", "nothing measured"), ("magenta", "PHANTOM"), ("none", "no published value / not comparable")))
    toc = "".join(f'<li><a href="#{_e(t.id)}">{_e(t.title)}</a></li>' for t in tables)
    figures = "".join(
        f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
        f"<figcaption>{_e(name)}</figcaption></figure>\n" for name, data in images)
    phantom = bool(runs_df is not None and len(runs_df) and runs_df["phantom"].astype(bool).any())
    banner = ('<p class="magenta">PHANTOM: some runs below read procedurally generated phantom data; their values '
              "are marked PHANTOM and are never a result on the real dataset.</p>\n" if phantom else "")
    rules = "".join(f"<li>{_e(r)}</li>" for r in RULES)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n"
        f"<p>Generated {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}"
        + (f" from <code>{_e(source)}</code>" if source else "") + ".</p>\n"
        f"{banner}<p class=\"legend\">{legend}</p>\n<ul>{toc}</ul>\n"
        + "".join(table_html(t) for t in tables)
        + (f'<section id="plots">\n<h2>Plots</h2>\n{figures}</section>\n' if figures else "")
        + f'<section id="protocol">\n<h2>Protocol notes</h2>\n<ul>{rules}</ul>\n</section>\n'
        + f'<section id="provenance">\n<h2>Provenance of the measured runs</h2>\n{provenance_html(runs_df)}</section>\n'
        + "</body>\n</html>\n")
