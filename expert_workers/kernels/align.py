"""Align token-expert pairs for the grouped kernels: sorted by expert, each expert's run padded to BLOCK_M."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Shape legend: T = tokens, K = experts per token, P = T*K pairs, B = blocks of BLOCK_M pairs.


@dataclass(frozen=True)
class AlignedPairs:
    sorted_pairs: torch.Tensor  # [B * BLOCK_M] int32 pair ids (t*K + k), expert-major; padding = P (never valid)
    block_expert: torch.Tensor  # [B] int32 local expert of each block
    n_blocks: int
    n_pairs: int  # P = T*K, the padding sentinel


def align_pairs(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> AlignedPairs:
    """topk_ids: [T, K] local expert ids (-1 = not on this device, dropped here).

    Each block of `block_m` consecutive entries holds pairs of one expert; the tail of an expert's last
    block is filled with the sentinel P, which the kernels mask out (never loaded, never stored).
    """
    flat = topk_ids.reshape(-1)
    n_pairs = flat.numel()
    valid = torch.nonzero(flat >= 0).flatten()
    experts = flat[valid]
    order = torch.argsort(experts, stable=True)
    pairs = valid[order]
    counts = torch.bincount(experts, minlength=n_experts)
    blocks = (counts + block_m - 1) // block_m  # [E]
    n_blocks = int(blocks.sum())
    sorted_pairs = torch.full((n_blocks * block_m,), n_pairs, dtype=torch.int32, device=topk_ids.device)
    if n_blocks:
        block_start = torch.cumsum(blocks, 0) - blocks  # [E] first block of each expert
        run_start = torch.cumsum(counts, 0) - counts  # [E] first sorted pair of each expert
        sorted_experts = experts[order]
        rank_in_run = torch.arange(pairs.numel(), device=flat.device) - run_start[sorted_experts]
        slots = block_start[sorted_experts] * block_m + rank_in_run
        sorted_pairs[slots] = pairs.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(n_experts, device=flat.device, dtype=torch.int32), blocks)
    return AlignedPairs(sorted_pairs, block_expert, n_blocks, n_pairs)
