"""The engine core over the paged cache: chunked prefill, preemption, prefix caching and admission limits never
change a token; the Triton decode kernel (interpreted here) gives the torch path's tokens."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway import Engine
from gateway.config import CacheConfig, DeploymentConfig, SchedulerConfig
from gateway.serving.completions import CompletionRequest, completions
from gateway.serving.engine_loop import EngineLoop
from gateway.serving.http_api import GatewayState, prometheus_text
from tests.conftest import random_prompts

PRESET = "tiny-v3"


def config(model_dirs, preset: str = PRESET, **fields) -> DeploymentConfig:
    return DeploymentConfig(model=str(model_dirs[preset]), **fields)


@pytest.fixture(scope="module")
def reference(model_dirs):
    """Greedy tokens of the default engine (whole prompts in one step, a pool far larger than the load)."""
    prompts = random_prompts(272, [21, 7, 30, 12, 17, 9], seed=11)
    with Engine.from_config(config(model_dirs)) as engine:
        return prompts, engine.generate(prompts, max_new_tokens=14, stop_at_eos=False)


def test_chunked_prefill_and_a_pool_too_small_for_the_load_preempt_and_give_the_same_tokens(model_dirs, reference):
    prompts, expected = reference
    # 12 blocks of 4 = 48 tokens; the six requests need up to 44 each and 216 together: preemption must happen
    small = config(model_dirs, cache=CacheConfig(block_size=4, max_tokens=48),
                   scheduler=SchedulerConfig(max_prefill_tokens=5))
    with Engine.from_config(small) as engine:
        requests = [engine.submit(p, max_new_tokens=14, stop_at_eos=False) for p in prompts]
        chunked = 0
        while engine.has_work():
            engine.step()
            chunked += any(0 < r.computed < len(r.prompt) for r in engine.scheduler.running)
        assert [r.output for r in requests] == expected
        assert engine.scheduler.preemptions > 0 and chunked > 0
        assert all(r.finish_reason == "length" for r in requests) and engine.cache.is_empty()


def test_a_repeated_prompt_takes_its_prefix_from_the_cache_and_gives_the_same_tokens(model_dirs):
    system = random_prompts(272, [40], seed=12)[0]
    prompts = [system + tail for tail in random_prompts(272, [3, 5], seed=13)]
    with Engine.from_config(config(model_dirs, cache=CacheConfig(block_size=8))) as engine:
        first = engine.generate(prompts[:1], max_new_tokens=8, stop_at_eos=False)
        assert engine.cache.stats()["prefix_hit_tokens"] == 0
        again = engine.generate(prompts, max_new_tokens=8, stop_at_eos=False)
        hits = engine.cache.stats()["prefix_hit_tokens"]
        assert hits == 40 + 40  # both reuse the five full blocks of the shared 40-token prefix
        trace = engine.routing_trace(engine.last_request_ids[1])
        assert (trace.ids[:40] == -1).all() and (trace.ids[40:] >= 0).all()  # cached positions were not routed
        assert trace.tokens == prompts[1] + again[1][:-1]
        loop = EngineLoop(engine)
        try:
            text = prometheus_text(loop)
        finally:
            loop.stop()
        queried = 43 + 43 + 45
        assert 'expertmesh_prefix_cache_tokens_total{result="hit"} 80' in text
        assert f'expertmesh_prefix_cache_tokens_total{{result="queried"}} {queried}' in text
        assert 'expertmesh_cache_blocks{state="used"} 0' in text and "expertmesh_preemptions_total 0" in text
        loop = EngineLoop(engine)
        try:  # the HTTP usage reports the hit in OpenAI's prompt-caching field
            state = GatewayState(loop, PRESET)
            answer = asyncio.run(completions(state, CompletionRequest(prompt=prompts[0], max_tokens=2)))
        finally:
            loop.stop()
        assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 40}
    with Engine.from_config(config(model_dirs, cache=CacheConfig(prefix_caching=False))) as plain:
        assert plain.generate(prompts, max_new_tokens=8, stop_at_eos=False) == again
        assert again[0] == first[0]


def test_a_request_that_could_never_fit_the_pool_is_refused_at_admission_with_a_400(model_dirs):
    cfg = config(model_dirs, cache=CacheConfig(block_size=4, max_tokens=32))
    with Engine.from_config(cfg) as engine:
        with pytest.raises(ValueError, match=r"prompt: 30 tokens \+ max_new_tokens=8 can never fit the latent cache "
                                             r"\(32 tokens: cache.max_tokens"):
            engine.submit(list(range(3, 33)), max_new_tokens=8)
        assert not engine.has_work()
        loop = EngineLoop(engine)
        try:
            state = GatewayState(loop, PRESET)
            refused = asyncio.run(completions(state, CompletionRequest(prompt=list(range(3, 33)), max_tokens=8)))
            assert refused.status_code == 400 and "can never fit" in json.loads(refused.body)["error"]["message"]
            # greedy: this prompt's first 4 tokens hold no EOS
            fits = asyncio.run(completions(state, CompletionRequest(prompt=list(range(3, 13)), max_tokens=4,
                                                                    temperature=0)))
            assert fits["usage"]["completion_tokens"] == 4  # the engine serves on after the refusal
        finally:
            loop.stop()


def test_the_triton_decode_kernel_gives_the_torch_paths_tokens(model_dirs, reference):
    """attention_kernel=triton runs the paged-MLA decode kernel (in Triton's interpreter here, on GPUs natively)."""
    prompts, expected = reference
    with Engine.from_config(config(model_dirs, attention_kernel="triton")) as engine:
        assert all(layer.attention.use_kernel for layer in engine.model.layers)
        assert engine.generate(prompts[:3], max_new_tokens=6, stop_at_eos=False) == [e[:6] for e in expected[:3]]


def test_cache_and_attention_kernel_settings_come_from_the_deployment_file(model_dirs):
    cfg = DeploymentConfig.from_dict({"model": str(model_dirs[PRESET]), "attention_kernel": "torch",
                                      "cache": {"block_size": 8, "max_tokens": 100, "prefix_caching": False},
                                      "scheduler": {"max_prefill_tokens": 64}})
    assert cfg.cache == CacheConfig(block_size=8, max_tokens=100, prefix_caching=False)
    assert cfg.scheduler.max_prefill_tokens == 64
    with Engine.from_config(cfg) as engine:
        assert engine.cache.n_blocks == 13 and engine.cache.block_size == 8  # 100 tokens rounded up to blocks
    with pytest.raises(ValueError, match="attention_kernel='cuda': expected one of"):
        DeploymentConfig(model="m", attention_kernel="cuda")
    with pytest.raises(ValueError, match="cache.bogus: unknown setting"):
        DeploymentConfig.from_dict({"model": "m", "cache": {"bogus": 1}})
