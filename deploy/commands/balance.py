"""`expertmesh stats` and `expertmesh rebalance`: a running deployment's balance table, and its EPLB re-placement,
through its router service actor."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("stats", help="print a running deployment's live per-layer balance table")
    st.set_defaults(handler=cmd_stats)
    rb = sub.add_parser("rebalance", help="show (--dry-run) or apply a redundant-expert placement for the live load "
                                          "(balancing.mode eplb or eplb+bias)")
    rb.set_defaults(handler=cmd_rebalance)
    rb.add_argument("--dry-run", action="store_true", help="show the plan; the gateways keep their placement")
    for p in (st, rb):
        p.add_argument("--config", type=Path, help="deployment YAML (gives the router name, namespace, address)")
        p.add_argument("--address", help="Ray cluster of the deployment (default: the config's, else RAY_ADDRESS)")
        p.add_argument("--name", help="router service actor name (default: balancing.name, 'router-service')")
        p.add_argument("--namespace", help="Ray namespace (default: ray.namespace, 'expertmesh')")
        p.add_argument("--json", action="store_true")


def _router_service(args: argparse.Namespace) -> tuple[object, str]:
    """The running deployment's router service actor (from --address/--name/--namespace or --config), and its
    name."""
    import ray

    from gateway.config import DeploymentConfig
    from gateway.dispatch.ray_runtime import connect_ray

    config = DeploymentConfig.from_yaml(args.config) if args.config else DeploymentConfig(model="-")
    config = config.with_overrides(**{"ray.address": args.address, "ray.namespace": args.namespace})
    name = args.name or config.balancing.name
    namespace = config.ray.namespace
    if not ray.is_initialized() and not config.ray_address:  # joins a cluster; never starts an embedded Ray
        raise ValueError("--address: no Ray cluster given (and RAY_ADDRESS is unset); an embedded deployment "
                         "is only visible from its own process (use Engine.stats_table() there)")
    connect_ray(config)
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
