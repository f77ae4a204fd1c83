"""Grouped routed-expert FFN on torch: pairs sorted by expert, then grouped GEMMs or one matmul pair per expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Shape legend: T = tokens, H = hidden, I = expert intermediate, E = local experts, K = experts per token,
# P = valid token-expert pairs.


def sort_by_expert(topk_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the valid (token, slot) pairs by expert.

    topk_ids: [T, K] local expert ids, -1 = not on this device.
    Returns (pair_index [P] into the flattened [T*K], counts [E], offsets [E+1]).
    """
    flat = topk_ids.reshape(-1)
    valid = torch.nonzero(flat >= 0).flatten()
    order = torch.argsort(flat[valid], stable=True)  # stable: within an expert, tokens keep their order
    pair_index = valid[order]
    counts = torch.bincount(flat[pair_index], minlength=n_experts)
    offsets = torch.zeros(n_experts + 1, dtype=torch.long, device=topk_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return pair_index, counts, offsets


HAS_GROUPED_MM = hasattr(F, "grouped_mm")
IMPLEMENTATIONS = ("auto", "grouped_mm", "loop", "padded_bmm")
PADDED_MAX_ROWS = 64  # auto: padded_bmm on CPU while no expert has more rows than this (decode-sized steps)


def grouped_expert_ffn(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """y[t] = Σ_k w[t,k] · FFN_{ids[t,k]}(hidden[t]), tokens sorted so each expert's rows are contiguous.

    hidden: [T, H]; w_gate_up: [E, 2I, H] (gate rows first); w_down: [E, H, I], in hidden's dtype or held wider
    (float32 weights of a half-precision model on a CPU without its instructions: model_core.half_matmul; each
    product is then computed in float32 and rounded to hidden's dtype where a native kernel rounds);
    topk_ids: [T, K] local ids (-1 skips); topk_weights: [T, K] -> [T, H] in hidden's dtype.
    impl: 'grouped_mm' (two torch grouped GEMMs), 'loop' (one matmul pair per hit expert), 'padded_bmm' (every
    expert's rows padded to the busiest one's, two batched matmuls over all E experts), 'auto': grouped_mm on
    CUDA; on CPU padded_bmm for float32 steps where at least 3/4 of the experts are hit by at most 64 rows each
    (decode-sized: there float32 per-expert calls cost more than the padding; measured on the 2-core dev VM),
    else the loop (faster at prefill, and in bfloat16). Every implementation gathers the pairs' rows once and
    scatter-adds their weighted outputs once, in expert order.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLEMENTATIONS}")
    n_tokens, k = topk_ids.shape
    out = torch.zeros_like(hidden)
    if n_tokens == 0:
        return out
    pair_index, counts, offsets = sort_by_expert(topk_ids, w_gate_up.shape[0])
    token_of_pair = pair_index // k  # [P]
    weight_of_pair = topk_weights.reshape(-1)[pair_index]  # [P]
    inter = w_down.shape[-1]
    if impl == "grouped_mm" or (impl == "auto" and HAS_GROUPED_MM and hidden.is_cuda):
        ends = offsets[1:].to(torch.int32)  # [E] cumulative row ends, as grouped_mm expects
        x = hidden[token_of_pair]  # [P, H]
        gate_up = F.grouped_mm(x, w_gate_up.transpose(1, 2), offs=ends)  # [P, 2I]
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.grouped_mm(h, w_down.transpose(1, 2), offs=ends) * weight_of_pair[:, None].to(hidden.dtype)
        return out.index_add_(0, token_of_pair, y)
    n_experts = w_gate_up.shape[0]
    dtype, wide = hidden.dtype, w_gate_up.dtype  # wide == dtype unless the weights are held widened
    most = int(counts.max()) if counts.numel() else 0
    if impl == "padded_bmm" or (impl == "auto" and not hidden.is_cuda and hidden.dtype == torch.float32
                                and 0 < most <= PADDED_MAX_ROWS and 4 * int((counts > 0).sum()) >= 3 * n_experts):
        expert_of_pair = torch.repeat_interleave(torch.arange(n_experts, device=hidden.device), counts)  # [P]
        row = torch.arange(pair_index.numel(), device=hidden.device) - offsets[:-1][expert_of_pair]
        x = hidden.new_zeros(n_experts, most, hidden.shape[1], dtype=wide)  # [E, m, H]; padding rows stay zero
        x[expert_of_pair, row] = hidden[token_of_pair].to(wide)
        gate_up = torch.bmm(x, w_gate_up.transpose(1, 2)).to(dtype)  # [E, m, 2I]
        h = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]
        y = torch.bmm(h.to(wide), w_down.transpose(1, 2))[expert_of_pair, row].to(dtype)  # [P, H]
        return out.index_add_(0, token_of_pair, y * weight_of_pair[:, None].to(dtype))
    # One gather in, one scatter-add out (pairs in expert order, as the other implementations add them).
    bounds = offsets.tolist()
    x = hidden[token_of_pair].to(wide)  # [P, H]
    scale = weight_of_pair[:, None].to(dtype)
    y = hidden.new_empty(x.shape)  # [P, H] in hidden's dtype
    for e in range(n_experts):
        start, end = bounds[e], bounds[e + 1]
        if start == end:
            continue
        gate_up = F.linear(x[start:end], w_gate_up[e]).to(dtype)  # [n, 2I]
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        torch.mul(F.linear(h.to(wide), w_down[e]).to(dtype), scale[start:end], out=y[start:end])
    return out.index_add_(0, token_of_pair, y)
