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
