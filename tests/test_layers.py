"""The layers of issue 21 point one way: the import graph of sslbench, read from its source (tests/graphkit.py).

The layers, top to bottom: cli (cli, sweep, bench, predict, submit, demo) -> protocol -> {tasks | methods} ->
data / models / speed -> store, recipes, metrics, distributed, errors; report reads records through store. No
module of sslbench lies on an import cycle.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import graphkit as g  # noqa: E402

PACKAGE = Path(__file__).resolve().parent.parent / "sslbench"

#: Modules (by prefix) that lie on no import cycle, among themselves or with any other sslbench module.
CYCLE_FREE = ("sslbench",)

#: Each layer imports, of sslbench, only what it lists (arrows point down).
BASE = ("sslbench.errors", "sslbench.recipes", "sslbench.metrics", "sslbench.distributed")
LAYERS = [
    g.Layer("protocol", "sslbench.protocol",
            may_import=("sslbench.protocol", "sslbench.tasks", "sslbench.methods", "sslbench.data", "sslbench.models",
                        "sslbench.speed", "sslbench.store", *BASE), exactly=("sslbench",)),
    # a task kind knows no method and not the protocol above it (its runtime arrives as an object)
    g.Layer("tasks", "sslbench.tasks",
            may_import=("sslbench.tasks", "sslbench.data", "sslbench.models", "sslbench.store", *BASE),
            exactly=("sslbench",)),
    # a method knows no task, no protocol and no speed trick (the runtime applies those)
    g.Layer("methods", "sslbench.methods",
            may_import=("sslbench.methods", "sslbench.models", "sslbench.errors", "sslbench.distributed"),
            exactly=("sslbench",)),
    g.Layer("models", "sslbench.models", may_import=("sslbench.models", "sslbench.speed.names", "sslbench.errors")),
    g.Layer("speed", "sslbench.speed", may_import=("sslbench.speed", "sslbench.errors"), exactly=("sslbench",)),
    g.Layer("store", "sslbench.store", may_import=("sslbench.store", *BASE), exactly=("sslbench",)),
    g.Layer("report", "sslbench.report", may_import=("sslbench.report", "sslbench.store", *BASE),
            exactly=("sslbench",)),
    g.Layer("data", "sslbench.data",
            may_import=("sslbench.data", "sslbench.errors", "sslbench.recipes", "sslbench.models", "sslbench.store"),
            exactly=("sslbench",)),   # the package itself: its __version__ (a cache key names it)
]


@pytest.fixture(scope="module")
def edges():
    return g.import_edges(PACKAGE)


def _described(edges, found) -> str:
    """One line per cycle: its shortest loop through a cycle-free module (where it has one), then its members."""
    def start(c):
        return next((m for m in c if any(g.within(m, p) for p in CYCLE_FREE)), c[0])
    return "\n".join(" -> ".join(g.path_in(edges, c, start(c))) + f"   (cycle of {len(c)}: {', '.join(c)})"
                     for c in found)


def test_no_import_cycle_runs_through_a_cycle_free_layer(edges):
    found = g.cycles(edges)
    bad = [c for c in found if any(g.within(m, p) for m in c for p in CYCLE_FREE)]
    assert not bad, (f"import cycles through {', '.join(CYCLE_FREE)}:\n{_described(edges, bad)}\n"
                     f"all cycles of sslbench today:\n{_described(edges, found)}")


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_a_layer_imports_only_the_layers_below_it(edges, layer):
    assert layer.modules in edges, f"{layer.modules}: no such module (a renamed layer leaves its rule empty)"
    bad = layer.violations(edges)
    assert not bad, f"layer '{layer.name}' imports outside {', '.join(layer.may_import)}:\n" + "\n".join(bad)


def test_the_data_readers_and_phantoms_are_tables_not_import_side_effects(edges):
    """A reader or phantom module never imports its table (the packages' __init__), so none registers itself."""
    for table in ("sslbench.data.layouts", "sslbench.data.phantoms"):
        users = [m for m, dst in edges.items() if table in dst and g.within(m, table) and m != table]
        assert not users, f"{table}: imported by its own modules {users}"


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_graph_finds_a_planted_cycle_of_relative_absolute_and_function_local_imports(tmp_path):
    pkg = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from . import b\n    return b\n",          # function-local, relative
        "pkg/b.py": "from pkg.sub.c import thing\n",                         # a name inside a module
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import os\nfrom .. import a\nthing = 1\n",           # relative, two levels
        "pkg/d.py": "import pkg.b\nfrom pkg.sub import c\n",                  # on no cycle
    })
    edges = g.import_edges(pkg)
    assert edges["pkg.a"] == {"pkg.b"} and edges["pkg.b"] == {"pkg.sub.c"} and edges["pkg.sub.c"] == {"pkg.a"}
    assert edges["pkg.d"] == {"pkg.b", "pkg.sub.c"} and edges["pkg"] == set()
    assert g.cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert g.path_in(edges, ["pkg.a", "pkg.b", "pkg.sub.c"]) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_a_layer_rule_sees_a_planted_arrow_up(tmp_path):
    pkg = _package(tmp_path, {"pkg/__init__.py": "", "pkg/top.py": "", "pkg/low/__init__.py": "",
                              "pkg/low/x.py": "import pkg\n\ndef f():\n    from pkg import top\n"})
    rule = g.Layer("low", "pkg.low", may_import=("pkg.low",), exactly=("pkg",))
    assert rule.violations(g.import_edges(pkg)) == ["pkg.low.x -> pkg.top"]


def _functions(folder: Path):
    import ast

    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_no_function_of_the_protocol_package_is_over_60_lines():
    long = [f"{p.relative_to(PACKAGE.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p, n in _functions(PACKAGE / "protocol") if n.end_lineno - n.lineno + 1 > 60]
    assert not long, "\n".join(long)


def test_one_training_loop_steps_the_optimiser_for_every_stage():
    """Pre-training and both fine-tuning kinds step through protocol/loop.py's Loop: no other module of the
    protocol or the task kinds calls an optimiser's step() (a second loop would be a second copy of it)."""
    import ast

    steppers = set()
    for folder in (PACKAGE / "protocol", PACKAGE / "tasks"):
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step"
                        and isinstance(node.func.value, (ast.Attribute, ast.Name))
                        and getattr(node.func.value, "attr", getattr(node.func.value, "id", "")) in
                        ("optimizer", "opt", "schedule", "sched")):
                    steppers.add(path.name)
    assert steppers == {"loop.py"}, steppers
