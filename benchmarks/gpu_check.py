"""The GPU check: verifies the GPU path on a CUDA machine as it is, most telling step first, within a short lease.

Runs from the repository root with whatever `python3` holds torch and triton (on the lent GPU machine: the image's
Python 3.12, no package registry). Setup installs the wheel bundle that `make gpu-bundle` built (.gpu-bundle/:
Ray, jsonschema, and the protobuf/grpcio the generated stubs need) into a --target folder put first on PYTHONPATH,
and records what the machine holds. Then each step runs in its own process under its own timeout, writing its log
into the output folder as it goes and its result into summary.json after each step:

  main suite (one H100, under 8 minutes):
    kernels        Triton fused-MoE kernels == the torch grouped FFN (fp32/fp16/bf16, poisoned workspaces); the FP8
                   fused MoE within its float64 references (test_fp8_kernel.py)
    paged-mla      the Triton paged MLA decode kernel == its torch reference
    kernel-bench   kernel timings and float64-reference errors at DeepSeek-V2-Lite shapes, FP8 decode rows beside
                   bf16 with their % of the HBM floor (kernel_bench.json)
    gateway-cuda   the in-process engine on CUDA == the CPU float32 reference (torch and Triton experts; the
                   gateway-device tests: seeded sampling, device-tensor codec)
    ray-cuda-ipc   Ray expert groups sharing the GPU (object store; CUDA IPC from a gateway actor) == reference
  h200 suite (the optional second command):
    kernel-bench-v3  kernel timings at DeepSeek-V3 shapes (kernel_bench_v3.json; its weights need ~23 GB)
    gpu-e2e          end-to-end tokens/s, in-process vs Ray deployments on the GPU (gpu_e2e.json)
  mesh suite: mesh-gpu  1-3 gateways and 2 expert groups sharing the GPU, merging on/off (mesh_gpu.json)

At most 8 files come back from the device tool's $OUT: setup.log, one log per step, the benchmarks' JSON and
summary.json. --dry-run (make gpu-check-dry) runs every step's setup here (the bundle's hashes, the environment
probe, each pytest step's collection, the benchmark scripts' CPU smoke or imports) and skips each GPU step with
a line saying so. Exit status: 0 when every step passed (dry run: every setup), else 1; 2 without CUDA unless
--dry-run.

    python3 benchmarks/gpu_check.py --out "$OUT"              # on the GPU machine (docs/gpu-check.md)
    python3 benchmarks/gpu_check.py --suite h200 --out "$OUT"     # or --suite mesh
    .venv/bin/python benchmarks/gpu_check.py --dry-run        # anywhere
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_suites beside this file
from gpu_suites import Step, suites  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu-bundle"
SITE = Path(tempfile.gettempdir()) / "expertmesh-gpu-site"
MAX_FILES_BACK = 8  # what the device tool brings back from $OUT
# Seconds for a suite's steps together. main: under 8 minutes with setup; h200: inside one 10-minute device command.
BUDGET_S = {"main": 450, "h200": 520, "mesh": 420}
MIN_STEP_S = 20  # a step is not started with less than this left of the budget
SETUP_TIMEOUT_S = 120  # a step's setup (dry run)
@dataclass
class Result:
    name: str
    status: str  # passed | failed | timeout | skipped | running
    seconds: float = 0.0
    returncode: int | None = None
    log: str = ""
    detail: str = ""
    failures: list[str] = field(default_factory=list)
    command: str = ""


# -- setup --------------------------------------------------------------------------------------------------------
def step_env(site: Path | None) -> dict[str, str]:
    """The steps' environment: the bundle's folder, then the repository, first on PYTHONPATH (Ray's workers
    inherit it), and nothing that waits on a network the GPU machine does not have."""
    env = dict(os.environ)
    paths = [str(site)] if site is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # Python 3.11+: the dev VMs and the GPU image


def check_bundle(bundle: Path, log) -> dict | None:
    """The bundle's manifest, every wheel present with its recorded hash; None (said in the log) when absent."""
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        log(f"no wheel bundle at {bundle} (build it with `make gpu-bundle` and carry it): steps that need Ray, "
            "or the protobuf/grpcio the stubs were generated for, use whatever this python3 has")
        return None
    manifest = json.loads(manifest_path.read_text())
    for wheel in manifest["wheels"]:
        path = bundle / wheel["file"]
        if not path.is_file() or sha256(path) != wheel["sha256"]:
            raise SystemExit(f"gpu_check: {path} is missing or differs from {manifest_path}: rebuild the bundle")
    log(f"bundle {bundle}: {len(manifest['wheels'])} wheels, {manifest['bundle_bytes'] / 2**20:.1f} MiB, hashes "
        f"match: " + ", ".join(f"{w['name']} {w['version']}" for w in manifest["wheels"]))
    return manifest


