"""A routing's token-expert pairs sorted by expert, once per call: the torch FFN, the Triton kernels' block alignment
and the group's per-expert counts all read the same sort."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Shape legend: T = tokens, K = experts per token, E = local experts, P = valid token-expert pairs.


@dataclass(frozen=True)
class ExpertPairs:
    """The valid (token, slot) pairs of a [T, K] routing in expert order; within an expert, tokens keep their order."""

    pair_index: torch.Tensor  # [P] int64 index into the flattened [T*K] routing (t*K + k)
    expert: torch.Tensor  # [P] int64 local expert of each pair, non-decreasing
    counts: torch.Tensor  # [E] int64 pairs per local expert
    offsets: torch.Tensor  # [E+1] int64 where each expert's run starts; offsets[E] = P
    top_k: int  # K
    n_slots: int  # T*K: the routing's slots, valid or not (the Triton kernels' padding sentinel)

    @property
    def token(self) -> torch.Tensor:
        """[P] the token of each pair."""
        return self.pair_index // self.top_k

    def rank_in_expert(self) -> torch.Tensor:
        """[P] each pair's position within its expert's run (0 for an expert's first pair)."""
        return torch.arange(self.pair_index.numel(), device=self.pair_index.device) - self.offsets[:-1][self.expert]


def sort_by_expert(topk_ids: torch.Tensor, n_experts: int) -> ExpertPairs:
    """Order the valid pairs of topk_ids: [T, K] local expert ids (-1 = not on this device, dropped) by expert."""
    flat = topk_ids.reshape(-1).long()
    valid = torch.nonzero(flat >= 0).flatten()
    order = torch.argsort(flat[valid], stable=True)  # stable: within an expert, tokens keep their order
    pair_index = valid[order]
    expert = flat[pair_index]
    counts = torch.bincount(expert, minlength=n_experts)
    offsets = torch.zeros(n_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return ExpertPairs(pair_index, expert, counts, offsets, topk_ids.shape[1], flat.numel())
