"""Task kinds (sslbench/tasks/base.py): the table that maps a task recipe's ``kind`` to its kind."""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import RecipeError
from .base import TaskKind
from .classification import Classification
from .segmentation import Segmentation

#: recipe ``kind`` -> the task kind that fine-tunes and evaluates it
KINDS: dict[str, type[TaskKind]] = {
    "segmentation": Segmentation,
    "classification": Classification,
    "classification2d": Classification,
}


def kind_of(task: Mapping[str, Any]) -> type[TaskKind]:
    """The kind of a task recipe; one line naming the recipe's key where none exists."""
    try:
        return KINDS[task["kind"]]
    except KeyError:
        raise RecipeError(f"task '{task['name']}' is a {task['kind']} task; expected one of {', '.join(KINDS)}") from None
