"""Triton combine: out[t] = Σ_k y[t·K + k] over the token's valid slots, in slot order (deterministic)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    y_ptr,
    ids_ptr,
    out_ptr,
    top_k,
    hidden,
    stride_yp,
    stride_yh,
    stride_ot,
    stride_oh,
    BLOCK_N: tl.constexpr,
):
    # Program (t, n) sums one token's K contributions for BLOCK_N hidden columns; slots whose id is -1
    # (expert on another device) were never computed and are never read.
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, top_k):
        pair = token * top_k + k
        here = tl.load(ids_ptr + pair + cols * 0) >= 0  # the slot's id, broadcast over the columns
        row = tl.load(y_ptr + pair * stride_yp + cols * stride_yh, mask=col_ok & here, other=0.0)
        acc += row.to(tl.float32)
    tl.store(out_ptr + token * stride_ot + cols * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
