"""What a stage does with a task's cases before it trains: the label-efficiency subset of the training split and
the checks of the loaded cases against the task recipe (channels, label values)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..errors import DataError, RecipeError
from ..recipes import input_channels


def labeled_subset(items: list[dict], labeled: int | float | None) -> list[dict]:
    """A deterministic label-efficiency subset: the same cases for every method and seed."""
    if labeled is None:
        return items
    n = int(labeled) if (isinstance(labeled, int) or float(labeled) >= 1) else max(1, round(float(labeled) * len(items)))
    if n > len(items) or n <= 0:
        raise RecipeError(f"task.finetune.labeled_cases: expected 1..{len(items)} cases (or a fraction), got {labeled}")
    order = np.random.default_rng(0).permutation(len(items))
    return [items[i] for i in sorted(order[:n])]


def check_cases(cases: list[dict], task: Mapping[str, Any], items: list[dict], recipe_file: str) -> None:
    """Each preprocessed case has the task's input channels and only label values of its classes."""
    want = input_channels(task)
    n_classes = len(task["classes"])
    for case, item in zip(cases, items):
        image = item["image"] if isinstance(item["image"], str) else item["image"][0]
        got = int(case["image"].shape[0])
        if got != want:
            raise DataError(f"{image}: {got} image channel(s) after loading; expected {want} "
                            f"({', '.join(task.get('channels') or ['one 3-D volume'])}; see 'channels' in {recipe_file})")
        bad = torch.unique(case["label"])
        bad = bad[(bad < 0) | (bad >= n_classes)]
        if len(bad):
            raise DataError(f"{case['id']}: label values {bad.tolist()} outside the task's {n_classes} classes "
                            f"(0..{n_classes - 1}); check data.label_map in {recipe_file}")
