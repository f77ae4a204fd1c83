"""Hostile and careless requests through the real HTTP app (deploy/serve_app.py, in process): a request whose
sampling degenerates or fails never stalls the requests batched with it; lone surrogates, out-of-range seeds and
routing-trace ids of any length are refused naming the field, without echoing them; a refused n x prompts request
frees its queue places at once; every error, 404 / 405 / unparsable bodies included, comes in OpenAI's shape."""

from __future__ import annotations

import threading
import time

import pytest

from gateway.model.sampling import Penalties
from gateway.serving.sampling_params import SamplingParams
from tests.conftest import random_prompts, wait_until
from tests.deploy.in_process_app import assert_openai_error, client_of, in_process_app, raw_json, sse_events

MAX_TOKENS = 8
POISON_SEED = 66613  # the test's marker for the request whose sampling is poisoned below validation


@pytest.fixture(scope="module")
def served(model_dirs):
    """(app, state, client) over tiny-v3 with a 30 s request timeout (a stalled request fails its test, never
    hangs it: the client has no timeout of its own) and a queue of 8."""
    settings = {"scheduler.request_timeout_s": 30, "scheduler.max_waiting": 8}
    with in_process_app(model_dirs["tiny-v3"], **settings) as (app, state), client_of(app) as client:
        yield app, state, client


def stream_all(client, bodies: list[dict]) -> list[tuple[float, list[dict]]]:
    """POST each body (stream=true) to /v1/completions from its own thread, all at once; per body: seconds until
    its stream ended, and its events."""
    results: list = [None] * len(bodies)
    start = time.monotonic()

    def one(i: int) -> None:
        r = client.post("/v1/completions", **raw_json({**bodies[i], "stream": True}))
        results[i] = (time.monotonic() - start, sse_events(r.text) if r.status_code == 200 else r.json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert all(r is not None for r in results), "a streaming client never got its answer"
    return results


def tokens_of(events: list[dict]) -> list[int]:
    return [t for e in events for c in e.get("choices", []) for t in c.get("token_ids", [])]


def poison_sampling_below_validation(monkeypatch) -> None:
    """The request seeded POISON_SEED samples at temperature 1 with repetition_penalty 1e-300, which validation
    now refuses: in float32 it is 0, a seen token's logit / 0 is inf and the distribution NaN, so its sampling
    fails (before: outside the step's error handling, stalling every request batched with it)."""
    poisoned = object.__new__(Penalties)
    for name, value in (("presence", 0.0), ("frequency", 0.0), ("repetition", 1e-300)):
        object.__setattr__(poisoned, name, value)
    real = SamplingParams.request

    def request(self, *args, **kwargs):
        r = real(self, *args, **kwargs)
        if self.seed == POISON_SEED:
            r.penalties, r.temperature = poisoned, 1.0
        return r

    monkeypatch.setattr(SamplingParams, "request", request)


@pytest.mark.parametrize("poison", ["temperature 1e-300", "sampling fails"])
def test_a_poisoned_request_among_8_streaming_clients_leaves_the_other_7_on_time(served, monkeypatch, poison):
    app, state, client = served
    engine, stats = state.engine_loop.engine, state.engine_loop.stats
    prompts = random_prompts(engine.spec.vocab_size, [5, 9, 4, 7, 6, 8, 3], seed=23)
    bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in prompts]
    normal = stream_all(client, bodies)
    normal_s = max(seconds for seconds, _ in normal)
    poison_prompt = random_prompts(engine.spec.vocab_size, [40], seed=5)[0]  # many seen tokens, some logit > 0
    if poison == "temperature 1e-300":
        bad = {"prompt": poison_prompt, "max_tokens": MAX_TOKENS, "temperature": 1e-300}
    else:
        poison_sampling_below_validation(monkeypatch)
        bad = {"prompt": poison_prompt, "max_tokens": MAX_TOKENS, "temperature": 1, "seed": POISON_SEED}
    steps = stats.steps
    *others, (_, poisoned) = stream_all(client, [*bodies, bad])
    for (seconds, events), (_, alone) in zip(others, normal, strict=True):
        assert tokens_of(events) == tokens_of(alone) and len(tokens_of(events)) == MAX_TOKENS
        assert seconds < normal_s + 1.0, f"{seconds:.2f} s against {normal_s:.2f} s without the poisoned request"
    if poison == "temperature 1e-300":  # handled: sampled greedily, as vLLM does below 1e-5
        greedy = client.post("/v1/completions", json={"prompt": poison_prompt, "max_tokens": MAX_TOKENS,
                                                      "temperature": 0}).json()
        assert tokens_of(poisoned) == greedy["choices"][0]["token_ids"]
    else:  # its own client alone gets the error
        assert "error" in poisoned[-1] and poisoned[-1]["error"]["type"] == "server_error"
        assert "sampling: the next-token distribution is not finite" in poisoned[-1]["error"]["message"]
    wait_until(lambda: not engine.has_work() and engine.cache.is_empty(), 10, "the engine to drain")
    assert stats.steps - steps < 100, "the engine loop spun on empty steps"  # 8 tokens: ~10 steps
    assert client.post("/v1/completions", json={"prompt": [3, 4], "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("extra, words", [
    ({"repetition_penalty": 1e-300}, ["repetition_penalty", "0.01"]),
    ({"temperature": float("nan")}, ["temperature"]),
    ({"temperature": float("inf")}, ["temperature"]),
    ({"seed": 2**64}, ["seed", "[-2**63, 2**63 - 1]"]),
    ({"seed": -(2**63) - 1}, ["seed", "[-2**63, 2**63 - 1]"]),
    ({"seed": 10**30}, ["seed", "[-2**63, 2**63 - 1]"]),
])
def test_degenerate_sampling_settings_and_seeds_past_64_bits_are_refused_by_name(served, extra, words):
    _, _, client = served
    r = client.post("/v1/completions", **raw_json({"prompt": [3, 4], "max_tokens": 2, **extra}))
    error = assert_openai_error(r, 400, *words)
    assert error["param"] == words[0] and "Overflow" not in error["message"]


