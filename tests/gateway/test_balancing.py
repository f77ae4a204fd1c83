"""Live balancing: the gateway's client counts every token exactly once, even under concurrent flushes and a
hung service; end to end, gateways share one router-service actor, survive its restart and its loss."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from gateway import Engine
from gateway.config import DeploymentConfig
from gateway.model.step import StepBatch
from gateway.serving.balancing import BalanceClient, InProcessRouter, RayRouter
from router_service.accounting import count_routing
from router_service.bias import BalanceConfig
from router_service.load_stats import expert_balance
from router_service.routing import Routing
from router_service.service import RouterService, window_to_wire
from tests.conftest import random_prompts

# A small layer for client tests: E experts on D devices, K per token, two MoE layers.
E, D, K, LAYERS = 8, 2, 2, [1, 2]
EXPERT_DEVICE = [0] * 4 + [1] * 4


def random_step(seed: int) -> tuple[dict[int, Routing], StepBatch]:
    """One step of 1-3 sequences with random routing (distinct experts per token) in every layer."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
    step = StepBatch(list(range(seed % 3, seed % 3 + len(lengths))), [0] * len(lengths), lengths)
    seq_index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    routings = {}
    for layer in LAYERS:
        scores = torch.rand(step.n_tokens, E, generator=gen)
        ids = torch.rand(step.n_tokens, E, generator=gen).argsort(dim=-1)[:, :K]
        counts = count_routing(ids, E, torch.tensor(EXPERT_DEVICE), D, seq_index, len(lengths))
        routings[layer] = Routing(ids=ids, weights=scores.gather(1, ids), scores=scores, counts=counts)
    return routings, step


def in_process_service(**balancing) -> RouterService:
    cfg = BalanceConfig(**{"mode": "observe", "window_tokens": 10**9, **balancing})
    return RouterService({layer: [0.0] * E for layer in LAYERS}, EXPERT_DEVICE, D, K, cfg)


def client_for(service, remote: bool = False, **kwargs) -> BalanceClient:
    router = RayRouter(service) if remote else InProcessRouter(service)
    return BalanceClient(router, lambda biases: None, D, E, K, LAYERS, **{"push_every_steps": 2, **kwargs})


def observed_totals(steps) -> dict[int, torch.Tensor]:
    return {layer: sum(torch.bincount(r[layer].ids.flatten(), minlength=E) for r, _ in steps) for layer in LAYERS}


