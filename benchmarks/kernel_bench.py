"""Benchmark: Triton fused MoE vs the torch paths vs the memory/compute floor, at DeepSeek expert shapes.

On a GPU it measures the device's two ceilings first (device-to-device copy bandwidth, bf16 matmul rate),
then for DeepSeek-V2-Lite (64 experts, H 2048, I 1408, top-6) and V3 (256 experts, H 7168, I 2048, top-8)
shapes times decode (1-64 tokens) and prefill (512-8192 tokens) batches with triton.testing.do_bench
(median), checks every output against a float64 reference (built one expert at a time with plain matmuls, so
only a hit expert's weights are ever widened), and prints time ÷ floor. Weights are made once per shape and dtype,
on the device; V3's take ~23 GB in bf16 (benchmarks/gpu_check.py runs V2-Lite on an H100, V3 in its h200 suite).
At decode sizes (T <= 64) it also times fused_moe_fp8 on the same weights quantized to FP8 in 128×128 blocks
("triton fp8" rows): its floor is the HBM floor of the hit experts' FP8 weights and scales, its error is measured
against the float64 reference of the dequantized weights (so it is the FP8 activations' error alone).
With --interpret it runs Triton's CPU interpreter on tiny shapes: a smoke test of the same script, not a
measurement.

    python benchmarks/kernel_bench.py                 # on a CUDA machine (FP8 rows on sm89+; --no-fp8 skips them)
    python benchmarks/kernel_bench.py --interpret     # CPU smoke run (--fp8 adds the FP8 rows)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name: (experts, hidden, intermediate, top_k)
    "v2-lite": (64, 2048, 1408, 6),
    "v3": (256, 7168, 2048, 8),
    "tiny": (8, 64, 48, 2),
}
GPU_TOKENS = [1, 8, 16, 32, 64, 512, 2048, 8192]
FP8_BLOCK = {"v2-lite": (128, 128), "v3": (128, 128), "tiny": (16, 16)}  # (block_out, block_in) of the weight scales
FP8_MAX_TOKENS = 64  # FP8 rows at decode sizes only
FP8_REL_ERR = 0.1  # FP8 activations' error (e4m3: 2^-4 relative per element, twice) vs the dequantized reference
FLOOR_GOAL = 0.8  # the FP8 decode rows' goal: at least 80 % of the HBM floor


def measure_ceilings(torch, device) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, measured on this device."""
    from triton.testing import do_bench

    src = torch.randn(256 << 20, device=device)  # 1 GiB of float32
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return {"copy_bytes_per_s": 2 * src.numel() * 4 / (copy_ms / 1e3), "bf16_flops_per_s": 2 * n**3 / (mm_ms / 1e3)}


def floor_ms(t: int, shape: tuple[int, int, int, int], experts_hit: int, itemsize: int, ceilings: dict) -> dict:
    e, h, i, k = shape
    flops = 2 * t * k * 3 * h * i
    bytes_moved = experts_hit * 3 * h * i * itemsize + 2 * t * h * itemsize + t * k * 12
    mem = bytes_moved / ceilings["copy_bytes_per_s"] * 1e3
    compute = flops / ceilings["bf16_flops_per_s"] * 1e3
    return {"floor_ms": max(mem, compute), "bound": "memory" if mem >= compute else "compute",
            "bytes": bytes_moved, "flops": flops}


def fp8_floor_ms(t: int, shape: tuple[int, int, int, int], experts_hit: int, block: tuple[int, int], itemsize: int,
                 ceilings: dict) -> dict:
    """The HBM floor of fused_moe_fp8: the hit experts' FP8 weights (1 byte each) and float32 block scales, the
    tokens in and out, the routing; read once at the measured copy bandwidth (decode is memory bound)."""
    from model_core.fp8 import scale_grid

    e, h, i, k = shape
    scales = 2 * math.prod(scale_grid((i, h), block)) + math.prod(scale_grid((h, i), block))  # gate, up; down
    bytes_moved = experts_hit * (3 * h * i + 4 * scales) + 2 * t * h * itemsize + t * k * 12
    return {"floor_ms": bytes_moved / ceilings["copy_bytes_per_s"] * 1e3, "bound": "memory", "bytes": bytes_moved,
            "flops": 2 * t * k * 3 * h * i}


class DequantizedExperts:
    """Indexable like a float [E, N, K] weight (all reference_ffn reads): expert e's FP8 weight times its block scales,
    in float64, made when asked for (one expert at a time). `halves`: gate and up, each with its own tiles."""

    def __init__(self, torch, q, scales, block: tuple[int, int], halves: bool):
        self.torch, self.q, self.scales, self.block, self.halves, self.shape = torch, q, scales, block, halves, q.shape

    def _one(self, q, s):
        bo, bi = self.block
        return q.double() * s.double().repeat_interleave(bo, 0)[: q.shape[0]].repeat_interleave(bi, 1)[:, : q.shape[1]]

    def __getitem__(self, e: int):
        q, s = self.q[e], self.scales[e]
        if not self.halves:
            return self._one(q, s)
        i, n = q.shape[0] // 2, s.shape[0] // 2
        return self.torch.cat([self._one(q[:i], s[:n]), self._one(q[i:], s[n:])])


