"""What a machine holds for the GPU check: python, torch and CUDA, the GPU, and where ray, grpc and protobuf were
imported from; prints one line `PROBE {json}`. benchmarks/gpu_check.py runs it with the steps' PYTHONPATH."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stubs, run from anywhere

IMPORTED = ("torch", "triton", "ray", "grpc", "google.protobuf", "jsonschema")  # version and where from
INSTALLED = ("numpy", "transformers", "pytest", "hypothesis", "cupy-cuda13x", "cupy-cuda12x", "grpcio", "protobuf")


def where(name: str) -> dict:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # reported, whatever it is: the check goes on and says what is missing
        return {"error": f"{type(exc).__name__}: {exc}"}
    with warnings.catch_warnings():  # jsonschema deprecates its __version__
        warnings.simplefilter("ignore")
        version = getattr(module, "__version__", None)
    return {"version": version, "file": getattr(module, "__file__", None)}


def cuda(info: dict) -> None:
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
                           "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count}
    except Exception as exc:
        info["cuda_available"] = False
        info["torch_error"] = f"{type(exc).__name__}: {exc}"


def ray_gpus() -> int | str:
    """The GPUs Ray will see (through NVML, as its resource detection does), without starting Ray."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        return get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def stubs() -> str:
    """The generated stubs check the protobuf runtime's and grpcio's versions when imported."""
    try:
        importlib.import_module("protos.expert_service_pb2")
        importlib.import_module("protos.expert_service_pb2_grpc")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def main() -> None:
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine()}
    info.update({name: where(name) for name in IMPORTED})
    info["installed"] = {}
    for dist in INSTALLED:
        try:
            info["installed"][dist] = importlib.metadata.version(dist)  # the first found on sys.path
        except importlib.metadata.PackageNotFoundError:
            pass
    cuda(info)
    info["ray_gpus"] = ray_gpus()
    info["stubs"] = stubs()
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used", "--format=csv,noheader"],
            capture_output=True, text=True).stdout.strip()
    print("PROBE " + json.dumps(info))


if __name__ == "__main__":
    main()
