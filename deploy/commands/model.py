"""`expertmesh make-model` and `expertmesh generate`: write a checkpoint, and run one prompt through a deployment."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model_core.compute_choices import KERNELS, MODEL_DTYPES, QUANTIZATIONS
from model_core.half_matmul import MODES as HALF_MATMUL_MODES


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids: expected at least one id")
    return ids


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from model_core.make_model import PRESETS

    mk = sub.add_parser("make-model", help="write a seeded random checkpoint of a named preset")
    mk.set_defaults(handler=cmd_make_model)
    mk.add_argument("--preset", required=True, choices=sorted(PRESETS))
    mk.add_argument("--out", required=True, type=Path)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--shard-mb", type=_positive, default=None, help="split safetensors into shards of this size")

    gen = sub.add_parser("generate", help="generate tokens for one prompt")
    gen.set_defaults(handler=cmd_generate)
    gen.add_argument("--config", type=Path, help="deployment YAML (deploy/configs/*.yaml); flags below override it")
    gen.add_argument("--model", help="checkpoint directory (required unless --config gives one)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    src.add_argument("--prompt-ids", type=_ids, help="comma-separated token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=MODEL_DTYPES)
    gen.add_argument("--backend", choices=["local", "ray", "ray-dag", "ray-rdt", "grpc"],
                     help="where routed experts run (default local; ray-dag: Ray actors driven by a compiled graph; "
                          "ray-rdt: Ray actors, tensors over Ray Direct Transport, see rpc.tensor_transport)")
    gen.add_argument("--devices", type=int, help="expert groups (one Ray actor each for ray/grpc)")
    gen.add_argument("--placement", help="'contiguous' or a placement YAML/JSON file")
    gen.add_argument("--top-m-devices", type=int, help="cap each token at M devices (default: exact routing)")
    gen.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else embedded local Ray)")
    gen.add_argument("--expert-kernel", choices=KERNELS,
                     help="expert math: Triton kernels or torch (auto: Triton on GPU, torch on CPU)")
    gen.add_argument("--half-matmul", choices=HALF_MATMUL_MODES,
                     help="bfloat16/float16 matmuls on a CPU: native, or float32 weights (exact widening, 2x weight "
                          "memory; auto: float32 where the CPU lacks the instructions)")
    gen.add_argument("--quantization", choices=QUANTIZATIONS,
                     help="routed experts of an FP8 checkpoint: fp8 (kept FP8 with their scale tiles), none (widened "
                          "on read), auto (fp8 when the checkpoint is FP8; the default)")
    gen.add_argument("--gateway-device",
                     help="where the gateway runs: auto (CUDA when visible, else CPU), cpu, cuda or cuda:N; "
                          "local expert groups share it")
    gen.add_argument("--trace-dir", help="also write the request's routing trace to DIR/<request id>.json")
    gen.add_argument("--otel", choices=["none", "console", "otlp", "otlp-http", "jsonl"],
                     help="OpenTelemetry exporter (default: tracing.exporter, else OTEL_TRACES_EXPORTER)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def cmd_make_model(args: argparse.Namespace) -> int:
    from model_core.make_model import make_model

    shard = args.shard_mb << 20 if args.shard_mb else None
    out = make_model(args.preset, args.out, seed=args.seed, shard_bytes=shard)
    print(f"wrote {args.preset} (seed {args.seed}) to {out}")
    return 0


def deployment_from_args(args: argparse.Namespace):
    """The deployment: --config's YAML (if any) with the flags on top."""
    from gateway.config import DeploymentConfig

    overrides = {
        "model": args.model, "dtype": args.dtype, "backend": args.backend, "devices": args.devices,
        "placement": args.placement, "top_m_devices": args.top_m_devices, "ray.address": args.address,
        "expert_kernel": args.expert_kernel, "gateway_device": args.gateway_device, "half_matmul": args.half_matmul,
        "quantization": args.quantization,
        "tracing.routing_trace_dir": args.trace_dir,
        "tracing.exporter": args.otel,
    }
    if args.config is not None:
        return DeploymentConfig.from_yaml(args.config).with_overrides(**overrides)
    if args.model is None:
        raise ValueError("--model: required unless --config names the model")
    return DeploymentConfig(model=args.model).with_overrides(**overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    from gateway import Engine
    from model_core.tokenizer import load_tokenizer, load_tokenizer_or_none

    config = deployment_from_args(args)
    if args.prompt is not None:
        tokenizer = load_tokenizer(config.model)  # missing or unusable: the error names tokenizer.json
        prompt = tokenizer.encode(args.prompt)
    else:  # token ids serve without a tokenizer; an unusable one is a warning naming it
        prompt, tokenizer = args.prompt_ids, load_tokenizer_or_none(config.model)
    with Engine.from_config(config) as engine:
        tokens = engine.generate(
            [prompt],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )[0]
        summary = engine.routing_summary
        text = tokenizer.decode(tokens) if tokenizer else None
        request_id = engine.last_request_ids[0]
        if args.json:
            print(json.dumps({"request_id": request_id, "prompt_ids": prompt, "tokens": tokens, "text": text,
                              "routing": summary.rows(), "backend": config.backend, "devices": config.devices}))
            return 0
        print(f"request id : {request_id}")
        print(f"prompt ids : {prompt}")
        print(f"new tokens : {tokens}")
        if text is not None:
            print(f"text       : {text!r}")
        print(f"deployment : backend={config.backend} devices={config.devices} top_m_devices={config.top_m_devices}")
        print("\nrouting per MoE layer (prefill + decode):")
        print(summary.table())
        print("\ndispatch to the expert groups (token rows per device and MoE layer):")
        print(engine.backend.stats.table())
        trace = engine.routing_trace(request_id).table().splitlines()
        shown = 2 + 3 * len(engine.spec.moe_layers)  # the header and the first three positions
        print(f"\nrouting trace, first positions (all {len(trace) - 2} rows: engine.routing_trace, "
              "GET /v1/routing/{id}, expertmesh trace):")
        print("\n".join(trace[:shown]))
    return 0
