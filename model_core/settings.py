"""Typed settings dataclasses, checked field by field where they are built: each field's type annotation and bounds
say what it accepts, and a wrong type, a non-finite number or a value out of range is refused with the dotted name,
the value and what was expected, before anything uses it.

    @dataclass(frozen=True)
    class RpcConfig:
        timeout_s: float = setting(30.0, gt=0)
        def __post_init__(self) -> None:
            check_settings(self, "rpc")  # rpc.timeout_s='30s': expected a number > 0

Annotations understood: bool, int, float, str, list[int | float | str] and unions of them with None. Bools are not
numbers; floats must be finite; ints fit in 64 bits (they reach torch and C). A field whose type is a dataclass (a
section) is skipped: it checked itself when it was built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

INT64_MAX = 2**63 - 1
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


class SettingError(ValueError):
    """A setting has the wrong type or is out of range; the message names it: `section.field=value: expected ...`."""


def setting(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None, choices: tuple | None = None, unit: str | None = None,
            why: str | None = None, **field_options: Any) -> Any:
    """A dataclass field with the bounds `check_settings` enforces: gt/ge/lt/le for numbers (and a list's items),
    choices for a fixed set of values. unit names what a number counts ('seconds'); `why` is added to the message
    (where a bound comes from)."""
    bounds = {"gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices, "unit": unit, "why": why}
    return dataclasses.field(default=default, metadata={k: v for k, v in bounds.items() if v is not None},
                             **field_options)


def check_settings(obj: Any, section: str = "", error: type[Exception] = SettingError) -> None:
    """Refuse the first field of the dataclass instance `obj` that its annotation and bounds do not allow.

    section: the prefix of the names in messages ('ray' gives 'ray.cpus_per_group'); '' for top-level fields.
    A field declared with repr=False (a secret) is named with its type, never its value.
    """
    for f, kinds in _checked_fields(type(obj)):
        value = getattr(obj, f.name)
        if any(_fits(value, kind, f.metadata) for kind in kinds):
            continue
        name = f"{section}.{f.name}" if section else f.name
        shown, got = (f"={value!r}", "") if f.repr else ("", f", got {type(value).__name__}")
        why = f" ({f.metadata['why']})" if "why" in f.metadata else ""
        finite = isinstance(value, float) and not math.isfinite(value)
        raise error(f"{name}{shown}: expected {describe(kinds, f.metadata, finite)}{why}{got}")


def describe(kinds: tuple, bounds: typing.Mapping[str, Any], finite: bool = False) -> str:
    """What a field accepts, in words: 'an integer >= 1 or null', 'a number in (0, 0.95]', "one of ['a', 'b']".
    finite: say 'a finite number' (for a message about inf or nan). Null is named where it stands beside numbers
    (where it means something of its own); an optional string (a path, a key) is just 'a string'."""
    words = [f"one of {list(bounds['choices'])}"] if "choices" in bounds else [
        _describe_kind(kind, bounds, finite) for kind in kinds if kind is not None]
    numeric = any(kind in (int, float) for kind in kinds)
    return " or ".join(words + ["null"] * (None in kinds and numeric))


_PLURAL = {"an integer": "integers", "a finite number": "finite numbers", "a number": "numbers", "a string": "strings",
           "true or false": "booleans"}


def _describe_kind(kind: Any, bounds: typing.Mapping[str, Any], finite: bool) -> str:
    if typing.get_origin(kind) is list:
        text = _describe_kind(typing.get_args(kind)[0], bounds, finite)
        noun = next(n for n in _PLURAL if text.startswith(n))
        return f"a list of {_PLURAL[noun]}{text[len(noun):]}"
    noun = {bool: "true or false", int: "an integer", float: "a finite number" if finite else "a number",
            str: "a string"}[kind]
    if kind not in (int, float):
        return noun
    if "unit" in bounds:
        noun = f"{noun} of {bounds['unit']}"
    low = next(((op, bounds[k]) for k, op in _BOUNDS[:2] if k in bounds), None)
    high = next(((op, bounds[k]) for k, op in _BOUNDS[2:] if k in bounds), None)
    if low and high:
        return f"{noun} in {'(' if low[0] == '>' else '['}{low[1]}, {high[1]}{')' if high[0] == '<' else ']'}"
    if low or high:
        op, limit = low or high
        return f"{noun} {op} {limit}"
    return noun


def _fits(value: Any, kind: Any, bounds: typing.Mapping[str, Any]) -> bool:
    if kind is None:
        return value is None
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_fits(v, item, bounds) for v in value)
    if isinstance(value, bool) != (kind is bool):  # bools are not numbers, and numbers are not bools
        return False
    if kind is int:
        ok = isinstance(value, int) and -INT64_MAX - 1 <= value <= INT64_MAX
    elif kind is float:
        ok = isinstance(value, (int, float)) and _finite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        return False
    if "choices" in bounds:
        return value in bounds["choices"]
    return kind not in (int, float) or _in_bounds(value, bounds)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _in_bounds(value: int | float, bounds: typing.Mapping[str, Any]) -> bool:
    checks = {"gt": lambda b: value > b, "ge": lambda b: value >= b, "lt": lambda b: value < b,
              "le": lambda b: value <= b}
    return all(check(bounds[k]) for k, check in checks.items() if k in bounds)


@functools.cache
def _checked_fields(cls: type) -> tuple[tuple[dataclasses.Field, tuple], ...]:
    """(field, the kinds its annotation allows) for each field of `cls` that is not a section; read once per class."""
    hints = typing.get_type_hints(cls)
    checked = []
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            continue
        union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        kinds = tuple(None if a is type(None) else a for a in (typing.get_args(annotation) if union else (annotation,)))
        for kind in kinds:
            item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
            if item not in (None, bool, int, float, str):
                raise TypeError(f"{cls.__name__}.{f.name}: check_settings cannot check {annotation}")
        checked.append((f, kinds))
    return tuple(checked)