def test_the_largest_64_bit_seeds_sample(served):
    _, _, client = served
    for seed in (2**63 - 1, -(2**63)):
        r = client.post("/v1/completions", json={"prompt": [3, 4], "max_tokens": 2, "temperature": 1, "seed": seed,
                                                 "n": 3})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {"prompt": "a\ud800", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "b\udfff"], "max_tokens": 2}, "prompt.1"),
    ("/v1/completions", {"prompt": "ok", "max_tokens": 2, "stop": ["\ud83d"]}, "stop.0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}], "max_tokens": 2},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}],
                              "max_tokens": 2}, "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "\ud800": 1}], "max_tokens": 2},
     "messages.0.<key>"),
])
def test_a_lone_surrogate_anywhere_in_a_body_gets_400_naming_the_field(served, path, body, field):
    _, _, client = served
    r = client.post(path, **raw_json(body))
    error = assert_openai_error(r, 400, field, "lone UTF-16 surrogate")
    assert error["param"] == field
    assert client.post("/v1/completions", json={"prompt": "fine", "max_tokens": 1}).status_code == 200


def test_a_refused_n_times_prompts_request_frees_its_queue_places_at_once(served):
    _, state, client = served
    engine = state.engine_loop.engine
    with engine._step_lock:  # nothing steps meanwhile: only cancelling may empty the queue
        refused = client.post("/v1/completions", json={"prompt": [[3, 4], [5, 6], [7, 8]], "n": 3, "max_tokens": 2})
        assert_openai_error(refused, 429, "queue full", "scheduler.max_waiting")
        assert len(engine.scheduler.waiting) == 0  # its 8 queued siblings left with it
        answer: list = []
        small = threading.Thread(target=lambda: answer.append(
            client.post("/v1/completions", json={"prompt": [3, 4], "max_tokens": 2})))
        small.start()
        wait_until(lambda: len(engine.scheduler.waiting) == 1 or answer, 10, "the small request to be queued")
    small.join(timeout=60)
    assert answer and answer[0].status_code == 200, answer and answer[0].text
    wait_until(lambda: not engine.has_work() and engine.cache.is_empty(), 10, "the engine to drain")


@pytest.mark.parametrize("method, path, kwargs, status, words", [
    ("GET", "/v1/completions", {}, 405, ["method GET: not allowed", "allowed: POST"]),
    ("DELETE", "/v1/chat/completions", {}, 405, ["method DELETE: not allowed", "allowed: POST"]),
    ("GET", "/v1/nothing-here", {}, 404, ["no route at this path"]),
    ("POST", "/v1/completions", {"content": b"{bad", "headers": {"content-type": "application/json"}}, 400,
     ["body", "not valid JSON"]),
    ("POST", "/v1/completions", {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400,
     ["body", "expected a JSON object"]),
    ("POST", "/v1/completions", {"content": b"prompt=hi", "headers": {"content-type": "text/plain"}}, 400,
     ["body", "expected a JSON object"]),
    ("POST", "/v1/chat/completions", {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400,
     ["body"]),
])
def test_every_error_comes_in_openais_shape(served, method, path, kwargs, status, words):
    _, _, client = served
    r = client.request(method, path, **kwargs)
    error = assert_openai_error(r, status, *words)
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_routing_trace_ids_of_any_length_are_refused_without_being_echoed(served):
    _, _, client = served
    done = client.post("/v1/completions", json={"prompt": [3, 4, 5], "max_tokens": 2}).json()
    request_id = done["id"].removeprefix("cmpl-")
    assert client.get(f"/v1/routing/{request_id}").json()["tokens"][:3] == [3, 4, 5]
    for bad in ("x" * 5000, request_id + "0", request_id.upper(), "nope", "%00" * 8 + "0" * 8):
        r = client.get(f"/v1/routing/{bad}")
        error = assert_openai_error(r, 404, "request_id", "16 lowercase hex digits")
        assert error["param"] == "request_id" and bad not in error["message"] and len(r.content) < 400
    unknown = assert_openai_error(client.get("/v1/routing/" + "0" * 16), 404, "no routing trace")
    assert unknown["param"] == "request_id"
