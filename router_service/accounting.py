"""One accounting pass per MoE layer and step: token counts, and how serving changed the model's own routing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Shape legend: T = tokens in the step, K = experts per token, E = routed experts, D = devices,
# S = sequences in the step.


@dataclass(frozen=True, slots=True)
class RoutingCounts:
    """A layer's routing of one step, counted once; the routing summary and the balance client read these."""

    per_sequence: torch.Tensor  # [S, E] int64 tokens of sequence s choosing expert e
    tokens_per_expert: torch.Tensor  # [E] int64, per_sequence summed over sequences
    tokens_per_device: torch.Tensor  # [D] int64 tokens with at least one expert on device d


@dataclass(frozen=True, slots=True)
class RoutingChange:
    """How serving (top-M devices, live bias) changed the model's own routing, compared once."""

    by_top_m: torch.Tensor  # [T] bool: the device limit changed the token's expert set
    by_bias: torch.Tensor  # [T] bool: the live bias changed it (before the device limit)
    tokens: int  # tokens whose expert set differs from the model's own
    slots: int  # token-expert slots holding an expert the model's own routing would not have chosen


def count_routing(
    ids: torch.Tensor, n_experts: int, expert_device: torch.Tensor, n_devices: int,
    seq_index: torch.Tensor | None = None, n_seqs: int = 1, tokens_per_device: torch.Tensor | None = None,
) -> RoutingCounts:
    """ids: [T, K]; expert_device: [E]; seq_index: [T] each token's sequence (None: all one sequence).
    All on one device (the gateway's); the counts stay there. tokens_per_device: [D] when the dispatch plan
    already counted them (with copies only the plan knows which device served a token).

    One bincount over seq_index·E + id gives the per-sequence counts; their sum is the per-expert count.
    """
    keys = ids if seq_index is None else ids + (seq_index * n_experts)[:, None]  # [T, K]
    per_sequence = torch.bincount(keys.flatten(), minlength=n_seqs * n_experts).view(n_seqs, n_experts)
    if tokens_per_device is None:
        on_device = torch.zeros(ids.shape[0], n_devices, dtype=torch.bool, device=ids.device)  # [T, D]
        on_device[torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids), expert_device[ids]] = True
        tokens_per_device = on_device.sum(0)
    return RoutingCounts(per_sequence, per_sequence.sum(0), tokens_per_device)


def compare_routing(
    ids: torch.Tensor, exact_ids: torch.Tensor, unlimited_ids: torch.Tensor | None, top_m_applied: bool,
    bias_applied: bool,
) -> RoutingChange:
    """Compare the served routing with the model's own, each [T, K] sorted once.

    ids: what was served; exact_ids: the model's own choice; unlimited_ids: the live-bias choice before the
    device limit (needed only when both were applied, to tell the two causes apart).
    """
    served, exact = ids.sort(dim=-1).values, exact_ids.sort(dim=-1).values
    changed = (served != exact).any(dim=-1)  # [T]
    none = torch.zeros_like(changed)
    if top_m_applied and bias_applied:
        if unlimited_ids is None:
            raise ValueError("compare_routing: top-M and a live bias were both applied but unlimited_ids is None")
        unlimited = unlimited_ids.sort(dim=-1).values
        by_top_m, by_bias = (served != unlimited).any(dim=-1), (unlimited != exact).any(dim=-1)
    elif top_m_applied:
        by_top_m, by_bias = changed, none
    elif bias_applied:
        by_top_m, by_bias = none, changed
    else:
        by_top_m, by_bias = none, none
    new_slots = ~(served[:, :, None] == exact[:, None, :]).any(dim=-1)  # [T, K]
    return RoutingChange(by_top_m, by_bias, int(changed.sum()), int(new_slots.sum()))