def quantize_experts(torch, w_gate_up, w_down, block: tuple[int, int]) -> tuple:
    """The weights as a DeepSeek-V3 checkpoint holds them: FP8 with one scale per block, gate and up apart.
    -> (w_gate_up fp8 [E, 2I, H], s_gate_up [E, 2·ceil(I/bo), ceil(H/bi)], w_down fp8 [E, H, I], s_down)."""
    from model_core.fp8 import quantize_blocks

    i = w_down.shape[2]
    gate_up = [[quantize_blocks(w[:i], block), quantize_blocks(w[i:], block)] for w in w_gate_up]
    down = [quantize_blocks(w, block) for w in w_down]
    return (torch.stack([torch.cat([g[0], u[0]]) for g, u in gate_up]),
            torch.stack([torch.cat([g[1], u[1]]) for g, u in gate_up]),
            torch.stack([q for q, _ in down]), torch.stack([s for _, s in down]))


def make_weights(torch, shape, dtype, device, seed) -> tuple:
    """One shape's expert weights, made once on `device` in `dtype` (never as float64: V3's would be 90 GB).
    -> w_gate_up [E, 2I, H], w_down [E, H, I], scaled so activations stay O(1)."""
    e, h, i, k = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    w_gate_up = torch.randn(e, 2 * i, h, generator=gen, device=device, dtype=dtype).div_(h**0.5)
    w_down = torch.randn(e, h, i, generator=gen, device=device, dtype=dtype).div_(i**0.5)
    return w_gate_up, w_down


def make_tokens(torch, t, shape, dtype, device, seed) -> tuple:
    """One batch: hidden [T, H], ids [T, K] (K distinct experts per token), routing weights [T, K] (float32)."""
    e, h, i, k = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen).to(device, dtype)
    ids = torch.rand(t, e, generator=gen).topk(k, dim=-1).indices.to(device)
    weights = torch.rand(t, k, generator=gen).to(device)
    return hidden, ids, weights


def reference_ffn(torch, hidden, w_gate_up, w_down, ids, weights):
    """y[t] = Σ_k w[t,k] · down(SiLU(gate(x)) · up(x)) of expert ids[t,k], in float64, one expert at a time with
    plain matmuls: only the hit experts' weights are ever widened (one at a time), and no path that refuses
    float64 is taken (grouped_expert_ffn picks F.grouped_mm on CUDA, which takes only bf16/fp16/fp32).
    hidden [T, H]; w_gate_up [E, 2I, H] (gate rows first); w_down [E, H, I] -> [T, H] float64 on hidden's device."""
    out = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    inter = w_down.shape[2]
    for e in torch.unique(ids).tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)  # the tokens that chose e, and at which of their K places
        x = hidden[rows].double()  # [n, H]
        gate_up = x @ w_gate_up[e].double().T  # [n, 2I]
        act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        y = act @ w_down[e].double().T  # [n, H]
        out.index_add_(0, rows, y * weights[rows, slots].double()[:, None])
    return out


def time_ms(torch, fn, on_gpu: bool) -> float:
    if on_gpu:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(torch, fn, ref, on_gpu: bool, floor: dict, row: dict) -> dict:
    """Run fn once against its float64 reference, time it, and return the row (printed as it goes: a run cut short
    still shows what it measured)."""
    out = fn()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    ms = time_ms(torch, fn, on_gpu)
    row = {**row, "ms": ms, "rel_err_vs_fp64": err, "finite": bool(out.isfinite().all()),
           **({"floor_ms": floor["floor_ms"], "bound": floor["bound"], "floor_over_time": floor["floor_ms"] / ms}
              if floor else {})}
    print(f"  {row['shape']} {row['dtype']} {row['tokens']:>5} tokens {row['impl']:<17} {ms:9.3f} ms  "
          f"rel err {err:.1e}", flush=True)
    return row


