"""Calibration measures each transport, the expert compute and a gateway's own step through real deployments, and
the dispatcher's layer log (what the planner's check prices) records every call exactly as the counters count it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from deploy.cli import main
from deploy.planning.calibrate import fit_least_squares, nondecreasing
from deploy.planning.cost_model import local_layer_seconds
from deploy.planning.hardware import Hardware
from gateway import Engine
from tests.conftest import random_prompts

H100 = Path(__file__).resolve().parents[3] / "deploy" / "hardware" / "h100.yaml"


def test_the_layer_log_records_each_call_as_the_dispatch_counters_count_it(model_dirs):
    with Engine.from_pretrained(model_dirs["tiny-v3"], devices=2, top_m_devices=1) as engine:
        stats = engine.backend.stats
        stats.keep_layers(10_000)
        tokens_before = {layer: c.clone() for layer, c in stats.tokens.items()}
        sent, back, calls = stats.bytes_sent, stats.bytes_received, stats.calls
        engine.generate(random_prompts(272, [6, 9, 4], seed=50), max_new_tokens=5)
        log = list(stats.layer_log)
        assert len(log) == stats.layers and all(r.seconds > 0 for r in log)
        for layer, counts in stats.tokens.items():
            rows = torch.zeros_like(counts)
            for record in (r for r in log if r.layer == layer):
                for c in record.calls:
                    rows[c.device] += c.rows
            assert torch.equal(rows, counts - tokens_before.get(layer, torch.zeros_like(counts)))
        assert sum(c.bytes_out for r in log for c in r.calls) == stats.bytes_sent - sent
        assert sum(c.bytes_back for r in log for c in r.calls) == stats.bytes_received - back
        assert sum(len(r.calls) for r in log) == stats.calls - calls
        # Top-1 device: every token's experts sit on the one device it reaches, so the pairs are all its slots.
        assert all(sum(c.pairs for c in r.calls) == sum(c.rows for c in r.calls) * engine.spec.top_k for r in log)
        assert all(0 < c.experts_hit <= c.pairs and c.compute_ms >= 0 for r in log for c in r.calls)


def test_least_squares_recovers_a_linear_cost():
    points = [([1.0, mb], 300.0 + 40.0 * mb) for mb in (0.0, 0.5, 2.0, 8.0)]
    assert fit_least_squares(points) == pytest.approx([300.0, 40.0])


def test_per_expert_costs_are_made_non_decreasing_by_pooling_the_points_that_fall():
    gen = torch.Generator().manual_seed(9)
    rising = torch.rand(7, generator=gen).cumsum(0).tolist()
    assert nondecreasing(rising) == pytest.approx(rising)  # already non-decreasing: unchanged
    noisy = (torch.tensor(rising) + torch.randn(7, generator=gen)).tolist()
    fixed = nondecreasing(noisy)
    assert all(a <= b for a, b in zip(fixed, fixed[1:], strict=False))
    assert sum(fixed) == pytest.approx(sum(noisy))  # pooling keeps each run's mean
    assert nondecreasing([3.0, 1.0, 2.0, 5.0]) == pytest.approx([2.0, 2.0, 2.0, 5.0])


@pytest.mark.slow
def test_calibration_measures_every_transport_and_the_experts_through_real_deployments(model_dirs, ray_cluster,
                                                                                      tmp_path, capsys):
    out = tmp_path / "here.yaml"  # `expertmesh plan --calibrate`: calibrate_local, then the file it writes
    assert main(["plan", "--calibrate", str(out), "--hardware", str(H100), "--transports", "ray,grpc",
                 "--model", str(model_dirs["tiny-v3"]), "--dtype", "float32"]) == 0
    assert "ray: " in capsys.readouterr().out
    loaded = Hardware.from_yaml(out)
    rates, experts, gateway = loaded.transports, loaded.experts, loaded.gateway
    assert set(rates) == {"ray", "grpc"}
    assert gateway is not None and gateway.threads == 1 and gateway.base_us + 16 * gateway.per_token_us > 0
    assert loaded.cores is not None and 0 < loaded.cores <= (os.cpu_count() or 1)
    assert all(r.call_us > 0 and r.us_per_mb >= 0 and 0 <= r.caller_us <= r.call_us for r in rates.values())
    assert experts is not None and [r for r, _ in experts.per_expert_us] == [1, 2, 4, 8, 16, 32, 64]
    assert experts.base_us >= 0 and all(t >= 0 for _, t in experts.per_expert_us)
    base = Hardware.from_yaml(H100)
    assert loaded.matmul_tflops > 0 and loaded.hbm_gbytes_per_s > 0  # measured here
    assert dataclasses.replace(base, name=loaded.name, matmul_tflops=loaded.matmul_tflops,
                               hbm_gbytes_per_s=loaded.hbm_gbytes_per_s, transports=rates, experts=experts,
                               gateway=gateway, cores=loaded.cores) == loaded  # the link rates come from --hardware
    one_call = local_layer_seconds([(10_000, 12, 6)], rates["ray"], experts, cores=1)
    assert one_call >= rates["ray"].call_us * 1e-6  # at least the round trip it measured
