"""Benchmarks run as scripts put benchmarks/ first on sys.path: no module there may shadow an installed package."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def installed_top_level_names() -> set[str]:
    """Every importable top-level name this environment provides: the standard library and each distribution's."""
    return set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_benchmark_module_shadows_no_installed_package(script: str) -> None:
    taken = installed_top_level_names()
    assert script not in taken, (
        f"benchmarks/{script}.py shadows the installed module {script!r} when a benchmark runs as a script "
        f"(benchmarks/ comes first on sys.path): rename it")


def test_the_check_sees_the_package_that_broke_ci() -> None:
    # transformers >= 5.25 imports `kernels`; benchmarks/kernels.py once shadowed it and every benchmark failed.
    assert "kernels" in installed_top_level_names()
    assert "json" in installed_top_level_names()
