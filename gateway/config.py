"""Typed deployment configuration (the YAML file and CLI flags), validated once at the edge."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_core.compute_choices import KERNELS, MODEL_DTYPES
from model_core.half_matmul import MODES as HALF_MATMUL_MODES
from model_core.telemetry import TracingConfig
from model_core.yaml_file import read_yaml_mapping
from protos.channel import RpcSecurity
from protos.codec import DTYPES
from router_service.bias import BalanceConfig

BACKENDS = ("local", "ray", "ray-dag", "ray-rdt", "grpc")
TENSOR_TRANSPORTS = ("gloo", "nccl", "cuda_ipc")  # backend ray-rdt: how tensors travel (Ray Direct Transport)
DEVICE_RESOURCES = ("cpu", "gpu")
GATEWAY_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeploymentConfigError(ValueError):
    """A deployment setting is unknown or out of range; the message names it."""


@dataclass(frozen=True)
class SchedulerConfig:
    """The `scheduler:` section: the budgets continuous batching schedules each step under."""

    max_batch_tokens: int = 8192  # tokens per forward step (one per decoding sequence + prefill chunks)
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step: longer prompts are chunked across steps
    max_running: int = 64  # sequences decoding at once
    max_waiting: int = 256  # queued requests before new ones are refused
    request_timeout_s: float = 600.0  # an HTTP request still unanswered after this is cancelled (504)
    micro_batches: int | str = 1  # 2: ping-pong (one half's expert hop overlaps the other's attention); 'auto'

    def __post_init__(self) -> None:
        if self.micro_batches not in (1, 2, "auto") or isinstance(self.micro_batches, bool):
            raise DeploymentConfigError(f"scheduler.micro_batches={self.micro_batches!r}: expected 1, 2 or 'auto'")
        for name in ("max_batch_tokens", "max_prefill_tokens", "max_running", "max_waiting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeploymentConfigError(f"scheduler.{name}={value!r}: expected an integer >= 1")
        timeout = self.request_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise DeploymentConfigError(f"scheduler.request_timeout_s={timeout!r}: expected a number of seconds > 0")


@dataclass(frozen=True)
class CacheConfig:
    """The `cache:` section: how big the latent-cache pool is and how it is cut into blocks."""

    block_size: int = 16  # tokens per block (every layer's c_kv + k_pe for those tokens)
    max_tokens: int | None = None  # pool size in tokens; None: memory_fraction of the device's free memory
    memory_fraction: float = 0.1  # used when max_tokens is None: the share of free memory at startup
    prefix_caching: bool = True  # reuse full blocks of an identical prefix (hash-chained) across requests

    def __post_init__(self) -> None:
        for name in ("block_size", "max_tokens"):
            value = getattr(self, name)
            if value is None and name == "max_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeploymentConfigError(f"cache.{name}={value!r}: expected an integer >= 1")
        fraction = self.memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.95:
            raise DeploymentConfigError(f"cache.memory_fraction={fraction!r}: expected a number in (0, 0.95]")
        if not isinstance(self.prefix_caching, bool):
            raise DeploymentConfigError(f"cache.prefix_caching={self.prefix_caching!r}: expected true or false")

    def pool_tokens(self, bytes_per_token: int, device: torch.device, most_useful: int) -> int:
        """Tokens the pool holds: max_tokens, else memory_fraction of the device's free memory, capped at
        `most_useful` (no more than the engine could ever fill), at least one block."""
        if self.max_tokens is not None:
            return self.max_tokens
        tokens = int(_free_memory(device) * self.memory_fraction) // bytes_per_token
        return max(self.block_size, min(tokens, most_useful))


def _free_memory(device: torch.device) -> int:
    """Bytes free now on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class RayConfig:
    """Where expert groups run. address None = start Ray embedded in this process (or use RAY_ADDRESS)."""

    address: str | None = None
    device_resource: str = "cpu"  # "gpu": one {"GPU": gpus_per_group} bundle per expert group
    cpus_per_group: float = 1.0
    gpus_per_group: float = 1.0  # with device_resource 'gpu': a share of one GPU (0.25: four groups per GPU) or N
    namespace: str = "expertmesh"


