"""Deployment config: YAML files parse into typed objects; unknown or bad settings are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import DeploymentConfig, DeploymentConfigError

CONFIGS = sorted((Path(__file__).parents[2] / "deploy" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_deployment_files_parse(path):
    cfg = DeploymentConfig.from_yaml(path)
    assert cfg.backend in ("local", "ray", "grpc") and cfg.devices >= 1


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
        ("- just\n- a list\n", "expected a mapping"),
        ("model: [unclosed\n", "cannot read deployment file"),
    ],
)
def test_bad_files_name_the_setting(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(DeploymentConfigError, match=message):
        DeploymentConfig.from_yaml(f)
