"""fused_moe_fp8: the fused MoE on FP8 expert weights with DeepSeek-V3's block scales, activations quantized per
token-group (checks, launch configs, then quantize x, GEMM1, quantize h, GEMM2, combine)."""

from __future__ import annotations

import torch

from expert_workers.expert_pairs import ExpertPairs, sort_by_expert
from expert_workers.kernels.align import align_pairs
from expert_workers.kernels.launcher import (
    KernelInputError,
    check_ids,
    check_routing,
    launch_config,
    prepare_call,
    triton_cdiv,
)
from model_core.fp8 import FP8, FP8_MAX, SCALE_EPS
from model_core.kernel_runtime import FLOAT_DTYPES, new_workspace

# Shape legend: T = tokens, H = hidden, I = expert intermediate, E = local experts, K = experts per token,
# (bo, bi) = the checkpoint's weight block (out, in); activations are scaled per token and per bi columns.


def _blocks(n: int, b: int) -> int:
    return -(-n // b)


def check_fp8_inputs(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    s_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    s_down: torch.Tensor,
    block: tuple[int, int],
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> None:
    """Raise KernelInputError naming the argument that does not fit."""
    if not isinstance(block, (tuple, list)) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise KernelInputError(f"block={block!r}: expected (block_out, block_in), two positive ints")
    bo, bi = block
    if bi < 16 or bi & (bi - 1):
        raise KernelInputError(f"block[1]={bi}: expected a power of two >= 16 (a K step must lie in one scale group)")
    if hidden.dim() != 2:
        raise KernelInputError(f"hidden.shape={list(hidden.shape)}: expected [T, H]")
    t, h = hidden.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != h or w_gate_up.shape[1] % 2:
        raise KernelInputError(f"w_gate_up.shape={list(w_gate_up.shape)}: expected [E, 2I, H={h}]")
    e, i = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (e, h, i):
        raise KernelInputError(f"w_down.shape={list(w_down.shape)}: expected [E={e}, H={h}, I={i}]")
    want = (e, 2 * _blocks(i, bo), _blocks(h, bi))
    if tuple(s_gate_up.shape) != want:
        raise KernelInputError(f"s_gate_up.shape={list(s_gate_up.shape)}: expected {list(want)} "
                               f"(gate's then up's tiles of {list(block)}; E, 2·ceil(I/bo), ceil(H/bi))")
    want = (e, _blocks(h, bo), _blocks(i, bi))
    if tuple(s_down.shape) != want:
        raise KernelInputError(f"s_down.shape={list(s_down.shape)}: expected {list(want)} "
                               f"(tiles of {list(block)}; E, ceil(H/bo), ceil(I/bi))")
    check_routing(topk_ids, topk_weights, t)
    for name, x in (("hidden", hidden), ("topk_weights", topk_weights)):
        if x.dtype not in FLOAT_DTYPES:
            raise KernelInputError(f"{name}.dtype={x.dtype}: expected one of float32, float16, bfloat16")
    for name, x in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if x.dtype != FP8:
            raise KernelInputError(f"{name}.dtype={x.dtype}: expected torch.float8_e4m3fn")
    for name, x in (("s_gate_up", s_gate_up), ("s_down", s_down)):
        if x.dtype != torch.float32:
            raise KernelInputError(f"{name}.dtype={x.dtype}: expected torch.float32 (the checkpoint's scale_inv)")
    named = (("hidden", hidden), ("w_gate_up", w_gate_up), ("s_gate_up", s_gate_up), ("w_down", w_down),
             ("s_down", s_down), ("topk_ids", topk_ids), ("topk_weights", topk_weights))
    if len({x.device for _, x in named}) != 1:
        raise KernelInputError("tensors are on different devices: " + ", ".join(f"{n} {x.device}" for n, x in named))
    if hidden.device.type == "cuda" and torch.cuda.get_device_capability(hidden.device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(hidden.device)
        raise KernelInputError(f"hidden.device={hidden.device}: compute capability {major}.{minor}; the FP8 "
                               "tensor-core dot needs 8.9 or newer (Ada, Hopper)")
    check_ids(topk_ids, e)


def quantize_rows(x: torch.Tensor, group: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token-group quantization, equal bit for bit to model_core.fp8.quantize_activations(x, group):
    (q float8_e4m3fn [R, C], scales float32 [R, ceil(C/group)]). x: [R, C]; rows: int ids of the only rows to
    quantize (the others stay as new_workspace left them). Runs on CUDA, or on CPU under TRITON_INTERPRET=1."""
    from expert_workers.kernels.quantize_fp8 import quantize_groups_kernel

    n_rows, cols = x.shape
    q = new_workspace((n_rows, cols), FP8, x.device)
    scales = new_workspace((n_rows, _blocks(cols, group)), torch.float32, x.device)
    n = n_rows if rows is None else rows.numel()
    if n and cols:
        quantize_groups_kernel[(n, scales.shape[1])](
            x, q, scales, x if rows is None else rows, cols, *x.stride(), *q.stride(), *scales.stride(),
            GROUP=group, HAS_ROWS=rows is not None, FP8_MAX=FP8_MAX, SCALE_EPS=SCALE_EPS,
            num_warps=4 if group >= 128 else 1,
        )
    return q, scales


def fused_moe_fp8(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    s_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    s_down: torch.Tensor,
    block: tuple[int, int],
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor | None = None,
    pairs: ExpertPairs | None = None,
) -> torch.Tensor:
    """Σ_k w[t,k]·FFN_{ids[t,k]}(hidden[t]) on FP8 weights: float32 accumulation, ids of -1 contribute nothing.

    hidden: [T, H] float32/float16/bfloat16; w_gate_up: [E, 2I, H] float8_e4m3fn (gate rows, then up rows) with
    s_gate_up: [E, 2·ceil(I/bo), ceil(H/bi)] float32 (gate's tiles, then up's: up row r uses row ceil(I/bo) + r//bo);
    w_down: [E, H, I] float8_e4m3fn with s_down: [E, ceil(H/bo), ceil(I/bi)]; block = (bo, bi), bi a power of two
    >= 16. Activations x and h = SiLU(gate)·up are quantized per token and per bi columns (quantize_activations).
    Returns [T, H] in hidden's dtype (written into `out` if given). pairs: the caller's sort_by_expert(topk_ids, E).
    Runs on CUDA (compute capability 8.9+), or on CPU under TRITON_INTERPRET=1.
    """
    check_fp8_inputs(hidden, w_gate_up, s_gate_up, w_down, s_down, block, topk_ids, topk_weights)
    out = prepare_call(hidden, w_gate_up.shape[0], topk_ids, pairs, out)
    device = hidden.device
    from expert_workers.kernels.combine import combine_kernel
    from expert_workers.kernels.grouped_gemm_down_fp8 import grouped_gemm_down_fp8_kernel
    from expert_workers.kernels.grouped_gemm_swiglu_fp8 import grouped_gemm_swiglu_fp8_kernel

    t, h = hidden.shape
    e, i, k = w_gate_up.shape[0], w_gate_up.shape[1] // 2, topk_ids.shape[1]
    bo, bi = block
    if t == 0:
        return out
    cfg, combine_cfg = launch_config(t, device, prefix="fp8_")
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], min(cfg["BLOCK_K"], bi)  # powers of two: bk divides bi
    tiles = {"GROUP_N": bo, "GROUP_K": bi, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
             "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous().float().reshape(-1)
    pairs = sort_by_expert(ids, e) if pairs is None else pairs
    aligned = align_pairs(pairs, bm)
    y_buf = new_workspace((t * k, h), hidden.dtype, device)  # weighted expert output per pair
    if aligned.n_blocks:
        xq, xs = quantize_rows(hidden, bi)  # [T, H] fp8, [T, ceil(H/bi)]
        h_buf = new_workspace((t * k, i), torch.float32, device)  # SiLU(gate)·up per pair, before quantization
        grouped_gemm_swiglu_fp8_kernel[(aligned.n_blocks, triton_cdiv(i, bn))](
            xq, xs, w_gate_up, s_gate_up, h_buf, aligned.sorted_pairs, aligned.block_expert, aligned.n_pairs, k,
            h, i, _blocks(i, bo), *xq.stride(), *xs.stride(), *w_gate_up.stride(), *s_gate_up.stride(),
            *h_buf.stride(), **tiles,
        )
        hq, hs = quantize_rows(h_buf, bi, rows=pairs.pair_index)  # only the rows GEMM1 wrote
        grouped_gemm_down_fp8_kernel[(aligned.n_blocks, triton_cdiv(h, bn))](
            hq, hs, w_down, s_down, y_buf, weights, aligned.sorted_pairs, aligned.block_expert, aligned.n_pairs, h,
            i, *hq.stride(), *hs.stride(), *w_down.stride(), *s_down.stride(), *y_buf.stride(), **tiles,
        )
    cbn = combine_cfg["BLOCK_N"]
    combine_kernel[(t, triton_cdiv(h, cbn))](
        y_buf, ids, out, k, h, *y_buf.stride(), *out.stride(), BLOCK_N=cbn, num_warps=combine_cfg["num_warps"],
    )
    return out
