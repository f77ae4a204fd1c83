"""Triton grouped GEMM 2 on FP8: y[pair] = w[pair] · (h[pair]·W_downᵀ), block scales applied after each K step."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_gemm_down_fp8_kernel(
    hq_ptr,
    hs_ptr,
    w_ptr,
    ws_ptr,
    y_ptr,
    weights_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    n_pairs,
    hidden,
    inter,
    stride_hp,
    stride_hi,
    stride_sp,
    stride_sg,
    stride_we,
    stride_wn,
    stride_wi,
    stride_se,
    stride_sn,
    stride_sk,
    stride_yp,
    stride_yh,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Tiling as grouped_gemm_down: program (m, n) owns BLOCK_M pairs of one expert × BLOCK_N hidden columns, walking
    # the intermediate dim in BLOCK_K steps inside one scale group each (as in grouped_gemm_swiglu_fp8); the routing
    # weight multiplies the float32 accumulator.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = pairs < n_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w_base = w_ptr + expert * stride_we
    w_scales = ws_ptr + expert * stride_se + (cols // GROUP_N) * stride_sn  # [BLOCK_N] each column's tile row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        g = k0 // GROUP_K
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        h = tl.load(
            hq_ptr + pairs[:, None] * stride_hp + ks[None, :] * stride_hi,
            mask=valid[:, None] & k_ok[None, :],
            other=0.0,
        )
        h_scale = tl.load(hs_ptr + pairs * stride_sp + g * stride_sg, mask=valid, other=0.0)
        w = tl.load(
            w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wi,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        w_scale = tl.load(w_scales + g * stride_sk, mask=col_ok, other=0.0)
        acc += tl.dot(h, w) * h_scale[:, None] * w_scale[None, :]
    route_w = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    acc = acc * route_w[:, None]  # fused epilogue: the routing weight
    tl.store(
        y_ptr + pairs[:, None] * stride_yp + cols[None, :] * stride_yh,
        acc.to(y_ptr.dtype.element_ty),
        mask=valid[:, None] & col_ok[None, :],
    )
