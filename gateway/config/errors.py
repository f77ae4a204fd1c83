"""The config's error, which names the setting and its value, and the one-of-these check the sections share."""

from __future__ import annotations

from typing import Any


class DeploymentConfigError(ValueError):
    """A deployment setting is unknown or out of range; the message names it."""


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise DeploymentConfigError(f"{name}={value!r}: expected one of {list(allowed)}")
