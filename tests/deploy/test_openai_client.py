"""The official `openai` client (sync, async, streaming) against the real server on a local Ray Serve: every
completions parameter, greedy outputs equal to Engine.generate, logprobs from the model's logits, errors in
OpenAI's shape."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from gateway import Engine
from model_core.tokenizer import ByteTokenizer
from tests.conftest import random_prompts
from tests.deploy.test_serve import free_port

openai = pytest.importorskip("openai")

MODEL = "tiny-v3"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(model_dirs, ray_cluster):
    from ray import serve

    from deploy.serve_app import build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployment = {"model": str(model_dirs[MODEL]), "backend": "local", "scheduler": {"max_batch_tokens": 256}}
    serve.run(build({"deployment": deployment}), name="expertmesh-openai", route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()


@pytest.fixture(scope="module")
def engine(model_dirs):
    with Engine.from_pretrained(model_dirs[MODEL]) as e:
        yield e


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


TOK = ByteTokenizer.default()


def greedy(engine, prompt: list[int], n: int, **kw) -> list[int]:
    return engine.generate([prompt], max_new_tokens=n, temperature=0.0, **kw)[0]


def test_model_listing_and_plain_completions_of_every_prompt_form_equal_generate(client, engine):
    assert [m.id for m in client.models.list().data] == [MODEL]
    ids = random_prompts(272, [5, 8], seed=30)
    texts = ["Hello, experts!", "MoE"]
    want_ids = [greedy(engine, p, 6) for p in ids]
    want_texts = [greedy(engine, TOK.encode(t), 6) for t in texts]
    for prompt, want in ((ids[0], want_ids[:1]), (ids, want_ids), (texts[0], want_texts[:1]), (texts, want_texts)):
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        assert [c.index for c in answer.choices] == list(range(len(want)))
        assert [c.model_extra["token_ids"] for c in answer.choices] == want
        assert [c.text for c in answer.choices] == [TOK.decode(w) for w in want]
        assert answer.usage.completion_tokens == sum(len(w) for w in want)


def test_n_gives_n_choices_per_prompt_in_order(client, engine):
    prompts = random_prompts(272, [4, 6], seed=31)
    answer = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=3)
    assert [c.index for c in answer.choices] == list(range(6))
    for c in answer.choices:  # greedy: every choice of a prompt is its greedy continuation
        assert c.model_extra["token_ids"] == greedy(engine, prompts[c.index // 3], 4)
    assert answer.usage.prompt_tokens == 10  # each prompt counted once
    sampled = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=1.0, n=4, seed=5)
    assert len({tuple(c.model_extra["token_ids"]) for c in sampled.choices}) > 1  # seeds seed + index differ


def test_stop_strings_end_the_text_before_them(client, engine):
    prompt = "Hello, experts!"
    full = TOK.decode(greedy(engine, TOK.encode(prompt), 24, stop_at_eos=False))
    start = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stop = full[start : start + 2]
    cut = full.find(stop)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                       stop=[stop, "never appears \u2603"])
    choice = answer.choices[0]
    assert choice.text == full[:cut] and choice.finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                     stop="\u2603").choices[0].finish_reason == "length"


def test_logprobs_are_the_models_and_echo_returns_the_prompt(client, engine):
    prompt = random_prompts(272, [6], seed=32)[0]
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    choice = answer.choices[0]
    tokens = choice.model_extra["token_ids"]
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(tokens) == 4
    for i, token in enumerate(tokens):
        ref = engine.logits([prompt + tokens[:i]])[0][-1].log_softmax(-1)
        assert math.isclose(lp.token_logprobs[i], ref[token].item(), abs_tol=1e-4)
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert len(top) == 3 and torch.allclose(torch.tensor(top), ref.topk(3).values, atol=1e-4)
        assert math.isclose(top[0], lp.token_logprobs[i], abs_tol=1e-6)  # greedy took the most likely token
    assert lp.tokens == [TOK.decode([t]) for t in tokens]

    echoed = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0, echo=True,
                                       logprobs=1).choices[0]
    assert echoed.text.startswith("Hi") and echoed.text == "Hi" + TOK.decode(echoed.model_extra["token_ids"])
    prompt_ids = TOK.encode("Hi")
    assert echoed.logprobs.token_logprobs[0] is None and len(echoed.logprobs.tokens) == len(prompt_ids) + 3
    ref = engine.logits([prompt_ids])[0].log_softmax(-1)
    assert math.isclose(echoed.logprobs.token_logprobs[1], ref[0, prompt_ids[1]].item(), abs_tol=1e-4)
    assert echoed.logprobs.text_offset[len(prompt_ids)] == len("Hi")  # generated text starts after the prompt


def reference_with_penalties(engine, prompt, n, presence=0.0, frequency=0.0, repetition=1.0) -> list[int]:
    """Greedy decoding with the penalties written out (OpenAI's presence/frequency, vLLM's repetition)."""
    out: list[int] = []
    for _ in range(n):
        logits = engine.logits([prompt + out])[0][-1].clone()
        seen = sorted(set(prompt + out))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / repetition, logits[seen] * repetition)
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        out.append(int(logits.argmax()))
    return out


def test_penalties_change_greedy_decoding_as_their_formulas_say(client, engine):
    prompt = random_prompts(272, [5], seed=33)[0]
    for kw, extra in (({"frequency_penalty": 1.5}, {}), ({"presence_penalty": 2.0}, {}),
                      ({}, {"repetition_penalty": 1.8})):
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                           extra_body=extra, **kw)
        want = reference_with_penalties(engine, prompt, 10, kw.get("presence_penalty", 0.0),
                                        kw.get("frequency_penalty", 0.0), extra.get("repetition_penalty", 1.0))
        got = answer.choices[0].model_extra["token_ids"]
        assert got == want[: len(got)] and (len(got) == 10 or got[-1] == 1)  # eos may end it early


def test_streaming_with_include_usage_and_the_async_client(url, client, engine):
    prompts = random_prompts(272, [5, 7], seed=34)
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    tokens: dict[int, list[int]] = {0: [], 1: []}
    for c in chunks[:-1]:
        for choice in c.choices:
            tokens[choice.index] += choice.model_extra["token_ids"]
    assert [tokens[0], tokens[1]] == [greedy(engine, p, 5) for p in prompts]
    assert chunks[-1].usage.completion_tokens == len(tokens[0]) + len(tokens[1])
    plain = list(client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=2, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)  # usage only when asked for

    async def run():
        aclient = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        answers = await asyncio.gather(*(aclient.completions.create(model=MODEL, prompt=p, max_tokens=5,
                                                                    temperature=0) for p in prompts))
        stream = await aclient.completions.create(model=MODEL, prompt=prompts[1], max_tokens=5, temperature=0,
                                                  stream=True)
        streamed = [t async for c in stream for ch in c.choices for t in ch.model_extra["token_ids"]]
        await aclient.close()
        return [a.choices[0].model_extra["token_ids"] for a in answers], streamed

    plain_tokens, streamed = asyncio.run(run())
    assert plain_tokens == [greedy(engine, p, 5) for p in prompts] and streamed == plain_tokens[1]


@pytest.mark.parametrize("kw, field", [
    ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"), ({"logit_bias": {"5": 1000.0}}, "logit_bias"),
    ({"logprobs": 50}, "logprobs"), ({"n": 0}, "n"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
])
def test_refused_parameters_are_named_in_openais_error_shape(client, kw, field):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[3, 4], max_tokens=2, **kw)
    assert caught.value.status_code == 400 and field in caught.value.body["message"]
    assert caught.value.body["type"] == "invalid_request_error"
    assert client.completions.create(model=MODEL, prompt=[3, 4], max_tokens=1).choices  # still serving


def chat_prompt(messages: list[dict]) -> list[int]:
    """The prompt ids make-model's chat template gives a conversation (checked against transformers elsewhere)."""
    from model_core.chat_template import DEFAULT_TEMPLATE, ChatTemplate

    return TOK.encode(ChatTemplate(DEFAULT_TEMPLATE, "<|bos|>", "<|eos|>").render(messages), add_bos=False)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which expert?"}]


