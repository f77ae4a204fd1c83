"""Reading a settings file (YAML, or JSON, which YAML reads too) that must hold a mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The mapping the file at `path` holds.

    what: the file's name in messages ("deployment file"); error: the exception raised, with a message that
    starts with the path and says what was wrong: unreadable, not YAML, or not a mapping.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: cannot read {what} (not valid YAML: {_one_line(exc)})") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise error(f"{path}: expected {what} to hold a mapping of settings, got {got}")
    return data


def _one_line(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: where it is and what is wrong (PyYAML's own message spans several lines)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
