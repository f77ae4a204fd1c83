"""Triton paged MLA decode: absorbed attention of one query token per sequence over a block pool of latent rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from model_core.kernel_runtime import FLOAT_DTYPES, interpreting, new_workspace, triton_available

# Shape legend: B = sequences, h = heads, r = kv_lora_rank, p = qk_rope_head_dim, S = context splits,
# n_blocks = blocks in the pool, bs = block_size (tokens per block), M = max blocks per sequence,
# L = the longest sequence's length (the reference's gather).

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeLaunch:
    """Tile sizes and launch settings of one paged_mla_decode call."""

    block_h: int  # heads per program (tl.dot needs >= 16 rows; padded heads are masked)
    block_n: int  # cached tokens per loop step
    block_r: int  # r padded to a power of two
    block_p: int  # p padded to a power of two
    num_splits: int  # context splits per sequence (flash-decoding); 1 = single pass, no combine
    num_warps: int
    num_stages: int


def decode_launch_config(
    batch: int, heads: int, kv_lora_rank: int, rope_dim: int, max_context: int, device: torch.device
) -> DecodeLaunch:
    """Pick tiles from the shapes; max_context is an upper bound on lens (M·bs), known without a device sync."""
    # Untuned: no GPU measurements exist yet. Starting points from vLLM's Triton MLA decode (16 heads and
    # 16 tokens per tile at r = 512, 4 warps, 2 stages); smaller r takes more heads per program so the float32
    # accumulator [block_h, block_r] stays at <= 8192 values (64 registers a thread at 4 warps).
    block_r = max(16, triton.next_power_of_2(kv_lora_rank))
    block_p = max(16, triton.next_power_of_2(rope_dim))
    block_h = max(16, min(64, 8192 // block_r, triton.next_power_of_2(heads)))
    block_n = 16 if block_r >= 512 else 32
    num_splits = 1  # the CPU interpreter runs programs one at a time: splitting would only add the combine
    if device.type == "cuda":
        # Split the context only while there are fewer programs than SMs, and keep >= 256 tokens per split.
        programs = batch * triton.cdiv(heads, block_h)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        num_splits = max(1, min(triton.cdiv(sms, max(programs, 1)), max_context // 256, 16))
    return DecodeLaunch(block_h, block_n, block_r, block_p, num_splits, num_warps=4, num_stages=2)


@triton.jit
def paged_mla_decode_kernel(
    q_lat_ptr,
    q_pe_ptr,
    pool_ptr,
    block_tables_ptr,
    lens_ptr,
    o_ptr,
    lse_ptr,
    heads,
    rank,
    rope,
    block_size,
    scale_log2,
    stride_qb,
    stride_qh,
    stride_qr,
    stride_pb,
    stride_ph,
    stride_pp,
    stride_kb,
    stride_kt,
    stride_kd,
    stride_tb,
    stride_tm,
    stride_lb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_or,
    stride_eb,
    stride_eh,
    stride_es,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Tiling: program (b, head block, split) holds BLOCK_H query heads and walks its split of sequence b's
    # context BLOCK_N tokens at a time, each token's row found through the block table (so a tile may span
    # blocks). Every head shares the same latent rows: one tile load serves all BLOCK_H heads. Online softmax
    # in base 2 (scale folded with log2 e); the accumulator [BLOCK_H, BLOCK_R] is float32.
    b = tl.program_id(0)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    h_ok = hs < heads
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < rank
    ps = tl.arange(0, BLOCK_P)
    p_ok = ps < rope
    q_lat = tl.load(
        q_lat_ptr + b * stride_qb + hs[:, None] * stride_qh + rs[None, :] * stride_qr,
        mask=h_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    q_pe = tl.load(
        q_pe_ptr + b * stride_pb + hs[:, None] * stride_ph + ps[None, :] * stride_pp,
        mask=h_ok[:, None] & p_ok[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter's tl.dot is wrong for bfloat16 inputs
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    seq_len = tl.load(lens_ptr + b * stride_lb)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        page = tl.load(block_tables_ptr + b * stride_tb + (pos // block_size) * stride_tm, mask=valid, other=0)
        row = pool_ptr + page.to(tl.int64) * stride_kb + (pos % block_size) * stride_kt  # [BLOCK_N]
        c_kv = tl.load(row[:, None] + rs[None, :] * stride_kd, mask=valid[:, None] & r_ok[None, :], other=0.0)
        k_pe = tl.load(row[:, None] + (rank + ps)[None, :] * stride_kd, mask=valid[:, None] & p_ok[None, :], other=0.0)
        if UPCAST:
            c_kv = c_kv.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        s = tl.dot(q_lat, tl.trans(c_kv), input_precision=PRECISION)
        s = tl.dot(q_pe, tl.trans(k_pe), s, input_precision=PRECISION)  # [BLOCK_H, BLOCK_N]
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every step has a valid token (n0 < end)
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        acc = tl.dot(prob.to(c_kv.dtype), c_kv, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    o_rows = o_ptr + b * stride_ob + hs[:, None] * stride_oh + split * stride_os + rs[None, :] * stride_or
    if NUM_SPLITS == 1:
        tl.store(o_rows, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & r_ok[None, :])
    else:
        # A split past the sequence's end saw nothing: it stores zeros with lse = -inf (weight 0 when combined).
        seen = l_i > 0
        tl.store(o_rows, acc / tl.where(seen, l_i, 1.0)[:, None], mask=h_ok[:, None] & r_ok[None, :])
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_eb + hs * stride_eh + split * stride_es, lse, mask=h_ok)


@triton.jit
def combine_splits_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    rank,
    stride_ab,
    stride_ah,
    stride_as,
    stride_ar,
    stride_eb,
    stride_eh,
    stride_es,
    stride_ob,
    stride_oh,
    stride_or,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program per (sequence, head): o = Σ_s 2^(lse_s - max) · o_s / Σ_s 2^(lse_s - max) (split 0 is never empty).
    b = tl.program_id(0)
    head = tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    s_ok = ss < NUM_SPLITS
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < rank
    lse = tl.load(lse_ptr + b * stride_eb + head * stride_eh + ss * stride_es, mask=s_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    weight = weight / tl.sum(weight, axis=0)
    part = tl.load(
        part_ptr + b * stride_ab + head * stride_ah + ss[:, None] * stride_as + rs[None, :] * stride_ar,
        mask=s_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    o = tl.sum(weight[:, None] * part, axis=0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + rs * stride_or, o.to(out_ptr.dtype.element_ty), mask=r_ok)


def check_inputs(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    pool: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    kv_lora_rank: int,
) -> None:
    """Raise ValueError naming the argument that does not fit. Value ranges (lens, block ids) are checked only
    for CPU tensors: on a GPU that would cost a host sync per layer, and the block manager owns their validity."""
    if q_lat.dim() != 3 or q_lat.shape[2] != kv_lora_rank:
        raise ValueError(f"q_lat.shape={list(q_lat.shape)}: expected [B, h, r={kv_lora_rank}]")
    b, h, r = q_lat.shape
    if q_pe.dim() != 3 or q_pe.shape[:2] != (b, h):
        raise ValueError(f"q_pe.shape={list(q_pe.shape)}: expected [B={b}, h={h}, p]")
    p = q_pe.shape[2]
    if pool.dim() != 3 or pool.shape[2] != r + p:
        raise ValueError(f"pool.shape={list(pool.shape)}: expected [n_blocks, block_size, r + p={r + p}]")
    if block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables.shape={list(block_tables.shape)}: expected [B={b}, max_blocks]")
    if lens.shape != (b,):
        raise ValueError(f"lens.shape={list(lens.shape)}: expected [B={b}]")
    for name, x in (("block_tables", block_tables), ("lens", lens)):
        if x.dtype != torch.int32:
            raise ValueError(f"{name}.dtype={x.dtype}: expected torch.int32")
    for name, x in (("q_lat", q_lat), ("q_pe", q_pe), ("pool", pool)):
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype}: expected one of float32, float16, bfloat16")
    if not (q_lat.dtype == q_pe.dtype == pool.dtype):
        raise ValueError(f"dtypes differ: q_lat {q_lat.dtype}, q_pe {q_pe.dtype}, pool {pool.dtype}; cast first")
    devices = {x.device for x in (q_lat, q_pe, pool, block_tables, lens)}
    if len(devices) != 1:
        raise ValueError(f"tensors are on different devices: {sorted(map(str, devices))}")
    if lens.device.type == "cpu" and b:
        n_blocks, block_size, max_context = pool.shape[0], pool.shape[1], block_tables.shape[1] * pool.shape[1]
        low, high = int(lens.min()), int(lens.max())
        if low < 1 or high > max_context:
            raise ValueError(
                f"lens: min {low}, max {high}; values must be in [1, max_blocks * block_size={max_context}]"
            )
        used = torch.arange(block_tables.shape[1]) * block_size < lens[:, None]  # [B, M] blocks holding tokens
        ids = block_tables[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_blocks):
            raise ValueError(f"block_tables: the ids of used blocks must be in [0, n_blocks={n_blocks})")


def paged_mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    pool: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    kv_lora_rank: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode attention over a paged latent cache, one query token per sequence.

    q_lat: [B, h, r] (query already multiplied by W_UK, i.e. in latent space), r = kv_lora_rank
    q_pe:  [B, h, p] (rotary part of the query, rope already applied)
    pool:  [n_blocks, block_size, r + p] one layer's block pool (may be a non-contiguous view of a bigger
           tensor [layers, n_blocks, block_size, r + p]: its strides are used); per cached token the first r
           values are c_kv, the last p are k_pe
    block_tables: [B, max_blocks] int32 block ids of each sequence (entries past the sequence's blocks are
           padding, arbitrary valid ids, never read beyond lens)
    lens: [B] int32 number of cached tokens to attend for each sequence (>= 1; includes the current token)
    returns o_lat: [B, h, r] in q_lat's dtype: softmax_j(scale * (q_lat·c_kv_j + q_pe·k_pe_j)) weighted sum of
    c_kv_j over positions j < lens[b], where position j lives in block block_tables[b, j // block_size] at row
    j % block_size. Softmax accumulates in float32 (online softmax, flash-decoding style).

    out: written in place and returned if given ([B, h, r], q_lat's dtype and device). num_splits: context
    splits per sequence (default: chosen from the shapes). Runs on CUDA, or on CPU under TRITON_INTERPRET=1.
    """
    check_inputs(q_lat, q_pe, pool, block_tables, lens, kv_lora_rank)
    device = q_lat.device
    if not triton_available(device):
        raise ValueError(f"q_lat.device={device}: the Triton kernel needs CUDA, or TRITON_INTERPRET=1 on CPU")
    b, h, r = q_lat.shape
    p = q_pe.shape[2]
    if out is None:
        out = torch.empty_like(q_lat)
    elif out.shape != q_lat.shape or out.dtype != q_lat.dtype or out.device != device:
        raise ValueError(f"out: expected {q_lat.dtype}{list(q_lat.shape)} on {device}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits={num_splits!r}: expected an int >= 1 or None")
    if b == 0 or h == 0:
        return out
    cfg = decode_launch_config(b, h, r, p, block_tables.shape[1] * pool.shape[1], device)
    splits = cfg.num_splits if num_splits is None else num_splits
    upcast = interpreting() and q_lat.dtype == torch.bfloat16
    precision = "ieee" if q_lat.dtype == torch.float32 else "tf32"  # fp32 stays exact; 16-bit ignores this
    if splits == 1:
        o_buf, lse_buf = out, out  # lse_buf is not touched on the single-pass path
        o_strides, lse_strides = (out.stride(0), out.stride(1), 0, out.stride(2)), (0, 0, 0)
    else:
        o_buf = new_workspace((b, h, splits, r), torch.float32, device)  # [B, h, S, r] normalised per split
        lse_buf = new_workspace((b, h, splits), torch.float32, device)  # [B, h, S] log2 of each split's sum
        o_strides, lse_strides = o_buf.stride(), lse_buf.stride()
    paged_mla_decode_kernel[(b, triton.cdiv(h, cfg.block_h), splits)](
        q_lat,
        q_pe,
        pool,
        block_tables,
        lens,
        o_buf,
        lse_buf,
        h,
        r,
        p,
        pool.shape[1],
        scale * LOG2E,
        *q_lat.stride(),
        *q_pe.stride(),
        *pool.stride(),
        *block_tables.stride(),
        lens.stride(0),
        *o_strides,
        *lse_strides,
        BLOCK_H=cfg.block_h,
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_r,
        BLOCK_P=cfg.block_p,
        NUM_SPLITS=splits,
        UPCAST=upcast,
        PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        combine_splits_kernel[(b, h)](
            o_buf,
            lse_buf,
            out,
            r,
            *o_buf.stride(),
            *lse_buf.stride(),
            *out.stride(),
            NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_R=cfg.block_r,
            num_warps=cfg.num_warps,
        )
    return out


def paged_mla_decode_reference(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    pool: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    kv_lora_rank: int,
    scale: float,
) -> torch.Tensor:
    """paged_mla_decode in plain torch (same arguments and result): gather each sequence's rows, zero and mask
    those past lens (whatever they hold), softmax in float32. Any device; syncs once to size the gather."""
    check_inputs(q_lat, q_pe, pool, block_tables, lens, kv_lora_rank)
    b, h, r = q_lat.shape
    if b == 0:
        return torch.empty_like(q_lat)
    block_size = pool.shape[1]
    max_len = int(lens.max())
    pos = torch.arange(max_len, device=pool.device)  # [L]
    blocks = block_tables[:, pos // block_size].long()  # [B, L]
    past_end = pos[None, :] >= lens[:, None]  # [B, L]
    rows = pool[blocks, pos % block_size].float().masked_fill(past_end[..., None], 0.0)  # [B, L, r + p]
    c_kv, k_pe = rows[..., :r], rows[..., r:]
    scores = torch.einsum("bhr,blr->bhl", q_lat.float(), c_kv) + torch.einsum("bhp,blp->bhl", q_pe.float(), k_pe)
    scores = (scores * scale).masked_fill(past_end[:, None, :], -math.inf)  # [B, h, L]
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhl,blr->bhr", probs, c_kv).to(q_lat.dtype)
