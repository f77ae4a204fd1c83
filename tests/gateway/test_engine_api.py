"""Engine API behaviour: sampling, stopping, batching independence and input validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gateway import Engine
from gateway.model.sampling import sample
from gateway.serving.sampling_params import SamplingParams
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def engine(model_dirs):
    e = Engine.from_pretrained(model_dirs["tiny-v3"])
    yield e
    e.close()


def test_a_sequence_generates_the_same_alone_or_in_a_ragged_batch(engine):
    prompts = random_prompts(engine.spec.vocab_size, [5, 14, 2, 9], seed=21)
    together = engine.generate(prompts, max_new_tokens=10, stop_at_eos=False)
    alone = [engine.generate([p], max_new_tokens=10, stop_at_eos=False)[0] for p in prompts]
    assert together == alone and all(len(t) == 10 for t in together)


def test_generation_stops_after_eos_and_keeps_it(engine, monkeypatch):
    prompt = random_prompts(engine.spec.vocab_size, [6], seed=5)[0]
    free = engine.generate([prompt], max_new_tokens=12, stop_at_eos=False)[0]
    # Pretend the model's eos is the 4th generated token: generation must stop right there.
    monkeypatch.setattr(engine, "spec", dataclasses.replace(engine.spec, eos_token_id=free[3]))
    stopped = engine.generate([prompt], max_new_tokens=12)[0]
    assert stopped == free[: free.index(free[3]) + 1]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(engine):
    prompt = random_prompts(engine.spec.vocab_size, [5], seed=8)
    a = engine.generate(prompt, max_new_tokens=16, temperature=1.5, seed=3, stop_at_eos=False)
    b = engine.generate(prompt, max_new_tokens=16, temperature=1.5, seed=3, stop_at_eos=False)
    greedy = engine.generate(prompt, max_new_tokens=16, stop_at_eos=False)
    assert a == b and a != greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_p=0.7, generator=gen)) for _ in range(300)}
    assert draws == {0, 1}
    assert {int(sample(logits, 1.0, top_p=0.4, generator=gen)) for _ in range(50)} == {0}
    assert int(sample(logits, 0.0)) == 0
    with pytest.raises(ValueError, match="top_p=0"):
        sample(logits, 1.0, top_p=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        sample(logits, -1)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "prompts: expected a non-empty list"),
        ([[]], {}, r"prompts\[0\]: expected a non-empty list"),
        ([[1, 2], [3, 9999]], {}, r"prompts\[1\]: token ids \[9999\] are outside \[0, vocab_size=272\)"),
        ([[1, -2]], {}, r"token ids \[-2\]"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens=0"),
        ([[1] * 500], {"max_new_tokens": 20}, "exceeds max_position_embeddings=512"),
        ([[1, 2]], {"top_p": 1.5}, "top_p=1.5"),
    ],
)
def test_bad_requests_raise_and_the_engine_keeps_serving(engine, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, **{"max_new_tokens": 4, **kwargs})
    assert len(engine.generate([[3, 4, 5]], max_new_tokens=2)[0]) >= 1


@pytest.mark.parametrize("fields, message", [
    ({"max_new_tokens": 0}, "max_new_tokens=0"), ({"max_new_tokens": True}, "max_new_tokens=True"),
    ({"temperature": -0.5}, "temperature=-0.5"), ({"top_p": 0}, "top_p=0"), ({"seed": 1.5}, "seed=1.5"),
    ({"logprobs": 21}, "logprobs=21"), ({"penalties": 0.5}, "penalties=0.5"),
])
def test_sampling_params_name_the_bad_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_sampling_params_and_keywords_sample_alike(engine):
    prompt = random_prompts(engine.spec.vocab_size, [6], seed=12)[0]
    params = SamplingParams(max_new_tokens=8, temperature=1.2, seed=5, stop_at_eos=False)
    by_keywords = engine.generate([prompt, prompt], max_new_tokens=8, temperature=1.2, seed=5, stop_at_eos=False)
    assert engine.generate([prompt, prompt], params=params) == by_keywords
    assert by_keywords[0] != by_keywords[1]  # request i samples with seed + i
    submitted = engine.submit(prompt, params, max_new_tokens=3)  # a keyword replaces that field of params
    while engine.has_work():
        engine.step()
    assert submitted.output == by_keywords[0][:3] and submitted.finish_reason == "length"
    with pytest.raises(TypeError, match="top_k: not a sampling setting"):
        engine.submit(prompt, top_k=3)


def test_from_pretrained_rejects_unknown_backend_and_dtype(model_dirs):
    with pytest.raises(ValueError, match="backend='nccl'"):
        Engine.from_pretrained(model_dirs["tiny-v2"], backend="nccl")
    with pytest.raises(ValueError, match="dtype='int4'"):
        Engine.from_pretrained(model_dirs["tiny-v2"], dtype="int4")


def test_bfloat16_engine_stays_close_to_float32(model_dirs):
    prompts = random_prompts(272, [10], seed=2)
    with (
        Engine.from_pretrained(model_dirs["tiny-v2"]) as f32,
        Engine.from_pretrained(model_dirs["tiny-v2"], dtype="bfloat16") as bf16,
    ):
        a, b = f32.logits(prompts)[0], bf16.logits(prompts)[0]
    assert b.dtype == torch.float32
    assert ((a - b).abs().max() / a.abs().max()).item() < 0.1


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_half_matmul_float32_computes_the_bfloat16_model(model_dirs, preset):
    """A bf16 model with float32 matmul weights (half_matmul) gives the native bf16 engine's logits up to summation
    order, and holds norms, embeddings and the cache in bf16."""
    prompts = random_prompts(272, [9, 5], seed=3)
    with (
        Engine.from_pretrained(model_dirs[preset], dtype="bfloat16", half_matmul="native") as native,
        Engine.from_pretrained(model_dirs[preset], dtype="bfloat16", half_matmul="float32") as widened,
        Engine.from_pretrained(model_dirs[preset]) as f32,
    ):
        model = widened.model
        assert model.matmul_dtype == torch.float32 and native.model.matmul_dtype == torch.bfloat16
        assert model.layers[0].attention.w["o_proj.weight"].dtype == torch.float32
        assert model.layers[0].input_norm.dtype == model.embed.dtype == model.dtype == torch.bfloat16
        for a, b, ref in zip(native.logits(prompts), widened.logits(prompts), f32.logits(prompts), strict=True):
            scale = ref.abs().max().item()
            assert (a - b).abs().max().item() < 0.01 * scale  # summation order, not a different function
            # bf16 itself may be far from float32 (a near-tie routed the other way), but no farther widened.
            assert (b - ref).abs().max().item() <= (a - ref).abs().max().item() + 0.01 * scale
        greedy = dict(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
        assert len(widened.generate(prompts, **greedy)[0]) == 6
