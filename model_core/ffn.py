"""The SwiGLU feed-forward math shared by dense layers, shared experts and routed experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_core.half_matmul import linear


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(SiLU(gate(x)) * up(x)).

    x: [T, H]; w_gate, w_up: [I, H]; w_down: [H, I] (held in x's dtype, or widened: half_matmul) -> [T, H]
    """
    return linear(F.silu(linear(x, w_gate)) * linear(x, w_up), w_down)
