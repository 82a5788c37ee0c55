"""Run records: metrics.json and the other JSON files are strict JSON (NaN / Infinity written as null)."""
import json
import math

import numpy as np
import pytest

from sslbench.store.records import atomic_write_json, read_json, strict_json


def _strict_load(text: str):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinity_are_written_as_null(tmp_path):
    obj = {"mean_dice": float("nan"), "per_class": {"a": 0.5, "b": float("inf")},
           "cases": [{"case": "x", "a": np.float32("nan"), "b": np.float64(0.25)}, {"case": "y", "a": -math.inf}],
           "array": np.array([1.0, np.nan]), "n": np.int64(3), "ok": True, "t": (1.0, float("nan"))}
    path = tmp_path / "metrics.json"
    atomic_write_json(path, obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = _strict_load(text)
    assert back == {"mean_dice": None, "per_class": {"a": 0.5, "b": None},
                    "cases": [{"case": "x", "a": None, "b": 0.25}, {"case": "y", "a": None}],
                    "array": [1.0, None], "n": 3, "ok": True, "t": [1.0, None]}
    assert read_json(path) == back
    assert strict_json([float("nan"), 2.0]) == [None, 2.0]


def test_unserialisable_values_still_fail(tmp_path):
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        atomic_write_json(tmp_path / "x.json", {"a": object()})
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_records_and_checkpoints_get_the_mode_a_plain_open_would(tmp_path, umask, expected):
    """metrics.json, recipe files and checkpoints follow the umask as log.txt does (mkstemp alone leaves 0600, so a
    group sharing a results folder could read the logs but not the records)."""
    import os

    import torch

    from sslbench.store.records import atomic_torch_save, atomic_write_json, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "metrics.json", {"dice": 0.5})
        atomic_write_text(tmp_path / "recipe.yaml", "a: 1\n")
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "ckpt" / "last.pt")
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(old)
    for name in ("metrics.json", "recipe.yaml", "ckpt/last.pt", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
