"""The whole deployment: the model, how experts are placed, how the gateway reaches them; the YAML file and
CLI flags, validated once at the edge."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gateway.config.endpoints import RpcConfig, ServerConfig
from gateway.config.errors import DeploymentConfigError
from gateway.config.sections import CacheConfig, MeshConfig, RayConfig, SchedulerConfig
from model_core.compute_choices import KERNELS, MODEL_DTYPES, QUANTIZATIONS
from model_core.half_matmul import MODES as HALF_MATMUL_MODES
from model_core.settings import SettingError, check_settings, setting
from model_core.telemetry import TracingConfig
from model_core.yaml_file import read_yaml_mapping
from protos.codec import DTYPES
from router_service.bias import BalanceConfig

BACKENDS = ("local", "ray", "ray-dag", "ray-rdt", "grpc")
MESH_BACKENDS = ("ray", "ray-rdt", "grpc")  # the backends whose gateways attach to an expert mesh
GATEWAY_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class DeploymentConfig:
    """One deployment: the model, how experts are placed, and how the gateway reaches them."""

    model: str  # the checkpoint directory
    dtype: str = setting("float32", choices=MODEL_DTYPES)
    backend: str = setting("local", choices=BACKENDS)
    devices: int = setting(1, ge=1, le=4096)  # expert groups
    placement: str = "contiguous"  # or a YAML/JSON file {devices: [[expert ids], ...]}
    replicas: int | list[int] = setting(1, ge=1, le=1024)  # actors per device group: one for all, or one per group
    top_m_devices: int | None = setting(None, ge=1)  # None = the model's exact routing
    # auto: Triton on GPU, torch on CPU; 'triton' on CPU needs TRITON_INTERPRET=1
    expert_kernel: str = setting("auto", choices=KERNELS)
    # bf16/fp16 on CPU: native | float32 (widened weights) | auto (float32 if not native)
    half_matmul: str = setting("auto", choices=HALF_MATMUL_MODES)
    # routed experts of a block-wise FP8 checkpoint: fp8 (kept FP8 with their scales) | none (widened on read) |
    # auto (fp8 when the checkpoint is FP8)
    quantization: str = setting("auto", choices=QUANTIZATIONS)
    gateway_device: str = "auto"  # where the gateway's per-token path runs: auto | cpu | cuda | cuda:N
    ray: RayConfig = field(default_factory=RayConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    rpc: RpcConfig = field(default_factory=RpcConfig)
    balancing: BalanceConfig = field(default_factory=BalanceConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # decode attention: auto (Triton on CUDA, torch on CPU) | triton | torch
    attention_kernel: str = setting("auto", choices=KERNELS)
    server: ServerConfig = field(default_factory=ServerConfig)  # the HTTP API's key

    def __post_init__(self) -> None:
        check_settings(self, "", DeploymentConfigError)
        for name, kind in _sections().items():
            if not isinstance(getattr(self, name), kind):
                got = type(getattr(self, name)).__name__
                raise DeploymentConfigError(f"{name}: expected a {kind.__name__}, got {got}")
        if not self.model:
            raise DeploymentConfigError("model='': expected a checkpoint directory")
        if not self.placement:
            raise DeploymentConfigError("placement='': expected 'contiguous' or a placement file")
        if not GATEWAY_DEVICE.fullmatch(self.gateway_device):
            raise DeploymentConfigError(
                f"gateway_device={self.gateway_device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index)")
        per_group = self.replicas if isinstance(self.replicas, list) else [self.replicas]
        if isinstance(self.replicas, list) and len(self.replicas) != self.devices:
            raise DeploymentConfigError(
                f"replicas={self.replicas!r}: expected an integer >= 1 or a list of {self.devices} such integers")
        if self.backend == "ray-dag" and self.scheduler.micro_batches != 1:
            raise DeploymentConfigError(f"scheduler.micro_batches={self.scheduler.micro_batches}: backend 'ray-dag' "
                                        "runs one layer's compiled graph at a time; use backend 'ray' for ping-pong "
                                        "micro-batches")
        if self.backend == "ray-dag" and self.mesh.name is not None:
            raise DeploymentConfigError(f"mesh.name={self.mesh.name!r}: backend 'ray-dag' (one compiled graph over "
                                        "the groups) cannot share a mesh; use backend 'ray', 'ray-rdt' or 'grpc'")
        if self.backend == "ray-dag" and any(r != 1 for r in per_group):
            raise DeploymentConfigError(f"replicas={self.replicas!r}: backend 'ray-dag' (a compiled graph) runs "
                                        "exactly one replica per group; use backend 'ray' for replicas")

    def embedded_ray_cpus(self) -> int:
        """Logical CPUs for an embedded Ray: room for every replica twice over (so groups can scale up), plus
        the gateway. Logical CPUs only reserve slots; the OS shares the real cores."""
        replicas = sum(self.replicas_of(d) for d in range(self.devices))
        return max(os.cpu_count() or 1, math.ceil(2 * replicas * self.ray.cpus_per_group) + 2)

    def replicas_of(self, device: int) -> int:
        return self.replicas[device] if isinstance(self.replicas, list) else self.replicas

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]  # the wire's table: hidden states travel in the model's dtype

    @property
    def router_on_ray(self) -> bool:
        """Whether the router service runs as a named Ray actor (else in this process)."""
        where = self.balancing.service
        return where == "ray" or (where == "auto" and self.backend != "local")

    @property
    def expert_torch_device(self) -> str:
        """Where expert weights live: 'cuda' when expert groups get GPUs, else 'cpu'."""
        return "cuda" if self.ray.device_resource == "gpu" else "cpu"

    @property
    def gateway_torch_device(self) -> torch.device:
        """gateway_device resolved: 'auto' is cuda when this process sees a GPU, else cpu. Availability of an
        explicit 'cuda' is checked where the gateway starts (a driver without GPUs may describe a GPU replica)."""
        if self.gateway_device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.gateway_device)

    @property
    def ray_address(self) -> str | None:
        """The cluster to join: the config's address, else RAY_ADDRESS, else None (embedded)."""
        return self.ray.address or os.environ.get("RAY_ADDRESS") or None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeploymentConfig:
        """Build from a parsed YAML mapping; unknown keys are errors. Paths are taken as given (relative to cwd)."""
        if not isinstance(raw, dict):
            raise DeploymentConfigError(f"deployment: expected a mapping, got {type(raw).__name__}")
        raw = dict(raw)
        nested = {}
        try:
            for name, kind in _sections().items():
                value = raw.pop(name, None)  # a section is a mapping, or absent / null for its defaults
                nested[name] = kind(**_known(name, {} if value is None else value, kind))
        except SettingError as exc:  # the tracing and balancing sections (below the gateway) raise their own
            raise exc if isinstance(exc, DeploymentConfigError) else DeploymentConfigError(str(exc)) from None
        top = _known("deployment", raw, cls, skip=set(nested))
        if "model" not in top:
            raise DeploymentConfigError("model: missing (a checkpoint directory)")
        return cls(**top, **nested)

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploymentConfig:
        raw = read_deployment_yaml(path)
        try:
            return cls.from_dict(raw)
        except (ValueError, TypeError) as exc:
            raise DeploymentConfigError(f"{path}: {exc}") from None

    def with_overrides(self, **overrides: Any) -> DeploymentConfig:
        """Replace top-level fields (CLI flags); None values are ignored, 'ray.x' / 'rpc.x' reach sections."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
        for key, value in overrides.items():
            if value is None:
                continue
            section, _, name = key.partition(".")
            if name:
                if section not in nested:
                    raise DeploymentConfigError(f"{key}: unknown setting")
                nested[section][name] = value
            else:
                top[key] = value
        sections = {name: dataclasses.replace(getattr(self, name), **changes) for name, changes in nested.items()}
        return dataclasses.replace(self, **top, **sections)


def read_deployment_yaml(path: str | Path) -> dict[str, Any]:
    """A deployment file's raw mapping (DeploymentConfig.from_dict checks its settings)."""
    return read_yaml_mapping(path, "deployment file", DeploymentConfigError)


def _sections() -> dict[str, type]:
    """DeploymentConfig's sections (`ray:`, `rpc:`, ...), name -> dataclass: the fields whose default is a
    section dataclass, so a new section is declared once, as a field."""
    return {f.name: f.default_factory for f in dataclasses.fields(DeploymentConfig)
            if dataclasses.is_dataclass(f.default_factory)}


def _known(section: str, raw: Any, kind: type, skip: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise DeploymentConfigError(f"{section}: expected a mapping of settings, got {raw!r}")
    names = {f.name for f in dataclasses.fields(kind)} - skip
    unknown = sorted(set(raw) - names, key=str)
    if unknown:
        prefix = "" if section == "deployment" else f"{section}."
        raise DeploymentConfigError(f"{prefix}{unknown[0]}: unknown setting (expected one of {sorted(names)})")
    return dict(raw)
