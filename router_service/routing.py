"""Routing math as pure tensor functions: scores, selection bias, group / device limits, top-k, weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_core.spec import RouterSpec
from router_service.accounting import RoutingChange, RoutingCounts

# Shape legend: T = tokens, H = hidden, E = routed experts, K = experts per token,
# G = expert groups, D = devices.


@dataclass(frozen=True, slots=True)
class Routing:
    """The router's decision for T tokens, with its accounting once the gateway has done it."""

    ids: torch.Tensor  # [T, K] int64 global expert ids
    weights: torch.Tensor  # [T, K] float32 combine weights (never include the bias)
    scores: torch.Tensor  # [T, E] float32 unbiased scores (softmax or sigmoid)
    counts: RoutingCounts | None = None  # tokens per expert / sequence / device (see accounting.count_routing)
    change: RoutingChange | None = None  # set only when serving could change the routing (top-M, live bias)
    devices: torch.Tensor | None = None  # [T, M] the devices top-M routing chose per token (None without top-M)
    served: torch.Tensor | None = None  # [T, K] the device that computed each pair (set by the gateway's dispatch)

    def changed_tokens(self) -> int:
        """Tokens whose expert set differs from the model's own routing (0 when no limit was applied)."""
        return 0 if self.change is None else self.change.tokens

    def change_flags(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token: (the device limit changed its experts, the live bias changed them). Both [T] bool."""
        if self.change is None:
            none = torch.zeros(self.ids.shape[0], dtype=torch.bool, device=self.ids.device)
            return none, none
        return self.change.by_top_m, self.change.by_bias

    def changed_slots(self) -> int:
        """Token-expert slots holding an expert the model's own routing would not have chosen."""
        return 0 if self.change is None else self.change.slots


def router_scores(hidden: torch.Tensor, gate_weight: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Scores in float32. hidden: [T, H]; gate_weight: [E, H] -> [T, E]."""
    logits = F.linear(hidden.float(), gate_weight.float())
    if scoring_func == "softmax":
        return logits.softmax(dim=-1, dtype=torch.float32)
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"scoring_func={scoring_func!r}: expected 'softmax' or 'sigmoid'")


def partition_scores(sel: torch.Tensor, members: torch.Tensor, how: str) -> torch.Tensor:
    """Score each partition (expert group or device) from its members' selection scores.

    sel: [T, E]; members: [P, m] expert ids per partition, -1 padding -> [T, P].
    `how` is 'max' (DeepSeek-V2 group_limited_greedy) or 'top2_sum' (DeepSeek-V3 noaux_tc).
    """
    padded = torch.cat([sel, sel.new_full((sel.shape[0], 1), float("-inf"))], dim=1)
    grouped = padded[:, members]  # [T, P, m]; index -1 reads the -inf column
    if how == "max" or grouped.shape[-1] < 2:
        return grouped.max(dim=-1).values
    if how == "top2_sum":
        # A partition with one member (a device hosting a single expert) scores that member alone: its -inf
        # padding must not sink it. A partition with no member stays -inf.
        top2 = grouped.topk(2, dim=-1).values
        return top2[..., 0] + top2[..., 1].masked_fill(top2[..., 1] == float("-inf"), 0.0)
    raise ValueError(f"group score {how!r}: expected 'max' or 'top2_sum'")


def top_partition_mask(sel: torch.Tensor, members: torch.Tensor, how: str, keep: int) -> torch.Tensor:
    """True for every expert inside the `keep` best-scoring partitions. sel: [T, E] -> bool [T, E]."""
    return top_partitions(sel, members, how, keep)[0]


def top_partitions(sel: torch.Tensor, members: torch.Tensor, how: str,
                   keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool [T, E] experts inside the `keep` best-scoring partitions, [T, keep] those partitions)."""
    part_scores = partition_scores(sel, members, how)  # [T, P]
    chosen = part_scores.topk(min(keep, part_scores.shape[1]), dim=-1, sorted=False).indices  # [T, keep]
    expert_ok = torch.zeros_like(sel, dtype=torch.bool)
    rows = members[chosen]  # [T, keep, m]
    valid = rows >= 0
    t_idx = torch.arange(sel.shape[0], device=sel.device)[:, None, None].expand_as(rows)
    expert_ok[t_idx[valid], rows[valid]] = True
    return expert_ok, chosen


def check_top_m(device_members: torch.Tensor, top_k: int, top_m_devices: int) -> None:
    """Any M devices must together hold at least top_k experts, or some token could not be routed."""
    sizes = (device_members >= 0).sum(dim=1).sort().values
    if top_m_devices < 1 or sizes[:top_m_devices].sum() < top_k:
        raise ValueError(
            f"top_m_devices={top_m_devices}: the {top_m_devices} smallest devices hold "
            f"{int(sizes[:top_m_devices].sum())} experts, fewer than num_experts_per_tok={top_k}"
        )


def contiguous_members(n_experts: int, n_parts: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Experts split into equal consecutive partitions: [P, E/P]."""
    return torch.arange(n_experts, device=device).view(n_parts, n_experts // n_parts)


def members_of(expert_device: torch.Tensor, n_devices: int) -> torch.Tensor:
    """Invert an expert -> device map ([E]) into a padded table of experts per device: [D, m], -1 padding."""
    per_device = [torch.nonzero(expert_device == d).flatten() for d in range(n_devices)]
    width = max(1, max(len(p) for p in per_device))
    table = torch.full((n_devices, width), -1, dtype=torch.long)
    for d, ids in enumerate(per_device):
        table[d, : len(ids)] = ids
    return table


def select_experts(
    scores: torch.Tensor,
    spec: RouterSpec,
    bias: torch.Tensor | None = None,
    device_members: torch.Tensor | None = None,
    top_m_devices: int | None = None,
) -> Routing:
    """The DeepSeek gate from scores on: bias for selection only, group / device limits, top-k, weights.

    scores: [T, E] float32; bias: [E] or None; device_members: [D, m] (see `members_of`).
    """
    sel = scores if bias is None else scores + bias.to(scores.dtype)  # [T, E]
    choice, devices = sel, None
    if spec.group_limited:
        groups = contiguous_members(spec.n_routed_experts, spec.n_group, scores.device)
        choice = sel.masked_fill(~top_partition_mask(sel, groups, spec.group_score, spec.topk_group), float("-inf"))
    if top_m_devices is not None:
        if device_members is None:
            raise ValueError("top_m_devices is set but no expert -> device placement was given")
        choice, devices = _limit_devices(sel, choice, device_members.to(scores.device), spec, top_m_devices)
    ids = choice.topk(spec.top_k, dim=-1, sorted=False).indices  # [T, K]
    weights = scores.gather(1, ids)  # [T, K] from the unbiased scores
    if spec.normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * spec.routed_scaling_factor
    return Routing(ids=ids, weights=weights, scores=scores, devices=devices)


def _limit_devices(
    sel: torch.Tensor, choice: torch.Tensor, members: torch.Tensor, spec: RouterSpec, top_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only experts on the token's top-M devices (scored like groups, from the group-limited choice);
    returns the limited choice [T, E] and the chosen devices [T, M].

    A token whose chosen devices hold fewer than K experts of its allowed groups falls back to the best
    other experts on those same devices: the device bound is hard, the group limit gives way. With copies an
    expert belongs to every device that hosts it.
    """
    on_devices, devices = top_partitions(choice, members, spec.group_score, top_m)
    limited = choice.masked_fill(~on_devices, float("-inf"))
    short = (limited > float("-inf")).sum(dim=-1) < spec.top_k  # [T]
    if short.any():
        # In-group experts first (lifted above every other), then the rest of the chosen devices by score.
        lift = (sel.max() - sel.min()).abs() + 1
        fallback = torch.where(choice > float("-inf"), sel + lift, sel).masked_fill(~on_devices, float("-inf"))
        limited = torch.where(short[:, None], fallback, limited)
    return limited, devices


def concat_routings(parts: list[Routing]) -> Routing:
    """One layer's routings of consecutive token ranges (micro-batches, in order) as the routing of all of them:
    per-token tensors concatenated, counts per sequence stacked, totals summed."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    counts = None
    if parts[0].counts is not None:
        c = [p.counts for p in parts]
        counts = RoutingCounts(torch.cat([x.per_sequence for x in c]), sum(x.tokens_per_expert for x in c),
                               sum(x.tokens_per_device for x in c))
    change = None
    if parts[0].change is not None:
        ch = [p.change for p in parts]
        change = RoutingChange(torch.cat([x.by_top_m for x in ch]), torch.cat([x.by_bias for x in ch]),
                               sum(x.tokens for x in ch), sum(x.slots for x in ch))
    return Routing(cat("ids"), cat("weights"), cat("scores"), counts, change, cat("devices"), cat("served"))


def route_tokens(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    spec: RouterSpec,
    bias: torch.Tensor | None = None,
    device_members: torch.Tensor | None = None,
    top_m_devices: int | None = None,
) -> Routing:
    """Route T tokens. hidden: [T, H]; gate_weight: [E, H]."""
    scores = router_scores(hidden, gate_weight, spec.scoring_func)
    return select_experts(scores, spec, bias, device_members, top_m_devices)
