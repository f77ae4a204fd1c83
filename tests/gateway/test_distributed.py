"""Ray (object store, Ray Direct Transport) and gRPC expert groups give the in-process logits and tokens."""

from __future__ import annotations

import pytest
import torch

from gateway import Engine
from gateway.model.step import StepBatch
from model_core.layout import expert_weight_names
from tests.conftest import random_prompts

pytestmark = pytest.mark.slow

CASES = [(preset, backend, d) for preset in ("tiny-v2-group", "tiny-v3") for backend in ("ray", "ray-rdt", "grpc")
         for d in (1, 2, 4)] + [(preset, "ray-dag", d) for preset in ("tiny-v2-group", "tiny-v3") for d in (2, 4)]


def decode_logits(engine: Engine, seq: list[int], prefill: int) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens, then one absorbed decode step per remaining token: [len, V]."""
    model = engine.model
    cache = model.new_cache()
    cache.allocate(0, len(seq))
    hidden, _ = model.forward(torch.tensor(seq[:prefill]), StepBatch([0], [0], [prefill]), cache)
    rows = [model.logits(hidden)]
    for pos in range(prefill, len(seq)):
        hidden, _ = model.forward(torch.tensor([seq[pos]]), StepBatch([0], [pos], [1]), cache)
        rows.append(model.logits(hidden))
    return torch.cat(rows)


@pytest.fixture(scope="module")
def local_engines(model_dirs):
    made = {p: Engine.from_pretrained(model_dirs[p]) for p in ("tiny-v2-group", "tiny-v3")}
    yield made
    for e in made.values():
        e.close()


@torch.inference_mode()
@pytest.mark.parametrize("preset, backend, devices", CASES)
def test_distributed_engine_equals_in_process_engine(preset, backend, devices, model_dirs, local_engines, ray_cluster):
    local = local_engines[preset]
    prompts = random_prompts(local.spec.vocab_size, [9, 4, 15], seed=devices)
    with Engine.from_pretrained(model_dirs[preset], backend=backend, devices=devices) as engine:
        for ours, ref in zip(engine.logits(prompts), local.logits(prompts), strict=True):
            assert (ours - ref).abs().max().item() < 1e-5
        seq = random_prompts(local.spec.vocab_size, [14], seed=5)[0]
        assert (decode_logits(engine, seq, 6) - decode_logits(local, seq, 6)).abs().max().item() < 1e-5
        tokens = engine.generate(prompts, max_new_tokens=12, stop_at_eos=False)
        assert tokens == local.generate(prompts, max_new_tokens=12, stop_at_eos=False)
        stats = engine.backend.stats
        assert stats.calls > 0 and stats.tokens.keys() == set(engine.spec.moe_layers)


@pytest.mark.parametrize("devices", [2, 4])
def test_each_actor_loads_only_its_experts(devices, model_dirs, ray_cluster):
    path = model_dirs["tiny-v3"]
    with Engine.from_pretrained(path, backend="ray", devices=devices) as engine:
        placement = engine.backend.placement
        infos = ray_cluster.get([a.describe.remote() for a in engine.backend.pool.actors()])
        per_expert = 3 * engine.spec.hidden_size * engine.spec.moe_intermediate_size * 4  # float32 gate, up, down
        for d, info in enumerate(infos):
            mine = placement.experts_on(d)
            assert info["expert_ids"] == mine
            expected = {n for layer in engine.spec.moe_layers for e in mine for n in expert_weight_names(layer, e)}
            assert set(info["loaded_tensors"]) == expected
            assert info["weight_bytes"] == per_expert * len(mine) * len(engine.spec.moe_layers)


def test_bad_deployments_are_rejected_by_field(model_dirs, tmp_path):
    path = model_dirs["tiny-v3"]
    with pytest.raises(ValueError, match="devices=0"):
        Engine.from_pretrained(path, backend="ray", devices=0)
    with pytest.raises(ValueError, match="devices=17: expected 1..n_routed_experts=16"):
        Engine.from_pretrained(path, backend="ray", devices=17)
    with pytest.raises(ValueError, match="top_m_devices=1: the 1 smallest devices hold 2 experts"):
        Engine.from_pretrained(path, backend="ray", devices=8, top_m_devices=1)
    bad = tmp_path / "placement.yaml"
    bad.write_text("devices: [[0, 1, 2], [2, 3]]\n")
    with pytest.raises(ValueError, match="expert 2 is placed twice"):
        Engine.from_pretrained(path, backend="local", devices=2, placement=str(bad))
