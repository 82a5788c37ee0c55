"""Recipes as data: method recipes (methods/*.yaml), task recipes (benchmarks/*.yaml), shared defaults.

A run's configuration is resolved from four layers, each validated up front with one-line errors that
name the file, the key and what was expected:

    sslbench/defaults.yaml  ->  the method recipe  ->  the task recipe  ->  the preset  ->  --set overrides

The resolved config has the sections ``run``, ``model``, ``method`` and ``task``; ``--set`` addresses any
key of it by dotted path (``--set task.finetune.lr=1e-3``, ``--set method.params.lambda=0.5``). Presets are
dotted overrides declared inside each recipe under ``presets: {name: {key: value}}``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
import importlib.util
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import RecipeError, did_you_mean  # noqa: F401 (did_you_mean: recipes.did_you_mean for its users)

PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_DIR = PACKAGE_DIR.parent
KINDS = {"methods": "sslbench.recipe_files.methods", "benchmarks": "sslbench.recipe_files.benchmarks",
         "leaderboards": "sslbench.recipe_files.leaderboards"}
PRESETS = ("paper", "tiny")
STATUSES = ("available", "planned")


def recipe_dir(kind: str) -> Path:
    """Folder of one recipe kind: the repository's top-level folder, else the installed wheel's copy."""
    local = _REPO_DIR / kind
    if local.is_dir() and any(local.glob("*.yaml")):
        return local
    # Installed wheel: the folders ship as data-only (namespace) packages sslbench.recipe_files.<kind>.
    try:
        spec = importlib.util.find_spec(KINDS[kind])
    except ModuleNotFoundError:
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RecipeError(f"cannot find the {kind}/ recipes next to {PACKAGE_DIR} nor in the installed package")
    return Path(locations[0])


def list_recipes(kind: str) -> list[str]:
    return sorted(p.stem for p in recipe_dir(kind).glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of keys to values at the top level")
    return data


# --------------------------------------------------------------------------------------------------
# Schemas: a small declarative checker, so that every error names file, key and expectation.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    types: tuple = ()                # accepted python types (int is accepted where float is)
    choices: tuple = ()              # accepted values
    items: "Spec | None" = None      # for lists: spec of each item
    length: int | None = None        # for lists: exact length
    nullable: bool = False
    fields: Mapping[str, "Spec"] | None = None   # for mappings with a fixed set of keys
    free: bool = False               # a mapping whose keys are free (method params, label maps)
    required: bool = False
    values: "Spec | None" = None     # for free mappings: spec of each value
    nonempty: bool = False           # strings: not blank; lists: at least one item
    finite: bool = False             # numbers: no nan / inf
    minimum: float | None = None     # numbers: lower bound (inclusive)
    maximum: float | None = None     # numbers: upper bound (inclusive)
    expect: str = ""                 # the wording of what is expected, when the generated one says too little

    def describe(self) -> str:
        if self.expect:
            return self.expect
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.fields is not None or self.free:
            text = "a mapping"
        elif self.items is not None:
            text = f"a {'non-empty ' if self.nonempty else ''}list of {self.length or ''}{' ' if self.length else ''}" \
                   f"{self.items.describe()}".replace("  ", " ")
        else:
            names = {bool: "true/false", int: "an integer", float: "a finite number" if self.finite else "a number",
                     str: "a non-empty string" if self.nonempty else "a string", list: "a list", dict: "a mapping"}
            text = " or ".join(names.get(t, t.__name__) for t in self.types)
            if self.minimum is not None and self.maximum is not None:
                text += f" in {self.minimum:g}-{self.maximum:g}"
            elif self.minimum is not None:
                text += f" >= {self.minimum:g}"
            elif self.maximum is not None:
                text += f" <= {self.maximum:g}"
        return text + (" or null" if self.nullable else "")


def S(*types, **kw) -> Spec:
    return Spec(types=types, **kw)


def _type_ok(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def check(value: Any, spec: Spec, where: str, key: str) -> None:
    """Raise RecipeError('<where>: key <key>: expected ..., got ...') when value does not fit spec."""
    if value is None:
        if spec.nullable:
            return
        raise RecipeError(f"{where}: key '{key}': expected {spec.describe()}, got null")
    if spec.choices:
        if value not in spec.choices:
            raise RecipeError(f"{where}: key '{key}': expected {spec.describe()}, got {value!r}"
                              f"{did_you_mean(value, spec.choices)}")
        return
    if spec.fields is not None:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: key '{key}': expected a mapping, got {type(value).__name__}")
        for k, v in value.items():
            sub_key = f"{key}.{k}" if key else str(k)
            if k not in spec.fields:
                raise RecipeError(f"{where}: unknown key '{sub_key}'{did_you_mean(k, spec.fields)}; "
                                  f"expected one of {', '.join(spec.fields)}")
            check(v, spec.fields[k], where, sub_key)
        for k, sub in spec.fields.items():
            if sub.required and k not in value:
                raise RecipeError(f"{where}: missing key '{f'{key}.{k}' if key else k}' ({sub.describe()})")
        return
    if spec.free:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: key '{key}': expected a mapping, got {type(value).__name__}")
        if spec.values is not None:
            for k, v in value.items():
                check(v, spec.values, where, f"{key}.{k}" if key else str(k))
        return
    if spec.items is not None:
        if not isinstance(value, list) or (spec.nonempty and not value):
            raise RecipeError(f"{where}: key '{key}': expected {spec.describe()}, got {value!r}")
        if spec.length is not None and len(value) != spec.length:
            raise RecipeError(f"{where}: key '{key}': expected {spec.length} values, got {len(value)}")
        for i, item in enumerate(value):
            check(item, spec.items, where, f"{key}[{i}]")
        return
    if not _type_ok(value, spec.types) or not _bounds_ok(value, spec):
        raise RecipeError(f"{where}: key '{key}': expected {spec.describe()}, got {value!r}")


def _bounds_ok(value: Any, spec: Spec) -> bool:
    """The value rules of a typed spec beyond its type: non-blank strings, finite and bounded numbers."""
    if isinstance(value, str):
        return not spec.nonempty or bool(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    if spec.finite and not math.isfinite(value):
        return False
    if spec.minimum is not None and not value >= spec.minimum:
        return False
    return spec.maximum is None or value <= spec.maximum


NUM = S(float)
INT = S(int)
POS_INT = S(int)
STR = S(str)
BOOL = S(bool)
PRESET_MAP = Spec(free=True)

_HEADER = {
    "name": S(str, required=True),
    "title": S(str, required=True),
    "source": S(str, required=True),
    "code": S(str, nullable=True),
    "status": Spec(choices=STATUSES, required=True),
    "presets": PRESET_MAP,
}

METHOD_SCHEMA = Spec(fields={
    **_HEADER,
    "pretrain": Spec(nullable=True, fields={
        "corpus": STR, "steps": INT, "lr": NUM, "weight_decay": NUM, "warmup_steps": INT,
        "batch_size": INT, "checkpoint_every": INT, "log_every": INT,
        # the pre-training AdamW's options (sslbench.protocol.pretrain_optimizer): AMSGrad; weight decay 0 on
        # biases and 1-D (normalisation) weights
        "amsgrad": BOOL, "no_decay_bias_norm": BOOL, "betas": Spec(items=NUM, length=2),
        # the official optimisers and schedules (sslbench.protocol.pretrain_optimizer / pretrain_schedule): SGD with
        # momentum; StepLR-style steps; modules whose lr stays fixed (SimSiam's --fix-pred-lr)
        "optimizer": Spec(choices=("adamw", "sgd")), "momentum": NUM,
        "schedule": Spec(choices=("warmup_cosine", "step")), "step_every": INT, "step_gamma": NUM,
        "fixed_lr": Spec(items=STR),
        # memory: the whole corpus resized and stacked once; stream: step batches read by DataLoader workers
        # from the memory-mapped case cache (sslbench/data/stream.py)
        "loader": Spec(choices=("memory", "stream")),
        # stream only: random input_size boxes at the preprocessing spacing instead of whole resized volumes
        "native_crops": BOOL,
        # which volume each sample reads (sslbench/data/sampler.py): step (per-step draw with replacement, the
        # default) | epoch (keyed by the global sample index: every volume once per epoch across the ranks)
        "sampler": Spec(choices=("step", "epoch")),
    }),
    "params": Spec(free=True),
    # the method's 2D form (the 2D track, issue 23): pretrain keys over the 3D ones, its own params and presets;
    # read only for a classification2d task (never part of a 3D run's config, so 3D hashes stay as they were)
    "two_d": Spec(fields={"pretrain": Spec(free=True), "params": Spec(free=True), "presets": PRESET_MAP}),
    # a method that exists in 2D only (C2L): its top-level pretrain / params are the 2D ones
    "only_2d": BOOL,
})

TASK_SCHEMA = Spec(fields={
    **_HEADER,
    "extends": STR,
    "kind": Spec(choices=("segmentation", "classification", "classification2d", "corpus"), required=True),
    "modality": S(str, required=True),
    "phantom": BOOL,
    "default_preset": Spec(choices=PRESETS),
    "data": Spec(fields={
        "layouts": Spec(items=STR),
        "datalist": S(str, nullable=True),
        "train_split": S(str, nullable=True),
        "val_split": S(str, nullable=True),
        "val_ids": Spec(items=STR, nullable=True),
        "val_last": S(int, nullable=True),
        "val_fold": S(int, nullable=True),
        "folds_dir": S(str, nullable=True), "pretrain_fraction": NUM,   # CC-CCII fold CSVs; ChestX-ray14
        "label_map": Spec(free=True, nullable=True),
        "phantom_like": S(str, nullable=True),
        "phantom_cases": INT,
        # a combined corpus of phantom twins: this many volumes in all, split evenly over its phantom sources
        # (null: each source's own phantom_cases); never a key of TASK_DEFAULTS (hashes stay as they were)
        "phantom_total": S(int, nullable=True),
        "root": S(str, nullable=True),
        # the paper's pre-training corpus of a real task (default voco-corpus; see paper_corpus); not hashed
        "pretrain_corpus": S(str, nullable=True),
        # a combined pre-training corpus: the task recipes it reads (sslbench/data/corpus.py)
        "sources": Spec(items=Spec(fields={"task": S(str, required=True), "root": S(str, nullable=True)}),
                        nullable=True),
    }),
    "classes": Spec(items=STR),
    # model keys a task sets for every run on it (the 2D track: model.name unet2d), before presets and --set
    "model": Spec(free=True),
    "channels": Spec(items=STR, nullable=True),
    "regions": Spec(free=True, nullable=True),
    "preprocess": Spec(fields={
        "orientation": STR, "spacing": Spec(items=NUM, length=3), "a_min": NUM, "a_max": NUM,
        "b_min": NUM, "b_max": NUM, "clip": BOOL, "crop_foreground": BOOL,
        "normalize": Spec(choices=("window", "zscore")),
        "size": Spec(items=INT), "center_crop": NUM,   # classification: resize to size after a central crop
    }),
    "finetune": Spec(fields={
        "roi": Spec(items=INT, length=3), "epochs": INT, "max_steps": S(int, nullable=True), "lr": NUM,
        "weight_decay": NUM, "warmup_steps": INT, "batch_size": INT, "num_samples": INT, "pos": NUM,
        "neg": NUM, "val_every": S(int, nullable=True), "checkpoint_every": INT,
        "labeled_cases": S(int, float, nullable=True), "loss": Spec(choices=("dicece", "ce", "bce")),
        "log_every": INT, "channel_adapt": Spec(choices=("repeat", "random")),
        "flip_axes": Spec(items=INT), "shift": NUM, "brightness": NUM, "contrast": NUM,   # classification
        # memory: every training case preprocessed and kept; stream: each step's crops cut by DataLoader workers
        # from the memory-mapped case cache (sslbench/data/stream.py CropStream; segmentation tasks)
        "loader": Spec(choices=("memory", "stream")),
    }),
    "evaluate": Spec(fields={
        "overlap": NUM, "sw_batch_size": INT,
        "metrics": Spec(items=Spec(choices=("dice", "nsd", "hd95", "accuracy", "auc"))),
        "batch_size": INT,
        "nsd_tolerance": NUM,
        # empty sets (sslbench.metrics.empty_rules): Dice / NSD of a structure absent from both prediction and
        # truth (both) or from one of them (one), and HD95 (mm) of one absent; nan = left out of the case mean
        "empty": Spec(fields={"both": NUM, "one": NUM}),
        "hd95_empty": NUM,
        "mode": Spec(choices=("gaussian", "constant")),
    }),
})

DEFAULTS_SCHEMA = Spec(fields={
    "run": Spec(fields={
        "seed": INT, "device": STR, "precision": Spec(choices=("auto", "fp32", "bf16")), "out": STR,
        "num_threads": INT, "preset": Spec(choices=PRESETS), "label": STR,
        "cache": Spec(choices=("read", "write", "none")),
        "attention": Spec(choices=("fused", "sdpa", "monai")), "compile": BOOL,
        "loader_workers": INT, "loader_memory_mb": NUM,
        "feasibility": Spec(choices=("check", "warn", "off")), "feasibility_hours": NUM,   # sslbench/protocol/feasibility.py
    }),
    "model": Spec(fields={
        "name": Spec(choices=("swinunetr", "unet3d", "basicunet", "unetr", "unet2d")), "feature_size": INT,
        "use_v2": BOOL,
        "use_checkpoint": BOOL, "drop_rate": NUM, "attn_drop_rate": NUM, "dropout_path_rate": NUM,
        "unet_features": Spec(items=INT, length=6),
        "unet3d": Spec(fields={"base": INT, "norm": Spec(choices=("batch_stats", "batch")),
                               "act": Spec(choices=("relu", "prelu", "elu"))}),
        "vit": Spec(fields={"patch_size": INT, "hidden_size": INT, "mlp_dim": INT, "num_layers": INT,
                            "num_heads": INT}),
        # the 2D track (sslbench/models/unet2d.py): PCRL's ResNet-18 U-Net; ImageNet weights for it (none = official off)
        "unet2d": Spec(fields={"encoder": STR, "decoder_channels": Spec(items=INT, length=5)}),
        "pretrained_2d": Spec(choices=("none", "imagenet")),
    }),
    "presets": PRESET_MAP,
})

#: Keys every task recipe gets unless it sets them (so that --set can address them).
TASK_DEFAULTS: dict[str, Any] = {
    "phantom": False,
    "default_preset": "paper",
    "data": {"layouts": [], "datalist": None, "train_split": "training", "val_split": "validation",
             "val_ids": None, "val_last": None, "label_map": None, "phantom_like": None,
             "phantom_cases": 8, "root": None},
    "finetune": {"max_steps": None, "val_every": None, "checkpoint_every": 200, "labeled_cases": None,
                 "loss": "dicece", "log_every": 10, "loader": "memory"},
    "evaluate": {"mode": "gaussian", "empty": {"both": float("nan"), "one": 0.0}, "hd95_empty": float("nan")},
}
METHOD_DEFAULTS: dict[str, Any] = {"code": None, "params": {}}
PRETRAIN_DEFAULTS: dict[str, Any] = {"checkpoint_every": 500, "log_every": 10,
                                     "amsgrad": False, "no_decay_bias_norm": False, "betas": [0.9, 0.999],
                                     "optimizer": "adamw", "momentum": 0.9, "schedule": "warmup_cosine",
                                     "step_every": 0, "step_gamma": 0.5, "fixed_lr": [],
                                     "loader": "memory", "native_crops": False, "sampler": "step"}


def deep_merge(base: Mapping, top: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _unknown(kind: str, name: str) -> RecipeError:
    names = list_recipes(kind)
    label = {"methods": "method", "benchmarks": "task"}[kind]
    return RecipeError(f"unknown {label} '{name}'{did_you_mean(name, names)}; known: {', '.join(names)}")


def load_method(name: str) -> dict:
    path = recipe_dir("methods") / f"{name}.yaml"
    if not path.is_file():
        raise _unknown("methods", name)
    data = _read_yaml(path)
    check(data, METHOD_SCHEMA, str(path), "")
    if data["name"] != name:
        raise RecipeError(f"{path}: key 'name': expected '{name}' (the file name), got {data['name']!r}")
    out = deep_merge(METHOD_DEFAULTS, data)
    if out.get("pretrain") is not None:
        out["pretrain"] = deep_merge(PRETRAIN_DEFAULTS, out["pretrain"])
    out["_file"] = str(path)
    return out


def load_task(name: str, _seen: tuple = ()) -> dict:
    path = recipe_dir("benchmarks") / f"{name}.yaml"
    if not path.is_file():
        raise _unknown("benchmarks", name)
    data = _read_yaml(path)
    parent = data.get("extends")
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(f"{path}: key 'extends': expected a task name, got {parent!r}")
        if parent in _seen:
            raise RecipeError(f"{path}: key 'extends': circular extension through '{parent}'")
        base = load_task(parent, _seen + (name,))
        base.pop("_file", None)
        base.pop("extends", None)
        presets = deep_merge(base.get("presets", {}), data.get("presets", {}))
        data = deep_merge(base, data)
        data["presets"] = presets
    check(data, TASK_SCHEMA, str(path), "")
    if data["name"] != name:
        raise RecipeError(f"{path}: key 'name': expected '{name}' (the file name), got {data['name']!r}")
    if data["status"] == "available":
        needed = ["data", "preprocess"] + ([] if data["kind"] == "corpus" else ["classes", "finetune", "evaluate"])
        for key in needed:
            if key not in data:
                raise RecipeError(f"{path}: missing key '{key}' (required for an available {data['kind']} task)")
    out = deep_merge(TASK_DEFAULTS, data)
    _scores_as_numbers(out, str(path))
    out["_file"] = str(path)
    return out


def _scores_as_numbers(task: dict, where: str) -> None:
    """evaluate.empty.{both,one} and evaluate.hd95_empty as floats: YAML's ``nan`` (a string) becomes NaN."""
    ev = task.get("evaluate")
    if not isinstance(ev, dict):
        return
    slots = [(ev, "hd95_empty", "evaluate.hd95_empty")]
    if isinstance(ev.get("empty"), dict):
        slots += [(ev["empty"], k, f"evaluate.empty.{k}") for k in ("both", "one")]
    for node, k, key in slots:
        v = node.get(k)
        if isinstance(v, str) and v.strip().lower() in ("nan", ".nan"):
            node[k] = float("nan")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            node[k] = float(v)
        elif k in node:
            raise RecipeError(f"{where}: key '{key}': expected a number or nan (left out of the mean), got {v!r}")


