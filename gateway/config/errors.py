"""The config's error, which names the setting and its value."""

from __future__ import annotations

from model_core.settings import SettingError


class DeploymentConfigError(SettingError):
    """A deployment setting is unknown, of the wrong type or out of range; the message names it."""
