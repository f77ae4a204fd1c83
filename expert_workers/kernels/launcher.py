"""fused_moe entry point: checks shapes, dtypes, devices; picks launch configs; runs align, GEMM1, GEMM2, combine."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from expert_workers.expert_pairs import ExpertPairs, sort_by_expert
from expert_workers.kernels.align import align_pairs
from model_core.kernel_runtime import FLOAT_DTYPES, new_workspace, triton_available

# Shape legend: T = tokens, H = hidden, I = expert intermediate, E = local experts, K = experts per token.

CONFIG_DIR = Path(__file__).parent / "configs"


class KernelInputError(ValueError):
    """fused_moe got tensors of the wrong shape, dtype or device; the message names the argument."""


@lru_cache(maxsize=8)
def _config_table(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def launch_config(n_tokens: int, device: torch.device, prefix: str = "") -> tuple[dict, dict]:
    """(GEMM config, combine config) for T tokens: the GPU's own table if measured, else the defaults.

    prefix picks a kernel family's tables: "" for fused_moe (interpreter.json, default.json, <gpu>.json),
    "fp8_" for fused_moe_fp8 (fp8_interpreter.json, fp8_default.json, fp8_<gpu>.json)."""
    if device.type != "cuda":
        table = _config_table(f"{prefix}interpreter")
    else:
        gpu = prefix + re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")
        table = _config_table(gpu if (CONFIG_DIR / f"{gpu}.json").is_file() else f"{prefix}default")
    row = next(r for r in table["buckets"] if n_tokens <= r["max_tokens"])
    return row, table["combine"]


def check_inputs(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> None:
    """Raise KernelInputError naming the argument that does not fit."""
    if hidden.dim() != 2:
        raise KernelInputError(f"hidden.shape={list(hidden.shape)}: expected [T, H]")
    t, h = hidden.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != h or w_gate_up.shape[1] % 2:
        raise KernelInputError(f"w_gate_up.shape={list(w_gate_up.shape)}: expected [E, 2I, H={h}]")
    e, i = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (e, h, i):
        raise KernelInputError(f"w_down.shape={list(w_down.shape)}: expected [E={e}, H={h}, I={i}]")
    check_routing(topk_ids, topk_weights, t)
    for name, x in (("hidden", hidden), ("w_gate_up", w_gate_up), ("w_down", w_down), ("topk_weights", topk_weights)):
        if x.dtype not in FLOAT_DTYPES:
            raise KernelInputError(f"{name}.dtype={x.dtype}: expected one of float32, float16, bfloat16")
    if not (hidden.dtype == w_gate_up.dtype == w_down.dtype):
        raise KernelInputError(
            f"dtypes differ: hidden {hidden.dtype}, w_gate_up {w_gate_up.dtype}, w_down {w_down.dtype}; cast first"
        )
    devices = {x.device for x in (hidden, w_gate_up, w_down, topk_ids, topk_weights)}
    if len(devices) != 1:
        raise KernelInputError(f"tensors are on different devices: {sorted(map(str, devices))}")
    check_ids(topk_ids, e)


def check_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, t: int) -> None:
    """KernelInputError unless topk_ids is [T, K] int32/int64 and topk_weights has its shape."""
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t:
        raise KernelInputError(f"topk_ids.shape={list(topk_ids.shape)}: expected [T={t}, K]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"topk_ids.dtype={topk_ids.dtype}: expected int32 or int64")
    if topk_weights.shape != topk_ids.shape:
        raise KernelInputError(f"topk_weights.shape={list(topk_weights.shape)}: expected {list(topk_ids.shape)}")


def check_ids(topk_ids: torch.Tensor, e: int) -> None:
    """KernelInputError unless every id is a local expert in [0, E) or -1 (checked once the devices agree)."""
    if topk_ids.numel() and (int(topk_ids.min()) < -1 or int(topk_ids.max()) >= e):
        raise KernelInputError(f"topk_ids: values must be in [-1, {e}) (local expert ids, -1 = not here)")


def prepare_call(hidden: torch.Tensor, n_experts: int, topk_ids: torch.Tensor, pairs: ExpertPairs | None,
                 out: torch.Tensor | None) -> torch.Tensor:
    """What both fused MoE entry points check once their inputs fit: the caller's pairs, a device Triton runs on,
    and `out`; returns out (allocated when None)."""
    if pairs is not None and (pairs.counts.numel() != n_experts or pairs.n_slots != topk_ids.numel()):
        raise KernelInputError(f"pairs: sorted for {pairs.counts.numel()} experts and {pairs.n_slots} slots; expected "
                               f"E={n_experts} experts (w_gate_up) and T*K={topk_ids.numel()} (topk_ids)")
    device = hidden.device
    if not triton_available(device):
        raise KernelInputError(f"hidden.device={device}: the Triton kernels need CUDA, or TRITON_INTERPRET=1 on CPU")
    if out is None:
        return torch.empty_like(hidden)
    if out.shape != hidden.shape or out.dtype != hidden.dtype or out.device != device:
        raise KernelInputError(f"out: expected {hidden.dtype}{list(hidden.shape)} on {device}")
    return out


def fused_moe(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor | None = None,
    pairs: ExpertPairs | None = None,
) -> torch.Tensor:
    """Σ_k w[t,k]·FFN_{ids[t,k]}(hidden[t]) with Triton: float32 accumulation, ids of -1 contribute nothing.

    hidden: [T, H]; w_gate_up: [E, 2I, H] (gate rows, then up rows); w_down: [E, H, I];
    topk_ids: [T, K] local ids; topk_weights: [T, K]. Returns [T, H] in hidden's dtype (written into `out`
    if given). pairs: the caller's sort_by_expert(topk_ids, E), sorted here when not given.
    Runs on CUDA, or on CPU under TRITON_INTERPRET=1.
    """
    check_inputs(hidden, w_gate_up, w_down, topk_ids, topk_weights)
    out = prepare_call(hidden, w_gate_up.shape[0], topk_ids, pairs, out)
    device = hidden.device
    from expert_workers.kernels.combine import combine_kernel
    from expert_workers.kernels.grouped_gemm_down import grouped_gemm_down_kernel
    from expert_workers.kernels.grouped_gemm_swiglu import grouped_gemm_swiglu_kernel

    t, h = hidden.shape
    e, i, k = w_gate_up.shape[0], w_gate_up.shape[1] // 2, topk_ids.shape[1]
    if t == 0:
        return out
    cfg, combine_cfg = launch_config(t, device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"  # fp32 stays exact; 16-bit ignores this
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous().float().reshape(-1)
    aligned = align_pairs(sort_by_expert(ids, e) if pairs is None else pairs, bm)
    h_buf = new_workspace((t * k, i), hidden.dtype, device)  # SiLU(gate)·up per pair
    y_buf = new_workspace((t * k, h), hidden.dtype, device)  # weighted expert output per pair
    if aligned.n_blocks:
        grouped_gemm_swiglu_kernel[(aligned.n_blocks, triton_cdiv(i, bn))](
            hidden,
            w_gate_up,
            h_buf,
            aligned.sorted_pairs,
            aligned.block_expert,
            aligned.n_pairs,
            k,
            h,
            i,
            hidden.stride(0),
            hidden.stride(1),
            *w_gate_up.stride(),
            *h_buf.stride(),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            PRECISION=precision,
            **launch,
        )
        grouped_gemm_down_kernel[(aligned.n_blocks, triton_cdiv(h, bn))](
            h_buf,
            w_down,
            y_buf,
            weights,
            aligned.sorted_pairs,
            aligned.block_expert,
            aligned.n_pairs,
            h,
            i,
            *h_buf.stride(),
            *w_down.stride(),
            *y_buf.stride(),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            PRECISION=precision,
            **launch,
        )
    cbn = combine_cfg["BLOCK_N"]
    combine_kernel[(t, triton_cdiv(h, cbn))](
        y_buf,
        ids,
        out,
        k,
        h,
        *y_buf.stride(),
        *out.stride(),
        BLOCK_N=cbn,
        num_warps=combine_cfg["num_warps"],
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
