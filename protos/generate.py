"""Regenerates protos/expert_service_pb2*.py from the .proto (run from the repository root); the output is committed."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(out_dir: Path = ROOT) -> int:
    from grpc_tools import protoc

    return protoc.main([
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / "protos" / "expert_service.proto"),
    ])


if __name__ == "__main__":
    sys.exit(generate())
