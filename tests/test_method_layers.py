"""The methods layer points one way (issue 21): a method imports only methods.base, methods.params (its typed
params), methods.parts.*, methods.dist, models and errors; never another method, the protocol or sslbench.speed; speed imports nothing
of sslbench outside itself. Read from the source (AST), so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import sslbench

ROOT = Path(sslbench.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute names of the sslbench modules that ``path`` imports (relative imports resolved)."""
    module = ".".join(("sslbench",) + path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [f"{name}.{a.name}" for a in node.names]
            out.update(n for n in [name, *names] if n.startswith("sslbench"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sslbench"))
    return out


ALLOWED_IN_METHODS = ("sslbench.methods.base", "sslbench.methods.params", "sslbench.methods.parts",
                      "sslbench.methods.dist", "sslbench.models", "sslbench.errors")


def test_a_method_imports_no_other_method_and_no_speed():
    for path in sorted((ROOT / "methods").rglob("*.py")):
        if path.name == "__init__.py" and path.parent == ROOT / "methods":
            continue                                     # the registry names every method (lazily, by string)
        for name in _imports(path):
            if name in ("sslbench.methods", "sslbench.methods.parts"):
                continue                                 # "from . import x" / "from .parts import aug2d"
            assert name.startswith(ALLOWED_IN_METHODS), f"{path.relative_to(ROOT)} imports {name}"


def test_speed_and_models_sit_below_the_methods():
    for path in sorted((ROOT / "speed").rglob("*.py")):
        for name in _imports(path):
            assert name.startswith("sslbench.speed"), f"{path.relative_to(ROOT)} imports {name}"
    for path in sorted((ROOT / "models").rglob("*.py")):
        for name in _imports(path):
            assert name.startswith(("sslbench.models", "sslbench.errors", "sslbench.speed")), \
                f"{path.relative_to(ROOT)} imports {name}"
