"""Triton per-token-group FP8 quantization: the values of model_core.fp8.quantize_activations, bit for bit."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(v):
    # Round float32 v (|v| <= 448) to the nearest float8_e4m3fn value, ties to even, in float32: the step is a power
    # of two, so every operation is exact and the cast that follows is too. By hand because Triton's CPU interpreter
    # casts float32 -> fp8 wrongly (subnormals truncated, 1.9375 -> 1.0); the GPU's cvt.rn agrees with this.
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2^-6 (subnormal) the step stays 2^-9
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits: step 2^(e-3)
    units = tl.abs(v) * ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)  # |v| / step, < 16
    low = tl.floor(units)
    frac = units - low
    up = (frac > 0.5) | ((frac == 0.5) & ((low.to(tl.int32) & 1) == 1))
    magnitude = (low + up.to(tl.float32)) * step
    return tl.where(bits < 0, -magnitude, magnitude)  # the sign bit, so that -0.0 stays -0.0 as in torch


@triton.jit
def quantize_groups_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    rows_ptr,
    cols,
    stride_xr,
    stride_xc,
    stride_qr,
    stride_qc,
    stride_sr,
    stride_sg,
    GROUP: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    SCALE_EPS: tl.constexpr,
):
    # Program (r, g) quantizes group g (GROUP columns) of row r, or of row rows[r] when HAS_ROWS (only the rows a
    # kernel wrote): scale = max|x| / FP8_MAX (at least SCALE_EPS), q = x / scale rounded to e4m3. Divisions are
    # IEEE-rounded (div_rn) as torch's are; the default GPU division is approximate.
    r = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + r).to(tl.int64)
    else:
        row = r.to(tl.int64)
    g = tl.program_id(1)
    cs = g * GROUP + tl.arange(0, GROUP)
    ok = cs < cols
    x = tl.load(x_ptr + row * stride_xr + cs * stride_xc, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(tl.div_rn(amax, tl.full((), FP8_MAX, tl.float32)), SCALE_EPS)
    q = round_to_e4m3(tl.div_rn(x, tl.zeros_like(x) + scale))
    tl.store(q_ptr + row * stride_qr + cs * stride_qc, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row * stride_sr + g * stride_sg, scale)
