"""The sources of a combined pre-training corpus (``data.sources``) and where each one's root comes from.

The VoCo supplement (Sec. 1 and Table 1) pre-trains on BTCV + TCIA COVID-19 (~0.8k CT scans) for the BTCV task and
adds LUNA16 (1.6k) for the others. A combined corpus recipe lists its sources as task recipes::

    data:
      sources: [{task: btcv}, {task: tcia-covid19}, {task: luna16}]

Each source is read with its own layout and its own root; the corpus recipe's ``preprocess`` applies to all of
them. A source's root comes from, in order: ``--corpus-root NAME=PATH[,NAME=PATH...]``, the source entry's
``root`` key, the environment variable ``SSLBENCH_ROOT_<NAME>`` (upper case, ``-`` as ``_``: e.g.
``SSLBENCH_ROOT_TCIA_COVID19``), and the source task's own ``data.root`` (phantom twins: ``auto``).

This module only reads recipes: locating a root (and synthesising a phantom) is :mod:`sslbench.data.locate`'s,
reading a corpus's images :mod:`sslbench.data.corpus`'s.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from sslbench.errors import DataError, RecipeError


def env_name(source: str) -> str:
    """The environment variable that may hold a source's root: ``SSLBENCH_ROOT_<NAME>``."""
    return "SSLBENCH_ROOT_" + source.upper().replace("-", "_")


def parse_roots(text: str | None, names: list[str]) -> dict[str, str]:
    """``--corpus-root`` of a combined corpus: ``NAME=PATH`` pairs separated by commas, NAME a source."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, path = part.partition("=")
        if not sep or not path.strip():
            raise RecipeError(f"--corpus-root {text}: expected NAME=PATH pairs separated by commas for a corpus of "
                              f"several sources ({', '.join(names)}), got {part!r}")
        if name.strip() not in names:
            raise RecipeError(f"--corpus-root: '{name.strip()}' is not a source of this corpus; expected one of "
                              f"{', '.join(names)}")
        out[name.strip()] = path.strip()
    return out


def source_names(corpus: Mapping[str, Any]) -> list[str]:
    sources = (corpus.get("data") or {}).get("sources") or []
    return [str(s["task"]) for s in sources]


def phantom_shares(corpus: Mapping[str, Any]) -> dict[str, int]:
    """{phantom source: its number of volumes} under the corpus's ``data.phantom_total`` ({} when unset).

    The total is split as evenly as the sources allow, the first sources taking the remainder; only sources
    synthesised on first use (``data.root: auto``, the phantom twins) are counted; a real source keeps its files.
    """
    from sslbench import recipes

    total = (corpus.get("data") or {}).get("phantom_total")
    if total is None:
        return {}
    names = [n for n in source_names(corpus) if (recipes.load_task(n).get("data") or {}).get("root") == "auto"]
    if not names:
        return {}
    if int(total) < 2 * len(names):
        raise RecipeError(f"{corpus.get('_file', corpus['name'])}: key 'data.phantom_total': {total} volumes for "
                          f"{len(names)} phantom sources; expected at least {2 * len(names)} (2 per source)")
    base, extra = divmod(int(total), len(names))
    return {n: base + (1 if i < extra else 0) for i, n in enumerate(names)}


def source_roots(corpus: Mapping[str, Any], root: str | None) -> list[tuple[dict, str]]:
    """[(source task recipe, its root)] of a combined corpus, roots resolved as the module docstring says."""
    from sslbench import recipes

    names = source_names(corpus)
    given = parse_roots(root, names) if root and "=" in root else {}
    if root and not given:
        raise RecipeError(f"--corpus-root {root}: corpus '{corpus['name']}' has several sources; expected "
                          f"NAME=PATH pairs for {', '.join(names)}")
    out = []
    shares = phantom_shares(corpus)
    for entry in corpus["data"]["sources"]:
        name = str(entry["task"])
        task = recipes.load_task(name)
        if name in shares:
            task = {**task, "data": {**task["data"], "phantom_cases": shares[name]}}
        if task["status"] != "available" or (task.get("data") or {}).get("sources"):
            raise RecipeError(f"{corpus.get('_file', corpus['name'])}: source '{name}' is "
                              f"{task['status'] if task['status'] != 'available' else 'a combined corpus'}; expected "
                              f"an available task or single-dataset corpus")
        src_root = given.get(name) or entry.get("root") or os.environ.get(env_name(name)) or task["data"].get("root")
        if src_root in (None, ""):
            raise DataError(f"corpus '{corpus['name']}': no root for source '{name}'; expected {name}=PATH in "
                            f"--corpus-root (data check: --root), a 'root' in its data.sources entry, or "
                            f"${env_name(name)}")
        out.append((task, str(src_root)))
    return out

