"""Deployment config: YAML files parse into typed objects; unknown or bad settings are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from deploy.cli import build_parser
from deploy.commands.model import deployment_from_args
from gateway.config import (
    BACKENDS,
    CacheConfig,
    DeploymentConfig,
    DeploymentConfigError,
    RayConfig,
    SchedulerConfig,
    ServerConfig,
)
from model_core.compute_choices import KERNELS, MODEL_DTYPES
from model_core.half_matmul import MODES as HALF_MATMUL_MODES

CONFIGS = sorted((Path(__file__).parents[2] / "deploy" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_deployment_files_parse(path):
    cfg = DeploymentConfig.from_yaml(path)
    assert cfg.backend in BACKENDS and cfg.devices >= 1


def test_flags_override_the_file_and_reach_sections(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("model: m\nbackend: ray\ndevices: 2\nray: {cpus_per_group: 0.5}\n")
    cfg = DeploymentConfig.from_yaml(f).with_overrides(devices=4, top_m_devices=None, **{"ray.address": "auto"})
    assert (cfg.devices, cfg.top_m_devices, cfg.ray.address, cfg.ray.cpus_per_group) == (4, None, "auto", 0.5)


def test_ray_address_comes_from_the_environment_when_not_configured(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert DeploymentConfig(model="m").ray_address == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert DeploymentConfig(model="m").ray_address is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("backend: ray\n", "model: missing"),
        ("model: m\nbakend: ray\n", "bakend: unknown setting"),
        ("model: m\nray: {adress: x}\n", r"ray\.adress: unknown setting"),
        ("model: m\nbackend: mpi\n", "backend='mpi'"),
        ("model: m\ndevices: 0\n", "devices=0"),
        ("model: m\ntop_m_devices: 0\n", "top_m_devices=0"),
        ("model: m\nray: {device_resource: tpu}\n", "ray.device_resource='tpu'"),
        ("model: m\nrpc: {timeout_s: 0}\n", r"rpc\.timeout_s=0"),
        ("model: m\nbackend: ray-dag\ndevices: 2\nreplicas: [1, 2]\n", "exactly one replica per group"),
        ("model: m\ndevices: 2\nreplicas: [1]\n", r"replicas=\[1\]: expected an integer >= 1 or a list of 2"),
        ("model: m\ncache: {blok_size: 8}\n", r"cache\.blok_size: unknown setting"),
        ("model: m\nscheduler: {max_running: 0}\n", r"scheduler\.max_running=0: expected an integer >= 1"),
        ("model: m\ndtype: float64\n", r"dtype='float64': expected one of \['float32', 'bfloat16', 'float16'\]"),
        ("model: m\nexpert_kernel: cuda\n", "expert_kernel='cuda'"),
        ("model: m\nattention_kernel: flash\n", "attention_kernel='flash'"),
        ("- just\n- a list\n", "bad.yaml: expected deployment file to hold a mapping of settings, got a list"),
        ("", "bad.yaml: expected deployment file to hold a mapping of settings, got an empty file"),
        ("model: [unclosed\n", "bad.yaml: cannot read deployment file \\(not valid YAML"),
    ],
)
def test_bad_files_name_the_setting(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(DeploymentConfigError, match=message):
        DeploymentConfig.from_yaml(f)


def test_a_missing_deployment_file_is_named():
    with pytest.raises(DeploymentConfigError, match=r"nowhere\.yaml: cannot read deployment file \(No such file"):
        DeploymentConfig.from_yaml("/nowhere.yaml")


def test_every_backend_is_accepted_and_an_unknown_one_is_refused_with_the_list():
    assert len(BACKENDS) == 5
    for backend in BACKENDS:
        assert DeploymentConfig(model="m", backend=backend).backend == backend
    with pytest.raises(DeploymentConfigError, match=r"backend='mpi': expected one of \['local', 'ray', 'ray-dag', "
                                                    r"'ray-rdt', 'grpc'\]"):
        DeploymentConfig(model="m", backend="mpi")


def test_the_cli_offers_exactly_the_configs_backends_dtypes_kernels_and_half_matmul_modes():
    parser = build_parser()

    def generate(*flags: str) -> DeploymentConfig:
        return deployment_from_args(parser.parse_args(["generate", "--model", "m", "--prompt-ids", "1", *flags]))

    for backend in BACKENDS:
        assert generate("--backend", backend).backend == backend
    for dtype in MODEL_DTYPES:
        assert generate("--dtype", dtype).torch_dtype == getattr(torch, dtype)
    for kernel in KERNELS:
        assert generate("--expert-kernel", kernel).expert_kernel == kernel
    for mode in HALF_MATMUL_MODES:
        assert generate("--half-matmul", mode).half_matmul == mode
    for bad in (["--backend", "mpi"], ["--dtype", "float64"], ["--expert-kernel", "cuda"], ["--half-matmul", "fp8"]):
        with pytest.raises(SystemExit):
            generate(*bad)


def test_overrides_reach_every_section_and_an_unknown_section_is_named():
    sections = {f.name for f in dataclasses.fields(DeploymentConfig) if dataclasses.is_dataclass(f.default_factory)}
    assert sections == {"ray", "rpc", "balancing", "tracing", "scheduler", "cache", "server"}
    cfg = DeploymentConfig(model="m").with_overrides(**{
        "ray.namespace": "ns", "rpc.timeout_s": 5.0, "balancing.gamma": 0.5, "tracing.routing_trace_dir": "/t",
        "scheduler.max_running": 2, "cache.block_size": 8, "server.max_request_bytes": 2048})
    assert (cfg.ray.namespace, cfg.rpc.timeout_s, cfg.balancing.gamma, cfg.tracing.routing_trace_dir,
            cfg.scheduler.max_running, cfg.cache.block_size, cfg.server.max_request_bytes) == (
        "ns", 5.0, 0.5, "/t", 2, 8, 2048)
    assert (cfg.ray, cfg.scheduler, cfg.cache, cfg.server) == (
        RayConfig(namespace="ns"), SchedulerConfig(max_running=2), CacheConfig(block_size=8),
        ServerConfig(max_request_bytes=2048))
    with pytest.raises(DeploymentConfigError, match=r"nope\.x: unknown setting"):
        DeploymentConfig(model="m").with_overrides(**{"nope.x": 1})


def test_the_deployment_file_parses_every_section_into_its_dataclass(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("model: m\nscheduler: {max_running: 3}\ncache: {block_size: 4, prefix_caching: false}\n"
                 "server: {max_request_bytes: 4096}\n")
    cfg = DeploymentConfig.from_yaml(f)
    assert cfg.scheduler == SchedulerConfig(max_running=3)
    assert cfg.cache == CacheConfig(block_size=4, prefix_caching=False)
    assert cfg.server == ServerConfig(max_request_bytes=4096)

