"""docs/ledger.md: every pre-training method has its table, and every override it gives resolves for it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from sslbench import recipes

LEDGER = Path(__file__).resolve().parents[1] / "docs" / "ledger.md"
SET = re.compile(r"`--set ([^`=\s]+)=([^`]+)`")


def sections() -> dict[str, list[list[str]]]:
    """{method: table rows (cells)} of the ledger's ``## <method>`` sections."""
    out: dict[str, list[list[str]]] = {}
    current = None
    for line in LEDGER.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            out[current] = []
        elif current and line.startswith("|") and not set(line) <= set("|- "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] != "Deviation from the official code":
                out[current].append(cells)
    return out


def pretraining_methods() -> list[str]:
    return [m for m in recipes.list_recipes("methods") if recipes.load_method(m).get("pretrain") is not None]


def test_every_pre_training_method_has_a_table():
    found = sections()
    missing = [m for m in pretraining_methods() if not found.get(m)]
    assert not missing, f"docs/ledger.md lacks a table for {missing}"


@pytest.mark.parametrize("method", pretraining_methods())
def test_each_row_restores_with_keys_that_exist(method):
    rows = sections()[method]
    for cells in rows:
        assert len(cells) == 3, cells
        official = cells[2]
        sets = SET.findall(official)
        assert sets or official.startswith("no key"), f"{method}: {official!r} is neither --set KEY=VALUE nor 'no key'"
        recipe = recipes.load_method(method)
        task = "phantom-mmwhs" if recipe["pretrain"]["corpus"] == recipes.TASK_CORPUS else None
        task = "phantom-chestxray14" if recipe.get("only_2d") else task      # a 2D-only method (C2L)
        # one resolution per row: the keys exist for this method and their values pass the schema
        recipes.resolve(method, task, preset="paper", overrides=[f"{k}={v}" for k, v in sets])
