"""The HTTP service end to end on a real local Ray Serve: concurrent streaming and plain completions equal
Engine.generate; bad requests get 4xx with a message and the service keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gateway import Engine
from gateway.serving.completions import CompletionRequest, completions
from gateway.serving.engine_loop import EngineLoop
from gateway.serving.http_api import GatewayState
from tests.conftest import random_prompts

ADMIN_KEY = "sk-admin-serve-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dirs, ray_cluster):
    from ray import serve

    from deploy.serve_app import build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployment = {"model": str(model_dirs["tiny-v3"]), "backend": "ray", "devices": 2,
                  "scheduler": {"max_batch_tokens": 256}, "server": {"admin_key": ADMIN_KEY}}
    serve.run(build({"deployment": deployment}), name="expertmesh-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def complete(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json=body, timeout=120)


def stream(url: str, **body) -> tuple[list[int], str, str]:
    with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    return tokens, "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


@pytest.mark.slow
def test_concurrent_streaming_and_plain_requests_equal_engine_generate(server, model_dirs):
    prompts = random_prompts(272, [5, 9, 3, 12, 7, 4], seed=8)
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:
        expected = [engine.generate([p], max_new_tokens=8, stop_at_eos=True)[0] for p in prompts]

    def one(i: int):
        if i % 2:
            tokens, _, reason = stream(server, prompt=prompts[i], max_tokens=8, temperature=0)
            return tokens, reason
        r = complete(server, prompt=prompts[i], max_tokens=8, temperature=0)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert r.json()["usage"] == {"prompt_tokens": len(prompts[i]), "completion_tokens": len(choice["token_ids"]),
                                     "total_tokens": len(prompts[i]) + len(choice["token_ids"]),
                                     "prompt_tokens_details": {"cached_tokens": 0}}  # shorter than a block
        return choice["token_ids"], choice["finish_reason"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(one, range(len(prompts))))
    for (tokens, reason), want in zip(results, expected, strict=True):
        assert tokens == want
        assert reason == ("stop" if want[-1] == 1 else "length")
    text = complete(server, prompt="Hi", max_tokens=3, temperature=0).json()["choices"][0]
    assert len(text["token_ids"]) >= 1 and isinstance(text["text"], str)


@pytest.mark.slow
def test_models_health_ready_metrics_and_routing(server):
    assert requests.get(f"{server}/health", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{server}/ready", timeout=30).json()["status"] == "ready"
    assert requests.get(f"{server}/v1/models", timeout=30).json()["data"][0]["id"] == "tiny-v3"
    r = complete(server, prompt=[5, 6, 7], max_tokens=2, temperature=0)
    rid = r.json()["id"].removeprefix("cmpl-")
    trace = requests.get(f"{server}/v1/routing/{rid}", timeout=30).json()
    assert trace["tokens"][:3] == [5, 6, 7] and len(trace["expert_ids"][0]) == 2
    assert requests.get(f"{server}/v1/routing/nope", timeout=30).status_code == 404
    metrics = requests.get(f"{server}/metrics", timeout=30).text
    for name in ("requests_total", "generated_tokens_total", "queue_depth", "expert_tokens_total",
                 "device_tokens_total", "dispatch_seconds_total", "tokens_per_second",
                 "process_resident_memory_bytes"):
        assert f"expertmesh_{name}" in metrics
    assert re.search(r'^expertmesh_replica_inflight\{group="1",replica="\d+"\} 0$', metrics, re.M)  # idle pool
    assert 'expertmesh_requests_total{status="ok"}' in metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, status, message",
    [
        ("{not json", 400, "JSON"),
        ({"prompt": [1, 2], "max_tokens": 2, "frobnicate": 1}, 400, "frobnicate"),
        ({"prompt": [1, 2], "max_tokens": -3}, 400, "max_tokens"),
        ({"prompt": [1, 2], "max_tokens": 10**6}, 400, "max_tokens=1000000 exceeds max_position_embeddings=512"),
        ({"prompt": [1, 4000], "max_tokens": 2}, 400, "outside [0, vocab_size=272)"),
        ({"prompt": [3] * 600, "max_tokens": 1}, 400, "exceeds max_position_embeddings"),
        ({"prompt": [], "max_tokens": 2}, 400, "prompt: expected a non-empty list"),
        ({"prompt": [1, 2], "top_p": 0}, 400, "top_p"),
        ({"prompt": [1, 2], "model": "gpt-9"}, 404, "gpt-9"),
        ({"max_tokens": 2}, 400, "prompt"),
    ],
)
def test_bad_requests_get_4xx_and_the_service_keeps_serving(server, body, status, message):
    if isinstance(body, str):
        r = requests.post(f"{server}/v1/completions", data=body, headers={"content-type": "application/json"},
                          timeout=60)
    else:
        r = complete(server, **body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert complete(server, prompt=[4, 5], max_tokens=1, temperature=0).status_code == 200


def test_a_full_queue_answers_429(model_dirs):
    from gateway.config import DeploymentConfig, SchedulerConfig

    cfg = DeploymentConfig(model=str(model_dirs["tiny-v2"]), scheduler=SchedulerConfig(max_waiting=1))
    engine = Engine.from_config(cfg)
    loop = EngineLoop(engine)
    loop.stop()  # nothing steps: submitted requests stay queued
    state = GatewayState(loop, "tiny-v2")

    async def two():
        body = CompletionRequest(prompt=[3, 4], max_tokens=2, stream=True)
        first = await completions(state, body)
        second = await completions(state, body)
        return first, second

    first, second = asyncio.run(two())
    assert first.status_code == 200 and second.status_code == 429
    assert "queue full" in json.loads(second.body)["error"]["message"]
    assert loop.stats.requests["rejected"] == 1
    engine.close()


@pytest.mark.slow
def test_scale_cli_while_http_requests_flow(server, model_dirs):
    import subprocess
    import sys

    prompts = random_prompts(272, [6, 8], seed=21)
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:
        expected = [engine.generate([p], max_new_tokens=6)[0] for p in prompts]
    outputs, stop = [], False

    def traffic():
        while not stop:
            for p in prompts:
                r = complete(server, prompt=p, max_tokens=6, temperature=0)
                outputs.append((r.status_code, r.json()["choices"][0]["token_ids"] if r.status_code == 200 else r.text))

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(traffic) for _ in range(2)]
        try:
            for replicas in (2, 1):
                done = subprocess.run([sys.executable, "-m", "deploy.cli", "scale", "--group", "0", "--replicas",
                                       str(replicas), "--url", server], capture_output=True, text=True, timeout=300,
                                      env={**os.environ, "EXPERTMESH_ADMIN_KEY": ADMIN_KEY})
                assert done.returncode == 0, done.stderr
                assert f"group 0: {replicas} replicas" in done.stdout
        finally:
            stop = True
            for f in futures:
                f.result(timeout=120)
    assert outputs and all(code == 200 for code, _ in outputs)
    assert all(tokens in expected for _, tokens in outputs)
    metrics = requests.get(f"{server}/metrics", timeout=30).text
    assert 'expertmesh_group_replicas{group="0"} 1' in metrics
    bad = subprocess.run([sys.executable, "-m", "deploy.cli", "scale", "--group", "9", "--replicas", "1", "--url",
                          server], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EXPERTMESH_ADMIN_KEY": ADMIN_KEY})
    assert bad.returncode == 2 and "group=9" in bad.stderr


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_cancels_its_request(server):
    import time

    r = requests.post(f"{server}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 400, "temperature": 0,
                                                         "stream": True}, stream=True, timeout=60)
    lines = r.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line).startswith("data: ")
    r.close()  # hang up after the first token
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = requests.get(f"{server}/metrics", timeout=30).text
        if 'expertmesh_requests_total{status="cancelled"} 1' in metrics:
            break
        time.sleep(0.2)
    assert 'expertmesh_requests_total{status="cancelled"} 1' in metrics
    assert "expertmesh_running_sequences 0" in metrics
    assert complete(server, prompt=[4, 5], max_tokens=2, temperature=0).status_code == 200


def test_the_serve_builder_refuses_a_gateway_gpu_the_embedded_ray_does_not_have(model_dirs, ray_cluster, monkeypatch):
    """Issue 23: `gateway_device: cuda` on an embedded Ray without GPUs left the replica waiting for a GPU forever;
    the builder (what `expertmesh serve` and `serve run deploy.serve_app:build` call) now refuses it, naming it."""
    from deploy.serve_app import build, gateway_of
    from gateway.config import DeploymentConfigError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    deployment = {"model": str(model_dirs["tiny-v3"]), "gateway_device": "cuda"}
    if ray_cluster.cluster_resources().get("GPU"):  # a Ray with a GPU grants it: the builder binds one
        assert gateway_of(build({"deployment": deployment})).ray_actor_options["num_gpus"] == 1
    else:
        with pytest.raises(DeploymentConfigError, match="gateway_device='cuda': the embedded Ray has no GPU for "
                                                        "the gateway replica"):
            build({"deployment": deployment})
    assert build({"deployment": {**deployment, "gateway_device": "cpu"}}) is not None
