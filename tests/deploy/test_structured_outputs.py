"""Structured outputs and logit_bias through the official `openai` client against the real server (Ray Serve, a
random-weight tiny-v3): json_schema text validates on 100 of 100 seeds (sync and streaming), json_object parses,
regex / choice / grammar are honoured in every form vLLM's clients send, grammars that cannot compile are 400s naming
their field, a cut is `length`; logit_bias bans and forces tokens (greedy and sampled, completions and chat)."""

from __future__ import annotations

import json
import math
import re

import pytest

from gateway import Engine
from model_core.tokenizer import ByteTokenizer
from tests.deploy.test_openai_client import CONVERSATION, chat_prompt
from tests.deploy.test_serve import free_port

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny-v3"
pytestmark = pytest.mark.slow
TOK = ByteTokenizer.default()

# Typed properties, all required, an enum, a bounded integer; strings capped at 6 characters, since a random model
# ends a string only when it happens to sample '"' (about 1 token in 256). With no free whitespace (compact JSON,
# the server's default) and no other properties allowed, the longest valid text is about 100 bytes (six 12-byte
# \ud83d\ude00-style escapes at worst), so max_tokens=128 always lets the grammar finish: a `length` is a failure.
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "role": {"enum": ["router", "expert", "gateway"]},
                         "active": {"type": "boolean"}},
          "required": ["name", "age", "role", "active"], "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "member", "schema": SCHEMA, "strict": True}}
SEEDS = 100


@pytest.fixture(scope="module")
def url(model_dirs, ray_cluster):
    from ray import serve

    from deploy.serve_app import build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployment = {"model": str(model_dirs[MODEL]), "backend": "local",
                  "scheduler": {"max_batch_tokens": 512, "max_running": 128}}
    serve.run(build({"deployment": deployment}), name="expertmesh-structured", route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def engine(model_dirs):
    with Engine.from_pretrained(model_dirs[MODEL]) as e:
        yield e


def token(char: str) -> int:
    [tid] = TOK.encode(char, add_bos=False)
    return tid


def test_json_schema_validates_on_100_of_100_seeds_chat_sync(client):
    answer = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=128, temperature=1.0,
                                            n=SEEDS, seed=11, response_format=JSON_SCHEMA_FORMAT)
    assert len(answer.choices) == SEEDS
    texts = set()
    for c in answer.choices:
        assert c.finish_reason == "stop", (c.index, c.message.content)
        value = json.loads(c.message.content)
        jsonschema.validate(value, SCHEMA)
        assert list(value) == list(SCHEMA["properties"])  # in the schema's order
        texts.add(c.message.content)
    assert len(texts) > SEEDS // 2  # seeds seed + index sample different texts


def test_json_schema_validates_on_100_of_100_seeds_completions_streaming(client):
    stream = client.completions.create(model=MODEL, prompt="A member:", max_tokens=128, temperature=1.0, n=SEEDS,
                                       seed=1234, stream=True, extra_body={"guided_json": SCHEMA})
    texts, finish = {i: "" for i in range(SEEDS)}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert finish == {i: "stop" for i in range(SEEDS)}
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_parses_as_an_object_with_logit_bias_beside_it(client):
    # A random model rambles inside strings and nests without end; biasing '"', '}' and ']' (added before the
    # grammar's mask) ends them: 64 of 64 seeds finish within 31 tokens on this model.
    bias = {str(token('"')): 5.0, str(token("}")): 4.0, str(token("]")): 4.0}
    answer = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=160, temperature=1.0,
                                            n=16, seed=3, response_format={"type": "json_object"}, logit_bias=bias)
    for c in answer.choices:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict), c.message.content
    plain = client.completions.create(model=MODEL, prompt="{", max_tokens=160, temperature=0, logit_bias=bias,
                                      extra_body={"structured_outputs": {"json_object": True}})
    assert plain.choices[0].finish_reason == "stop" and isinstance(json.loads(plain.choices[0].text), dict)


def valid_member(text: str) -> bool:
    jsonschema.validate(json.loads(text), SCHEMA)
    return True


