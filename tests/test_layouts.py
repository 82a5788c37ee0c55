"""Reading real on-disk layouts (sslbench/data/layouts/) from hand-made trees of empty files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sslbench.data import layouts
from sslbench.errors import DataError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BTCV_TRAIN = [f"{n:04d}" for n in list(range(1, 11)) + list(range(21, 35))]
BTCV_VAL = [f"{n:04d}" for n in range(35, 41)]
BTCV_TEST = [f"{n:04d}" for n in range(61, 81)]


def task(name: str, **data) -> dict:
    """A task recipe as the CLI would pass it (these recipes have no `extends`), with data overrides."""
    t = yaml.safe_load((BENCHMARKS / f"{name}.yaml").read_text())
    t["data"].update(data)
    return t


from treekit import touch  # noqa: E402


def write_btcv_json(root: Path, **changes) -> Path:
    """A dataset_0.json shaped like MONAI's BTCV file (some paths with a leading './')."""
    pair = lambda i, dot="": {"image": f"{dot}imagesTr/img{i}.nii.gz", "label": f"{dot}labelsTr/label{i}.nii.gz"}
    obj = {
        "description": "btcv yucheng", "labels": {"0": "background", "1": "spleen"}, "modality": {"0": "CT"},
        "name": "btcv", "numTest": 20, "numTraining": 80, "tensorImageSize": "3D",
        "training": [pair(i, "./" if k % 2 else "") for k, i in enumerate(BTCV_TRAIN)],
        "validation": [pair(i) for i in BTCV_VAL],
        "test": [f"imagesTs/img{i}.nii.gz" for i in BTCV_TEST],
    }
    obj.update(changes)
    obj = {k: v for k, v in obj.items() if v is not None}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset_0.json"
    path.write_text(json.dumps(obj))
    return path


def make_rawdata(base: Path) -> Path:
    """RawData/Training/{img,label} for the 30 labelled BTCV cases and Testing/img for 20 test images."""
    for i in BTCV_TRAIN + BTCV_VAL:
        touch(base / "RawData" / "Training" / "img" / f"img{i}.nii.gz")
        touch(base / "RawData" / "Training" / "label" / f"label{i}.nii.gz")
    for i in BTCV_TEST:
        touch(base / "RawData" / "Testing" / "img" / f"img{i}.nii.gz")
    return base


def ids(items: list[dict]) -> list[str]:
    return [it["id"] for it in items]


# ----------------------------------------------------------------------------------------------------------
def test_case_id_examples():
    assert layouts.case_id("imagesTr/img0035.nii.gz") == "0035"
    assert layouts.case_id("labelsTr/spleen_2.nii.gz") == "spleen_2"
    assert layouts.case_id("ct_train_1001_image.nii.gz") == "ct_train_1001"
    assert layouts.case_id("amos_0001_0000.nii.gz") == "amos_0001"
    assert layouts.case_id("volume-3.nii") == "volume-3"


def test_monai_json_gives_24_6_and_test(tmp_path):
    write_btcv_json(tmp_path)
    t = task("btcv")
    assert layouts.detect_layout(t, tmp_path) == "monai-json"
    splits = layouts.read_datalist(t, tmp_path)
    assert ids(splits["train"]) == BTCV_TRAIN and ids(splits["val"]) == BTCV_VAL and ids(splits["test"]) == BTCV_TEST
    first, second = splits["train"][0], splits["train"][1]
    assert first["image"] == str(tmp_path / "imagesTr" / "img0001.nii.gz")
    assert second["image"] == str(tmp_path / "imagesTr" / "img0002.nii.gz")  # "./" stripped
    assert second["label"] == str(tmp_path / "labelsTr" / "label0002.nii.gz")
    assert all(os.path.isabs(it["image"]) for its in splits.values() for it in its)
    assert all(it["label"] is None for it in splits["test"])


def test_monai_json_without_validation_key_uses_val_ids(tmp_path):
    pair = lambda i: {"image": f"imagesTr/img{i}.nii.gz", "label": f"labelsTr/label{i}.nii.gz"}
    write_btcv_json(tmp_path, training=[pair(i) for i in BTCV_TRAIN + BTCV_VAL], validation=None)
    splits = layouts.read_datalist(task("btcv"), tmp_path)
    assert ids(splits["train"]) == BTCV_TRAIN and ids(splits["val"]) == BTCV_VAL


