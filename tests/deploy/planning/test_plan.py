"""`expertmesh plan`: replaying recorded routing predicts exactly what the dispatcher sent; synthetic routing, top-M
on traces, impossible combinations, and the command line's table, JSON, plot and calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deploy.cli import main
from deploy.planning.cost_model import Workload
from deploy.planning.hardware import Hardware
from deploy.planning.plan import plan
from deploy.planning.replay import build_placement, replay
from deploy.planning.routing_sources import SyntheticRouting, TraceRouting, expert_loads, load_spec, parse_synthetic
from gateway import Engine
from gateway.config import CacheConfig, DeploymentConfig
from gateway.serving.routing_trace import RequestTrace
from model_core.spec import ConfigError, ModelSpec
from model_core.telemetry import TracingConfig
from router_service.placement import Placement
from tests.conftest import random_prompts

H100 = Path(__file__).parents[3] / "deploy" / "hardware" / "h100.yaml"
HW = Hardware("test", 100.0, 1000.0, 100.0, 2.0, 10.0, 5.0, 2)


@torch.inference_mode()
@pytest.mark.parametrize("top_m", [None, 2])
def test_replaying_recorded_traces_predicts_exactly_what_the_dispatcher_sent(model_dirs, tmp_path, top_m):
    traces = tmp_path / "traces"
    config = DeploymentConfig(model=str(model_dirs["tiny-v3"]), devices=4, backend="local", top_m_devices=top_m,
                              tracing=TracingConfig(routing_trace_dir=str(traces)),
                              cache=CacheConfig(prefix_caching=False))
    with Engine.from_config(config) as engine:
        engine.generate(random_prompts(engine.spec.vocab_size, [11, 7, 19], seed=5), max_new_tokens=5,
                        stop_at_eos=False)
        stats = engine.backend.stats
        spec = engine.spec
        measured = {layer: stats.tokens[layer].clone() for layer in spec.moe_layers}
        sent, received = stats.bytes_sent, stats.bytes_received
    source = TraceRouting(spec, traces)
    assert source.n_tokens == (11 + 4) + (7 + 4) + (19 + 4)  # every position fed to the model, once
    placement = Placement.contiguous(spec.n_routed_experts, 4)
    result = replay(spec, source, placement, top_m, Workload(batch=8, dtype_bytes=4))  # float32 engine
    for j, layer in enumerate(spec.moe_layers):
        assert torch.equal(result.tokens_per_device[j], measured[layer]), f"layer {layer}"
    assert (result.bytes_sent, result.bytes_received) == (sent, received)
    assert result.changed_tokens == 0  # recorded under this placement and M: the limit changes nothing


def test_prefix_cached_positions_are_skipped(tmp_path):
    spec = load_spec("tiny-v3")
    trace = RequestTrace("r0", spec.moe_layers, spec.top_k, prompt_tokens=3, prompt=[5, 6, 7])
    trace.add_cached(2)
    ids = torch.tensor([[[0, 1, 2, 3]] * len(spec.moe_layers)], dtype=torch.int32)  # [1, L, K]
    trace.add([7], ids, torch.full(ids.shape, 0.25), ids, torch.zeros(1, len(spec.moe_layers), dtype=torch.bool),
              torch.zeros(1, len(spec.moe_layers), dtype=torch.bool))
    (tmp_path / "r0.json").write_text(json.dumps(trace.to_json()))
    source = TraceRouting(spec, tmp_path)
    assert source.n_tokens == 1
    assert source.route(0)[0].tolist() == [[0, 1, 2, 3]]


def test_top_m_on_traces_keeps_fitting_tokens_and_limits_the_others(tmp_path):
    spec = load_spec("tiny-v3")  # 16 experts, top-4; 4 devices of 4 experts
    layers = spec.moe_layers
    rows = [[0, 1, 4, 5], [0, 4, 8, 12]]  # token 0 spans devices 0, 1; token 1 spans all four
    weights = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]
    ids = torch.tensor(rows, dtype=torch.int32)[:, None].expand(2, len(layers), 4)
    w = torch.tensor(weights)[:, None].expand(2, len(layers), 4)
    trace = RequestTrace("r", layers, spec.top_k, prompt_tokens=2)
    flags = torch.zeros(2, len(layers), dtype=torch.bool)
    trace.add([5, 6], ids, w, ids, flags, flags)
    (tmp_path / "r.json").write_text(json.dumps(trace.to_json()))
    placement = Placement.contiguous(16, 4)
    got, _, devices = TraceRouting(spec, tmp_path).route(0, placement.members(layers[0]), 2)
    assert sorted(got[0].tolist()) == [0, 1, 4, 5]  # already on 2 devices: replayed exactly
    kept = {int(d) for d in placement.device_tensor()[got[1]]}
    assert kept == {2, 3}  # the two devices whose recorded experts weigh most (group score: top-2 sum)
    assert {8, 12} <= set(got[1].tolist())
    assert devices.shape == (2, 2)


def test_synthetic_zipf_skews_load_and_top_m_bounds_devices_per_token():
    spec = load_spec("small-v3")
    flat = expert_loads(SyntheticRouting(spec, 512, 0.0, seed=1)).double()
    skewed = expert_loads(SyntheticRouting(spec, 512, 1.2, seed=1)).double()
    assert float(skewed.max() / skewed.mean()) > 2 * float(flat.max() / flat.mean())
    assert torch.equal(skewed, expert_loads(SyntheticRouting(spec, 512, 1.2, seed=1)).double())  # seeded
    source = SyntheticRouting(spec, 256, 1.2)
    placement = Placement.contiguous(spec.n_routed_experts, 8)
    one = replay(spec, source, placement, 1, Workload(batch=32))
    assert one.tokens_per_device.sum(dim=1).tolist() == [256] * len(spec.moe_layers)  # each token: one device
    free = replay(spec, source, placement, None, Workload(batch=32))
    assert (free.tokens_per_device.sum(dim=1) > 256).all() and free.changed_tokens == 0 < one.changed_tokens


def test_redundant_slots_give_copies_and_the_replay_serves_every_pair():
    spec = load_spec("small-v3")
    source = SyntheticRouting(spec, 256, 1.2)
    placement = build_placement(spec, expert_loads(source), 8, 8)
    layer = spec.moe_layers[0]
    assert placement.redundant_slots(layer) == 8
    result = replay(spec, source, placement, None, Workload(batch=64, gateways=2))
    pairs = sum(int(t.pairs.sum()) for step in result.steps for t in step)
    assert pairs == 2 * 64 * spec.top_k * len(spec.moe_layers) * len(result.steps)  # every (token, expert) once
    slots = torch.tensor([len(experts) for experts in placement.layout(layer)])
    for t in result.steps[0]:  # a device reads at most the experts it hosts, and some whenever it got tokens
        assert (t.experts_hit <= slots).all() and torch.equal(t.experts_hit > 0, t.tokens > 0)
        assert (t.experts_hit <= t.pairs).all()


def test_impossible_combinations_are_rows_that_say_why():
    spec = load_spec("tiny-v3")
    rows = plan(spec, SyntheticRouting(spec, 64, 1.0), HW, [32, 8], [None, 1], [0], Workload(batch=16))
    assert [r.skipped is not None for r in rows] == [True, True, False, True]
    assert "devices=32" in rows[0].skipped and "top_m_devices=1" in rows[3].skipped
    ok = rows[2]
    assert ok.gpus == 9 and ok.step_ms_overlapped <= ok.step_ms_serial and ok.tokens_per_s_per_gpu_overlapped > 0
    assert ok.tokens_per_device_max >= ok.tokens_per_device_mean > 0


def test_replay_needs_a_full_step():
    spec = load_spec("tiny-v3")
    with pytest.raises(ValueError, match="--batch 64 x --gateways 2 = 128 tokens per step"):
        replay(spec, SyntheticRouting(spec, 100, 1.0), Placement.contiguous(16, 4), None, Workload(64, 2))


def test_models_load_from_a_directory_a_config_file_or_a_name(model_dirs, tmp_path):
    v3 = load_spec("deepseek-v3")
    assert (len(v3.moe_layers), v3.n_routed_experts, v3.top_k, v3.hidden_size) == (58, 256, 8, 7168)
    assert load_spec(str(model_dirs["tiny-v2"])) == ModelSpec.from_dir(model_dirs["tiny-v2"])
    assert load_spec(str(model_dirs["tiny-v2"] / "config.json")) == ModelSpec.from_dir(model_dirs["tiny-v2"])
    with pytest.raises(ConfigError, match="--model 'nope'"):
        load_spec("nope")
    assert parse_synthetic("zipf:1.2") == 1.2
    with pytest.raises(ValueError, match="expected zipf:S"):
        parse_synthetic("uniform")


def test_cli_prints_the_table_and_writes_json_and_a_plot(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = main(["plan", "--model", "small-v3", "--synthetic", "zipf:1.2", "--devices", "4,8", "--top-m", "none,2",
               "--redundant", "0,8", "--hardware", str(H100), "--node-size", "4", "--batch", "16", "--gateways", "2",
               "--tokens", "128", "--json", str(out), "--png", str(png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "tok/s/GPU" in printed and "h100-sxm (4 GPUs/node)" in printed
    report = json.loads(out.read_text())
    assert report["hardware"]["gpus_per_node"] == 4 and report["workload"]["gateways"] == 2
    rows = report["rows"]
    assert [(r["devices"], r["top_m"], r["redundant"]) for r in rows] == [
        (d, m, r) for d in (4, 8) for r in (0, 8) for m in (None, 2)]
    assert all(r["skipped"] is None for r in rows)
    d8 = [r for r in rows if r["devices"] == 8]
    assert all(r["inter_node_bytes_per_token"] > 0 for r in d8)  # 8 devices on two 4-GPU nodes
    assert all(r["intra_node_bytes_per_token"] > 0 for r in rows)
    assert all(r["step_ms_overlapped"] <= r["step_ms_serial"] for r in rows)
    assert all(len(r["exact"]["tokens_per_device"]) == 4 for r in rows)
    assert png.stat().st_size > 0


def test_cli_replays_a_trace_directory(model_dirs, tmp_path, capsys):
    traces = tmp_path / "traces"
    config = DeploymentConfig(model=str(model_dirs["tiny-v3"]), tracing=TracingConfig(routing_trace_dir=str(traces)))
    with Engine.from_config(config) as engine:
        engine.generate(random_prompts(engine.spec.vocab_size, [12], seed=2), max_new_tokens=4, stop_at_eos=False)
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", str(model_dirs["tiny-v3"]), "--traces", str(traces), "--devices", "2,4",
               "--top-m", "none,1", "--hardware", str(H100), "--batch", "5", "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    rows = json.loads(out.read_text())["rows"]
    assert [r["skipped"] is None for r in rows] == [True] * 4
    assert all(sum(r["exact"]["tokens_per_device"][0]) == 15 for r in rows if r["top_m"] == 1)  # 15 positions


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(H100.read_text().replace("hbm_gbytes_per_s: 3350", "hbm_gbytes_per_s: -1"))
    cases = [
        (["--synthetic", "zipf:1", "--hardware", str(bad)], "hbm_gbytes_per_s=-1: expected a number > 0"),
        (["--synthetic", "zipf:1"], "--hardware: required"),
        (["--hardware", str(H100)], "--traces DIR or --synthetic zipf:S"),
        (["--traces", str(tmp_path), "--hardware", str(H100)], "no routing traces"),
    ]
    for extra, message in cases:
        assert main(["plan", "--model", "tiny-v3", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_calibrate_writes_a_hardware_file_with_measured_compute_and_memory(tmp_path, capsys):
    out = tmp_path / "here.yaml"
    assert main(["plan", "--calibrate", str(out), "--hardware", str(H100), "--transports", "none"]) == 0
    assert "link rates copied from" in capsys.readouterr().out
    measured, nominal = Hardware.from_yaml(out), Hardware.from_yaml(H100)
    assert measured.name == "here" and measured.matmul_tflops > 0 and measured.hbm_gbytes_per_s > 0
    assert measured.inter_node_gbytes_per_s == nominal.inter_node_gbytes_per_s
    assert measured.transports == {} and measured.experts is None
    assert "measured" in out.read_text() and "not measured" in out.read_text()
    assert main(["plan", "--calibrate", str(out), "--hardware", str(H100)]) == 2  # transports need --model


