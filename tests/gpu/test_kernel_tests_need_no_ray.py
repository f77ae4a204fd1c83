"""The Triton kernel tests import only what they test: with Ray, gRPC and jsonschema unimportable (as on the GPU
machine before its wheel bundle is installed) they collect and run, and `import gateway` loads none of the three.

One collection error stops a whole pytest run, so this is what lets the GPU check's first step verify the kernels
whatever else is missing there."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
BLOCKED = ("ray", "grpc", "jsonschema")
KERNEL_TESTS = ["tests/expert_workers/test_kernels.py", "tests/gateway/test_paged_mla_kernel.py"]

# Run first in the child: any import of a blocked package (or a submodule) raises ImportError, as if not installed.
BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked by the test (not installed on the GPU machine)")
sys.meta_path.insert(0, Blocked())
"""


def run_blocked(code: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)


def test_the_blocker_blocks():
    done = run_blocked("import ray")
    assert done.returncode != 0 and "ray is blocked by the test" in done.stderr


def test_gateway_and_the_kernels_import_without_ray_grpc_or_jsonschema():
    done = run_blocked("""
import json
import gateway, gateway.model.paged_mla_kernel, expert_workers.kernels, expert_workers.kernels.align
import expert_workers.kernels.launcher, expert_workers.expert_group, expert_workers.expert_pairs
import expert_workers.grouped_ffn, model_core.kernel_runtime
print(json.dumps(sorted({m.partition(".")[0] for m in sys.modules})))
""")
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert {"gateway", "expert_workers", "model_core", "torch", "triton"} <= loaded
    assert not loaded & {*BLOCKED, "google", "opentelemetry", "fastapi", "pydantic"}, loaded


def test_the_kernel_tests_collect_and_run_without_ray_grpc_or_jsonschema():
    done = run_blocked(f"""
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *{KERNEL_TESTS!r}]))
""")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    summary = re.search(r"(\d+) passed(.*) in [\d.]+s", out)
    assert summary and "error" not in summary[2] and "failed" not in summary[2], out[-2000:]
    assert int(summary[1]) >= 40, out[-2000:]  # the interpreter's cases ran (the CUDA ones skip without a GPU)
