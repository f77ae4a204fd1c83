"""Tool calling through the official `openai` client against the real server (Ray Serve, a random-weight tiny-v3):
`required` and a named function give calls whose arguments validate against their tool's schema on 20 of 20 seeds,
sync and streaming, the streamed deltas reassembling to the same calls; `parallel_tool_calls: false` gives one call;
`auto` parses what the text holds (a malformed call stays content); `none` gives content only; a two-turn
conversation with tool calls and results renders as transformers renders it; bad tools are 400s naming the field;
markers that are special tokens (as in a DeepSeek checkpoint) are forced by id and parsed from the decoded text."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from gateway.serving.chat import render
from gateway.serving.chat_request import ChatRequest
from model_core.chat_template import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_MARKERS,
    TOOL_SEP,
    ChatTemplate,
)
from model_core.make_model import preset_config, write_checkpoint
from model_core.tokenizer import SPECIAL_TOKENS, ByteTokenizer
from tests.deploy.in_process_app import client_of, in_process_app
from tests.deploy.test_serve import free_port

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny-v3-tools"
pytestmark = pytest.mark.slow

# Strings capped and everything required, as in test_structured_outputs: a random model closes a string only when
# it happens to sample '"'.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "days", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 4}}, "required": ["tz"],
        "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <soon> & 'later'",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
SEEDS = 20
# After each call the grammar lets the model go on with "\n" (token 13: the grammar allows it nowhere else that the
# model chooses) or close the list; this random model goes on about 4 times in 5, so a bias keeps answers short.
FEWER_CALLS = {"13": -2.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # tiny-v3 with 2048 positions instead of 512: the generated tokenizer spends a token per byte, and the tool list
    # (about 450 tokens) and a few calls (about 150 each) do not fit in 512.
    config = {**preset_config("tiny-v3"), "max_position_embeddings": 2048}
    return write_checkpoint(tmp_path_factory.mktemp("models") / MODEL, config, seed=7)


@pytest.fixture(scope="module")
def url(model_dir, ray_cluster):  # as test_structured_outputs.py's, on the model above
    from ray import serve

    from deploy.serve_app import build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployment = {"model": str(model_dir), "backend": "local",
                  "scheduler": {"max_batch_tokens": 2048, "max_running": 64}}
    serve.run(build({"deployment": deployment}), name="expertmesh-tools", route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)


def valid_calls(calls) -> list[tuple[str, str]]:
    """(name, arguments) of each call, after checking its arguments against its tool's schema."""
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        out.append((call.function.name, call.function.arguments))
    return out


