"""The `expertmesh` command line: make-model, generate, serve, scale, trace, stats, rebalance, plan."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from model_core.checkpoint import CheckpointError
from model_core.spec import ConfigError


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids: expected at least one id")
    return ids


def _plan_ints(flag: str, minimum: int):
    """An argparse type for a comma-separated list of integers >= minimum (`plan --devices 8,16,32`)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            values = []
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected comma-separated integers >= {minimum}")
        return values

    return parse


def _plan_top_ms(text: str) -> list[int | None]:
    """`plan --top-m none,4` -> [None, 4]."""
    out: list[int | None] = []
    for t in (t.strip() for t in text.split(",") if t.strip()):
        if t == "none":
            out.append(None)
        elif t.isdigit() and int(t) >= 1:
            out.append(int(t))
        else:
            out = []
            break
    if not out:
        raise argparse.ArgumentTypeError(f"--top-m {text!r}: expected comma-separated 'none' or integers >= 1")
    return out


def build_parser() -> argparse.ArgumentParser:
    from model_core.make_model import PRESETS

    parser = argparse.ArgumentParser(
        prog="expertmesh", description="Distributed expert serving for DeepSeek MoE models"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-model", help="write a seeded random checkpoint of a named preset")
    mk.add_argument("--preset", required=True, choices=sorted(PRESETS))
    mk.add_argument("--out", required=True, type=Path)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--shard-mb", type=int, default=None, help="split safetensors into shards of this size")

    gen = sub.add_parser("generate", help="generate tokens for one prompt")
    gen.add_argument("--config", type=Path, help="deployment YAML (deploy/configs/*.yaml); flags below override it")
    gen.add_argument("--model", help="checkpoint directory (required unless --config gives one)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    src.add_argument("--prompt-ids", type=_ids, help="comma-separated token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--backend", choices=["local", "ray", "ray-dag", "ray-rdt", "grpc"],
                     help="where routed experts run (default local; ray-dag: Ray actors driven by a compiled graph; "
                          "ray-rdt: Ray actors, tensors over Ray Direct Transport, see rpc.tensor_transport)")
    gen.add_argument("--devices", type=int, help="expert groups (one Ray actor each for ray/grpc)")
    gen.add_argument("--placement", help="'contiguous' or a placement YAML/JSON file")
    gen.add_argument("--top-m-devices", type=int, help="cap each token at M devices (default: exact routing)")
    gen.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else embedded local Ray)")
    gen.add_argument("--expert-kernel", choices=["auto", "triton", "torch"],
                     help="expert math: Triton kernels or torch (auto: Triton on GPU, torch on CPU)")
    gen.add_argument("--half-matmul", choices=["auto", "native", "float32"],
                     help="bfloat16/float16 matmuls on a CPU: native, or float32 weights (exact widening, 2x weight "
                          "memory; auto: float32 where the CPU lacks the instructions)")
    gen.add_argument("--gateway-device",
                     help="where the gateway runs: auto (CUDA when visible, else CPU), cpu, cuda or cuda:N; "
                          "local expert groups share it")
    gen.add_argument("--trace-dir", help="also write the request's routing trace to DIR/<request id>.json")
    gen.add_argument("--otel", choices=["none", "console", "otlp", "otlp-http", "jsonl"],
                     help="OpenTelemetry exporter (default: tracing.exporter, else OTEL_TRACES_EXPORTER)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    sv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API on Ray Serve")
    sv.add_argument("--config", required=True, type=Path, help="deployment YAML (deploy/configs/*.yaml)")
    sv.add_argument("--address", help="Ray cluster to join (default: the config's, RAY_ADDRESS, else embedded)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)

    sc = sub.add_parser("scale", help="change an expert group's replica count on a running service")
    sc.add_argument("--group", required=True, type=int)
    sc.add_argument("--replicas", required=True, type=int)
    sc.add_argument("--url", default="http://127.0.0.1:8000", help="the service started by `expertmesh serve`")

    tr = sub.add_parser("trace", help="show which experts, on which devices, served a request")
    tr.add_argument("request_id")
    tr.add_argument("--dir", required=True, type=Path, help="the routing-trace directory (tracing.routing_trace_dir)")
    tr.add_argument("--json", action="store_true", help="print the trace as JSON")
    tr.add_argument("--png", type=Path, help="write a layer × expert heatmap of the request to this file")
    tr.add_argument("--experts", type=int, help="number of routed experts (default: the largest id seen + 1)")

    st = sub.add_parser("stats", help="print a running deployment's live per-layer balance table")
    rb = sub.add_parser("rebalance", help="show (--dry-run) or apply a redundant-expert placement for the live load "
                                          "(balancing.mode eplb or eplb+bias)")
    rb.add_argument("--dry-run", action="store_true", help="show the plan; the gateways keep their placement")
    for p in (st, rb):
        p.add_argument("--config", type=Path, help="deployment YAML (gives the router name, namespace, address)")
        p.add_argument("--address", help="Ray cluster of the deployment (default: the config's, else RAY_ADDRESS)")
        p.add_argument("--name", help="router service actor name (default: balancing.name, 'router-service')")
        p.add_argument("--namespace", help="Ray namespace (default: ray.namespace, 'expertmesh')")
        p.add_argument("--json", action="store_true")

    pl = sub.add_parser("plan", help="predict per-device load, bytes and step time of candidate deployments from "
                                     "recorded or synthetic routing (docs/planning.md)")
    pl.add_argument("--model", help="checkpoint directory, config.json file, 'deepseek-v3' or a generator preset")
    src = pl.add_mutually_exclusive_group()
    src.add_argument("--traces", type=Path, help="routing-trace directory to replay (tracing.routing_trace_dir)")
    src.add_argument("--synthetic", help="zipf:S: synthetic router scores with Zipf(S) expert popularity")
    pl.add_argument("--devices", type=_plan_ints("--devices", 1), default=[8, 16, 32],
                    help="expert groups D, e.g. 8,16,32")
    pl.add_argument("--top-m", type=_plan_top_ms, default=[None], help="device limits, e.g. none,4")
    pl.add_argument("--redundant", type=_plan_ints("--redundant", 0), default=[0],
                    help="redundant expert slots per layer (EPLB placement from the replayed load), e.g. 0,32")
    pl.add_argument("--hardware", type=Path, help="hardware rates YAML, e.g. deploy/hardware/h100.yaml")
    pl.add_argument("--node-size", type=int, help="GPUs per node (default: the hardware file's gpus_per_node)")
    pl.add_argument("--batch", type=int, default=64, help="decode tokens per step per gateway (default 64)")
    pl.add_argument("--gateways", type=int, default=1, help="gateway GPUs, each running --batch sequences")
    pl.add_argument("--context", type=int, default=4096, help="cached tokens each sequence attends over")
    pl.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="weights, activations and latent cache (default bfloat16)")
    pl.add_argument("--tokens", type=int, default=4096, help="synthetic tokens per MoE layer (default 4096)")
    pl.add_argument("--seed", type=int, default=0, help="synthetic routing seed")
    pl.add_argument("--json", type=Path, dest="json_out", metavar="OUT", help="write every row as JSON to OUT")
    pl.add_argument("--png", type=Path, help="plot tokens/s per GPU and step time against D")
    pl.add_argument("--calibrate", type=Path, metavar="OUT",
                    help="measure this machine's matmul rate, memory bandwidth, each --transports backend's per-call "
                         "and per-MB cost and the expert groups' compute (a one-group deployment of --model), and "
                         "write a hardware file to OUT (link rates are copied from --hardware)")
    pl.add_argument("--transports", default="ray,grpc",
                    help="with --calibrate: backends to measure (comma-separated; 'none' for none)")
    return parser


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
    from model_core.tokenizer import load_tokenizer

    config = deployment_from_args(args)
    tokenizer = None
    if args.prompt is not None:
        tokenizer = load_tokenizer(config.model)
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = args.prompt_ids
        try:
            tokenizer = load_tokenizer(config.model)
        except (FileNotFoundError, ValueError):
            tokenizer = None
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


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    import ray
    import yaml
    from ray import serve

    from deploy.serve_app import build
    from gateway.config import DeploymentConfig

    raw = yaml.safe_load(args.config.read_text())
    config = DeploymentConfig.from_dict(raw)
    if args.address:
        raw = {**raw, "ray": {**(raw.get("ray") or {}), "address": args.address}}
        config = DeploymentConfig.from_dict(raw)
    address = config.ray_address
    if address:
        ray.init(address=address, namespace=config.ray.namespace)
    else:
        ray.init(num_cpus=config.embedded_ray_cpus(), namespace=config.ray.namespace, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build({"deployment": raw}), name="expertmesh", route_prefix="/")
    print(f"expertmesh serving {config.model} on http://{args.host}:{args.port} (backend={config.backend}, "
          f"devices={config.devices}); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    import requests

    key = os.environ.get("EXPERTMESH_ADMIN_KEY")  # /admin/* answers only with the service's admin key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = requests.post(f"{args.url}/admin/scale", json={"group": args.group, "replicas": args.replicas},
                          headers=headers, timeout=600)
    except requests.RequestException as exc:
        raise RuntimeError(f"--url {args.url}: {exc}") from None
    if r.status_code != 200:
        raise ValueError(r.json().get("error", {}).get("message", r.text))
    body = r.json()
    print(f"group {body['group']}: {body['replicas']} replicas (ids {body['replica_ids']})")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from gateway.serving.routing_trace import RequestTrace

    file = args.dir / f"{args.request_id}.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no routing trace for request {args.request_id!r} (wrong id, wrong --dir, "
                                "or evicted: the directory keeps tracing.routing_trace_capacity requests)")
    trace = RequestTrace.from_json(json.loads(file.read_text()))
    if args.json:
        print(json.dumps(trace.to_json()))
    else:
        print(trace.table())
    if args.png:
        n_experts = args.experts or int(trace.ids.max()) + 1
        print(f"wrote {trace.heatmap_png(args.png, n_experts)}")
    return 0