@dataclass(frozen=True)
class RpcConfig:
    """How the gateway calls expert groups; the gRPC server's bind address, TLS files and shared token.

    Files are read where the gateway starts and their bytes sent to the expert actors, so other hosts need
    no copies. Errors name the field, never a token or a key.
    """

    timeout_s: float = 30.0  # deadline on every dispatch call
    replica_deadline_s: float = 60.0  # how long a group may have no answering replica before its calls fail
    max_message_mb: int = 256  # gRPC send/receive limit, both sides
    bind: str | None = None  # None: the node's IP when joining a Ray cluster, else 127.0.0.1; "0.0.0.0" / "::": all
    tls_cert: str | None = None  # PEM server certificate (chain); with tls_key and tls_ca, gRPC runs over TLS
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_ca: str | None = None  # PEM CA bundle the gateway verifies the servers' certificate with
    tls_server_name: str | None = None  # the name tls_cert was issued to, when it does not list the node IPs
    token: str | None = field(default=None, repr=False)  # shared secret every ExpertService call must carry
    token_file: str | None = None  # or a file holding it (surrounding whitespace ignored); not both
    tensor_transport: str = "auto"  # backend ray-rdt: auto | gloo | nccl | cuda_ipc (auto: from where tensors live)

    def __post_init__(self) -> None:
        _choice("rpc.tensor_transport", self.tensor_transport, ("auto", *TENSOR_TRANSPORTS))
        if self.bind is not None and (not isinstance(self.bind, str) or not self.bind.strip()
                                      or any(c.isspace() for c in self.bind) or _has_port(self.bind)):
            raise DeploymentConfigError(f"rpc.bind={self.bind!r}: expected null, an IP address or a host name "
                                        "(no port; '0.0.0.0' or '::' binds every interface)")
        tls = {"rpc.tls_cert": self.tls_cert, "rpc.tls_key": self.tls_key, "rpc.tls_ca": self.tls_ca}
        missing = [name for name, value in tls.items() if value is None]
        if 0 < len(missing) < len(tls):
            raise DeploymentConfigError(f"{missing[0]}: missing (TLS needs rpc.tls_cert, rpc.tls_key and rpc.tls_ca)")
        if self.tls_server_name is not None and (missing or not isinstance(self.tls_server_name, str)
                                                 or not self.tls_server_name):
            raise DeploymentConfigError(f"rpc.tls_server_name={self.tls_server_name!r}: expected a name, and only "
                                        "with rpc.tls_cert, rpc.tls_key and rpc.tls_ca")
        if self.token is not None and self.token_file is not None:
            raise DeploymentConfigError("rpc.token, rpc.token_file: set one, not both")
        if self.token is not None and not isinstance(self.token, str):
            raise DeploymentConfigError(f"rpc.token: expected a string, got {type(self.token).__name__}")
        self.security()  # the files exist, are readable and hold what they should

    def security(self) -> RpcSecurity:
        """The TLS material and token, read from their files now."""
        pem = {name: _read_file(f"rpc.{name}", getattr(self, name), marker)
               for name, marker in (("tls_cert", b"CERTIFICATE"), ("tls_key", b"PRIVATE KEY"),
                                    ("tls_ca", b"CERTIFICATE"))}
        token = self.token
        if self.token_file is not None:
            token = _read_file("rpc.token_file", self.token_file).decode("utf-8", errors="replace").strip()
        if token is not None and not _is_token(token):
            field_name = "rpc.token_file" if self.token_file is not None else "rpc.token"
            raise DeploymentConfigError(f"{field_name}: the token must be non-empty printable ASCII without spaces "
                                        "(it travels as gRPC metadata)")
        return RpcSecurity(**pem, tls_server_name=self.tls_server_name, token=token)


