"""`sslbench report`: published tables reproduce the seed cell by cell; measured runs aggregate by protocol;
phantoms are always labelled; every output format renders; a malformed leaderboard gives one line."""
from __future__ import annotations

import json
import io
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sslbench import recipes
from sslbench.report import command
from sslbench.report.command import write_outputs
from sslbench.report.published import default_leaderboard, load_published
from sslbench.report.render import FORMATS, print_rich, render, render_table
from sslbench.report.runs import collect_runs, comparability
from sslbench.report.tables import build_tables
from sslbench.errors import RecipeError
from sslbench.store.records import RunRecord, atomic_write_json

# --------------------------------------------------------------------------------------------------
# The seed's Tables 3-7, transcribed independently of leaderboards/ (as printed, with daggers).
# --------------------------------------------------------------------------------------------------
SEED = {
    "table3": {("0.5", "btcv"): "83.52", ("0.5", "mmwhs"): "90.16",
               ("1.0", "btcv"): "83.85", ("1.0", "mmwhs"): "90.54",
               ("1.5", "btcv"): "83.80", ("1.5", "mmwhs"): "90.48"},
    "table4": {("scratch", "chestxray14"): "75.4", ("mg", "chestxray14"): "77.3",
               ("transvw", "chestxray14"): "77.6", ("c2l", "chestxray14"): "79.0",
               ("simsiam", "chestxray14"): "79.4", ("pcrlv1", "chestxray14"): "79.9",
               ("pcrlv2", "chestxray14"): "81.5", ("voco", "chestxray14"): "82.02"},
    "table5": {("left-ventricle", "mmwhs"): "91.32", ("whole-aorta", "mmwhs"): "91.30",
               ("right-ventricle", "mmwhs"): "94.64", ("left-atrium", "mmwhs"): "86.89",
               ("myocardium", "mmwhs"): "89.16", ("right-atrium", "mmwhs"): "96.35",
               ("pulmonary-artery", "mmwhs"): "84.13", ("average", "mmwhs"): "90.54"},
    "table6": {("swinunetr", "btcv"): "†84.72", ("swinunetr", "flare23"): "87.84",
               ("swinunetr", "amos22-dsc"): "†88.00", ("swinunetr", "amos22-nsd"): "†76.15",
               ("voco", "btcv"): "86.44", ("voco", "flare23"): "90.07",
               ("voco", "amos22-dsc"): "89.06", ("voco", "amos22-nsd"): "78.86"},
    "table7": {**{("swinunetr", f"msd{i:02d}"): f"†{v}" for i, v in zip(
                   (1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
                   ("75.13", "95.89", "81.72", "91.98", "80.23", "63.46", "64.32", "70.54", "94.63", "44.57"))},
               **{("voco", f"msd{i:02d}"): v for i, v in zip(
                   (1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
                   ("76.26", "96.93", "84.98", "92.09", "82.16", "67.74", "67.85", "70.92", "96.34", "45.17"))}},
}
# Row label and column header as rendered (to find each seed cell in the CSV / Markdown output).
ROW_LABELS = {
    "table3": {"0.5": "0.5", "1.0": "1.0", "1.5": "1.5"},
    "table4": {"scratch": "From scratch", "mg": "MG [22]", "transvw": "TransVW [6]", "c2l": "C2L [19]",
               "simsiam": "SimSiam [3]", "pcrlv1": "PCRLv1 [20]", "pcrlv2": "PCRLv2 [21]", "voco": "VoCo"},
    "table5": {"left-ventricle": "Left Ventricle", "whole-aorta": "Whole aorta", "right-ventricle": "Right Ventricle",
               "left-atrium": "Left Atrium", "myocardium": "Myocardium of Left Ventricle",
               "right-atrium": "Right Atrium", "pulmonary-artery": "Pulmonary Artery", "average": "Average"},
    "table6": {"swinunetr": "SwinUNETR [7]", "voco": "VoCo"},
    "table7": {"swinunetr": "†SwinUNETR [7]", "voco": "VoCo"},
}
COLUMN_HEADERS = {
    "table3": {"btcv": "BTCV", "mmwhs": "MM-WHS"},
    "table4": {"chestxray14": "NIH ChestX-ray"},
    "table5": {"mmwhs": "Dice Scores(%)"},
    "table6": {"btcv": "BTCV", "flare23": "Flare23", "amos22-dsc": "Amos22 (DSC)", "amos22-nsd": "Amos22 (NSD)"},
    "table7": {f"msd{i:02d}": f"Task{i}" for i in range(1, 11)},
}
SEED_TABLE1 = [("BTCV [10]", "pre-training", "CT", "pre-train", 24, 6), ("TCIA Covid19 [5]", "pre-training", "CT", "pre-train", 722, 49),
               ("LUNA [13]", "pre-training", "CT", "pre-train", 843, 45), ("BTCV [10]", "downstream", "CT", "segmentation", 24, 6),
               ("LiTs [2]", "downstream", "CT", "segmentation", 100, 31), ("MSD Spleen [1]", "downstream", "CT", "segmentation", 32, 9),
               ("MM-WHS [24]", "downstream", "CT", "segmentation", 14, 6), ("BraTs [14]", "downstream", "MRI", "segmentation", 387, 97),
               ("CC-CCII [18]", "downstream", "CT", "classification", 2514, 1664)]
MMWHS_STRUCTURES = {"left-ventricle": "left ventricle", "whole-aorta": "whole aorta", "right-ventricle": "right ventricle",
                    "left-atrium": "left atrium", "myocardium": "myocardium of left ventricle",
                    "right-atrium": "right atrium", "pulmonary-artery": "pulmonary artery", "average": "mean"}
MMWHS_CLASSES = ["background", "myocardium of left ventricle", "left atrium", "left ventricle", "right atrium",
                 "right ventricle", "whole aorta", "pulmonary artery"]


@pytest.fixture(scope="module")
def published():
    return load_published()


@pytest.fixture(scope="module")
def empty_tables(published):
    return {t.id: t for t in build_tables(published, None)}


def _csv_cells(table) -> dict[tuple[str, str], str]:
    df = pd.read_csv(io.StringIO(render_table(table, "csv")), dtype=str, keep_default_na=False)
    first = df.columns[0]
    return {(row[first], col): row[col] for _, row in df.iterrows() for col in df.columns[1:]}


@pytest.mark.parametrize("table_id", sorted(SEED))
def test_published_tables_reproduce_the_seed_cell_by_cell(published, empty_tables, table_id):
    table = empty_tables[table_id]
    expected = SEED[table_id]
    spec = next(t for t in published["tables"] if t["id"] == table_id)
    in_yaml = {(r["id"], c) for r in spec["rows"] for c in r["cells"]}
    assert in_yaml == set(expected), "the YAML holds exactly the seed's cells"
    csv_cells = _csv_cells(table)
    md = render_table(table, "md")
    md_rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
               for line in md.splitlines() if line.startswith("| ") and not line.startswith("|--")}
    header = md_rows.pop(table.row_header)
    for (row_id, col_id), text in expected.items():
        assert table.cell(row_id, col_id).published_text() == text
        label, head = ROW_LABELS[table_id][row_id], COLUMN_HEADERS[table_id][col_id]
        assert csv_cells[(label, head)] == text, (table_id, row_id, col_id)
        assert md_rows[label][header.index(head)] == text, (table_id, row_id, col_id)


def test_published_sources_marks_and_task_names(published, empty_tables):
    tasks = set(recipes.list_recipes("benchmarks"))
    for spec in published["tables"]:
        if spec["kind"] != "results":
            continue
        for col in spec["columns"]:
            assert col["task"] in tasks, col
        for row in spec["rows"]:
            for col_id, cell in row["cells"].items():
                assert cell["source"].startswith(f"VoCo supplement, Table {spec['number']}")
                assert cell["metric"] in ("dice", "auc", "nsd")
    t4 = next(t for t in published["tables"] if t["id"] == "table4")
    for row in t4["rows"]:
        assert ("[21]" in row["cells"]["chestxray14"]["source"]) == (row["method"] != "voco")
        assert row["cells"]["chestxray14"]["metric"] == "auc"
    t6 = next(t for t in published["tables"] if t["id"] == "table6")
    swin = next(r for r in t6["rows"] if r["id"] == "swinunetr")
    assert {c for c, cell in swin["cells"].items() if cell["marks"] == ["†"]} == {"btcv", "amos22-dsc", "amos22-nsd"}
    assert all("previous papers" in swin["cells"][c]["source"] for c in ("btcv", "amos22-dsc", "amos22-nsd"))
    assert swin["cells"]["amos22-nsd"]["metric"] == "nsd"
    t7 = next(t for t in published["tables"] if t["id"] == "table7")
    assert next(c for c in t7["columns"] if c["id"] == "msd09")["task"] == "msd-spleen"
    assert next(r for r in t7["rows"] if r["id"] == "swinunetr")["marks"] == ["†"]
    # Table 5 rows name the sslbench MM-WHS classes.
    t5 = next(t for t in published["tables"] if t["id"] == "table5")
    assert {r["id"]: r["class"] for r in t5["rows"]} == MMWHS_STRUCTURES
    assert set(MMWHS_STRUCTURES.values()) - {"mean"} <= set(recipes.load_task("mmwhs")["classes"])
    # Table 3 rows are λ of voco; Table 1 as printed.
    t3 = next(t for t in published["tables"] if t["id"] == "table3")
    assert [(r["method"], r["params"]["lambda"]) for r in t3["rows"]] == [("voco", 0.5), ("voco", 1.0), ("voco", 1.5)]
    t1 = next(t for t in published["tables"] if t["id"] == "table1")
    assert [(r["dataset"], r["stage"], r["modality"], r["task"], r["train"], r["valid"]) for r in t1["rows"]] == SEED_TABLE1
    rendered = render_table(empty_tables["table1"], "csv")
    assert "CC-CCII [18],downstream,CT,classification,2514,1664" in rendered


# --------------------------------------------------------------------------------------------------
# Fake run folders, written the way sslbench/protocol.py writes them
# --------------------------------------------------------------------------------------------------
def _cfg(method: str, task: str, seed: int, lam: float | None = 1.0, lr: float = 2e-3, preset: str = "paper",
         init: dict | None = None, phantom: bool = False, labeled: int | None = None, steps: int | None = None) -> dict:
    params = {"variant": "paper", "n": 4} | ({"lambda": lam} if lam is not None else {})
    task_cfg = {"name": task, "title": "MM-WHS (phantom)" if phantom else "MM-WHS (CT)", "kind": "segmentation",
                "classes": MMWHS_CLASSES, "phantom": phantom, "finetune": {"lr": lr, "epochs": 1000, "max_steps": steps}}
    if labeled is not None:
        task_cfg["finetune"]["labeled_cases"] = labeled
    if phantom:
        task_cfg["extends"] = "mmwhs"
    return {"run": {"seed": seed, "device": "cpu", "out": "runs", "preset": preset, "label": method},
            "model": {"name": "swinunetr", "feature_size": 12},
            "method": {"name": method, "status": "available", "params": params},
            "task": task_cfg, "recipe_files": {"task": f"benchmarks/{task}.yaml"}, "init": init}


def _pretrain(runs: Path, method: str, seed: int, lam: float, phantom: bool = False) -> tuple[Path, str]:
    corpus = "phantom-corpus" if phantom else "voco-corpus"
    cfg = {"run": {"seed": seed, "preset": "paper", "out": "runs"}, "model": {"name": "swinunetr"},
           "method": {"name": method, "params": {"lambda": lam}}, "corpus": {"name": corpus}}
    protocol = recipes.protocol_hash(cfg)
    rec = RunRecord(runs / "pretrain" / method / corpus / f"{protocol}-s{seed}")
    rec.path.mkdir(parents=True)
    rec.write_recipe({**cfg, "data": {"root": "/somewhere", "phantom": phantom}})
    atomic_write_json(rec.path / "metrics.json", {"kind": "pretrain", "method": method, "protocol": protocol})
    rec.set_status(state="finished", protocol=protocol)
    return rec.path, protocol


def write_run(runs: Path, *, method: str = "voco", task: str = "mmwhs", seed: int = 0, dice: float = 0.9,
              per_class: dict | None = None, state: str = "finished", pretrain_from: Path | None = None,
              pretrain_hash: str | None = None, scoring: bool = True, extra: dict | None = None, **kw) -> Path:
    init = {"source": "pretrain", "hash": pretrain_hash, "method": method} if pretrain_from else None
    cfg = _cfg(method, task, seed, init=init, **kw)
    protocol = recipes.protocol_hash(cfg)           # as protocol.finetune records it (seed-free)
    rec = RunRecord(runs / "finetune" / task / method / f"{protocol}-s{seed}")
    rec.path.mkdir(parents=True)
    phantom = bool(kw.get("phantom"))
    rec.write_recipe({**cfg, "data": {"root": "/data/x", "phantom": phantom}})
    rec.set_status(state="running", stage="finetune", step=0, protocol=protocol)
    if state != "finished":
        return rec.path
    per_class = per_class or {c: dice for c in MMWHS_CLASSES[1:]}
    metrics = {"kind": "finetune", "task": task, "task_title": cfg["task"]["title"], "method": method,
               "method_recipe": method, "variant": "paper", "preset": cfg["run"]["preset"], "seed": seed,
               "protocol": protocol, "phantom": phantom, "data_root": "/data/x", "metric": "dice",
               "mean_dice": dice, "std_dice": 0.01, "per_class": per_class, "n_cases": 2,
               "cases": [{"case": "a", "mean": dice}], "checkpoint": "last", "steps": 120,
               "init": {**(init or {}), **({"pretrain_run": str(pretrain_from)} if pretrain_from else {}), "load": None},
               "finished": "2025-01-01T00:00:00", **(extra or {})}
    if scoring:                          # records scored under the empty-set rules of 2026-12-03 carry the block
        metrics["scoring"] = {"dice": {"both_empty": "nan", "one_empty": 0.0}}
    atomic_write_json(rec.path / "metrics.json", metrics)
    rec.set_status(state="finished", finished=metrics["finished"])
    return rec.path


def _tables(runs: Path) -> tuple[pd.DataFrame, dict]:
    df = collect_runs(runs)
    return df, {t.id: t for t in build_tables(load_published(), df)}


def test_collect_runs_aggregates_mean_and_std_over_seeds(tmp_path):
    runs = tmp_path / "runs"
    values = [0.90, 0.91, 0.92]
    for seed, v in enumerate(values):
        per_class = {c: v for c in MMWHS_CLASSES[1:]} | {"left ventricle": v - 0.05}
        write_run(runs, seed=seed, dice=v, per_class=per_class)
    write_run(runs, seed=7, dice=0.1, state="running")                 # unfinished: ignored
    write_run(runs, seed=0, dice=0.5, lam=0.5)                            # λ sweep: Table 3 only
    df, tables = _tables(runs)
    assert len(df) == 4 and sorted(df["seed"]) == [0, 0, 1, 2]
    df = df[df["lambda"] == 1.0]
    assert df["protocol"].nunique() == 1                                   # seeds share one protocol
    assert {"task", "method", "variant", "seed", "preset", "protocol", "phantom", "mean_dice", "lambda",
            "path", "dice:left ventricle"} <= set(df.columns)
    assert set(df["lambda"]) == {1.0} and not df["phantom"].any()
    mean = sum(values) / 3 * 100
    std = math.sqrt(sum((100 * v - mean) ** 2 for v in values) / 2)
    avg = tables["table5"].cell("average", "mmwhs")
    (g,) = avg.groups
    assert g.n == 3 and g.mean == pytest.approx(mean) and g.std == pytest.approx(std)
    assert avg.text() == f"90.54 / {mean:.2f} ± {std:.2f} (Δ {mean - 90.54:+.2f}, n=3)"
    lv = tables["table5"].cell("left-ventricle", "mmwhs")
    assert lv.groups[0].mean == pytest.approx(mean - 5.0)
    assert avg.agreement() == "green" and lv.agreement() == "red"
    # Table 3: only the λ = 1.0 row is measured; the comparison's voco x MM-WHS too.
    t3 = tables["table3"]
    assert t3.cell("1.0", "mmwhs").groups[0].n == 3 and t3.cell("0.5", "mmwhs").groups[0].n == 1
    assert not t3.cell("1.5", "mmwhs").groups and not t3.cell("1.0", "btcv").groups
    assert [g.n for g in tables["comparison"].cell("voco", "mmwhs").groups] == [3]    # λ = 1 (published setting)
    assert not tables["table6"].measured                                  # test-set table: never filled


def test_seeds_from_their_own_pretraining_share_a_protocol(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        pre, h = _pretrain(runs, "voco", seed, 0.5)
        write_run(runs, seed=seed, lam=0.5, dice=0.8 + seed / 100, pretrain_from=pre, pretrain_hash=h)
    df, tables = _tables(runs)
    assert df["protocol"].nunique() == 1
    (g,) = tables["table3"].cell("0.5", "mmwhs").groups
    assert g.n == 2 and g.lam == 0.5


def test_runs_of_other_process_counts_are_other_protocols(tmp_path):
    """N processes train with an N times larger global batch: a fine-tuning under torchrun, or one from a
    pre-training under torchrun, never joins the single-process seeds (the report once recomputed the protocol
    from recipe.yaml without the world size)."""
    runs = tmp_path / "runs"
    pre1, h1 = _pretrain(runs, "voco", 0, 1.0)
    write_run(runs, seed=0, dice=0.80, pretrain_from=pre1, pretrain_hash=h1)
    write_run(runs, seed=1, dice=0.81, pretrain_from=pre1, pretrain_hash=h1, extra={"world_size": 2})
    pre2, h2 = _pretrain(runs, "voco", 2, 1.0)
    m = json.loads((pre2 / "metrics.json").read_text())
    atomic_write_json(pre2 / "metrics.json", {**m, "world_size": 2})
    write_run(runs, seed=2, dice=0.82, pretrain_from=pre2, pretrain_hash=h2)
    df, tables = _tables(runs)
    assert df["protocol"].nunique() == 3
    assert sorted(g.n for g in tables["table3"].cell("1.0", "mmwhs").groups) == [1, 1, 1]
    assert len(set(df["series"])) == 3


def test_different_protocols_are_never_averaged(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, seed=0, dice=0.90)
    write_run(runs, seed=1, dice=0.92)
    write_run(runs, seed=0, dice=0.50, lr=1e-2)                          # another protocol, same cell
    df, tables = _tables(runs)
    assert df["protocol"].nunique() == 2
    cell = tables["table5"].cell("average", "mmwhs")
    assert [g.n for g in cell.groups] == [2, 1]
    assert cell.groups[0].mean == pytest.approx(91.0) and cell.groups[1].mean == pytest.approx(50.0)
    text = cell.text()
    assert text.count("p:") == 2 and "n=2" in text and "n=1" in text
    assert "71.00" not in text                                            # never the mean over both protocols
    md = render_table(tables["table5"], "md")
    assert "never averaged" in md


def _env(folder: Path, torch: str, monai: str = "1.6.1") -> None:
    atomic_write_json(folder / "env.json", {"python": "3.11.7", "torch": torch, "monai": monai, "device": "cpu"})


def test_runs_of_different_package_environments_are_flagged(tmp_path, capsys):
    runs = tmp_path / "runs"
    _env(write_run(runs, seed=0, dice=0.90), "2.13.0")
    _env(write_run(runs, seed=1, dice=0.92), "2.14.1")
    df, tables = _tables(runs)
    assert sorted(df["env"]) == ["torch 2.13.0 + monai 1.6.1", "torch 2.14.1 + monai 1.6.1"]
    cell = tables["table5"].cell("average", "mmwhs")
    (g,) = cell.groups                                                   # one protocol: one group, flagged
    assert g.n == 2 and g.mixed_env and cell.text().endswith("(Δ +0.46, n=2) ‡env")
    md = render_table(tables["table5"], "md")
    assert "MIXED ENVIRONMENTS" in md and "torch 2.13.0 + monai 1.6.1 (1 run); torch 2.14.1 + monai 1.6.1 (1 run)" in md
    assert "$^\\ddagger$env" in render_table(tables["table5"], "latex")
    assert command.main(["--runs", str(runs), "--format", "csv"]) == 0
    assert "2 package environments" in capsys.readouterr().err


def test_one_environment_is_not_flagged_and_cells_of_different_ones_are_noted(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        _env(write_run(runs, seed=seed, dice=0.9), "2.14.1")
    df, tables = _tables(runs)
    md = render_table(tables["table5"], "md")
    assert "‡env" not in md and "MIXED" not in md
    assert command.main(["--runs", str(runs), "--format", "csv"]) == 0
    assert "package environments" not in capsys.readouterr().err
    # another method's cell under another monai: no group mixes, but the table does
    _env(write_run(runs, method="mg", seed=0, dice=0.8), "2.14.1", monai="1.5.0")
    df, tables = _tables(runs)
    assert "MIXED" not in render_table(tables["table5"], "md")          # Table 5 holds VoCo's runs only
    md = render_table(tables["comparison"], "md")                        # methods x tasks: both
    assert "‡env" not in md and "MIXED ENVIRONMENTS" in md
    assert "torch 2.14.1 + monai 1.5.0 (1 run); torch 2.14.1 + monai 1.6.1 (2 runs)" in md


def test_a_pretraining_under_other_versions_is_part_of_the_environment(tmp_path):
    runs = tmp_path / "runs"
    for seed, pre_torch in ((0, "2.14.1"), (1, "2.11.0")):
        pre, h = _pretrain(runs, "voco", seed, 1.0)
        _env(pre, pre_torch)
        _env(write_run(runs, seed=seed, pretrain_from=pre, pretrain_hash=h), "2.14.1")
    df, tables = _tables(runs)
    assert sorted(df["env"]) == ["torch 2.14.1 + monai 1.6.1",
                                 "torch 2.14.1 + monai 1.6.1 (pre-training: torch 2.11.0 + monai 1.6.1)"]
    (g,) = tables["table5"].cell("average", "mmwhs").groups
    assert g.mixed_env


def test_phantom_runs_are_labelled_phantom_in_every_format(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs, task="phantom-mmwhs", seed=seed, dice=0.6 + seed / 100, phantom=True)
    df, tables = _tables(runs)
    assert list(df["base_task"]) == ["mmwhs", "mmwhs"] and df["phantom"].all()
    t5 = tables["table5"]
    assert t5.headers == ["Dice Scores(%)", "Dice Scores(%) (phantom)"]
    real, phantom = t5.cell("average", "mmwhs"), t5.cell("average", "mmwhs@phantom")
    assert not real.groups and real.text() == "90.54"                    # the real dataset's cell stays published-only
    assert phantom.published is None and phantom.diff(phantom.groups[0]) is None
    assert phantom.text().startswith("PHANTOM 60.50 ± 0.71") and "Δ" not in phantom.text()
    assert phantom.agreement() == "magenta"
    for table in (t5, tables["table3"], tables["comparison"]):
        for fmt in FORMATS:
            out = render_table(table, fmt)
            assert "PHANTOM" in out and "(phantom)" in out, (table.id, fmt)
    console = _console()
    print_rich([t5], console)
    assert "PHANTOM" in console.export_text()


def _console():
    from rich.console import Console

    return Console(record=True, width=250, file=io.StringIO(), color_system="truecolor")


def test_every_format_renders(tmp_path, empty_tables):
    runs = tmp_path / "runs"
    write_run(runs, seed=0, dice=0.9)
    _, tables = _tables(runs)
    tl = list(tables.values())
    md, tex, htm, csv = (render(tl, f) for f in ("md", "latex", "html", "csv"))
    assert md.count("### Table") == 6 and "| λ" in md
    assert tex.count("\\begin{table}") == 7 and "\\begin{tabular}" in tex
    assert "90.54 / 90.00 ($\\Delta$ -0.54, n=1)" in render_table(tables["table5"], "latex")
    assert "$\\lambda$" in tex and "$^\\dagger$84.72" in tex and "Dice Scores(\\%)" in tex
    assert htm.count("<table>") == 7 and "&lt;" not in htm.replace("<", "")
    assert csv.count("# Table") == 6
    t5 = pd.read_csv(io.StringIO(render_table(tables["table5"], "csv")))
    assert list(t5.columns) == ["Organs", "Dice Scores(%)"] and len(t5) == 8
    assert t5.iloc[7, 1].startswith("90.54 / 90.00 (Δ -0.54, n=1)")
    with pytest.raises(RecipeError, match="--format"):
        render_table(tables["table5"], "docx")


def test_rich_colours_by_agreement(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, seed=0, dice=0.9100)                                 # average 90.54 -> +0.46: green
    write_run(runs, seed=0, dice=0.8800, lr=1e-2)                        # -2.54: yellow
    write_run(runs, seed=0, dice=0.8000, lr=1e-1)                        # -10.54: red
    _, tables = _tables(runs)
    cell = tables["table5"].cell("average", "mmwhs")
    assert sorted(cell.agreement(g) for g in cell.groups) == ["green", "red", "yellow"]
    assert tables["table5"].cell("whole-aorta", "mmwhs").agreement() in ("green", "yellow", "red")
    assert tables["table4"].cell("voco", "chestxray14").agreement() == "grey"
    console = _console()
    print_rich([tables["table5"], tables["table4"]], console)
    out = console.export_text(styles=True)
    assert "Regression" in out and "\x1b[" in out


# --------------------------------------------------------------------------------------------------
# Validation of the leaderboard YAML
# --------------------------------------------------------------------------------------------------
def _mutate(data: dict, fn) -> dict:
    fn(data)
    return data


def _table(data, tid):
    return next(t for t in data["tables"] if t["id"] == tid)


def _leaderboard_error(tmp_path, mutation) -> tuple[Path, str]:
    """(the file, the error) of loading the default leaderboard after ``mutation``."""
    data = yaml.safe_load(default_leaderboard().read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_mutate(data, mutation), allow_unicode=True, sort_keys=False))
    with pytest.raises(RecipeError) as info:
        load_published(bad)
    return bad, str(info.value)


@pytest.mark.parametrize("mutation, key", [
    (lambda d: _table(d, "table3")["rows"][0]["cells"]["btcv"].__setitem__("value", "83.5x"),
     "tables[1].rows[0].cells.btcv.value"),
    (lambda d: _table(d, "table5")["rows"][2]["cells"]["mmwhs"].pop("source"), "tables[3].rows[2].cells.mmwhs.source"),
    (lambda d: _table(d, "table6")["rows"][0]["cells"]["flare23"].__setitem__("metric", "hd95"),
     "tables[4].rows[0].cells.flare23.metric"),
    (lambda d: _table(d, "table7")["rows"][1].__setitem__("cels", {}), "tables[5].rows[1].cels"),
    (lambda d: _table(d, "table4")["rows"][0]["cells"].__setitem__("chest", {}), "tables[2].rows[0].cells.chest"),
    (lambda d: _table(d, "table1")["rows"][3].__setitem__("train", -1), "tables[0].rows[3].train"),
    (lambda d: _table(d, "comparison")["published"][0]["ref"].__setitem__("row", "2.0"),
     "tables[6].published[0].ref.row"),
    (lambda d: _table(d, "table5")["params"].__setitem__("lambda", "one"), "tables[3].params.lambda"),
    (lambda d: d.__setitem__("tables", {}), "tables"),
])
def test_malformed_leaderboard_gives_one_line_naming_file_and_key(tmp_path, mutation, key):
    bad, msg = _leaderboard_error(tmp_path, mutation)
    assert "\n" not in msg and str(bad) in msg and f"'{key}'" in msg, msg


@pytest.mark.parametrize("mutation, key, says", [
    (lambda d: _table(d, "table3")["rows"][0]["cells"]["btcv"].__setitem__("value", float("nan")),
     "tables[1].rows[0].cells.btcv.value", "expected a finite number, got nan"),
    (lambda d: _table(d, "table6")["rows"][0]["cells"]["flare23"].__setitem__("metric", "nsd"),
     "tables[4].rows[0].cells.flare23.metric", "expected 'dice' (the metric of column 'flare23'), got 'nsd'"),
    (lambda d: _table(d, "table4")["rows"][0]["cells"].__setitem__("chest", {}),
     "tables[2].rows[0].cells.chest", "(did you mean 'chestxray14'?); expected one of chestxray14"),
    (lambda d: _table(d, "table5")["rows"][1].__setitem__("id", _table(d, "table5")["rows"][0]["id"]),
     "tables[3].rows[1].id", "expected an id not used by another row"),
    (lambda d: _table(d, "table5")["columns"].append(dict(_table(d, "table5")["columns"][0])),
     f"tables[3].columns[{len(yaml.safe_load(default_leaderboard().read_text())['tables'][3]['columns'])}].id",
     "expected an id not used by another column"),
    (lambda d: _table(d, "table5").__setitem__("marks_legend", {"*": " "}), "tables[3].marks_legend.*",
     "expected a non-empty string, got ' '"),
    (lambda d: _table(d, "table1").__setitem__("number", 0), "tables[0].number", "expected an integer >= 1, got 0"),
    (lambda d: d["tables"][0].__setitem__("kind", "result"), "tables[0].kind", "did you mean 'results'?"),
    (lambda d: d["tables"][0].pop("kind"), "tables[0].kind", "missing key"),
    (lambda d: d.__setitem__("schema", 2), "schema", "expected one of 1, got 2"),
])
def test_leaderboard_errors_say_what_was_expected_and_found(tmp_path, mutation, key, says):
    bad, msg = _leaderboard_error(tmp_path, mutation)
    assert "\n" not in msg and msg.startswith(f"{bad}: ") and f"'{key}'" in msg and says in msg, msg


def test_unparsable_leaderboard_and_cli_error(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("tables: [\n")
    with pytest.raises(RecipeError, match=re.escape(str(bad))):
        load_published(bad)
    assert command.main(["--published", str(bad), "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def test_main_without_runs_prints_published_tables(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert command.main([]) == 0
    cap = capsys.readouterr()
    for needle in ("### Table 3", "### Table 5", "| 1.0 | 83.85  | 90.54    |", "91.32", "†84.72", "45.17", "82.02"):
        assert needle in cap.out, needle
    assert "sslbench sweep lambda --task mmwhs" in cap.err and "sslbench run --method voco --task mmwhs" in cap.err
    assert command.main(["--runs", str(tmp_path / "nowhere"), "--format", "csv"]) == 0
    assert "# Table 7" in capsys.readouterr().out


def test_main_out_writes_one_file_per_table_and_plots(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "rendered"
    for lam in (0.5, 1.0, 1.5):
        for seed in (0, 1):
            write_run(runs, seed=seed, lam=lam, dice=0.85 + lam / 100 + seed / 200)
            write_run(runs, task="phantom-mmwhs", seed=seed, lam=lam, dice=0.5 + seed / 100, phantom=True)
    assert command.main(["--runs", str(runs), "--out", str(out), "--format", "latex"]) == 0
    names = sorted(p.name for p in out.iterdir())
    tables = [f"{t}.tex" for t in ("table1", "table3", "table4", "table5", "table6", "table7", "comparison")]
    assert set(tables) <= set(names) and not [n for n in names if n.startswith(".")]
    assert "PHANTOM" in (out / "table3.tex").read_text()
    pytest.importorskip("matplotlib")
    assert {"table3_lambda.png", "table5_mmwhs_structures.png"} <= set(names)
    assert (out / "table3_lambda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No measurement, no plot.
    shutil.rmtree(out)
    assert command.main(["--runs", str(tmp_path / "empty"), "--out", str(out)]) == 0
    assert not list(out.glob("*.png")) and (out / "table5.md").is_file()


# --------------------------------------------------------------------------------------------------
# Label efficiency (sslbench/report/efficiency.py)
# --------------------------------------------------------------------------------------------------
def test_t_interval_and_paired_difference_by_hand():
    from sslbench.report.efficiency import paired_difference, t_interval

    # [1, 2, 3]: mean 2, s = 1, t_{0.975, 2} = 4.302653 -> half width 4.302653 / sqrt(3) = 2.484138
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and lo == pytest.approx(2 - 2.484138, abs=1e-6) and hi == pytest.approx(2 + 2.484138, abs=1e-6)
    assert t_interval([5.0])[0] == 5.0 and math.isnan(t_interval([5.0])[1])
    d = paired_difference({0: 5.0, 1: 7.0, 2: 9.0}, {0: 4.0, 1: 5.0, 2: 6.0, 3: 100.0})   # seed 3: no pair
    assert d[0] == 2.0 and d[3] == 3 and d[1] == pytest.approx(2 - 2.484138, abs=1e-6)


def test_label_efficiency_table_pairs_by_seed_and_never_mixes_fine_tuning_protocols(tmp_path):
    runs = tmp_path / "runs"
    scores = {"scratch": [0.70, 0.72, 0.74], "supervised": [0.80, 0.83, 0.86], "voco": [0.69, 0.73, 0.74]}
    for method, values in scores.items():
        for seed, v in enumerate(values):
            for labeled in (2, 6):
                write_run(runs, method=method, task="phantom-mmwhs", seed=seed, dice=v + (0.05 if labeled == 6 else 0),
                          phantom=True, labeled=labeled)
    write_run(runs, method="voco", task="phantom-mmwhs", seed=0, dice=0.99, phantom=True, labeled=2, steps=400)
    write_run(runs, method="voco", task="mmwhs", seed=0, dice=0.5)          # no labeled_cases: not this table
    df, tables = _tables(runs)
    assert "label_efficiency" not in tables                                   # real runs: none set labeled_cases
    t = tables["label_efficiency_phantom"]
    assert [r.id for r in t.rows] == ["scratch", "supervised", "voco"]
    two = [j for j, h in enumerate(t.headers) if h.startswith("mmwhs · 2 labelled")]
    assert len(two) == 2 and all("[ft:" in t.headers[j] for j in two)        # two fine-tuning protocols, apart
    main_col = next(j for j in two if "Δ" in t.rows[1].cells[j])
    other = next(j for j in two if j != main_col)
    # supervised - scratch per seed: 10, 11, 12 -> 11 [8.5, 13.5], excludes 0
    assert t.rows[1].cells[main_col] == "PHANTOM 83.0 [75.5, 90.5] Δ +11.0 [+8.5, +13.5]* n=3"
    voco = t.rows[2].cells[main_col]
    assert "Δ +0.0" in voco and "*" not in voco                             # -1, +1, 0: the interval holds 0
    assert t.rows[2].cells[other] == "PHANTOM 99.0 n=1"                     # no scratch ran that protocol
    assert t.rows[0].cells[other] == "—"
    six = next(j for j, h in enumerate(t.headers) if h.startswith("mmwhs · 6 labelled"))
    assert t.rows[1].cells[six].startswith("PHANTOM 88.0 [80.5, 95.5] Δ +11.0")
    written = write_outputs(list(tables.values()), df, tmp_path / "out", "md")
    assert tmp_path / "out" / "label_efficiency_phantom.png" in written
    assert "PHANTOM" in (tmp_path / "out" / "label_efficiency_phantom.md").read_text()


def _file_start(runs: Path, seed: int, dice: float, file_hash: str, pre: Path | None, run_key: str | None,
                labeled: int = 2, cases: list | None = None, scoring: bool = True) -> Path:
    """A phantom fine-tuning record as ``sslbench finetune --init FILE`` writes it: the file's hash in the recipe,
    and (when the file is a recorded pre-training's backbone) that run's folder and run key in metrics.json."""
    init = {"source": "file", "hash": file_hash, "method": "voco"}
    cfg = _cfg("voco", "phantom-mmwhs", seed, init=init, phantom=True, labeled=labeled)
    protocol = recipes.protocol_hash(cfg)
    rec = RunRecord(runs / "finetune" / "phantom-mmwhs" / "voco" / f"{protocol}-s{seed}")
    rec.path.mkdir(parents=True)
    rec.write_recipe({**cfg, "data": {"root": "/data/x", "phantom": True}})
    per_class = {c: dice for c in MMWHS_CLASSES[1:]}
    cases = cases if cases is not None else [{"case": k, **per_class, "mean": dice} for k in ("a", "b")]
    metrics = {"kind": "finetune", "task": "phantom-mmwhs", "method": "voco", "preset": "paper", "seed": seed,
               "protocol": protocol, "phantom": True, "metric": "dice", "mean_dice": dice, "per_class": per_class,
               "n_cases": len(cases), "cases": cases, "steps": 400, "finished": "2026-12-07T00:00:00",
               "init": {**init, **({"pretrain_run": str(pre)} if pre else {}),
                        **({"run_key": run_key} if run_key else {})}}
    if scoring:
        metrics["scoring"] = {"dice": {"both_empty": "nan", "one_empty": 0.0}}
    atomic_write_json(rec.path / "metrics.json", metrics)
    rec.set_status(state="finished", finished=metrics["finished"])
    return rec.path


def _executed_pretraining(runs: Path, sub: str, key: str) -> Path:
    """One execution of VoCo's pre-training recipe (seed 0), in its own folder with its own run key."""
    cfg = {"run": {"seed": 0, "preset": "paper", "out": "runs"}, "model": {"name": "swinunetr"},
           "method": {"name": "voco", "params": {"lambda": 1.0}}, "corpus": {"name": "phantom-corpus"}}
    rec = RunRecord(runs / sub / "pretrain" / "voco" / "phantom-corpus" / f"{key}-s0")
    rec.path.mkdir(parents=True)
    rec.write_recipe({**cfg, "data": {"root": "/somewhere", "phantom": True}})
    atomic_write_json(rec.path / "metrics.json", {"kind": "pretrain", "method": "voco", "run_key": key,
                                                  "protocol": recipes.protocol_hash(cfg), "steps": 500})
    rec.set_status(state="finished")
    return rec.path


def test_init_files_of_one_recorded_pretraining_recipe_share_a_protocol(tmp_path):
    # seeds 1-2 fine-tuned from a second execution of the pre-training seed 0 started from (another machine,
    # another backbone file): one protocol, as `sslbench run` names it; a file outside any record stays apart
    runs = tmp_path / "runs"
    first = _executed_pretraining(runs, "a", "aaaaaaaaaaaa")
    again = _executed_pretraining(runs, "b", "bbbbbbbbbbbb")
    _file_start(runs, 0, 0.70, "hash-of-file-1", first, "aaaaaaaaaaaa")
    _file_start(runs, 1, 0.74, "hash-of-file-2", again, "bbbbbbbbbbbb")
    _file_start(runs, 2, 0.78, "hash-of-file-2", again, "bbbbbbbbbbbb")
    _file_start(runs, 3, 0.50, "hash-of-file-3", None, None)                     # some file: its hash names it
    _file_start(runs, 4, 0.60, "hash-of-file-2", again, "cccccccccccc")       # the folder holds another run now
    _file_start(runs, 6, 0.72, "hash-of-file-4", first, None)                 # an older record: no run key
    df = collect_runs(runs).set_index("seed")
    assert df.loc[0, "protocol"] == df.loc[1, "protocol"] == df.loc[2, "protocol"] == df.loc[6, "protocol"]
    assert df.loc[3, "protocol"] != df.loc[0, "protocol"] and df.loc[4, "protocol"] != df.loc[0, "protocol"]
    assert df.loc[4, "protocol"] != df.loc[3, "protocol"]                     # two files, two hashes
    assert list(df.loc[[0, 1, 2], "pretrain_steps"]) == [500, 500, 500]
    # the joined protocol is the one a start recorded with init source pretrain (as `sslbench run` records it)
    # from that recipe gets, for the same fine-tuning recipe
    pre_cfg = yaml.safe_load((first / "recipe.yaml").read_text())
    write_run(runs, method="voco", task="phantom-mmwhs", seed=5, dice=0.7, phantom=True, labeled=2,
              pretrain_from=first, pretrain_hash="recorded-with-its-seed")
    df = collect_runs(runs).set_index("seed")
    assert pre_cfg["method"]["name"] == "voco" and df.loc[5, "protocol"] == df.loc[0, "protocol"]
    assert (df.loc[[0, 1, 2, 5, 6], "comparability"] == "phantom").all()
    # another file of that run's folder (here: its last training checkpoint) is no backbone: its hash names it
    other = _file_start(runs, 7, 0.7, "hash-of-last", first, "aaaaaaaaaaaa")
    m = json.loads((other / "metrics.json").read_text())
    m["init"]["path"] = str(first / "checkpoints" / "last.pt")
    atomic_write_json(other / "metrics.json", m)
    df = collect_runs(runs).set_index("seed")
    assert df.loc[7, "protocol"] != df.loc[0, "protocol"]


def test_scoring_before_the_rules_joins_only_where_no_case_had_an_empty_truth(tmp_path):
    from sslbench.report.efficiency import label_efficiency_tables
    from sslbench.report.runs import scored_alike_by_the_rules

    full = {"per_class": {"LV": 0.5, "RV": 0.7}, "n_cases": 2, "metric": "dice",
            "cases": [{"case": "a", "LV": 0.4, "RV": 0.7, "mean": 0.55}, {"case": "b", "LV": 0.6, "RV": 0.7}]}
    assert scored_alike_by_the_rules(full, "dice")
    assert not scored_alike_by_the_rules(full, "nsd")                         # NSD is computed otherwise since
    for broken in ({"cases": [{"case": "a", "LV": 0.4, "RV": float("nan")}, {"case": "b", "LV": 0.6, "RV": 0.7}]},
                   {"cases": [{"case": "a", "LV": 0.4, "RV": None}, {"case": "b", "LV": 0.6, "RV": 0.7}]},
                   {"cases": [{"case": "a", "LV": 0.4}, {"case": "b", "LV": 0.6, "RV": 0.7}]},    # RV not scored
                   {"n_cases": 3}, {"cases": []}, {"per_class": {}}):
        assert not scored_alike_by_the_rules({**full, **broken}, "dice"), broken
    # in the label-efficiency table: scratch and voco scored before the rules; voco s2 had an empty truth
    runs = tmp_path / "runs"
    pre = _executed_pretraining(runs, "a", "aaaaaaaaaaaa")
    per = {c: 0.7 for c in MMWHS_CLASSES[1:]}
    for seed, v in enumerate((0.70, 0.72, 0.74)):
        write_run(runs, method="scratch", task="phantom-mmwhs", seed=seed, dice=v, phantom=True, labeled=2,
                  scoring=False, per_class=per)
    for seed, v in enumerate((0.75, 0.78)):                                   # every case, every class: joins
        _file_start(runs, seed, v, "f", pre, "aaaaaaaaaaaa", scoring=False)
    empty = [{"case": "a", **per, "left atrium": None}, {"case": "b", **per}]
    _file_start(runs, 2, 0.9, "f", pre, "aaaaaaaaaaaa", scoring=False, cases=empty)
    df = collect_runs(runs)
    assert sorted(df[df["method"] == "voco"]["old_scoring"]) == [False, False, True]
    # write_run's scratch rows list no per-class case values: not provably alike, so their own era
    assert df[df["method"] == "scratch"]["old_scoring"].all()
    (t,) = label_efficiency_tables(df)
    voco = t.rows[[r.id for r in t.rows].index("voco")].cells[0]
    # the two joined records are never paired with the old-era scratch; the old one is, marked
    assert voco.startswith("PHANTOM 76.5 [57.4, 95.6] n=2; PHANTOM 90.0 Δ +16.0 n=1 ‡scoring")
    assert any("‡scoring" in n for n in t.notes)
    from sslbench.report.efficiency import label_efficiency_plot
    pytest.importorskip("matplotlib")
    (png,) = label_efficiency_plot(df, tmp_path / "plot")       # eras in one frame: the plot is drawn all the same
    assert png.name == "label_efficiency_phantom.png" and png.stat().st_size > 0
    # a seed recorded twice (two results folders merged) counts once, at its records' mean, and says so
    first_s0 = next(p.parent for p in (runs / "finetune").rglob("metrics.json")
                    if json.loads(p.read_text())["method"] == "voco" and json.loads(p.read_text())["seed"] == 0)
    twin = first_s0.with_name(first_s0.name + "-other-machine")
    shutil.copytree(first_s0, twin)
    m = json.loads((twin / "metrics.json").read_text())
    m["mean_dice"] = 0.85
    atomic_write_json(twin / "metrics.json", m)
    (t,) = label_efficiency_tables(collect_runs(runs))
    voco = t.rows[[r.id for r in t.rows].index("voco")].cells[0]
    # seed 0: (75 + 85) / 2 = 80, seed 1: 78 -> 79.0 over n=2 seeds
    assert voco.startswith("PHANTOM 79.0 [66.3, 91.7] n=2 (seed 0: several records, their mean); "), voco
    shutil.rmtree(twin)
    # its NSD (computed on boundary voxels before the rules, on surface areas since) never joins
    nsd = _file_start(runs, 3, 0.8, "f", pre, "aaaaaaaaaaaa", scoring=False)
    m = json.loads((nsd / "metrics.json").read_text())
    m.update(metrics=["dice", "nsd"], mean_nsd=0.6, per_class_nsd={c: 0.6 for c in MMWHS_CLASSES[1:]})
    atomic_write_json(nsd / "metrics.json", m)
    df = collect_runs(runs)
    rows = df[(df["method"] == "voco") & (df["seed"] == 3)].set_index("metric")["old_scoring"]
    assert not rows["dice"] and rows["nsd"]


# --------------------------------------------------------------------------------------------------
# Comparable or not (issue 20): one rule decides what stands beside a published number
# --------------------------------------------------------------------------------------------------
def _mmwhs_cfg(preset: str = "paper", **finetune) -> dict:
    return {"run": {"preset": preset}, "task": {"name": "mmwhs", "finetune": {"epochs": 1000, "max_steps": None,
                                                                             "batch_size": 1, **finetune}}}


def test_comparability_rule_by_hand():
    rule = comparability
    assert rule(_mmwhs_cfg(), {"task": "mmwhs", "steps": 14000}) == ("", [])
    # tiny preset: the recipe's tiny schedule (max_steps 150 instead of 1000 epochs) is reduced too
    kind, why = rule(_mmwhs_cfg("tiny", epochs=0, max_steps=150), {"task": "mmwhs", "steps": 150})
    assert kind == "tiny preset"
    assert why == ["preset tiny", "task.finetune.max_steps = 150 instead of the recipe's 1000 epochs"]
    # paper preset, max_steps below 1000 epochs x ceil(14 cases / batch 1) = 14000 steps: reduced; at 14000: not
    kind, why = rule(_mmwhs_cfg(max_steps=100), {"task": "mmwhs", "steps": 100, "train_cases": 14})
    assert (kind, why) == ("reduced schedule",
                           ["task.finetune.max_steps = 100 < the recipe's 1000 epochs (14000 steps on 14 training cases)"])
    assert rule(_mmwhs_cfg(max_steps=14000), {"task": "mmwhs", "steps": 14000, "train_cases": 14}) == ("", [])
    assert rule(_mmwhs_cfg(epochs=300), {"task": "mmwhs"})[1] == ["task.finetune.epochs = 300 < the recipe's 1000"]
    # phantom data comes first, whatever else holds
    assert rule(_mmwhs_cfg(), {"task": "mmwhs"}, phantom=True)[0] == "phantom"
    # another split, fewer labelled cases, other empty-set rules: other protocol; NaN equals the recipe's NaN
    cfg = _mmwhs_cfg(labeled_cases=4)
    cfg["task"]["data"] = {"val_last": 4, "root": "/elsewhere"}
    cfg["task"]["evaluate"] = {"empty": {"both": 1.0, "one": 0.0}}
    kind, why = rule(cfg, {"task": "mmwhs"})
    assert kind == "other protocol" and why == [
        "task.finetune.labeled_cases = 4 (the recipe's: all)", "task.data.val_last = 4 (the recipe's: 6)",
        "task.evaluate.empty = {'both': 1.0, 'one': 0.0} (the recipe's: {'both': nan, 'one': 0.0})"]
    cfg["task"].update(data={"val_last": 6}, evaluate={"empty": {"both": float("nan"), "one": 0}})
    cfg["task"]["finetune"]["labeled_cases"] = None
    assert rule(cfg, {"task": "mmwhs"}) == ("", [])
    # the pre-training counts: its preset and its steps (voco's recipe: 100000)
    pre = {"run": {"preset": "tiny"}, "method": {"name": "voco", "pretrain": {"steps": 40}}}
    assert rule(_mmwhs_cfg(), {"task": "mmwhs"}, pretrain_cfg=pre) == (
        "tiny preset", ["pre-training preset tiny", "method.pretrain.steps = 40 < the recipe's 100000"])
    pre["run"]["preset"] = "paper"
    assert rule(_mmwhs_cfg(), {"task": "mmwhs"}, pretrain_cfg=pre)[0] == "reduced schedule"
    pre["method"]["pretrain"]["steps"] = 100000
    assert rule(_mmwhs_cfg(), {"task": "mmwhs"}, pretrain_cfg=pre) == ("", [])
    assert rule(None, {"task": "mmwhs", "preset": "paper"})[0] == "other protocol"     # nothing can be checked


def test_a_tiny_preset_run_is_never_beside_a_published_number(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, seed=0, dice=0.30, preset="tiny", steps=150)           # real MM-WHS, tiny preset
    write_run(runs, seed=0, dice=0.90)                                     # paper preset, full schedule
    df, tables = _tables(runs)
    assert sorted(df["comparability"]) == ["", "tiny preset"]
    t5 = tables["table5"]
    assert t5.headers == ["Dice Scores(%)", "Dice Scores(%) (tiny preset)"]
    real, tiny = t5.cell("average", "mmwhs"), t5.cell("average", "mmwhs@tiny-preset")
    assert real.text() == "90.54 / 90.00 (Δ -0.54, n=1)"                   # the paper-preset run: beside, with Δ
    assert tiny.published is None and tiny.text() == "30.00 (n=1)" and tiny.diff(tiny.groups[0]) is None
    assert tiny.agreement() == "none"
    comp = tables["comparison"]
    assert comp.cell("voco", "mmwhs").text() == "90.54 / 90.00 (Δ -0.54, n=1)"
    assert comp.cell("voco", "mmwhs@tiny-preset").text() == "30.00 (n=1)"
    md = render_table(t5, "md")
    assert "(tiny preset) columns: runs at --preset tiny" in md
    (row,) = [line for line in md.splitlines() if line.startswith("| Average")]
    assert row.split("|")[3].strip() == "30.00 (n=1)"                     # no Δ in its column
    console = _console()
    print_rich([t5], console)
    (reg,) = [line for line in console.export_text().splitlines() if "30.00" in line and "Average" in line
              and "Table 5" in line]
    assert "—" in reg and "-60.54" not in reg and "+" not in reg.split("30.00")[1]


def test_the_issue_run_pretrained_on_phantoms_is_phantom_in_the_report(tmp_path):
    # sslbench run --method voco --task btcv --root <real> --preset tiny, pre-trained on phantom-corpus:
    # the fine-tuning record said phantom: false; the report must not put it beside the published 83.85.
    runs = tmp_path / "runs"
    pre, h = _pretrain(runs, "voco", 0, 1.0, phantom=True)          # its recipe.yaml: data.phantom true
    write_run(runs, task="btcv", seed=0, dice=0.0572, preset="tiny", steps=10, pretrain_from=pre, pretrain_hash=h)
    df, tables = _tables(runs)
    assert df["phantom"].all() and list(df["comparability"]) == ["phantom"]
    assert list(df["pretrain_corpus"]) == ["phantom-corpus"]
    assert "phantom data" in df["deviations"].iloc[0] and "preset tiny" in df["deviations"].iloc[0]
    t3 = tables["table3"]
    assert t3.cell("1.0", "btcv").text() == "83.85"                        # published only
    assert t3.cell("1.0", "btcv@phantom").text() == "PHANTOM 5.72 (n=1)"
    assert tables["comparison"].cell("voco", "btcv").text() == "83.85"
    for fmt in ("md", "csv", "html"):
        out = render_table(t3, fmt)
        assert "PHANTOM 5.72 (n=1)" in out and "Δ -78" not in out and "83.85 / " not in out


def test_hd95_is_shown_for_tasks_that_score_it_and_old_scoring_is_marked(tmp_path):
    runs = tmp_path / "runs"
    hd = {"metrics": ["dice", "nsd", "hd95"], "mean_nsd": 0.8, "per_class_nsd": {"TC": 0.8},
          "mean_hd95": 12.5, "per_class_hd95": {"TC": 12.5}}
    write_run(runs, method="scratch", task="brats21", seed=0, dice=0.70, extra=hd)
    write_run(runs, method="scratch", task="brats21", seed=1, dice=0.80, extra={**hd, "mean_hd95": 7.5})
    write_run(runs, method="scratch", task="brats21", seed=2, dice=0.40, extra={**hd, "mean_hd95": 40.0},
              scoring=False)                                               # recorded before 2026-12-03
    df, tables = _tables(runs)
    assert sorted(df["metric"]) == ["dice"] * 3 + ["hd95"] * 3 + ["nsd"] * 3
    comp = tables["comparison"]
    j = comp.column_ids.index("brats21:hd95")
    assert comp.headers[j].endswith("HD95 (mm)") and comp.column_ids[j - 1] == "brats21"
    cell = comp.cell("scratch", "brats21:hd95")
    # mm, not percent; the old-scoring run is its own group, marked, never averaged with the other two
    assert [(g.n, g.mean, g.old_scoring) for g in cell.groups] == [(2, 10.0, False), (1, 40.0, True)]
    assert cell.text().startswith("— / 10.00 ± 3.54 (n=2) [") and "40.00 (n=1) ‡scoring [" in cell.text()
    dice = comp.cell("scratch", "brats21")
    assert [g.mean for g in dice.groups] == pytest.approx([75.0, 40.0])
    md = render_table(comp, "md")
    assert "scored before the empty-set rules of 2026-12-03" in md and "HD95 columns: 95th-percentile" in md


def test_html_report_is_one_self_contained_world_readable_page(tmp_path, capsys):
    import base64
    from html.parser import HTMLParser

    runs, out = tmp_path / "runs", tmp_path / "rendered"
    for lam in (0.5, 1.0):
        write_run(runs, seed=0, lam=lam, dice=0.91)
    write_run(runs, seed=0, dice=0.30, preset="tiny", steps=150)
    write_run(runs, task="phantom-mmwhs", seed=0, dice=0.5, phantom=True)
    assert command.main(["--runs", str(runs), "--out", str(out), "--format", "html"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "index.html" in names and not [n for n in names if n.endswith(".html") and n != "index.html"]
    assert not [n for n in names if n.startswith(".")]
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p                    # world-readable, not mkstemp's 0600
    text = (out / "index.html").read_text()

    class Check(HTMLParser):
        VOID = {"meta", "img", "br", "link"}

        def __init__(self):
            super().__init__()
            self.stack, self.sections, self.tables, self.images, self.classes = [], [], 0, [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag not in self.VOID:
                self.stack.append(tag)
            self.tables += tag == "table"
            if tag == "section":
                self.sections.append(a["id"])
            if tag == "img":
                self.images.append(a["src"])
            if tag == "span" and a.get("class"):
                self.classes.append(a["class"])

        def handle_endtag(self, tag):
            assert self.stack and self.stack.pop() == tag, f"</{tag}> closes {self.stack[-1:]}"

    check = Check()
    check.feed(text)
    check.close()
    assert check.stack == [], "every element closed"
    _, tables = _tables(runs)
    assert set(tables) <= set(check.sections) and {"provenance", "protocol", "plots"} <= set(check.sections)
    assert check.tables == len(tables) + 1                               # every table, and the provenance table
    assert len(check.images) == 2                                        # table3_lambda.png, table5_mmwhs_structures.png
    for src in check.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"green", "magenta", "none", "grey"} <= set(check.classes)     # the terminal table's agreement colours
    assert "PHANTOM 50.00" in text and "Dice Scores(%) (tiny preset)" in text and "own column: tiny preset" in text
    assert "src=\"http" not in text and "<script" not in text and "<link" not in text   # self-contained
    # without --out: the same page on stdout
    capsys.readouterr()
    assert command.main(["--runs", str(runs), "--format", "html"]) == 0
    assert capsys.readouterr().out.startswith("<!DOCTYPE html>")