def reassembled(chunks) -> dict[int, dict]:
    """Per choice: its content, its calls [(name, arguments)] and finish_reason, from chat.completion.chunk
    events, checking OpenAI's shape (a call's first delta has id, type and name; the others only arguments)."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk.choices:
            choice = out.setdefault(c.index, {"content": "", "calls": {}, "finish": None})
            choice["content"] += c.delta.content or ""
            for entry in c.delta.tool_calls or []:
                call = choice["calls"].get(entry.index)
                if call is None:
                    assert entry.id and entry.type == "function" and entry.function.name, entry
                    call = choice["calls"][entry.index] = {"name": entry.function.name, "arguments": ""}
                else:
                    assert entry.id is None and entry.function.name is None, entry
                call["arguments"] += entry.function.arguments or ""
            if c.finish_reason is not None:
                choice["finish"] = c.finish_reason
    for choice in out.values():
        assert sorted(choice["calls"]) == list(range(len(choice["calls"])))
        choice["calls"] = [(v["name"], v["arguments"]) for _, v in sorted(choice["calls"].items())]
    return out


def sync_and_streamed(client, **kw) -> tuple[list, dict[int, dict]]:
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, **kw)
    return answer.choices, reassembled(client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                                      temperature=1.0, stream=True, **kw))


def test_required_calls_validate_on_20_seeds_and_the_stream_reassembles_to_them(client):
    choices, streamed = sync_and_streamed(client, tools=TOOLS, tool_choice="required", n=SEEDS, seed=21,
                                          max_tokens=1200, logit_bias=FEWER_CALLS)
    counts = []
    for c in choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None, (c.index, c.message)
        calls = valid_calls(c.message.tool_calls)
        assert len({call.id for call in c.message.tool_calls}) == len(calls) >= 1
        assert streamed[c.index] == {"content": "", "calls": calls, "finish": "tool_calls"}
        counts.append(len(calls))
    assert max(counts) >= 2  # the grammar allows several calls (parallel_tool_calls defaults to true)
    assert len({name for c in choices for name, _ in valid_calls(c.message.tool_calls)}) == 2


def test_a_named_function_gives_one_valid_call_of_it_sync_and_streaming(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    choices, streamed = sync_and_streamed(client, tools=TOOLS, tool_choice=named, n=SEEDS, seed=5, max_tokens=600)
    arguments = set()
    for c in choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        [(name, args)] = valid_calls(c.message.tool_calls)
        assert name == "get_weather" and streamed[c.index]["calls"] == [(name, args)]
        arguments.add(args)
    assert len(arguments) > SEEDS // 2  # seeds seed + index sample different arguments


def test_parallel_tool_calls_false_gives_exactly_one_call(client):
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, n=SEEDS, seed=21, max_tokens=600)
    for c in answer.choices:  # seed 21 as in the required test, where some choices made several calls
        assert c.finish_reason == "tool_calls" and len(valid_calls(c.message.tool_calls)) == 1


def call_text(name: str, arguments: str) -> str:
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{arguments}\n```{TOOL_CALL_END}"


def test_auto_parses_what_the_text_holds_and_none_returns_content(client):
    # A random model does not write calls by itself: guided_choice makes it write one (a structured output applies to
    # auto's text), well-formed or not.
    good = "Sure." + TOOL_CALLS_BEGIN + call_text("get_time", '{"tz":"UTC"}') + TOOL_CALLS_END
    bad = "Sure." + TOOL_CALLS_BEGIN + call_text("get_time", '{"tz":') + TOOL_CALLS_END
    for text, want in ((good, ("Sure.", [("get_time", '{"tz":"UTC"}')], "tool_calls")), (bad, (bad, [], "stop"))):
        kw = {"tools": TOOLS, "max_tokens": 300, "extra_body": {"guided_choice": [text]}}
        choices, streamed = sync_and_streamed(client, **kw)
        message = choices[0].message
        got = (message.content, [(t.function.name, t.function.arguments) for t in message.tool_calls or []])
        assert (*got, choices[0].finish_reason) == want
        assert streamed[0] == {"content": want[0], "calls": want[1], "finish": want[2]}
    for choice in ("none", "auto"):  # the random model's own text: content, no calls
        answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                                max_tokens=8, temperature=0)
        message = answer.choices[0].message
        assert isinstance(message.content, str) and len(answer.choices[0].model_extra["token_ids"]) == 8
        assert message.tool_calls is None and answer.choices[0].finish_reason == "length"


def test_a_two_turn_tool_conversation_renders_as_transformers_and_is_answered(client, model_dir):
    from transformers import PreTrainedTokenizerFast

    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, seed=3, max_tokens=600).choices[0].message
    [call] = first.tool_calls
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": "18°C, sunny"}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4, temperature=0)
    assert isinstance(second.choices[0].message.content, str) and second.choices[0].message.tool_calls is None

    theirs = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    text = theirs.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert ChatTemplate.from_dir(model_dir).render(history, tools=TOOLS) == text
    assert TOOL_CALLS_BEGIN + call_text(call.function.name, call.function.arguments) + TOOL_CALLS_END in text
    ids = theirs.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    ids = list(getattr(ids, "input_ids", ids))
    state = SimpleNamespace(chat_template=ChatTemplate.from_dir(model_dir), tokenizer=ByteTokenizer.from_dir(model_dir),
                            model_name=MODEL)  # the server's own render, on the request as it parsed it
    assert render(state, ChatRequest(messages=history, tools=TOOLS)) == ids
    assert second.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("kw, words", [
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, ["tools.0.type"]),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, ["tools.0.function.name", "a-z"]),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, ["tools.0.function.name"]),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "foo"}}}}}]}, ["tools.1.function.parameters", "foo"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}]},
     ["tools.0.function.parameters", "uniqueItems"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     ["tools.0.function.parameters", "object"]),
    ({"tools": [TOOLS[1], TOOLS[1]]}, ["tools.1.function.name", "twice"]),
    ({"tool_choice": "required"}, ["tool_choice", "only allowed with tools"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     ["tool_choice.function.name", "nope"]),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, ["tool_choice"]),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     ["tool_choice", "response_format"]),
    ({"messages": [*MESSAGES, {"role": "tool", "content": "18C"}]}, ["messages.1", "tool_call_id"]),
    ({"messages": [*MESSAGES, {"role": "assistant", "content": None}]}, ["messages.1", "content"]),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, ["messages.0", "tool_calls"]),
    ({"extra_body": {"functions": [{"name": "f"}]}}, ["functions", "deprecated"]),
    ({"extra_body": {"function_call": "auto"}}, ["function_call", "deprecated"]),
])
def test_bad_tools_tool_choice_and_tool_messages_are_400s_naming_the_field(client, kw, words):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **kw}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    for word in words:
        assert word in caught.value.body["message"], (word, caught.value.body)


def test_markers_that_are_special_tokens_are_forced_by_id_and_parsed(model_dir, tmp_path):
    # A checkpoint whose tokenizer has each marker as one special token, as DeepSeek's has (ids 259..267: spare ids
    # of the generated vocabulary), whose decode drops them.
    special_dir = shutil.copytree(model_dir, tmp_path / "tiny-v3-special")
    specials = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {m: 259 + i for i, m in enumerate(TOOL_MARKERS)}
    ByteTokenizer({b: len(SPECIAL_TOKENS) + b for b in range(256)}, specials).save(special_dir)
    with in_process_app(special_dir) as (app, _), client_of(app) as http:
        local = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        kw = {"model": special_dir.name, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "n": 8,
              "seed": 4, "max_tokens": 800, "logit_bias": FEWER_CALLS}
        answer = local.chat.completions.create(**kw)
        streamed = reassembled(local.chat.completions.create(**kw, stream=True))
    for c in answer.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        calls = valid_calls(c.message.tool_calls)
        ids = c.model_extra["token_ids"]
        assert ids[0] == specials[TOOL_CALLS_BEGIN] and ids[-1] == specials[TOOL_CALLS_END]
        assert ids.count(specials[TOOL_CALL_BEGIN]) == len(calls) and streamed[c.index]["calls"] == calls
