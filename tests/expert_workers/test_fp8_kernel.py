"""fused_moe_fp8 (FP8 expert weights in DeepSeek-V3's block format, activations quantized per token-group) against two
float64 references: the same activation quantization (float32-accumulation tolerance), and unquantized activations
(an error bound derived from the tensors). `cpu` cases run in Triton's interpreter; `cuda` cases are marked `gpu`.

The derived bound (assert_within_bound, per output element), with x̂ = fp8(x/s)·s per group of bi columns:
  activations: |x - x̂| ≤ e_x = max(2^-4·|x|, 2^-10·s_x)   (e4m3: 3 mantissa bits, so a normal value rounds within
               2^-4 of itself; below 2^-6 (subnormal) the step is 2^-9, half of it 2^-10; in units of the scale s)
  GEMM1:       |Δgate| ≤ Δg = e_x·|Ŵ_gate|ᵀ,  |Δup| ≤ Δu = e_x·|Ŵ_up|ᵀ        (Ŵ: the dequantized weights)
  SiLU·up:     |Δh| ≤ Δh = 1.1·Δg·(|up| + Δu) + |SiLU(gate)|·Δu              (|SiLU'| ≤ 1.0998)
  h quantized: E_h = Δh + max(2^-4·(|h| + Δh), 2^-10·max_group(|h| + Δh)/448)
  GEMM2:       |Δy| ≤ Σ_k |w_k|·E_h·|Ŵ_down|ᵀ
plus, at every GEMM, ε·Σ|a||b| for float32 accumulation (ε = (n + 8)·2^-24 in the interpreter, n the summed length;
on CUDA ε = 2^-9: Hopper's FP8 MMA keeps ~14 bits while summing a K step, DeepSeek-V3 report §3.3.2) and the output
dtype's rounding (2u·Σ_k|y_k|). The same-quantization reference has the same ε terms, and lets h (computed here in
float64, in the kernel in float32) round to either fp8 neighbour when it lies within its ε-window of a rounding
boundary (allowed_h_error): otherwise the two must agree to float32-accumulation accuracy.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from expert_workers.expert_pairs import sort_by_expert
from expert_workers.kernels import KernelInputError, fused_moe_fp8
from expert_workers.kernels.fp8_moe import quantize_rows
from expert_workers.kernels.launcher import CONFIG_DIR, launch_config
from model_core.fp8 import FP8, FP8_MAX, quantize_activations, quantize_blocks
from model_core.kernel_runtime import interpreting, poisoned_workspaces
from tests.conftest import SkippedKernel

E, H, I, K = 6, 72, 40, 3  # H and I are multiples of none of the blocks below
SILU_LIPSCHITZ = 1.1  # max |d/dx x·σ(x)| = 1.0998 at x ≈ 2.40
UNIT = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # output rounding, beyond float32
INTERPRETER_BF16_UNIT = 2.0**-7  # Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest)

on_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton's CPU interpreter is off (a GPU is here)")


@pytest.fixture(autouse=True)
def poisoned_workspace():
    """Every workspace starts as NaN: a kernel reading a row or scale nobody wrote fails the test."""
    with poisoned_workspaces():
        yield


@dataclass
class Case:
    hidden: torch.Tensor  # [T, H]
    w_gate_up: torch.Tensor  # [E, 2I, H] fp8
    s_gate_up: torch.Tensor  # [E, 2·ceil(I/bo), ceil(H/bi)]
    w_down: torch.Tensor  # [E, H, I] fp8
    s_down: torch.Tensor  # [E, ceil(H/bo), ceil(I/bi)]
    block: tuple[int, int]
    ids: torch.Tensor  # [T, K]
    weights: torch.Tensor  # [T, K]

    def args(self) -> tuple:
        return (self.hidden, self.w_gate_up, self.s_gate_up, self.w_down, self.s_down, self.block, self.ids,
                self.weights)


def spread(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random values whose rows and columns differ in size by up to 2^4, as do the scales (a wrong index shows)."""
    rows = 2.0 ** (4 * torch.rand(*shape[:-1], 1, generator=gen) - 2)
    cols = 2.0 ** (4 * torch.rand(*shape[:-2], 1, shape[-1], generator=gen) - 2)
    return torch.randn(*shape, generator=gen) * rows * cols


