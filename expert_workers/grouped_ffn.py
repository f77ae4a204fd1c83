"""Grouped routed-expert FFN on torch: pairs sorted by expert, then grouped GEMMs or one SwiGLU per expert."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from expert_workers.expert_pairs import ExpertPairs, sort_by_expert
from model_core.ffn import silu_and_mul, swiglu

# Shape legend: T = tokens, H = hidden, I = expert intermediate, E = local experts, K = experts per token,
# P = valid token-expert pairs, m = the busiest expert's pairs.

HAS_GROUPED_MM = hasattr(F, "grouped_mm")
IMPLEMENTATIONS = ("auto", "grouped_mm", "loop", "padded_bmm")
PADDED_MAX_ROWS = 64  # auto: padded_bmm on CPU while no expert has more rows than this (decode-sized steps)


def auto_impl(hidden: torch.Tensor, counts: torch.Tensor) -> str:
    """The implementation impl='auto' picks for hidden [T, H] (its device and dtype) whose pairs per local expert
    are counts [E] (see grouped_expert_ffn)."""
    if HAS_GROUPED_MM and hidden.is_cuda:
        return "grouped_mm"
    most = int(counts.max()) if counts.numel() else 0
    if (not hidden.is_cuda and hidden.dtype == torch.float32 and 0 < most <= PADDED_MAX_ROWS
            and 4 * int((counts > 0).sum()) >= 3 * counts.numel()):
        return "padded_bmm"
    return "loop"


def pair_scales(topk_weights: torch.Tensor, pairs: ExpertPairs, dtype: torch.dtype) -> torch.Tensor:
    """[P, 1] each pair's routing weight (topk_weights [T, K]) in the pairs' order, in the output's dtype."""
    return topk_weights.reshape(-1)[pairs.pair_index][:, None].to(dtype)


def scaled_expert(x: torch.Tensor, scale: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor:
    """One expert's step of the loop: out = swiglu(x) * scale. x: [N, H] rows routed to the expert; scale: [N, 1];
    w_gate_up: [2I, H]; w_down: [H, I]; out: [N, H]."""
    return torch.mul(swiglu(x, w_gate_up, w_down), scale, out=out)


def grouped_expert_ffn(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    impl: str = "auto",
    pairs: ExpertPairs | None = None,
) -> torch.Tensor:
    """y[t] = Σ_k w[t,k] · FFN_{ids[t,k]}(hidden[t]), tokens sorted so each expert's rows are contiguous.

    hidden: [T, H]; w_gate_up: [E, 2I, H] (gate rows first); w_down: [E, H, I], in hidden's dtype or held wider
    (float32 weights of a half-precision model on a CPU without its instructions: model_core.half_matmul; each
    product is then computed in float32 and rounded to hidden's dtype where a native kernel rounds);
    topk_ids: [T, K] local ids (-1 skips); topk_weights: [T, K] -> [T, H] in hidden's dtype; pairs: the caller's
    sort_by_expert(topk_ids, E), sorted here when not given.
    impl: 'grouped_mm' (two torch grouped GEMMs), 'loop' (model_core.ffn.swiglu per hit expert), 'padded_bmm'
    (every expert's rows padded to the busiest one's, two batched matmuls over all E experts), 'auto': grouped_mm
    on CUDA; on CPU padded_bmm for float32 steps where at least 3/4 of the experts are hit by at most 64 rows each
    (decode-sized: there float32 per-expert calls cost more than the padding; measured on the 2-core dev VM),
    else the loop (faster at prefill, and in bfloat16). Every implementation applies model_core.ffn.silu_and_mul,
    gathers the pairs' rows once and scatter-adds their weighted outputs once, in expert order.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLEMENTATIONS}")
    out = torch.zeros_like(hidden)
    if topk_ids.shape[0] == 0:
        return out
    n_experts = w_gate_up.shape[0]
    pairs = sort_by_expert(topk_ids, n_experts) if pairs is None else pairs
    token = pairs.token  # [P]
    dtype, wide = hidden.dtype, w_gate_up.dtype  # wide == dtype unless the weights are held widened
    scale = pair_scales(topk_weights, pairs, dtype)  # [P, 1]
    impl = auto_impl(hidden, pairs.counts) if impl == "auto" else impl
    if impl == "grouped_mm":
        ends = pairs.offsets[1:].to(torch.int32)  # [E] cumulative row ends, as grouped_mm expects
        gate_up = F.grouped_mm(hidden[token], w_gate_up.transpose(1, 2), offs=ends)  # [P, 2I]
        y = F.grouped_mm(silu_and_mul(gate_up), w_down.transpose(1, 2), offs=ends)  # [P, H]
        return out.index_add_(0, token, y * scale)
    if impl == "padded_bmm":
        most = int(pairs.counts.max())
        expert, row = pairs.expert, pairs.rank_in_expert()  # [P] each pair's place in the padded stack
        x = hidden.new_zeros(n_experts, most, hidden.shape[1], dtype=wide)  # [E, m, H]; padding rows stay zero
        x[expert, row] = hidden[token].to(wide)
        gate_up = torch.bmm(x, w_gate_up.transpose(1, 2)).to(dtype)  # [E, m, 2I]
        y = torch.bmm(silu_and_mul(gate_up).to(wide), w_down.transpose(1, 2))[expert, row].to(dtype)  # [P, H]
        return out.index_add_(0, token, y * scale)
    # One gather in, one scatter-add out (pairs in expert order, as the other implementations add them).
    y = expert_loop(hidden[token], scale, pairs.offsets.tolist(), lambda e: (w_gate_up[e], w_down[e]))
    return out.index_add_(0, token, y)


def expert_loop(rows: torch.Tensor, scale: torch.Tensor, bounds: list[int],
                weights_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The loop: rows [P, H] of the pairs in expert order (expert e's at bounds[e]:bounds[e+1]), scale [P, 1] ->
    [P, H] weighted outputs; weights_of(e) gives expert e's (gate_up [2I, H], down [H, I]), asked only for the
    experts some row reaches."""
    y = torch.empty_like(rows)
    for e in range(len(bounds) - 1):
        start, end = bounds[e], bounds[e + 1]
        if start < end:
            w_gate_up, w_down = weights_of(e)
            scaled_expert(rows[start:end], scale[start:end], w_gate_up, w_down, out=y[start:end])
    return y