@pytest.mark.parametrize("extra, check", [
    ({"structured_outputs": {"json": SCHEMA}}, valid_member),
    ({"guided_json": json.dumps(SCHEMA)}, valid_member),  # the schema as JSON text
    ({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    ({"structured_outputs": {"regex": r"(ab|cd)+!"}}, lambda t: re.fullmatch(r"(ab|cd)+!", t)),
    ({"guided_choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
    ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green")),
    ({"guided_grammar": 'start: "x" NUM ("," NUM)*\nNUM: /[0-9]/'}, lambda t: re.fullmatch(r"x[0-9](,[0-9])*", t)),
    ({"structured_outputs": {"grammar": 'root ::= "id-" [0-9] [0-9]'}}, lambda t: re.fullmatch(r"id-[0-9]{2}", t)),
])
def test_regex_choice_and_grammar_are_honoured(client, extra, check):
    answer = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=128, temperature=1.0, n=8, seed=5,
                                       extra_body=extra)
    for c in answer.choices:
        assert c.finish_reason == "stop" and check(c.text), (extra, c.text)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=128, temperature=1.0,
                                                 seed=6, stream=True, extra_body=extra))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop" and check(text), (extra, text)


def test_a_cut_constrained_request_ends_with_length_not_stop(client):
    answer = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=5, temperature=0,
                                            response_format=JSON_SCHEMA_FORMAT)
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and len(choice.model_extra["token_ids"]) == 5
    assert choice.message.content == '{"nam'  # the only text the grammar allows so far
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0, stream=True,
                                            extra_body={"guided_choice": ["alpha", "beta"]}))
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("kw, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     ["response_format.json_schema.schema", "foo"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, ["response_format.json_schema.schema", "minimum"]),
    ({"response_format": {"type": "json_schema"}}, ["response_format", "json_schema"]),
    ({"extra_body": {"guided_regex": "[a-z"}}, ["guided_regex", "unclosed"]),
    ({"extra_body": {"structured_outputs": {"regex": "(x"}}}, ["structured_outputs.regex"]),
    ({"extra_body": {"guided_grammar": "start: missing_rule"}}, ["guided_grammar"]),
    ({"extra_body": {"guided_json": "{not json"}}, ["guided_json", "not valid JSON"]),
    ({"extra_body": {"guided_choice": []}}, ["guided_choice"]),
    ({"extra_body": {"guided_choice": ["a", ""]}}, ["guided_choice.1"]),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, ["guided_choice", "guided_regex"]),
    ({"extra_body": {"structured_outputs": {"structural_tag": "x"}}}, ["structural_tag"]),
    ({"logit_bias": {"5": 101}}, ["logit_bias.5", "[-100, 100]"]),
    ({"logit_bias": {"272": 1}}, ["logit_bias.272", "vocab_size=272"]),
    ({"logit_bias": {"x": 1}}, ["logit_bias.x", "token id"]),
])
def test_what_cannot_compile_or_is_out_of_range_is_a_400_naming_the_field(client, kw, words):
    body = {"model": MODEL, "messages": CONVERSATION, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    assert caught.value.status_code == 400
    for word in words:
        assert word in caught.value.body["message"], (word, caught.value.body)
    assert client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=1).choices  # still serving


def test_logit_bias_minus_100_bans_and_plus_100_forces_a_token_in_completions(client, engine):
    prompt = [5, 60, 61, 62, 9]
    greedy = engine.generate([prompt], max_new_tokens=12, stop_at_eos=False)[0]
    banned, forced = greedy[0], next(t for t in range(3, 259) if t not in greedy)
    for temperature in (0.0, 1.0):
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=temperature,
                                           n=8, seed=9, logit_bias={str(banned): -100})
        for c in answer.choices:
            assert banned not in c.model_extra["token_ids"]
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=temperature,
                                           n=4, seed=9, logit_bias={str(forced): 100})
        assert [c.model_extra["token_ids"] for c in answer.choices] == [[forced] * 12] * 4
        assert {c.finish_reason for c in answer.choices} == {"length"}


def test_logit_bias_in_chat_sync_and_streaming_and_its_exact_effect(client, engine):
    prompt = chat_prompt(CONVERSATION)
    logits = engine.logits([prompt])[0][-1]
    first, second = logits.topk(2).indices.tolist()
    gap = float(logits[first] - logits[second])
    # Greedy: a bias just under the gap keeps the argmax, one just over it hands the first token to the runner-up.
    for bias, want in ((gap * 0.9, first), (gap * 1.1, second)):
        answer = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=1, temperature=0,
                                                logit_bias={str(second): bias})
        assert answer.choices[0].model_extra["token_ids"] == [want]
    banned = first
    for temperature in (0.0, 1.0):
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=CONVERSATION, max_tokens=10, temperature=temperature, n=4, seed=2, stream=True,
            logit_bias={str(banned): -100}))
        ids = [t for c in chunks for ch in c.choices for t in ch.model_extra.get("token_ids") or []]
        assert len(ids) > 0 and banned not in ids
        forced = token("Z")
        answer = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=6,
                                                temperature=temperature, n=3, seed=2, logit_bias={str(forced): 100})
        assert [c.message.content for c in answer.choices] == ["ZZZZZZ"] * 3


def test_chat_top_logprobs_are_the_models_in_streaming_too(client, engine):
    prompt = chat_prompt(CONVERSATION)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=3, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=4))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    tokens = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
    assert len(entries) == len(tokens) == 3
    for i, entry in enumerate(entries):
        ref = engine.logits([prompt + tokens[:i]])[0][-1].log_softmax(-1)
        top = ref.topk(4)
        assert [t.token for t in entry.top_logprobs] == [TOK.decode([t]) for t in top.indices.tolist()]
        for got, want in zip(entry.top_logprobs, top.values.tolist(), strict=True):
            assert math.isclose(got.logprob, want, abs_tol=1e-4)
        assert math.isclose(entry.logprob, ref[tokens[i]].item(), abs_tol=1e-4)
