"""The 2D track (issue 23): pre-training on a 2D task's own images (NIH ChestX-ray14).

The VoCo supplement's Table 4 follows PCRL / PCRLv2's 2D protocol: every method pre-trains on 60% of ChestX-ray14
(whole patients; the task's ``pretrain`` split, :func:`sslbench.data.classification.pretrain_patients`) and
fine-tunes on the rest (``train``), scored by the mean AUC over the 14 findings on ``test_list.txt``. A method
pre-trains in 2D when the run's corpus is such a task (:func:`sslbench.recipes.resolve` makes the task its own
corpus and applies the method's ``two_d`` recipe block). :func:`sslbench.protocol.pretraining._pretrain` runs the same loop,
records, hashes and resume as in 3D; this module supplies the 2D parts it calls: the items (the ``pretrain``
split), the image stack ``[N, 1, H, W]`` in [0, 1] at ``preprocess.size``, the method's 2D class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .. import tasks
from ..errors import RecipeError


def is_2d(corpus: Mapping[str, Any] | None) -> bool:
    """Whether a run's corpus is a 2D task (its kind's ``two_d``: pre-training on its ``pretrain`` split)."""
    kind = tasks.kind_if_any(corpus)
    return kind is not None and kind.two_d


def method_class(cfg: Mapping[str, Any]):
    """The method's 2D class, or a one-line RecipeError naming the methods that have one."""
    from ..methods import REGISTRY_2D, get_method_class

    name = cfg["method"]["name"]
    cls = get_method_class(name, spatial_dims=2)
    if cls is None:
        where = (cfg.get("recipe_files") or {}).get("method") or name
        raise RecipeError(f"{where}: method '{name}' has no 2D form yet (the ChestX-ray14 track pre-trains in 2D); "
                          f"2D methods: {', '.join(sorted(REGISTRY_2D))}, or --method scratch")
    return cls


def check(cfg: Mapping[str, Any]) -> None:
    """Settings the 2D pre-training cannot run, refused before any work."""
    pt = cfg["method"].get("pretrain") or {}
    if pt.get("loader", "memory") != "memory":
        raise RecipeError(f"method.pretrain.loader: {pt.get('loader')} reads 3D case caches; the 2D track keeps its "
                          f"images in memory; expected memory")
    if str(cfg["model"].get("name")) not in ("unet2d",):
        raise RecipeError(f"model.name: {cfg['model'].get('name')!r}: 2D pre-training trains PCRL's ResNet-18 U-Net; "
                          f"expected unet2d (the 2D Swin fine-tunes from scratch only)")


def corpus_root(cfg: Mapping[str, Any], root, corpus_root):
    """The root a 2D pre-training reads: the task's own ``--root`` when the corpus is the task (its pretrain
    split), unless ``--corpus-root`` names another copy."""
    corpus, task = cfg.get("corpus") or {}, cfg.get("task") or {}
    if corpus_root is None and is_2d(corpus) and corpus.get("name") == task.get("name"):
        return root
    return corpus_root


def pretrain_items(corpus: Mapping[str, Any], root_path, phantom: bool) -> tuple[Path, bool, list[dict]]:
    """(root, phantom, the ``pretrain`` split's items) of a 2D task located at ``root_path`` (the protocol's
    ``locate_data``): what a 2D pre-training reads."""
    from ..data import layouts
    from ..errors import DataError

    dl = layouts.load_datalist(corpus, root_path)
    items = dl.splits.get("pretrain") or []
    if not items:
        raise DataError(f"{dl.source}: the 'pretrain' split ({dl.origin.get('pretrain', '?')}) is empty; expected "
                        f"data.pretrain_fraction > 0 of the images")
    return Path(root_path), phantom or bool(corpus.get("phantom")), items


def load_images(corpus: Mapping[str, Any], items: list[dict], progress=None) -> torch.Tensor:
    """The pre-training images as float32 ``[N, 1, H, W]`` in [0, 1] (grey, resized to ``preprocess.size``)."""
    from ..data import classification as data_mod

    arr = data_mod.load_split(corpus, items, progress, "load pretrain images")
    return torch.from_numpy(arr).unsqueeze(1).float().div_(255.0)


def input_size(corpus: Mapping[str, Any]) -> tuple[int, int]:
    size = tuple(int(s) for s in corpus["preprocess"]["size"])
    if len(size) != 2 or any(s % 32 for s in size):
        raise RecipeError(f"{corpus['name']}: key 'preprocess.size': {list(size)}; the 2D U-Net needs two sizes, "
                          f"multiples of 32")
    return size


def pretrain_pixels(cfg: Mapping[str, Any], cls) -> int:
    """Pixels through the encoder in one 2D pre-training step (feasibility estimates): batch x the method's
    ``pixels_per_image`` (its encoder's input pixels per image, e.g. two views of the image's size)."""
    pt = cfg["method"].get("pretrain") or {}
    size = tuple(int(s) for s in (cfg["corpus"].get("preprocess") or {}).get("size") or (224, 224))
    params = dict(cfg["method"].get("params") or {})
    per = cls.pixels_per_image(params, size) if cls is not None else 2 * size[0] * size[-1]
    return int(pt.get("batch_size", 1) * per)