@pytest.mark.parametrize("holder", ["parent", "rawdata"])
def test_rawdata_gives_24_6_from_val_ids(tmp_path, holder):
    make_rawdata(tmp_path)
    root = tmp_path if holder == "parent" else tmp_path / "RawData"  # the folder that holds Training/
    t = task("btcv")
    assert layouts.detect_layout(t, root) == "btcv-raw"
    splits = layouts.read_datalist(t, root)
    assert ids(splits["train"]) == BTCV_TRAIN and ids(splits["val"]) == BTCV_VAL and ids(splits["test"]) == BTCV_TEST
    item = splits["val"][0]
    assert item["image"] == str(tmp_path / "RawData" / "Training" / "img" / "img0035.nii.gz")
    assert item["label"] == str(tmp_path / "RawData" / "Training" / "label" / "label0035.nii.gz")


def test_rawdata_without_val_rule_is_an_error(tmp_path):
    make_rawdata(tmp_path)
    with pytest.raises(DataError, match=r"Training/img.*val_ids.*val_last"):
        layouts.read_datalist(task("btcv", val_ids=None), tmp_path)


def test_detect_layout_order_and_failure(tmp_path):
    t = task("btcv")
    make_rawdata(tmp_path)
    assert layouts.detect_layout(t, tmp_path) == "btcv-raw"
    write_btcv_json(tmp_path)
    assert layouts.detect_layout(t, tmp_path) == "monai-json"  # first in data.layouts wins
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        layouts.detect_layout(t, empty)
    msg = str(err.value)
    assert str(empty) in msg and "dataset_0.json" in msg and "RawData/Training/img" in msg and "\n" not in msg
    with pytest.raises(DataError, match="not found"):
        layouts.detect_layout(t, tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown layout 'nifti-zoo'"):
        layouts.detect_layout(task("btcv", layouts=["nifti-zoo"]), tmp_path)


def test_malformed_json_names_file_and_key(tmp_path):
    path = tmp_path / "dataset_0.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"dataset_0\.json: not valid JSON"):
        layouts.read_datalist(task("btcv"), tmp_path)
    write_btcv_json(tmp_path, training=None)
    with pytest.raises(DataError, match=r"dataset_0\.json: missing key 'training'"):
        layouts.read_datalist(task("btcv"), tmp_path)
    write_btcv_json(tmp_path, validation=None)
    with pytest.raises(DataError, match=r"dataset_0\.json: missing key 'validation'"):
        layouts.read_datalist(task("btcv", val_ids=None), tmp_path)
    write_btcv_json(tmp_path, training=[{"label": "labelsTr/label0001.nii.gz"}])
    with pytest.raises(DataError, match=r"dataset_0\.json: key 'training' item 0: expected an \"image\""):
        layouts.read_datalist(task("btcv"), tmp_path)
    write_btcv_json(tmp_path, training={"image": "x"})
    with pytest.raises(DataError, match=r"key 'training': expected a list"):
        layouts.read_datalist(task("btcv"), tmp_path)


def test_strict_rejects_empty_and_overlapping_splits(tmp_path):
    write_btcv_json(tmp_path, validation=[])
    with pytest.raises(DataError, match=r"dataset_0\.json: the 'val' split .* is empty"):
        layouts.read_datalist(task("btcv"), tmp_path)
    assert layouts.read_datalist(task("btcv"), tmp_path, strict=False)["val"] == []
    pair = {"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}
    write_btcv_json(tmp_path, validation=[pair])
    with pytest.raises(DataError, match=r"img0001\.nii\.gz: case '0001' is in both the 'train' and 'val' splits"):
        layouts.read_datalist(task("btcv"), tmp_path)


def make_msd(task_dir: Path, numbers: list[int], with_test_key: bool = True, junk: bool = True) -> None:
    """A Task09_Spleen folder: dataset.json in listing order, files, macOS '._' junk beside them."""
    for n in numbers:
        touch(task_dir / "imagesTr" / f"spleen_{n}.nii.gz")
        touch(task_dir / "labelsTr" / f"spleen_{n}.nii.gz")
    for n in (1, 7):
        touch(task_dir / "imagesTs" / f"spleen_{n}.nii.gz")
    obj = {"name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
           "numTraining": len(numbers), "numTest": 2,
           "training": [{"image": f"./imagesTr/spleen_{n}.nii.gz", "label": f"./labelsTr/spleen_{n}.nii.gz"}
                        for n in numbers]}
    if with_test_key:
        obj["test"] = [f"./imagesTs/spleen_{n}.nii.gz" for n in (1, 7)]
    (task_dir / "dataset.json").write_text(json.dumps(obj))
    if junk:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (task_dir / sub / "._spleen_19.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac junk")
        (task_dir / "._dataset.json").write_bytes(b"\x00\x05\x16\x07")
        (task_dir.parent / "._Task09_Spleen").mkdir(exist_ok=True)


def test_msd_from_parent_or_task_folder_val_last_in_json_order(tmp_path):
    numbers = [19, 31, 52, 40, 3, 17, 21, 18, 9, 29, 2, 44, 26, 6, 32]   # listing order, not numeric
    task_dir = tmp_path / "Task09_Spleen"
    make_msd(task_dir, numbers)
    t = task("msd-spleen")
    for root in (tmp_path, task_dir):
        assert layouts.detect_layout(t, root) == "msd"
        splits = layouts.read_datalist(t, root)
        assert ids(splits["train"]) == [f"spleen_{n}" for n in numbers[:6]]
        assert ids(splits["val"]) == [f"spleen_{n}" for n in numbers[6:]]   # the last 9, JSON order
        assert ids(splits["test"]) == ["spleen_1", "spleen_7"]
        assert splits["train"][0]["label"] == str(task_dir / "labelsTr" / "spleen_19.nii.gz")


def test_msd_skips_junk_entries_and_junk_test_files(tmp_path):
    task_dir = tmp_path / "Task09_Spleen"
    make_msd(task_dir, [n for n in range(2, 15) if n != 7], with_test_key=False)
    obj = json.loads((task_dir / "dataset.json").read_text())
    obj["training"].append({"image": "./imagesTr/._spleen_19.nii.gz", "label": "./labelsTr/._spleen_19.nii.gz"})
    (task_dir / "dataset.json").write_text(json.dumps(obj))
    splits = layouts.read_datalist(task("msd-spleen"), tmp_path)
    every = [it["image"] for its in splits.values() for it in its]
    assert not any(Path(p).name.startswith("._") for p in every)
    assert len(splits["train"]) == 3 and len(splits["val"]) == 9
    assert ids(splits["test"]) == ["spleen_1", "spleen_7"]          # imagesTs listed, junk skipped


def test_msd_several_tasks_is_an_error(tmp_path):
    make_msd(tmp_path / "Task09_Spleen", [2, 3], junk=False)
    make_msd(tmp_path / "Task03_Liver", [2, 3], junk=False)
    with pytest.raises(DataError, match="several MSD task folders"):
        layouts.read_datalist(task("msd-spleen"), tmp_path)


@pytest.mark.parametrize("sub", ["", "ct_train"])
def test_mmwhs_14_6_in_numeric_order(tmp_path, sub):
    folder = tmp_path / sub if sub else tmp_path
    for n in range(1001, 1021):
        touch(folder / f"ct_train_{n}_image.nii.gz")
        touch(folder / f"ct_train_{n}_label.nii.gz")
    touch(folder / "._ct_train_1001_image.nii.gz")
    t = task("mmwhs")
    assert layouts.detect_layout(t, tmp_path) == "mmwhs"
    splits = layouts.read_datalist(t, tmp_path)
    assert ids(splits["train"]) == [f"ct_train_{n}" for n in range(1001, 1015)]
    assert ids(splits["val"]) == [f"ct_train_{n}" for n in range(1015, 1021)]
    assert splits["val"][0]["label"] == str(folder / "ct_train_1015_label.nii.gz")
    assert "test" not in splits


@pytest.mark.parametrize("layout", ["btcv-raw", "mmwhs", "monai-json"])
def test_relative_root_gives_absolute_existing_paths(tmp_path, monkeypatch, layout):
    data = tmp_path / "data"
    if layout == "btcv-raw":
        make_rawdata(data)
        t = task("btcv")
    elif layout == "mmwhs":
        for n in range(1001, 1005):
            touch(data / "ct_train" / f"ct_train_{n}_image.nii.gz")
            touch(data / "ct_train" / f"ct_train_{n}_label.nii.gz")
        t = task("mmwhs", val_last=1)
    else:
        write_btcv_json(data)
        for i in BTCV_TRAIN + BTCV_VAL:
            touch(data / "imagesTr" / f"img{i}.nii.gz")
            touch(data / "labelsTr" / f"label{i}.nii.gz")
        t = task("btcv")
    monkeypatch.chdir(tmp_path)
    splits = layouts.read_datalist(t, Path("data"))
    for item in splits["train"] + splits["val"]:
        assert os.path.isabs(item["image"]) and Path(item["image"]).is_file() and Path(item["label"]).is_file()
