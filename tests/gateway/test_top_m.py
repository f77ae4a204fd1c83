"""Top-M devices: the engine routes each token to the experts an independent reference picks (its M best devices,
scored like DeepSeek scores groups), dispatches exactly that, and accounts for it exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gateway import Engine
from gateway.model.step import StepBatch
from router_service.routing import select_experts
from tests.conftest import random_prompts

DEVICES = 4
PLACEMENTS = {  # experts 0..15 in 4 groups of 4 (tiny presets: top-2 groups, K = 4)
    "contiguous": [list(range(d * 4, d * 4 + 4)) for d in range(DEVICES)],  # a device is a group
    "scattered": [list(range(d, 16, DEVICES)) for d in range(DEVICES)],  # a device holds one expert per group
}


def partition_score(values: list[float], how: str) -> float:
    """DeepSeek's group score over a partition's selectable experts: max (V2) or sum of the top two (V3)."""
    values = sorted(values, reverse=True)
    if how == "max":
        return values[0] if values else -math.inf
    return values[0] + values[1] if len(values) >= 2 else -math.inf


def reference_choice(sel: list[float], spec, devices: list[list[int]], m: int | None) -> tuple[set[int], bool]:
    """One token, in plain Python: (its experts, whether the device choice is unambiguous).

    sel: the selection scores (scores + bias). The model's group mask first (top `topk_group` groups), then the
    top-M devices scored over the allowed experts, then the top-k experts on those devices (allowed ones first:
    when those devices hold fewer than k allowed experts, the device bound wins over the group limit).
    """
    n = len(sel)
    allowed = set(range(n))
    if spec.group_limited:
        size = n // spec.n_group
        group = [partition_score(sel[g * size : (g + 1) * size], spec.group_score) for g in range(spec.n_group)]
        keep = sorted(range(spec.n_group), key=lambda g: -group[g])[: spec.topk_group]
        allowed = {e for e in range(n) if e // size in keep}
    clear = True
    candidates = set(range(n))
    if m is not None:
        score = [partition_score([sel[e] for e in experts if e in allowed], spec.group_score) for experts in devices]
        ranked = sorted(range(len(devices)), key=lambda d: -score[d])
        if m < len(devices):  # a tie (or -inf) at the boundary leaves the choice to the implementation
            clear = score[ranked[m - 1]] > -math.inf and score[ranked[m - 1]] - score[ranked[m]] > 1e-5
        candidates = {e for d in ranked[:m] for e in devices[d]}
    ranked_experts = sorted(candidates, key=lambda e: (e not in allowed, -sel[e]))
    return set(ranked_experts[: spec.top_k]), clear


def forward(engine: Engine, lengths: list[int], seed: int):
    """One prefill step of random prompts outside the engine's bookkeeping: {layer: Routing}."""
    prompts = random_prompts(engine.spec.vocab_size, lengths, seed)
    cache = engine.model.new_cache()
    for s, n in enumerate(lengths):
        cache.allocate(s, n)
    step = StepBatch(list(range(len(lengths))), [0] * len(lengths), lengths)
    _, routings = engine.model.forward(torch.tensor([t for p in prompts for t in p]), step, cache)
    return routings, step


def engine_for(model_dirs, tmp_path, preset: str, placement: str, m: int | None, backend: str = "local") -> Engine:
    path = tmp_path / f"{placement}.json"
    path.write_text(json.dumps({"devices": PLACEMENTS[placement]}))
    return Engine.from_pretrained(model_dirs[preset], backend=backend, devices=DEVICES, top_m_devices=m,
                                  placement=str(path))


def check_against_reference(engine: Engine, devices: list[list[int]], m: int, seed: int) -> int:
    """Compare every MoE layer's routing of one step with the reference; returns the tokens top-M changed."""
    spec = engine.spec.router
    routings, step = forward(engine, [30, 17], seed)
    expert_device = engine.model.expert_device
    changed = 0
    for layer, r in routings.items():
        bias = engine.model.layers[layer].selection_bias
        sel = (r.scores if bias is None else r.scores + bias).tolist()
        clear = 0
        for t, row in enumerate(sel):
            expected, unambiguous = reference_choice(row, spec, devices, m)
            if unambiguous:
                assert set(r.ids[t].tolist()) == expected, f"layer {layer} token {t}"
                clear += 1
            exact, _ = reference_choice(row, spec, devices, None)
            changed += set(r.ids[t].tolist()) != exact
        assert clear >= 0.9 * step.n_tokens
        weights = r.scores.gather(1, r.ids)
        if spec.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        torch.testing.assert_close(r.weights, weights * spec.routed_scaling_factor)
        sent = torch.zeros(DEVICES, dtype=torch.long)  # what the dispatcher must have sent: tokens per device
        for row in r.ids:
            sent[sorted({int(d) for d in expert_device[row]})] += 1
        assert torch.equal(engine.backend.stats.tokens[layer], sent)
        assert torch.equal(r.counts.tokens_per_device, sent)
    return changed


