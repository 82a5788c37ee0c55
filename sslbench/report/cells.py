"""What a report table is made of: a Table of Rows whose Cells hold a published value (or none) and the
measured protocol groups (Group: the runs of one protocol, values in percent), with the marks and the agreement
colours every output shares (terminal, Markdown, LaTeX, CSV, HTML)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .runs import COMPARABLE

GREEN_WITHIN = 1.0      # points of Dice / AUC
YELLOW_WITHIN = 3.0
NO_VALUE = "—"
MIXED_ENV_MARK = "‡env"
#: a cell whose runs read different data (root or files: their recorded ``data_fingerprint`` differ)
MIXED_DATA_MARK = "‡data"
#: A segmentation record without metrics.json's ``scoring`` block was scored before the empty-set rules
#: (issue 19): marked, and never pooled with records scored under them.
OLD_SCORING_MARK = "‡scoring"
OLD_SCORING_NOTE = ("scored before the empty-set rules of 2026-12-03 (its metrics.json has no scoring block: a "
                    "structure absent from truth or prediction may count differently); kept apart from runs "
                    "scored under the rules")


@dataclass
class Group:
    """The runs of one protocol in one cell (values in percent)."""

    protocol: str
    values: list[float]
    seeds: list[Any]
    preset: str | None = None
    lam: float | None = None
    series: str | None = None
    paths: list[str] = field(default_factory=list)
    envs: list[str] = field(default_factory=list)
    fingerprints: list[str | None] = field(default_factory=list)
    #: scored before the empty-set rules (no ``scoring`` block in metrics.json): marked OLD_SCORING_MARK
    old_scoring: bool = False
    #: leaderboard answers (sslbench/report/online.py): where each value came from (run folder, date, submission)
    provenance: list[str] = field(default_factory=list)

    @property
    def mixed_env(self) -> bool:
        """The group's runs (or their pre-trainings) ran under more than one torch / monai version."""
        return len(set(self.envs)) > 1

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        if self.n < 2:
            return math.nan
        mu = self.mean
        return math.sqrt(sum((v - mu) ** 2 for v in self.values) / (self.n - 1))

    def label(self) -> str:
        parts = [self.preset] if self.preset else []
        if self.lam is not None and math.isfinite(self.lam):
            parts.append(f"λ={self.lam:g}")
        parts.append(f"p:{self.protocol[:6]}")
        if self.old_scoring:
            parts.append("old scoring")
        return ", ".join(parts)


@dataclass
class Cell:
    """A published value (or none) and the measured protocol groups of one table cell.

    ``kind`` is the comparability of the cell's column: COMPARABLE ("") beside the published value, or one of
    NOT_COMPARABLE (the cell then holds no published value and its groups get no Δ)."""

    metric: str = "dice"
    published: float | None = None
    digits: int = 2
    marks: tuple[str, ...] = ()
    source: str | None = None
    kind: str = COMPARABLE
    groups: list[Group] = field(default_factory=list)

    @property
    def phantom(self) -> bool:
        return self.kind == "phantom"

    @property
    def comparable(self) -> bool:
        return self.kind == COMPARABLE

    @property
    def mixed_data(self) -> bool:
        """The cell's runs read different data (fingerprints that differ; unrecorded ones are not counted)."""
        return len({f for g in self.groups for f in g.fingerprints if f}) > 1

    def published_text(self) -> str:
        if self.published is None:
            return NO_VALUE
        return "".join(self.marks) + f"{self.published:.{self.digits}f}"

    def diff(self, g: Group) -> float | None:
        if not self.comparable or self.published is None:
            return None
        return g.mean - self.published

    def agreement(self, g: Group | None = None) -> str:
        """'green' within 1 point, 'yellow' within 3, 'red' beyond, 'grey' without a measurement,
        'magenta' for phantom data and 'none' for a measurement without a published value."""
        if g is None:
            if not self.groups:
                return "grey"
            g = self.groups[0]
        if self.phantom:
            return "magenta"
        d = self.diff(g)
        if d is None:
            return "none"
        d = abs(round(d, 6))
        return "green" if d <= GREEN_WITHIN else "yellow" if d <= YELLOW_WITHIN else "red"

    def group_text(self, g: Group) -> str:
        s = ("PHANTOM " if self.phantom else "") + f"{g.mean:.2f}"
        if g.n > 1:
            s += f" ± {g.std:.2f}"
        info = []
        d = self.diff(g)
        if d is not None:
            info.append(f"Δ {d:+.2f}")
        info.append(f"n={g.n}")
        s += f" ({', '.join(info)})"
        if g.mixed_env:
            s += f" {MIXED_ENV_MARK}"
        if self.mixed_data:
            s += f" {MIXED_DATA_MARK}"
        if g.old_scoring:
            s += f" {OLD_SCORING_MARK}"
        if len(self.groups) > 1:
            s += f" [{g.label()}]"
        if g.provenance:
            s += " {" + "; ".join(g.provenance) + "}"
        return s

    def text(self) -> str:
        measured = "; ".join(self.group_text(g) for g in self.groups)
        if not self.comparable:
            return measured or NO_VALUE
        if not measured:
            return self.published_text()
        return f"{self.published_text()} / {measured}"


@dataclass
class Row:
    id: str
    label: str
    cells: list[Any]          # Cell, or str for descriptive tables


@dataclass
class Table:
    id: str
    title: str
    caption: str
    row_header: str
    column_ids: list[str]
    headers: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def cell(self, row_id: str, column_id: str) -> Any:
        j = self.column_ids.index(column_id)
        for row in self.rows:
            if row.id == row_id:
                return row.cells[j]
        raise KeyError(f"{self.id}: no row '{row_id}'")

    @property
    def measured(self) -> bool:
        return any(isinstance(c, Cell) and c.groups for r in self.rows for c in r.cells)

    def text_rows(self) -> list[list[str]]:
        return [[r.label] + [c.text() if isinstance(c, Cell) else str(c) for c in r.cells] for r in self.rows]

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.text_rows(), columns=[self.row_header] + self.headers)
