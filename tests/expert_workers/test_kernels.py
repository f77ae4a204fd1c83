"""Triton fused MoE kernels equal the torch grouped FFN: in Triton's CPU interpreter without a GPU, on CUDA with one.

The same cases run on both; `cpu` cases need TRITON_INTERPRET=1 (conftest sets it only when CUDA is absent),
`cuda` cases are marked `gpu` (and add bfloat16, which the interpreter's dot lacks).
"""

from __future__ import annotations

import json

import pytest
import torch

from expert_workers.expert_group import ExpertGroup
from expert_workers.expert_pairs import sort_by_expert
from expert_workers.grouped_ffn import grouped_expert_ffn
from expert_workers.kernels import KernelInputError, fused_moe
from expert_workers.kernels.align import align_pairs
from expert_workers.kernels.launcher import CONFIG_DIR, launch_config
from model_core.kernel_runtime import interpreting, poisoned_workspaces
from tests.conftest import SkippedKernel

E, H, I, K = 8, 40, 24, 3  # H and I are not multiples of any block size
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}  # max |Δ| relative to the output's scale

on_interpreter = pytest.mark.skipif(
    not interpreting(), reason="Triton's CPU interpreter is off (TRITON_INTERPRET=1 is set only without a GPU)"
)
DEVICES = [pytest.param("cpu", marks=on_interpreter), pytest.param("cuda", marks=pytest.mark.gpu)]
DEVICE_DTYPES = [
    *(pytest.param("cpu", d, marks=on_interpreter, id=f"cpu-{d}".replace("torch.", ""))
      for d in (torch.float32, torch.float16)),
    *(pytest.param("cuda", d, marks=pytest.mark.gpu, id=f"cuda-{d}".replace("torch.", ""))
      for d in (torch.float32, torch.float16, torch.bfloat16)),
]


@pytest.fixture(autouse=True)
def poisoned_workspace():
    """Every workspace buffer starts as NaN: a kernel reading an unwritten row (padding) fails the test."""
    with poisoned_workspaces():
        yield




def make_case(t: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, H, generator=gen).to(dtype)
    w_gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    w_down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)]) if t else torch.empty(0, K).long()
    weights = torch.rand(t, K, generator=gen)
    return tuple(x.to(device) for x in (hidden, w_gate_up, w_down, ids, weights))


def reference(hidden, w_gate_up, w_down, ids, weights):
    """The torch path in float32 on the CPU, on the same (rounded) inputs."""
    return grouped_expert_ffn(*(x.cpu().float() for x in (hidden, w_gate_up, w_down)), ids.cpu(), weights.cpu())


def run_poisoned(hidden, w_gate_up, w_down, ids, weights):
    out = torch.full_like(hidden, float("nan"))
    result = fused_moe(hidden, w_gate_up, w_down, ids, weights, out=out)
    assert result.data_ptr() == out.data_ptr()
    return out


def assert_matches(got, expected, dtype):
    assert not got.isnan().any(), "a row was never written"
    scale = expected.abs().max().clamp(min=1e-6)
    assert ((got.cpu().float() - expected.cpu()).abs().max() / scale).item() < TOL[dtype]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("t", [1, 7, 64, 300])