@torch.inference_mode()
@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2-group"])
@pytest.mark.parametrize("placement, m", [("contiguous", 1), ("scattered", 2), ("scattered", 1)])
def test_top_m_picks_the_reference_devices_and_dispatches_exactly_that(preset, placement, m, model_dirs, tmp_path):
    with engine_for(model_dirs, tmp_path, preset, placement, m) as engine:
        assert check_against_reference(engine, PLACEMENTS[placement], m, seed=3) > 0  # the limit binds for some tokens


@pytest.mark.slow
@torch.inference_mode()
def test_top_m_on_the_ray_backend_picks_the_reference_devices(model_dirs, tmp_path, ray_cluster):
    with engine_for(model_dirs, tmp_path, "tiny-v3", "scattered", 2, backend="ray") as engine:
        assert check_against_reference(engine, PLACEMENTS["scattered"], 2, seed=4) > 0


@torch.inference_mode()
@pytest.mark.parametrize("m, live_bias", [(2, False), (None, True), (2, True)])
def test_forward_accounts_each_layer_exactly(m, live_bias, model_dirs, tmp_path):
    with engine_for(model_dirs, tmp_path, "tiny-v3", "scattered", m) as engine:
        model, spec = engine.model, engine.spec
        if live_bias:
            gen = torch.Generator().manual_seed(1)
            model.set_selection_bias({layer: model.layers[layer].model_bias + 0.2 * torch.randn(16, generator=gen)
                                      for layer in spec.moe_layers})
        routings, step = forward(engine, [12, 7, 20], seed=5)
        seq_of = [s for s, n in enumerate(step.lengths) for _ in range(n)]
        changed_total = 0
        for layer, r in routings.items():
            per_sequence = torch.zeros(3, 16, dtype=torch.long)
            for t, row in enumerate(r.ids.tolist()):
                for e in row:
                    per_sequence[seq_of[t], e] += 1
            assert torch.equal(r.counts.per_sequence, per_sequence)
            assert torch.equal(r.counts.tokens_per_expert, per_sequence.sum(0))
            entry = model.layers[layer]
            exact = select_experts(r.scores, spec.router, entry.model_bias).ids.tolist()
            unlimited = select_experts(r.scores, spec.router, entry.selection_bias).ids.tolist()
            served = r.ids.tolist()
            before_limit = unlimited if m else served
            by_top_m, by_bias = r.change_flags()
            assert by_top_m.tolist() == [set(a) != set(b) for a, b in zip(served, before_limit, strict=True)]
            assert by_bias.tolist() == [set(a) != set(b) for a, b in zip(before_limit, exact, strict=True)]
            assert r.changed_tokens() == sum(set(a) != set(b) for a, b in zip(served, exact, strict=True))
            assert r.changed_slots() == sum(e not in b for a, b in zip(served, exact, strict=True) for e in a)
            changed_total += r.changed_tokens()
        assert changed_total > 0


@torch.inference_mode()
def test_exact_routing_does_no_comparison_work(model_dirs, tmp_path, monkeypatch):
    import gateway.model.model as gateway_model

    def refuse(*args, **kwargs):
        raise AssertionError("comparison routing computed although nothing could change the routing")

    with engine_for(model_dirs, tmp_path, "tiny-v3", "scattered", None) as engine:
        monkeypatch.setattr(gateway_model, "select_experts", refuse)
        monkeypatch.setattr(gateway_model, "compare_routing", refuse)
        routings, _ = forward(engine, [9, 4], seed=6)
        for r in routings.values():
            assert r.change is None and r.changed_tokens() == 0 and not any(f.any() for f in r.change_flags())
            assert int(r.counts.tokens_per_expert.sum()) == 13 * engine.spec.top_k
