"""Live balancing end to end: gateways share one router-service actor, survive its restart and its loss."""

from __future__ import annotations

import time
import uuid

import pytest
import torch

from gateway import Engine
from gateway.config import DeploymentConfig
from router_service.bias import BalanceConfig
from tests.conftest import random_prompts

pytestmark = pytest.mark.slow


def config(path, name: str, **balancing) -> DeploymentConfig:
    settings = {"mode": "adapt", "gamma": 0.05, "window_tokens": 64, "service": "ray", "name": name, **balancing}
    return DeploymentConfig(model=str(path), backend="local", devices=2, balancing=BalanceConfig(**settings))


def live_bias(engine: Engine) -> dict[int, torch.Tensor]:
    return {layer: engine.model.layers[layer].selection_bias for layer in engine.spec.moe_layers}


def test_two_gateways_sharing_a_router_service_converge_to_one_bias(model_dirs, ray_cluster):
    name = f"router-{uuid.uuid4().hex[:6]}"
    path = model_dirs["tiny-v3"]
    with Engine.from_config(config(path, name)) as a, Engine.from_config(config(path, name)) as b:
        for round_ in range(2):
            for i in range(3):  # different traffic on each gateway
                a.logits(random_prompts(272, [40, 30], seed=10 * round_ + i))
                b.logits(random_prompts(272, [50], seed=100 + 10 * round_ + i))
            stats_a, stats_b = a.balance_stats(), b.balance_stats()  # sync: push, then pull the current bias
        assert stats_a["windows_closed"] >= 2 and len(stats_a["gateways"]) == 2
        assert stats_a["version"] == stats_b["version"] == a.balance.version == b.balance.version
        bias_a, bias_b = live_bias(a), live_bias(b)
        for layer in a.spec.moe_layers:
            assert torch.equal(bias_a[layer], bias_b[layer])
            assert not torch.equal(bias_a[layer], a.model.layers[layer].model_bias)  # it did move
        history = a.balance.call("report_history")  # fidelity: once the bias moved, some tokens route differently
        assert max(r["changed_share"] for window in history for r in window) > 0
        assert all(n > 0 for n in a.routing_summary.changed_by_serving.values())
        assert stats_a["last_window"][0]["bias_max"] > stats_a["last_window"][0]["bias_min"]
        assert "expert max/mean" in a.stats_table()


def test_router_service_restart_resumes_from_its_checkpoint(model_dirs, ray_cluster, tmp_path):
    name = f"router-{uuid.uuid4().hex[:6]}"
    cfg = config(model_dirs["tiny-v3"], name, checkpoint=str(tmp_path / "router.json"))
    with Engine.from_config(cfg) as engine:
        for i in range(3):
            engine.logits(random_prompts(272, [48], seed=i))
        before = engine.balance_stats()
        assert before["version"] >= 1
        actor = ray_cluster.get_actor(name, namespace=cfg.ray.namespace)
        ray_cluster.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=-1); __init__ restores
        deadline = time.monotonic() + 60
        after = engine.balance.call("stats", timeout_s=60)
        while not after["restored_from_checkpoint"] and time.monotonic() < deadline:  # the kill is asynchronous
            time.sleep(0.2)
            after = engine.balance.call("stats", timeout_s=60)
        assert after["restored_from_checkpoint"] and after["version"] == before["version"]
        assert after["windows_closed"] == before["windows_closed"]
        engine.logits(random_prompts(272, [64, 64], seed=9))  # traffic keeps flowing after the restart
        assert engine.balance_stats()["version"] > before["version"]


def test_gateway_keeps_routing_with_its_last_bias_when_the_service_is_gone(model_dirs, ray_cluster):
    name = f"router-{uuid.uuid4().hex[:6]}"
    with Engine.from_config(config(model_dirs["tiny-v3"], name)) as engine:
        for i in range(3):
            engine.logits(random_prompts(272, [48], seed=i))
        engine.balance_stats()
        kept = {k: v.clone() for k, v in live_bias(engine).items()}
        ray_cluster.kill(ray_cluster.get_actor(name, namespace=engine.config.ray.namespace), no_restart=True)
        tokens = engine.generate([[5, 6, 7]], max_new_tokens=6)  # serving goes on
        assert len(tokens[0]) >= 1
        stats = engine.balance_stats()
        assert stats["gateway"]["router_unreachable"] and stats["gateway"]["router_failures"] >= 1
        assert "error" in stats
        for layer, bias in live_bias(engine).items():
            assert torch.equal(bias, kept[layer])


def test_stats_cli_reads_a_running_router_service_from_another_process(model_dirs, ray_cluster):
    import json
    import subprocess
    import sys

    name = f"router-{uuid.uuid4().hex[:6]}"
    with Engine.from_config(config(model_dirs["tiny-v3"], name)) as engine:
        for i in range(3):
            engine.logits(random_prompts(272, [48], seed=i))
        expected = engine.balance_stats()
        address = ray_cluster.get_runtime_context().gcs_address
        cmd = [sys.executable, "-m", "deploy.cli", "stats", "--address", address, "--name", name,
               "--namespace", engine.config.ray.namespace]
        table = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert table.returncode == 0, table.stderr
        assert f"bias version={expected['version']}" in table.stdout and "expert max/mean" in table.stdout
        as_json = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
        assert json.loads(as_json.stdout)["windows_closed"] == expected["windows_closed"]
        missing = subprocess.run([*cmd[:-4], "--name", "nope", "--namespace", engine.config.ray.namespace],
                                 capture_output=True, text=True, timeout=120)
        assert missing.returncode == 2 and "no router service of that name" in missing.stderr
