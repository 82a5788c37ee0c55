"""Typed method params (issue 21): every method form declares its recipe's ``params`` as a frozen dataclass
(sslbench/methods/params.py) whose defaults are the recipe's paper defaults, and a bad key, type or value is one
line naming the key (and the recipe file, through the pre-flight) before any work."""
import ast
import dataclasses
import inspect
import json
import os
import textwrap
import typing
from pathlib import Path

import pytest

from sslbench import recipes
from sslbench.cli import main
from sslbench.errors import RecipeError
from sslbench.methods import REGISTRY, REGISTRY_2D, get_method_class
from sslbench.methods.params import Attention, MethodParams, build, describe, refuse, rule
from sslbench.protocol import feasibility
from sslbench.protocol.plan import check_method_params
from sslbench.speed.names import ATTENTIONS

#: every method form: (recipe name, spatial dims)
FORMS = [(name, 3) for name in REGISTRY] + [(name, 2) for name in REGISTRY_2D]


def _id(form) -> str:
    return f"{form[0]}-{form[1]}d"


def _recipe_params(name: str, dims: int) -> dict:
    """The paper defaults of a form as its recipe writes them (a 2D-only method's top level is its 2D form)."""
    m = recipes.load_method(name)
    if dims == 2 and not m.get("only_2d"):
        return m["two_d"]["params"]
    return m["params"]


def _protocol_set(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("set_by") == "protocol"}


@pytest.mark.parametrize("form", FORMS, ids=_id)
def test_the_dataclass_defaults_are_the_recipe_defaults(form):
    name, dims = form
    cls = get_method_class(name, dims).Params
    assert dataclasses.is_dataclass(cls) and issubclass(cls, MethodParams)
    assert cls.__dataclass_params__.frozen
    defaults = {k: v for k, v in cls().as_dict().items() if k not in _protocol_set(cls)}
    assert defaults == _recipe_params(name, dims)
    # and the recipe's values build the same dataclass (types as the recipe writes them: lists, ints for floats)
    assert cls.build(_recipe_params(name, dims)) == cls()


def _params_classes():
    seen = {}
    for name, dims in FORMS:
        for c in get_method_class(name, dims).Params.__mro__:
            if dataclasses.is_dataclass(c) and issubclass(c, MethodParams) and c is not MethodParams:
                seen[c.__qualname__] = c
    for c in list(seen.values()):   # nested params (MAE's decoder)
        for tp in typing.get_type_hints(c).values():
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                seen[tp.__qualname__] = tp
    return sorted(seen.items())


