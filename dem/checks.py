"""Checks of a setting's value, each saying what it expected: the declaration in
:mod:`dem.config` names them, and :func:`problem` applies the declared type first.

Hand-written because the types of the settings are few and plain (numbers, strings, lists and
mappings of them), and a validation library would be a dependency for these few lines; ints are
accepted where floats are expected (YAML reads ``1`` as an int).
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from typing import Any

DEVICES = ("auto", "cpu", "cuda", "mps")
Check = Callable[[Any], "str | None"]  # None when accepted, else what was expected


def at_least(low: float, *, above: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value < low or (above and value == low):
            return f"a number {'>' if above else '>='} {low:g}"
        return None

    return check


def fraction(*, open_high: bool) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not 0 <= value <= 1 or (open_high and value == 1) or not math.isfinite(value):
            return f"a number in [0, 1{')' if open_high else ']'}"
        return None

    return check


def one_of(choices: Callable[[], tuple] | tuple) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        known = choices() if callable(choices) else choices
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in known]
        return f"one of {', '.join(map(str, known))}" if bad else None

    return check


def device_name(value: str) -> str | None:
    if value.split(":")[0] not in DEVICES:
        return f"one of {', '.join(DEVICES)} (or cuda:N)"
    return None


def conforms(value: Any, kind: Any) -> bool:
    """Whether ``value`` (as YAML or a notebook gives it) has the declared type ``kind``.

    Hand-written because the types here are few and plain, and a validation library would be a
    dependency for twenty lines; ints are accepted where floats are expected (YAML's ``1``).
    """
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (str, bool, dict, list):
        return isinstance(value, kind)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()
        )
    raise TypeError(f"a setting declares a type conforms does not know: {kind}")


def type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        return f"a list of {type_name(args[0])}"
    if origin is dict:
        return f"a mapping of {type_name(args[0])} to {type_name(args[1])}"
    if args:
        return " or ".join(type_name(a) for a in args)
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
    }.get(kind, kind.__name__)


def problem(kind: Any, check: Check | None, value: Any) -> str | None:
    """What ``value`` should have been (of type ``kind``, passing ``check``), or None."""
    if not conforms(value, kind):
        return type_name(kind)
    return check(value) if check else None


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
