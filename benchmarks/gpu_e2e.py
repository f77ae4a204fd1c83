"""Benchmark: end-to-end tokens/s on one CUDA GPU, the in-process engine vs Ray expert groups sharing that GPU.

For small-v3 and v2-lite-moe (DeepSeek-V2-Lite's MoE shapes, 3 MoE layers), bfloat16, gateway on the GPU: the
in-process engine (one group) against Ray deployments of 1 group (gpus_per_group 1) and 4 groups
(gpus_per_group 0.25) on the same GPU, and 4 in-process groups. Prefill (4 × 512 tokens, one forward) and
decode (8 and 64 sequences, tokens per second of steady decode steps). Each other deployment is measured
round-robin with the in-process engine in a phase of its own (1 and 4 Ray groups cannot hold one GPU at
once) and reported as a ratio to it from that same phase. Missing models are generated under models/.

Without CUDA it exits with status 2, unless --allow-cpu-smoke: then tiny-v3 in float32 on the CPU, a couple
of steps each, a smoke test of the script whose numbers mean nothing.

    python benchmarks/gpu_e2e.py                       # on a CUDA machine
    python benchmarks/gpu_e2e.py --allow-cpu-smoke     # anywhere
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import Engine  # noqa: E402
from gateway.config import DeploymentConfig  # noqa: E402
from model_core.make_model import make_model  # noqa: E402


@dataclass(frozen=True)
class Deployment:
    label: str
    backend: str
    groups: int
    gpus_per_group: float | None = None  # Ray groups only
    micro_batches: int = 1  # scheduler.micro_batches (2: ping-pong)


BASELINE = Deployment("in-process, 1 group", "local", 1)
DEPLOYMENTS = {
    "local-4": Deployment("in-process, 4 groups", "local", 4),
    "ray-1": Deployment("ray, 1 group (1 GPU)", "ray", 1, 1.0),
    "ray-4": Deployment("ray, 4 groups (0.25 GPU each)", "ray", 4, 0.25),
    # Ray Direct Transport. This script's gateway is a driver, which holds no Ray GPU share, so `auto` resolves
    # to Gloo (host copies through the relay); CUDA IPC needs the gateway in an actor (tests/gpu does that).
    "ray-rdt-4": Deployment("ray-rdt (gloo), 4 groups (0.25 GPU each)", "ray-rdt", 4, 0.25),
    # Ping-pong: one half's expert hop behind the other half's attention (same tokens; see the README).
    "ray-4-mb2": Deployment("ray, 4 groups (0.25 GPU), 2 micro-b.", "ray", 4, 0.25, micro_batches=2),
    "ray-rdt-4-mb2": Deployment("ray-rdt, 4 groups (0.25 GPU), 2 micro-b.", "ray-rdt", 4, 0.25, micro_batches=2),
}


@dataclass(frozen=True)
class Workload:
    prefill: tuple[int, int]  # (prompts, tokens each)
    decode_batches: tuple[int, ...]  # sequences decoding together
    decode_prompt: int  # prompt tokens of each decoding sequence
    steps: int  # decode steps timed (difference of max_new_tokens steps+1 and 1)
    runs: int  # round-robin rounds after one warm-up


GPU_WORK = Workload(prefill=(4, 512), decode_batches=(8, 64), decode_prompt=16, steps=32, runs=5)
SMOKE_WORK = Workload(prefill=(2, 16), decode_batches=(2,), decode_prompt=4, steps=2, runs=1)


def config_for(model: Path, d: Deployment, dtype: str, on_gpu: bool) -> DeploymentConfig:
    raw: dict = {"model": str(model), "backend": d.backend, "devices": d.groups, "dtype": dtype,
                 "scheduler": {"micro_batches": d.micro_batches}}
    if on_gpu:
        raw["gateway_device"] = "cuda"  # local groups share the gateway's device
        raw["ray"] = {"device_resource": "gpu", "gpus_per_group": d.gpus_per_group or 1.0}
    return DeploymentConfig.from_dict(raw)


def round_robin(fns: dict, runs: int, sync) -> dict[str, float]:
    """Median ms of each fn, run once per round (drift on a shared machine hits all alike) after a warm-up."""
    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()  # device work is asynchronous: the clock is read only after it has finished
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def generate_fns(engines: dict[str, Engine], prompts: list[list[int]], new_tokens: int) -> dict:
    return {k: (lambda e=e: e.generate(prompts, new_tokens, stop_at_eos=False)) for k, e in engines.items()}


@torch.inference_mode()
def measure_phase(engines: dict[str, Engine], work: Workload, sync) -> dict[str, dict]:
    """Prefill and decode tokens/s of each engine, all timed round-robin in this phase."""
    vocab = next(iter(engines.values())).spec.vocab_size
    gen = torch.Generator().manual_seed(0)
    n, length = work.prefill
    prefill_prompts = [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)]
    prefill = round_robin({k: (lambda e=e: e.logits(prefill_prompts)) for k, e in engines.items()}, work.runs, sync)
    out = {k: {"prefill_tokens_per_s": n * length / (prefill[k] / 1e3)} for k in engines}
    for batch in work.decode_batches:
        prompts = [torch.randint(3, vocab, (work.decode_prompt,), generator=gen).tolist() for _ in range(batch)]
        one = round_robin(generate_fns(engines, prompts, 1), work.runs, sync)  # prefill + first token
        many = round_robin(generate_fns(engines, prompts, work.steps + 1), work.runs, sync)
        for k in engines:
            step_ms = (many[k] - one[k]) / work.steps
            out[k][f"decode{batch}_step_ms"] = step_ms
            out[k][f"decode{batch}_tokens_per_s"] = batch / (step_ms / 1e3)
    return out


def run_model(name: str, path: Path, chosen: list[str], dtype: str, work: Workload, on_gpu: bool) -> list[dict]:
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    metrics = ["prefill_tokens_per_s", *(f"decode{b}_tokens_per_s" for b in work.decode_batches)]
    baseline = Engine.from_config(config_for(path, BASELINE, dtype, on_gpu))
    rows = []
    try:
        for key in chosen:
            d = DEPLOYMENTS[key]
            with Engine.from_config(config_for(path, d, dtype, on_gpu)) as other:
                phase = measure_phase({BASELINE.label: baseline, d.label: other}, work, sync)
            base, row = phase[BASELINE.label], phase[d.label]
            rows.append({"model": name, "deployment": BASELINE.label, "phase": key, **base,
                         **{f"{m}_vs_in_process": 1.0 for m in metrics}})
            rows.append({"model": name, "deployment": d.label, "phase": key, **row,
                         **{f"{m}_vs_in_process": row[m] / base[m] for m in metrics}})
    finally:
        baseline.close()
    return rows


def print_table(rows: list[dict], decode_batches: tuple[int, ...]) -> None:
    head = f"{'model':<12} {'deployment':<42} {'prefill tok/s':>13} {'×':>5}"
    for b in decode_batches:
        head += f" {f'decode×{b} tok/s':>16} {'×':>5}"
    print(head)
    for r in rows:
        line = f"{r['model']:<12} {r['deployment']:<42} {r['prefill_tokens_per_s']:>13.0f} " \
               f"{r['prefill_tokens_per_s_vs_in_process']:>5.2f}"
        for b in decode_batches:
            line += f" {r[f'decode{b}_tokens_per_s']:>16.1f} {r[f'decode{b}_tokens_per_s_vs_in_process']:>5.2f}"
        print(line)


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu-smoke", action="store_true",
                        help="without CUDA, run tiny-v3 on the CPU (a smoke test of the script) instead of exiting 2")
    parser.add_argument("--models", nargs="+", help="presets (default: small-v3 v2-lite-moe; smoke: tiny-v3)")
    parser.add_argument("--models-dir", type=Path,
                        help="where presets are read from, and generated when missing (default: models/; "
                             "smoke: a temporary directory)")
    parser.add_argument("--deployments", nargs="+", choices=sorted(DEPLOYMENTS),
                        help="compared with the in-process engine (default: all; smoke: local-4, no Ray)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gpu_e2e.json")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu_smoke:
        print("gpu_e2e: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a GPU machine "
              "(make gpu-check), or pass --allow-cpu-smoke for a tiny CPU run of the script", file=sys.stderr)
        sys.exit(2)
    work = GPU_WORK if on_gpu else SMOKE_WORK
    dtype = "bfloat16" if on_gpu else "float32"
    models = args.models or (["small-v3", "v2-lite-moe"] if on_gpu else ["tiny-v3"])
    chosen = args.deployments or (sorted(DEPLOYMENTS) if on_gpu else ["local-4"])
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir or (Path("models") if on_gpu else Path(tmp))
        ray = None
        if any(DEPLOYMENTS[k].backend.startswith("ray") for k in chosen):
            import ray

            ray.init(num_cpus=max(os.cpu_count() or 1, 10), include_dashboard=False, log_to_driver=False)
            if on_gpu and ray.cluster_resources().get("GPU", 0) < 1:
                sys.exit("gpu_e2e: Ray sees no GPU although torch does (CUDA_VISIBLE_DEVICES?)")
        try:
            rows = []
            for name in models:
                path = models_dir / name
                if not (path / "config.json").is_file():
                    print(f"generating {path} ({name}) ...", flush=True)
                    make_model(name, path)
                rows += run_model(name, path, chosen, dtype, work, on_gpu)
        finally:
            if ray is not None:
                ray.shutdown()
    print("prefill: one forward of {} × {} tokens; decode: tokens/s of steady steps of N sequences; "
          "× = ÷ the in-process engine measured in the same phase".format(*work.prefill))
    print_table(rows, work.decode_batches)
    meta = {
        "benchmark": "gpu_e2e", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU smoke ({platform.machine()}, "
                                                             f"{os.cpu_count()} cpus): not a measurement",
        "torch": torch.__version__, "triton": version("triton"), "ray": version("ray"), "cuda": torch.version.cuda,
        "dtype": dtype,
        "workload": work.__dict__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
