"""Half-precision matmuls on CPUs without bf16/fp16 instructions: float32 products of exactly widened operands.

A bfloat16 (or float16) GEMM multiplies half-precision values, sums the products in float32 and rounds the sum
once to the output's dtype. Every bf16/fp16 value is exact in float32, so a float32 GEMM of the widened operands,
rounded to the half dtype, computes the same products and sums (only the summation order may differ, as it does
between native kernels). On an x86 CPU without AVX512-BF16/AMX (or AVX512-FP16) instructions torch's native half
GEMMs convert inside the kernel and run about 4x slower than float32 ones (measured on the 2-core dev VM); there
the matmul weights are held widened to float32 (2x their memory) and the activations stay in the model's dtype.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

MODES = ("auto", "native", "float32")
# CPU flags (Linux /proc/cpuinfo) whose instructions torch's oneDNN kernels use for that dtype's GEMMs.
NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's x86 CPU flags; empty where they cannot be read (another OS or architecture)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def matmul_dtype(dtype: torch.dtype, device: torch.device | str, mode: str = "auto") -> torch.dtype:
    """The dtype a model of `dtype` holds its matmul weights in on `device`.

    mode 'native': `dtype` itself; 'float32': float32 for a half dtype on a CPU; 'auto': float32 for a half dtype
    on an x86 CPU whose flags lack that dtype's instructions (NATIVE_FLAGS), else `dtype`. GPUs always multiply
    natively."""
    if mode not in MODES:
        raise ValueError(f"half_matmul={mode!r}: expected one of {MODES}")
    if dtype not in NATIVE_FLAGS or torch.device(device).type != "cpu" or mode == "native":
        return dtype
    if mode == "float32":
        return torch.float32
    flags = cpu_flags()
    return torch.float32 if flags and not flags.intersection(NATIVE_FLAGS[dtype]) else dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear where the weight may be held wider than x (see the module doc): computed in the weight's dtype,
    rounded to x's. x: [..., in]; weight: [out, in]; bias: [out] in either dtype -> [..., out] in x's dtype."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    bias = None if bias is None else bias.to(weight.dtype)  # a model's biases stay in its dtype (exact widened)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def einsum(equation: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """torch.einsum of an activation and a weight held as `linear` holds it; the result in x's dtype."""
    if weight.dtype == x.dtype:
        return torch.einsum(equation, x, weight)
    return torch.einsum(equation, x.to(weight.dtype), weight).to(x.dtype)
