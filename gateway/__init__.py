"""Gateway: the model minus routed experts, the expert dispatch, and the public Engine API.

`from gateway import Engine` works as before, but lazily: importing the package (or a leaf such as
`gateway.model.paged_mla_kernel`) loads no Ray, gRPC or jsonschema. The Triton kernel tests import only what they
test, so they collect on a machine that has torch and triton and nothing else (the GPU check's first step).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from gateway.serving.engine import Engine
    from gateway.serving.sampling_params import SamplingParams

_LAZY = {"Engine": "gateway.serving.engine", "SamplingParams": "gateway.serving.sampling_params"}

__all__ = ["Engine", "SamplingParams"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