def install_bundle(bundle: Path, manifest: dict, site: Path, log) -> None:
    """pip install --no-index --no-deps --target `site` (skipped when `site` already holds this manifest)."""
    stamp = site / ".bundle-manifest.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == manifest:
        log(f"bundle already installed in {site}")
        return
    started = time.monotonic()
    wheels = [str(bundle / w["file"]) for w in manifest["wheels"]]
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(site),
                           *wheels], capture_output=True, text=True)
    log(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"gpu_check: installing the bundle into {site} failed (status {done.returncode})")
    google = site / "google"
    if google.is_dir() and not (google / "__init__.py").exists():
        # The carried protobuf must win over the image's, even if the image has a `google/__init__.py` (a regular
        # package there would shadow our namespace portion): a regular package here, extended with the others.
        (google / "__init__.py").write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    stamp.write_text(json.dumps(manifest))
    log(f"installed {len(wheels)} wheels into {site} in {time.monotonic() - started:.1f}s")


def probe(env: dict[str, str], log) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_probe.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    line = next((x for x in done.stdout.splitlines() if x.startswith("PROBE ")), None)
    if line is None:
        log(done.stdout + done.stderr)
        raise SystemExit("gpu_check: the environment probe failed (see setup.log)")
    info = json.loads(line[len("PROBE "):])
    for key, value in info.items():
        log(f"  {key}: {value}")
    return info


def gpu_count(info: dict) -> int:
    return int(info.get("gpu", {}).get("count", 0))


def bundle_mismatches(info: dict, manifest: dict | None) -> list[str]:
    """Packages the bundle carries that were imported at another version (shadowed by the image's)."""
    if manifest is None:
        return []
    carried = {w["name"]: w["version"] for w in manifest["wheels"]}
    wrong = []
    for module, dist in (("ray", "ray"), ("grpc", "grpcio"), ("google.protobuf", "protobuf")):
        got = info.get(module, {}).get("version")
        if dist in carried and got != carried[dist]:
            wrong.append(f"{module} {got or info.get(module)} imported, the bundle carries {carried[dist]}")
    return wrong


# -- running steps ------------------------------------------------------------------------------------------------
def run_logged(argv: list[str], log_path: Path, env: dict[str, str], timeout_s: int) -> tuple[int | None, float]:
    """Run argv in its own process group, its output into log_path as it goes; on timeout kill the whole group
    (Ray's workers too). -> (exit status or None on timeout, seconds)."""
    started = time.monotonic()
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            status = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n== killed after its {timeout_s}s timeout\n")
            status = None
    return status, time.monotonic() - started


def pytest_detail(log_path: Path) -> tuple[str, list[str]]:
    """The pytest summary line ('12 passed, 3 skipped in 40.1s') and the FAILED/ERROR lines of a step's log."""
    text = log_path.read_text(errors="replace")
    lines = text.splitlines()
    summary = next((x.strip("= ") for x in reversed(lines) if re.search(r"\d+ (passed|failed|error|skipped|"
                                                                        r"deselected|tests? collected)", x)), "")
    failures = [x for x in lines if x.startswith(("FAILED ", "ERROR "))]
    return summary, failures[:50]


