"""Many gateways, one expert mesh: gateways in processes of their own attach to one named mesh and give transformers'
answers; the mesh outlives gateways and its control actor; changes are decided once and followed by every gateway."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gateway import Engine
from gateway.config import DeploymentConfig, DeploymentConfigError, MeshConfig
from gateway.dispatch.mesh.attach import MeshNotRunning, mesh_down, mesh_status, mesh_up
from model_core.spec import ModelSpec
from router_service.placement import Placement
from tests.conftest import random_prompts, wait_until

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 10


class Gateway:
    """One gateway process: an Engine attached to the mesh its config names (a Ray actor in these tests)."""

    def __init__(self, cfg: DeploymentConfig) -> None:
        self.engine = Engine.from_config(cfg)

    def logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        return self.engine.logits(prompts)

    def generate(self, prompts: list[list[int]], max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
        return self.engine.generate(prompts, max_new_tokens=max_new_tokens, stop_at_eos=False)

    def placement_version(self) -> int:
        return self.engine.backend.placement.version

    def rearranged(self) -> tuple[int, int, int]:
        """(placement version, placements switched to, re-placements that failed), once none is in progress."""
        self.engine.wait_rearranged()
        return self.engine.backend.placement.version, self.engine.rearrangements, self.engine.rearrangement_failures

    def apply_placement(self, placement) -> None:
        self.engine.apply_placement(placement)

    def scale(self, group: int, replicas: int) -> list[int]:
        return self.engine.scale(group, replicas)

    def placement(self) -> dict:
        return self.engine.backend.placement.to_dict()

    def pause_following(self) -> None:
        """Offers of the mesh's placements are taken (the heartbeat reads them) but not switched to, until
        `apply_after_taking_the_offer_of`."""
        pool = self.engine.backend.pool
        self._follow, pool.on_placement = pool.on_placement, None

    def apply_after_taking_the_offer_of(self, version: int, own) -> None:
        """The race a mesh must survive: this gateway's heartbeat took the mesh's offer of `version` (another
        gateway's proposal) and, before it switched, this gateway applies its `own` proposal of that version."""
        pool = self.engine.backend.pool
        try:
            deadline = time.monotonic() + 30
            while pool.offered.version < version and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pool.offered.version == version, f"the heartbeat never took the offer of version {version}"
            assert self.engine.backend.placement.version < version  # not switched yet
        finally:
            pool.on_placement = self._follow
        self.engine.apply_placement(own)

    def close(self) -> None:
        self.engine.close()


def mesh_config(model: str, backend: str, name: str, **mesh) -> DeploymentConfig:
    return DeploymentConfig(model=model, backend=backend, devices=2, mesh=MeshConfig(name=name, **mesh))


def start_gateways(ray, cfg: DeploymentConfig, n: int) -> list:
    gateways = [ray.remote(Gateway).options(num_cpus=0).remote(cfg) for _ in range(n)]
    ray.get([g.placement_version.remote() for g in gateways])  # attached (the first one started the mesh)
    return gateways


def replica_starts(cfg: DeploymentConfig) -> dict[str, float]:
    return {r["name"]: r["started_at"] for r in mesh_status(cfg, load=False)["replicas"]}


@pytest.fixture
def hf_logits(model_dirs, hf_reference):
    ref = hf_reference(model_dirs["tiny-v3"])

    def logits(prompts: list[list[int]]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [ref(torch.tensor([p])).logits[0] for p in prompts]
    return logits


@pytest.mark.parametrize("backend, gateways", [("ray", 2), ("ray", 3), ("grpc", 2), ("grpc", 3), ("ray-rdt", 2),
                                               ("ray-rdt", 3)])
def test_gateways_on_one_mesh_give_transformers_logits_and_tokens(backend, gateways, model_dirs, ray_cluster,
                                                                   hf_logits):
    model = str(model_dirs["tiny-v3"])
    cfg = mesh_config(model, backend, f"parity-{backend}-{gateways}")
    procs = start_gateways(ray_cluster, cfg, gateways)
    try:
        vocab = 272
        prompts = [random_prompts(vocab, [7, 12, 4, 9], seed=g) for g in range(gateways)]
        want_logits = [hf_logits(p) for p in prompts]
        with Engine.from_pretrained(model) as local:
            want_tokens = [local.generate(p, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False) for p in prompts]
        # Every gateway at once: their calls meet at the replicas (and may merge there).
        got_logits = ray_cluster.get([g.logits.remote(p) for g, p in zip(procs, prompts, strict=True)])
        got_tokens = ray_cluster.get([g.generate.remote(p) for g, p in zip(procs, prompts, strict=True)])
        for ours, ref in zip(got_logits, want_logits, strict=True):
            for a, b in zip(ours, ref, strict=True):
                assert (a - b).abs().max().item() < 1e-5
        assert got_tokens == want_tokens
        status = mesh_status(cfg)
        assert len(status["gateways"]) == gateways and status["groups"] == 2 and len(status["replicas"]) == 2
        assert sum(r["load"]["calls"] for r in status["replicas"]) > 0
        spec = ModelSpec.from_dir(model)
        per_expert = 3 * spec.hidden_size * spec.moe_intermediate_size * 4  # float32, every MoE layer
        assert sorted(r["memory"]["weight_bytes"] for r in status["replicas"]) == [
            spec.n_routed_experts // 2 * len(spec.moe_layers) * per_expert] * 2
        assert all(r["memory"]["weight_dtype"] == "float32" for r in status["replicas"])
    finally:
        ray_cluster.get([g.close.remote() for g in procs])
        mesh_down(cfg)


def test_a_gateway_that_dies_takes_nothing_else_and_a_new_one_attaches_without_reloading(model_dirs, ray_cluster):
    model = str(model_dirs["tiny-v3"])
    cfg = mesh_config(model, "ray", "gateway-deaths", gateway_timeout_s=3.0)
    prompts = random_prompts(272, [6, 11, 5], seed=3)
    with Engine.from_pretrained(model) as local:
        want = local.generate(prompts, max_new_tokens=24, stop_at_eos=False)
    procs = start_gateways(ray_cluster, cfg, 2)
    try:
        starts = replica_starts(cfg)
        survivor, victim = procs
        running = survivor.generate.remote(prompts * 4, 24)
        victim.generate.remote(prompts * 4, 24)
        time.sleep(1.0)  # both gateways decode
        ray_cluster.kill(victim, no_restart=True)  # the whole gateway process, mid-traffic
        assert ray_cluster.get(running) == want * 4  # the other gateway's requests are untouched
        wait_until(lambda: len(mesh_status(cfg, load=False)["gateways"]) == 1, 30,
                   "the mesh to detach the silent gateway")
        fresh = start_gateways(ray_cluster, cfg, 1)[0]
        procs = [survivor, fresh]
        assert ray_cluster.get(fresh.generate.remote(prompts, 24)) == want
        assert replica_starts(cfg) == starts  # no expert replica restarted or reloaded
    finally:
        for g in procs:
            try:
                ray_cluster.get(g.close.remote(), timeout=60)
            except Exception:
                pass
        mesh_down(cfg)


def test_the_control_actor_dying_stops_no_request_and_it_rebuilds_from_the_live_replicas(model_dirs, ray_cluster):
    model = str(model_dirs["tiny-v3"])
    cfg = mesh_config(model, "ray", "control-death")
    prompts = random_prompts(272, [6, 11, 5], seed=4)
    with Engine.from_pretrained(model) as local:
        want = local.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False)
    procs = start_gateways(ray_cluster, cfg, 2)
    try:
        starts = replica_starts(cfg)
        control = ray_cluster.get_actor(cfg.mesh.name, namespace=cfg.ray.namespace)
        runs = [g.generate.remote(prompts * 3, MAX_NEW_TOKENS) for g in procs]
        ray_cluster.kill(control, no_restart=False)  # Ray restarts it (detached, max_restarts=-1)
        for tokens in ray_cluster.get(runs):
            assert tokens == want * 3
        wait_until(lambda: _rebuilt(cfg), 60, "the restarted control actor to answer with its state rebuilt")
        status = mesh_status(cfg, load=False)
        assert status["rebuilds"] == 1 and replica_starts(cfg) == starts
        wait_until(lambda: len(mesh_status(cfg, load=False)["gateways"]) == 2, 30,
                   "both gateways to re-register with their heartbeats")
        assert ray_cluster.get([g.generate.remote(prompts) for g in procs]) == [want, want]
    finally:
        ray_cluster.get([g.close.remote() for g in procs])
        mesh_down(cfg)


def _rebuilt(cfg: DeploymentConfig) -> bool:
    try:
        return mesh_status(cfg, load=False)["rebuilds"] >= 1
    except Exception:
        return False


def test_a_replacement_and_scaling_are_decided_once_and_every_gateway_follows(model_dirs, ray_cluster):
    from router_service.placement import Placement

    model = str(model_dirs["tiny-v3"])
    cfg = mesh_config(model, "ray", "changes")
    prompts = random_prompts(272, [6, 11, 5, 8], seed=5)
    with Engine.from_pretrained(model) as local:
        want = local.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False)
    procs = start_gateways(ray_cluster, cfg, 2)
    failures: list[BaseException] = []
    results: list[list[list[int]]] = []
    stop = threading.Event()

    def traffic(g) -> None:
        while not stop.is_set():
            try:
                results.append(ray_cluster.get(g.generate.remote(prompts)))
            except BaseException as exc:  # noqa: BLE001 - every failure counts
                failures.append(exc)

    threads = [threading.Thread(target=traffic, args=(g,), daemon=True) for g in procs]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 2 or failures, 120, "traffic on both gateways")
        # Re-place (experts move between groups): gateway 0 asks, the mesh stages once, gateway 1 follows at its
        # own step boundary.
        moved = Placement.from_device_lists([[0, 1, 2, 3, 4, 5, 6, 8, 9], [7, 10, 11, 12, 13, 14, 15]], 16, version=1)
        ray_cluster.get(procs[0].apply_placement.remote(moved))
        wait_until(lambda: ray_cluster.get([g.placement_version.remote() for g in procs]) == [1, 1], 30,
                   "both gateways to switch to placement version 1")
        wait_until(lambda: mesh_status(cfg, load=False)["released"], 30, "the old copies to be released")
        infos = ray_cluster.get([ray_cluster.get_actor(r["name"], namespace=cfg.ray.namespace).describe.remote()
                                 for r in mesh_status(cfg, load=False)["replicas"]])
        assert [i["versions"] for i in infos] == [[1], [1]]
        # Scale group 0 to 2 replicas and back, from gateway 1; both gateways see it.
        assert len(ray_cluster.get(procs[1].scale.remote(0, 2))) == 2
        before = len(results)
        wait_until(lambda: len(results) >= before + 2 or failures, 120, "traffic on the scaled mesh")
        assert len(ray_cluster.get(procs[0].scale.remote(0, 1))) == 1
        before = len(results)
        wait_until(lambda: len(results) >= before + 2 or failures, 120, "traffic after the scale-down")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        ray_cluster.get([g.close.remote() for g in procs])
        mesh_down(cfg)
    assert failures == []
    assert results and all(r == want for r in results)


