"""The `expertmesh` command line: make-model, generate, serve, scale, mesh, trace, stats, rebalance, plan.

Each subcommand's arguments and handler live together: deploy/commands/model.py (make-model, generate),
serve.py (serve, scale), mesh.py (mesh up | status | down | scale), trace.py (trace), balance.py (stats,
rebalance) and deploy/planning/command.py (plan).
Here they are assembled, and errors become one line on stderr with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from deploy.commands import balance, mesh, model, serve, trace
from deploy.planning import command as plan_command
from model_core.checkpoint import CheckpointError
from model_core.spec import ConfigError

SUBCOMMANDS = (model, serve, mesh, trace, balance, plan_command)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertmesh", description="Distributed expert serving for DeepSeek MoE models"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except (ConfigError, CheckpointError, ValueError, OSError, KeyError, RuntimeError) as exc:
        # bad input, a missing or unreadable file, an unreachable cluster (ConnectionError, TimeoutError are OSErrors)
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"expertmesh {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
