"""One MoE layer's stacked expert weights on a group: in the model's dtype, or FP8-resident with their scale tiles."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from expert_workers.expert_pairs import ExpertPairs
from expert_workers.grouped_ffn import expert_loop, pair_scales
from model_core.fp8 import dequantize_blocks

# Shape legend: E = local experts, H = hidden, I = expert intermediate; bo × bi = the FP8 scale block.


class Scratch(threading.local):
    """Per-thread buffers the FP8 path widens one expert into (bounded: one expert's weights per thread, reused)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or tuple(buf.shape) != shape:
            buf = self.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


@dataclass(frozen=True)
class LayerWeights:
    """The experts of one layer, stacked in the order of the group's layout.

    Plain: w_gate_up [E, 2I, H] (gate rows, then up rows) and w_down [E, H, I] in the matmul dtype. FP8-resident
    (`block` set): the same stacks in float8_e4m3fn as the checkpoint stores them, and float32 scale_inv tiles
    s_gate_up [E, 2·ceil(I/bo), ceil(H/bi)] (gate's tiles, then up's: I need not be a multiple of bo) and
    s_down [E, ceil(H/bo), ceil(I/bi)]. Every copy of an expert (`rows`, `stack`) carries its scales."""

    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    s_gate_up: torch.Tensor | None = None
    s_down: torch.Tensor | None = None
    block: tuple[int, int] | None = None

    @property
    def fp8(self) -> bool:
        return self.block is not None

    @property
    def n_experts(self) -> int:
        return self.w_gate_up.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.w_gate_up, self.w_down, self.s_gate_up, self.s_down) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def rows(self, e: int) -> tuple[torch.Tensor, ...]:
        """Expert e's tensors: (gate_up, down), FP8 also (gate_up scales, down scales)."""
        if self.fp8:
            return self.w_gate_up[e], self.w_down[e], self.s_gate_up[e], self.s_down[e]
        return self.w_gate_up[e], self.w_down[e]

    @classmethod
    def stack(cls, experts: Sequence[tuple[torch.Tensor, ...]], block: tuple[int, int] | None) -> LayerWeights:
        """The stacks of `experts` (each `rows`'s tuple, or as read from a checkpoint), in order."""
        return cls(*(torch.stack(parts) for parts in zip(*experts, strict=True)), block=block)

    def widen(self, e: int, dtype: torch.dtype, matmul_dtype: torch.dtype, scratch: Scratch
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2I, H], down [H, I]) in matmul_dtype: the stacks' rows, or FP8 widened tile by
        tile into `scratch` with the values the checkpoint reader's dequantize-on-read gives (the float32 product
        rounded to the model's dtype, then held in matmul_dtype)."""
        if not self.fp8:
            return self.w_gate_up[e], self.w_down[e]
        two_i, h = self.w_gate_up.shape[1:]
        i = two_i // 2
        gate_tiles = -(-i // self.block[0])
        device = self.w_gate_up.device
        gate_up = scratch.get("gate_up", (two_i, h), dtype, device)  # rounded once to the model's dtype
        down = scratch.get("down", (h, i), dtype, device)
        # One expert part's float32 work space, where the model's dtype is not float32
        work = scratch.get("work", (i * h,), torch.float32, device) if dtype != torch.float32 else None

        def widen_part(q: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> None:
            dequantize_blocks(q, s, self.block, out, None if work is None else work.view(tuple(q.shape)),
                              nan=False)  # checked finite when read: no NaN pass

        q, s = self.w_gate_up[e], self.s_gate_up[e]
        widen_part(q[:i], s[:gate_tiles], gate_up[:i])
        widen_part(q[i:], s[gate_tiles:], gate_up[i:])
        widen_part(self.w_down[e], self.s_down[e], down)
        if dtype == matmul_dtype:
            return gate_up, down
        wide_gate_up = scratch.get("gate_up_wide", (two_i, h), matmul_dtype, device)
        wide_down = scratch.get("down_wide", (h, i), matmul_dtype, device)
        return wide_gate_up.copy_(gate_up), wide_down.copy_(down)


def widened_expert_ffn(hidden: torch.Tensor, weights: LayerWeights, topk_weights: torch.Tensor, pairs: ExpertPairs,
                       matmul_dtype: torch.dtype, scratch: Scratch) -> torch.Tensor:
    """grouped_expert_ffn's loop over FP8-resident experts: only the experts `pairs` hits are widened, one at a time,
    into `scratch`. hidden [T, H] in the model's dtype; pairs: sort_by_expert of the call's local ids -> [T, H]."""
    out = torch.zeros_like(hidden)
    if hidden.shape[0] == 0:
        return out
    scale = pair_scales(topk_weights, pairs, hidden.dtype)  # [P, 1]
    y = expert_loop(hidden[pairs.token], scale, pairs.offsets.tolist(),
                    lambda e: weights.widen(e, hidden.dtype, matmul_dtype, scratch))
    return out.index_add_(0, pairs.token, y)