def _router_service(args: argparse.Namespace) -> tuple[object, str]:
    """The running deployment's router service actor (from --address/--name/--namespace or --config), and its
    name."""
    import os

    import ray

    from gateway.config import DeploymentConfig

    config = DeploymentConfig.from_yaml(args.config) if args.config else DeploymentConfig(model="-")
    address = args.address or config.ray.address or os.environ.get("RAY_ADDRESS")
    name = args.name or config.balancing.name
    namespace = args.namespace or config.ray.namespace
    if not ray.is_initialized():
        if not address:
            raise ValueError("--address: no Ray cluster given (and RAY_ADDRESS is unset); an embedded deployment "
                             "is only visible from its own process (use Engine.stats_table() there)")
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    try:
        return ray.get_actor(name, namespace=namespace), name
    except ValueError:
        raise ValueError(f"--name {name!r}: no router service of that name in namespace {namespace!r}") from None


def cmd_stats(args: argparse.Namespace) -> int:
    import ray

    from router_service.service import report_table

    actor, name = _router_service(args)
    stats = ray.get(actor.stats.remote(), timeout=30)
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"router service {name!r}: mode={stats['mode']} bias version={stats['version']} "
          f"windows closed={stats['windows_closed']} gateways={stats['gateways']}")
    print(report_table(stats["last_window"]) if stats["last_window"] else "(no window closed yet)")
    return 0


