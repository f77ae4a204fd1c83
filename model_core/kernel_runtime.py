"""What every Triton kernel wrapper shares: whether Triton can run here, the float dtypes, the workspace allocator."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels load, compute on and store

_poisoned = 0  # > 0 inside poisoned_workspaces()


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1), the only way to run the kernels without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA, or the CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def new_workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch memory a kernel writes before another reads it: uninitialised, or all NaN inside
    `poisoned_workspaces()` (so that a test reading a slot no kernel wrote sees NaN in its output)."""
    if _poisoned:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextmanager
def poisoned_workspaces() -> Iterator[None]:
    """Every workspace allocated inside starts as NaN (tests: padding is never read, every read slot is written)."""
    global _poisoned
    _poisoned += 1
    try:
        yield
    finally:
        _poisoned -= 1