def test_chat_completions_plain_streaming_and_async_equal_generate(url, client, engine):
    want = greedy(engine, chat_prompt(CONVERSATION), 6)
    answer = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=6, temperature=0)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == TOK.decode(want) and choice.model_extra["token_ids"] == want
    assert answer.usage.prompt_tokens == len(chat_prompt(CONVERSATION))
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             CONVERSATION[1]]
    same = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=6, temperature=0)
    assert same.choices[0].message.content == choice.message.content  # content parts join into one text

    chunks = list(client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TOK.decode(want)
    assert chunks[-2].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        got = await aclient.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=6, temperature=0)
        await aclient.close()
        return got.choices[0].message.content

    assert asyncio.run(run()) == TOK.decode(want)


def test_chat_n_stop_logprobs_and_penalties(client, engine):
    prompt = chat_prompt(CONVERSATION)
    full = TOK.decode(greedy(engine, prompt, 20, stop_at_eos=False))
    start = next(i for i in range(1, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stop = full[start : start + 2]
    answer = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=20, temperature=0, n=2,
                                            stop=stop, logprobs=True, top_logprobs=2)
    assert [c.index for c in answer.choices] == [0, 1]
    for c in answer.choices:
        assert c.message.content == full[: full.find(stop)] and c.finish_reason == "stop"
        tokens = c.model_extra["token_ids"]
        assert len(c.logprobs.content) == len(tokens)
        first = c.logprobs.content[0]
        ref = engine.logits([prompt])[0][-1].log_softmax(-1)
        assert math.isclose(first.logprob, ref[tokens[0]].item(), abs_tol=1e-4) and len(first.top_logprobs) == 2
        assert first.bytes == list(first.token.encode("utf-8"))
    penalised = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=8, temperature=0,
                                               frequency_penalty=1.5)
    want = reference_with_penalties(engine, prompt, 8, frequency=1.5)
    got = penalised.choices[0].model_extra["token_ids"]
    assert got == want[: len(got)]


@pytest.mark.parametrize("kw, field", [
    ({"tools": [{"type": "function", "function": {"name": "f f"}}]}, "tools.0.function.name"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": []}, "messages"),
])
def test_chat_refusals_name_the_field(client, kw, field):
    body = {"model": MODEL, "messages": CONVERSATION, "max_tokens": 2, **kw}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    assert field in caught.value.body["message"]
