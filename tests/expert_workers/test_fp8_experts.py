"""FP8-resident experts (issue 25): expert groups keep a block-wise FP8 checkpoint's experts as float8_e4m3fn with
their scale tiles, compute on CPU by widening only the experts a call hits, and every copy of an expert (staged
placements, EPLB re-placement, new replicas) carries its scales; answers equal the dequantize-on-read path's."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from deploy.planning.memory import expert_bytes
from expert_workers.expert_group import ExpertGroup
from expert_workers.kernels import fused_moe_fp8
from expert_workers.merging import CallMerger
from gateway import Engine
from gateway.config import DeploymentConfig, DeploymentConfigError
from model_core.checkpoint import CheckpointError, CheckpointReader
from model_core.fp8 import scale_grid
from model_core.layout import expert_shapes, expert_weight_names
from model_core.make_model import make_model, preset_config, write_checkpoint
from model_core.spec import ModelSpec
from tests.conftest import random_prompts
from tests.expert_workers.test_merging import HOSTED, TIMEOUT_S, Stops, join_while_held, routing
from tests.gateway.test_replacement import moved, planned

PROMPTS = random_prompts(272, [14, 9, 20, 5], seed=41)
TOKENS = 10


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("fp8-presets")
    return {name: make_model(name, root / name, seed=5) for name in ("tiny-v3-fp8", "small-v3-fp8")}


def stored(reader: CheckpointReader, spec: ModelSpec, layer: int, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Expert e's (fp8 weight, scale_inv) for gate, up, down as the checkpoint stores them."""
    names = expert_weight_names(layer, e)
    return [reader.get_fp8(n, shape) for n, shape in zip(names, expert_shapes(spec), strict=True)]


