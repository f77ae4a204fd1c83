"""Routed experts in the response (return_routed_experts, or tracing.return_routed_experts for every answer), read
with the official `openai` client from the real HTTP app over a 2-group engine: [tokens, moe_layers, top_k] logical
expert ids with their devices, equal to GET /v1/routing/{request_id}, per choice, plain and streamed."""

from __future__ import annotations

import pytest

from model_core.spec import ModelSpec
from tests.deploy.in_process_app import client_of, in_process_app

openai = pytest.importorskip("openai")

MODEL = "tiny-v3"
PROMPT = [17, 93, 41, 5, 250, 66, 12]


@pytest.fixture(scope="module")
def served(model_dirs):
    """(openai client, the HTTP client it talks through, the model's spec) for an app on 2 in-process groups."""
    with in_process_app(model_dirs[MODEL], backend="local", devices=2) as (app, _), client_of(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        yield client, http, ModelSpec.from_dir(model_dirs[MODEL])


def check_against_trace(http, spec: ModelSpec, routed: dict, prompt_tokens: int, completion_tokens: int) -> int:
    """`routed` has the documented shape, holds valid expert ids and devices, and equals the request's trace;
    returns how many leading prompt positions the prefix cache supplied (all -1: another request routed them)."""
    positions = prompt_tokens + completion_tokens - 1  # the last generated token is never fed to the model
    assert routed["shape"] == [positions, len(spec.moe_layers), spec.top_k]
    assert routed["layers"] == list(spec.moe_layers) and routed["prompt_tokens"] == prompt_tokens
    ids, devices = routed["expert_ids"], routed["devices"]
    assert [len(ids), len(ids[0]), len(ids[0][0])] == routed["shape"]
    cached = next(p for p, pos in enumerate(ids) if pos[0][0] != -1)
    assert cached < prompt_tokens and all(e == -1 for pos in ids[:cached] for layer in pos for e in layer)
    routed_ids = [layer for pos in ids[cached:] for layer in pos]
    assert all(0 <= e < spec.n_routed_experts for layer in routed_ids for e in layer)
    assert all(len(set(layer)) == spec.top_k for layer in routed_ids)  # top-k distinct experts
    assert {d for pos in devices[cached:] for layer in pos for d in layer} <= {0, 1}
    trace = http.get(f"/v1/routing/{routed['request_id']}").json()
    assert (trace["expert_ids"], trace["devices"]) == (ids, devices)
    return cached


def test_completions_return_each_choices_routed_experts_equal_to_its_trace(served):
    client, http, spec = served
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert "routed_experts" not in (plain.choices[0].model_extra or {})  # only when asked
    asked = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3, n=2,
                                      extra_body={"return_routed_experts": True})
    routed = [c.model_extra["routed_experts"] for c in asked.choices]
    assert routed[0]["request_id"] != routed[1]["request_id"]
    for choice, r in zip(asked.choices, routed, strict=True):
        check_against_trace(http, spec, r, len(PROMPT), len(choice.model_extra["token_ids"]))
    # the prompt's positions are the same tokens through the same model: the same experts for both choices
    assert routed[0]["expert_ids"][: len(PROMPT)] == routed[1]["expert_ids"][: len(PROMPT)]


def test_streamed_completions_carry_routed_experts_in_each_choices_closing_chunk(served):
    client, http, spec = served
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                       extra_body={"return_routed_experts": True})
    tokens, closing = [], None
    for chunk in stream:
        for c in chunk.choices:
            tokens += c.model_extra.get("token_ids") or []
            if c.finish_reason is not None:
                closing = c.model_extra["routed_experts"]
            else:
                assert "routed_experts" not in c.model_extra
    assert closing is not None and len(tokens) == 5
    check_against_trace(http, spec, closing, len(PROMPT), len(tokens))


def test_chat_returns_routed_experts_plain_and_streamed_equal_to_each_trace(served):
    client, http, spec = served
    messages = [{"role": "user", "content": "Which experts?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                           extra_body={"return_routed_experts": True})
    routed = plain.choices[0].model_extra["routed_experts"]
    cached = check_against_trace(http, spec, routed, plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert cached == plain.usage.prompt_tokens_details.cached_tokens
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_routed_experts": True})
    chunks = list(stream)
    closing = [c.model_extra["routed_experts"] for chunk in chunks for c in chunk.choices
               if c.finish_reason is not None]
    assert len(closing) == 1 and closing[0]["request_id"] != routed["request_id"]
    cached = check_against_trace(http, spec, closing[0], plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert cached == chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt, cached now
    assert closing[0]["expert_ids"][cached:] == routed["expert_ids"][cached:]  # greedy: the same experts


def test_the_server_setting_returns_routed_experts_without_the_request_asking(model_dirs):
    spec = ModelSpec.from_dir(model_dirs[MODEL])
    with in_process_app(model_dirs[MODEL], **{"tracing.return_routed_experts": True}) as (app, _), \
            client_of(app) as http:
        answer = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}).json()
        choice = answer["choices"][0]
        check_against_trace(http, spec, choice["routed_experts"], len(PROMPT), len(choice["token_ids"]))
        refused = http.post("/v1/completions", json={"prompt": PROMPT, "return_routed_experts": "maybe"})
        assert refused.status_code == 400 and "return_routed_experts" in refused.text