def test_mesh_up_status_down_and_refusals(model_dirs, ray_cluster):
    model = str(model_dirs["tiny-v3"])
    cfg = mesh_config(model, "grpc", "lifecycle")
    up = mesh_up(cfg)
    assert up["name"] == "lifecycle" and len(up["replicas"]) == 2 and up["gateways"] == {}
    with Engine.from_config(cfg) as engine:  # attaches: starts nothing
        assert replica_starts(cfg) == {r["name"]: r["started_at"] for r in up["replicas"]}
        assert len(mesh_status(cfg)["gateways"]) == 1
        assert engine.generate([[5, 6, 7]], max_new_tokens=3, stop_at_eos=False)
    assert mesh_status(cfg, load=False)["gateways"] == {}  # detached; the mesh runs on
    other = DeploymentConfig(model=model, backend="grpc", devices=4, mesh=cfg.mesh)
    with pytest.raises(DeploymentConfigError, match=r"devices=4: mesh 'lifecycle' serves devices=2"):
        Engine.from_config(other)
    down = mesh_down(cfg)
    assert down["name"] == "lifecycle"
    with pytest.raises(MeshNotRunning, match="mesh.name='lifecycle': no such mesh"):
        mesh_status(cfg)
    no_start = mesh_config(model, "grpc", "lifecycle", start=False)
    with pytest.raises(MeshNotRunning, match="mesh up"):
        Engine.from_config(no_start)
    # nothing left behind: the names are free again
    assert not [a for a in ray_cluster.util.list_named_actors(all_namespaces=True) if "lifecycle" in a["name"]]


