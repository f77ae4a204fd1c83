"""Triton grouped GEMM 1: h[pair] = SiLU(x[token]·W_gateᵀ) * (x[token]·W_upᵀ) for each expert's block of pairs."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_gemm_swiglu_kernel(
    x_ptr,
    w_ptr,
    h_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    n_pairs,
    top_k,
    hidden,
    inter,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wh,
    stride_hp,
    stride_hi,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Tiling: program (m, n) owns BLOCK_M pairs of one expert × BLOCK_N intermediate columns; it walks the
    # hidden dim in BLOCK_K steps, accumulating the gate and up products side by side in float32.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = pairs < n_pairs
    tokens = pairs // top_k
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    w_base = w_ptr + expert * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        x = tl.load(
            x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh,
            mask=valid[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wh, mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None] * stride_wh, mask=w_mask, other=0.0)
        acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(x, w_up, acc_up, input_precision=PRECISION)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up  # fused epilogue: SiLU(gate) · up
    tl.store(
        h_ptr + pairs[:, None] * stride_hp + cols[None, :] * stride_hi,
        h.to(h_ptr.dtype.element_ty),
        mask=valid[:, None] & col_ok[None, :],
    )
