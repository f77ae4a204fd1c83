"""The Triton paged MLA decode kernel equals its torch reference, which equals a naive per-sequence loop.

`cpu` cases run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest only when CUDA is absent);
`cuda` cases are marked `gpu`. Rows the kernel must never read (other layers, positions past lens) hold NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from gateway.model import paged_mla_kernel  # noqa: E402
from gateway.model.paged_mla_kernel import (  # noqa: E402
    decode_launch_config,
    paged_mla_decode,
    paged_mla_decode_reference,
)
from model_core.kernel_runtime import interpreting, poisoned_workspaces  # noqa: E402
from tests.conftest import SkippedKernel  # noqa: E402

# Shape legend: B = sequences, h = heads, r = kv_lora_rank, p = rope dim, bs = block_size, M = max blocks.
H = 4
LAYER = 1  # the pool is layer 1 of a three-layer store (the engine's [layers, n_blocks, bs, r + p], or block-major)
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}  # max |Δ| relative to the output's scale

on_interpreter = pytest.mark.skipif(
    not interpreting(), reason="Triton's CPU interpreter is off (TRITON_INTERPRET=1 is set only without a GPU)"
)
DEVICES = [pytest.param("cpu", marks=on_interpreter), pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poisoned_workspace():
    """The split workspace starts as NaN: combining a slot no split wrote fails the test."""
    with poisoned_workspaces():
        yield




def lengths(block_size: int) -> list[int]:
    """One token; an exact multiple of block_size; not a multiple; the longest (ends mid-block)."""
    return [1, 2 * block_size, 2 * block_size + 3, 37]


def make_case(r: int, p: int, block_size: int, lens: list[int], dtype: torch.dtype, seed: int, device: str = "cpu",
              heads: int = H, block_major: bool = False):
    """Random queries and pool (never zeros), a permuted block table padded with arbitrary valid ids, and NaN in
    every pool row that no sequence attends (other layers, rows past each sequence's length).

    The pool is a view of layer 1: of [3, n_blocks, bs, r + p] (contiguous, offset), or with block_major of
    [n_blocks, 3, bs, r + p] (non-contiguous: a block's stride is three layers' worth)."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lens)
    used_blocks = [math.ceil(n / block_size) for n in lens]
    m = max(used_blocks) + 1  # at least one padding column
    n_blocks = b * m + 3
    tables = torch.randperm(n_blocks, generator=gen)[: b * m].view(b, m)
    for i, used in enumerate(used_blocks):
        tables[i, used:] = torch.randint(0, n_blocks, (m - used,), generator=gen)  # padding: valid, never read
    shape = (n_blocks, 3, block_size, r + p) if block_major else (3, n_blocks, block_size, r + p)
    layers = torch.full(shape, float("nan"))
    pool = layers[:, LAYER] if block_major else layers[LAYER]
    for i, n in enumerate(lens):
        for j in range(n):
            pool[tables[i, j // block_size], j % block_size] = torch.randn(r + p, generator=gen)
    q_lat = torch.randn(heads, b, r, generator=gen).transpose(0, 1)  # [B, h, r], non-contiguous like an einsum's
    q_pe = torch.randn(b, heads, p, generator=gen)
    layers, q_lat, q_pe = (x.to(device, dtype) for x in (layers, q_lat, q_pe))
    tables, lens_t = tables.to(device, torch.int32), torch.tensor(lens, dtype=torch.int32, device=device)
    pool = layers[:, LAYER] if block_major else layers[LAYER]
    return q_lat, q_pe, pool, tables, lens_t, r, (r + p) ** -0.5


def naive(q_lat, q_pe, pool, block_tables, lens, r, scale) -> torch.Tensor:
    """Float64, one sequence, head and position at a time: the definition, written without gathers or masks."""
    b, h, _ = q_lat.shape
    out = torch.empty(b, h, r, dtype=torch.float64)
    for i in range(b):
        rows = [pool[int(block_tables[i, j // pool.shape[1]]), j % pool.shape[1]].double() for j in range(int(lens[i]))]
        for head in range(h):
            q = torch.cat([q_lat[i, head], q_pe[i, head]]).double()
            scores = [scale * float(q @ row) for row in rows]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            out[i, head] = sum(w * row[:r] for w, row in zip(weights, rows, strict=True)) / sum(weights)
    return out


def assert_matches(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not got.isnan().any(), "an output value was never written, or a NaN row was read"
    scale = expected.abs().max().clamp(min=1e-6)
    assert ((got.cpu().double() - expected.cpu().double()).abs().max() / scale).item() < TOL[dtype]


@pytest.mark.parametrize("r, p, block_size", [(32, 16, 4), (24, 12, 8)])
def test_reference_equals_a_naive_per_sequence_loop(r, p, block_size):
    case = make_case(r, p, block_size, lengths(block_size), torch.float32, seed=r)
    got = paged_mla_decode_reference(*case)
    assert got.shape == (4, H, r) and got.dtype == torch.float32
    assert_matches(got, naive(*case), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("r, p, block_size", [(32, 16, 4), (24, 12, 8)])
def test_kernel_matches_reference_on_a_permuted_paged_pool(r, p, block_size, num_splits, dtype, device):
    """num_splits=4 leaves the one-token sequence with three empty splits, which the combine must ignore."""
    case = make_case(r, p, block_size, lengths(block_size), dtype, seed=block_size + num_splits, device=device)
    out = torch.full((4, H, r), float("nan"), dtype=dtype, device=device)
    got = paged_mla_decode(*case, out=out, num_splits=num_splits)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    assert_matches(got, paged_mla_decode_reference(*(x.cpu() if torch.is_tensor(x) else x for x in case)), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_pool_strides_are_used_for_a_block_major_non_contiguous_view(num_splits, device):
    case = make_case(24, 12, 4, lengths(4), torch.float32, seed=5, device=device, block_major=True)
    assert not case[2].is_contiguous()
    got = paged_mla_decode(*case, num_splits=num_splits)
    assert_matches(got, paged_mla_decode_reference(*(x.cpu() if torch.is_tensor(x) else x for x in case)),
                   torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_the_poisoned_workspace_reaches_the_kernel(device, monkeypatch):
    """The NaN poisoning applies: with the split pass skipped, the combine reads only unwritten workspace and
    every output value is NaN (a kernel that skipped part of its output would fail the tests)."""
    case = make_case(24, 12, 4, lengths(4), torch.float32, seed=3, device=device)
    monkeypatch.setattr(paged_mla_kernel, "paged_mla_decode_kernel", SkippedKernel())
    assert paged_mla_decode(*case, num_splits=2).isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_default_call_allocates_its_output_and_splitting_changes_nothing_beyond_rounding(device):
    case = make_case(32, 16, 8, [3, 40, 17], torch.float32, seed=11, device=device)
    single = paged_mla_decode(*case)
    assert single.shape == (3, H, 32) and single.dtype == torch.float32
    split = paged_mla_decode(*case, num_splits=3)
    assert (single - split).abs().max().item() < 1e-5


def test_launch_config_pads_to_powers_of_two_and_stays_single_pass_on_cpu():
    tiny = decode_launch_config(4, 4, 24, 12, 80, torch.device("cpu"))
    assert (tiny.block_r, tiny.block_p, tiny.block_h, tiny.num_splits) == (32, 16, 16, 1)
    deepseek = decode_launch_config(1, 128, 512, 64, 32768, torch.device("cpu"))
    assert (deepseek.block_r, deepseek.block_p, deepseek.block_h, deepseek.block_n) == (512, 64, 16, 16)
    assert deepseek.num_splits == 1  # the interpreter runs programs one at a time: nothing to gain from splitting
    for cfg in (tiny, deepseek):
        assert all(v >= 16 and v & (v - 1) == 0 for v in (cfg.block_h, cfg.block_n, cfg.block_r, cfg.block_p))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_returns_an_empty_output(device):
    q_lat, q_pe, pool, tables, lens, r, scale = make_case(32, 16, 4, [5], torch.float32, seed=0, device=device)
    got = paged_mla_decode(q_lat[:0], q_pe[:0], pool, tables[:0], lens[:0], r, scale)
    assert got.shape == (0, H, r)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rank": 31}, r"q_lat\.shape=\[2, 4, 32\]: expected \[B, h, r=31\]"),
        ({"q_pe": torch.randn(2, 3, 16)}, r"q_pe\.shape=\[2, 3, 16\]: expected \[B=2, h=4, p\]"),
        ({"pool": torch.randn(10, 4, 40)}, r"pool\.shape=\[10, 4, 40\]: expected \[n_blocks, block_size, r \+ p=48\]"),
        ({"tables": torch.zeros(3, 4, dtype=torch.int32)},
         r"block_tables\.shape=\[3, 4\]: expected \[B=2, max_blocks\]"),
        ({"tables": torch.zeros(2, 4, dtype=torch.int64)}, r"block_tables\.dtype=torch\.int64: expected torch\.int32"),
        ({"lens": torch.tensor([1, 2])}, r"lens\.dtype=torch\.int64: expected torch\.int32"),
        ({"lens": torch.ones(2, 1, dtype=torch.int32)}, r"lens\.shape=\[2, 1\]: expected \[B=2\]"),
        ({"lens": torch.tensor([0, 3], dtype=torch.int32)},
         r"lens: min 0, max 3; values must be in \[1, max_blocks \* block_size=16\]"),
        ({"lens": torch.tensor([2, 999], dtype=torch.int32)}, r"lens: min 2, max 999; values must be in \[1, "),
        ({"tables": torch.full((2, 4), 99, dtype=torch.int32)}, r"block_tables: the ids of used blocks must be in"),
        ({"q_pe": torch.randn(2, 4, 16).half()}, "dtypes differ: q_lat torch.float32, q_pe torch.float16"),
        ({"pool": torch.randint(0, 3, (10, 4, 48))}, r"pool\.dtype=torch\.int64: expected one of"),
        ({"out": torch.empty(2, 4, 32).half()}, r"out: expected torch\.float32\[2, 4, 32\]"),
        ({"num_splits": 0}, r"num_splits=0: expected an int >= 1 or None"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(change, message):
    q_lat, q_pe, pool, tables, lens, r, scale = make_case(32, 16, 4, [5, 9], torch.float32, seed=1)
    args = {"q_pe": q_pe, "pool": pool, "tables": tables, "lens": lens, "rank": r, "out": None, "num_splits": None}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        paged_mla_decode(q_lat, args["q_pe"], args["pool"], args["tables"], args["lens"], args["rank"], scale,
                         out=args["out"], num_splits=args["num_splits"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch, heads, num_splits", [(2, 16, None), (2, 16, 1), (8, 128, None)])
def test_deepseek_decode_shapes_on_cuda(batch, heads, num_splits, dtype, tol):
    """r 512, p 64, 64-token blocks, contexts up to 2000 tokens: many tiles, several head blocks, default splits."""
    gen = torch.Generator().manual_seed(batch)
    lens = [1, *torch.randint(2, 2000, (batch - 1,), generator=gen).tolist()]
    q_lat, q_pe, pool, tables, lens_t, r, scale = make_case(512, 64, 64, lens, dtype, batch, "cuda", heads)
    got = paged_mla_decode(q_lat, q_pe, pool, tables, lens_t, r, scale, num_splits=num_splits).cpu().double()
    ref = paged_mla_decode_reference(*(x.cpu() for x in (q_lat, q_pe, pool, tables, lens_t)), r, scale).double()
    assert got.isfinite().all()
    assert ((got - ref).norm() / ref.norm()).item() < tol
