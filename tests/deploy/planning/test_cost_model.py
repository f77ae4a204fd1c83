"""Cost model: every formula checked on hand-worked numbers, and a local layer priced from calibrated rates."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deploy.planning.cost_model import (
    LayerCost,
    LayerTraffic,
    StepCost,
    Workload,
    attention_seconds,
    device_nodes,
    expert_seconds,
    gateway_moe_seconds,
    gateway_nodes,
    layer_cost,
    local_layer_seconds,
    other_step_seconds,
    roofline_seconds,
    split_bytes,
    step_cost,
    tokens_per_s_per_gpu,
    transfer_seconds,
)
from deploy.planning.hardware import ExpertRate, Hardware, TransportRate
from model_core.make_model import preset_config
from model_core.spec import ModelSpec

# 100 TFLOP/s, 1000 GB/s HBM; NVLink 100 GB/s + 2 us per message; IB 10 GB/s + 5 us; 2 GPUs per node.
HW = Hardware("test", 100.0, 1000.0, 100.0, 2.0, 10.0, 5.0, 2)
SLOW_MATH = dataclasses.replace(HW, matmul_tflops=1e-6)  # 1e6 FLOP/s: every kernel is compute-bound
TINY = ModelSpec.from_dict(preset_config("tiny-v3"))  # H 64, I 32, 16 experts, heads 4, q_lora 48, kv_lora 32


def test_workload_values_are_named():
    with pytest.raises(ValueError, match="batch=0: expected an integer >= 1"):
        Workload(batch=0)
    with pytest.raises(ValueError, match="gateways=1.5"):
        Workload(batch=1, gateways=1.5)
    assert Workload(batch=32, gateways=4).tokens_per_step == 128


def test_roofline_takes_the_slower_of_compute_and_memory():
    assert roofline_seconds(2e14, 1e9, HW) == pytest.approx(2.0)  # 2e14 FLOP at 1e14/s; 1 GB at 1e12 B/s
    assert roofline_seconds(1e9, 5e12, HW) == pytest.approx(5.0)


def test_expert_time_per_device_is_flops_or_the_weights_of_the_experts_hit():
    # 3·H·I = 6144 parameters per expert. Device 0: 10 pairs -> 122880 FLOP (1.2e-9 s), 2 experts -> 24576 B
    # (2.46e-8 s); device 2: 3 pairs, 3 experts -> 36864 B (3.69e-8 s). Memory-bound at these rates.
    traffic = LayerTraffic(torch.tensor([5, 0, 3]), torch.tensor([10, 0, 3]), torch.tensor([2, 0, 3]),
                           torch.zeros(1, 3), torch.zeros(1, 3))
    assert expert_seconds(traffic, TINY, HW, 2).tolist() == pytest.approx([2.4576e-8, 0.0, 3.6864e-8])
    assert expert_seconds(traffic, TINY, SLOW_MATH, 2).tolist() == pytest.approx([0.12288, 0.0, 0.036864])


def test_mla_decode_attention_counts_absorbed_flops_and_latent_bytes():
    # tiny-v3, 10 tokens over 100 cached each. Per token MACs: q 64·48 + 48·4·24 = 7680, kv_a 64·40 = 2560,
    # W_UK 4·16·32 = 2048, scores + values 4·100·(2·32 + 8) = 28800, W_UV 4·32·16 = 2048, o 4·16·64 = 4096
    # -> 47232; FLOPs 2·47232·10 = 944640. Bytes: weights 7680 + 2560 + 32·4·32 + 4096 = 18432 values, cache
    # 10·100·40 = 40000 values, 2 bytes each -> 116864.
    work = Workload(batch=10, context=100)
    assert attention_seconds(TINY, SLOW_MATH, work) == pytest.approx(944640 / 1e6)
    assert attention_seconds(TINY, HW, work) == pytest.approx(116864 / 1e12)


def test_gateway_work_per_moe_layer_and_outside_them():
    work = Workload(batch=10, context=100)
    attention = 0.94464
    router = 2 * 64 * 16 * 10 / 1e6  # H x E gate
    shared = 2 * 3 * 64 * 32 * 10 / 1e6  # one shared expert of width 32
    assert gateway_moe_seconds(TINY, SLOW_MATH, work) == pytest.approx(attention + router + shared)
    dense_mlp = 2 * 3 * 64 * 160 * 10 / 1e6  # one dense layer (first_k_dense_replace = 1) of width 160
    head = 2 * 64 * 272 * 10 / 1e6
    assert other_step_seconds(TINY, SLOW_MATH, work) == pytest.approx(attention + dense_mlp + head)


def test_nodes_fill_consecutively_and_gateways_spread():
    assert device_nodes(5, 2).tolist() == [0, 0, 1, 1, 2]
    assert gateway_nodes(4, 5, 2).tolist() == [0, 1, 2, 0]


def test_transfer_time_is_the_slowest_endpoint_with_its_messages():
    # One gateway on node 0; devices 0, 1 on node 0 and 2, 3 on node 1. Gateway: NVLink 1 MB / 100 GB/s = 10 us,
    # IB 0.3 MB / 10 GB/s = 30 us, at once -> 30 us, + 1 intra message (2 us) + 2 inter (10 us) = 42 us.
    # Devices: 10 + 2 = 12 us, none, 20 + 5 = 25 us, 10 + 5 = 15 us. The phase: 42 us.
    nbytes = torch.tensor([[1_000_000, 0, 200_000, 100_000]])
    gw, dev = gateway_nodes(1, 4, 2), device_nodes(4, 2)
    assert transfer_seconds(nbytes, gw, dev, HW) == pytest.approx(42e-6)
    assert split_bytes(nbytes, gw, dev) == (1_000_000, 300_000)
    # A device reached by two gateways (nodes 0 and 1) pays two messages and all their bytes.
    two = torch.tensor([[0, 0, 0, 1_000_000], [0, 0, 0, 1_000_000]])
    # device 3 (node 1): intra 1 MB from gateway 1 -> 10 us; inter 1 MB from gateway 0 -> 100 us; + 2 + 5 us.
    assert transfer_seconds(two, gateway_nodes(2, 4, 2), dev, HW) == pytest.approx(107e-6)


def test_layer_and_step_costs_with_and_without_overlap():
    c = LayerCost(gateway_s=5.0, dispatch_s=1.0, expert_s=2.0, combine_s=1.0, bytes_intra=0, bytes_inter=0)
    assert (c.serial_s, c.overlapped_s) == (9.0, 5.0)
    d = dataclasses.replace(c, gateway_s=1.0)
    assert (d.serial_s, d.overlapped_s) == (5.0, 4.0)
    step = StepCost((c, d), other_s=0.5)
    assert (step.serial_s, step.overlapped_s) == (14.5, 9.5)
    # 2 gateways x 64 tokens every 0.1 s over 6 expert GPUs + 2 gateway GPUs.
    assert tokens_per_s_per_gpu(0.1, Workload(batch=64, gateways=2), 6) == pytest.approx(160.0)


def test_step_cost_prices_each_layer_from_its_traffic():
    work = Workload(batch=10, context=100)
    traffic = LayerTraffic(torch.tensor([4, 6]), torch.tensor([8, 12]), torch.tensor([2, 3]),
                           torch.tensor([[1000, 0]]), torch.tensor([[500, 0]]))
    step = step_cost([traffic, traffic], TINY, HW, work)
    gw, dev = gateway_nodes(1, 2, 2), device_nodes(2, 2)
    expected = LayerCost(gateway_moe_seconds(TINY, HW, work), transfer_seconds(traffic.bytes_out, gw, dev, HW),
                         float(expert_seconds(traffic, TINY, HW, 2).max()),
                         transfer_seconds(traffic.bytes_back, gw, dev, HW), 1500, 0)
    assert step.layers == (expected, expected)
    assert step.other_s == other_step_seconds(TINY, HW, work)
    assert layer_cost(traffic, TINY, HW, work, 1.0).gateway_s == 1.0


# -- calibrated local rates ---------------------------------------------------------------------------------------


def test_local_layer_is_its_slowest_call_or_its_compute_shared_over_the_cores():
    transport = TransportRate(call_us=1000.0, us_per_mb=2000.0)
    assert transport.seconds(500_000) == pytest.approx(2e-3)
    experts = ExpertRate(base_us=0.0, per_expert_us=((1.0, 1000.0),))  # 1 ms per expert hit, whatever the rows
    calls = [(500_000, 4, 4), (0, 2, 2)]  # (bytes, pairs, experts hit): 2 + 4 ms and 1 + 2 ms
    assert local_layer_seconds(calls, transport, experts, cores=2) == pytest.approx(6e-3)
    assert local_layer_seconds(calls, transport, experts, cores=1) == pytest.approx(2e-3 + 6e-3)
    assert local_layer_seconds([], transport, experts, cores=1) == 0.0
