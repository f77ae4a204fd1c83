"""`expertmesh serve` and `expertmesh scale`: the OpenAI-compatible HTTP service on Ray Serve, and its replica count."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a TCP port, 1 to 65535")
    return int(text)


def _gateways(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of gateway replicas, 1 to 1024")
    return int(text)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API on Ray Serve")
    sv.set_defaults(handler=cmd_serve)
    sv.add_argument("--config", required=True, type=Path, help="deployment YAML (deploy/configs/*.yaml)")
    sv.add_argument("--address", help="Ray cluster to join (default: the config's, RAY_ADDRESS, else embedded)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_port, default=8000)
    sv.add_argument("--gateways", type=_gateways, help="gateway replicas, each with its own engine (sets "
                    "server.replicas; default: the config's, else 1)")

    sc = sub.add_parser("scale", help="change an expert group's replica count on a running service")
    sc.set_defaults(handler=cmd_scale)
    sc.add_argument("--group", required=True, type=int)
    sc.add_argument("--replicas", required=True, type=int)
    sc.add_argument("--url", default="http://127.0.0.1:8000", help="the service started by `expertmesh serve`")


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    from ray import serve

    from deploy.serve_app import build, check_deployable
    from gateway.config import DeploymentConfig, DeploymentConfigError, read_deployment_yaml
    from gateway.dispatch.ray_runtime import connect_ray

    raw = read_deployment_yaml(args.config)
    try:
        config = DeploymentConfig.from_dict(raw)
    except ValueError as exc:
        raise DeploymentConfigError(f"{args.config}: {exc}") from None
    if args.gateways and config.server.autoscaled:  # even --gateways 1: Serve would scale them regardless
        raise DeploymentConfigError(f"{args.config}: --gateways {args.gateways} and server.max_replicas="
                                    f"{config.server.max_replicas}: set one, not both (a fixed number of gateways, "
                                    "or autoscaling)")
    for flag, setting, value in (("--address", "ray.address", args.address),
                                 ("--gateways", "server.replicas", args.gateways)):
        if value:
            section, name = setting.split(".")
            raw = {**raw, section: {**(raw.get(section) or {}), name: value}}
            try:
                config = config.with_overrides(**{setting: value})
            except ValueError as exc:
                raise DeploymentConfigError(f"{args.config} with {flag} {value}: {exc}") from None
    check_deployable(config)  # the model, its weights, the placement: refused before Ray starts
    connect_ray(config, log_to_driver=True)  # a foreground server shows its replicas' logs
    app = build({"deployment": raw})  # checks again, and the gateway's GPU now that Ray is up
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="expertmesh", route_prefix="/")
    server = config.server
    gateways = (f"{server.fewest_gateways}-{server.max_replicas} gateways" if server.autoscaled
                else f"{server.replicas} gateway{'s' * (server.replicas > 1)}")
    print(f"expertmesh serving {config.model} on http://{args.host}:{args.port} ({gateways}, "
          f"backend={config.backend}, devices={config.devices}); Ctrl-C stops", flush=True)
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
