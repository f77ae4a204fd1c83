"""The GPU check's suites: each step's command on the GPU and its setup for a dry run (benchmarks/gpu_check.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PYTEST = ["-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
PARITY = "tests/gpu/test_cuda_parity.py"


@dataclass(frozen=True)
class Step:
    """One step: `command` (argv after the interpreter) runs on the GPU; `setup` runs in a dry run instead."""

    name: str
    measures: str
    command: list[str]
    timeout_s: int
    setup: list[str]
    writes: str | None = None  # a JSON file the step writes into the output folder


def suites(out: Path, scratch: Path) -> dict[str, list[Step]]:
    """The steps of each suite, in order. JSON goes to `out`; dry-run smoke output to `scratch`."""
    collect = [*PYTEST, "--collect-only"]
    kernels = ["tests/expert_workers/test_kernels.py", "tests/expert_workers/test_fp8_kernel.py"]
    mla = ["tests/gateway/test_paged_mla_kernel.py"]
    in_process = [PARITY, "tests/gateway/test_gateway_device.py", "-m", "gpu", "-k",
                  "not ray_groups_on_the_gpu and not two_micro_batches"]
    on_ray = [PARITY, "-k", "ray_groups_on_the_gpu or two_micro_batches"]
    bench = "benchmarks/kernel_bench.py"
    bench_smoke = [bench, "--interpret", "--fp8", "--shapes", "tiny", "--tokens", "1", "--dtypes", "float32",
                   "--json", str(scratch / "kernel_bench_smoke.json")]
    return {
        "main": [
            Step("kernels", "Triton fused-MoE kernels (fp32/fp16/bf16 and block-scaled FP8) vs references on CUDA",
                 [*PYTEST, *kernels], 180, [*collect, *kernels]),
            Step("paged-mla", "Triton paged MLA decode vs its torch reference on CUDA",
                 [*PYTEST, *mla], 90, [*collect, *mla]),
            Step("kernel-bench", "kernel ms, % of floor and float64-reference error at V2-Lite shapes (+ FP8 decode)",
                 [bench, "--shapes", "v2-lite", "--json", str(out / "kernel_bench.json")], 150, bench_smoke,
                 "kernel_bench.json"),
            Step("gateway-cuda", "in-process engine on CUDA vs the CPU float32 reference (logits, tokens)",
                 [*PYTEST, *in_process], 120, [*collect, *in_process]),
            Step("ray-cuda-ipc", "Ray groups on the GPU (object store, CUDA IPC) vs the CPU reference",
                 [*PYTEST, *on_ray], 180, [*collect, *on_ray]),
        ],
        "h200": [
            Step("kernel-bench-v3", "kernel ms, time/floor and float64-reference error at V3 shapes",
                 [bench, "--shapes", "v3", "--json", str(out / "kernel_bench_v3.json")], 300, bench_smoke,
                 "kernel_bench_v3.json"),
            Step("gpu-e2e", "end-to-end tokens/s: in-process engine vs Ray deployments on the GPU",
                 ["benchmarks/gpu_e2e.py", "--json", str(out / "gpu_e2e.json")], 270,
                 ["benchmarks/gpu_e2e.py", "--help"], "gpu_e2e.json"),
        ],
        "mesh": [
            Step("mesh-gpu", "1-3 gateways and 2 expert groups sharing the GPU (fractional shares), merging on/off",
                 ["benchmarks/mesh.py", "--gpu", "--gateways", "1", "2", "3", "--micro-batches", "1", "--rounds", "2",
                  "--json", str(out / "mesh_gpu.json")], 400, ["benchmarks/mesh.py", "--help"], "mesh_gpu.json"),
        ],
    }
