"""The MLA cache holds only c_kv and k_pe; absorbed decode equals expanded attention; the gateway skips experts."""

from __future__ import annotations

import torch

from gateway import Engine
from gateway.model.kv_cache import LatentCache
from gateway.model.step import StepBatch
from model_core.checkpoint import is_routed_expert_tensor
from model_core.layout import gateway_layout
from tests.conftest import random_prompts


def test_cache_holds_kv_lora_rank_plus_rope_dim_values_per_token_per_layer(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:
        spec, model = engine.spec, engine.model
        cache = model.new_cache()
        cache.allocate(7, 13)
        model.forward(torch.tensor(random_prompts(spec.vocab_size, [13], 0)[0]), StepBatch([7], [0], [13]), cache)
        storage = cache.storage(7)
        assert storage.shape == (spec.num_hidden_layers, 13, spec.kv_lora_rank + spec.qk_rope_head_dim)
        assert cache.values_per_token_per_layer == 32 + 8
        assert cache.nbytes(7) == spec.num_hidden_layers * 13 * 40 * 4
        c_kv, k_pe = cache.read(0, 7, 13)
        assert c_kv.shape == (13, spec.kv_lora_rank) and k_pe.shape == (13, spec.qk_rope_head_dim)
        assert storage.isfinite().all()


def test_cache_grows_keeps_contents_and_frees():
    cache = LatentCache(2, 4, 2, torch.float32)
    cache.allocate(1, capacity=2)
    a = torch.randn(2, 4), torch.randn(2, 2)
    cache.write(1, 1, 0, *a)
    cache.advance(1, 2)
    cache.reserve(1, 9)
    assert cache.storage(1).shape[1] >= 9
    c, k = cache.read(1, 1, 2)
    assert torch.equal(c, a[0]) and torch.equal(k, a[1])
    cache.free(1)
    cache.allocate(1)  # the id can be reused after free


@torch.inference_mode()
def test_absorbed_and_expanded_attention_agree(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v2-group"]) as engine:
        model, vocab = engine.model, engine.spec.vocab_size
        prompt = random_prompts(vocab, [12], 4)[0]
        outs = []
        for absorb in (False, True):
            cache = model.new_cache()
            cache.allocate(0, 12)
            # absorb=True on a multi-token step exercises the latent path with a causal mask
            outs.append(model.forward(torch.tensor(prompt), StepBatch([0], [0], [12]), cache, absorb=absorb)[0])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_gateway_never_reads_routed_expert_weights(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:
        gateway_reads = engine.model.reader.loaded
        assert gateway_reads == set(gateway_layout(engine.spec))
        assert not any(is_routed_expert_tensor(n) for n in gateway_reads)
