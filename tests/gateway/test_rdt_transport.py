"""Ray Direct Transport over Gloo (CPU): the same expert outputs as in-process, through the same dispatcher."""

from __future__ import annotations

import pytest
import ray
import torch

from gateway.config import DeploymentConfig, RayConfig
from gateway.dispatch.groups import build_dispatcher
from gateway.dispatch.rdt_transport import RdtHost, pick_tensor_transport
from model_core.spec import ModelSpec
from router_service.placement import Placement

DispatchHost = ray.remote(max_concurrency=4)(RdtHost)


def batch(spec: ModelSpec, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(spec.n_routed_experts, generator=gen)[: spec.top_k] for _ in range(n)])
    return (spec.moe_layers[-1], torch.randn(n, spec.hidden_size, generator=gen), ids,
            torch.rand(n, spec.top_k, generator=gen))


def test_auto_picks_the_transport_from_where_tensors_live():
    assert pick_tensor_transport("auto", torch.device("cpu"), shares_one_gpu=False) == "gloo"
    assert pick_tensor_transport("auto", torch.device("cuda", 0), shares_one_gpu=True) == "cuda_ipc"
    assert pick_tensor_transport("auto", torch.device("cuda", 0), shares_one_gpu=False) == "nccl"
    with pytest.raises(ValueError, match="rpc.tensor_transport='nccl': does not carry cpu tensors"):
        pick_tensor_transport("nccl", torch.device("cpu"), shares_one_gpu=False)
    with pytest.raises(ValueError, match="rpc.tensor_transport='ib'"):
        pick_tensor_transport("ib", torch.device("cpu"), shares_one_gpu=False)


@pytest.mark.slow
@pytest.mark.parametrize("preset, devices, replicas", [("tiny-v3", 2, 1), ("tiny-v2-group", 4, 1), ("tiny-v3", 1, 2)])
def test_gloo_rdt_gives_the_in_process_outputs(preset, devices, replicas, model_dirs, ray_cluster):
    path = str(model_dirs[preset])
    spec = ModelSpec.from_dir(path)
    local = build_dispatcher(DeploymentConfig(model=path, devices=devices), spec,
                             Placement.contiguous(spec.n_routed_experts, devices))
    host = DispatchHost.remote()
    try:
        cfg = DeploymentConfig(model=path, backend="ray", devices=devices, replicas=replicas,
                               ray=RayConfig(namespace="rdt-tests"))
        ray_cluster.get(host.start.remote(cfg))
        for seed, n in enumerate([1, 7, 40, 3]):
            b = batch(spec, n, seed)
            want = local.dispatch(*b).wait()
            for over in ("rdt", "numpy"):
                got = ray_cluster.get(host.dispatch.remote(*b, over=over), timeout=120)
                assert (got - want).abs().max().item() < 1e-6
        counters = ray_cluster.get(host.counters.remote())
        assert counters["group_builds"] == 1 and counters["retries"] == 0
        assert counters["inflight"] == [0] and counters["staged"] == 0 and counters["landed"] == 0
    finally:
        ray_cluster.get(host.close.remote())
        local.close()
