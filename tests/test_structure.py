"""The code's shape: packages import only what DESIGN.md allows, gateway's floors import only downward, files stay
short enough to read in one sitting."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).parents[1]
OURS = ("protos", "model_core", "router_service", "expert_workers", "gateway", "deploy", "tests", "benchmarks")
EVERYTHING = frozenset(OURS)

# DESIGN.md, "Packages and their one job": which of our packages each may import (its own always).
MAY_IMPORT = {
    "protos": frozenset(),
    "model_core": frozenset(),  # the shared core
    "router_service": frozenset({"model_core"}),
    "expert_workers": frozenset({"protos", "model_core"}),
    "gateway": frozenset({"router_service", "protos", "model_core", "expert_workers"}),
    "deploy": EVERYTHING,
    "tests": EVERYTHING,
    "benchmarks": EVERYTHING,
}
# "expert_workers only where a deployment starts its groups": that is gateway.dispatch.
GATEWAY_MAY_IMPORT_EXPERT_WORKERS_FROM = "gateway.dispatch"

# Inside gateway, bottom to top; a module imports its own floor or lower. gateway/__init__.py (the package's
# public face, `from gateway import Engine`) stands above them all.
GATEWAY_FLOORS = ("config", "dispatch", "model", "serving")
GATEWAY_FACE = len(GATEWAY_FLOORS)

MAX_LINES = 400
LONG_ALLOWED = ("generated protobuf stubs (protos/*_pb2*.py)", "Triton kernels (expert_workers/kernels/, "
                "gateway/model/paged_mla_kernel.py)", "tests/")


def python_files() -> list[Path]:
    """Every .py file of the project (not the venv, caches or build output)."""
    skip = {"__pycache__", "build", "dist", "node_modules"}
    return sorted(p for p in ROOT.rglob("*.py") if not any(
        part.startswith(".") or part in skip or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts[:-1]))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_our_module(name: str) -> bool:
    where = ROOT.joinpath(*name.split("."))
    return where.with_suffix(".py").is_file() or where.is_dir()


def imports_in(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in `source`, those inside functions and `if` blocks too. `from a import b`
    names a.b when b is one of our modules, else a; relative imports are resolved against `module`."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield node.lineno, candidate if is_our_module(candidate) else base


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    return imports_in(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def our_imports() -> Iterator[tuple[str, str, int, str]]:
    """(file relative to the root, its module, line, imported module) for every import of one of our packages."""
    for path in python_files():
        rel = str(path.relative_to(ROOT))
        own = module_name(path)
        for line, target in imports_of(path):
            if target.split(".")[0] in OURS:
                yield rel, own, line, target


def gateway_floor(module: str) -> int | None:
    """0 config, 1 dispatch, 2 model, 3 serving, 4 the package itself; None for a module on no floor."""
    parts = module.split(".")
    if len(parts) == 1:
        return GATEWAY_FACE
    return GATEWAY_FLOORS.index(parts[1]) if parts[1] in GATEWAY_FLOORS else None


def floor_name(floor: int) -> str:
    return "gateway/__init__" if floor == GATEWAY_FACE else f"gateway.{GATEWAY_FLOORS[floor]}"


def test_packages_import_only_what_the_design_allows():
    wrong = []
    for rel, own, line, target in our_imports():
        mine, theirs = own.split(".")[0], target.split(".")[0]
        if mine not in MAY_IMPORT or theirs == mine:
            continue
        allowed = MAY_IMPORT[mine]
        if theirs not in allowed:
            wrong.append(f"{rel}:{line}: {mine} imports {target}; DESIGN.md lets {mine} import only "
                         f"{sorted(allowed) or 'none of our packages'}")
        elif mine == "gateway" and theirs == "expert_workers" and not (
                own + ".").startswith(GATEWAY_MAY_IMPORT_EXPERT_WORKERS_FROM + "."):
            wrong.append(f"{rel}:{line}: {own} imports {target}; only {GATEWAY_MAY_IMPORT_EXPERT_WORKERS_FROM}, "
                         "where a deployment starts its groups, may import expert_workers")
    assert not wrong, "imports against DESIGN.md's package table:\n" + "\n".join(sorted(set(wrong)))


def test_gateway_modules_import_only_their_own_floor_or_lower():
    order = " < ".join(GATEWAY_FLOORS)
    wrong = []
    for rel, own, line, target in our_imports():
        if own.split(".")[0] != "gateway":
            continue
        mine = gateway_floor(own)
        if mine is None:
            wrong.append(f"{rel}: on no floor of gateway; put it in one of {', '.join(GATEWAY_FLOORS)}")
            continue
        if target.split(".")[0] != "gateway":
            continue
        theirs = gateway_floor(target)
        if theirs is None or theirs > mine:
            where = "no floor" if theirs is None else f"the {floor_name(theirs)} floor"
            wrong.append(f"{rel}:{line}: {floor_name(mine)} module imports {target}, on {where} above it "
                         f"(gateway floors: {order}; import downward only)")
    assert not wrong, "gateway imports going up a floor:\n" + "\n".join(sorted(set(wrong)))


def long_file_allowed(rel: str) -> bool:
    path = Path(rel)
    return (path.parts[0] == "tests"
            or (path.parts[0] == "protos" and "_pb2" in path.name)
            or rel.startswith("expert_workers/kernels/")
            or rel == "gateway/model/paged_mla_kernel.py")


def test_no_file_is_longer_than_a_sitting():
    too_long = []
    for path in python_files():
        rel = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and not long_file_allowed(rel):
            too_long.append(f"{rel}: {lines} lines")
    assert not too_long, (f"files over {MAX_LINES} lines (split by concern; exempt: {'; '.join(LONG_ALLOWED)}):\n"
                          + "\n".join(too_long))


def test_the_walk_finds_imports_inside_functions_and_resolves_relative_ones():
    source = ("import os\n\n\ndef later():\n    from gateway.serving import engine\n    from . import groups\n"
              "    from ..model.step import StepBatch\n")
    found = sorted(imports_in(source, "gateway.dispatch.probe"))
    assert found == [(1, "os"), (5, "gateway.serving.engine"), (6, "gateway.dispatch.groups"),
                     (7, "gateway.model.step")]
    assert [gateway_floor(m) for _, m in found[1:]] == [3, 1, 2] and gateway_floor("gateway") == GATEWAY_FACE
