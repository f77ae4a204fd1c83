"""Several gateway replicas: server.replicas, the autoscaling settings (min_replicas, max_replicas,
target_ongoing_requests) and server.gpus_per_gateway are checked with the field named, build() gives the Serve
deployment that many replicas (or Serve's autoscaling), `expertmesh serve --gateways` sets them, and on a real local
Ray Serve two gateways answer concurrent completions with the engine's greedy tokens, each response naming the
gateway that served it in `x-expertmesh-gateway`."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
import yaml

from gateway.config import DeploymentConfig, DeploymentConfigError, ServerConfig
from tests.conftest import random_prompts
from tests.deploy.test_serve import free_port

PROMPTS = random_prompts(272, [5, 9, 3, 12, 7, 4, 10, 6], seed=31)
MAX_NEW_TOKENS = 24


# --- the settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("server, check", [
    ({}, lambda s: s.replicas == 1 and not s.autoscaled and s.gpus_per_gateway == 1.0 and s.fewest_gateways == 1),
    ({"replicas": 3}, lambda s: s.replicas == 3 and s.fewest_gateways == 3),
    ({"max_replicas": 4}, lambda s: s.autoscaled and s.fewest_gateways == 1 and s.target_ongoing_requests is None),
    ({"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 0.5},
     lambda s: s.autoscaled and s.target_ongoing_requests == 0.5 and s.fewest_gateways == 2),
    ({"replicas": 1, "max_replicas": 3}, lambda s: s.autoscaled and s.max_replicas == 3),
    ({"gpus_per_gateway": 0.25}, lambda s: s.gpus_per_gateway == 0.25),
])
def test_gateway_settings_parse_from_the_deployment_mapping(server, check, tmp_path):
    config = DeploymentConfig.from_dict({"model": str(tmp_path), "server": server})
    assert check(config.server)


@pytest.mark.parametrize("server, message", [
    ({"replicas": 0}, "server.replicas=0: expected an integer in [1, 1024]"),
    ({"replicas": 2.5}, "server.replicas=2.5: expected an integer"),
    ({"replicas": True}, "server.replicas=True: expected an integer"),
    ({"replicas": 2, "max_replicas": 4}, "server.replicas=2, server.max_replicas=4: set one, not both"),
    ({"min_replicas": 2}, "server.max_replicas: missing (server.min_replicas is an autoscaling setting"),
    ({"target_ongoing_requests": 4}, "server.max_replicas: missing (server.target_ongoing_requests is an autoscaling"),
    ({"min_replicas": 3, "max_replicas": 2}, "server.max_replicas=2: expected an integer >= server.min_replicas=3"),
    ({"min_replicas": 0, "max_replicas": 2}, "server.min_replicas=0: expected an integer in [1, 1024]"),
    ({"max_replicas": 0}, "server.max_replicas=0: expected an integer in [1, 1024]"),
    ({"max_replicas": 2, "target_ongoing_requests": 0}, "server.target_ongoing_requests=0: expected a number > 0"),
    ({"max_replicas": "4"}, "server.max_replicas='4': expected an integer"),
    ({"gpus_per_gateway": 0}, "server.gpus_per_gateway=0: expected a number in (0, 1]"),
    ({"gpus_per_gateway": 2}, "server.gpus_per_gateway=2: expected a number in (0, 1]"),
    ({"gateways": 2}, "server.gateways: unknown setting"),
])
def test_bad_gateway_settings_name_the_field_and_what_it_expects(server, message, tmp_path):
    with pytest.raises(DeploymentConfigError) as refused:
        DeploymentConfig.from_dict({"model": str(tmp_path), "server": server})
    assert message in str(refused.value)


def test_overrides_reach_the_gateway_settings_and_are_checked_again(tmp_path):
    config = DeploymentConfig(model=str(tmp_path))
    assert config.with_overrides(**{"server.replicas": 4}).server.replicas == 4
    scaled = config.with_overrides(**{"server.max_replicas": 3, "server.min_replicas": 2})
    assert scaled.server.autoscaled and scaled.server.fewest_gateways == 2
    with pytest.raises(DeploymentConfigError, match="server.replicas=2, server.max_replicas=3"):
        scaled.with_overrides(**{"server.replicas": 2})
    assert ServerConfig(max_replicas=2) != ServerConfig(replicas=2)


# --- the Serve application, built but not run -------------------------------------------------------------------


def test_build_gives_the_deployment_server_replicas_or_serves_autoscaling(model_dirs):
    """The gateway deployment gets server.replicas (or Serve's autoscaling); the front that relays to it (the HTTP
    ingress) runs as many replicas as gateways always run, without GPUs."""
    from deploy.serve_app import build, gateway_of

    model = str(model_dirs["tiny-v3"])
    app = build({"deployment": {"model": model, "server": {"replicas": 2}}})
    two = gateway_of(app)
    assert two.name == "expertmesh-gateway" and two.num_replicas == 2
    assert two._deployment_config.autoscaling_config is None
    assert app._bound_deployment.name == "expertmesh-front" and app._bound_deployment.num_replicas == 2
    assert app._bound_deployment.ray_actor_options == {"num_cpus": 0, "num_gpus": 0}
    assert gateway_of(build({"deployment": {"model": model}})).num_replicas == 1
    scaled_app = build({"deployment": {"model": model, "server": {
        "min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 3}}})
    autoscaling = gateway_of(scaled_app)._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (2, 5, 3)
    assert scaled_app._bound_deployment.num_replicas == 2
    defaults = build({"deployment": {"model": model, "server": {"max_replicas": 3}}})
    autoscaling = gateway_of(defaults)._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)


def test_an_inline_server_section_changes_the_files_section_key_by_key(model_dirs, tmp_path):
    """A Serve config's `args: {config: file, deployment: {server: {replicas: 2}}}` keeps the file's other server
    keys (its API key, its body limit)."""
    from deploy.serve_app import build, gateway_of

    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump({"model": str(model_dirs["tiny-v3"]),
                                    "server": {"max_request_bytes": 8192, "api_key": "sk-file-key"}}))
    app = build({"config": str(path), "deployment": {"server": {"replicas": 2}}})
    bound = gateway_of(app)
    deployment, api_key, _ = bound.init_args
    assert deployment["server"] == {"max_request_bytes": 8192, "api_key": "sk-file-key", "replicas": 2}
    assert api_key == "sk-file-key" and bound.num_replicas == 2
    assert app._bound_deployment.init_args[1] == 8192  # the front cuts bodies past the gateways' limit


def test_a_cuda_gateway_asks_for_gpus_per_gateway(model_dirs, monkeypatch):
    from deploy.serve_app import gateway_actor_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = str(model_dirs["tiny-v3"])
    shared = DeploymentConfig.from_dict({"model": model, "gateway_device": "cuda",
                                         "server": {"replicas": 4, "gpus_per_gateway": 0.25}})
    assert gateway_actor_options(shared) == {"num_cpus": 0, "num_gpus": 0.25}
    on_cpu = DeploymentConfig.from_dict({"model": model, "gateway_device": "cpu", "server": {"gpus_per_gateway": 0.5}})
    assert gateway_actor_options(on_cpu) == {"num_cpus": 0, "num_gpus": 0}


@pytest.mark.parametrize("server, gpus, message", [
    ({"replicas": 2}, 2, None),
    ({"replicas": 3}, 2, "server.replicas=3: the embedded Ray's 2 GPU(s) hold 2 gateways of server.gpus_per_gateway=1"),
    ({"replicas": 4, "gpus_per_gateway": 0.5}, 2, None),
    ({"replicas": 3, "gpus_per_gateway": 0.4}, 1, "server.replicas=3: the embedded Ray's 1 GPU(s) hold 2 gateways"),
    ({"min_replicas": 2, "max_replicas": 8}, 1, "server.min_replicas=2: the embedded Ray's 1 GPU(s) hold 1 gateways"),
    ({"max_replicas": 8}, 1, None),
])
def test_an_embedded_ray_must_hold_the_cuda_gateways_that_always_run(server, gpus, message, model_dirs, monkeypatch):
    """An embedded Ray's GPUs are fixed: gateways that do not fit would wait forever, so the builder refuses them,
    naming the count (Ray's resources are faked here: the test machine has no GPU)."""
    import ray

    from deploy.serve_app import check_deployable

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": float(gpus)})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = DeploymentConfig.from_dict({"model": str(model_dirs["tiny-v3"]), "gateway_device": "cuda",
                                         "server": server})
    if message is None:
        check_deployable(config)
    else:
        with pytest.raises(DeploymentConfigError) as refused:
            check_deployable(config)
        assert message in str(refused.value)