def test_matches_torch_path_with_minus_one_ids_and_an_idle_expert(t, device, dtype):
    hidden, w_gate_up, w_down, ids, weights = make_case(t, dtype, seed=t, device=device)
    ids[ids == 5] = 6  # expert 5 gets no tokens (6 may now repeat within a row, which is allowed)
    ids[::3, 0] = -1  # slots whose expert lives on another device
    if t > 2:
        ids[1] = -1  # a token with no expert here at all: its output row must be written as zeros
    got = run_poisoned(hidden, w_gate_up, w_down, ids, weights)
    assert_matches(got, reference(hidden, w_gate_up, w_down, ids, weights), dtype)
    if t > 2:
        assert torch.equal(got[1].cpu(), torch.zeros(H, dtype=dtype))


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_all_tokens_on_one_expert(device, dtype):
    hidden, w_gate_up, w_down, _, weights = make_case(50, dtype, seed=3, device=device)
    ids = torch.full((50, K), -1, device=device)
    ids[:, 0] = 2
    got = run_poisoned(hidden, w_gate_up, w_down, ids, weights)
    assert_matches(got, reference(hidden, w_gate_up, w_down, ids, weights), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_no_tokens_and_int32_ids(device):
    hidden, w_gate_up, w_down, ids, weights = make_case(0, torch.float32, seed=0, device=device)
    assert fused_moe(hidden, w_gate_up, w_down, ids, weights).shape == (0, H)
    hidden, w_gate_up, w_down, ids, weights = make_case(9, torch.float32, seed=4, device=device)
    got = run_poisoned(hidden, w_gate_up, w_down, ids.int(), weights)
    assert_matches(got, reference(hidden, w_gate_up, w_down, ids, weights), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_the_poisoned_workspace_reaches_the_kernels(device, monkeypatch):
    """The NaN poisoning applies: with the down GEMM skipped, the combine reads unwritten workspace rows and every
    token with an expert here comes out NaN (a kernel that skipped part of its output would fail the tests)."""
    hidden, w_gate_up, w_down, ids, weights = make_case(12, torch.float32, seed=6, device=device)
    ids[0] = -1  # no expert here: the combine reads nothing and writes zeros
    monkeypatch.setattr("expert_workers.kernels.grouped_gemm_down.grouped_gemm_down_kernel", SkippedKernel())
    got = fused_moe(hidden, w_gate_up, w_down, ids, weights)
    assert got[1:].isnan().all(dim=1).all() and torch.equal(got[0].cpu(), torch.zeros(H))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_repeated_runs_on_cuda_are_bitwise_identical(dtype):
    """An output that moves between runs on the same inputs would mean a race (or a read of unwritten memory);
    the CPU interpreter runs programs one at a time, so only CUDA can show one."""
    case = make_case(300, dtype, seed=5, device="cuda")
    first = run_poisoned(*case)
    for _ in range(3):
        assert torch.equal(run_poisoned(*case), first)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("t", [1, 64, 1000])
def test_deepseek_v2_lite_expert_shapes_on_cuda_against_float64(t, dtype, tol):
    """At V2-Lite's expert shapes (64 experts, H 2048, I 1408, top-6): many K blocks, many programs per expert."""
    e, h, i, k = 64, 2048, 1408, 6
    gen = torch.Generator().manual_seed(t)
    hidden = torch.randn(t, h, generator=gen).to("cuda", dtype)
    w_gate_up = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).to("cuda", dtype)
    w_down = (torch.randn(e, h, i, generator=gen) / i**0.5).to("cuda", dtype)
    ids = torch.rand(t, e, generator=gen).topk(k, dim=-1).indices.to("cuda")
    weights = torch.rand(t, k, generator=gen).to("cuda")
    got = run_poisoned(hidden, w_gate_up, w_down, ids, weights).double().cpu()
    hidden64, w_gate_up64, w_down64, weights64 = (x.cpu().double() for x in (hidden, w_gate_up, w_down, weights))
    ref = grouped_expert_ffn(hidden64, w_gate_up64, w_down64, ids.cpu(), weights64)
    assert got.isfinite().all()
    assert ((got - ref).norm() / ref.norm()).item() < tol


def test_align_pads_each_expert_to_whole_blocks_with_a_sentinel():
    ids = torch.tensor([[2, 0], [-1, 2], [0, 2], [2, -1]])
    a = align_pairs(sort_by_expert(ids, n_experts=4), block_m=4)
    assert a.n_pairs == 8 and a.n_blocks == 2  # expert 0: 2 pairs -> 1 block; expert 2: 4 pairs -> 1 block
    assert a.block_expert.tolist() == [0, 2]
    assert a.sorted_pairs.tolist() == [1, 4, 8, 8, 0, 3, 5, 6]
    b = align_pairs(sort_by_expert(ids, n_experts=4), block_m=3)
    assert b.block_expert.tolist() == [0, 2, 2] and b.sorted_pairs.tolist() == [1, 4, 8, 0, 3, 5, 6, 8, 8]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden": torch.randn(4, H + 1)}, r"w_gate_up\.shape=\[8, 48, 40\]: expected \[E, 2I, H=41\]"),
        ({"w_down": torch.randn(E, H, I + 1)}, r"w_down\.shape=\[8, 40, 25\]: expected \[E=8, H=40, I=24\]"),
        ({"ids": torch.zeros(3, K, dtype=torch.long)}, r"topk_ids\.shape=\[3, 3\]: expected \[T=4, K\]"),
        ({"ids": torch.zeros(4, K)}, "topk_ids.dtype=torch.float32"),
        ({"ids": torch.full((4, K), 8)}, r"values must be in \[-1, 8\)"),
        ({"weights": torch.rand(4, K + 1)}, r"topk_weights\.shape=\[4, 4\]"),
        ({"hidden": torch.randn(4, H).half()}, "dtypes differ"),
        ({"hidden": torch.randint(0, 3, (4, H))}, "hidden.dtype=torch.int64"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    hidden, w_gate_up, w_down, ids, weights = make_case(4, torch.float32, seed=1)
    args = {"hidden": hidden, "w_gate_up": w_gate_up, "w_down": w_down, "ids": ids, "weights": weights, **change}
    with pytest.raises(KernelInputError, match=message):
        fused_moe(args["hidden"], args["w_gate_up"], args["w_down"], args["ids"], args["weights"])


def test_pairs_sorted_for_another_routing_name_the_argument():
    hidden, w_gate_up, w_down, ids, weights = make_case(4, torch.float32, seed=1)
    with pytest.raises(KernelInputError, match=r"pairs: sorted for 7 experts and 12 slots; expected E=8"):
        fused_moe(hidden, w_gate_up, w_down, ids, weights, pairs=sort_by_expert(ids.clamp(max=6), 7))
    with pytest.raises(KernelInputError, match=r"pairs: sorted for 8 experts and 9 slots.*T\*K=12"):
        fused_moe(hidden, w_gate_up, w_down, ids, weights, pairs=sort_by_expert(ids[:3], E))


def test_launch_tables_cover_every_token_count():
    for name in ("default", "interpreter"):
        table = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        limits = [row["max_tokens"] for row in table["buckets"]]
        assert limits == sorted(limits) and limits[-1] >= 2**31 - 1
        for row in table["buckets"]:
            assert all(row[k] >= 16 and row[k] & (row[k] - 1) == 0 for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    assert launch_config(5, torch.device("cpu"))[0]["BLOCK_M"] == 16


@pytest.mark.parametrize("device", DEVICES)
def test_expert_group_triton_kernel_equals_torch_kernel(model_dirs, device, monkeypatch):
    path = model_dirs["tiny-v3"]
    triton_group = ExpertGroup(path, [0, 3, 5, 9, 12], kernel="triton", torch_device=device)
    torch_group = ExpertGroup(path, [0, 3, 5, 9, 12], kernel="torch", torch_device=device)
    assert (triton_group.kernel, torch_group.kernel) == ("triton", "torch")
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(20, 64, generator=gen)  # requests arrive on the CPU; the group computes on its device
    ids = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(20)])
    ids = torch.where(torch.isin(ids, torch.tensor([0, 3, 5, 9, 12])), ids, -1)
    weights = torch.rand(20, 4, generator=gen)
    b = torch_group.run(1, hidden, ids, weights)
    monkeypatch.setattr("expert_workers.kernels.launcher.sort_by_expert", None)  # the kernel reuses the group's sort
    a = triton_group.run(1, hidden, ids, weights)
    assert_matches(a.output, b.output, torch.float32)
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
