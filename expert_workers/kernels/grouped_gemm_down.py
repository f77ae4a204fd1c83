"""Triton grouped GEMM 2: y[pair] = w[pair] · (h[pair]·W_downᵀ) for each expert's block of pairs."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_gemm_down_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    weights_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    n_pairs,
    hidden,
    inter,
    stride_hp,
    stride_hi,
    stride_we,
    stride_wn,
    stride_wi,
    stride_yp,
    stride_yh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Tiling: program (m, n) owns BLOCK_M pairs of one expert × BLOCK_N hidden columns, walking the
    # intermediate dim in BLOCK_K steps; the routing weight is applied to the float32 accumulator.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = pairs < n_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        h = tl.load(
            h_ptr + pairs[:, None] * stride_hp + ks[None, :] * stride_hi, mask=valid[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(
            w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wi,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    route_w = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    acc = acc * route_w[:, None]  # fused epilogue: the routing weight
    tl.store(
        y_ptr + pairs[:, None] * stride_yp + cols[None, :] * stride_yh,
        acc.to(y_ptr.dtype.element_ty),
        mask=valid[:, None] & col_ok[None, :],
    )