def test_serve_takes_gateways_and_refuses_them_beside_autoscaling(tmp_path, model_dirs, capsys):
    from deploy.cli import build_parser, main

    assert build_parser().parse_args(["serve", "--config", "d.yaml", "--gateways", "3"]).gateways == 3
    assert build_parser().parse_args(["serve", "--config", "d.yaml"]).gateways is None
    for bad in ("0", "-1", "two", "1025"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--config", "d.yaml", "--gateways", bad])
        assert "--gateways" in capsys.readouterr().err
    path = tmp_path / "scaled.yaml"
    path.write_text(yaml.safe_dump({"model": str(model_dirs["tiny-v3"]), "server": {"max_replicas": 4}}))
    for gateways in ("1", "2"):  # refused before any Ray
        assert main(["serve", "--config", str(path), "--gateways", gateways, "--port", "1"]) == 2
        assert (f"{path}: --gateways {gateways} and server.max_replicas=4: set one, not both"
                in capsys.readouterr().err)


def test_the_gateway_header_names_the_replica_on_plain_streamed_refused_and_failed_responses(model_dirs, monkeypatch):
    """The real app (deploy.serve_app.app: its middleware and handlers) over an engine in this process: a plain
    answer, a stream, a 404, a 413 from the body guard and a 500 from a bug all name the gateway; a replica without
    a gateway name (not a Serve replica) answers without the header."""
    from ray import serve

    from deploy.serve_app import GATEWAY_HEADER
    from gateway.serving import http_api
    from tests.deploy.in_process_app import client_of, in_process_app

    name = "expertmesh#expertmesh-gateway#k2x9"
    body = {"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}
    with in_process_app(model_dirs["tiny-v3"], **{"server.max_request_bytes": 2048}) as (served, _):
        with client_of(served) as client:
            assert GATEWAY_HEADER not in client.post("/v1/completions", json=body).headers
            serve.get_replica_context().servable_object.gateway_name = name
            answers = {
                "plain": client.post("/v1/completions", json=body),
                "stream": client.post("/v1/completions", json={**body, "stream": True}),
                "no route": client.get("/v1/nothing-here"),
                "too large": client.post("/v1/completions", json={**body, "user": "x" * 4096}),
            }
            monkeypatch.setattr(http_api, "metrics", lambda state: 1 / 0)
            answers["a bug"] = client.get("/metrics")
    statuses = {what: r.status_code for what, r in answers.items()}
    assert statuses == {"plain": 200, "stream": 200, "no route": 404, "too large": 413, "a bug": 500}
    assert {what: r.headers.get(GATEWAY_HEADER) for what, r in answers.items()} == dict.fromkeys(answers, name)
    assert answers["stream"].text.rstrip().endswith("data: [DONE]")
    assert answers["a bug"].json()["error"]["type"] == "server_error"


# --- two gateways on a real local Ray Serve ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_gateways(model_dirs, ray_cluster):
    from ray import serve

    from deploy.serve_app import build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployment = {"model": str(model_dirs["tiny-v3"]), "backend": "local", "server": {"replicas": 2}}
    try:
        serve.run(build({"deployment": deployment}), name="expertmesh-gateways", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete("expertmesh-gateways")
        serve.shutdown()


def _complete(url: str, index: int) -> tuple[list[int], str]:
    """Prompt `index` greedily, streamed for odd indexes; (its tokens, the gateway that answered)."""
    body = {"prompt": PROMPTS[index], "max_tokens": MAX_NEW_TOKENS, "temperature": 0, "stream": bool(index % 2)}
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        if index % 2:
            events = [line.removeprefix("data: ") for line in r.iter_lines(decode_unicode=True) if line]
            assert events[-1] == "[DONE]"
            tokens = [t for e in events[:-1] for t in json.loads(e)["choices"][0]["token_ids"]]
        else:
            tokens = r.json()["choices"][0]["token_ids"]
        return tokens, r.headers["x-expertmesh-gateway"]


@pytest.mark.slow
def test_two_gateways_answer_concurrent_completions_with_the_engines_tokens(two_gateways, expected_tokens, model_dirs,
                                                                           record_property):
    """Eight completions at once through Serve's proxy: each gets the in-process engine's greedy tokens (up to its
    EOS; HTTP stops there), and the x-expertmesh-gateway header shows both gateways served.

    Serve's router (power of two choices over ongoing requests) sends a request to the gateway with fewer requests
    in flight, so eight concurrent 24-token completions spread over both; but two idle gateways tie and ties are
    broken at random, and the proxy may learn of the second replica a moment after serve.run returns, so a round
    may legitimately land on one gateway: the test sends rounds of eight (each checked) until both answered, at
    most five rounds."""
    from model_core.spec import ModelSpec

    eos = ModelSpec.from_dir(model_dirs["tiny-v3"]).eos_token_id
    answered: Counter[str] = Counter()
    rounds = 0
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        while len(answered) < 2 and rounds < 5:
            rounds += 1
            results = list(pool.map(lambda i: _complete(two_gateways, i), range(len(PROMPTS))))
            for (tokens, gateway), want in zip(results, expected_tokens, strict=True):
                assert tokens and tokens == want[:len(tokens)], gateway
                assert len(tokens) == MAX_NEW_TOKENS or tokens[-1] == eos, (tokens, want)
                answered[gateway] += 1
    assert len(answered) == 2, f"after {rounds} rounds of {len(PROMPTS)} concurrent requests: {answered}"
    assert all(g.split("#")[-2] == "expertmesh-gateway" for g in answered), answered
    record_property("report", f"requests per gateway over {rounds} round(s): {sorted(answered.values())}")


@pytest.mark.slow
def test_each_gateway_answers_readiness_and_names_itself(two_gateways):
    """/ready answers per gateway (each replica its own engine), and errors carry the header too; readiness is polled
    until both gateways answered it (the router picks among them), with a deadline."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        r = requests.get(f"{two_gateways}/ready", timeout=60)
        assert r.status_code == 200
        seen[r.headers["x-expertmesh-gateway"]] = r.json()
    assert len(seen) == 2 and all(body == {"status": "ready", "model": "tiny-v3"} for body in seen.values()), seen
    missing = requests.get(f"{two_gateways}/v1/nothing-here", timeout=60)
    assert missing.status_code == 404 and missing.headers["x-expertmesh-gateway"] in seen
