"""JoinedPass: a torch expert pass that calls arriving while it runs join, expert by expert (CallMerger's loop path)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from expert_workers.expert_group import ExpertGroup, ExpertLayout
from expert_workers.expert_pairs import ExpertPairs, sort_by_expert
from expert_workers.grouped_ffn import auto_impl, pair_scales, scaled_expert

# Shape legend: T = one call's tokens, H = hidden, K = experts per token, E = the layer's local experts,
# P = one call's valid token-expert pairs.

Call = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden [T, H], topk_ids [T, K], topk_weights [T, K]


@dataclass(eq=False)
class _Member:
    """One call in the pass: its pairs' rows in expert order and their outputs, filled expert by expert."""

    hidden: torch.Tensor  # [T, H] as the caller sent it (its output goes back in its dtype and device)
    x: torch.Tensor  # [T, H] in the group's dtype, on its device
    pairs: ExpertPairs
    bounds: list[int]  # [E+1] where each expert's pairs start
    rows: torch.Tensor  # [P, H] x's rows of the pairs
    scale: torch.Tensor  # [P, 1]
    y: torch.Tensor  # [P, H] weighted expert outputs
    joined_at: int  # the first expert computed with the pass; those before it are computed at the end


class JoinedPass:
    """grouped_expert_ffn's loop (one `scaled_expert` per hit expert, one scatter-add per call) over several calls
    of one layer and placement version: each expert's GEMMs take every member's rows for it at once, and before
    each expert `run` asks for calls that join from there on. After the last expert, the experts that joiners missed
    are computed, again one GEMM per expert over all joiners' rows. A member's output is its own scatter-add of
    its own weighted rows: what the group's run gives it alone, wherever the CPU's GEMM gives a row the same bits
    in batches of any size (always for experts no other member's rows reach)."""

    def __init__(self, group: ExpertGroup, layout: ExpertLayout, layer: int) -> None:
        """layout: the placement version the calls were checked against (`ExpertGroup.check`)."""
        self.dtype, self.device = group.dtype, group.torch_device
        self.local_index = layout.local_index[layer]  # [E_global] -> stack row, -1 where not hosted
        self.weights = layout.weights[layer]  # FP8-resident ones are widened expert by expert
        self.group = group
        self.n_experts = self.weights.n_experts
        self.members: list[_Member] = []

    def add(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, at: int = 0) -> None:
        """A checked call (hidden [T, H], topk_ids [T, K] global ids, topk_weights [T, K]) joining before expert
        `at`; in the forms the group's run converts it to (its dtype and device, local ids)."""
        ids = topk_ids.to(self.local_index.device)
        local = torch.where(ids >= 0, self.local_index[ids.long().clamp(min=0)], -1)  # [T, K] stack rows
        pairs = sort_by_expert(local, self.n_experts)
        x = hidden.to(self.device, self.dtype)
        rows = x[pairs.token]  # [P, H]
        scale = pair_scales(topk_weights.to(self.device), pairs, self.dtype)  # [P, 1]
        self.members.append(_Member(hidden, x, pairs, pairs.offsets.tolist(), rows, scale, torch.empty_like(rows), at))

    @staticmethod
    def would_loop(group: ExpertGroup, layout: ExpertLayout, layer: int, calls: list[Call]) -> bool:
        """Whether `calls` together would run the loop, decided from their routing alone (a bincount, no sort):
        half precision on a CPU always does, and so do FP8-resident experts; float32 does unless padded_bmm fits
        (decode-sized steps)."""
        if group.dtype != torch.float32 or group.torch_device.type != "cpu" or layout.weights[layer].fp8:
            return True
        local_index = layout.local_index[layer]
        counts = torch.zeros(layout.weights[layer].n_experts, dtype=torch.long, device=local_index.device)
        for _, ids, _ in calls:
            ids = ids.to(local_index.device, torch.long)
            counts += torch.bincount(local_index[ids[ids >= 0]], minlength=counts.numel())
        return auto_impl(torch.empty(0, dtype=group.dtype, device=group.torch_device), counts) == "loop"

    def uses_loop(self) -> bool:
        """Whether the members' concatenation would run grouped_expert_ffn's loop (impl='auto'): the only path
        that computes expert by expert, so the only one a call can join."""
        counts = torch.stack([m.pairs.counts for m in self.members]).sum(0)  # [E]
        return self.weights.fp8 or auto_impl(self.members[0].x, counts) == "loop"

    def run(self, join: Callable[[int], list[Call]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Compute every member, taking `join(e)`'s calls before expert e; per member, in the order they came:
        (output [T, H] in its hidden's dtype and device, tokens per local expert [E])."""
        for e in range(self.n_experts):
            for call in join(e):
                self.add(*call, at=e)
            self._expert(e, [m for m in self.members if m.joined_at <= e])
        late = [m for m in self.members if m.joined_at > 0]
        for e in range(max((m.joined_at for m in late), default=0)):
            self._expert(e, [m for m in late if m.joined_at > e])
        return [(self._output(m), m.pairs.counts) for m in self.members]

    def _expert(self, e: int, members: list[_Member]) -> None:
        """Expert e's rows of `members`, in one GEMM pair (a single member's rows are computed in place)."""
        parts = [(m, m.bounds[e], m.bounds[e + 1]) for m in members if m.bounds[e] < m.bounds[e + 1]]
        if not parts:
            return
        w_gate_up, w_down = self.weights.widen(e, self.dtype, self.group.matmul_dtype, self.group.scratch)
        if len(parts) == 1:
            m, a, b = parts[0]
            scaled_expert(m.rows[a:b], m.scale[a:b], w_gate_up, w_down, out=m.y[a:b])
            return
        x = torch.cat([m.rows[a:b] for m, a, b in parts])  # [ΣN, H]
        scale = torch.cat([m.scale[a:b] for m, a, b in parts])  # [ΣN, 1]
        y = scaled_expert(x, scale, w_gate_up, w_down, out=torch.empty_like(x))
        for (m, a, b), part in zip(parts, y.split([b - a for _, a, b in parts]), strict=True):
            m.y[a:b].copy_(part)

    @staticmethod
    def _output(m: _Member) -> torch.Tensor:
        """One scatter-add of the member's weighted rows, in expert order, as grouped_expert_ffn adds them."""
        out = torch.zeros_like(m.x).index_add_(0, m.pairs.token, m.y)
        return out.to(m.hidden.device, m.hidden.dtype)