def test_the_mesh_commands_start_show_scale_and_stop_a_mesh(model_dirs, ray_cluster, tmp_path, capsys):
    import json

    from deploy.cli import main

    config = tmp_path / "mesh.yaml"
    config.write_text(f"model: {model_dirs['tiny-v3']}\nbackend: ray\ndevices: 2\nmesh:\n  name: from-the-cli\n")
    address = ["--config", str(config), "--address", ray_cluster.get_runtime_context().gcs_address]
    assert main(["mesh", "up", *address]) == 0
    assert "mesh 'from-the-cli'" in capsys.readouterr().out
    assert main(["mesh", "scale", "--group", "1", "--replicas", "2", *address]) == 0
    assert "group 1: 2 replicas" in capsys.readouterr().out
    assert main(["mesh", "status", "--json", *address]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [r["group"] for r in status["replicas"]] == [0, 1, 1] and status["gateways"] == {}
    assert all(r["load"]["calls"] == 0 for r in status["replicas"])
    assert main(["mesh", "scale", "--group", "2", "--replicas", "2", *address]) == 2
    assert "--group 2: expected 0..1" in capsys.readouterr().err
    assert main(["mesh", "down", *address]) == 0
    assert "stopped (3 replicas" in capsys.readouterr().out
    assert main(["mesh", "status", *address]) == 2
    assert "no such mesh" in capsys.readouterr().err


def test_an_eplb_proposal_from_the_gateways_joint_load_is_staged_once_and_both_gateways_follow(model_dirs,
                                                                                               ray_cluster):
    from gateway.config import BalanceConfig

    model = str(model_dirs["tiny-v3"])
    stamp = time.monotonic_ns()
    cfg = DeploymentConfig(model=model, backend="ray", devices=4, mesh=MeshConfig(name=f"eplb-{stamp}"),
                           balancing=BalanceConfig(mode="eplb", window_tokens=60, redundant_slots=4,
                                                   rebalance_every_windows=1, min_gain=0.0, name=f"router-{stamp}"))
    prompts = random_prompts(272, [24, 9, 17, 30], seed=41)
    with Engine.from_pretrained(model) as local:
        want = local.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False)
    procs = start_gateways(ray_cluster, cfg, 2)
    try:
        for _ in range(4):  # windows close on both gateways' load; the service proposes; the mesh stages it once
            assert ray_cluster.get([g.generate.remote(prompts) for g in procs]) == [want, want]
            ray_cluster.get([g.rearranged.remote() for g in procs])
        wait_until(lambda: len({ray_cluster.get(g.placement_version.remote()) for g in procs}) == 1, 30,
                   "both gateways on one placement version")
        (v0, switched0, failed0), (v1, switched1, failed1) = ray_cluster.get([g.rearranged.remote() for g in procs])
        assert v0 == v1 >= 1 and failed0 == failed1 == 0 and switched0 >= 1 and switched1 >= 1
        wait_until(lambda: mesh_status(cfg, load=False)["released"], 30, "the old copies to be released")
        status = mesh_status(cfg, load=False)
        assert status["placement_version"] == v0
        infos = ray_cluster.get([ray_cluster.get_actor(r["name"], namespace=cfg.ray.namespace).describe.remote()
                                 for r in status["replicas"]])
        assert all(i["versions"] == [v0] for i in infos)
        assert ray_cluster.get([g.generate.remote(prompts) for g in procs]) == [want, want]
    finally:
        ray_cluster.get([g.close.remote() for g in procs])
        mesh_down(cfg)


