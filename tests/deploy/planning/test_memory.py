"""`expertmesh plan`'s memory per GPU: expert and gateway bytes counted by hand from the config match the planner's
exactly (bf16, block-wise FP8 with partial tiles), rows follow their placement and fit the usable memory,
DeepSeek-V3 on H200 fits one node in FP8 and not in bf16, and hardware files without or with a bad memory_gb."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from deploy.cli import main
from deploy.planning.cost_model import Workload
from deploy.planning.hardware import Hardware, HardwareError
from deploy.planning.memory import (
    MemoryBudget,
    busiest_experts,
    expert_bytes,
    experts_per_device,
    gateway_weight_bytes,
    latent_cache_bytes,
    memory_summary,
)
from deploy.planning.plan import plan, smallest_planned
from deploy.planning.replay import build_placement
from deploy.planning.routing_sources import SyntheticRouting, expert_loads, load_spec
from model_core.layout import checkpoint_layout
from model_core.make_model import preset_config
from model_core.spec import ModelSpec
from router_service.placement import Placement

HARDWARE = Path(__file__).parents[3] / "deploy" / "hardware"
HW = Hardware("test", 100.0, 1000.0, 100.0, 2.0, 10.0, 5.0, 2)


def tiles(rows: int, cols: int, block: tuple[int, int]) -> int:
    return -(-rows // block[0]) * -(-cols // block[1])


def fp8(rows: int, cols: int, block: tuple[int, int]) -> int:
    return rows * cols + 4 * tiles(rows, cols, block)


def by_hand(spec: ModelSpec, block: tuple[int, int]) -> dict[str, int]:
    """One routed expert and the gateway's weights, bf16 and FP8, from the config's numbers alone."""
    h, i, heads, v = spec.hidden_size, spec.moe_intermediate_size, spec.num_attention_heads, spec.vocab_size
    qk, kv = spec.qk_nope_head_dim + spec.qk_rope_head_dim, spec.kv_lora_rank + spec.qk_rope_head_dim
    projections = [(kv, h), (heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank),
                   (h, heads * spec.v_head_dim)]  # kv_a_proj_with_mqa, kv_b, o
    other = 2 * h + spec.kv_lora_rank  # two layer norms, kv_a_layernorm
    if spec.q_lora_rank is None:
        projections.append((heads * qk, h))
    else:
        projections += [(spec.q_lora_rank, h), (heads * qk, spec.q_lora_rank)]
        other += spec.q_lora_rank
    if spec.attention_bias:
        other += (spec.q_lora_rank or 0) + kv + h
    matrices, rest = [], v * h + h + (0 if spec.tie_word_embeddings else v * h)  # embed, final norm, lm_head
    for layer in range(spec.num_hidden_layers):
        matrices += projections
        rest += other
        width = spec.moe_intermediate_size * spec.n_shared_experts if spec.is_moe_layer(layer) else \
            spec.intermediate_size
        if width:
            matrices += [(width, h), (width, h), (h, width)]
        if spec.is_moe_layer(layer):
            rest += spec.n_routed_experts * h + (spec.n_routed_experts if spec.router.has_correction_bias else 0)
    values = sum(r * c for r, c in matrices)
    return {"expert_bf16": 2 * 3 * h * i, "expert_fp8": 3 * h * i + 4 * (2 * tiles(i, h, block) + tiles(h, i, block)),
            "gateway_bf16": 2 * (values + rest), "gateway_fp8": sum(fp8(r, c, block) for r, c in matrices) + 2 * rest}


@pytest.mark.parametrize("preset, block", [("tiny-v3", None), ("small-v3", None), ("small-v3", [128, 96]),
                                           ("tiny-v3", [128, 16]), ("tiny-v2", None)])
def test_bytes_match_a_count_by_hand_from_the_config(preset, block):
    raw = preset_config(preset)
    if block is not None:
        raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": block}
    spec = ModelSpec.from_dict(raw)
    want = by_hand(spec, tuple(block) if block else (128, 128))
    assert expert_bytes(spec, "bf16") == want["expert_bf16"]
    assert expert_bytes(spec, "fp8") == want["expert_fp8"]
    assert gateway_weight_bytes(spec, "bf16") == want["gateway_bf16"]
    assert gateway_weight_bytes(spec, "fp8") == want["gateway_fp8"]
    experts = spec.n_routed_experts * len(spec.moe_layers)  # the whole checkpoint: gateway + every routed expert
    assert want["gateway_bf16"] + experts * want["expert_bf16"] == 2 * sum(map(math.prod,
                                                                               checkpoint_layout(spec).values()))
    assert expert_bytes(spec, "fp8") <= 0.55 * expert_bytes(spec, "bf16")
    gen = torch.Generator().manual_seed(3)
    batch, context = (int(v) for v in torch.randint(1, 500, (2,), generator=gen))
    assert latent_cache_bytes(spec, batch, context) == 2 * kv_values(spec) * batch * context


def kv_values(spec: ModelSpec) -> int:
    return (spec.kv_lora_rank + spec.qk_rope_head_dim) * spec.num_hidden_layers


def test_rows_count_their_placements_busiest_gpu_and_fit_the_usable_memory():
    spec = load_spec("small-v3")  # 64 experts x 4 MoE layers
    source = SyntheticRouting(spec, 64, 1.0)
    work = Workload(batch=16, gateways=2, context=100)
    per_expert = {d: expert_bytes(spec, d) for d in ("bf16", "fp8")}
    gateway = gateway_weight_bytes(spec) + latent_cache_bytes(spec, 16, 100)
    # capacity between the busiest D=4 GPU's FP8 and bf16 bytes (16 experts a layer): bf16 does not fit, FP8 does
    on_d4 = len(spec.moe_layers) * spec.n_routed_experts // 4
    held = on_d4 * per_expert["fp8"], on_d4 * per_expert["bf16"]
    capacity_gb = (held[0] + held[1]) / 2 / 0.8 / 1e9
    assert gateway <= 0.8 * capacity_gb * 1e9
    hw = dataclasses.replace(HW, memory_gb=capacity_gb)
    rows = plan(spec, source, hw, [4, 8], [None], [0, 8], work, budget=MemoryBudget(capacity_gb, 0.8))
    for row in rows:
        placement = build_placement(spec, expert_loads(source), row.devices, row.redundant)
        busiest = max(len(placement.experts_on(d, layer)) for d in range(row.devices) for layer in spec.moe_layers)
        assert row.experts_per_gpu == max(experts_per_device(placement, spec.moe_layers))
        assert busiest * len(spec.moe_layers) >= row.experts_per_gpu >= math.ceil(
            len(spec.moe_layers) * (spec.n_routed_experts + row.redundant) / row.devices)  # at least the mean
        assert row.expert_gpu_bytes_bf16 == row.experts_per_gpu * per_expert["bf16"]
        assert row.expert_gpu_bytes_fp8 == row.experts_per_gpu * per_expert["fp8"]
        assert row.gateway_gpu_bytes == gateway
        usable = 0.8 * capacity_gb * 1e9
        assert row.fits_bf16 == (row.expert_gpu_bytes_bf16 <= usable)
        assert row.fits_fp8 == (row.expert_gpu_bytes_fp8 <= usable)
    d4 = rows[0]
    assert (d4.devices, d4.redundant, d4.experts_per_gpu) == (4, 0, on_d4)
    assert (d4.fits_bf16, d4.fits_fp8) == (False, True)
    best = smallest_planned(rows, node_size=2)
    assert best["fp8"]["devices"] == 4 and best["fp8"]["nodes"] == 3  # 4 + 2 GPUs on 2-GPU nodes
    assert best["bf16"]["devices"] == 8 and rows[2].fits_bf16 and best["bf16"] == {
        "devices": 8, "redundant": 0, "gpus": 10, "nodes": 5, "gpu_bytes": rows[2].expert_gpu_bytes_bf16}
    unknown = plan(spec, source, HW, [4], [None], [0], work)  # no memory_gb: fits unknown
    assert (unknown[0].fits_bf16, unknown[0].fits_fp8) == (None, None) and unknown[0].expert_gpu_bytes_fp8 > 0
    assert smallest_planned(unknown, 2) == {"bf16": None, "fp8": None}


def test_contiguous_placements_busiest_gpu_is_ceil_experts_over_devices():
    spec = load_spec("small-v3")
    for devices in (1, 3, 7, 8, 64):
        placement = Placement.contiguous(spec.n_routed_experts, devices)
        assert max(experts_per_device(placement, spec.moe_layers)) == busiest_experts(spec, devices)


def test_deepseek_v3_fits_one_h200_node_in_fp8_and_not_in_bf16():
    spec = load_spec("deepseek-v3")
    h200 = Hardware.from_yaml(HARDWARE / "h200.yaml")
    assert (h200.memory_gb, Hardware.from_yaml(HARDWARE / "h100.yaml").memory_gb) == (141, 80)
    work = Workload(batch=64, gateways=1, context=4096)
    summary = memory_summary(spec, MemoryBudget(h200.memory_gb), work, h200.gpus_per_node, {})
    experts = spec.n_routed_experts * len(spec.moe_layers)
    h, i = spec.hidden_size, spec.moe_intermediate_size
    assert summary["expert_bytes"]["bf16"] == experts * 2 * 3 * h * i
    assert summary["model_bytes"]["bf16"] / 2 == pytest.approx(671e9, rel=2e-3)  # the published 671B parameters
    node = 8 * 141e9  # 1128 GB
    assert summary["model_bytes"]["fp8"] < 0.9 * node < node < summary["model_bytes"]["bf16"]
    fp8, bf16 = summary["dedicated"]["fp8"], summary["dedicated"]["bf16"]
    assert fp8["nodes"] == 1 and fp8["gpus"] <= 8 and fp8["gpu_bytes"] <= 0.9 * 141e9
    assert bf16["nodes"] == 2 and bf16["devices"] + 1 > 8
    assert busiest_experts(spec, bf16["devices"] - 1) * expert_bytes(spec, "bf16") > 0.9 * 141e9  # the least D
    gateway = gateway_weight_bytes(spec) + latent_cache_bytes(spec, 64, 4096)  # colocated: the gateway beside experts
    together = summary["colocated"]["fp8"]
    assert together["gpu_bytes"] == busiest_experts(spec, together["devices"]) * expert_bytes(spec, "fp8") + gateway
    assert busiest_experts(spec, together["devices"] - 1) * expert_bytes(spec, "fp8") + gateway > 0.9 * 141e9


def test_cli_prints_memory_columns_and_json_for_deepseek_v3_on_h200(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "deepseek-v3", "--synthetic", "zipf:1.2", "--tokens", "64", "--devices", "7",
                 "--hardware", str(HARDWARE / "h200.yaml"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exp GB bf16" in printed and "fp8 experts: dedicated 1 node (" in printed
    assert "bf16 experts: dedicated 2 nodes (" in printed
    report = json.loads(out.read_text())
    row = report["rows"][0]
    assert (row["experts_per_gpu"], row["fits_bf16"], row["fits_fp8"]) == (58 * 37, False, True)
    assert report["memory"]["planned"]["fp8"]["nodes"] == 1 and report["memory"]["planned"]["bf16"] is None
    assert report["hardware"]["memory_gb"] == 141


def test_a_hardware_file_without_memory_gb_loads_and_marks_fit_unknown(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("".join(line for line in (HARDWARE / "h100.yaml").read_text().splitlines(keepends=True)
                           if not line.startswith("memory_gb")))
    assert Hardware.from_yaml(old).memory_gb is None
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "tiny-v3", "--synthetic", "zipf:1", "--tokens", "64", "--devices", "4",
                 "--batch", "16", "--hardware", str(old), "--json", str(out)]) == 0
    assert "no memory_gb" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert (report["rows"][0]["fits_bf16"], report["rows"][0]["fits_fp8"]) == (None, None)
    assert report["memory"]["dedicated"] == {"bf16": None, "fp8": None}


@pytest.mark.parametrize("value", [0, -80, "80GB", True, float("nan"), float("inf")])
def test_bad_memory_gb_is_refused_naming_the_field(value):
    raw = Hardware.from_yaml(HARDWARE / "h100.yaml").to_dict()
    with pytest.raises(HardwareError, match=r"^rates.yaml: memory_gb=.*: expected a number > 0 \(GB"):
        Hardware.from_dict({**raw, "memory_gb": value}, "rates.yaml")


def test_bad_memory_options_are_refused_naming_them(capsys):
    base = ["plan", "--model", "tiny-v3", "--synthetic", "zipf:1", "--hardware", str(HARDWARE / "h100.yaml")]
    assert main([*base, "--gpu-memory-utilization", "1.5"]) == 2
    assert "gpu_memory_utilization=1.5: expected a number in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--gateway-dtype", "int4"])
    assert "--gateway-dtype: invalid choice: 'int4'" in capsys.readouterr().err
