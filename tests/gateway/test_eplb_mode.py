"""balancing.mode eplb: the router service proposes placements from live load and the engine switches to them
while serving; every token stays the model's own."""

from __future__ import annotations

import time

import pytest

from gateway import Engine
from gateway.config import BalanceConfig, DeploymentConfig, RayConfig
from tests.conftest import random_prompts

PROMPTS = random_prompts(272, [24, 9, 17, 30], seed=41)
MAX_NEW_TOKENS = 10  # what `expected_tokens` (conftest) generates for PROMPTS


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_eplb_mode_rearranges_while_serving_and_changes_no_token(backend, model_dirs, expected_tokens, tmp_path,
                                                                 request):
    if backend != "local":
        request.getfixturevalue("ray_cluster")
    cfg = DeploymentConfig(
        model=str(model_dirs["tiny-v3"]), backend=backend, devices=4,
        ray=RayConfig(namespace=f"eplb-{backend}-{time.monotonic_ns()}"),
        balancing=BalanceConfig(mode="eplb", window_tokens=60, redundant_slots=4, rebalance_every_windows=1,
                                min_gain=0.0, name=f"eplb-{time.monotonic_ns()}"))
    with Engine.from_config(cfg) as engine:
        for _ in range(4):  # windows close, the service proposes, a thread applies the plan between steps
            assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens
            engine.wait_rearranged()
        proposal = engine.balance.last_proposal  # the latest answer: after a switch there may be nothing to gain
        assert proposal is not None and proposal["predicted"] <= proposal["current"]
        assert engine.rearrangements >= 1 and engine.rearrangement_failures == 0
        placement = engine.backend.placement
        assert placement.version == engine.rearrangements and placement.redundant_slots(engine.spec.moe_layers[0]) == 4
        assert engine.balance.version == 0  # the bias never moved: answers are the model's
        assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens
        from gateway.serving.engine_loop import EngineLoop
        from gateway.serving.http_api import prometheus_text

        loop = EngineLoop(engine)
        loop.stop()
        text = prometheus_text(loop)
        assert f"expertmesh_placement_version {placement.version}" in text
        assert f"expertmesh_rearrangements_total {engine.rearrangements}" in text
        assert f'expertmesh_redundant_expert_slots{{layer="{engine.spec.moe_layers[0]}"}} 4' in text


@pytest.mark.slow
def test_the_rebalance_cli_shows_a_plan_then_applies_it_to_a_running_deployment(model_dirs, expected_tokens,
                                                                                ray_cluster):
    import json
    import subprocess
    import sys

    stamp = time.monotonic_ns()
    cfg = DeploymentConfig(
        model=str(model_dirs["tiny-v3"]), backend="ray", devices=4, ray=RayConfig(namespace=f"rebalance-{stamp}"),
        balancing=BalanceConfig(mode="eplb", window_tokens=60, redundant_slots=4, rebalance_every_windows=1000,
                                min_gain=100.0, name=f"router-{stamp}"))  # it never proposes on its own
    with Engine.from_config(cfg) as engine:
        for _ in range(2):
            assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens
        cmd = [sys.executable, "-m", "deploy.cli", "rebalance", "--address",
               ray_cluster.get_runtime_context().gcs_address, "--name", cfg.balancing.name,
               "--namespace", cfg.ray.namespace]
        shown = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert "device max/mean now" in shown.stdout and "dry run: placement version 1" in shown.stdout
        assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens
        engine.wait_rearranged()
        assert engine.backend.placement.version == 0  # a dry run changes nothing
        applied = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
        assert applied.returncode == 0, applied.stderr
        answer = json.loads(applied.stdout)
        assert answer["applied"] and answer["placement"]["version"] == 1
        for _ in range(3):  # the gateway's next polls pick the queued plan up
            assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens
            engine.wait_rearranged()
        assert engine.backend.placement.version == 1 and engine.rearrangements == 1
        assert engine.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) == expected_tokens
