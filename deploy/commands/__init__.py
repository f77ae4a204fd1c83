"""The `expertmesh` subcommands, one module per concern; each module adds its subparsers (`add_parsers`) and sets
their handler. deploy/cli.py assembles them; `plan` lives with the planner (deploy/planning/command.py)."""
