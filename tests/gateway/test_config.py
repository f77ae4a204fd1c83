"""Deployment config: YAML files parse into typed objects; unknown or bad settings are named."""

from __future__ import annotations

import dataclasses
import math
import typing
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
        # issue 23: wrong types and non-finite numbers were TypeError / OverflowError tracebacks, 2048 MB crashed
        # the expert actor, `ray: 0` was read as no section
        ("model: m\nray: {cpus_per_group: x}\n", r"ray\.cpus_per_group='x': expected a number in \(0, 1024\]"),
        ("model: m\nrpc: {timeout_s: 30s}\n", r"rpc\.timeout_s='30s': expected a number of seconds > 0"),
        ("model: 123\n", "model=123: expected a string"),
        ("model: m\nplacement: ''\n", "placement='': expected 'contiguous' or a placement file"),
        ("model: m\nray: {cpus_per_group: .inf}\n", r"ray\.cpus_per_group=inf: expected a finite number in \(0, "),
        ("model: m\nrpc: {timeout_s: .nan}\n", r"rpc\.timeout_s=nan: expected a finite number of seconds > 0"),
        ("model: m\nrpc: {max_message_mb: 2048}\n",
         r"rpc\.max_message_mb=2048: expected an integer in \[1, 2047\] \(gRPC's message limit is under 2 GiB\)"),
        ("model: m\nray: 0\n", "ray: expected a mapping of settings, got 0"),
        ("model: m\nscheduler: []\n", r"scheduler: expected a mapping of settings, got \[\]"),
        ("model: m\ndevices: true\n", r"devices=True: expected an integer in \[1, 4096\]"),
        ("model: m\ncache: {memory_fraction: true}\n", r"cache\.memory_fraction=True: expected a number"),
        ("model: m\nreplicas: [1, 2.0]\n", r"replicas=\[1, 2\.0\]: expected an integer in \[1, 1024\] or a list"),
        ("model: m\ntop_m_devices: 18446744073709551616\n", "top_m_devices=18446744073709551616: expected an integer"),
        ("model: m\ntracing: {sample_ratio: .inf}\n", r"tracing\.sample_ratio=inf: expected a finite number in \[0, "),
        ("model: m\nbalancing: {gamma: '0.1'}\n", r"balancing\.gamma='0\.1': expected a number > 0"),
        ("model: m\nscheduler: {micro_batches: true}\n", r"scheduler\.micro_batches=True: expected one of \[1, 2"),
        ("model: m\n1: x\nz: y\n", "1: unknown setting"),
        ("model: m\nx: [1\n", r"bad\.yaml: cannot read deployment file \(not valid YAML: line 3, column 1: expected"),
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
    assert sections == {"ray", "mesh", "rpc", "balancing", "tracing", "scheduler", "cache", "server"}
    cfg = DeploymentConfig(model="m").with_overrides(**{
        "ray.namespace": "ns", "rpc.timeout_s": 5.0, "balancing.gamma": 0.5, "tracing.routing_trace_dir": "/t",
        "scheduler.max_running": 2, "cache.block_size": 8, "server.max_request_bytes": 2048, "mesh.name": "m1"})
    assert (cfg.ray.namespace, cfg.rpc.timeout_s, cfg.balancing.gamma, cfg.tracing.routing_trace_dir,
            cfg.scheduler.max_running, cfg.cache.block_size, cfg.server.max_request_bytes, cfg.mesh.name) == (
        "ns", 5.0, 0.5, "/t", 2, 8, 2048, "m1")
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



def _settings() -> list[tuple[str, type, dataclasses.Field]]:
    """(the setting's dotted name, the dataclass declaring it, its field) for every setting of a deployment file."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(DeploymentConfig)
                if dataclasses.is_dataclass(f.default_factory)}
    out = [(f.name, DeploymentConfig, f) for f in dataclasses.fields(DeploymentConfig) if f.name not in sections]
    out += [(f"{name}.{f.name}", kind, f) for name, kind in sections.items() for f in dataclasses.fields(kind)]
    return out


def _raw(dotted: str, value: object) -> dict:
    section, _, name = dotted.rpartition(".")
    return {"model": "m", **({section: {name: value}} if section else {name: value})}


SETTINGS = _settings()


@pytest.mark.parametrize("dotted, kind, field", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_every_setting_refuses_a_wrong_type_naming_itself_and_what_it_expects(dotted, kind, field):
    """A mapping is no setting's type: every field is checked where the file is parsed (no TypeError later)."""
    with pytest.raises(DeploymentConfigError, match=rf"^{dotted}(={{'x': 1}})?: expected ") as info:
        DeploymentConfig.from_dict(_raw(dotted, {"x": 1}))
    if not field.repr:  # a secret: named, never shown
        assert "'x'" not in str(info.value)


NUMBERS = [(dotted, hint) for dotted, kind, f in SETTINGS
           for hint in [typing.get_type_hints(kind)[f.name]] if set(typing.get_args(hint) or (hint,)) & {int, float}]


@pytest.mark.parametrize("dotted, hint", NUMBERS, ids=[n[0] for n in NUMBERS])
def test_every_number_refuses_infinity_nan_bools_and_ints_beyond_64_bits(dotted, hint):
    too_big = 2**64 if int in (typing.get_args(hint) or (hint,)) else 10**400  # beyond int64 / beyond a float
    for bad in (math.inf, -math.inf, math.nan, True, too_big):
        with pytest.raises(DeploymentConfigError, match=rf"^{dotted}=.*: expected "):
            DeploymentConfig.from_dict(_raw(dotted, bad))
    assert len(NUMBERS) > 25  # the numbers of every section are here


def test_a_section_may_be_null_for_its_defaults():
    assert DeploymentConfig.from_dict({"model": "m", "ray": None, "rpc": None}).ray == RayConfig()


def test_an_unquoted_balancing_mode_off_reads_as_off(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("model: models/tiny-v3\nbalancing:\n  mode: off\n")  # YAML 1.1: off is false
    assert DeploymentConfig.from_yaml(f).balancing.mode == "off"


def test_the_mesh_section_is_checked_by_field():
    assert DeploymentConfig.from_dict({"model": "m", "mesh": {"name": "prod.mesh-1"}}).mesh.name == "prod.mesh-1"
    for raw, message in (
            ({"name": "two words"}, r"mesh.name='two words': expected 1-64 letters"),
            ({"name": "-lead"}, r"mesh.name='-lead'"),
            ({"name": "x" * 65}, r"mesh.name='x{65}'"),
            ({"gateway_timeout_s": 0}, r"mesh.gateway_timeout_s=0"),
            ({"merge": "yes"}, r"mesh.merge"),
            ({"nme": "a"}, r"mesh.nme: unknown setting")):
        with pytest.raises(DeploymentConfigError, match=message):
            DeploymentConfig.from_dict({"model": "m", "mesh": raw})
    with pytest.raises(DeploymentConfigError, match=r"mesh.name='m': backend 'ray-dag' .* cannot share a mesh"):
        DeploymentConfig.from_dict({"model": "m", "backend": "ray-dag", "mesh": {"name": "m"}})
