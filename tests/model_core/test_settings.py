"""Typed settings: a dataclass's annotations and bounds decide what each field accepts; refusals name the field,
the value and what was expected (secrets by their type only)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from model_core.settings import SettingError, check_settings, setting


@dataclasses.dataclass(frozen=True)
class Example:
    ratio: float = setting(0.5, ge=0, le=1)
    count: int | None = setting(None, ge=1)
    sizes: int | list[int] = setting(1, ge=1)
    mode: str = setting("a", choices=("a", "b"))
    wait_s: float = setting(1.0, gt=0, unit="seconds", why="a deadline")
    on: bool = True
    key: str | None = setting(None, repr=False)

    def __post_init__(self) -> None:
        check_settings(self, "ex")


def test_values_of_the_annotated_types_within_bounds_are_accepted():
    ok = Example(ratio=1, count=3, sizes=[1, 2], mode="b", wait_s=2**70, on=False, key="k")
    assert (ok.ratio, ok.count, ok.sizes, ok.mode, ok.on) == (1, 3, [1, 2], "b", False)


@pytest.mark.parametrize("field, value, message", [
    ("ratio", 1.5, "ex.ratio=1.5: expected a number in [0, 1]"),
    ("ratio", math.nan, "ex.ratio=nan: expected a finite number in [0, 1]"),
    ("ratio", True, "ex.ratio=True: expected a number in [0, 1]"),
    ("count", 0, "ex.count=0: expected an integer >= 1 or null"),
    ("count", 2**63, "ex.count=9223372036854775808: expected an integer >= 1 or null"),
    ("sizes", [1, 0], "ex.sizes=[1, 0]: expected an integer >= 1 or a list of integers >= 1"),
    ("sizes", (1,), "ex.sizes=(1,): expected an integer >= 1 or a list of integers >= 1"),
    ("mode", "c", "ex.mode='c': expected one of ['a', 'b']"),
    ("wait_s", math.inf, "ex.wait_s=inf: expected a finite number of seconds > 0 (a deadline)"),
    ("wait_s", 10**400, "ex.wait_s=" + str(10**400) + ": expected a number of seconds > 0 (a deadline)"),
    ("on", 1, "ex.on=1: expected true or false"),
    ("key", 42, "ex.key: expected a string, got int"),  # a secret's value is never shown
])
def test_a_refusal_names_the_field_the_value_and_what_was_expected(field, value, message):
    with pytest.raises(SettingError) as info:
        Example(**{field: value})
    assert str(info.value) == message


def test_an_annotation_it_cannot_check_is_a_programming_error():
    @dataclasses.dataclass(frozen=True)
    class Odd:
        values: dict = dataclasses.field(default_factory=dict)

        def __post_init__(self) -> None:
            check_settings(self, "odd")

    with pytest.raises(TypeError, match="Odd.values: check_settings cannot check"):
        Odd()
