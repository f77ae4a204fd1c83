"""Penalties follow OpenAI's and vLLM's formulas, logprobs are the model's raw log-softmax, and the engine books
them per generated token without changing what it samples."""

from __future__ import annotations

import pytest
import torch

from gateway import Engine
from gateway.model.sampling import Penalties, apply_penalties, token_logprobs
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