API_KEY_ENV = "EXPERTMESH_API_KEY"
ADMIN_KEY_ENV = "EXPERTMESH_ADMIN_KEY"


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server: the API key every /v1/* request must send as `Authorization: Bearer <key>`, the admin key
    that /admin/* needs (no admin key: /admin/* is off), and the largest request body it reads.

    Each key inline or in a file (read where the gateway starts, surrounding whitespace ignored), not both;
    neither: its environment variable (EXPERTMESH_API_KEY, EXPERTMESH_ADMIN_KEY); none: the API is open, the
    admin routes are off. Errors name the field, never the key.
    """

    api_key: str | None = field(default=None, repr=False)
    api_key_file: str | None = None
    admin_key: str | None = field(default=None, repr=False)
    admin_key_file: str | None = None
    max_request_bytes: int = 4 << 20  # a larger body gets 413 before it is parsed

    def __post_init__(self) -> None:
        for kind in ("api_key", "admin_key"):
            inline, path = getattr(self, kind), getattr(self, f"{kind}_file")
            if inline is not None and path is not None:
                raise DeploymentConfigError(f"server.{kind}, server.{kind}_file: set one, not both")
            if inline is not None and not isinstance(inline, str):
                raise DeploymentConfigError(f"server.{kind}: expected a string, got {type(inline).__name__}")
            self._resolve(kind, environ={})  # the file exists and holds a usable key
        limit = self.max_request_bytes
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1024:
            raise DeploymentConfigError(f"server.max_request_bytes={limit!r}: expected an integer >= 1024")

    def resolved_api_key(self, environ: Any = None) -> str | None:
        """The key in force: server.api_key, else server.api_key_file's content, else EXPERTMESH_API_KEY (from
        environ, default os.environ), else None (no key: the API is open)."""
        return self._resolve("api_key", environ)

    def resolved_admin_key(self, environ: Any = None) -> str | None:
        """The admin key: server.admin_key, its file, else EXPERTMESH_ADMIN_KEY; None: /admin/* is off."""
        return self._resolve("admin_key", environ)

    def _resolve(self, kind: str, environ: Any) -> str | None:
        environ = os.environ if environ is None else environ
        env = {"api_key": API_KEY_ENV, "admin_key": ADMIN_KEY_ENV}[kind]
        if getattr(self, f"{kind}_file") is not None:
            name = f"server.{kind}_file"
            key = _read_file(name, getattr(self, f"{kind}_file")).decode("utf-8", errors="replace").strip()
        elif getattr(self, kind) is not None:
            name, key = f"server.{kind}", getattr(self, kind)
        else:
            name, key = env, environ.get(env) or None
        if key is not None and not _is_token(key):
            what = "API key" if kind == "api_key" else "admin key"
            raise DeploymentConfigError(f"{name}: the {what} must be non-empty printable ASCII without spaces "
                                        "(clients send it in the Authorization header)")
        return key


def _has_port(host: str) -> bool:
    """'host:port' or '[v6]:port'; a bare IPv6 address has several colons and no brackets."""
    return host.startswith("[") or host.count(":") == 1


def _read_file(name: str, path: str | None, marker: bytes | None = None) -> bytes | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise DeploymentConfigError(f"{name}={path!r}: expected a file path")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DeploymentConfigError(f"{name}={path}: cannot read ({exc.strerror or exc})") from None
    if marker is not None and (b"-----BEGIN " not in data or marker not in data):
        raise DeploymentConfigError(f"{name}={path}: not a PEM file with a {marker.decode()}")
    return data


def _is_token(token: str) -> bool:
    return bool(token) and all(0x21 <= ord(c) <= 0x7E for c in token)


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
        _choice("dtype", self.dtype, MODEL_DTYPES)
        _choice("backend", self.backend, BACKENDS)
        _choice("ray.device_resource", self.ray.device_resource, DEVICE_RESOURCES)
        _choice("expert_kernel", self.expert_kernel, KERNELS)
        _choice("half_matmul", self.half_matmul, HALF_MATMUL_MODES)
        _choice("attention_kernel", self.attention_kernel, KERNELS)
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


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise DeploymentConfigError(f"{name}={value!r}: expected one of {list(allowed)}")


def _known(section: str, raw: Any, kind: type, skip: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise DeploymentConfigError(f"{section}: expected a mapping, got {raw!r}")
    names = {f.name for f in dataclasses.fields(kind)} - skip
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = "" if section == "deployment" else f"{section}."
        raise DeploymentConfigError(f"{prefix}{unknown[0]}: unknown setting (expected one of {sorted(names)})")
    return dict(raw)
