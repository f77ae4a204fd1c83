"""Triton grouped GEMM 1 on FP8: h[pair] = SiLU(x·W_gateᵀ) * (x·W_upᵀ), block scales applied after each K step."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_gemm_swiglu_fp8_kernel(
    xq_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    h_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    n_pairs,
    top_k,
    hidden,
    inter,
    up_scale_row,
    stride_xt,
    stride_xh,
    stride_st,
    stride_sg,
    stride_we,
    stride_wn,
    stride_wh,
    stride_se,
    stride_sn,
    stride_sk,
    stride_hp,
    stride_hi,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Tiling as grouped_gemm_swiglu: program (m, n) owns BLOCK_M pairs of one expert × BLOCK_N intermediate columns.
    # BLOCK_K divides GROUP_K, so a K step lies in one scale group: one activation scale per row (xs[token, g]) and
    # one weight scale per column (its GROUP_N-row tile) scale the step's fp8 dot, which is then added to the float32
    # accumulator (fp8 products are never summed across K steps inside the tensor core).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = pairs < n_pairs
    tokens = pairs // top_k
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    w_base = w_ptr + expert * stride_we
    gate_scales = ws_ptr + expert * stride_se + (cols // GROUP_N) * stride_sn  # [BLOCK_N] gate tile rows
    up_scales = ws_ptr + expert * stride_se + (up_scale_row + cols // GROUP_N) * stride_sn  # up's tiles follow gate's
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        g = k0 // GROUP_K
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        x = tl.load(
            xq_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh,
            mask=valid[:, None] & k_ok[None, :],
            other=0.0,
        )
        x_scale = tl.load(xs_ptr + tokens * stride_st + g * stride_sg, mask=valid, other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wh, mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None] * stride_wh, mask=w_mask, other=0.0)
        s_gate = tl.load(gate_scales + g * stride_sk, mask=col_ok, other=0.0)
        s_up = tl.load(up_scales + g * stride_sk, mask=col_ok, other=0.0)
        acc_gate += tl.dot(x, w_gate) * x_scale[:, None] * s_gate[None, :]
        acc_up += tl.dot(x, w_up) * x_scale[:, None] * s_up[None, :]
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up  # fused epilogue: SiLU(gate) · up, float32 (quantized next)
    tl.store(
        h_ptr + pairs[:, None] * stride_hp + cols[None, :] * stride_hi,
        h.to(h_ptr.dtype.element_ty),
        mask=valid[:, None] & col_ok[None, :],
    )
