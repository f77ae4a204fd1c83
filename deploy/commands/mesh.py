"""`expertmesh mesh up | status | down | scale`: the expert mesh as a service of its own, apart from any gateway."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    mesh = sub.add_parser("mesh", help="start, show, scale or stop an expert mesh (the groups gateways attach to)")
    actions = mesh.add_subparsers(dest="mesh_command", required=True)
    up = actions.add_parser("up", help="start the mesh (its expert groups load); with no cluster, stay in the "
                                       "foreground (an embedded Ray ends with this process)")
    up.set_defaults(handler=cmd_up)
    st = actions.add_parser("status", help="groups, replicas, placement version, attached gateways, per-replica load")
    st.set_defaults(handler=cmd_status)
    st.add_argument("--json", action="store_true")
    down = actions.add_parser("down", help="stop the mesh: its replicas, relay and control actor")
    down.set_defaults(handler=cmd_down)
    sc = actions.add_parser("scale", help="run R replicas of group G (every attached gateway follows)")
    sc.set_defaults(handler=cmd_scale)
    sc.add_argument("--group", required=True, type=int)
    sc.add_argument("--replicas", required=True, type=int)
    for p in (up, st, down, sc):
        p.add_argument("--config", required=True, type=Path, help="deployment YAML (its mesh: and ray: sections)")
        p.add_argument("--name", help="mesh name (default: the config's mesh.name)")
        p.add_argument("--address", help="Ray cluster (default: the config's ray.address, else RAY_ADDRESS)")


def _config(args: argparse.Namespace, embedded_ok: bool = False):
    """The deployment config with --name/--address applied, Ray connected. Only `up` may start an embedded Ray:
    any other command would find nothing in a Ray of its own."""
    from gateway.config import DeploymentConfig
    from gateway.dispatch.ray_runtime import connect_ray

    config = DeploymentConfig.from_yaml(args.config).with_overrides(
        **{"ray.address": args.address, "mesh.name": args.name})
    if config.mesh.name is None:
        raise ValueError("--name: the mesh has no name (set mesh.name in the config or pass --name)")
    if not embedded_ok and not config.ray_address:
        raise ValueError("--address: no Ray cluster given (and RAY_ADDRESS is unset); a mesh started in an embedded "
                         "Ray is only visible from that process")
    connect_ray(config, log_to_driver=embedded_ok)
    return config


def status_table(status: dict) -> str:
    """The mesh status as a few plain lines."""
    lines = [f"mesh {status['name']!r}: model {status['model']}, {status['groups']} groups, placement version "
             f"{status['placement_version']}{'' if status['released'] else ' (older copies still loaded)'}, "
             f"epoch {status['epoch']}, restarts {status['restarts']}, evicted {status['evicted']}, control actor "
             f"rebuilds {status['rebuilds']}",
             f"{'group':>5} {'replica':<34} {'calls':>8} {'passes':>8} {'rows/pass':>9} {'merged':>7} "
             f"{'weights MB':>10} {'held as':<30} grpc"]
    for r in status["replicas"]:
        load = r.get("load") or {}
        merged = f"{load['merged_share']:.0%}" if "merged_share" in load else "-"
        rows = f"{load['rows_per_pass']:.1f}" if "rows_per_pass" in load else "-"
        memory = r.get("memory") or {}
        weights = f"{memory['weight_bytes'] / 1e6:.1f}" if "weight_bytes" in memory else "-"
        lines.append(f"{r['group']:>5} {r['name'] + (' (draining)' if r['draining'] else ''):<34} "
                     f"{load.get('calls', '-'):>8} {load.get('passes', '-'):>8} {rows:>9} {merged:>7} "
                     f"{weights:>10} {memory.get('weight_dtype', '-'):<30} {r['grpc']}")
    gateways = status["gateways"]
    lines.append(f"{len(gateways)} gateway(s) attached" + "".join(
        f"\n  {g}: placement version {a['version']}, seen {a['seen_s_ago']:.1f}s ago" for g, a in gateways.items()))
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.dispatch.mesh.attach import mesh_up

    config = _config(args, embedded_ok=True)
    status = mesh_up(config)
    print(status_table(status), flush=True)
    if config.ray_address:
        return 0
    print("embedded Ray: the mesh lives as long as this process; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from gateway.dispatch.mesh.attach import mesh_down

        mesh_down(config)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.dispatch.mesh.attach import mesh_status

    status = mesh_status(_config(args))
    print(json.dumps(status) if args.json else status_table(status))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from gateway.dispatch.mesh.attach import mesh_down

    status = mesh_down(_config(args))
    print(f"mesh {status['name']!r} stopped ({len(status['replicas'])} replicas; "
          f"{len(status['gateways'])} gateway(s) were attached)")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    import ray

    from gateway.dispatch.mesh.attach import find_mesh

    config = _config(args)
    control = find_mesh(config)
    if control is None:
        raise ValueError(f"--name {config.mesh.name!r}: no such mesh runs in namespace {config.ray.namespace!r}")
    if isinstance(args.replicas, bool) or args.replicas < 1:
        raise ValueError(f"--replicas {args.replicas}: expected an integer >= 1")
    if not 0 <= args.group < config.devices:
        raise ValueError(f"--group {args.group}: expected 0..{config.devices - 1}")
    try:
        live, epoch = ray.get(control.scale.remote(args.group, args.replicas), timeout=900)
    except ray.exceptions.RayTaskError as exc:
        raise RuntimeError(str(exc).strip().splitlines()[-1]) from None
    print(f"group {args.group}: {len(live)} replicas (ids {live}); directory epoch {epoch}")
    return 0
