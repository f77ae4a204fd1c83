"""A bounded property test of the HTTP bodies (hypothesis, derandomized: the same examples on every run): each
field of /v1/completions and /v1/chat/completions gets a valid value, an odd JSON value (wrong types, huge or
non-finite numbers, strings with lone surrogates and NULs, nested lists and objects) or is left out, and bodies
are sometimes cut short. Every answer is a 200 or a 4xx in OpenAI's error shape, never a 5xx, and the server
keeps answering a good request afterwards."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.deploy.in_process_app import assert_openai_error, client_of, in_process_app, sse_events

ODD_NUMBERS = [0, -1, 1, 2, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**200, 0.5, -0.0, 1e-300,
               5e-324, 1e308, -1e308, float("nan"), float("inf"), float("-inf")]
ODD_TEXT = ["", "a\ud800", "\udfff", "\ud83d\ude00", "\x00", "nul\x00in", "<|bos|>", "\u202e", "x" * 3000, "0", "null"]
TEXT = st.one_of(st.sampled_from(ODD_TEXT), st.text(st.characters(exclude_categories=()), max_size=6))
PLAIN = st.one_of(st.sampled_from(["hi", "nul\x00in", "<|bos|>", "\u202e", "x" * 3000, "\ud83d\ude00"]),
                  st.text(st.characters(codec="utf-8"), min_size=1, max_size=6))  # valid text, odd or not
SCALAR = st.one_of(st.none(), st.booleans(), st.sampled_from(ODD_NUMBERS), st.integers(-5, 5), TEXT)
ANY_JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                        max_leaves=6)
TOKENS = st.lists(st.integers(0, 271), min_size=1, max_size=6)

# Per field, values a client would send (kept cheap: a few tokens, few choices); any field may instead get ANY_JSON.
COMMON = {
    "model": st.sampled_from([None, "tiny-v3", "tiny-v3", "gpt-4"]),
    "max_tokens": st.integers(1, 3),
    "temperature": st.sampled_from([0, 0.7, 1e-300, 100]),
    "top_p": st.sampled_from([0.1, 1]),
    "n": st.integers(1, 2),
    "stop": st.one_of(st.none(), PLAIN, st.lists(PLAIN, max_size=2)),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.sampled_from([0.01, 1, 1.3, 10]),
    "stream": st.booleans(),
    "stream_options": st.sampled_from([None, {"include_usage": True}]),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    "user": PLAIN,
}
COMPLETION = {**COMMON,
              "prompt": st.one_of(PLAIN, TOKENS, st.lists(PLAIN, min_size=1, max_size=2),
                                  st.lists(TOKENS, min_size=1, max_size=2)),
              "logprobs": st.one_of(st.none(), st.integers(0, 3)), "echo": st.booleans(),
              "best_of": st.sampled_from([None, 1, 2]), "suffix": st.sampled_from([None, "x"]),
              "logit_bias": st.sampled_from([None, {"5": 1.0}])}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "user", "assistant", "tool"]),
                                 "content": st.one_of(PLAIN, st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text"), "text": PLAIN}), max_size=2))})
CHAT = {**COMMON,
        "messages": st.lists(MESSAGE, min_size=1, max_size=3),
        "max_completion_tokens": st.integers(1, 3), "logprobs": st.booleans(),
        "top_logprobs": st.one_of(st.none(), st.integers(0, 3)),
        "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}])}
REQUIRED = {"/v1/completions": ["prompt", "max_tokens"], "/v1/chat/completions": ["messages", "max_tokens"]}


@st.composite
def bodies(draw, path: str) -> tuple[bytes, bool]:
    """(the body's bytes, whether it is a JSON object) for `path`: its required fields are always present (a chat
    request without max_tokens would generate to the end of the context: slow, and not what is tested here)."""
    fields = COMPLETION if path == "/v1/completions" else CHAT
    odd = draw(st.sets(st.sampled_from(sorted(fields)), max_size=2))  # fields given an odd JSON value
    body = {}
    for name, valid in fields.items():
        if name in odd:
            body[name] = draw(ANY_JSON)
            if name == "max_tokens" and isinstance(body[name], int) and 3 < body[name] < 10**6:
                body[name] = 3  # an in-range count is a valid one: keep it cheap
        elif name in REQUIRED[path] or draw(st.integers(0, 2)) == 0:
            body[name] = draw(valid)
    if draw(st.integers(0, 3)) == 3:
        body[draw(TEXT)] = draw(ANY_JSON)  # an unknown field
    text = json.dumps(body).encode("ascii")  # NaN / Infinity literals and \ud800 escapes, as any client may send
    if draw(st.integers(0, 9)) == 9:  # one body in ten is cut short (9, not hypothesis's favourite 0)
        return text[: draw(st.integers(0, max(len(text) - 1, 0)))], False
    return text, True


@pytest.fixture(scope="module")
def client(model_dirs):
    settings_ = {"scheduler.request_timeout_s": 30, "scheduler.max_waiting": 64}
    with in_process_app(model_dirs["tiny-v3"], **settings_) as (app, _), client_of(app) as c:
        yield c


def still_serving(client) -> None:
    r = client.post("/v1/completions", json={"prompt": [3, 4, 5], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 2


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_any_body_gets_200_or_a_4xx_in_openais_shape_and_the_server_keeps_serving(client, path):
    answered: Counter = Counter()

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(bodies(path))
    def check(drawn: tuple[bytes, bool]) -> None:
        content, _ = drawn
        r = client.post(path, content=content, headers={"content-type": "application/json"})
        answered[r.status_code] += 1
        assert r.status_code < 500, (r.status_code, r.text[:500], content[:500])
        if r.status_code != 200:
            assert_openai_error(r, r.status_code)
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = sse_events(r.text)
            assert not any("error" in e for e in events), (events[-1], content[:500])
        else:
            assert r.json()["choices"], r.text[:500]

    check()
    still_serving(client)
    assert answered[200] >= 10 and answered[400] >= 10, answered  # both sides of validation were reached
