"""The shipped Serve, cluster-launcher and KubeRay files parse and point at things that exist."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from gateway.config import DeploymentConfig

ROOT = Path(__file__).parents[2]


def test_serve_config_imports_the_builder_and_names_a_valid_deployment():
    serve_cfg = yaml.safe_load((ROOT / "deploy/serve/expertmesh.yaml").read_text())
    app = serve_cfg["applications"][0]
    module, func = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    DeploymentConfig.from_yaml(ROOT / app["args"]["config"])


def test_kuberay_service_embeds_a_serve_config_and_gpu_worker_group():
    svc = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    assert svc["kind"] == "RayService"
    inner = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert inner["applications"][0]["import_path"] == "deploy.serve_app:build"
    shipped = {p.name for p in (ROOT / "deploy/configs").iterdir()}
    assert Path(inner["applications"][0]["args"]["config"]).name in shipped
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_cluster_launcher_has_a_gpu_worker_pool():
    cluster = yaml.safe_load((ROOT / "deploy/cluster/ray-cluster.yaml").read_text())
    assert cluster["available_node_types"]["expert-gpu"]["resources"]["GPU"] >= 1
    assert cluster["head_node_type"] in cluster["available_node_types"]