def make_case(t, block, seed, dtype=torch.float32, device="cpu", shape=(E, H, I, K)) -> Case:
    e, h, i, k = shape
    gen = torch.Generator().manual_seed(seed)
    hidden = spread((t, h), gen).to(dtype)
    gate_up, down = spread((e, 2 * i, h), gen) / h**0.5, spread((e, h, i), gen) / i**0.5
    # gate and up are separate checkpoint tensors: each has its own tiles (up's start at scale row ceil(I/bo))
    gate, up, dn = ([quantize_blocks(w, block) for w in part] for part in (gate_up[:, :i], gate_up[:, i:], down))
    w_gate_up = torch.stack([torch.cat([g[0], u[0]]) for g, u in zip(gate, up, strict=True)])
    s_gate_up = torch.stack([torch.cat([g[1], u[1]]) for g, u in zip(gate, up, strict=True)])
    w_down, s_down = torch.stack([q for q, _ in dn]), torch.stack([s for _, s in dn])
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else torch.empty(0, k).long()
    weights = torch.rand(t, k, generator=gen)
    moved = (x.to(device) for x in (hidden, w_gate_up, s_gate_up, w_down, s_down))
    return Case(*moved, block, ids.to(device), weights.to(device))


def tile_scales(scales: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """[nR, nC] scales -> [rows, cols] float64: each element's tile scale."""
    return scales.double().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def group_max(v: torch.Tensor, group: int) -> torch.Tensor:
    """[n, C] -> [n, C]: the max of each element's group of `group` columns."""
    n, c = v.shape
    padded = v.new_zeros(n, -(-c // group) * group)
    padded[:, :c] = v
    return padded.view(n, -1, group).amax(2).repeat_interleave(group, 1)[:, :c]


def expert_weights(case: Case, e: int) -> tuple[torch.Tensor, ...]:
    """Expert e's dequantized weights in float64, exactly q·scale: gate [I, H], up [I, H], down [H, I]."""
    i, h = case.w_down.shape[2], case.w_down.shape[1]
    n = -(-i // case.block[0])
    q, s = case.w_gate_up[e].double(), case.s_gate_up[e]
    gate, up = q[:i] * tile_scales(s[:n], i, h, case.block), q[i:] * tile_scales(s[n:], i, h, case.block)
    return gate, up, case.w_down[e].double() * tile_scales(case.s_down[e], h, i, case.block)


def allowed_h_error(h: torch.Tensor, dh: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ĥ, allowed |ĥ_kernel - ĥ|): h [n, I] float64 quantized per group, and how far the kernel's ĥ may be from it
    when its h is within dh of this one (its scale moves by ρ; values near a boundary may round the other way)."""
    hq, hs = quantize_activations(h.float(), group)
    s, q = tile_scales(hs, h.shape[0], h.shape[1], (1, group)), hq.double()
    rho = (group_max(dh, group) / (s * FP8_MAX) + 2**-22).clamp(max=0.5)
    v = h / s
    window = (dh + h.abs() * rho) / (s * (1 - rho)) + v.abs() * 2**-22
    lo, hi = ((v + d * window).clamp(-FP8_MAX, FP8_MAX).float().to(FP8).double() for d in (-1, 1))
    return q * s, torch.maximum(hi - q, q - lo) * s * (1 + rho) + q.abs() * s * rho


def references(case: Case, eps: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"same quantization": (y, bound), "unquantized activations": (y, bound)}: float64 [T, H], computed on the
    case's device (CUDA's float64 matmuls keep the V2-Lite-sized references quick), returned on the CPU."""
    hidden, ids, route = case.hidden, case.ids, case.weights.double()
    bi = case.block[1]
    t, h = hidden.shape
    unit = UNIT[hidden.dtype] if hidden.is_cuda or hidden.dtype != torch.bfloat16 else INTERPRETER_BF16_UNIT
    unit = 2 * unit + ids.shape[1] * 2**-24  # y per pair rounded to hidden's dtype, summed in float32, rounded
    xq, xs = quantize_activations(hidden, bi)
    s_x = tile_scales(xs, t, h, (1, bi))
    x_hat, x = xq.double() * s_x, hidden.double()
    e_x = torch.maximum(2**-4 * x.abs(), 2**-10 * s_x) * (1 + 2**-16)
    out = {name: (x.new_zeros(t, h), x.new_zeros(t, h))
           for name in ("same quantization", "unquantized activations")}
    for e in ids[ids >= 0].unique().tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        w = route[rows, slots][:, None]
        gate_w, up_w, down_w = expert_weights(case, e)
        gate_a, up_a, down_a = gate_w.abs(), up_w.abs(), down_w.abs()
        # the kernel's own quantization of x; its h within dh (float32 accumulation) of this one
        xe = x_hat[rows]
        gate, up = xe @ gate_w.T, xe @ up_w.T
        mg, mu = xe.abs() @ gate_a.T, xe.abs() @ up_a.T
        act = torch.nn.functional.silu(gate)
        dh = eps * (SILU_LIPSCHITZ * mg * (up.abs() + eps * mu) + act.abs() * mu + (act * up).abs())
        h_hat, allowed = allowed_h_error(act * up, dh, bi)
        y = w * (h_hat @ down_w.T)
        bound = w.abs() * (allowed @ down_a.T + eps * ((h_hat.abs() + allowed) @ down_a.T))
        add(out["same quantization"], rows, y, bound + unit * (y.abs() + bound))
        # unquantized x: the derived bound of the module docstring
        xe, ee = x[rows], e_x[rows]
        gate, up = xe @ gate_w.T, xe @ up_w.T
        dg = ee @ gate_a.T + eps * ((xe.abs() + ee) @ gate_a.T)
        du = ee @ up_a.T + eps * ((xe.abs() + ee) @ up_a.T)
        act = torch.nn.functional.silu(gate)
        hval = act * up
        dh = SILU_LIPSCHITZ * dg * (up.abs() + du) + act.abs() * du + eps * (hval.abs() + dg * du)
        big = hval.abs() + dh
        e_h = dh + torch.maximum(2**-4 * big, 2**-10 * group_max(big, bi) / FP8_MAX) * (1 + 2**-16)
        y = w * (hval @ down_w.T)
        bound = w.abs() * (e_h @ down_a.T + eps * ((hval.abs() + e_h) @ down_a.T))
        add(out["unquantized activations"], rows, y, bound + unit * (y.abs() + bound))
    return {name: (y.cpu(), bound.cpu()) for name, (y, bound) in out.items()}


def add(acc: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, y: torch.Tensor, bound: torch.Tensor) -> None:
    acc[0].index_add_(0, rows, y)
    acc[1].index_add_(0, rows, bound)


def accumulation_eps(case: Case) -> float:
    if case.hidden.device.type == "cuda":
        return 2.0**-9  # the tensor core's ~14-bit adder within a K step (see the module docstring)
    return (max(case.w_down.shape[1:]) + 8) * 2.0**-24


def run_poisoned(case: Case) -> torch.Tensor:
    out = torch.full_like(case.hidden, float("nan"))
    assert fused_moe_fp8(*case.args(), out=out).data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "a row was never written"
    return out.cpu().double()


def assert_within_references(case: Case, got: torch.Tensor) -> dict[str, float]:
    """Both references hold elementwise; returns max |error| / bound per reference (for the failure message)."""
    ratios = {}
    for name, (y, bound) in references(case, accumulation_eps(case)).items():
        err = (got - y).abs()
        ratios[name] = (err / bound.clamp(min=1e-300)).max().item()
        assert (err <= bound).all(), f"{name}: max error/bound {ratios[name]:.3g}"
    return ratios


BLOCKS = [(24, 16), (32, 32), (16, 64)]  # bi < BLOCK_K (32), = BLOCK_K, 2·BLOCK_K; bo ∤ I, bo > I/2, bo ∤ H


@on_interpreter
@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("t", [1, 7, 40])
def test_matches_both_float64_references_with_minus_one_ids_and_an_idle_expert(t, block):
    case = make_case(t, block, seed=t)
    case.ids[case.ids == 4] = 5  # expert 4 idle (5 may now repeat within a row, which is allowed)
    case.ids[::3, 0] = -1
    if t > 2:
        case.ids[1] = -1  # a token with no expert here: its row must be written as zeros
    got = run_poisoned(case)
    ratios = assert_within_references(case, got)
    if t > 2:
        assert torch.equal(got[1], torch.zeros(H, dtype=torch.float64))
    # the derived bound is informative: the error of FP8 activations is a visible part of it
    assert 0.002 < ratios["unquantized activations"], ratios


@on_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_hidden_within_both_references(dtype):
    case = make_case(9, (24, 16), seed=9, dtype=dtype)
    got = run_poisoned(case)
    assert fused_moe_fp8(*case.args()).dtype == dtype
    assert_within_references(case, got)


@on_interpreter
def test_quantize_rows_equals_quantize_activations_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(29, 100, generator=gen) * torch.logspace(-6, 3, 100)  # subnormal to saturating groups
    x[3] = 0.0
    x[4, :16] = -0.0
    x[5, ::7] = torch.tensor([1.9375, -1.9375, 0.5, 448.0, -3.75, 2**-9, 3 * 2**-10, 2**-12, 1e-30, 240.0, 250.0,
                              14.5, 15.5, 0.0625, 0.0703125])  # ties to even, tops of binades, the subnormal range
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for group in (16, 32, 128):
            q, s = quantize_rows(x.to(dtype), group)
            q_ref, s_ref = quantize_activations(x.to(dtype), group)
            assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), (dtype, group)
    rows = torch.tensor([2, 5, 17])
    q, s = quantize_rows(x, 32, rows=rows)  # only these rows; the others stay poisoned
    q_ref, s_ref = quantize_activations(x[rows], 32)
    assert torch.equal(s[rows], s_ref) and torch.equal(q[rows].view(torch.uint8), q_ref.view(torch.uint8))
    assert s[[0, 1, 3]].isnan().all()


@on_interpreter
def test_no_tokens_int32_ids_and_the_callers_pairs():
    case = make_case(0, (24, 16), seed=0)
    assert fused_moe_fp8(*case.args()).shape == (0, H)
    case = make_case(6, (24, 16), seed=4)
    want = run_poisoned(case)
    case.ids = case.ids.int()
    assert torch.equal(run_poisoned(case), want)
    got = fused_moe_fp8(*case.args(), pairs=sort_by_expert(case.ids, E))
    assert torch.equal(got.double(), want)


@on_interpreter
def test_the_poisoned_workspace_reaches_the_kernels(monkeypatch):
    """With the down GEMM skipped, the combine reads unwritten rows: every token with an expert here is NaN."""
    case = make_case(8, (24, 16), seed=6)
    case.ids[0] = -1
    monkeypatch.setattr("expert_workers.kernels.grouped_gemm_down_fp8.grouped_gemm_down_fp8_kernel", SkippedKernel())
    got = fused_moe_fp8(*case.args())
    assert got[1:].isnan().all(dim=1).all() and torch.equal(got[0], torch.zeros(H))


def with_change(case: Case, **change) -> tuple:
    names = ("hidden", "w_gate_up", "s_gate_up", "w_down", "s_down", "block", "ids", "weights")
    args = dict(zip(names, case.args(), strict=True))
    return tuple({**args, **change}.values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block": (24,)}, r"block=\(24,\): expected \(block_out, block_in\)"),
        ({"block": (24, 24)}, r"block\[1\]=24: expected a power of two >= 16"),
        ({"hidden": torch.randn(4, H, 1)}, r"hidden\.shape=\[4, 72, 1\]: expected \[T, H\]"),
        ({"hidden": torch.randn(4, H + 1)}, r"w_gate_up\.shape=\[6, 80, 72\]: expected \[E, 2I, H=73\]"),
        ({"w_down": torch.zeros(E, H, I + 1).to(FP8)}, r"w_down\.shape=\[6, 72, 41\]: expected \[E=6, H=72, I=40\]"),
        ({"s_gate_up": torch.rand(E, 3, 5)}, r"s_gate_up\.shape=\[6, 3, 5\]: expected \[6, 4, 3\]"),
        ({"s_down": torch.rand(E, 3, 3)}, r"s_down\.shape=\[6, 3, 3\]: expected \[6, 3, 2\]"),
        ({"ids": torch.zeros(3, K, dtype=torch.long)}, r"topk_ids\.shape=\[3, 3\]: expected \[T=4, K\]"),
        ({"ids": torch.zeros(4, K)}, r"topk_ids\.dtype=torch\.float32"),
        ({"weights": torch.rand(4, K + 1)}, r"topk_weights\.shape=\[4, 4\]"),
        ({"hidden": torch.randint(0, 3, (4, H))}, r"hidden\.dtype=torch\.int64"),
        ({"w_gate_up": torch.randn(E, 2 * I, H)}, r"w_gate_up\.dtype=torch\.float32: expected torch\.float8_e4m3fn"),
        ({"s_down": torch.rand(E, 3, 2).half()}, r"s_down\.dtype=torch\.float16: expected torch\.float32"),
        ({"s_down": torch.rand(E, 3, 2, device="meta")}, r"different devices: .*s_down meta"),
        ({"ids": torch.full((4, K), E)}, r"values must be in \[-1, 6\)"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    case = make_case(4, (24, 32), seed=1)  # s_gate_up [6, 4, 3], s_down [6, 3, 2]
    with pytest.raises(KernelInputError, match=message):
        fused_moe_fp8(*with_change(case, **change))


def test_pairs_and_out_that_do_not_fit_name_the_argument():
    case = make_case(4, (24, 16), seed=1)
    with pytest.raises(KernelInputError, match=r"pairs: sorted for 5 experts and 12 slots; expected E=6"):
        fused_moe_fp8(*case.args(), pairs=sort_by_expert(case.ids.clamp(max=4), 5))
    with pytest.raises(KernelInputError, match=r"out: expected torch\.float32\[4, 72\]"):
        fused_moe_fp8(*case.args(), out=torch.empty(4, H + 1))


def test_fp8_launch_tables_cover_every_token_count_and_are_picked_by_prefix():
    for name in ("fp8_default", "fp8_interpreter"):
        table = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        limits = [row["max_tokens"] for row in table["buckets"]]
        assert limits == sorted(limits) and limits[-1] >= 2**31 - 1
        for row in table["buckets"]:
            assert all(row[k] >= 16 and row[k] & (row[k] - 1) == 0 for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    interpreter = json.loads((CONFIG_DIR / "fp8_interpreter.json").read_text())
    assert launch_config(5, torch.device("cpu"), prefix="fp8_") == (interpreter["buckets"][0], interpreter["combine"])


@on_interpreter
def test_kernel_bench_times_fp8_beside_bf16_in_the_interpreter():
    bench = Path(__file__).parents[2] / "benchmarks" / "kernel_bench.py"
    spec = importlib.util.spec_from_file_location("kernel_bench_fp8_under_test", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows, _ = module.run(["tiny"], [1, 5], ["float32"], interpret=True, fp8=True)
    fp8 = {r["tokens"]: r for r in rows if r["impl"] == "triton fp8"}
    assert set(fp8) == {1, 5} and {r["impl"] for r in rows} == {"triton", "torch loop", "triton fp8"}
    for r in fp8.values():
        assert r["finite"] and 1e-4 < r["rel_err_vs_fp64"] < module.FP8_REL_ERR and r["ms"] > 0, r
        assert r["reference"] == "dequantized fp8 weights, unquantized activations"
    # the HBM floor counts what the hit experts' FP8 weights and scales occupy, as stored
    shape, block = module.SHAPES["tiny"], module.FP8_BLOCK["tiny"]
    e, h, _, k = shape
    stored = module.quantize_experts(torch, *module.make_weights(torch, shape, torch.float32, "cpu", 0), block)
    per_expert = sum(x[0].numel() * x.element_size() for x in stored)
    floor = module.fp8_floor_ms(3, shape, 5, block, 2, {"copy_bytes_per_s": 1e9})
    assert floor["bytes"] == 5 * per_expert + 2 * 3 * h * 2 + 3 * k * 12
    assert floor["floor_ms"] == floor["bytes"] / 1e9 * 1e3


GPU_SHAPE = (16, 2048, 1408, 6)  # DeepSeek-V2-Lite's expert shapes (16 of its 64 experts), V3's 128×128 blocks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 64, 300])
def test_v2_lite_shapes_with_128_blocks_on_cuda_within_both_references(t, dtype):
    case = make_case(t, (128, 128), seed=t, dtype=dtype, device="cuda", shape=GPU_SHAPE)
    case.ids[::5, 1] = -1
    got = run_poisoned(case)
    assert_within_references(case, got)
    assert torch.equal(fused_moe_fp8(*case.args()).cpu().double(), got)  # repeated runs: bitwise equal (no race)
    q, s = quantize_rows(case.hidden, 128)
    q_ref, s_ref = quantize_activations(case.hidden.cpu(), 128)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