def load_defaults() -> dict:
    path = PACKAGE_DIR / "defaults.yaml"
    data = _read_yaml(path)
    check(data, DEFAULTS_SCHEMA, str(path), "")
    data["_file"] = str(path)
    return data


# --------------------------------------------------------------------------------------------------
# Dotted keys, presets and overrides
# --------------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value: Any, current: Any, where: str, key: str) -> Any:
    """Make a parsed override fit the type of the value it replaces (YAML reads '1e-3' as a string)."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(current, str):
        return str(value) if not isinstance(value, (dict, list)) else value
    elif isinstance(current, list):
        if isinstance(value, list):
            return value
        if isinstance(value, (int, float)) and len(current) and not isinstance(value, bool):
            return [type(current[0])(value)] * len(current)  # --set task.finetune.roi=32 -> [32, 32, 32]
    elif isinstance(current, dict):
        if isinstance(value, dict):
            return value
    else:
        return value
    raise RecipeError(f"{where}: key '{key}': expected {type(current).__name__} like {current!r}, got {value!r}")


def set_dotted(cfg: dict, key: str, value: Any, where: str, parse: bool = True) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if not isinstance(node, dict):
            raise RecipeError(f"{where}: key '{key}': '{'.'.join(parts[:i])}' is a value, not a section")
        visible = [k for k in node if not str(k).startswith("_")]
        if part not in node or part.startswith("_"):
            raise RecipeError(f"{where}: unknown key '{path}'{did_you_mean(part, visible)}; "
                              f"expected one of {', '.join(map(str, visible))}")
        if i == len(parts) - 1:
            new = _parse_value(value) if parse and isinstance(value, str) else value
            node[part] = _coerce(new, node[part], where, key)
        else:
            node = node[part]


def get_dotted(cfg: Mapping, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def parse_set(items: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for item in items or ():
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected KEY=VALUE, e.g. --set task.finetune.lr=1e-3")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


#: ``method.pretrain.corpus`` value meaning "the run's fine-tuning task" (its training split, labels included)
TASK_CORPUS = "@task"


#: the paper's corpus for a real task without ``data.pretrain_corpus``: the 1.6k VoCo corpus (seed supplement,
#: Sec. 1: BTCV + TCIA COVID-19 + LUNA16 "for the other four downstream tasks"; BTCV's is voco-corpus-btcv)
PAPER_CORPUS = "voco-corpus"


def paper_corpus(default: str, task: Mapping[str, Any]) -> str:
    """The corpus a method whose recipe names ``default`` pre-trains on before a REAL ``task``: the generic
    phantom image corpus (``phantom-corpus``) becomes the task's ``data.pretrain_corpus`` (else voco-corpus), a
    phantom twin (``phantom-btcv``, the labelled corpus of the supervised control) its real dataset (``btcv``);
    ``@task`` and real corpora stay. Phantom corpora for a real task only on request (``--corpus``)."""
    if default == "phantom-corpus":
        return (task.get("data") or {}).get("pretrain_corpus") or PAPER_CORPUS
    if default.startswith("phantom-") and default[len("phantom-"):] in list_recipes("benchmarks"):
        return default[len("phantom-"):]
    return default


def resolve(method: str, task: str | None = None, preset: str | None = None, overrides: Iterable[str] = (),
            seed: int | None = None, corpus: str | None = None) -> dict:
    """The full, validated configuration of one protocol run.

    Sections: ``run``, ``model``, ``method``, and ``task`` (fine-tuning) and/or ``corpus`` (pre-training).
    A method with a ``pretrain`` section gets its corpus (``method.pretrain.corpus`` unless ``corpus`` is
    given), so one resolution validates every override of a pre-train -> fine-tune run.
    """
    defaults = load_defaults()
    m = load_method(method)
    t = load_task(task) if task else None
    for kind, recipe in (("method", m), ("task", t)):
        if recipe is not None and recipe["status"] != "available":
            ready = [n for n in list_recipes("methods" if kind == "method" else "benchmarks")
                     if (load_method(n) if kind == "method" else load_task(n))["status"] == "available"]
            raise RecipeError(f"{kind} '{recipe['name']}' is {recipe['status']} (not implemented yet; "
                              f"{recipe['_file']}); available: {', '.join(ready)}")
    two_d = (t["kind"] if t is not None else load_task(corpus)["kind"] if corpus else None) == "classification2d"
    m = method_form(m, two_d, corpus, t)
    if two_d and m.get("pretrain"):
        corpus = corpus or task       # the 2D track pre-trains on the task's own pre-training split (60%)
    if corpus is None and m.get("pretrain"):
        corpus = m["pretrain"]["corpus"]
        if t is not None and not t.get("phantom"):   # a real task pre-trains on a real corpus (issue 20)
            corpus = paper_corpus(corpus, t)
    if corpus == TASK_CORPUS:   # the fine-tuning task is the corpus (methods/supervised-task.yaml)
        if not task:
            raise RecipeError(f"{m['_file']}: key 'pretrain.corpus' is {TASK_CORPUS!r} (the fine-tuning task's "
                              f"training split); expected --task TASK, or --corpus TASK for a pre-training alone")
        corpus = task
    c = load_task(corpus) if corpus else None
    if c is not None and c["kind"] != "corpus" and c["status"] != "available":
        raise RecipeError(f"{c['_file']}: task '{corpus}' is {c['status']}, not a usable pre-training corpus")
    if two_d and c is not None and c["kind"] != "classification2d":
        raise RecipeError(f"--corpus {corpus}: task '{t['name']}' is 2D (classification2d) and pre-trains on 2D "
                          f"images; expected a classification2d corpus such as --corpus {t['name']}")
    lead = t or c
    preset = preset or (lead.get("default_preset") if lead else None) or "paper"
    if preset not in PRESETS:
        raise RecipeError(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}{did_you_mean(preset, PRESETS)}")
    cfg: dict[str, Any] = {"run": copy.deepcopy(defaults["run"]), "model": copy.deepcopy(defaults["model"]),
                           "method": {k: v for k, v in m.items() if k not in ("presets", "_file", "two_d")}}
    files = {"defaults": defaults["_file"], "method": m["_file"]}
    layers = [("", defaults), ("method", m)]
    for section, recipe in (("task", t), ("corpus", c)):
        if recipe is not None:
            cfg[section] = {k: v for k, v in recipe.items() if k not in ("presets", "_file", "model")}
            files[section] = recipe["_file"]
            layers.append((section, recipe))
    # the task's model keys (the 2D track's unet2d), under presets and --set; a 2D pre-training alone (--corpus
    # chestxray14, no --task) takes its corpus task's, so that it builds what `sslbench run` builds
    model_keys = t.get("model") if t is not None else c.get("model") if two_d and c is not None else None
    if model_keys:
        cfg["model"] = deep_merge(cfg["model"], model_keys)
    cfg["run"]["preset"] = preset
    for section, recipe in layers:
        for key, value in (recipe.get("presets", {}).get(preset) or {}).items():
            full = f"{section}.{key}" if section else key
            set_dotted(cfg, full, value, f"{recipe['_file']} (preset '{preset}')", parse=False)
    for key, value in parse_set(overrides):
        set_dotted(cfg, key, value, f"--set {key}")
    if seed is not None:
        cfg["run"]["seed"] = int(seed)
    _validate_resolved(cfg, files)
    cfg["recipe_files"] = files
    return cfg


def method_form(m: dict, two_d: bool, corpus: str | None, task: Mapping | None) -> dict:
    """The method recipe ``m`` in the form a run uses: its ``two_d`` block applied for a 2D task (pretrain keys
    merged over the 3D ones, ``params`` and ``presets`` replaced); a 2D-only method (``only_2d``) refused for
    a 3D task or a pre-training alone (``only_2d`` and ``two_d`` never reach the run's config)."""
    if m.get("only_2d") and not two_d:
        where = (f"task '{task['name']}' is {task['kind']}" if task is not None
                 else f"corpus '{corpus}' is not a 2D task" if corpus else "no 2D task given")
        raise RecipeError(f"{m['_file']}: method '{m['name']}' exists in 2D only (PCRL's ChestX-ray14 track); {where}; "
                          f"expected --task chestxray14 or phantom-chestxray14")
    out = {k: v for k, v in m.items() if k != "only_2d"}
    block = m.get("two_d")
    if two_d and block:
        if out.get("pretrain") is not None and block.get("pretrain"):
            out["pretrain"] = deep_merge(out["pretrain"], block["pretrain"])
        if "params" in block:
            out["params"] = copy.deepcopy(block["params"])
        if "presets" in block:
            out["presets"] = copy.deepcopy(block["presets"])
    return out


def split_config(cfg: Mapping, part: str) -> dict:
    """The pre-training ('corpus') or fine-tuning ('task') view of a resolved run config."""
    drop = "task" if part == "corpus" else "corpus"
    out = {k: copy.deepcopy(v) for k, v in cfg.items() if k != drop}
    if "recipe_files" in out:
        out["recipe_files"] = {k: v for k, v in out["recipe_files"].items() if k != drop}
    return out


def _validate_resolved(cfg: dict, files: Mapping[str, str]) -> None:
    check({k: cfg[k] for k in ("run", "model")}, DEFAULTS_SCHEMA, f"{files['defaults']} (after presets and --set)", "")
    check(cfg["method"], METHOD_SCHEMA, f"{files['method']} (after presets and --set)", "method")
    betas = (cfg["method"].get("pretrain") or {}).get("betas")
    if betas is not None and not all(0.0 <= float(b) < 1.0 for b in betas):
        raise RecipeError(f"{files['method']}: key 'pretrain.betas': expected two numbers in [0, 1) (AdamW's "
                          f"beta1, beta2), got {list(betas)}")
    pt = cfg["method"].get("pretrain") or {}
    if pt.get("schedule") == "step" and int(pt.get("step_every") or 0) < 1:
        raise RecipeError(f"{files['method']}: key 'pretrain.step_every': expected the steps between lr drops "
                          f"(>= 1) with pretrain.schedule=step, got {pt.get('step_every')}")
    for section in ("task", "corpus"):
        if section in cfg:
            _scores_as_numbers(cfg[section], f"{files[section]} (after presets and --set)")   # --set ...empty={both: nan}
            check(cfg[section], TASK_SCHEMA, f"{files[section]} (after presets and --set)", section)
    task_file = files.get("task", "")
    ft = cfg.get("task", {}).get("finetune")
    if ft:
        for k in ("lr", "batch_size", "num_samples"):
            if ft.get(k, 1) <= 0:   # classification tasks have no num_samples
                raise RecipeError(f"{task_file}: key 'finetune.{k}': expected a positive value, got {ft[k]}")
        if (ft.get("max_steps") or 0) <= 0 and ft["epochs"] <= 0:
            raise RecipeError(f"{task_file}: keys 'finetune.epochs' / 'finetune.max_steps': expected one positive")
        _check_scoring(cfg["task"], task_file)


def _check_scoring(task: Mapping[str, Any], task_file: str) -> None:
    """NSD needs a tolerance; regions must name foreground classes (sslbench.metrics.region_class_ids)."""
    from .metrics import region_class_ids

    ev = task.get("evaluate") or {}
    if "nsd" in (ev.get("metrics") or []) and not (ev.get("nsd_tolerance") or 0) > 0:
        raise RecipeError(f"{task_file}: key 'evaluate.nsd_tolerance': expected a positive tolerance in mm "
                          f"(evaluate.metrics lists nsd), got {ev.get('nsd_tolerance')!r}")
    try:
        region_class_ids(task)
    except (ValueError, TypeError, AttributeError) as exc:
        raise RecipeError(f"{task_file}: key 'regions': {exc}") from None


# Keys left out of a run's protocol hash: those that do not change what it computes (output folder,
# device) and the seed, so that runs of one protocol over several seeds share a hash and are averaged
# together by the report (the run folder is named <hash>-s<seed>).
#: keys that change how a run computes, not what: the same protocol whatever their values (the window-attention
#: kernel computes the same function, to rounding, with any of its values)
_NOT_PROTOCOL = ("run.out", "run.device", "run.num_threads", "run.seed", "run.cache", "recipe_files",
                 "method.params.attention", "run.attention", "run.compile", "run.loader_workers",
                 "run.loader_memory_mb", "run.feasibility", "run.feasibility_hours", "task.data.pretrain_corpus",
                 "corpus.data.pretrain_corpus")


#: keys added after runs were recorded without them, each with the value that computes what those runs did: at
#: that value a key is left out of the hash, so a recipe that resolves to it keeps the hash of the runs recorded
#: before the key existed (and reuses / averages with them); any other value is hashed like every key
_HASHED_UNLESS = {"method.pretrain.amsgrad": False, "method.pretrain.no_decay_bias_norm": False,
                  "method.pretrain.betas": [0.9, 0.999],
                  **{f"method.pretrain.{k}": v for k, v in (("optimizer", "adamw"), ("momentum", 0.9),
                                                            ("schedule", "warmup_cosine"), ("step_every", 0),
                                                            ("step_gamma", 0.5), ("fixed_lr", []))},
                  "method.pretrain.loader": "memory", "method.pretrain.native_crops": False,
                  # issue 23: C2L's criterion key; softmax is what C2L runs computed before it
                  "method.params.criterion": "softmax",
                  # issue 25: the step draw is what every run before the key drew
                  "method.pretrain.sampler": "step",
                  # issue 22: fine-tuning's loader at its default computes what runs before the key computed
                  **{f"{section}.finetune.loader": "memory" for section in ("task", "corpus")},
                  # issue 19: the empty-set rules at their defaults score as runs before the keys did (a one-sided
                  # empty set then scored NaN where it now scores 0: a fix, not another protocol)
                  **{f"{section}.evaluate.{key}": TASK_DEFAULTS["evaluate"][key]
                     for section in ("task", "corpus") for key in ("empty", "hd95_empty")}}


def _same(value: Any, legacy: Any) -> bool:
    """``value == legacy`` of the same types all the way down, NaN equal to NaN."""
    if type(value) is not type(legacy):
        return False
    if isinstance(legacy, float) and math.isnan(legacy):
        return math.isnan(value)
    if isinstance(legacy, dict):
        return value.keys() == legacy.keys() and all(_same(value[k], legacy[k]) for k in legacy)
    if isinstance(legacy, list):
        return len(value) == len(legacy) and all(_same(v, w) for v, w in zip(value, legacy))
    return value == legacy


#: model sections added after runs were recorded without them, each read only by one model.name: hashed only when
#: that model is the run's (a SwinUNETR run keeps its hash whatever the U-Net settings)
_MODEL_SECTIONS = {"unet3d": "unet3d"}


def protocol_hash(cfg: Mapping, exclude: Iterable[str] = ()) -> str:
    """Short SHA-256 of the resolved config minus keys that do not change results (out dir, device)."""
    c = copy.deepcopy(dict(cfg))
    model = c.get("model")
    if isinstance(model, dict):
        for section, owner in _MODEL_SECTIONS.items():
            if model.get("name") != owner:
                model.pop(section, None)
    for key, legacy in _HASHED_UNLESS.items():
        parts = key.split(".")
        node = c
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and parts[-1] in node and _same(node[parts[-1]], legacy):
            del node[parts[-1]]
    for key in tuple(_NOT_PROTOCOL) + tuple(exclude):
        parts = key.split(".")
        node = c
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    text = json.dumps(c, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def output_channels(task: Mapping[str, Any]) -> int:
    """The model's output channels: one per region (sigmoid) for a regions task, else one per class (softmax)."""
    return len(task["regions"]) if task.get("regions") else len(task["classes"])


def input_channels(task: Mapping[str, Any]) -> int:
    """The number of input channels of a task's images (``task.channels``; 1 where the recipe has none)."""
    return len(task.get("channels") or []) or 1
