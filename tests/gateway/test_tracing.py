"""Tracing: one connected trace across gateway and expert-group processes; routing traces match the routing used."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import gateway.model.model as gateway_model
from gateway import Engine
from gateway.config import DeploymentConfig
from model_core.telemetry import TracingConfig
from router_service.routing import route_tokens
from tests.conftest import random_prompts


def read_spans(directory) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("*.jsonl")) for line in f.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray", "grpc"])
def test_one_trace_connects_gateway_and_expert_group_processes(backend, model_dirs, ray_cluster, tmp_path):
    traces = tmp_path / "spans"
    cfg = DeploymentConfig(model=str(model_dirs["tiny-v3"]), backend=backend, devices=2,
                           tracing=TracingConfig(exporter="jsonl", jsonl_dir=str(traces)))
    engine = Engine.from_config(cfg)
    try:
        engine.generate(random_prompts(272, [7], seed=3), max_new_tokens=4, stop_at_eos=False)
        request = engine.routing_trace(engine.last_request_ids[0])
    finally:
        engine.close()  # flushes the gateway's spans and, through each actor's shutdown(), the groups'
    spans = read_spans(traces)
    by_id = {s["span_id"]: s for s in spans}
    assert len({s["trace_id"] for s in spans}) == 1  # one request, one trace
    services = {s["service"] for s in spans}
    assert services == {"gateway", "expert-group-0", "expert-group-1"}
    pids = {s["service"]: s["pid"] for s in spans}
    assert len(set(pids.values())) == 3  # three processes
    root = [s for s in spans if s["parent_span_id"] is None]
    assert [r["name"] for r in root] == ["generate"]
    servers = [s for s in spans if s["name"] == "expert_group.forward"]
    clients = [s for s in spans if s["name"].startswith("dispatch device")]
    assert servers and len(servers) == len(clients)
    for server in servers:  # server ← client (gateway) ← moe_layer ← step ← generate
        client = by_id[server["parent_span_id"]]
        assert client["service"] == "gateway" and client["kind"] == "CLIENT"
        assert client["attributes"]["expertmesh.device"] == server["attributes"]["expertmesh.device"]
        assert server["service"] == f"expert-group-{server['attributes']['expertmesh.device']}"
        assert server["attributes"]["expertmesh.tokens"] == client["attributes"]["expertmesh.tokens"]
        assert server["attributes"]["expertmesh.transport"] == backend
        layer_span = by_id[client["parent_span_id"]]
        assert layer_span["name"] == "moe_layer"
        assert layer_span["attributes"]["expertmesh.layer"] == client["attributes"]["expertmesh.layer"]
        step = by_id[layer_span["parent_span_id"]]
        assert step["name"] in ("prefill", "decode_step", "mixed_step")
        assert by_id[step["parent_span_id"]]["name"] == "generate"
    # token rows sent per (layer, device) over the request equal what its routing trace implies
    sent = Counter()
    for c in clients:
        sent[(c["attributes"]["expertmesh.layer"], c["attributes"]["expertmesh.device"])] += c["attributes"][
            "expertmesh.tokens"]
    implied = Counter()
    for p in range(len(request.tokens)):
        for j, layer in enumerate(request.layers):
            for d in set(request.devices[p, j].tolist()):
                implied[(layer, d)] += 1
    assert sent == implied
    assert all(c["attributes"]["expertmesh.bytes_sent"] > 0 and c["attributes"]["expertmesh.bytes_received"] > 0
               for c in clients)


def test_routing_trace_equals_the_routing_the_engine_used(model_dirs, monkeypatch):
    used: list[tuple[int, torch.Tensor]] = []
    original = gateway_model.route_tokens

    def recording(hidden, gate, spec, *args):
        routing = original(hidden, gate, spec, *args)
        recomputed = route_tokens(hidden.clone(), gate, spec, *args)  # the router again, on the same hidden states
        assert torch.equal(recomputed.ids, routing.ids)
        used.append((hidden.shape[0], routing.ids.clone()))
        return routing

    monkeypatch.setattr(gateway_model, "route_tokens", recording)
    with Engine.from_pretrained(model_dirs["tiny-v2-group"]) as engine:
        prompt = random_prompts(272, [6], seed=1)[0]
        new = engine.generate([prompt], max_new_tokens=5, stop_at_eos=False)[0]
        trace = engine.routing_trace(engine.last_request_ids[0])
    layers = trace.layers
    per_step = [torch.stack([ids for _, ids in used[i : i + len(layers)]], dim=1) for i in range(0, len(used),
                                                                                              len(layers))]
    assert torch.equal(trace.ids, torch.cat(per_step).to(torch.int32))
    assert trace.tokens == prompt + new[:-1]  # every token fed to the model; the last sampled one never was
    assert trace.routed_experts().shape == (len(prompt) + 4, len(layers), engine.spec.top_k)
    assert trace.routed_experts().dtype.name == "int32"
    assert trace.weights.shape == trace.ids.shape and (trace.devices == 0).all()
    assert not trace.changed_by_top_m.any() and not trace.changed_by_bias.any()


def test_store_evicts_the_oldest_request_and_its_file(model_dirs, tmp_path):
    cfg = DeploymentConfig(model=str(model_dirs["tiny-v3"]), tracing=TracingConfig(
        routing_trace_capacity=2, routing_trace_dir=str(tmp_path)))
    with Engine.from_config(cfg) as engine:
        ids = []
        for seed in range(3):
            engine.generate(random_prompts(272, [4], seed=seed), max_new_tokens=2, request_ids=[f"req-{seed}"])
            ids.append(engine.last_request_ids[0])
        assert ids == ["req-0", "req-1", "req-2"]
        with pytest.raises(KeyError, match="'req-0': no routing trace .* keeps the last 2 requests"):
            engine.routing_trace("req-0")
        assert engine.routing_trace("req-2").request_id == "req-2" and engine.traces.evicted == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["req-1.json", "req-2.json"]
        with pytest.raises(ValueError, match="request_id='req-2': already traced"):
            engine.generate([[5, 6]], max_new_tokens=1, request_ids=["req-2"])
        with pytest.raises(ValueError, match="request_ids: expected 2 distinct ids"):
            engine.generate([[5, 6], [7]], max_new_tokens=1, request_ids=["a", "a"])


def test_trace_flags_what_top_m_changed(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v3"], devices=4, top_m_devices=1) as engine:
        engine.generate(random_prompts(272, [12], seed=2), max_new_tokens=3)
        trace = engine.routing_trace(engine.last_request_ids[0])
    assert trace.changed_by_top_m.any() and not trace.changed_by_bias.any()
    assert all(len(set(trace.devices[p, j].tolist())) == 1 for p in range(len(trace.tokens)) for j in range(2))


def test_trace_cli_prints_table_json_and_heatmap(model_dirs, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, timeout=120)

    gen = cli("generate", "--model", str(model_dirs["tiny-v3"]), "--prompt-ids", "4,5,6", "--max-new-tokens", "3",
              "--trace-dir", str(tmp_path), "--json")
    assert gen.returncode == 0, gen.stderr
    rid = json.loads(gen.stdout)["request_id"]
    table = cli("trace", rid, "--dir", str(tmp_path), "--png", str(tmp_path / "h.png"))
    assert table.returncode == 0, table.stderr
    assert f"request {rid}: 5 positions (3 prompt)" in table.stdout
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = json.loads(cli("trace", rid, "--dir", str(tmp_path), "--json").stdout)
    assert len(as_json["expert_ids"]) == 5 and len(as_json["expert_ids"][0]) == 2
    missing = cli("trace", "nope", "--dir", str(tmp_path))
    assert missing.returncode == 2 and "no routing trace for request 'nope'" in missing.stderr


def test_continuous_batching_steps_link_to_every_request_they_serve(model_dirs, tmp_path):
    cfg = DeploymentConfig(model=str(model_dirs["tiny-v3"]), devices=2,
                           tracing=TracingConfig(exporter="jsonl", jsonl_dir=str(tmp_path)))
    engine = Engine.from_config(cfg)
    try:
        a = engine.submit([5, 6, 7], max_new_tokens=3, request_id="a")
        engine.step()
        b = engine.submit([8, 9], max_new_tokens=3, request_id="b")  # joins while a decodes
        while engine.has_work():
            engine.step()
        assert a.done and b.done
    finally:
        engine.close()
    spans = read_spans(tmp_path)
    requests_ = {s["attributes"]["expertmesh.request_id"]: s for s in spans if s["name"] == "request"}
    assert set(requests_) == {"a", "b"} and all(r["parent_span_id"] is None for r in requests_.values())
    assert requests_["a"]["attributes"]["expertmesh.completion_tokens"] == 3
    steps = [s for s in spans if s["name"] in ("prefill", "decode_step", "mixed_step")]
    linked = {link for s in steps for link in s["links"]}
    assert {requests_["a"]["span_id"], requests_["b"]["span_id"]} <= linked
    assert any(s["name"] == "mixed_step" and len(s["links"]) == 2 for s in steps)  # b's prefill + a's decode
