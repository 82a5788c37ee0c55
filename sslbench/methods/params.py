"""Typed method params (issue 21): each method declares its recipe's ``params`` as a frozen dataclass.

The recipe yaml stays the place of the paper defaults; a method's dataclass repeats them as its field defaults
(tests/test_method_params.py checks that the two never drift) and says, one docstring line per field, what each
is and which official code or paper equation it follows. :func:`build` turns the resolved ``method.params``
mapping into the dataclass, with one-line RecipeErrors: an unknown key (with did-you-mean), a value of the wrong
type (naming the type expected) or a value not allowed (naming the allowed values). The protocol's pre-flight
(``sslbench.protocol.plan.check_method_params``) runs it on every run's resolved recipe before any work, naming
the recipe file; a method's constructor runs it again on whatever mapping it is given (the tests build methods
from plain dicts), so a method reads ``self.p.<field>`` and re-checks nothing by hand.

Field annotations understood: ``bool``, ``int``, ``float`` (an integer is accepted), ``str``, ``Literal[...]``,
``X | None``, unions, ``tuple[X, ...]`` / ``tuple[X, Y, Z]`` (a YAML list), a nested params dataclass (a YAML
mapping). A field's ``metadata`` may hold a ``key`` (its recipe key when that is no Python name: ``lambda``)
and a rule (:func:`rule`: a predicate and the words for what it expects); a dataclass' :meth:`MethodParams.check`
holds the checks across fields (:func:`refuse`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Literal, Mapping

from ..errors import RecipeError, did_you_mean

#: the window-attention kernels a Swin method's ``attention`` may name (= sslbench.speed.names.ATTENTIONS, which a
#: test checks); the runtime applies it, and it is left out of the protocol hash
Attention = Literal["fused", "sdpa", "monai"]


class _Refused(Exception):
    """A value a params dataclass does not take: the recipe key, the value, what was expected."""

    def __init__(self, key: str, value: Any, expected: str):
        super().__init__(key)
        self.key, self.value, self.expected = key, value, expected


class _Unknown(Exception):
    def __init__(self, key: str, known: list[str]):
        super().__init__(key)
        self.key, self.known = key, known


def refuse(key: str, value: Any, expected: str) -> None:
    """Refuse ``value`` of the recipe key ``key`` (in :meth:`MethodParams.check`); :func:`build` makes it one line."""
    raise _Refused(key, value, expected)


def rule(ok: Callable[[Any], bool], expected: str, key: str | None = None) -> dict:
    """A field's metadata: its (converted) value must satisfy ``ok``, else the line says it expected ``expected``."""
    return {"ok": ok, "expect": expected, **({"key": key} if key else {})}


def recipe_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


class MethodParams:
    """Base of every method's params dataclass (decorate the subclass with ``@dataclass(frozen=True)``)."""

    def check(self) -> None:
        """Checks across fields (call :func:`refuse`); none by default."""

    @classmethod
    def build(cls, params: Any, method: str = "", where: str = ""):
        return build(cls, params, method, where)

    def as_dict(self) -> dict:
        """The params as the recipe writes them: recipe keys, lists for tuples, mappings for nested params."""
        return {recipe_key(f): _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class NoParams(MethodParams):
    """A method without params."""


def _plain(value: Any) -> Any:
    if isinstance(value, MethodParams):
        return value.as_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def build(cls: type, params: Any, method: str = "", where: str = ""):
    """``cls`` (a params dataclass) from the mapping ``params`` (returned as is when it is one already); one-line
    RecipeError naming ``where`` (the recipe file, if given), the key ``method.params.<key>`` and ``method``."""
    if isinstance(params, cls):
        return params
    pre = f"{where}: " if where else ""
    of = f" for method {method}" if method else ""
    try:
        return _build(cls, params if params is not None else {}, "")
    except _Unknown as exc:
        leaf = exc.key.rsplit(".", 1)[-1]
        raise RecipeError(f"{pre}unknown key 'method.params.{exc.key}'{of}{did_you_mean(leaf, exc.known)}; "
                          f"expected one of {', '.join(exc.known)}") from None
    except _Refused as exc:
        raise RecipeError(f"{pre}method.params.{exc.key}: {exc.value!r}{of}; expected {exc.expected}") from None


def _build(cls: type, mapping: Any, prefix: str):
    if not isinstance(mapping, Mapping):
        raise _Refused(prefix.rstrip(".") or "", mapping, describe(cls))
    fields = {recipe_key(f): f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values = {}
    for k, v in mapping.items():
        if k not in fields:
            raise _Unknown(f"{prefix}{k}", list(fields))
        f, path = fields[k], f"{prefix}{k}"
        try:
            value = _convert(hints[f.name], v, path)
        except _Refused as exc:   # a field with a rule says all it expects, its type included
            if exc.key != path or "expect" not in f.metadata:
                raise
            raise _Refused(path, v, f.metadata["expect"]) from None
        ok = f.metadata.get("ok")
        if ok is not None and value is not None:
            try:
                good = bool(ok(value))
            except (TypeError, ValueError):
                good = False
            if not good:
                raise _Refused(path, v, f.metadata["expect"])
        values[f.name] = value
    obj = cls(**values)
    try:
        obj.check()
    except _Refused as exc:
        raise _Refused(f"{prefix}{exc.key}", exc.value, exc.expected) from None
    return obj


def _convert(tp: Any, value: Any, path: str) -> Any:
    """``value`` as the annotation ``tp`` holds it (lists -> tuples, ints -> floats), or _Refused."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _convert(a, value, path)
                except _Refused:
                    pass
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
            if len(kinds) == len(value):
                try:
                    return tuple(_convert(a, v, path) for a, v in zip(kinds, value))
                except _Refused:
                    pass
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, f"{path}.")
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"method params: annotation {tp!r} of '{path}' is not one sslbench.methods.params reads")
    raise _Refused(path, value, describe(tp))


_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _word(value: Any) -> str:
    return "true" if value is True else "false" if value is False else "null" if value is None else str(value)


def describe(tp: Any) -> str:
    """What a value of the annotation ``tp`` must be, in the recipe's words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(_word(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(describe(a) for a in rest)
        if type(None) in args:
            return "true, false or null" if rest == [bool] else f"{text} or null"
        return text
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURAL.get(args[0], describe(args[0]))}"
        same = len(set(args)) == 1
        return f"a list of {len(args)} {_PLURAL.get(args[0], describe(args[0]))}" if same else \
            "a list of " + ", ".join(describe(a) for a in args)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a mapping of " + ", ".join(recipe_key(f) for f in dataclasses.fields(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# Rules shared by several methods' fields
def positive(expected: str = "a positive value") -> dict:
    return rule(lambda v: all(x > 0 for x in (v if isinstance(v, tuple) else (v,))), expected)


def probability() -> dict:
    return rule(lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]")

