"""The step priced from calibrated rates (local_step.py): a hand-worked example with two gateways meeting at a
replica, the fall-backs to rooflines and link rates, `--transport` choosing the pricing, and a smoke run of the
benchmark that compares the price with measured steps (benchmarks/plan_step.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deploy.planning.command import local_pricing
from deploy.planning.cost_model import LayerTraffic, Workload, gateway_moe_seconds, other_step_seconds
from deploy.planning.hardware import ExpertRate, GatewayRate, Hardware, TransportRate, hardware_yaml
from deploy.planning.local_step import LocalPricing, gateway_step_seconds, local_step_cost, pricing_label
from deploy.planning.plan import plan
from deploy.planning.replay import build_placement, replay
from deploy.planning.routing_sources import SyntheticRouting
from model_core.make_model import preset_config
from model_core.spec import ModelSpec

ROOT = Path(__file__).parents[3]
HW = Hardware("test", 100.0, 1000.0, 100.0, 2.0, 10.0, 5.0, 2)
TINY = ModelSpec.from_dict(preset_config("tiny-v3"))
CALIBRATED = dataclasses.replace(HW, transports={"ray": TransportRate(call_us=1000.0, us_per_mb=500.0)},
                                 experts=ExpertRate(100.0, ((1.0, 200.0), (4.0, 500.0))),
                                 gateway=GatewayRate(base_us=5000.0, per_token_us=100.0, threads=1))

# 2 gateways, 2 devices: gateway 0 reaches device 0 only (1 MB out, 1 MB back); gateway 1 both (0.5 + 0.5 MB to
# device 0, 1 + 1 MB to device 1). Device 0 computes 8 pairs over 4 experts, device 1 4 pairs over 4 experts. No
# first gateway's part recorded: each device prices one pass of every pair.
LAYER = LayerTraffic(tokens=torch.tensor([5, 3]), pairs=torch.tensor([8, 4]), experts_hit=torch.tensor([4, 4]),
                     bytes_out=torch.tensor([[1_000_000, 0], [500_000, 1_000_000]]),
                     bytes_back=torch.tensor([[1_000_000, 0], [500_000, 1_000_000]]))


def test_the_step_is_the_gateway_plus_each_layers_slowest_call_or_the_cpu_work_over_the_cores():
    work = Workload(batch=4, gateways=2)
    # Round trips (1000 us + 500 us/MB): g0->d0 2 MB 2000 us, g1->d0 1 MB 1500 us, g1->d1 2 MB 2000 us.
    # Merged passes (100 us + experts x per-expert(rows)): d0 4 experts x 2 rows = 100 + 4 x 300 = 1300 us;
    # d1 4 x 1 row = 100 + 4 x 200 = 900 us. Slowest call: g0->d0, 2000 + 1300 = 3300 us.
    # Gateway: 5000 + 100 x 4 = 5400 us. Path: 5400 + 2 x 3300 = 12000 us.
    # CPU: 2 gateways x 5400 + 2 layers x (trips 5500 + passes 2200) = 26200 us.
    two_cores = local_step_cost([LAYER, LAYER], TINY, CALIBRATED, work, LocalPricing("ray", cores=2))
    assert [(c.dispatch_s, c.expert_s, c.combine_s) for c in two_cores.layers] == [
        pytest.approx((2000e-6, 1300e-6, 0.0))] * 2
    assert two_cores.other_s == pytest.approx(5400e-6)
    assert two_cores.serial_s == pytest.approx(26200e-6 / 2)  # the cores bound it
    four_cores = local_step_cost([LAYER, LAYER], TINY, CALIBRATED, work, LocalPricing("ray", cores=4))
    assert four_cores.serial_s == pytest.approx(12000e-6) == four_cores.overlapped_s  # the path bounds it
    assert four_cores.layers[0].bytes_intra == 5_000_000 and four_cores.layers[0].bytes_inter == 0
    # caller_us 600: gateway 1 sends two calls, so each of its calls waits for the other's caller part first:
    # g1->d1 2000 + 600 + 900 = 3500 us is now the slowest. Path: 5400 + 2 x 3500 = 12400 us; CPU unchanged.
    queued = dataclasses.replace(CALIBRATED, transports={"ray": TransportRate(1000.0, 500.0, caller_us=600.0)})
    cost = local_step_cost([LAYER, LAYER], TINY, queued, work, LocalPricing("ray", cores=4))
    assert (cost.layers[0].dispatch_s, cost.layers[0].expert_s) == pytest.approx((2600e-6, 900e-6))
    assert cost.serial_s == pytest.approx(12400e-6)
    assert local_step_cost([LAYER], TINY, queued, work, LocalPricing("ray", cores=1)).serial_s == pytest.approx(
        5400e-6 * 2 + 5500e-6 + 2200e-6)


def test_without_joining_the_first_gateways_call_is_computed_alone_and_the_others_wait_for_a_second_pass():
    # As LAYER, but gateway 1 sends device 0 0.6 + 0.6 MB, and the plan recorded gateway 0's part: 6 pairs over 3
    # experts on device 0; the other gateway's pairs hit 2 experts on device 0 and 4 on device 1.
    layer = dataclasses.replace(LAYER, bytes_out=torch.tensor([[1_000_000, 0], [600_000, 1_000_000]]),
                                bytes_back=torch.tensor([[1_000_000, 0], [600_000, 1_000_000]]),
                                first_pairs=torch.tensor([6, 0]), first_hits=torch.tensor([3, 0]),
                                rest_hits=torch.tensor([2, 4]))
    work = Workload(batch=4, gateways=2)
    # Passes: d0 first 100 + 3 x 300 (2 rows each) = 1000 us, then 2 pairs over 2 experts 100 + 2 x 200 = 500 us;
    # d1 first none, then 4 over 4: 900 us. Gateway 0 waits 1000 us at d0; gateway 1 1500 us at d0, 900 us at d1.
    # Calls: g0->d0 2000 + 1000, g1->d0 1600 + 1500 = 3100 (the slowest), g1->d1 2000 + 900 us.
    # Path: 5400 + 2 x 3100 = 11600 us. CPU: 2 x 5400 + 2 x (trips 5600 + passes 2400) = 26800 us.
    cost = local_step_cost([layer, layer], TINY, CALIBRATED, work, LocalPricing("ray", cores=4, joining=False))
    assert (cost.layers[0].dispatch_s, cost.layers[0].expert_s) == pytest.approx((1600e-6, 1500e-6))
    assert cost.serial_s == pytest.approx(11600e-6)
    assert local_step_cost([layer] * 2, TINY, CALIBRATED, work, LocalPricing("ray", 2, joining=False)).serial_s == \
        pytest.approx(26800e-6 / 2)
    # Joining (the default): both gateways' calls are one pass of all pairs, which both wait for: d0 8 pairs over 4
    # experts (2 rows each) 100 + 4 x 300 = 1300 us, d1 900 us. Calls: g0->d0 2000 + 1300 = 3300 (the slowest),
    # g1->d0 1600 + 1300, g1->d1 2000 + 900. Path: 5400 + 2 x 3300 = 12000 us. CPU: 2 x 5400 + 2 x (5600 + 2200).
    joined = local_step_cost([layer, layer], TINY, CALIBRATED, work, LocalPricing("ray", cores=4))
    assert (joined.layers[0].dispatch_s, joined.layers[0].expert_s) == pytest.approx((2000e-6, 1300e-6))
    assert joined.serial_s == pytest.approx(12000e-6)
    assert local_step_cost([layer] * 2, TINY, CALIBRATED, work, LocalPricing("ray", 2)).serial_s == pytest.approx(
        26400e-6 / 2)
    one = Workload(batch=4, gateways=1)  # one gateway: its call is the only one, one pass of every pair
    alone = dataclasses.replace(layer, bytes_out=layer.bytes_out[:1], bytes_back=layer.bytes_back[:1])
    assert local_step_cost([alone], TINY, CALIBRATED, one, LocalPricing("ray", 4)).layers[0].expert_s == \
        pytest.approx(1300e-6)


def test_the_replay_records_the_first_gateways_part_of_every_device_pass():
    work = Workload(batch=8, gateways=3)
    source = SyntheticRouting(TINY, 8 * 3 * 4, 0.3, seed=int(torch.randint(0, 1000, ())))
    result = replay(TINY, source, build_placement(TINY, None, 2, 0), None, work)
    for step in result.steps:
        for t in step:
            assert torch.all(t.first_pairs <= t.pairs) and torch.all(t.first_hits <= t.experts_hit)
            assert torch.all(t.rest_hits <= t.experts_hit)
            assert torch.all(t.experts_hit <= t.first_hits + t.rest_hits)  # the union of the two parts
            assert torch.all((t.first_pairs > 0) == (t.bytes_out[0] > 0))


def test_without_a_calibrated_gateway_or_experts_the_step_falls_back_to_rooflines():
    work = Workload(batch=4, gateways=2, context=64)
    bare = dataclasses.replace(CALIBRATED, gateway=None, experts=None)
    roofline = other_step_seconds(TINY, bare, work) + len(TINY.moe_layers) * gateway_moe_seconds(TINY, bare, work)
    assert gateway_step_seconds(TINY, bare, work) == pytest.approx(roofline)
    assert gateway_step_seconds(TINY, CALIBRATED, work) == pytest.approx(5400e-6)
    label = pricing_label(bare, LocalPricing("ray", 2))
    assert "GPU roofline (no calibrated gateway)" in label and "GPU roofline (no calibrated experts)" in label
    cost = local_step_cost([LAYER], TINY, bare, work, LocalPricing("ray", cores=64))
    assert cost.layers[0].dispatch_s == pytest.approx(2000e-6)  # the calibrated hop stays
    with pytest.raises(ValueError, match="transport 'grpc': test has no calibrated rate"):
        local_step_cost([LAYER], TINY, CALIBRATED, work, LocalPricing("grpc", cores=2))


def test_transport_chooses_calibrated_pricing_when_the_file_has_it_and_link_rates_otherwise():
    assert local_pricing(CALIBRATED, "auto", 3) == LocalPricing("ray", 3)
    assert local_pricing(CALIBRATED, "auto", 3, joining=False) == LocalPricing("ray", 3, joining=False)
    assert local_pricing(dataclasses.replace(CALIBRATED, cores=1.4), "ray", None) == LocalPricing("ray", 1.4)
    assert local_pricing(CALIBRATED, "links", 3) is None
    assert local_pricing(HW, "auto", None) is None  # a nominal file: link rates
    with pytest.raises(ValueError, match="--transport 'grpc': test has no calibrated rate"):
        local_pricing(CALIBRATED, "grpc", 2)
    assert "nominal rates (unvalidated)" in pricing_label(HW, None)
    work = Workload(batch=8, gateways=2, context=32)
    source = SyntheticRouting(TINY, 256, 0.5, seed=int(torch.randint(0, 1000, ())))
    (linked,) = plan(TINY, source, CALIBRATED, [2], [None], [0], work)
    (nominal,) = plan(TINY, source, HW, [2], [None], [0], work)
    assert linked.step_ms_serial == pytest.approx(nominal.step_ms_serial)  # calibrated rates unused at link rates
    (local,) = plan(TINY, source, CALIBRATED, [2], [None], [0], work, LocalPricing("ray", 2))
    assert local.pricing.startswith("calibrated ray") and local.gateway_step_ms == pytest.approx(5.8)
    assert local.step_ms_serial > local.gateway_step_ms + len(TINY.moe_layers) * 1.0  # one 1 ms call per layer


@pytest.mark.slow
def test_the_benchmark_compares_predicted_with_measured_steps(model_dirs, tmp_path):
    # Priced from a given file (calibrating is tested through `expertmesh plan --calibrate`, test_calibrate.py):
    # CALIBRATED's rates with a caller part, so the prediction is the planner's on exactly these numbers.
    hw = dataclasses.replace(CALIBRATED, transports={"ray": TransportRate(1000.0, 500.0, caller_us=300.0)}, cores=2.0)
    given = tmp_path / "given.yaml"
    given.write_text(hardware_yaml(hw, {}))
    out = tmp_path / "plan_step.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_step.py"), "--quick", "--model",
                    str(model_dirs["tiny-v3"]), "--dtype", "float32", "--steps", "2", "--hardware", str(given),
                    "--json", str(out)], check=True, timeout=900, cwd=ROOT)
    report = json.loads(out.read_text())
    assert Hardware.from_dict(report["hardware"]) == hw
    assert [(r["devices"], r["gateways"]) for r in report["rows"]] == [(1, 1), (2, 2)]
    spec = ModelSpec.from_dir(model_dirs["tiny-v3"])
    for r in report["rows"]:
        assert r["measured_ms"] > 0 and len(r["measured_ms_per_gateway"]) == r["gateways"]
        work = Workload(batch=16, gateways=r["gateways"], context=16 + 2)  # 16 prompt tokens, 2 steps
        source = SyntheticRouting(spec, 16 * r["gateways"] * 32, 0.0, seed=0)
        (row,) = plan(spec, source, hw, [r["devices"]], [None], [0], work, LocalPricing("ray", 2.0))
        assert r["predicted_ms"] == pytest.approx(row.step_ms_serial)  # the planner's own price
        assert r["ratio"] == pytest.approx(r["predicted_ms"] / r["measured_ms"])
        assert r["within"] == (abs(r["ratio"] - 1) <= 0.25)
