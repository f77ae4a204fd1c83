"""What machine a benchmark ran on: architecture, cores, CPU model, host, torch (recorded in its JSON)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), None) if cpuinfo.exists() else None
    return {"arch": platform.machine(), "cpus": os.cpu_count(), "cpu_model": model or platform.processor(),
            "node": platform.node(), "torch": torch.__version__}
