"""Benchmark: N concurrent streaming clients for T seconds against the HTTP service on 127.0.0.1.

Starts the service on an embedded local Ray Serve (or uses --url), then each client loops: POST a streaming
completion with a random prompt, read it to [DONE], record time to first token and total latency. Prints
throughput (requests/s, generated tokens/s), p50/p99 latency and TTFT, and errors (must be 0).

    python benchmarks/serve_load.py [--model models/small-v3] [--backend ray] [--devices 4] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def client(url: str, stop_at: float, prompt_len: int, max_tokens: int, seed: int, out: list, errors: list) -> None:
    rng = random.Random(seed)
    while time.perf_counter() < stop_at:
        prompt = [rng.randrange(3, 259) for _ in range(prompt_len)]
        start = time.perf_counter()
        first = None
        tokens = 0
        try:
            with requests.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                               "temperature": 0, "stream": True},
                               stream=True, timeout=300) as r:
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    continue
                for line in r.iter_lines(decode_unicode=True):
                    if not line or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        errors.append(chunk["error"]["message"])
                        break
                    n = len(chunk["choices"][0]["token_ids"])
                    if n and first is None:
                        first = time.perf_counter() - start
                    tokens += n
        except requests.RequestException as exc:
            errors.append(str(exc))
            continue
        out.append({"latency_s": time.perf_counter() - start, "ttft_s": first, "tokens": tokens})


def start_service(args: argparse.Namespace) -> str:
    import ray
    from ray import serve

    from deploy.serve_app import build
    from model_core.make_model import make_model

    if not (args.model / "config.json").is_file():
        make_model(args.model.name, args.model)
    ray.init(num_cpus=max(os.cpu_count() or 1, args.devices + 2), include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"deployment": {"model": str(args.model), "dtype": args.dtype, "backend": args.backend,
                                    "devices": args.devices}}), name="expertmesh-load", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running service (default: start one)")
    parser.add_argument("--model", type=Path, default=Path("models/small-v3"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default="ray", choices=["local", "ray", "grpc"])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = parser.parse_args()
    url = args.url or start_service(args)
    requests.post(f"{url}/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}, timeout=300)  # warm-up
    results: list[dict] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + args.seconds
    threads = [threading.Thread(target=client, args=(url, stop_at, args.prompt_len, args.max_tokens, i, results,
                                                      errors)) for i in range(args.clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    latencies = [r["latency_s"] for r in results]
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    summary = {
        "clients": args.clients, "seconds": elapsed, "requests": len(results), "errors": len(errors),
        "requests_per_s": len(results) / elapsed, "tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
        "latency_p50_s": percentile(latencies, 0.5), "latency_p99_s": percentile(latencies, 0.99),
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99),
        "mean_tokens": statistics.mean(r["tokens"] for r in results) if results else 0.0,
    }
    print(f"{args.clients} streaming clients for {elapsed:.0f}s against {url} ({args.model.name}, "
          f"backend={args.backend}, devices={args.devices}; prompt {args.prompt_len}, max_tokens {args.max_tokens})")
    print(f"{'requests':>8} {'req/s':>7} {'tok/s':>7} {'p50 lat':>8} {'p99 lat':>8} {'p50 TTFT':>9} "
          f"{'p99 TTFT':>9} {'errors':>6}")
    print(f"{summary['requests']:>8} {summary['requests_per_s']:>7.2f} {summary['tokens_per_s']:>7.1f} "
          f"{summary['latency_p50_s']:>7.2f}s {summary['latency_p99_s']:>7.2f}s {summary['ttft_p50_s']:>8.2f}s "
          f"{summary['ttft_p99_s']:>8.2f}s {summary['errors']:>6}")
    for e in errors[:5]:
        print("error:", e)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "serve_load", "date": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "model": str(args.model), "backend": args.backend, "devices": args.devices,
        **summary, "error_samples": errors[:20]}, indent=1))
    print(f"\nwrote {args.json}")
    if not args.url:
        from ray import serve

        serve.shutdown()
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