@pytest.mark.parametrize("cls", [c for _, c in _params_classes()], ids=[n for n, _ in _params_classes()])
def test_every_field_has_its_docstring_line(cls):
    """A string right after each field's annotation says what it is and which official code it follows."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    documented = {stmt.target.id for stmt, nxt in zip(body, body[1:] + [None])
                  if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                  and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
                  and nxt.value.value.strip()}
    own = [stmt.target.id for stmt in body if isinstance(stmt, ast.AnnAssign)]
    assert set(own) == documented, sorted(set(own) - documented)


def test_the_attention_literal_is_the_kernels_the_runtime_knows():
    assert typing.get_args(Attention) == tuple(ATTENTIONS)


# ----------------------------------------------------------------------------------------- the builder

@dataclasses.dataclass(frozen=True)
class _Inner(MethodParams):
    width: int = 4
    """a width"""


@dataclasses.dataclass(frozen=True)
class _Toy(MethodParams):
    size: tuple[int, int, int] = (2, 2, 2)
    """three sides"""
    lambda_: float = dataclasses.field(default=1.0, metadata={"key": "lambda"})
    """a keyword key"""
    mode: typing.Literal["a", "b"] = "a"
    """a choice"""
    side: int | tuple[int, int] = 3
    """one int or two"""
    gate: bool | None = None
    """three states"""
    rate: float = dataclasses.field(default=0.5, metadata=rule(lambda v: 0 <= v <= 1, "a probability in [0, 1]"))
    """a probability"""
    inner: _Inner = _Inner()
    """nested"""

    def check(self) -> None:
        if self.mode == "b" and self.size[0] < 4:
            refuse("size", list(self.size), "x >= 4 with mode b")


def test_build_converts_the_recipe_types():
    p = build(_Toy, {"size": [1, 2, 3], "lambda": 2, "side": [4, 5], "gate": False, "inner": {"width": 8}})
    assert p == _Toy(size=(1, 2, 3), lambda_=2.0, side=(4, 5), gate=False, inner=_Inner(8))
    assert isinstance(p.lambda_, float) and build(_Toy, {"side": 7}).side == 7
    assert p.as_dict() == {"size": [1, 2, 3], "lambda": 2.0, "mode": "a", "side": [4, 5], "gate": False, "rate": 0.5,
                           "inner": {"width": 8}}
    assert build(_Toy, p) is p and build(_Toy, None) == _Toy()


@pytest.mark.parametrize("params, line", [
    ({"lamda": 1}, "unknown key 'method.params.lamda' for method toy (did you mean 'lambda'?); expected one of size, "
                   "lambda, mode, side, gate, rate, inner"),
    ({"inner": {"widht": 1}}, "unknown key 'method.params.inner.widht' for method toy (did you mean 'width'?); "
                              "expected one of width"),
    ({"size": [1, 2]}, "method.params.size: [1, 2] for method toy; expected a list of 3 integers"),
    ({"size": [1, 2, 3.5]}, "method.params.size: [1, 2, 3.5] for method toy; expected a list of 3 integers"),
    ({"lambda": "x"}, "method.params.lambda: 'x' for method toy; expected a number"),
    ({"lambda": True}, "method.params.lambda: True for method toy; expected a number"),
    ({"mode": "c"}, "method.params.mode: 'c' for method toy; expected one of a, b"),
    ({"side": "x"}, "method.params.side: 'x' for method toy; expected an integer or a list of 2 integers"),
    ({"gate": 1}, "method.params.gate: 1 for method toy; expected true, false or null"),
    ({"rate": 2}, "method.params.rate: 2 for method toy; expected a probability in [0, 1]"),
    ({"rate": "x"}, "method.params.rate: 'x' for method toy; expected a probability in [0, 1]"),
    ({"inner": {"width": "x"}}, "method.params.inner.width: 'x' for method toy; expected an integer"),
    ({"inner": 3}, "method.params.inner: 3 for method toy; expected a mapping of width"),
    ({"mode": "b"}, "method.params.size: [2, 2, 2] for method toy; expected x >= 4 with mode b"),
])
def test_build_refuses_with_one_line(params, line):
    with pytest.raises(RecipeError) as exc:
        build(_Toy, params, "toy", "methods/toy.yaml")
    assert str(exc.value) == f"methods/toy.yaml: {line}"


def test_describe_says_each_annotation_in_the_recipe_words():
    assert describe(typing.Optional[float]) == "a number or null"
    assert describe(tuple[float, ...]) == "a list of numbers"
    assert describe(typing.Literal["x", True, None]) == "one of x, true, null"


# ------------------------------------------------------------------------ every method through the loader

#: per form: a key to misspell, a key and a value of the wrong type, a key and a value not allowed (with words of
#: what the line expects)
BAD = {
    ("voco", 3): ("lambda", ("n", "four"), ("variant", "momentum", "one of paper, teacher-student")),
    ("mg", 3): ("flip_rate", ("crop", [64, 64]), ("attention", "flash", "one of fused, sdpa, monai")),
    ("transvw", 3): ("perturbations", ("elastic", "yes"), ("perturbations", "mg", "one of transvw, genesis")),
    ("simsiam", 3): ("features", ("p_flip", "half"), ("features", "middle", "one of all, last")),
    ("pcrlv1", 3): ("temperature", ("queue_size", 1.5), ("contrast", "moco", "one of nce, infonce")),
    ("pcrlv2", 3): ("num_local", ("flip_axes", "0"), ("ds_head", "conv3x3", "one of official, conv1x1")),
    ("mae", 3): ("norm_pix_loss", ("decoder", 384), ("mae_mask_ratio", 1.0, "a value in (0, 1)")),
    ("swinunetr-ssl", 3): ("temperature", ("sw_batch_size", "two"),
                           ("paste_partners", "views", "one of view, batch")),
    ("supervised", 3): ("flip_prob", ("resize", 96), ("flip_prob", 1.5, "a probability in [0, 1]")),
    ("supervised-task", 3): ("crop", ("crop", "96"), ("attention", "fast", "one of fused, sdpa, monai")),
    ("c2l", 2): ("criterion", ("queue", "big"), ("criterion", "nce-softmax", "one of softmax, nce")),
    ("mg", 2): ("paint_rate", ("local_rate", "half"), ("inpaint_rate", -0.1, "a probability in [0, 1]")),
    ("pcrlv1", 2): ("normalize", ("dim", 12.5), ("normalize", "zscore", "one of imagenet, none")),
    ("pcrlv2", 2): ("local_size", ("num_local", [6]), ("local_size", 1.5, "a fraction of the image side in (0, 1] (96 / 224 = "
                                                                       "0.428571 as the official)")),
    ("transvw", 2): ("head_width", ("crop", [64]), ("crop", [48, 48], "two multiples of 32 (the 2D U-Net "
                                                                 "halves the instance 5 times)")),
    ("voco", 2): ("pred_loss", ("augment", "no"), ("pred_loss", "clamp", "one of official, eq3")),
    ("simsiam", 2): ("pred_dim", ("jitter", [0.4]), ("p_jitter", 2.0, "a probability in [0, 1]")),
}


def test_the_table_covers_every_form():
    assert set(BAD) == set(FORMS)


def _config(name: str, dims: int) -> dict:
    """A form's resolved tiny recipe with a pre-training corpus (what the pre-flight checks)."""
    task = "phantom-chestxray14" if dims == 2 else "phantom-btcv" if name == "supervised-task" else None
    return recipes.resolve(name, task, preset="tiny")


