"""Half-precision matmuls through float32 weights compute what a native half GEMM computes, and the mode chooses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_core import half_matmul
from model_core.half_matmul import einsum, linear, matmul_dtype


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ulps_from_exact(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of the half dtype's spacing at exact's magnitude (exact: float64)."""
    mantissa = {torch.bfloat16: 8, torch.float16: 11}[got.dtype]
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - (mantissa - 1))
    return (got.double() - exact).abs() / spacing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widened_linear_is_the_half_gemm_rounded_once(dtype):
    x, w, b = rand(37, 96, seed=1, dtype=dtype), rand(40, 96, seed=2, dtype=dtype), rand(40, seed=3, dtype=dtype)
    got = linear(x, w.float(), b.float())
    assert got.dtype == dtype
    exact = F.linear(x.double(), w.double(), b.double())  # the exact sum of the exact products
    ulps = ulps_from_exact(got, exact)
    # One rounding of a float32 sum: at most half an ulp from exact, plus float32's summation error.
    assert ulps.max().item() <= 0.51
    native = F.linear(x, w, b)  # torch's own half GEMM rounds the same sums once as well
    assert ulps_from_exact(native, exact).max().item() <= 1.0
    assert (got != native).float().mean().item() < 0.05  # they differ only where summation order tips a rounding
    assert torch.equal(linear(x, w.float(), b), got)  # a bias kept in the model's dtype is widened the same way


def test_linear_and_einsum_pass_through_weights_of_the_activation_dtype():
    x, w = rand(5, 8, seed=4), rand(6, 8, seed=5)
    assert torch.equal(linear(x, w), F.linear(x, w))
    q, w_uk = rand(3, 2, 4, seed=6), rand(2, 4, 8, seed=7)
    assert torch.equal(einsum("bhd,hdr->bhr", q, w_uk), torch.einsum("bhd,hdr->bhr", q, w_uk))
    widened = einsum("bhd,hdr->bhr", q, w_uk.float())
    assert widened.dtype == torch.bfloat16
    exact = torch.einsum("bhd,hdr->bhr", q.double(), w_uk.double())
    assert ulps_from_exact(widened, exact).max().item() <= 0.51


def test_mode_float32_widens_half_dtypes_on_cpu_only():
    assert matmul_dtype(torch.bfloat16, "cpu", "float32") == torch.float32
    assert matmul_dtype(torch.float16, "cpu", "float32") == torch.float32
    assert matmul_dtype(torch.float32, "cpu", "float32") == torch.float32
    assert matmul_dtype(torch.bfloat16, "cuda", "float32") == torch.bfloat16  # GPUs multiply halves natively
    assert matmul_dtype(torch.bfloat16, "cpu", "native") == torch.bfloat16


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),  # the instructions are there: native
    ({"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),
    ({"avx512f", "avx2"}, torch.float32),  # an x86 CPU without them: widened
    (set(), torch.bfloat16),  # flags unknown (another OS or architecture): left native
])
def test_auto_reads_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(half_matmul, "cpu_flags", lambda: frozenset(flags))
    assert matmul_dtype(torch.bfloat16, "cpu", "auto") == expected
    assert matmul_dtype(torch.float32, "cpu", "auto") == torch.float32


def test_cpu_flags_of_this_machine_are_read():
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "sse2" in half_matmul.cpu_flags()  # every x86-64 CPU has it


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="half_matmul='fast'"):
        matmul_dtype(torch.bfloat16, "cpu", "fast")
