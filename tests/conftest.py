"""Shared fixtures: generated checkpoints (one per preset, made once per session) and transformers references."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model_core.make_model import make_model

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be on before any kernel compiles.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_PRESETS = ["tiny-v2", "tiny-v2-group", "tiny-v3", "tiny-v3-plain"]
NO_GPU_REASON = "needs a CUDA GPU: run `make gpu-check` on a GPU machine"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip, saying why, when CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without the final garbage collection and interpreter teardown once pytest has reported everything,
    with pytest's own status.

    CI runs passed every test and then died with SIGSEGV in that collection: faulthandler showed pytest's own
    unraisable-exception hook (`gc_collect_harder` in its pytest_unconfigure) garbage-collecting some native
    object left by the session. This hook runs first: Ray is shut down cleanly, then the process ends as pytest
    decided. EXPERTMESH_FULL_EXIT=1 keeps the normal teardown (to hunt the object).
    """
    if os.environ.get("EXPERTMESH_FULL_EXIT") == "1":
        return
    import sys

    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)


def pytest_terminal_summary(terminalreporter) -> None:
    """Print what tests recorded with `record_property("report", ...)`: measurements that are shown, not asserted."""
    lines = [f"{r.nodeid}: {value}" for r in terminalreporter.stats.get("passed", [])
             for key, value in r.user_properties if key == "report"]
    if lines:
        terminalreporter.write_sep("-", "reported (not asserted)")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make_model(name, root / name, seed=7) for name in TINY_PRESETS}


@pytest.fixture(scope="session")
def hf_reference():
    """Load (once per preset) the transformers model of a generated checkpoint, float32, eager attention."""
    from transformers import AutoModelForCausalLM

    cache: dict[Path, object] = {}

    def load(path: Path):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager"
            ).eval()
        return cache[path]

    return load


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def float32_gemm_is_batch_invariant() -> bool:
    """Whether this machine's float32 matmul gives a row the same bits in batches of any size (it depends on the
    BLAS kernels the CPU gets: true on the AVX-512 VM of 2026-12-01, false on an AVX512-BF16 one of 2026-12-05).
    Where it holds, merged or micro-batched rows equal each call's own bit for bit."""
    gen = torch.Generator().manual_seed(3)
    for m, k, n in ((5, 64, 128), (12, 64, 256), (36, 32, 1000)):
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        whole = x @ w.t()
        if any(not torch.equal(x[a:b] @ w.t(), whole[a:b]) for a, b in ((0, 1), (1, 3), (0, m // 2))):
            return False
    return True


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05) -> object:
    """Poll `predicate` until it returns something true (returned), or raise TimeoutError naming `what` after
    `timeout_s`. Tests wait for a condition, never for a fixed time: on a shared 2-core machine any fixed sleep is
    either too short or wasted."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout_s:g}s for {what}")
        time.sleep(interval_s)
    return result


class Traffic:
    """Generates `prompts` greedily, over and over, on a thread while the test changes the deployment; collects
    the results and any failure (`with Traffic(engine, prompts) as traffic: ...`)."""

    def __init__(self, engine, prompts: list[list[int]], max_new_tokens: int = 12) -> None:
        import threading

        self.engine, self.prompts, self.max_new_tokens = engine, prompts, max_new_tokens
        self.results: list = []
        self.failures: list[Exception] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(self.engine.generate(self.prompts, max_new_tokens=self.max_new_tokens,
                                                         stop_at_eos=False))
            except Exception as exc:  # any failure fails the test that reads `failures`
                self.failures.append(exc)

    def wait_for_results(self, count: int, timeout_s: float = 120.0) -> None:
        """Wait until `count` generations have finished in all (or one failed: the test reads `failures`)."""
        wait_until(lambda: len(self.results) >= count or self.failures, timeout_s,
                   f"{count} finished generations of the background traffic")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


@pytest.fixture(scope="module")
def expected_tokens(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> list[list[int]]:
    """What every deployment must answer: the in-process engine's greedy tokens for the test module's `PROMPTS`
    (tiny-v3, `MAX_NEW_TOKENS` each, no stop at EOS), generated together as one batch."""
    from gateway import Engine

    prompts, max_new_tokens = request.module.PROMPTS, request.module.MAX_NEW_TOKENS
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:
        return engine.generate(prompts, max_new_tokens=max_new_tokens, stop_at_eos=False)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray, started once per session (expert-group actors need one CPU slot each)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="expertmesh-tests")
    yield ray
    if started:
        ray.shutdown()


class SkippedKernel:
    """Stands in for a Triton kernel that writes nothing: its launch does nothing (the poisoned-workspace tests)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None
