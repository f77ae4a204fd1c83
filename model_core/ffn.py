"""The SwiGLU feed-forward math (Shazeer 2020, "GLU Variants Improve Transformer"), written once for torch: the
gateway's dense layers and shared experts, and the routed experts' torch paths on the expert workers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_core.half_matmul import linear


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gated activation SiLU(gate) · up. gate_up: [..., 2I], the gate's I columns first -> [..., I]."""
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(SiLU(gate(x)) · up(x)) with the gate and up projections in one matmul.

    x: [T, H]; w_gate_up: [2I, H] (gate rows, then up rows); w_down: [H, I]; the weights held in x's dtype or
    widened (model_core.half_matmul: each product is then computed in float32 and rounded to x's dtype) -> [T, H]
    """
    return linear(silu_and_mul(linear(x, w_gate_up)), w_down)