class Check:
    def __init__(self, out: Path, suite: str, dry_run: bool) -> None:
        self.out, self.suite, self.dry_run = out, suite, dry_run
        self.results: list[Result] = []
        self.summary: dict = {"check": "gpu_check", "suite": suite, "dry_run": dry_run,
                              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "host": platform.node(), "steps": []}
        self.setup_log = out / "setup.log"

    def log(self, text: str) -> None:
        text = text.rstrip()
        if not text:
            return
        print(text, flush=True)
        with self.setup_log.open("a") as f:
            f.write(text + "\n")

    def write_summary(self) -> None:
        self.summary["steps"] = [asdict(r) for r in self.results]
        self.summary["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        path = self.out / "summary.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.summary, indent=1) + "\n")
        path.with_suffix(".tmp").replace(path)

    def run_step(self, index: int, step: Step, env: dict[str, str], gpu: bool, left_s: float) -> Result:
        """Run one step (its setup only in a dry run or without a GPU), within `left_s` of the whole budget."""
        log_path = self.out / f"{index}-{step.name}.log"
        argv = [sys.executable, *step.command]
        result = Result(step.name, "running", log=log_path.name, command=shlex.join(step.command))
        self.results.append(result)
        timeout_s = int(min(step.timeout_s, left_s))
        if self.dry_run or not gpu:
            argv = [sys.executable, *step.setup]
            status, seconds = run_logged(argv, log_path, env, SETUP_TIMEOUT_S)
            detail, failures = pytest_detail(log_path) if step.setup[:2] == ["-m", "pytest"] else ("", [])
            result.status = "skipped" if status == 0 else "failed"
            result.returncode, result.seconds, result.failures = status, seconds, failures
            setup = f"setup {'ok' if status == 0 else 'FAILED'} in {seconds:.1f}s" + (f" ({detail})" if detail else "")
            result.detail = f"{setup}; GPU step skipped: " + ("dry run" if self.dry_run else "no CUDA GPU here")
            print(f"SKIP {step.name}: {result.detail}; on a GPU it runs: python3 {result.command}", flush=True)
        elif left_s < MIN_STEP_S:
            result.status, result.detail = "skipped", f"not run: {left_s:.0f}s left of the check's --budget-s"
            print(f"SKIP {step.name}: {result.detail}", flush=True)
        else:
            self.write_summary()
            print(f"RUN  {step.name} (timeout {timeout_s}s): {step.measures}", flush=True)
            status, seconds = run_logged(argv, log_path, env, timeout_s)
            result.returncode, result.seconds = status, seconds
            result.status = "timeout" if status is None else "passed" if status == 0 else "failed"
            if step.command[:2] == ["-m", "pytest"]:
                result.detail, result.failures = pytest_detail(log_path)
            else:
                result.detail = tail(log_path, 1)
            if step.writes and not (self.out / step.writes).is_file():
                result.detail += f" (wrote no {step.writes})"
            print(f"{result.status.upper():<7} {step.name} in {seconds:.1f}s: {result.detail}", flush=True)
        self.write_summary()
        return result


def tail(path: Path, n: int) -> str:
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    return " | ".join(lines[-n:])


