"""The gateway device: configuration and its checks, the CLI flag, the Serve replica's GPU, the host copies, and
(on a GPU) the whole per-token path on CUDA against the CPU float32 reference."""

from __future__ import annotations

import dataclasses
import importlib
import threading
import types

import numpy as np
import pytest
import torch

from deploy.cli import build_parser, main
from deploy.commands.model import deployment_from_args
from gateway import Engine
from gateway.config import DeploymentConfig, DeploymentConfigError
from protos.codec import numpy_to_tensor, proto_to_tensor, tensor_to_numpy, tensor_to_proto
from tests.conftest import TINY_PRESETS, random_prompts


# -- configuration ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("setting", "named"), [
    ({"gateway_device": "tpu"}, "gateway_device='tpu'"),
    ({"gateway_device": "cuda:x"}, "gateway_device='cuda:x'"),
    ({"gateway_device": "CUDA"}, "gateway_device='CUDA'"),
    ({"gateway_device": 0}, "gateway_device=0"),
    ({"ray": {"gpus_per_group": 0}}, "ray.gpus_per_group=0"),
    ({"ray": {"gpus_per_group": -0.5}}, "ray.gpus_per_group=-0.5"),
    ({"ray": {"gpus_per_group": 1.5}}, "ray.gpus_per_group=1.5"),
    ({"ray": {"gpus_per_group": "1"}}, "ray.gpus_per_group='1'"),
])
def test_bad_device_settings_are_refused_naming_the_field(setting, named):
    with pytest.raises(DeploymentConfigError, match=named.replace("(", r"\(")):
        DeploymentConfig.from_dict({"model": "m", **setting})


@pytest.mark.parametrize("gpus", [0.25, 0.5, 1, 1.0, 2, 4])
def test_gpu_shares_and_whole_gpus_are_accepted(gpus):
    assert DeploymentConfig.from_dict({"model": "m", "ray": {"gpus_per_group": gpus}}).ray.gpus_per_group == gpus


def test_gateway_device_resolves_auto_from_cuda_availability(monkeypatch):
    cfg = DeploymentConfig(model="m")
    assert cfg.gateway_device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg.gateway_torch_device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cfg.gateway_torch_device == torch.device("cuda")
    assert DeploymentConfig(model="m", gateway_device="cpu").gateway_torch_device == torch.device("cpu")
    assert DeploymentConfig(model="m", gateway_device="cuda:1").gateway_torch_device == torch.device("cuda", 1)


def test_a_gpu_the_process_cannot_see_is_refused_before_loading(model_dirs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeploymentConfigError, match="gateway_device='cuda'.*CUDA is not available"):
        Engine.from_pretrained(model_dirs["tiny-v3"], gateway_device="cuda")


# -- CLI and Serve ------------------------------------------------------------------------------------------
def test_cli_gateway_device_flag_reaches_the_config(tmp_path):
    args = build_parser().parse_args(["generate", "--model", str(tmp_path), "--prompt-ids", "1,2",
                                      "--gateway-device", "cpu"])
    assert deployment_from_args(args).gateway_device == "cpu"
    args = build_parser().parse_args(["generate", "--model", str(tmp_path), "--prompt-ids", "1,2"])
    assert deployment_from_args(args).gateway_device == "auto"


def test_cli_reports_a_bad_gateway_device_by_name(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1", "--gateway-device", "gpu"]) == 2
    assert "gateway_device='gpu'" in capsys.readouterr().err


@pytest.mark.parametrize(("device", "cuda_visible", "gpus"), [
    ("cuda", False, 1), ("cuda:0", True, 1), ("cpu", True, 0), ("auto", True, 1), ("auto", False, 0),
])
def test_serve_build_asks_ray_for_a_gpu_only_for_a_cuda_gateway(device, cuda_visible, gpus, monkeypatch, model_dirs):
    from deploy.serve_app import build, gateway_actor_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_visible)
    config = DeploymentConfig.from_dict({"model": str(model_dirs["tiny-v3"]), "gateway_device": device})
    assert gateway_actor_options(config) == {"num_cpus": 0, "num_gpus": gpus}
    if gpus == 0:  # build() checks a CUDA gateway against the Ray it runs in (test_serve.py); these bind as is
        app = build({"deployment": {"model": str(model_dirs["tiny-v3"]), "gateway_device": device}})  # binds only
        assert app._bound_deployment.ray_actor_options == {"num_cpus": 0, "num_gpus": 0}


