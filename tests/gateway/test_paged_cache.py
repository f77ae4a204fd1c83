"""The paged latent cache: only c_kv and k_pe per token, blocks reserved and freed, prefix caching over full blocks,
and the attention that reads it (paged, chunked and batched) equal to scoring without a cache."""

from __future__ import annotations

import pytest
import torch

from gateway import Engine
from gateway.config import CacheConfig
from gateway.model.kv_cache import CacheFull, PagedLatentCache
from gateway.model.step import StepBatch
from model_core.checkpoint import is_routed_expert_tensor
from model_core.layout import gateway_layout
from tests.conftest import TINY_PRESETS, random_prompts


def pool(blocks: int = 8, block_size: int = 4, prefix_caching: bool = True) -> PagedLatentCache:
    return PagedLatentCache(2, 3, 2, torch.float32, n_blocks=blocks, block_size=block_size,
                            prefix_caching=prefix_caching)


def fill(cache: PagedLatentCache, seq: int, tokens: list[int]) -> None:
    """Allocate a sequence and mark its tokens written (what a forward step does), registering full blocks."""
    cached = cache.allocate(seq, len(tokens), tokens)
    cache.advance(seq, len(tokens) - cached, tokens[cached:])


@torch.inference_mode()
def test_the_pool_holds_kv_lora_rank_plus_rope_dim_values_per_token_per_layer(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:
        spec, model = engine.spec, engine.model
        cache = model.new_cache(max_tokens=64, block_size=4)
        assert cache.pool.shape == (spec.num_hidden_layers, 16, 4, spec.kv_lora_rank + spec.qk_rope_head_dim)
        cache.allocate(7, 13)
        model.forward(torch.tensor(random_prompts(spec.vocab_size, [13], 0)[0]), StepBatch([7], [0], [13]), cache)
        assert cache.values_per_token_per_layer == 32 + 8 and cache.length(7) == 13
        assert cache.nbytes(7) == spec.num_hidden_layers * 13 * 40 * 4
        table = cache.table(7)
        assert len(table) == 4  # ceil(13 / 4)
        written = cache.pool[:, table].flatten(1, 2)[:, :13]  # [layers, 13, w] in position order
        assert written.isfinite().all() and (written != 0).any(dim=-1).all()  # every position was written
        others = [b for b in range(16) if b not in table]
        assert (cache.pool[:, others] == 0).all()  # nothing else was touched


def test_blocks_are_reserved_on_demand_and_a_short_pool_changes_nothing():
    cache = pool(blocks=5)
    cache.allocate(1, 6)  # 2 blocks
    cache.allocate(2, 4)  # 1 block
    assert cache.free_blocks == 2 and cache.can_reserve(1, 16) and not cache.can_reserve(1, 17)
    with pytest.raises(CacheFull, match="needs 3 more blocks for 17 tokens, 2 of 5 are free"):
        cache.reserve(1, 17)
    assert len(cache.table(1)) == 2 and cache.free_blocks == 2
    with pytest.raises(CacheFull, match="needs 3 free blocks, 2 are free"):
        cache.allocate(3, 9)
    assert 3 not in cache and cache.free_blocks == 2
    cache.reserve(1, 12)
    assert len(cache.table(1)) == 3 and cache.free_blocks == 1
    cache.allocate(5, 4)  # the last free block
    tail = cache.table(1)[-1]
    cache.free(1)
    cache.free(2)
    cache.free(5)
    cache.free(99)  # unknown: a no-op
    assert cache.is_empty()
    cache.allocate(4, 1)
    assert cache.table(4) == [tail]  # a freed sequence's tail block is handed out before its prefix blocks


def test_a_repeated_prefix_attaches_the_full_blocks_but_never_the_last_token():
    cache = pool(blocks=12)
    system = [5, 6, 7, 8, 9, 10, 11, 12]  # two full blocks
    fill(cache, 1, system + [20, 21, 22])
    assert cache.cached_prefix(system + [30, 31]) == 8
    assert cache.allocate(2, 10, system + [30, 31]) == 8
    assert cache.table(2)[:2] == cache.table(1)[:2] and cache.length(2) == 8
    assert cache.cached_prefix(system) == 4  # the block holding the last token is computed, for its logits
    assert cache.cached_prefix([5, 6, 7, 99] + system[4:] + [1]) == 0  # the chain starts at the first block
    assert cache.cached_prefix([9, 9, 9, 9] + system[4:] + [1]) == 0  # same second block, other prefix: no hit
    cache.free(1)
    assert cache.free_blocks == 12 - 3  # the two shared blocks and its own third stay with sequence 2
    cache.free(2)
    assert cache.is_empty() and cache.cached_prefix(system + [1]) == 8  # freed, still registered
    stats = cache.stats()
    assert stats["prefix_hit_tokens"] == 8 and stats["prefix_queried_tokens"] == 21


def test_a_registered_block_handed_out_again_stops_answering_lookups():
    cache = pool(blocks=3)
    fill(cache, 1, list(range(3, 11)) + [1])  # blocks: 2 full + 1
    cache.free(1)
    assert cache.cached_prefix(list(range(3, 11)) + [2]) == 8
    cache.allocate(2, 12)  # takes every block: their old content is gone
    assert cache.cached_prefix(list(range(3, 11)) + [2]) == 0


def test_without_prefix_caching_nothing_is_shared():
    cache = pool(prefix_caching=False)
    fill(cache, 1, list(range(3, 12)))
    assert cache.cached_prefix(list(range(3, 12))) == 0 and cache.allocate(2, 9, list(range(3, 12))) == 0


@pytest.mark.parametrize(("field", "value", "message"), [
    ("block_size", 0, "cache.block_size=0: expected an integer >= 1"),
    ("max_tokens", 2.5, "cache.max_tokens=2.5: expected an integer >= 1"),
    ("memory_fraction", 1.5, r"cache.memory_fraction=1.5: expected a number in \(0, 0.95\]"),
    ("prefix_caching", "yes", "cache.prefix_caching='yes': expected true or false"),
])
def test_cache_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**{field: value})


