"""Align token-expert pairs for the grouped kernels: the expert-sorted pairs, each expert's run padded to BLOCK_M."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expert_workers.expert_pairs import ExpertPairs

# Shape legend: E = local experts, P = valid pairs, B = blocks of BLOCK_M pairs.


@dataclass(frozen=True)
class AlignedPairs:
    sorted_pairs: torch.Tensor  # [B * BLOCK_M] int32 pair ids (t*K + k), expert-major; padding = n_pairs
    block_expert: torch.Tensor  # [B] int32 local expert of each block
    n_blocks: int
    n_pairs: int  # T*K, the routing's slots: the padding sentinel (never a valid pair id)


def align_pairs(pairs: ExpertPairs, block_m: int) -> AlignedPairs:
    """pairs: a routing's pairs sorted by expert (expert_pairs.sort_by_expert; ids of -1 already dropped).

    Each block of `block_m` consecutive entries holds pairs of one expert; the tail of an expert's last
    block is filled with the sentinel T*K, which the kernels mask out (never loaded, never stored).
    """
    device = pairs.pair_index.device
    blocks = (pairs.counts + block_m - 1) // block_m  # [E]
    n_blocks = int(blocks.sum())
    sorted_pairs = torch.full((n_blocks * block_m,), pairs.n_slots, dtype=torch.int32, device=device)
    if n_blocks:
        block_start = torch.cumsum(blocks, 0) - blocks  # [E] first block of each expert
        slots = block_start[pairs.expert] * block_m + pairs.rank_in_expert()  # [P]
        sorted_pairs[slots] = pairs.pair_index.to(torch.int32)
    n_experts = pairs.counts.numel()
    block_expert = torch.repeat_interleave(torch.arange(n_experts, device=device, dtype=torch.int32), blocks)
    return AlignedPairs(sorted_pairs, block_expert, n_blocks, pairs.n_slots)