def test_expert_group_actors_ask_for_their_gpu_share(monkeypatch):
    """The replica pool's bundle and actor both carry ray.gpus_per_group (Ray itself is faked: nothing starts)."""
    from gateway.dispatch.replica_pool import ExpertGroupPool
    from router_service.placement import Placement

    bundles, actor_options = [], []

    class FakeActorClass:
        def options(self, **kw):
            actor_options.append(kw)
            return self

        def remote(self, *args, **kw):
            return types.SimpleNamespace(describe=types.SimpleNamespace(remote=lambda: "ref"))

    fake_ray = types.SimpleNamespace(
        remote=lambda concurrency_groups: (lambda cls: FakeActorClass()),
        get=lambda refs, timeout: [{"grpc_address": "", "started_at": 0.0} for _ in refs],
        exceptions=types.SimpleNamespace(GetTimeoutError=TimeoutError))
    pg_module = importlib.import_module("ray.util.placement_group")  # ray.util.placement_group is also a function
    monkeypatch.setattr(pg_module, "placement_group", lambda b, **named: bundles.append(b) or object())
    monkeypatch.setattr("ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy",
                        lambda pg, placement_group_bundle_index: None)
    for resource, share, want in (("gpu", 0.25, 0.25), ("gpu", 2, 2), ("cpu", 0.25, 0)):
        cfg = DeploymentConfig(model="m", backend="ray", devices=2)
        cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, device_resource=resource,
                                                               gpus_per_group=share))
        pool = ExpertGroupPool.__new__(ExpertGroupPool)
        pool._ray, pool.cfg, pool.placement, pool.actor_class = fake_ray, cfg, Placement.contiguous(4, 2), object
        pool.groups, pool._next_index, pool.deployment_id, pool.detached = {0: [], 1: []}, 0, "t", False
        pool._lock, pool.placement_lock = threading.Lock(), threading.RLock()
        bundles.clear()
        actor_options.clear()
        pool._add([0, 1])
        assert [b[0].get("GPU", 0) for b in bundles] == [want, want]
        assert [o["num_gpus"] for o in actor_options] == [want, want]


# -- host copies --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_codec_views_host_tensors_without_a_copy(dtype):
    t = torch.arange(12).view(3, 4).to(dtype)
    array = tensor_to_numpy(t)
    assert np.shares_memory(array, t.view(torch.int16).numpy() if dtype == torch.bfloat16 else t.numpy())
    assert torch.equal(numpy_to_tensor(array, dtype), t)
    assert torch.equal(proto_to_tensor(tensor_to_proto(t)), t)


# -- the engine on the CPU, named or by default ---------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="'auto' resolves to CUDA here: the GPU tests below cover it")
def test_an_explicit_cpu_gateway_equals_the_default_one(model_dirs):
    prompts = random_prompts(200, [7, 3], seed=4)
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as default, \
            Engine.from_pretrained(model_dirs["tiny-v3"], gateway_device="cpu") as cpu:
        assert cpu.device == default.device == torch.device("cpu")
        for a, b in zip(default.logits(prompts), cpu.logits(prompts), strict=True):
            assert torch.equal(a, b)
        for kw in ({}, {"temperature": 1.2, "top_p": 0.9, "seed": 5}):
            assert default.generate(prompts, max_new_tokens=6, stop_at_eos=False, **kw) == \
                cpu.generate(prompts, max_new_tokens=6, stop_at_eos=False, **kw)
        assert cpu.routing_summary.rows() == default.routing_summary.rows()


def test_sampling_refuses_a_generator_on_another_device():
    from gateway.model.sampling import sample

    logits = torch.randn(1, 8)
    meta = types.SimpleNamespace(device=torch.device("cuda"))  # a stand-in: no CUDA generator without a GPU
    with pytest.raises(ValueError, match="generator.device=cuda"):
        sample(logits, temperature=1.0, generator=meta)
    assert sample(logits, 0.0, generator=meta).tolist() == logits.argmax(-1).tolist()  # greedy ignores it


# -- on a GPU ---------------------------------------------------------------------------------------------
@pytest.fixture
def exact_cuda_matmul():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("exact_cuda_matmul")
@pytest.mark.parametrize("top_m", [None, 1])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_cuda_gateway_with_cuda_local_groups_matches_the_cpu_reference(preset, top_m, model_dirs):
    kw = {"devices": 2, "top_m_devices": top_m}
    prompts = random_prompts(200, [9, 4, 13], seed=2)
    with Engine.from_pretrained(model_dirs[preset], gateway_device="cpu", **kw) as cpu, \
            Engine.from_pretrained(model_dirs[preset], gateway_device="cuda", **kw) as gpu:
        assert gpu.model.embed.is_cuda and gpu.model.new_cache().device.type == "cuda"
        assert all(g.torch_device.type == "cuda" and g.kernel == "triton" for g in gpu.backend.transport.groups)
        for ours, ref in zip(gpu.logits(prompts), cpu.logits(prompts), strict=True):
            assert ours.device.type == "cpu"
            assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4
        assert gpu.generate(prompts, max_new_tokens=8, stop_at_eos=False) == \
            cpu.generate(prompts, max_new_tokens=8, stop_at_eos=False)
        assert gpu.routing_summary.rows() == cpu.routing_summary.rows()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_seeded_sampling_is_reproducible_and_traces_reach_the_host(model_dirs):
    prompt = random_prompts(200, [6], seed=9)
    with Engine.from_pretrained(model_dirs["tiny-v3"], gateway_device="cuda") as gpu:
        a = gpu.generate(prompt, max_new_tokens=8, temperature=1.3, seed=11, stop_at_eos=False)
        b = gpu.generate(prompt, max_new_tokens=8, temperature=1.3, seed=11, stop_at_eos=False)
        assert a == b
        trace = gpu.routing_trace(gpu.last_request_ids[0])
        assert trace.ids.device.type == "cpu" and trace.ids.shape[0] == 6 + 7
        assert gpu.routing_summary.table()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_codec_copies_device_tensors_to_the_host(dtype):
    t = torch.arange(12, device="cuda").view(3, 4).to(dtype)
    assert torch.equal(numpy_to_tensor(tensor_to_numpy(t), dtype), t.cpu())
    assert torch.equal(proto_to_tensor(tensor_to_proto(t)), t.cpu())
