"""Load statistics over a window of routed tokens and DeepSeek's balance measures (pure functions, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from router_service.accounting import count_routing

# Shape legend: T = tokens in the window, N = routed experts, K = experts per token, D = devices,
# M = devices per token. Scores are normalised per token (s / Σ_j s_j) so that Σ_i P_i = 1; with that,
# every measure below is 1.0 for perfectly uniform routing and grows with imbalance.


def expert_balance(counts: torch.Tensor, score_sum: torch.Tensor, tokens: int, top_k: int) -> float:
    """Σ_i f_i·P_i with f_i = N/(K·T)·#{t chooses i}, P_i = (1/T)·Σ_t s_{i,t} (DeepSeek-V2 expert-level loss)."""
    if tokens == 0:
        return 0.0
    n = counts.numel()
    f = n / (top_k * tokens) * counts.double()
    p = score_sum.double() / tokens
    return float((f * p).sum())


def device_balance(
    counts: torch.Tensor, score_sum: torch.Tensor, tokens: int, top_k: int, expert_device: torch.Tensor, n_devices: int
) -> float:
    """Σ_d f'_d·P'_d with f'_d = mean of f_i over device d's experts, P'_d = Σ_{i on d} P_i (device-level loss)."""
    if tokens == 0:
        return 0.0
    n = counts.numel()
    f = n / (top_k * tokens) * counts.double()
    p = score_sum.double() / tokens
    per_device = torch.bincount(expert_device, minlength=n_devices).double()
    f_dev = torch.zeros(n_devices, dtype=torch.float64).index_add_(0, expert_device, f) / per_device
    p_dev = torch.zeros(n_devices, dtype=torch.float64).index_add_(0, expert_device, p)
    return float((f_dev * p_dev).sum())


def communication_balance(
    device_tokens: torch.Tensor, score_sum: torch.Tensor, tokens: int, devices_per_token: float,
    expert_device: torch.Tensor,
) -> float:
    """Σ_d f''_d·P''_d with f''_d = D/(M·T)·#{t sent to d}, P''_d = Σ_{i on d} P_i (communication loss)."""
    if tokens == 0 or devices_per_token <= 0:
        return 0.0
    d = device_tokens.numel()
    f = d / (devices_per_token * tokens) * device_tokens.double()
    p = torch.zeros(d, dtype=torch.float64).index_add_(0, expert_device, score_sum.double() / tokens)
    return float((f * p).sum())


def max_over_mean(load: torch.Tensor) -> float:
    mean = load.double().mean()
    return float(load.double().max() / mean) if mean > 0 else 0.0


@dataclass
class LayerWindow:
    """What one MoE layer routed in the current window (additive: gateways' windows sum)."""

    counts: torch.Tensor  # [N] tokens choosing each expert
    score_sum: torch.Tensor  # [N] Σ_t normalised s_{i,t}
    device_tokens: torch.Tensor  # [D] tokens sent to each device
    tokens: int = 0
    seq_balance_sum: float = 0.0  # Σ over sequences of their own expert balance
    sequences: int = 0
    changed: int = 0  # tokens whose experts differ from the model's own routing
    changed_slots: int = 0  # token-expert slots whose expert differs

    @classmethod
    def empty(cls, n_experts: int, n_devices: int) -> LayerWindow:
        return cls(torch.zeros(n_experts, dtype=torch.long), torch.zeros(n_experts, dtype=torch.float64),
                   torch.zeros(n_devices, dtype=torch.long))

    def add(self, other: LayerWindow) -> None:
        self.counts += other.counts
        self.score_sum += other.score_sum
        self.device_tokens += other.device_tokens
        self.tokens += other.tokens
        self.seq_balance_sum += other.seq_balance_sum
        self.sequences += other.sequences
        self.changed += other.changed
        self.changed_slots += other.changed_slots


def normalised_scores(scores: torch.Tensor) -> torch.Tensor:
    """s_{i,t} / Σ_j s_{j,t} in float64 (identity for softmax scores). scores: [T, N]."""
    return scores.double() / scores.double().sum(dim=-1, keepdim=True).clamp(min=1e-30)


def observe_routing(
    ids: torch.Tensor, scores: torch.Tensor, expert_device: torch.Tensor, n_devices: int, changed: int = 0,
    changed_slots: int = 0,
) -> LayerWindow:
    """Summarise one layer's routing of a step (sequence-wise terms are added by the caller). ids: [T, K]."""
    c = count_routing(ids, scores.shape[1], expert_device, n_devices)
    return LayerWindow(c.tokens_per_expert, normalised_scores(scores).sum(0), c.tokens_per_device, ids.shape[0],
                       changed=changed, changed_slots=changed_slots)


def sequence_balance_sum(counts: torch.Tensor, score_sum: torch.Tensor, tokens: torch.Tensor, top_k: int) -> float:
    """Σ over sequences of each one's expert balance. counts, score_sum: [S, N] per sequence; tokens: [S] (> 0).

    Row s is expert_balance(counts[s], score_sum[s], tokens[s], top_k) = N/(K·T_s²)·Σ_i c_{s,i}·S_{s,i}.
    """
    if tokens.numel() == 0:
        return 0.0
    n = counts.shape[1]
    per_seq = (counts.double() * score_sum.double()).sum(dim=1) * n / (top_k * tokens.double() ** 2)
    return float(per_seq.sum())


@dataclass
class LayerReport:
    """The balance picture of one MoE layer over one window."""

    layer: int
    tokens: int
    expert_max_over_mean: float
    device_max_over_mean: float
    expert_balance: float
    device_balance: float
    communication_balance: float
    sequence_balance: float
    changed_share: float  # fidelity price: share of tokens routed differently from the model's own choice
    changed_slot_share: float  # share of token-expert slots holding an expert the model would not have chosen
    bias_min: float = 0.0
    bias_max: float = 0.0


def layer_report(
    layer: int, w: LayerWindow, top_k: int, expert_device: torch.Tensor, n_devices: int,
    devices_per_token: float | None = None, copy_share: torch.Tensor | None = None,
) -> LayerReport:
    """All measures for one layer's window. devices_per_token: top-M if set, else the observed mean.
    copy_share: [D, E] the share of expert e's work device d does when the layer's placement has copies (an
    expert's tokens split evenly over its copies); None: the expert -> device map."""
    if copy_share is None:
        device_load = torch.zeros(n_devices, dtype=torch.long).index_add_(0, expert_device, w.counts)
    else:
        device_load = copy_share.double() @ w.counts.double()
    m = devices_per_token or (float(w.device_tokens.sum()) / w.tokens if w.tokens else 0.0)
    return LayerReport(
        layer=layer,
        tokens=w.tokens,
        expert_max_over_mean=max_over_mean(w.counts),
        device_max_over_mean=max_over_mean(device_load),
        expert_balance=expert_balance(w.counts, w.score_sum, w.tokens, top_k),
        device_balance=device_balance(w.counts, w.score_sum, w.tokens, top_k, expert_device, n_devices),
        communication_balance=communication_balance(w.device_tokens, w.score_sum, w.tokens, m, expert_device),
        sequence_balance=w.seq_balance_sum / w.sequences if w.sequences else 0.0,
        changed_share=w.changed / w.tokens if w.tokens else 0.0,
        changed_slot_share=w.changed_slots / (w.tokens * top_k) if w.tokens else 0.0,
    )
