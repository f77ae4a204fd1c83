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
from gateway.config.errors import DeploymentConfigError, check_choice
from gateway.config.sections import CacheConfig, RayConfig, SchedulerConfig
from model_core.compute_choices import KERNELS, MODEL_DTYPES
from model_core.half_matmul import MODES as HALF_MATMUL_MODES
from model_core.telemetry import TracingConfig
from model_core.yaml_file import read_yaml_mapping
from protos.codec import DTYPES
from router_service.bias import BalanceConfig

BACKENDS = ("local", "ray", "ray-dag", "ray-rdt", "grpc")
DEVICE_RESOURCES = ("cpu", "gpu")
GATEWAY_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class DeploymentConfig:
    """One deployment: the model, how experts are placed, and how the gateway reaches them."""

    model: str
    dtype: str = "float32"
    backend: str = "local"
    devices: int = 1
    placement: str = "contiguous"  # or a YAML/JSON file {devices: [[expert ids], ...]}
    replicas: int | list[int] = 1  # actors per device group: one number for all, or one per group
    top_m_devices: int | None = None  # None = the model's exact routing
    expert_kernel: str = "auto"  # auto: Triton on GPU, torch on CPU; 'triton' on CPU needs TRITON_INTERPRET=1
    half_matmul: str = "auto"  # bf16/fp16 on CPU: native | float32 (widened weights) | auto (float32 if not native)
    gateway_device: str = "auto"  # where the gateway's per-token path runs: auto | cpu | cuda | cuda:N
    ray: RayConfig = field(default_factory=RayConfig)
    rpc: RpcConfig = field(default_factory=RpcConfig)
    balancing: BalanceConfig = field(default_factory=BalanceConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    attention_kernel: str = "auto"  # decode attention: auto (Triton on CUDA, torch on CPU) | triton | torch
    server: ServerConfig = field(default_factory=ServerConfig)  # the HTTP API's key

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, MODEL_DTYPES)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("ray.device_resource", self.ray.device_resource, DEVICE_RESOURCES)
        check_choice("expert_kernel", self.expert_kernel, KERNELS)
        check_choice("half_matmul", self.half_matmul, HALF_MATMUL_MODES)
        check_choice("attention_kernel", self.attention_kernel, KERNELS)
        if not isinstance(self.gateway_device, str) or not GATEWAY_DEVICE.fullmatch(self.gateway_device):
            raise DeploymentConfigError(
                f"gateway_device={self.gateway_device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index)")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise DeploymentConfigError(f"devices={self.devices!r}: expected an integer >= 1")
        if self.top_m_devices is not None and (
            isinstance(self.top_m_devices, bool) or not isinstance(self.top_m_devices, int) or self.top_m_devices < 1
        ):
            raise DeploymentConfigError(f"top_m_devices={self.top_m_devices!r}: expected null or an integer >= 1")
        if not self.ray.cpus_per_group > 0:
            raise DeploymentConfigError(f"ray.cpus_per_group={self.ray.cpus_per_group}: expected > 0")
        gpus = self.ray.gpus_per_group
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not (
                0 < gpus <= 1 or (gpus >= 1 and float(gpus).is_integer())):
            # Ray schedules fractions of one GPU, or whole GPUs: 1.5 GPUs cannot be granted.
            raise DeploymentConfigError(f"ray.gpus_per_group={gpus!r}: expected a share of one GPU (0 < x <= 1) "
                                        "or a whole number of GPUs")
        per_group = self.replicas if isinstance(self.replicas, list) else [self.replicas] * self.devices
        if len(per_group) != self.devices or any(isinstance(r, bool) or not isinstance(r, int) or r < 1
                                                 for r in per_group):
            raise DeploymentConfigError(
                f"replicas={self.replicas!r}: expected an integer >= 1 or a list of {self.devices} such integers")
        if self.backend == "ray-dag" and self.scheduler.micro_batches != 1:
            raise DeploymentConfigError(f"scheduler.micro_batches={self.scheduler.micro_batches}: backend 'ray-dag' "
                                        "runs one layer's compiled graph at a time; use backend 'ray' for ping-pong "
                                        "micro-batches")
        if self.backend == "ray-dag" and any(r != 1 for r in per_group):
            raise DeploymentConfigError(f"replicas={self.replicas!r}: backend 'ray-dag' (a compiled graph) runs "
                                        "exactly one replica per group; use backend 'ray' for replicas")
        if not self.rpc.replica_deadline_s > 0:
            raise DeploymentConfigError(f"rpc.replica_deadline_s={self.rpc.replica_deadline_s}: expected > 0")
        if not self.rpc.timeout_s > 0:
            raise DeploymentConfigError(f"rpc.timeout_s={self.rpc.timeout_s}: expected > 0")
        if not isinstance(self.rpc.max_message_mb, int) or self.rpc.max_message_mb < 1:
            raise DeploymentConfigError(f"rpc.max_message_mb={self.rpc.max_message_mb!r}: expected an integer >= 1")

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
        for name, kind in _sections().items():
            value = raw.pop(name, None) or {}
            nested[name] = kind(**_known(name, value, kind))
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
        raise DeploymentConfigError(f"{section}: expected a mapping, got {raw!r}")
    names = {f.name for f in dataclasses.fields(kind)} - skip
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = "" if section == "deployment" else f"{section}."
        raise DeploymentConfigError(f"{prefix}{unknown[0]}: unknown setting (expected one of {sorted(names)})")
    return dict(raw)
