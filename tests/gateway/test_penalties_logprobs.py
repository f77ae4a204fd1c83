"""Penalties follow OpenAI's and vLLM's formulas, logprobs are the model's raw log-softmax, and the engine books
them per generated token without changing what it samples; degenerate settings are handled (a temperature below
1e-5 is greedy) or refused by name (penalties that overflow float32, non-finite numbers, seeds torch cannot take),
and a row whose distribution is still not finite samples no token instead of raising."""

from __future__ import annotations

import pytest
import torch

from gateway import Engine
from gateway.model.sampling import (
    GREEDY_BELOW,
    MIN_REPETITION,
    NOT_SAMPLED,
    Penalties,
    apply_penalties,
    sample,
    token_logprobs,
)
from gateway.serving.sampling_params import SamplingParams
from tests.conftest import random_prompts


def test_presence_frequency_and_repetition_penalties_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    prompt, output = [0, 4], [3, 3, 1]
    got = apply_penalties(logits, prompt, output, Penalties(presence=0.5, frequency=0.25, repetition=2.0))
    # repetition over prompt + output (0, 1, 3, 4): positive / 2, negative * 2; then output counts: 3 twice, 1 once
    want = torch.tensor([1.0, -2.0 - 0.25 - 0.5, 0.5, 1.5 - 0.5 - 0.5, -4.0])
    assert torch.allclose(got, want)
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0]))  # the input is not modified
    assert torch.equal(apply_penalties(logits, prompt, [], Penalties(presence=1.0, frequency=1.0)), logits)
    assert not Penalties().active and Penalties(repetition=1.1).active


@pytest.mark.parametrize("kw, field", [({"presence": 2.5}, "presence_penalty"), ({"frequency": -3}, "frequency"),
                                       ({"repetition": 0}, "repetition_penalty")])
def test_penalties_out_of_range_are_named(kw, field):
    with pytest.raises(ValueError, match=field):
        Penalties(**kw)


def test_token_logprobs_are_the_log_softmax_and_its_top_tokens():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([4, 0, 10])
    chosen, tops = token_logprobs(logits, tokens, 3)
    ref = logits.log_softmax(-1)
    assert torch.allclose(torch.tensor(chosen), ref[torch.arange(3), tokens])
    for row, top in enumerate(tops):
        assert [i for i, _ in top] == ref[row].topk(3).indices.tolist()
    assert token_logprobs(logits, tokens, 0)[1] == [[], [], []]


def test_the_engine_books_logprobs_of_what_it_samples_and_refuses_too_many(model_dirs):
    prompt = random_prompts(272, [7], seed=40)[0]
    with Engine.from_pretrained(model_dirs["tiny-v2"]) as engine:
        plain = engine.generate([prompt], max_new_tokens=5, stop_at_eos=False)[0]
        request = engine.submit(prompt, max_new_tokens=5, stop_at_eos=False, logprobs=2)
        while not request.done:
            engine.step()
        assert request.output == plain  # asking for logprobs changes nothing sampled
        assert len(request.token_logprobs) == 5
        for i, (lp, top) in enumerate(request.token_logprobs):
            ref = engine.logits([prompt + plain[:i]])[0][-1].log_softmax(-1)
            assert abs(lp - ref[plain[i]].item()) < 1e-4 and len(top) == 2 and top[0][0] == plain[i]
        with pytest.raises(ValueError, match="logprobs=21"):
            engine.submit(prompt, logprobs=21)
        penalised = engine.submit(prompt, max_new_tokens=6, stop_at_eos=False, penalties=Penalties(frequency=2.0))
        while not penalised.done:
            engine.step()
        out: list[int] = []
        for _ in range(6):  # the same decoding written out
            logits = engine.logits([prompt + out])[0][-1]
            logits = logits - 2.0 * torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0])
            out.append(int(logits.argmax()))
        assert penalised.output == out


def test_sampling_degenerate_rows_gives_no_token_instead_of_raising():
    logits = torch.tensor([[1.0, 3.0, 2.0], [float("nan"), 0.0, 1.0], [float("inf"), 0.0, 1.0],
                           [float("-inf")] * 3])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, 1.0, generator=gen).tolist()[1:] == [NOT_SAMPLED] * 3  # multinomial raised on NaN
    assert sample(logits, 0.7, top_p=0.5, generator=gen).tolist()[1:] == [NOT_SAMPLED] * 3
    assert sample(logits, 0.0).tolist()[:2] == [1, NOT_SAMPLED]  # greedy: NaN has no argmax
    huge = torch.tensor([[3e38, -3e38, 0.0]])  # finite logits whose scaling by 1 / temperature overflows
    assert sample(huge, 0.5, generator=gen).tolist() == [NOT_SAMPLED]


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_a_temperature_below_1e_5_samples_greedily(temperature):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, temperature, generator=gen).tolist() == logits.argmax(-1).tolist()
    assert 1e-6 < GREEDY_BELOW


@pytest.mark.parametrize("kw, words", [
    ({"repetition": 1e-300}, ["repetition_penalty=1e-300", "[0.01, 10]"]),
    ({"repetition": 0.009}, ["repetition_penalty"]), ({"repetition": float("nan")}, ["repetition_penalty"]),
    ({"presence": float("nan")}, ["presence_penalty"]), ({"frequency": float("inf")}, ["frequency_penalty"]),
])
def test_penalties_that_overflow_float32_or_are_not_numbers_are_refused(kw, words):
    with pytest.raises(ValueError) as caught:
        Penalties(**kw)
    assert all(w in str(caught.value) for w in words)
    assert Penalties(repetition=MIN_REPETITION).active  # the smallest accepted one samples


@pytest.mark.parametrize("kw, words", [
    ({"temperature": float("nan")}, ["temperature=nan", "finite"]),
    ({"temperature": float("inf")}, ["temperature=inf", "finite"]),
    ({"top_p": float("nan")}, ["top_p=nan"]),
    ({"seed": 2**64}, ["seed=18446744073709551616", "[-2**63, 2**64 - 1]"]),
    ({"seed": -(2**63) - 1}, ["seed", "[-2**63, 2**64 - 1]"]),
])
def test_sampling_params_refuse_non_finite_settings_and_seeds_torch_cannot_take(kw, words):
    with pytest.raises(ValueError) as caught:
        SamplingParams(**kw)
    assert all(w in str(caught.value) for w in words)


def test_seeds_at_the_ends_of_the_range_make_generators_and_choices_past_it_are_refused():
    top = SamplingParams(seed=2**64 - 1, temperature=1.0)
    for params in (top, SamplingParams(seed=-(2**63)), SamplingParams(seed=2**63 - 1).for_choice(5)):
        assert params.request("r", [1, 2], None, torch.device("cpu")).generator is not None
    with pytest.raises(ValueError, match=r"seed=18446744073709551615: choice 1 samples with seed \+ 1"):
        top.for_choice(1)