def test_flushes_from_another_thread_neither_lose_nor_double_count():
    service = in_process_service()
    client = client_for(service)
    steps = [random_step(seed) for seed in range(400)]
    done = threading.Event()

    def engine_thread():
        try:
            for routings, step in steps:
                client.observe(routings, step)
        finally:
            done.set()

    def stats_thread():  # Engine.balance_stats from an HTTP handler: sync -> flush on the caller's thread
        while not done.is_set():
            client.flush()
            client.sync()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible so an unguarded window shows its race
    try:
        threads = [threading.Thread(target=engine_thread), threading.Thread(target=stats_thread),
                   threading.Thread(target=stats_thread)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    client.sync()
    expected = observed_totals(steps)
    tokens = sum(step.n_tokens for _, step in steps)
    for layer in LAYERS:
        assert service.window[layer].tokens == tokens
        assert torch.equal(service.window[layer].counts, expected[layer])
        assert int(service.window[layer].device_tokens.sum()) >= tokens



def config(path, name: str, **balancing) -> DeploymentConfig:
    settings = {"mode": "adapt", "gamma": 0.05, "window_tokens": 64, "service": "ray", "name": name, **balancing}
    return DeploymentConfig(model=str(path), backend="local", devices=2, balancing=BalanceConfig(**settings))


def live_bias(engine: Engine) -> dict[int, torch.Tensor]:
    return {layer: engine.model.layers[layer].selection_bias for layer in engine.spec.moe_layers}


def test_pushed_window_equals_a_brute_force_summary_of_the_steps():
    service = in_process_service()
    client = client_for(service, push_every_steps=1000)
    steps = [random_step(seed) for seed in range(12)]  # sequence ids recur across steps (decode-like)
    for routings, step in steps:
        client.observe(routings, step)
    client.sync()
    for layer in LAYERS:
        per_seq: dict[int, list] = {}
        score_sum = torch.zeros(E, dtype=torch.float64)
        device_tokens = torch.zeros(D, dtype=torch.long)
        for routings, step in steps:
            r = routings[layer]
            norm = r.scores.double() / r.scores.double().sum(-1, keepdim=True)
            score_sum += norm.sum(0)
            for t in range(step.n_tokens):
                for d in {EXPERT_DEVICE[e] for e in r.ids[t].tolist()}:
                    device_tokens[d] += 1
            for seq_id, off, n in zip(step.seq_ids, step.offsets, step.lengths, strict=True):
                acc = per_seq.setdefault(seq_id, [torch.zeros(E, dtype=torch.long), torch.zeros(E).double(), 0])
                acc[0] += torch.bincount(r.ids[off : off + n].flatten(), minlength=E)
                acc[1] += norm[off : off + n].sum(0)
                acc[2] += n
        w = service.window[layer]
        assert torch.equal(w.counts, observed_totals(steps)[layer]) and torch.equal(w.device_tokens, device_tokens)
        torch.testing.assert_close(w.score_sum, score_sum)
        assert w.sequences == len(per_seq) == 5
        assert w.seq_balance_sum == pytest.approx(sum(expert_balance(c, s, n, K) for c, s, n in per_seq.values()))


def test_an_in_process_service_that_raises_is_handled_like_an_unreachable_one():
    """One code path over both handles: a call that raises in-process is counted as a failure (as a failed Ray
    call is), observe() never raises, and counts flow again once the service answers."""
    service = in_process_service()
    client = client_for(service, push_every_steps=1)
    steps = [random_step(seed) for seed in range(6)]

    def broken(*args):
        raise RuntimeError("service bug")

    service.push = broken  # the instance attribute shadows the method: every push raises
    for routings, step in steps[:3]:
        client.observe(routings, step)
    client.sync()  # the snapshot still answers: reachable again, each failed push counted once
    assert client.metrics()["router_failures"] == 3 and service.window[LAYERS[0]].tokens == 0
    del service.push
    for routings, step in steps[3:]:
        client.observe(routings, step)
    client.sync()
    assert client.metrics()["router_failures"] == 3 and not client.metrics()["router_unreachable"]
    for layer in LAYERS:
        assert service.window[layer].tokens == sum(step.n_tokens for _, step in steps[3:])


def worst_over_layers(model_dir, mode: str, windows: int = 12, window: int = 256) -> tuple[list[float], list[float]]:
    """Skewed traffic (random sequences over a 16-token topic) through an engine with an in-process router
    service: per closed window, the worst layer's (expert max/mean, device max/mean)."""
    balancing = BalanceConfig(mode=mode, gamma=0.05, max_bias=1.0, window_tokens=window, service="local")
    gen = torch.Generator().manual_seed(1)
    with Engine.from_config(DeploymentConfig(model=str(model_dir), backend="local", devices=4,
                                             balancing=balancing)) as engine:
        topic = torch.randint(3, engine.spec.vocab_size, (16,), generator=gen)
        for _ in range(windows):
            engine.logits([topic[torch.randint(0, 16, (32,), generator=gen)].tolist() for _ in range(window // 32)])
        history = engine.balance.call("report_history")
    assert len(history) == windows
    return ([max(r["expert_max_over_mean"] for r in w) for w in history],
            [max(r["device_max_over_mean"] for r in w) for w in history])


def test_adapt_mode_lowers_imbalance_on_skewed_traffic(model_dirs):
    observed_expert, observed_device = worst_over_layers(model_dirs["tiny-v3"], "observe")
    adapted_expert, adapted_device = worst_over_layers(model_dirs["tiny-v3"], "adapt")
    assert adapted_expert[0] == observed_expert[0] > 2.5  # same traffic, same (unbiased) first window: skewed

    def later(xs: list[float]) -> float:
        return sum(xs[6:]) / len(xs[6:])

    assert later(adapted_expert) < 0.75 * later(observed_expert) and later(adapted_expert) < 0.75 * adapted_expert[0]
    assert later(adapted_device) < 0.85 * later(observed_device)


class HeldRouterService(RouterService):
    """A real RouterService whose pushes hang while the file `hold` exists: a service that stops answering."""

    def __init__(self, hold: str, *args) -> None:
        super().__init__(*args)
        self.hold = Path(hold)

    def push(self, gateway: str, windows: dict, placement: dict | None = None) -> int:
        while self.hold.exists():
            time.sleep(0.02)
        return super().push(gateway, windows, placement)

    def open_window(self) -> dict:
        return {layer: window_to_wire(w) for layer, w in self.window.items()}


@pytest.mark.slow
def test_a_hung_service_bounds_pushes_in_flight_and_gets_every_count_once_it_answers(ray_cluster, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    service = in_process_service()
    actor = ray_cluster.remote(HeldRouterService).options(num_cpus=0).remote(
        str(hold), {layer: [0.0] * E for layer in LAYERS}, EXPERT_DEVICE, D, K, service.config)
    client = client_for(actor, remote=True, push_every_steps=1, max_pending_pushes=3)
    steps = [random_step(seed) for seed in range(30)]
    try:
        for routings, step in steps:
            client.observe(routings, step)
            assert len(client._pending_pushes) <= 3 and not client.seq_row  # nothing grows per held-back step
        hung = client.metrics()
        assert hung["pending_pushes"] == 3 and hung["router_unreachable"] and hung["held_back_flushes"] >= 20
        hold.unlink()  # the service answers again
        client.sync(timeout_s=60)
        assert client.metrics()["pending_pushes"] == 0 and not client.metrics()["router_unreachable"]
        arrived = ray_cluster.get(actor.open_window.remote(), timeout=60)
        expected = observed_totals(steps)
        for layer in LAYERS:
            assert arrived[layer]["tokens"] == sum(step.n_tokens for _, step in steps)
            assert arrived[layer]["counts"] == expected[layer].tolist()
            assert arrived[layer]["sequences"] == sum(len(step.lengths) for _, step in steps)
    finally:
        hold.unlink(missing_ok=True)
        ray_cluster.kill(actor)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