def test_the_pool_is_sized_by_max_tokens_or_a_share_of_free_memory_capped_at_what_can_be_used():
    assert CacheConfig(max_tokens=1000).pool_tokens(100, torch.device("cpu"), 50) == 1000
    share = CacheConfig(memory_fraction=0.5).pool_tokens(1 << 20, torch.device("cpu"), 1 << 40)
    assert 0 < share < (1 << 40)  # half the free host memory, in 1 MiB tokens
    assert CacheConfig().pool_tokens(100, torch.device("cpu"), 300) == 300


@torch.inference_mode()
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_paged_chunked_and_batched_decode_logits_equal_scoring_without_a_cache(preset, model_dirs):
    """Three sequences share steps: chunked prefills (5, 4 and 3 tokens a step), then batched decode, over blocks
    of 4 that interleave in the pool. Every row's logits equal one unpaged, unchunked forward of the whole
    sequence (<= 1e-5 relative)."""
    with Engine.from_pretrained(model_dirs[preset]) as engine:
        model = engine.model
        seqs = random_prompts(engine.spec.vocab_size, [23, 9, 14], seed=5)
        expected = engine.logits(seqs)  # no cache, one forward
        cache = model.new_cache(max_tokens=64, block_size=4)
        prefill_to, chunk = [10, 4, 6], [5, 4, 3]
        done = [0, 0, 0]
        for i in range(3):
            cache.allocate(i, 1)
        worst, decoded = 0.0, 0
        while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
            live = [i for i in range(3) if done[i] < len(seqs[i])]
            lengths = [min(chunk[i], prefill_to[i] - done[i]) if done[i] < prefill_to[i] else 1 for i in live]
            for i, n in zip(live, lengths, strict=True):
                cache.reserve(i, done[i] + n)
            step = StepBatch(live, [done[i] for i in live], lengths)
            tokens = torch.tensor([t for i, n in zip(live, lengths, strict=True) for t in seqs[i][done[i]:done[i] + n]])
            hidden, _ = model.forward(tokens, step, cache)
            logits = model.logits(hidden)
            for i, n, off in zip(live, lengths, step.offsets, strict=True):
                ref = expected[i][done[i]:done[i] + n]
                worst = max(worst, ((logits[off:off + n] - ref).abs().max() / ref.abs().max()).item())
                done[i] += n
            decoded += sum(n == 1 for n in lengths) > 1
        assert decoded > 0  # some steps decoded several sequences together
        assert sorted(b for i in range(3) for b in cache.table(i)) == list(range(len(sum(
            [cache.table(i) for i in range(3)], []))))  # no block is shared or lost
        assert worst <= 1e-5


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
