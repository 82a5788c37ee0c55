"""The preprocessed-case cache: keyed by the preprocessing, never stale, memory-mapped, used by runs."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from sslbench import recipes
from sslbench.cli import main
from sslbench.data.cache import CaseCache, preprocessing_key
from sslbench.data.transforms import preprocess_transforms
from sslbench.data.locate import locate_data, read_splits


def _task(*overrides):
    return recipes.resolve("scratch", "phantom-btcv", preset="tiny", overrides=list(overrides))["task"]


def test_key_follows_the_preprocessing_not_the_files_chosen():
    base = _task()
    assert preprocessing_key(base, True) == preprocessing_key(_task("task.data.val_last=3"), True)
    assert preprocessing_key(base, True) != preprocessing_key(_task("task.preprocess.spacing=[5,5,5]"), True)
    assert preprocessing_key(base, True) != preprocessing_key(_task("task.preprocess.a_max=300"), True)
    assert preprocessing_key(base, True) != preprocessing_key(base, False)


def test_put_get_round_trip_and_a_replaced_file_misses(phantom_home, tmp_path):
    task = _task()
    root, _ = locate_data(task, None, log=lambda *_: None)
    item = read_splits(task, root)["val"][0]
    case = preprocess_transforms(task)({"image": item["image"], "label": item["label"]})
    cache = CaseCache(task, root=tmp_path)
    assert cache.get(item) is None
    cache.put(item, case)
    hit = cache.get(item)
    torch.testing.assert_close(hit["image"], torch.as_tensor(case["image"]))
    torch.testing.assert_close(hit["label"], torch.as_tensor(case["label"]))
    assert isinstance(hit["image"].numpy().base, np.memmap) or hit["image"].numpy().base is not None
    assert not list(tmp_path.rglob(".tmp-*"))                       # nothing half-written left behind
    # another preprocessing: another folder, so the cached case is not served
    assert CaseCache(_task("task.preprocess.spacing=[5,5,5]"), root=tmp_path).get(item) is None
    # the image file replaced (new modification time): a miss, not a stale hit
    st = os.stat(item["image"])
    os.utime(item["image"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert cache.get(item) is None
    finally:
        os.utime(item["image"], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.get(item) is not None


FAST = ["--set", "task.finetune.max_steps=4", "--set", "task.finetune.roi=[64,32,32]", "--set",
        "task.finetune.num_samples=1", "--set", "task.finetune.val_every=0", "--set", "task.evaluate.overlap=0.0",
        "--set", "task.finetune.warmup_steps=1"]


def test_cli_cache_then_a_run_reads_it_with_the_same_result(phantom_home, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    os.environ["SSLBENCH_CACHE"] = str(cache_dir)
    try:
        assert main(["data", "cache", "--task", "phantom-btcv", *FAST[:0]]) == 0
        out = capsys.readouterr().out
        assert "cases cached" in out and "PHANTOM" in out
        files = sorted(cache_dir.rglob("*.image.npy"))
        assert files, "no arrays written"
        assert main(["data", "cache", "--task", "phantom-btcv"]) == 0
        assert "0 written" in capsys.readouterr().out                   # the second build reuses every case
        stamps = {p: p.stat().st_mtime_ns for p in files}

        assert main(["run", "--task", "phantom-btcv", "--out", str(tmp_path / "a"), *FAST]) == 0
        assert main(["run", "--task", "phantom-btcv", "--out", str(tmp_path / "b"), "--set", "run.cache=none", *FAST]) == 0
        a = json.loads(next((tmp_path / "a").rglob("metrics.json")).read_text())
        b = json.loads(next((tmp_path / "b").rglob("metrics.json")).read_text())
        assert a["protocol"] == b["protocol"]                            # caching is not part of the protocol
        assert abs(a["mean_dice"] - b["mean_dice"]) < 5e-4
        assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # read, not rewritten
    finally:
        os.environ.pop("SSLBENCH_CACHE", None)


def test_cli_cache_of_a_combined_corpus_holds_every_volume_pretraining_reads(phantom_home, tmp_path, capsys):
    """`sslbench data cache --task phantom-voco-corpus` (sources BTCV, TCIA COVID-19, LUNA16 twins, no datalist of
    its own) caches each source's images under the keys the pre-training's stream loader looks up."""
    from sslbench.data.corpus import corpus_items

    cache_dir = tmp_path / "cache"
    os.environ["SSLBENCH_CACHE"] = str(cache_dir)
    try:
        assert main(["data", "cache", "--task", "phantom-voco-corpus"]) == 0
        assert "PHANTOM" in capsys.readouterr().out
        corpus = recipes.resolve("voco", None, preset="tiny", corpus="phantom-voco-corpus")["corpus"]
        _, phantom, items = corpus_items(corpus, None, log=lambda *_: None)
        sources = {it["id"].split("/")[0] for it in items}
        assert phantom and sources == {"phantom-btcv", "phantom-tcia-covid19", "phantom-luna16"}
        cache = CaseCache(corpus, with_label=False)
        assert all(cache.get(it) is not None for it in items)
        assert len(list(cache.folder.glob("*.image.npy"))) == len(items)
    finally:
        os.environ.pop("SSLBENCH_CACHE", None)
