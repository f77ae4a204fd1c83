"""Redundant experts: a placement with copies changes where tokens go, never what the model computes."""

from __future__ import annotations

import json

import pytest
import torch

from gateway import Engine
from gateway.dispatch.dispatcher import choose_copies, plan_dispatch
from model_core.spec import ModelSpec
from router_service.placement import Placement, PlacementError
from router_service.routing import route_tokens
from tests.conftest import random_prompts


def with_copies(n_experts: int, n_devices: int, layers: list[int], copies: int, seed: int) -> dict:
    """A contiguous base map, and per MoE layer `copies` extra copies of random experts on groups without them."""
    base = Placement.contiguous(n_experts, n_devices)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        layout = [list(base.experts_on(d)) for d in range(n_devices)]
        added = 0
        while added < copies:
            e = int(torch.randint(n_experts, (1,), generator=gen))
            d = int(torch.randint(n_devices, (1,), generator=gen))
            if e not in layout[d]:
                layout[d].append(e)
                added += 1
        out[layer] = layout
    return {"devices": [base.experts_on(d) for d in range(n_devices)], "layers": out}


def test_every_pair_goes_to_one_device_hosting_its_expert_and_copies_share_the_work_evenly():
    gen = torch.Generator().manual_seed(0)
    n_experts, n_devices = 16, 4
    raw = with_copies(n_experts, n_devices, [1], copies=10, seed=3)
    placement = Placement.from_device_lists(raw["devices"], n_experts, raw["layers"])
    hosts = placement.copy_table(1)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:4] for _ in range(200)])  # [T, K]
    device_of = choose_copies(ids, hosts)
    for e, d in zip(ids.flatten().tolist(), device_of.flatten().tolist(), strict=True):
        assert e in placement.experts_on(d, 1)
    for e in range(n_experts):  # an expert's pairs split evenly over its copies
        served = device_of[ids == e]
        n_copies = int((hosts[e] >= 0).sum())
        per_copy = torch.bincount(served, minlength=n_devices)[hosts[e][:n_copies]]
        assert int(per_copy.max() - per_copy.min()) <= 1 and int(per_copy.sum()) == served.numel()
    assert int((hosts >= 0).sum(dim=1).max()) >= 2  # the test really had copies


def test_top_m_routing_serves_each_expert_from_a_copy_on_one_of_the_tokens_devices(model_dirs):
    spec = ModelSpec.from_dir(model_dirs["tiny-v3"])
    layer = spec.moe_layers[0]
    raw = with_copies(spec.n_routed_experts, 4, [layer], copies=12, seed=5)
    placement = Placement.from_device_lists(raw["devices"], spec.n_routed_experts, raw["layers"])
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, spec.hidden_size, generator=gen)
    gate = torch.randn(spec.n_routed_experts, spec.hidden_size, generator=gen)
    routing = route_tokens(hidden, gate, spec.router, None, placement.members(layer), 2)
    assert routing.devices is not None and routing.devices.shape == (300, 2)
    device_of = choose_copies(routing.ids, placement.copy_table(layer), routing.devices)
    on_chosen = (device_of[..., None] == routing.devices[:, None, :]).any(dim=-1)
    assert bool(on_chosen.all())  # top-M only picks experts hosted on the chosen devices, so a copy is there
    without = choose_copies(routing.ids, placement.copy_table(layer))
    assert not bool((without[..., None] == routing.devices[:, None, :]).any(dim=-1).all())  # the preference matters
    batches = plan_dispatch(routing.ids, routing.weights, placement.copy_table(layer), 4, routing.devices)
    assert sum(int((b.ids >= 0).sum()) for b in batches) == routing.ids.numel()  # every pair exactly once


def test_placement_files_with_copies_are_checked_by_layer_group_and_expert(tmp_path, model_dirs):
    spec = ModelSpec.from_dir(model_dirs["tiny-v3"])
    n, layer = spec.n_routed_experts, spec.moe_layers[0]
    raw = with_copies(n, 4, spec.moe_layers, copies=3, seed=2)
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(raw))
    placement = Placement.from_file(path, n, spec.moe_layers)
    assert placement.has_copies and placement.redundant_slots(layer) == 3 and placement.redundant_slots(None) == 0
    assert Placement.from_device_lists(**{k: v for k, v in placement.to_dict().items()}, n_experts=n) == placement

    def fails(layers: dict, match: str, moe_layers=spec.moe_layers) -> None:
        with pytest.raises(PlacementError, match=match):
            Placement.from_device_lists(raw["devices"], n, layers, moe_layers)

    good = raw["layers"][layer]
    fails({layer: [good[0] + [good[0][0]], *good[1:]]}, rf"layer {layer}, group 0: expert {good[0][0]} is listed twice")
    fails({layer: [good[0][1:], *good[1:]]}, rf"layer {layer}: experts \[{good[0][0]}\] are on no group")
    fails({layer: [[], *good[1:]]}, rf"layer {layer}: group 0 hosts no experts")
    fails({layer: [*good[:3], good[3] + [n]]}, rf"layer {layer}, group 3: expert id {n} is outside")
    fails({layer: good[:3]}, rf"layer {layer}: expected 4 expert-id lists")
    fails({0: good}, r"layers: layer 0 is not an MoE layer")
    path.write_text(json.dumps({**raw, "copies": {}}))
    with pytest.raises(PlacementError, match=r"unknown keys \['copies'\]"):
        Placement.from_file(path, n, spec.moe_layers)