def print_table(results: list[Result]) -> None:
    print(f"\n{'step':<16} {'status':<8} {'time':>7}  detail")
    for r in results:
        print(f"{r.name:<16} {r.status:<8} {r.seconds:>6.1f}s  {r.detail}")
        for failure in r.failures[:10]:
            print(f"{'':<34}{failure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"
                                                         / "gpu-check"),
                        help="output folder: logs, benchmark JSON, summary.json (default $OUT, else "
                             "benchmarks/results/gpu-check)")
    parser.add_argument("--suite", choices=sorted(BUDGET_S), default="main",
                        help="main: kernels, paged MLA, V2-Lite kernel bench, gateway on CUDA, Ray on the GPU; "
                             "h200: V3 kernel bench and the end-to-end benchmark")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step's setup here and skip the GPU steps (no GPU needed)")
    parser.add_argument("--bundle", type=Path, default=BUNDLE, help="wheel bundle folder (make gpu-bundle)")
    parser.add_argument("--site", type=Path, default=SITE, help="where the bundle is installed (pip --target)")
    parser.add_argument("--no-bundle", action="store_true",
                        help="use this python's packages as they are (a venv with `pip install -e .[dev]`)")
    parser.add_argument("--steps", nargs="+", help="run only these steps of the suite (names as listed)")
    parser.add_argument("--budget-s", type=float,
                        help=f"seconds for all steps together (default {BUDGET_S}); each step also has its own "
                             "timeout, cut to what is left, and one is not started with under "
                             f"{MIN_STEP_S}s left")
    args = parser.parse_args()
    budget_s = args.budget_s if args.budget_s is not None else BUDGET_S[args.suite]

    started = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.log"), out / "summary.json"]:  # this run's files only (at most 8 come back)
        old.unlink(missing_ok=True)
    check = Check(out, args.suite, args.dry_run)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        steps = suites(out, Path(scratch))[args.suite]
        if args.steps:
            unknown = set(args.steps) - {s.name for s in steps}
            if unknown:
                sys.exit(f"gpu_check: --steps {sorted(unknown)}: the {args.suite} suite has "
                         f"{[s.name for s in steps]}")
            steps = [s for s in steps if s.name in args.steps]
        check.log(f"gpu_check {args.suite} suite{' (dry run)' if args.dry_run else ''} from {ROOT}, output {out}")
        manifest = None if args.no_bundle else check_bundle(args.bundle, check.log)
        site = None
        if manifest is not None:
            if args.dry_run:
                check.log(f"dry run: the bundle would be installed into {args.site} (pip --target), first on "
                          "PYTHONPATH; here the steps use this python's own packages")
            else:
                install_bundle(args.bundle, manifest, args.site, check.log)
                site = args.site
        env = step_env(site)
        info = probe(env, check.log)
        check.summary["environment"] = info
        mismatches = [] if site is None else bundle_mismatches(info, manifest)
        for line in mismatches:
            check.log(f"WARNING: {line}: the image's package shadows the bundle's (see setup.log's sys.path)")
        check.summary["bundle"] = None if manifest is None else {
            "installed_in": str(site) if site else None,
            "wheels": {w["name"]: w["version"] for w in manifest["wheels"]}, "mismatches": mismatches}
        if gpu_count(info) and info.get("ray_gpus") != gpu_count(info):
            check.log(f"WARNING: Ray detects {info.get('ray_gpus')} GPUs, torch {gpu_count(info)}: the Ray step "
                      "needs Ray to see the GPU (NVML)")
        if info.get("stubs") != "ok":
            check.log(f"WARNING: the generated protobuf stubs do not import: {info.get('stubs')}")
        gpu = bool(info.get("cuda_available"))
        if not gpu and not args.dry_run:
            check.log("gpu_check: torch sees no CUDA GPU here: each GPU step runs its setup only and is skipped "
                      "(use --dry-run to check the setup on purpose)")
        check.write_summary()
        steps_started = time.monotonic()
        for index, step in enumerate(steps, start=1):
            check.run_step(index, step, env, gpu, budget_s - (time.monotonic() - steps_started))
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    if len(files) > MAX_FILES_BACK:
        print(f"note: {len(files)} files in {out}; the device tool brings back only {MAX_FILES_BACK}")
    total = time.monotonic() - started
    check.summary["seconds"] = total
    check.write_summary()
    print_table(check.results)
    ok = all(r.status == ("skipped" if (args.dry_run or not gpu) else "passed") and r.returncode == 0
             for r in check.results)
    print(f"\ngpu_check {args.suite}{' dry run' if args.dry_run else ''}: "
          f"{'all steps ' + ('set up' if args.dry_run or not gpu else 'passed') if ok else 'FAILURES'} "
          f"in {total:.0f}s; logs and summary.json in {out}")
    if not gpu and not args.dry_run:
        sys.exit(2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
