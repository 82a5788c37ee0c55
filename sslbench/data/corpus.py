"""Pre-training corpora: the images of one dataset, or the union of several (``data.sources``).

The VoCo supplement (Sec. 1 and Table 1) pre-trains on BTCV + TCIA COVID-19 (~0.8k CT scans) for the BTCV task and
adds LUNA16 (1.6k) for the others. A combined corpus recipe lists its sources as task recipes (where each
source's root comes from: :mod:`sslbench.data.sources`); each source is read with its own layout and its own
root, and the corpus recipe's ``preprocess`` applies to all of them.
A source contributes its train and validation images (Table 1 counts both); a corpus of one dataset keeps
every image it lists (train, validation and test).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from sslbench.data import layouts
from sslbench.data.locate import locate_data
from sslbench.data.sources import source_names, source_roots
from sslbench.errors import DataError


def labelled_items(task: Mapping[str, Any], root: str | None,
                   log: Callable[[str], None] = print) -> tuple[str, bool, list[dict]]:
    """(where, phantom, [{"id", "image", "label"}, ...]) of a segmentation task's TRAINING split, for a method
    that pre-trains on label maps. Validation and test cases are never read (they score the fine-tuning)."""
    path, phantom = locate_data(task, root, log=log)
    train = layouts.read_datalist(task, path).get("train", [])
    unlabelled = [str(it.get("id")) for it in train if not it.get("label")]
    if unlabelled:
        raise DataError(f"{path}: training cases without a label map ({', '.join(unlabelled[:3])}); a labelled "
                        f"pre-training corpus needs one per case")
    if not train:
        raise DataError(f"{path}: task '{task['name']}' lists no training cases")
    log(f"labelled corpus {task['name']}: {len(train)} training cases at {path}")
    return str(path), phantom or bool(task.get("phantom")), [{"id": it["id"], "image": it["image"],
                                                             "label": it["label"]} for it in train]


def corpus_items(corpus: Mapping[str, Any], root: str | None,
                 log: Callable[[str], None] = print) -> tuple[str, bool, list[dict]]:
    """(where the images are, in words; any source is a phantom; [{"id", "image"}, ...]) of a corpus.

    A corpus without ``data.sources`` is read from ``root`` (or its ``data.root``) with its own layouts.
    """
    if not source_names(corpus):
        path, phantom = locate_data(corpus, root, log=log)
        splits = layouts.read_datalist(corpus, path, log=log)
        items = [{"id": it["id"], "image": it["image"]} for split in ("train", "val", "test")
                 for it in splits.get(split, [])]
        if not items:
            raise DataError(f"{path}: the corpus '{corpus['name']}' lists no images")
        return str(path), phantom, items
    where, any_phantom, items = [], False, []
    for task, src_root in source_roots(corpus, root):
        name = task["name"]
        path, phantom = locate_data(task, src_root, log=log)
        splits = layouts.read_datalist(task, path, log=log)
        found = [{"id": f"{name}/{it['id']}", "image": it["image"]} for split in ("train", "val")
                 for it in splits.get(split, [])]
        if not found:
            raise DataError(f"{path}: source '{name}' of corpus '{corpus['name']}' lists no images")
        items += found
        any_phantom = any_phantom or phantom or bool(task.get("phantom"))
        where.append(f"{name}={path}")
        log(f"corpus {corpus['name']}: {len(found)} images from {name} at {path}")
    return ", ".join(where), any_phantom, items