@pytest.fixture(scope="module")
def single_group(model_dirs):
    made = {p: Engine.from_pretrained(model_dirs[p]) for p in ("tiny-v2-group", "tiny-v3", "tiny-v3-plain")}
    yield made
    for e in made.values():
        e.close()


@torch.inference_mode()
@pytest.mark.parametrize("preset, backend", [("tiny-v2-group", "local"), ("tiny-v3", "local"),
                                             ("tiny-v3-plain", "local"), ("tiny-v2-group", "ray"),
                                             ("tiny-v3", "grpc")])
def test_a_placement_with_copies_gives_the_same_logits_and_tokens(preset, backend, model_dirs, single_group, tmp_path,
                                                                 request):
    if backend != "local":
        request.getfixturevalue("ray_cluster")
    ref = single_group[preset]
    spec = ref.spec
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(with_copies(spec.n_routed_experts, 4, spec.moe_layers, copies=8, seed=11)))
    prompts = random_prompts(spec.vocab_size, [9, 4, 15], seed=4)
    with Engine.from_pretrained(model_dirs[preset], backend=backend, devices=4, placement=str(path)) as engine:
        assert engine.backend.placement.has_copies
        for ours, want in zip(engine.logits(prompts), ref.logits(prompts), strict=True):
            assert (ours - want).abs().max().item() < 1e-5
        assert engine.generate(prompts, 10, stop_at_eos=False) == ref.generate(prompts, 10, stop_at_eos=False)
        if backend != "local":  # each actor loaded its own layer layouts
            infos = [engine.backend.pool.live(d)[0] for d in range(4)]
            import ray

            described = ray.get([r.actor.describe.remote() for r in infos])
            for d, info in enumerate(described):
                for layer in spec.moe_layers:
                    assert info["layer_experts"][layer] == engine.backend.placement.experts_on(d, layer)


@torch.inference_mode()
def test_top_m_with_copies_keeps_each_token_on_its_devices_end_to_end(model_dirs, tmp_path):
    spec = ModelSpec.from_dir(model_dirs["tiny-v3"])
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(with_copies(spec.n_routed_experts, 4, spec.moe_layers, copies=8, seed=12)))
    with Engine.from_pretrained(model_dirs["tiny-v3"], devices=4, placement=str(path), top_m_devices=2) as engine:
        seen = []
        original = engine.backend.dispatch

        def spy(layer, hidden, ids, weights, token_devices=None):
            pending = original(layer, hidden, ids, weights, token_devices)
            seen.append((pending.batches, token_devices))
            return pending

        engine.backend.dispatch = spy
        engine.generate(random_prompts(spec.vocab_size, [7, 12], seed=1), 6, stop_at_eos=False)
        assert seen
        for batches, token_devices in seen:
            assert token_devices is not None
            for b in batches:
                assert bool((token_devices[b.rows] == b.device).any(dim=1).all())  # only to its chosen devices


@torch.inference_mode()
def test_a_plan_from_served_traffic_keeps_the_tokens_and_predicts_better_balance(model_dirs, single_group, tmp_path):
    from router_service.eplb import plan_placement

    path = model_dirs["tiny-v3"]
    ref = single_group["tiny-v3"]
    spec = ref.spec
    prompts = random_prompts(spec.vocab_size, [30, 22, 17], seed=8)
    with Engine.from_pretrained(path, devices=4) as engine:
        want = engine.generate(prompts, 8, stop_at_eos=False)
        summary = engine.routing_summary.tokens_per_expert
        loads = torch.stack([summary[layer].cpu().double() for layer in spec.moe_layers])  # [L, E]
        current = engine.backend.placement
    plan = plan_placement(loads, 4, 4, current=current, moe_layers=spec.moe_layers)
    assert plan.worst_predicted <= plan.worst_current
    placement = plan.to_placement(spec.moe_layers, base=current, version=1)
    assert all(placement.redundant_slots(layer) == 4 for layer in spec.moe_layers)
    file = tmp_path / "planned.json"
    file.write_text(placement.to_json())
    with Engine.from_pretrained(path, devices=4, placement=str(file)) as engine:
        assert engine.backend.placement == placement and engine.backend.placement.version == 1
        assert engine.generate(prompts, 8, stop_at_eos=False) == want == ref.generate(prompts, 8, stop_at_eos=False)