def cmd_rebalance(args: argparse.Namespace) -> int:
    import ray

    actor, name = _router_service(args)
    try:
        answer = ray.get(actor.rebalance.remote(args.dry_run), timeout=60)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ValueError):
            raise exc.cause from None
        raise
    if args.json:
        print(json.dumps(answer))
        return 0
    print(f"{'layer':>5} {'device max/mean now':>19} {'with the plan':>13}")
    for row in answer["per_layer"]:
        print(f"{row['layer']:>5} {row['current']:>19.2f} {row['predicted']:>13.2f}")
    placement = answer["placement"]
    if placement is None:
        print(f"no gain over the current placement ({answer['windows']} windows of load): nothing to apply")
    elif answer["applied"]:
        print(f"placement version {placement['version']} queued: the gateways switch to it at their next poll "
              f"(worst layer {answer['current']:.2f} -> {answer['predicted']:.2f})")
    else:
        print(f"dry run: placement version {placement['version']} would take the worst layer from "
              f"{answer['current']:.2f} to {answer['predicted']:.2f}; run without --dry-run to apply it")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from deploy import plan as planner
    from router_service.cost_model import Hardware, Workload

    if args.hardware is None:
        raise ValueError("--hardware: required (a rates file such as deploy/hardware/h100.yaml)")
    hardware = Hardware.from_yaml(args.hardware)
    if args.calibrate is not None:
        measured, where = planner.calibrate(hardware, args.calibrate.stem)
        transports = tuple(t for t in args.transports.split(",") if t and t != "none")
        if transports:
            from deploy.calibrate import calibrate_local

            if args.model is None:
                raise ValueError("--model: required to calibrate transports (a checkpoint directory to deploy)")
            rates, experts = calibrate_local(str(args.model), args.dtype, transports)
            measured = dataclasses.replace(measured, transports=rates, experts=experts)
            where["transports"] = f"measured: one-group {args.model} deployments, round trips of 1-1024 rows"
            where["experts"] = f"measured: the group's compute of {args.model}'s experts, 1-64 rows per expert"
        args.calibrate.write_text(planner.hardware_yaml(measured, where))
        print(f"wrote {args.calibrate}: matmul {measured.matmul_tflops:g} TFLOP/s, memory "
              f"{measured.hbm_gbytes_per_s:g} GB/s" + "".join(
                  f", {t}: {r.call_us:g} us per call + {r.us_per_mb:g} us per MB"
                  for t, r in measured.transports.items()) + f"; link rates copied from {args.hardware}")
        return 0
    if args.model is None:
        raise ValueError("--model: required (a checkpoint directory, config.json, or e.g. deepseek-v3)")
    if args.node_size is not None:
        hardware = dataclasses.replace(hardware, gpus_per_node=args.node_size)
    spec = planner.load_spec(args.model)
    if args.traces is not None:
        source = planner.TraceRouting(spec, args.traces)
    elif args.synthetic is not None:
        source = planner.SyntheticRouting(spec, args.tokens, planner.parse_synthetic(args.synthetic), args.seed)
    else:
        raise ValueError("--traces DIR or --synthetic zipf:S: one is required")
    work = Workload(args.batch, args.gateways, args.context, {"float32": 4}.get(args.dtype, 2))
    rows = planner.plan(spec, source, hardware, args.devices, args.top_m, args.redundant, work)
    title = planner.describe(args.model, spec, source, hardware, work)
    print(title)
    print(planner.format_table(rows))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(planner.report(args.model, source, hardware, work, rows)))
        print(f"wrote {args.json_out}")
    if args.png is not None:
        print(f"wrote {planner.write_png(rows, args.png, title)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handlers = {"make-model": cmd_make_model, "generate": cmd_generate, "stats": cmd_stats, "trace": cmd_trace,
                "serve": cmd_serve, "scale": cmd_scale, "rebalance": cmd_rebalance, "plan": cmd_plan}
    try:
        return handlers[args.command](args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"expertmesh {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
