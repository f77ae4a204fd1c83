"""`benchmarks/gpu_check.py --dry-run` (make gpu-check-dry) runs every step's setup on this CPU machine and skips
each GPU step with a line saying so; the files it leaves fit what the device tool brings back (8)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until

ROOT = Path(__file__).parents[2]
CHECK = ROOT / "benchmarks" / "gpu_check.py"
MAIN_STEPS = ["kernels", "paged-mla", "kernel-bench", "gateway-cuda", "ray-cuda-ipc"]
H200_STEPS = ["kernel-bench-v3", "gpu-e2e"]


def dry_run(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # the device tool's output folder: not here
    done = subprocess.run([sys.executable, str(CHECK), "--dry-run", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, env=env)
    return done, time.monotonic() - started


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def assert_dry(done: subprocess.CompletedProcess, out: Path, steps: list[str]) -> dict:
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for name in steps:
        assert f"SKIP {name}: setup ok in" in done.stdout and "GPU step skipped: dry run; on a GPU it runs: python3 " \
            in done.stdout, done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["environment"]["cuda_available"] is False
    assert summary["environment"]["stubs"] == "ok"  # the generated protobuf stubs import with these versions
    assert [s["name"] for s in summary["steps"]] == steps
    for step in summary["steps"]:
        assert step["status"] == "skipped" and step["returncode"] == 0, step
        assert (out / step["log"]).is_file()
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "setup.log" in files, files  # the device tool brings back 8 files
    return summary


def test_dry_run_of_the_main_suite_sets_up_every_step_and_skips_them(tmp_path, record_property):
    out = tmp_path / "out"
    done, seconds = dry_run(out)
    summary = assert_dry(done, out, MAIN_STEPS)
    by_name = {s["name"]: s for s in summary["steps"]}
    for name in ("kernels", "paged-mla", "gateway-cuda", "ray-cuda-ipc"):  # each pytest step collected tests
        assert "collected" in by_name[name]["detail"] and "error" not in by_name[name]["detail"], by_name[name]
    assert "all steps set up" in done.stdout
    record_property("report", f"main suite dry run: {seconds:.0f}s (setup of 5 steps; the issue asks < 60 s)")


def test_dry_run_of_the_h200_suite(tmp_path):
    out = tmp_path / "out"
    done, _ = dry_run(out, "--suite", "h200")
    assert_dry(done, out, H200_STEPS)


def test_a_step_whose_setup_fails_fails_the_dry_run(tmp_path, gpu_check):
    """A collection error (here: a test file that does not exist) is a failure, never a quiet skip."""
    steps = gpu_check.suites(tmp_path, tmp_path)["main"]
    broken = gpu_check.Step("kernels", "x", ["-m", "pytest", "tests/no_such_file.py"], 10,
                            ["-m", "pytest", "--collect-only", "-q", "tests/no_such_file.py"])
    check = gpu_check.Check(tmp_path, "main", dry_run=True)
    result = check.run_step(1, broken, gpu_check.step_env(None), gpu=False, left_s=60)
    assert result.status == "failed" and result.returncode != 0 and "setup FAILED" in result.detail
    assert [s.name for s in steps] == MAIN_STEPS


def test_a_step_is_not_started_without_enough_budget(tmp_path, gpu_check):
    step = gpu_check.suites(tmp_path, tmp_path)["main"][0]
    check = gpu_check.Check(tmp_path, "main", dry_run=False)
    result = check.run_step(1, step, gpu_check.step_env(None), gpu=True, left_s=5)
    assert result.status == "skipped" and result.returncode is None and "not run: 5s left" in result.detail
    assert json.loads((tmp_path / "summary.json").read_text())["steps"][0]["status"] == "skipped"


def test_a_step_over_its_timeout_is_killed_with_its_children(tmp_path, gpu_check):
    """The step's process group is killed (Ray's workers too), its log says so, and the check goes on."""
    sleeper = ["-c", "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(60)']); print('child', child.pid, flush=True); time.sleep(60)"]
    step = gpu_check.Step("sleeper", "x", sleeper, 2, sleeper)
    check = gpu_check.Check(tmp_path, "main", dry_run=False)
    started = time.monotonic()
    result = check.run_step(1, step, gpu_check.step_env(None), gpu=True, left_s=30)
    assert time.monotonic() - started < 20
    assert result.status == "timeout" and result.returncode is None
    log = (tmp_path / result.log).read_text()
    assert "killed after its 2s timeout" in log
    child = Path(f"/proc/{log.split('child ')[1].split()[0]}/stat")
    wait_until(lambda: not child.exists() or child.read_text().split(") ")[1].startswith("Z"), 10,
               "the step's own child process to be killed with it")


def test_dry_run_of_the_mesh_suite(tmp_path):
    out = tmp_path / "out"
    done, _ = dry_run(out, "--suite", "mesh")
    assert_dry(done, out, ["mesh-gpu"])