def run(shapes: list[str], tokens: list[int], dtype_names: list[str], interpret: bool,
        fp8: bool = False) -> tuple[list[dict], dict]:
    """The rows of every (shape, dtype, tokens, impl); fp8 adds "triton fp8" rows for T <= FP8_MAX_TOKENS."""
    import torch
    import torch.nn.functional as F

    from expert_workers.grouped_ffn import grouped_expert_ffn
    from expert_workers.kernels import fused_moe, fused_moe_fp8

    on_gpu = torch.cuda.is_available() and not interpret
    device = torch.device("cuda" if on_gpu else "cpu")
    if fp8 and on_gpu and torch.cuda.get_device_capability(device) < (8, 9):
        print("  no FP8 rows: the FP8 tensor-core dot needs compute capability 8.9+", flush=True)
        fp8 = False
    ceilings = measure_ceilings(torch, device) if on_gpu else {}
    rows = []
    for shape_name in shapes:
        shape, block = SHAPES[shape_name], FP8_BLOCK[shape_name]
        for dtype_name in dtype_names:
            dtype = getattr(torch, dtype_name)
            w_gate_up, w_down = make_weights(torch, shape, dtype, device, seed=0)  # once per shape and dtype
            quantized = quantize_experts(torch, w_gate_up, w_down, block) if fp8 else None
            for t in tokens:
                hidden, ids, weights = make_tokens(torch, t, shape, dtype, device, seed=t)
                ref = reference_ffn(torch, hidden, w_gate_up, w_down, ids, weights)
                case = (hidden, w_gate_up, w_down, ids, weights)
                impls = {
                    "triton": lambda c=case: fused_moe(*c),
                    "torch loop": lambda c=case: grouped_expert_ffn(*c, "loop"),
                }
                if on_gpu and hasattr(F, "grouped_mm"):
                    impls["torch grouped_mm"] = lambda c=case: grouped_expert_ffn(*c, "grouped_mm")
                hit = int(torch.unique(ids).numel())
                floor = floor_ms(t, shape, hit, hidden.element_size(), ceilings) if on_gpu else {}
                base = {"shape": shape_name, "tokens": t, "dtype": dtype_name, "experts_hit": hit}
                for name, fn in impls.items():
                    rows.append(measure(torch, fn, ref, on_gpu, floor, {**base, "impl": name}))
                if quantized is not None and t <= FP8_MAX_TOKENS:
                    qgu, sgu, qd, sd = quantized
                    ref8 = reference_ffn(torch, hidden, DequantizedExperts(torch, qgu, sgu, block, halves=True),
                                         DequantizedExperts(torch, qd, sd, block, halves=False), ids, weights)
                    floor8 = fp8_floor_ms(t, shape, hit, block, hidden.element_size(), ceilings) if on_gpu else {}
                    fn = lambda c=(hidden, qgu, sgu, qd, sd, block, ids, weights): fused_moe_fp8(*c)  # noqa: E731
                    rows.append(measure(torch, fn, ref8, on_gpu, floor8, {
                        **base, "impl": "triton fp8", "block": list(block),
                        "reference": "dequantized fp8 weights, unquantized activations"}))
                del hidden, ids, weights, ref, case, impls
            del w_gate_up, w_down, quantized
            if on_gpu:
                torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name(device) if on_gpu else f"CPU interpreter ({platform.machine()})"
    return rows, {"device": device_name, "ceilings": ceilings, "torch": torch.__version__}


def print_table(rows: list[dict]) -> None:
    has_floor = any("floor_ms" in r for r in rows)
    head = f"{'shape':<8} {'dtype':<9} {'tokens':>6} {'impl':<17} {'ms':>9} {'rel err':>8}"
    print(head + (f" {'floor ms':>9} {'% floor':>8} {'bound':<7}" if has_floor else ""))
    for r in rows:
        line = f"{r['shape']:<8} {r['dtype']:<9} {r['tokens']:>6} {r['impl']:<17} {r['ms']:>9.3f} " \
               f"{r['rel_err_vs_fp64']:>8.1e}"
        if has_floor:
            line += f" {r['floor_ms']:>9.3f} {100 * r['floor_over_time']:>7.0f}% {r['bound']:<7}"
        print(line)
    fp8 = [r for r in rows if r["impl"] == "triton fp8" and "floor_ms" in r]
    if fp8:
        met = sum(r["floor_over_time"] >= FLOOR_GOAL for r in fp8)
        print(f"triton fp8 at decode: {met} of {len(fp8)} rows at >= {FLOOR_GOAL:.0%} of the HBM floor (the goal)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="Triton CPU interpreter on tiny shapes (smoke)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+")
    parser.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                        help=f"FP8 rows (fused_moe_fp8) for T <= {FP8_MAX_TOKENS}: on by default on a GPU, "
                             "off with --interpret")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel compiles (and before torch/triton load)
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py: no CUDA GPU here; run it on a GPU machine (make gpu-check), or pass "
              "--interpret for a CPU smoke run of the interpreter on tiny shapes", file=sys.stderr)
        sys.exit(2)
    shapes = args.shapes or (["tiny"] if args.interpret else ["v2-lite", "v3"])
    tokens = args.tokens or ([1, 16] if args.interpret else GPU_TOKENS)
    dtypes = args.dtypes or (["float32", "float16"] if args.interpret else ["bfloat16"])
    fp8 = not args.interpret if args.fp8 is None else args.fp8
    rows, meta = run(shapes, tokens, dtypes, args.interpret, fp8)
    print(f"device: {meta['device']}")
    if meta["ceilings"]:
        c = meta["ceilings"]
        print(f"measured ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
              f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")
    print_table(rows)
    bad = [r for r in rows if not r["finite"] or r["rel_err_vs_fp64"] > (FP8_REL_ERR if "fp8" in r["impl"] else 2e-2)]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "kernels", "date": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), **meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.json}")
    if bad:
        print(f"ACCURACY FAILURES: {len(bad)} rows (non-finite, or rel err > 2e-2; FP8 rows > {FP8_REL_ERR})")
        sys.exit(1)


if __name__ == "__main__":
    main()
