"""`expertmesh trace`: which experts, on which devices, served a request (from the routing-trace directory)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("trace", help="show which experts, on which devices, served a request")
    tr.set_defaults(handler=cmd_trace)
    tr.add_argument("request_id")
    tr.add_argument("--dir", required=True, type=Path, help="the routing-trace directory (tracing.routing_trace_dir)")
    tr.add_argument("--json", action="store_true", help="print the trace as JSON")
    tr.add_argument("--png", type=Path, help="write a layer × expert heatmap of the request to this file")
    tr.add_argument("--experts", type=int, help="number of routed experts (default: the largest id seen + 1)")


def cmd_trace(args: argparse.Namespace) -> int:
    from gateway.serving.routing_trace import RequestTrace

    if not args.request_id or "/" in args.request_id or args.request_id.startswith("."):
        raise ValueError(f"request_id {args.request_id!r}: expected a request id, not a path")
    file = args.dir / f"{args.request_id}.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no routing trace for request {args.request_id!r} (wrong id, wrong --dir, "
                                "or evicted: the directory keeps tracing.routing_trace_capacity requests)")
    try:
        trace = RequestTrace.from_json(json.loads(file.read_text()))
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, RecursionError) as exc:  # JSON, shapes, ...
        raise ValueError(f"{file}: not a routing trace written by the gateway ({type(exc).__name__}: {exc})") from None
    if args.json:
        print(json.dumps(trace.to_json()))
    else:
        print(trace.table())
    if args.png:
        n_experts = args.experts or int(trace.ids.max()) + 1
        print(f"wrote {trace.heatmap_png(args.png, n_experts)}")
    return 0