def _misspelt(key: str) -> str:
    return key[:-1] + key[-1] * 2


def _line(cfg: dict) -> str:
    with pytest.raises(RecipeError) as exc:
        check_method_params(cfg)
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("form", FORMS, ids=_id)
def test_a_bad_key_type_or_value_in_the_recipe_is_one_line_naming_file_and_key(form):
    """As if the recipe file (or a preset) held it: the pre-flight's params check names the file and the key."""
    name, dims = form
    misspell, (type_key, type_value), (value_key, bad_value, allowed) = BAD[form]
    where = f"methods/{name}.yaml{' (2D form)' if dims == 2 else ''}: "
    of = f" for method {get_method_class(name, dims).name}"

    cfg = _config(name, dims)
    cfg["method"]["params"][_misspelt(misspell)] = cfg["method"]["params"].pop(misspell)
    line = _line(cfg)
    assert line.startswith(f"{where}unknown key 'method.params.{_misspelt(misspell)}'{of} (did you mean "
                           f"'{misspell}'?); expected one of "), line

    cfg = _config(name, dims)
    cfg["method"]["params"][type_key] = type_value
    line = _line(cfg)
    assert line.startswith(f"{where}method.params.{type_key}: {type_value!r}{of}; expected "), line

    cfg = _config(name, dims)
    cfg["method"]["params"][value_key] = bad_value
    assert _line(cfg) == f"{where}method.params.{value_key}: {bad_value!r}{of}; expected {allowed}"

    check_method_params(_config(name, dims))   # the recipe as it is passes


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("SSLBENCH_ROOT_"):
            monkeypatch.delenv(k)
    home = tmp_path / "data-home"
    monkeypatch.setenv("SSLBENCH_DATA", str(home))
    monkeypatch.setattr(feasibility, "gpu_memory", lambda: (0, 0.0, ""))
    monkeypatch.setattr(feasibility, "cpu_cores", lambda: 2)
    return home


def _files(path: Path) -> list[Path]:
    return sorted(path.rglob("*")) if path.exists() else []


@pytest.mark.parametrize("form", [f for f in FORMS if isinstance(BAD[f][2][1], str)], ids=_id)
def test_sslbench_run_dry_run_refuses_a_value_not_allowed_before_any_work(form, clean_env, tmp_path, capsys):
    """Through the CLI (--set): one line on stderr, exit 2, nothing written, with and without --dry-run."""
    name, dims = form
    key, value, allowed = BAD[form][2]
    task = "phantom-chestxray14" if dims == 2 else "phantom-btcv"
    out = tmp_path / "runs"
    args = ["run", "--method", name, "--task", task, "--preset", "tiny", "--out", str(out),
            "--set", f"method.params.{key}={json.dumps(value)}"]
    where = f"methods/{name}.yaml{' (2D form)' if dims == 2 else ''}"
    line = (f"error: {where}: method.params.{key}: {value!r} for method {get_method_class(name, dims).name}; "
            f"expected {allowed}")
    for extra in (["--dry-run"], []):
        assert main([*args, *extra]) == 2
        assert capsys.readouterr().err.strip() == line
        assert _files(out) == [] and _files(clean_env) == []