def dequantized64(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The float64 dequantization of an FP8 tensor, computed here from the stored bytes and tiles."""
    bo, bi = block
    full = s.double().repeat_interleave(bo, 0)[: q.shape[0]].repeat_interleave(bi, 1)[:, : q.shape[1]]
    return q.double() * full


def routed(t: int, k: int, hosted: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct ids among the first half of `hosted` (the rest stay idle), some slots -1; random weights."""
    busy = hosted[: len(hosted) // 2]
    ids = torch.stack([torch.tensor(busy)[torch.randperm(len(busy), generator=gen)[:k]] for _ in range(t)])
    ids[torch.rand(t, k, generator=gen) < 0.25] = -1
    return ids, torch.rand(t, k, generator=gen)


@pytest.mark.parametrize("preset", ["tiny-v3-fp8", "small-v3-fp8"])
@pytest.mark.parametrize("t", [1, 37])
def test_the_cpu_fp8_path_equals_a_float64_reference_of_the_dequantized_weights(fp8_dirs, preset, t):
    path = fp8_dirs[preset]
    spec = ModelSpec.from_dir(path)
    hosted = list(range(0, spec.n_routed_experts, 2))
    group = ExpertGroup(path, hosted, dtype=torch.float32, spec=spec)
    layer = spec.moe_layers[-1]
    weights = group.layout().weights[layer]
    assert weights.fp8 and weights.w_gate_up.dtype == torch.float8_e4m3fn and weights.s_down.dtype == torch.float32
    gen = torch.Generator().manual_seed(t)
    hidden = torch.randn(t, spec.hidden_size, generator=gen)
    ids, w = routed(t, spec.top_k, hosted, gen)
    out = group.run(layer, hidden, ids, w).output
    reader = CheckpointReader.for_model(path, spec)
    ref = torch.zeros(t, spec.hidden_size, dtype=torch.float64)
    for e in {int(e) for e in ids[ids >= 0]}:
        gate, up, down = (dequantized64(q, s, spec.fp8_block) for q, s in stored(reader, spec, layer, e))
        rows = (ids == e).any(1)
        x = hidden[rows].double()
        y = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
        ref[rows] += (w[rows] * (ids[rows] == e)).sum(1, keepdim=True).double() * y
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # bounded scratch: one expert's gate_up and down, widened, whatever the number of experts hit
    i, h = spec.moe_intermediate_size, spec.hidden_size
    assert group.scratch.nbytes == 3 * i * h * 4


def test_fp8_resident_memory_is_the_stored_bytes_and_says_so(fp8_dirs):
    path = fp8_dirs["small-v3-fp8"]
    spec = ModelSpec.from_dir(path)
    fp8 = ExpertGroup(path, [3, 4, 5], dtype=torch.bfloat16, spec=spec)
    wide = ExpertGroup(path, [3, 4, 5], dtype=torch.bfloat16, spec=spec, quantization="none", half_matmul="native")
    i, h, bo = spec.moe_intermediate_size, spec.hidden_size, spec.fp8_block[0]
    tiles = 3 * (-(-i // bo)) * (-(-h // bo))  # gate, up, down
    per_expert = 3 * i * h + 4 * tiles
    assert fp8.weight_bytes == 3 * len(spec.moe_layers) * per_expert
    assert wide.weight_bytes == 3 * len(spec.moe_layers) * 3 * i * h * 2
    assert fp8.weight_bytes <= 0.55 * wide.weight_bytes
    # what `expertmesh plan` counts per expert is what a group holds
    assert fp8.weight_bytes == 3 * len(spec.moe_layers) * expert_bytes(spec, "fp8")
    assert wide.weight_bytes == 3 * len(spec.moe_layers) * expert_bytes(spec, "bf16")
    assert fp8.weight_dtype == "float8_e4m3fn+scales[128x128]" and wide.weight_dtype == "bfloat16"
    assert any(n.endswith("_scale_inv") for n in wide.reader.loaded)  # widened on read, with its scales


def test_a_staged_copy_of_an_expert_carries_its_scales(fp8_dirs):
    path = fp8_dirs["tiny-v3-fp8"]
    spec = ModelSpec.from_dir(path)
    layer = spec.moe_layers[0]
    group = ExpertGroup(path, [0, 1, 2, 3], spec=spec)
    reads = set(group.reader.loaded)
    group.stage(1, [0, 1, 2, 3], {layer: [3, 9, 1]})  # 3 and 1 copied from version 0, 9 read
    assert set(group.reader.loaded) - reads == {n for n in group.reader.loaded if ".experts.9." in n}
    staged, reader = group.layout(1).weights[layer], CheckpointReader.for_model(path, spec)
    for row, e in enumerate([3, 9, 1]):
        (gq, gs), (uq, us), (dq, ds) = stored(reader, spec, layer, e)
        assert torch.equal(staged.s_gate_up[row], torch.cat([gs, us])) and torch.equal(staged.s_down[row], ds)
        assert torch.equal(staged.w_gate_up[row].view(torch.uint8), torch.cat([gq, uq]).view(torch.uint8))
        assert torch.equal(staged.w_down[row].view(torch.uint8), dq.view(torch.uint8))
        assert staged.s_gate_up[row].shape == (2 * scale_grid(gq.shape, spec.fp8_block)[0], gs.shape[1])
    gen = torch.Generator().manual_seed(3)
    hidden, ids = torch.randn(4, spec.hidden_size, generator=gen), torch.tensor([[3, 1], [1, -1], [3, -1], [1, 3]])
    w = torch.rand(4, 2, generator=gen)
    assert torch.equal(group.run(layer, hidden, ids, w, version=1).output, group.run(layer, hidden, ids, w, 0).output)


@pytest.mark.parametrize("preset,dtype", [("tiny-v3-fp8", "float32"), ("small-v3-fp8", "float32")])
def test_greedy_tokens_of_fp8_resident_experts_equal_dequantize_on_read(fp8_dirs, preset, dtype):
    path = fp8_dirs[preset]
    prompts = PROMPTS if preset.startswith("tiny") else PROMPTS[:2]
    with Engine.from_pretrained(path, dtype=dtype, devices=2) as fp8:
        tokens = fp8.generate(prompts, max_new_tokens=TOKENS, stop_at_eos=False)
        assert all(g.fp8_block == fp8.spec.fp8_block for g in fp8.backend.transport.groups)
    with Engine.from_pretrained(path, dtype=dtype, devices=2, quantization="none") as wide:
        assert all(g.fp8_block is None for g in wide.backend.transport.groups)
        assert wide.generate(prompts, max_new_tokens=TOKENS, stop_at_eos=False) == tokens


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray", "grpc"])
def test_eplb_replacement_and_scaling_keep_fp8_tokens(fp8_dirs, ray_cluster, backend):
    path = fp8_dirs["tiny-v3-fp8"]
    with Engine.from_pretrained(path, devices=2, quantization="none") as wide:
        expected = wide.generate(PROMPTS, max_new_tokens=TOKENS, stop_at_eos=False)
    with Engine.from_pretrained(path, backend=backend, devices=2) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=TOKENS, stop_at_eos=False) == expected
        first = planned(engine, redundant=2, version=1)  # copies of the hot experts, with their scales
        engine.apply_placement(first)
        assert engine.generate(PROMPTS, max_new_tokens=TOKENS, stop_at_eos=False) == expected
        engine.apply_placement(moved(first, engine.spec, version=2))  # every expert moves group
        engine.scale(1, 2)  # a new replica loads version 2 from the checkpoint
        assert engine.generate(PROMPTS, max_new_tokens=TOKENS, stop_at_eos=False) == expected
        infos = ray_cluster.get([r.actor.describe.remote() for d in (0, 1) for r in engine.backend.pool.live(d)])
        assert len(infos) == 3 and all(i["weight_dtype"].startswith("float8_e4m3fn") for i in infos)
        assert all(i["versions"] == [2] for i in infos)


def test_fp8_is_refused_where_the_checkpoint_is_not_fp8_and_bad_values_name_the_field(model_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"quantization='fp8': .* is not a block-wise FP8 checkpoint"):
        ExpertGroup(model_dirs["tiny-v3"], [0, 1], quantization="fp8")
    with pytest.raises(DeploymentConfigError, match=r"quantization.*'int4'.*expected one of"):
        DeploymentConfig(model=str(model_dirs["tiny-v3"]), quantization="int4")
    odd = {**preset_config("tiny-v3"), "quantization_config": {"quant_method": "fp8", "weight_block_size": [24, 24]}}
    path = write_checkpoint(tmp_path / "odd-blocks", odd, seed=2)
    with pytest.raises(ValueError, match=r"weight_block_size=\[24, 24\]: the Triton FP8 kernel needs .* power of two"):
        ExpertGroup(path, [0, 1], kernel="triton")
    assert ExpertGroup(path, [0, 1], kernel="torch").fp8_block == (24, 24)  # the widening path takes any block
    spec = ModelSpec.from_dict(preset_config("tiny-v3-fp8"))
    name = expert_weight_names(spec.moe_layers[0], 1)[2]  # expert 1's down projection
    poisoned = (torch.rand(expert_shapes(spec)[2]) - 0.5).to(torch.float8_e4m3fn)
    poisoned.view(torch.uint8)[3, 5] = 0xFF  # e4m3fn's NaN code
    path = write_checkpoint(tmp_path / "nan", preset_config("tiny-v3-fp8"), overrides={name: poisoned})
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}' has 1 non-finite value \(NaN\)"):
        ExpertGroup(path, [0, 1])
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:  # auto on a bf16/fp32 checkpoint: as before
        assert all(g.fp8_block is None for g in engine.backend.transport.groups)


def test_fp8_calls_that_join_a_pass_get_their_outputs_alone(fp8_dirs):
    """Merged passes (several gateways' calls) widen each hit expert once for all the pass's rows."""
    group = ExpertGroup(fp8_dirs["tiny-v3-fp8"], HOSTED, dtype=torch.float32)
    merger, stops = CallMerger(group), Stops([2])
    merger.before_expert = stops
    layer = group.spec.moe_layers[0]
    first, joiner = ((layer, *routing(group, t, seed=seed)) for t, seed in ((6, 60), (5, 61)))
    with ThreadPoolExecutor(4) as pool:
        head, (future,) = join_while_held(merger, stops, pool, first, {2: [joiner]})
        results = [head.result(TIMEOUT_S), future.result(TIMEOUT_S)]
    for call, result in zip((first, joiner), results, strict=True):
        assert result.merged_calls == 2
        assert torch.allclose(result.output, group.run(*call).output, atol=1e-6)
    assert merger.stats()["passes"] == 1


def test_the_triton_kernel_serves_fp8_resident_groups(fp8_dirs):
    """kernel='triton' (the GPU's path; Triton's interpreter here) hands the group's FP8 stacks and scale tiles to
    fused_moe_fp8 as they are; its quantized activations stay within a few percent of the widened torch path."""
    path = fp8_dirs["tiny-v3-fp8"]
    spec = ModelSpec.from_dir(path)
    hosted = list(range(0, spec.n_routed_experts, 2))
    triton_group = ExpertGroup(path, hosted, spec=spec, kernel="triton")
    torch_group = ExpertGroup(path, hosted, spec=spec, kernel="torch")
    layer = spec.moe_layers[0]
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, spec.hidden_size, generator=gen)
    ids, w = routed(9, spec.top_k, hosted, gen)
    got = triton_group.run(layer, hidden, ids, w).output
    lw, index = triton_group.layout().weights[layer], triton_group.local_index[layer]
    local = torch.where(ids >= 0, index[ids.clamp(min=0)], -1)
    assert torch.equal(got, fused_moe_fp8(hidden, lw.w_gate_up, lw.s_gate_up, lw.w_down, lw.s_down, lw.block, local, w))
    widened = torch_group.run(layer, hidden, ids, w).output
    assert 0 < (got - widened).norm() <= 0.1 * widened.norm()
