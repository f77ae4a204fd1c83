"""The gateway + local experts compute exactly what transformers computes on the same checkpoint (float32)."""

from __future__ import annotations

import pytest
import torch

from gateway import Engine
from gateway.model.step import StepBatch
from tests.conftest import TINY_PRESETS, random_prompts

pytestmark = pytest.mark.parametrize("preset", TINY_PRESETS)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def engines(model_dirs):
    made = {name: Engine.from_pretrained(path) for name, path in model_dirs.items()}
    yield made
    for e in made.values():
        e.close()


@torch.inference_mode()
def test_ragged_batch_prefill_logits_match_transformers(preset, model_dirs, engines, hf_reference):
    engine, ref = engines[preset], hf_reference(model_dirs[preset])
    prompts = random_prompts(engine.spec.vocab_size, [9, 3, 17], seed=1)
    ours = engine.logits(prompts)
    for prompt, logits in zip(prompts, ours, strict=True):
        expected = ref(torch.tensor([prompt])).logits[0]
        assert logits.shape == expected.shape
        assert rel_err(logits, expected) < 1e-4


@torch.inference_mode()
def test_step_by_step_decode_through_latent_cache_matches_transformers(preset, model_dirs, engines, hf_reference):
    engine, ref = engines[preset], hf_reference(model_dirs[preset])
    seq = random_prompts(engine.spec.vocab_size, [20], seed=2)[0]
    expected = ref(torch.tensor([seq])).logits[0]  # [20, V]
    model = engine.model
    cache = model.new_cache()
    cache.allocate(0, len(seq))
    hidden, _ = model.forward(torch.tensor(seq[:5]), StepBatch([0], [0], [5]), cache)
    assert rel_err(model.logits(hidden), expected[:5]) < 1e-4
    for pos in range(5, len(seq)):  # one token at a time: the absorbed (latent-space) decode path
        hidden, _ = model.forward(torch.tensor([seq[pos]]), StepBatch([0], [pos], [1]), cache)
        assert rel_err(model.logits(hidden)[0], expected[pos]) < 1e-4, f"position {pos}"
    assert cache.length(0) == len(seq)


@torch.inference_mode()
def test_32_greedy_tokens_identical_to_transformers(preset, model_dirs, engines, hf_reference):
    engine, ref = engines[preset], hf_reference(model_dirs[preset])
    prompts = random_prompts(engine.spec.vocab_size, [6, 11, 4], seed=3)
    ours = engine.generate(prompts, max_new_tokens=32, temperature=0.0, stop_at_eos=False)
    for prompt, tokens in zip(prompts, ours, strict=True):
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert tokens == out[0, len(prompt) :].tolist()