def test_a_gateway_whose_proposal_of_a_version_lost_follows_the_one_the_mesh_staged(model_dirs, ray_cluster):
    """Two gateways propose different placements of the same version: the mesh stages the first, and the second
    gateway dispatches with the mesh's (not its own, which no replica holds), its answers unchanged."""
    model = str(model_dirs["tiny-v3"])
    cfg = mesh_config(model, "ray", f"race-{time.monotonic_ns()}")
    spec = ModelSpec.from_dir(model)
    prompts = random_prompts(272, [11, 6, 19], seed=43)
    with Engine.from_pretrained(model) as local:
        want = local.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, stop_at_eos=False)
    base = Placement.contiguous(spec.n_routed_experts, 2)
    lists = [base.experts_on(d) for d in (0, 1)]
    first = Placement.from_device_lists(lists, spec.n_routed_experts, {layer: lists[::-1] for layer in
                                                                        spec.moe_layers}, spec.moe_layers, version=1)
    second = Placement.from_device_lists(lists, spec.n_routed_experts, {spec.moe_layers[0]: lists[::-1]},
                                         spec.moe_layers, version=1)  # version 1 too, another layout
    a, b = start_gateways(ray_cluster, cfg, 2)
    try:
        ray_cluster.get(b.pause_following.remote())
        ray_cluster.get(a.apply_placement.remote(first))
        ray_cluster.get(b.apply_after_taking_the_offer_of.remote(1, second))
        assert ray_cluster.get([a.placement.remote(), b.placement.remote()]) == [first.to_dict()] * 2
        assert ray_cluster.get([g.generate.remote(prompts) for g in (a, b)]) == [want, want]
    finally:
        ray_cluster.get([g.close.remote() for g in (a, b)])
        mesh_down(cfg)
