"""Live re-placement: expert groups load a new placement beside the current one, the gateway switches between
steps, and the old weights are freed; requests keep flowing and every answer stays the model's."""

from __future__ import annotations

import pytest
import torch

from expert_workers.expert_group import ExpertGroup, ExpertRequestError
from gateway import Engine
from model_core.spec import ModelSpec
from router_service.eplb import plan_placement
from router_service.placement import Placement
from tests.conftest import Traffic, random_prompts, wait_until

PROMPTS = random_prompts(272, [14, 9, 20], seed=31)
MAX_NEW_TOKENS = 12  # what `expected_tokens` (conftest) generates for PROMPTS


def test_a_group_serves_each_call_from_the_placement_version_it_names(model_dirs):
    path = model_dirs["tiny-v3"]
    spec = ModelSpec.from_dir(path)
    layer = spec.moe_layers[0]
    group = ExpertGroup(path, [0, 1, 2, 3], spec=spec)
    read_before = set(group.reader.loaded)
    bytes_before = group.weight_bytes
    group.stage(1, [0, 1, 2, 3], {layer: [2, 3, 9]})  # layer `layer` drops 0, 1 and gains a copy of 9
    assert set(group.reader.loaded) - read_before == {n for n in group.reader.loaded if ".experts.9." in n}
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, spec.hidden_size, generator=gen)
    ids = torch.tensor([[2, 3], [9, -1], [3, 9], [2, -1], [9, 2]])
    weights = torch.rand(5, 2, generator=gen)
    both = group.run(layer, hidden[[0, 3]], ids[[0, 3]], weights[[0, 3]], version=0)  # experts both versions hold
    assert torch.equal(group.run(layer, hidden[[0, 3]], ids[[0, 3]], weights[[0, 3]], version=1).output, both.output)
    assert group.run(layer, hidden, ids, weights, version=1).tokens_per_expert.tolist() == [3, 2, 3]  # [2, 3, 9]
    not_hosted = rf"experts \[9\] are not hosted .* layer {layer}, placement version 0"
    with pytest.raises(ExpertRequestError, match=not_hosted):
        group.run(layer, hidden, ids, weights, version=0)
    assert group.weight_bytes > bytes_before
    group.release(1)
    assert group.version == 1 and group.versions == [1] and group.experts_in(layer) == [2, 3, 9]
    with pytest.raises(ExpertRequestError, match=r"placement_version=0: not loaded on this group .*loaded: \[1\]"):
        group.run(layer, hidden, ids, weights, version=0)
    assert group.run(layer, hidden, ids, weights).tokens_per_expert.tolist() == [3, 2, 3]  # None: the current version


def planned(engine: Engine, redundant: int, version: int) -> Placement:
    """A plan from the engine's own routing so far (copies of its hot experts), as the next version."""
    spec = engine.spec
    loads = torch.stack([engine.routing_summary.tokens_per_expert[layer].cpu().double() for layer in spec.moe_layers])
    current = engine.backend.placement
    plan = plan_placement(loads, current.n_devices, redundant, current=current, moe_layers=spec.moe_layers)
    return plan.to_placement(spec.moe_layers, base=current, version=version)


def moved(placement: Placement, spec: ModelSpec, version: int) -> Placement:
    """`placement` with every MoE layer's experts rotated one group on (each expert moves): a second rearrangement
    that certainly changes where experts live."""
    layers = {layer: [list(placement.experts_on((d + 1) % placement.n_devices, layer))
                      for d in range(placement.n_devices)] for layer in spec.moe_layers}
    return Placement.from_device_lists([placement.experts_on(d) for d in range(placement.n_devices)],
                                       placement.n_experts, layers, spec.moe_layers, version)


@pytest.mark.parametrize("backend", [
    "local", pytest.param("ray", marks=pytest.mark.slow), pytest.param("grpc", marks=pytest.mark.slow),
    pytest.param("ray-rdt", marks=pytest.mark.slow)])
def test_two_rearrangements_under_continuous_traffic_fail_nothing_and_change_no_answer(backend, model_dirs,
                                                                                      expected_tokens, request):
    if backend != "local":
        request.getfixturevalue("ray_cluster")
    with Engine.from_pretrained(model_dirs["tiny-v3"], backend=backend, devices=4) as engine:
        spec = engine.spec
        assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens
        with Traffic(engine, PROMPTS, MAX_NEW_TOKENS) as traffic:
            first = planned(engine, redundant=4, version=1)
            engine.apply_placement(first)
            traffic.wait_for_results(2)  # traffic on the first new placement
            engine.apply_placement(moved(first, spec, version=2))
            traffic.wait_for_results(len(traffic.results) + 2)
        assert traffic.failures == []
        assert traffic.results and all(r == expected_tokens for r in traffic.results)
        backend_ = engine.backend
        assert backend_.placement.version == 2 and backend_.placements_switched == 2
        if backend == "local":
            groups = backend_.transport.groups
            assert all(g.versions == [2] for g in groups)
            assert [g.experts_in(spec.moe_layers[0]) for g in groups] == list(map(list, backend_.placement.layout(
                spec.moe_layers[0])))
        else:
            import ray

            infos = ray.get([r.actor.describe.remote() for d in range(4) for r in backend_.pool.live(d)])
            assert all(i["versions"] == [2] for i in infos)
            for d, info in enumerate(infos):
                for layer in spec.moe_layers:
                    assert info["layer_experts"][layer] == backend_.placement.experts_on(d, layer)


@pytest.mark.slow
def test_replicas_started_or_restarted_after_a_rearrangement_serve_the_current_placement(model_dirs, ray_cluster,
                                                                                       expected_tokens):
    with Engine.from_pretrained(model_dirs["tiny-v3"], backend="ray", devices=2) as engine:
        spec = engine.spec
        engine.generate(PROMPTS, max_new_tokens=2, stop_at_eos=False)
        engine.apply_placement(planned(engine, redundant=2, version=1))
        pool = engine.backend.pool
        engine.scale(0, 2)  # the new replica loads version 1 from the start
        victim = pool.live(1)[0]
        ray_cluster.kill(victim.actor, no_restart=False)  # Ray restarts it with its creation-time placement (0)
        assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens
        wait_until(lambda: pool.poll() or (pool.restarts >= 1 and victim.down_since is None), 60,
                   "the pool to see the killed replica restarted and up")
        infos = ray_cluster.get([r.actor.describe.remote() for d in (0, 1) for r in pool.live(d)])
        assert [i["versions"] for i in infos] == [[1], [1], [1]]
        for info in infos:
            d = info["device"]
            assert all(info["layer_experts"][layer] == pool.placement.experts_on(d, layer) for layer in spec.moe_layers)
        assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens


def test_a_placement_that_does_not_fit_is_refused_before_anything_loads(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v3"], devices=2) as engine:
        n = engine.spec.n_routed_experts
        with pytest.raises(ValueError, match=r"placement.version=0: expected > the current 0"):
            engine.apply_placement(Placement.contiguous(n, 2))
        with pytest.raises(ValueError, match=r"placement: 4 groups for 16 experts, expected 2 for 16"):
            engine.apply_placement(Placement(Placement.contiguous(n, 4).expert_device, 4, version=1))
        assert engine.backend.placement.version == 0 and engine.backend.placements_switched == 0
