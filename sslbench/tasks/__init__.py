"""Task kinds (sslbench/tasks/base.py): the table that maps a task recipe's ``kind`` to its kind.

The protocol and the CLI ask the kind (:func:`kind_of`) what differs between kinds - its case checks, loaders,
feasibility inputs, whether it is 2D, which checkpoints it refuses, its results table - and never compare a
recipe's ``kind`` with a name: a new kind is one class and one entry here.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import RecipeError
from .base import TaskKind
from .classification import Classification, Classification2D
from .segmentation import Segmentation

#: recipe ``kind`` -> the task kind that fine-tunes and evaluates it
KINDS: dict[str, type[TaskKind]] = {
    "segmentation": Segmentation,
    "classification": Classification,
    "classification2d": Classification2D,
}


def kind_of(task: Mapping[str, Any]) -> type[TaskKind]:
    """The kind of a task recipe; one line naming the recipe's key where none exists."""
    try:
        return KINDS[task["kind"]]
    except KeyError:
        raise RecipeError(f"task '{task['name']}' is a {task['kind']} task; expected one of {', '.join(KINDS)}") from None


def kind_if_any(recipe: Mapping[str, Any] | None) -> type[TaskKind] | None:
    """The kind of a task recipe, or None for a recipe of no task kind (a pre-training corpus: volumes without a
    fine-tuning) or no recipe."""
    return KINDS.get((recipe or {}).get("kind"))
