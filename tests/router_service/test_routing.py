"""Routing math equals transformers' DeepSeek gates; bias changes selection only; top-M bounds devices."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from model_core.make_model import preset_config
from model_core.spec import ModelSpec
from router_service.routing import (
    check_top_m,
    contiguous_members,
    members_of,
    partition_scores,
    route_tokens,
    router_scores,
    select_experts,
)


def hf_router(preset: str, gate: torch.Tensor, bias: torch.Tensor | None):
    cfg = preset_config(preset)
    if cfg["model_type"] == "deepseek_v2":
        router = DeepseekV2TopkRouter(DeepseekV2Config(**cfg))
    else:
        router = DeepseekV3TopkRouter(DeepseekV3Config(**cfg))
        router.e_score_correction_bias.copy_(bias)
    router.weight.data.copy_(gate)
    return router


def sort_pairs(ids, weights):
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v2-group", "tiny-v3", "tiny-v3-plain", "small-v3"])
def test_matches_transformers_router(preset):
    spec = ModelSpec.from_dict(preset_config(preset))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(200, spec.hidden_size, generator=gen)
    gate = torch.randn(spec.n_routed_experts, spec.hidden_size, generator=gen) / spec.hidden_size**0.5
    bias = 0.1 * torch.randn(spec.n_routed_experts, generator=gen) if spec.router.has_correction_bias else None
    ours = route_tokens(hidden, gate, spec.router, bias=bias)
    _, ref_w, ref_ids = hf_router(preset, gate, bias)(hidden)
    ids, w = sort_pairs(ours.ids, ours.weights)
    rids, rw = sort_pairs(ref_ids, ref_w)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)


def test_bias_changes_selection_but_weights_come_from_unbiased_scores():
    spec = ModelSpec.from_dict(preset_config("tiny-v3")).router
    scores = torch.rand(64, spec.n_routed_experts, generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(spec.n_routed_experts)
    bias[5] = 10.0  # expert 5 always wins selection
    plain = select_experts(scores, spec)
    biased = select_experts(scores, spec, bias=bias)
    assert (biased.ids == 5).any(dim=-1).all()
    assert not torch.equal(plain.ids.sort(-1).values, biased.ids.sort(-1).values)
    expected = scores.gather(1, biased.ids)
    expected = expected / expected.sum(-1, keepdim=True) * spec.routed_scaling_factor
    torch.testing.assert_close(biased.weights, expected)


def test_group_limit_keeps_tokens_inside_topk_groups():
    spec = ModelSpec.from_dict(preset_config("tiny-v2-group")).router
    scores = torch.rand(300, spec.n_routed_experts, generator=torch.Generator().manual_seed(2)).softmax(-1)
    r = select_experts(scores, spec)
    groups_used = (r.ids // (spec.n_routed_experts // spec.n_group)).sort(-1).values
    assert all(len(set(row.tolist())) <= spec.topk_group for row in groups_used)


def test_partition_scores_max_and_top2_sum_with_uneven_partitions():
    sel = torch.tensor([[0.1, 0.9, 0.3, 0.5, 0.2]])
    members = members_of(torch.tensor([0, 0, 1, 1, 1]), 2)
    assert members.tolist() == [[0, 1, -1], [2, 3, 4]]
    assert partition_scores(sel, members, "max").tolist() == [pytest.approx([0.9, 0.5])]
    assert partition_scores(sel, members, "top2_sum").tolist() == [pytest.approx([1.0, 0.8])]
    assert contiguous_members(6, 3).tolist() == [[0, 1], [2, 3], [4, 5]]
    # A device hosting one expert scores that expert (its padding does not sink it); one hosting none, -inf.
    lone = torch.tensor([[0, -1], [1, 2], [3, -1], [-1, -1]])
    sel = torch.tensor([[0.7, 0.1, 0.2, 0.4]])
    assert partition_scores(sel, lone, "top2_sum").tolist() == [pytest.approx([0.7, 0.3, 0.4, float("-inf")])]


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3", "small-v3"])
@pytest.mark.parametrize("m", [1, 2])
def test_top_m_devices_bounds_devices_per_token(preset, m):
    spec = ModelSpec.from_dict(preset_config(preset)).router
    n_dev = 4
    gen = torch.Generator().manual_seed(3)
    placement = torch.randperm(spec.n_routed_experts, generator=gen) % n_dev  # a scattered placement
    members = members_of(placement, n_dev)
    scores = router_scores(
        torch.randn(256, 32, generator=gen),
        torch.randn(spec.n_routed_experts, 32, generator=gen),
        spec.scoring_func,
    )
    r = select_experts(scores, spec, device_members=members, top_m_devices=m)
    devices = placement[r.ids]
    assert max(len(set(row.tolist())) for row in devices) <= m
    exact = select_experts(scores, spec)
    assert not torch.equal(exact.ids.sort(-1).values, r.ids.sort(-1).values)  # M this small does bind
    wide = select_experts(scores, spec, device_members=members, top_m_devices=n_dev)
    assert torch.equal(exact.ids.sort(-1).values, wide.ids.sort(-1).values)  # M = D changes nothing


def test_group_limit_gives_way_when_top_m_devices_hold_too_few_allowed_experts():
    spec = ModelSpec.from_dict(preset_config("tiny-v3")).router  # 4 groups of 4, top-2 groups, K = 4
    placement = torch.tensor([0, 1, 2, 3] * 4)  # every device holds one expert of each group
    scores = torch.rand(50, 16, generator=torch.Generator().manual_seed(4))
    r = select_experts(scores, spec, device_members=members_of(placement, 4), top_m_devices=1)
    assert (placement[r.ids] == placement[r.ids[:, :1]]).all()  # one device per token
    assert len(set(r.ids.flatten().tolist())) > 4 and r.weights.isfinite().all()


def test_check_top_m_rejects_devices_too_small_for_top_k():
    members = members_of(torch.tensor([0, 0, 0, 1, 2, 3]), 4)  # device sizes 3, 1, 1, 1
    check_top_m(members, top_k=3, top_m_devices=3)
    with pytest.raises(ValueError, match="top_m_devices=2: the 2 smallest devices hold 2 experts"):
        check_top_m(members, top_k=3, top_m_devices=2)
