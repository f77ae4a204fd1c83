"""The one accounting pass per layer equals a brute-force recount: counts per sequence, expert and device; the
comparison with the model's own routing under top-M devices, a live bias, and both."""

from __future__ import annotations

import pytest
import torch

from model_core.make_model import preset_config
from model_core.spec import ModelSpec
from router_service.accounting import compare_routing, count_routing
from router_service.load_stats import expert_balance, sequence_balance_sum
from router_service.routing import members_of, select_experts


def random_ids(tokens: int, n_experts: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(tokens, n_experts, generator=gen).argsort(dim=-1)[:, :k]  # distinct experts per token


@pytest.mark.parametrize("seed", range(5))
def test_counts_equal_a_brute_force_recount(seed):
    gen = torch.Generator().manual_seed(seed)
    n_experts, n_devices, k = 12, 3, 3
    lengths = torch.randint(1, 9, (4,), generator=gen).tolist()
    seq_index = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    ids = random_ids(sum(lengths), n_experts, k, gen)
    expert_device = torch.randint(0, n_devices, (n_experts,), generator=gen)
    c = count_routing(ids, n_experts, expert_device, n_devices, seq_index, 4)
    per_sequence = torch.zeros(4, n_experts, dtype=torch.long)
    per_device = torch.zeros(n_devices, dtype=torch.long)
    for t, row in enumerate(ids.tolist()):
        for e in row:
            per_sequence[seq_index[t], e] += 1
        for d in {int(expert_device[e]) for e in row}:
            per_device[d] += 1
    assert torch.equal(c.per_sequence, per_sequence)
    assert torch.equal(c.tokens_per_expert, per_sequence.sum(0))
    assert torch.equal(c.tokens_per_device, per_device)
    assert torch.equal(count_routing(ids, n_experts, expert_device, n_devices).per_sequence[0], c.tokens_per_expert)


def brute_force_change(served, exact, before_limit):
    """Set comparisons per token, in Python: (by_top_m, by_bias, changed tokens, changed slots)."""
    by_top_m = [set(a) != set(b) for a, b in zip(served, before_limit, strict=True)]
    by_bias = [set(a) != set(b) for a, b in zip(before_limit, exact, strict=True)]
    changed = sum(set(a) != set(b) for a, b in zip(served, exact, strict=True))
    slots = sum(e not in set(b) for a, b in zip(served, exact, strict=True) for e in a)
    return by_top_m, by_bias, changed, slots


@pytest.mark.parametrize("preset", ["tiny-v2-group", "tiny-v3"])
@pytest.mark.parametrize("top_m, with_bias", [(1, False), (None, True), (2, True)])
def test_change_flags_equal_a_brute_force_comparison(preset, top_m, with_bias):
    spec = ModelSpec.from_dict(preset_config(preset)).router
    gen = torch.Generator().manual_seed(11)
    scores = torch.rand(300, spec.n_routed_experts, generator=gen)
    placement = torch.randperm(spec.n_routed_experts, generator=gen) % 4
    members = members_of(placement, 4)
    bias = 0.3 * torch.randn(spec.n_routed_experts, generator=gen) if with_bias else None
    served = select_experts(scores, spec, bias, members, top_m).ids
    exact = select_experts(scores, spec).ids
    unlimited = select_experts(scores, spec, bias).ids if top_m and with_bias else None
    change = compare_routing(served, exact, unlimited, top_m is not None, with_bias)
    before_limit = unlimited if unlimited is not None else exact if top_m else served
    by_top_m, by_bias, changed, slots = brute_force_change(served.tolist(), exact.tolist(), before_limit.tolist())
    assert change.by_top_m.tolist() == by_top_m and change.by_bias.tolist() == by_bias
    assert (change.tokens, change.slots) == (changed, slots)
    assert changed > 0  # the cases do change routing
    if top_m is None:
        assert not change.by_top_m.any()
    if not with_bias:
        assert not change.by_bias.any()


def test_sequence_balance_sum_is_the_sum_of_each_sequences_expert_balance():
    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 9, (5, 8), generator=gen)
    scores = torch.rand(5, 8, generator=gen, dtype=torch.float64)
    tokens = torch.randint(1, 20, (5,), generator=gen)
    expected = sum(expert_balance(counts[s], scores[s], int(tokens[s]), 2) for s in range(5))
    assert sequence_balance_sum(counts, scores, tokens, 2) == pytest.approx(expected, rel=1e-12)
    assert sequence_balance_sum(counts[:0], scores[:0], tokens[:0], 2) == 0.0
