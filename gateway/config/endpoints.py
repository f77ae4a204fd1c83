"""The network sections: `rpc:` (how the gateway calls expert groups: deadlines, TLS, token) and `server:` (the HTTP
API's keys and body limit, and how many gateway replicas serve it). Files they name are read and checked where the
config is built."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.errors import DeploymentConfigError
from model_core.settings import check_settings, setting
from protos.channel import RpcSecurity

TENSOR_TRANSPORTS = ("gloo", "nccl", "cuda_ipc")  # backend ray-rdt: how tensors travel (Ray Direct Transport)


@dataclass(frozen=True)
class RpcConfig:
    """How the gateway calls expert groups; the gRPC server's bind address, TLS files and shared token.

    Files are read where the gateway starts and their bytes sent to the expert actors, so other hosts need
    no copies. Errors name the field, never a token or a key.
    """

    timeout_s: float = setting(30.0, gt=0, unit="seconds")  # deadline on every dispatch call
    # how long a group may have no answering replica before its calls fail
    replica_deadline_s: float = setting(60.0, gt=0, unit="seconds")
    max_message_mb: int = setting(256, ge=1, le=2047, why="gRPC's message limit is under 2 GiB")  # both sides
    bind: str | None = None  # None: the node's IP when joining a Ray cluster, else 127.0.0.1; "0.0.0.0" / "::": all
    tls_cert: str | None = None  # PEM server certificate (chain); with tls_key and tls_ca, gRPC runs over TLS
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_ca: str | None = None  # PEM CA bundle the gateway verifies the servers' certificate with
    tls_server_name: str | None = None  # the name tls_cert was issued to, when it does not list the node IPs
    token: str | None = field(default=None, repr=False)  # shared secret every ExpertService call must carry
    token_file: str | None = None  # or a file holding it (surrounding whitespace ignored); not both
    # backend ray-rdt: auto | gloo | nccl | cuda_ipc (auto: from where tensors live)
    tensor_transport: str = setting("auto", choices=("auto", *TENSOR_TRANSPORTS))

    def __post_init__(self) -> None:
        check_settings(self, "rpc", DeploymentConfigError)
        if self.bind is not None and (not self.bind.strip() or any(c.isspace() for c in self.bind)
                                      or _has_port(self.bind)):
            raise DeploymentConfigError(f"rpc.bind={self.bind!r}: expected null, an IP address or a host name "
                                        "(no port; '0.0.0.0' or '::' binds every interface)")
        tls = {"rpc.tls_cert": self.tls_cert, "rpc.tls_key": self.tls_key, "rpc.tls_ca": self.tls_ca}
        missing = [name for name, value in tls.items() if value is None]
        if 0 < len(missing) < len(tls):
            raise DeploymentConfigError(f"{missing[0]}: missing (TLS needs rpc.tls_cert, rpc.tls_key and rpc.tls_ca)")
        if self.tls_server_name is not None and (missing or not self.tls_server_name):
            raise DeploymentConfigError(f"rpc.tls_server_name={self.tls_server_name!r}: expected a name, and only "
                                        "with rpc.tls_cert, rpc.tls_key and rpc.tls_ca")
        if self.token is not None and self.token_file is not None:
            raise DeploymentConfigError("rpc.token, rpc.token_file: set one, not both")
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
    that /admin/* needs (no admin key: /admin/* is off), the largest request body it reads, and its gateways.

    Each key inline or in a file (read where the gateway starts, surrounding whitespace ignored), not both;
    neither: its environment variable (EXPERTMESH_API_KEY, EXPERTMESH_ADMIN_KEY); none: the API is open, the
    admin routes are off. Errors name the field, never the key.

    Gateways: `replicas` Serve replicas of the gateway, each its own engine (scheduler, latent cache, prefix cache);
    or, with max_replicas set, Serve's autoscaling between min_replicas and max_replicas, aiming at
    target_ongoing_requests HTTP requests in flight per gateway. A gateway on CUDA asks Ray for `gpus_per_gateway`
    of a GPU: a fraction lets several gateways share one.
    """

    api_key: str | None = field(default=None, repr=False)
    api_key_file: str | None = None
    admin_key: str | None = field(default=None, repr=False)
    admin_key_file: str | None = None
    max_request_bytes: int = setting(4 << 20, ge=1024)  # a larger body gets 413 before it is parsed
    replicas: int = setting(1, ge=1, le=1024)  # gateway replicas (Ray Serve's num_replicas)
    # Serve's autoscaling of the gateways instead (its autoscaling_config): on while max_replicas is set
    max_replicas: int | None = setting(None, ge=1, le=1024)
    min_replicas: int | None = setting(None, ge=1, le=1024,  # null: 1
                                       why="from zero, a request would wait for a gateway to start its engine")
    target_ongoing_requests: float | None = setting(None, gt=0)  # null: Serve's default, 2
    gpus_per_gateway: float = setting(1.0, gt=0, le=1, why="a gateway runs on one GPU, which it sees as cuda:0")

    def __post_init__(self) -> None:
        check_settings(self, "server", DeploymentConfigError)
        if self.replicas > 1 and self.autoscaled:
            raise DeploymentConfigError(f"server.replicas={self.replicas}, server.max_replicas={self.max_replicas}: "
                                        "set one, not both (a fixed number of gateways, or autoscaling between "
                                        "min_replicas and max_replicas)")
        if not self.autoscaled and (self.min_replicas is not None or self.target_ongoing_requests is not None):
            named = "min_replicas" if self.min_replicas is not None else "target_ongoing_requests"
            raise DeploymentConfigError(f"server.max_replicas: missing (server.{named} is an autoscaling setting; "
                                        "autoscaling runs between min_replicas and max_replicas)")
        if self.autoscaled and self.max_replicas < self.fewest_gateways:
            raise DeploymentConfigError(f"server.max_replicas={self.max_replicas}: expected an integer >= "
                                        f"server.min_replicas={self.min_replicas}")
        for kind in ("api_key", "admin_key"):
            if getattr(self, kind) is not None and getattr(self, f"{kind}_file") is not None:
                raise DeploymentConfigError(f"server.{kind}, server.{kind}_file: set one, not both")
            self._resolve(kind, environ={})  # the file exists and holds a usable key

    @property
    def autoscaled(self) -> bool:
        """Serve scales the gateways (max_replicas is set) instead of running `replicas` of them."""
        return self.max_replicas is not None

    @property
    def fewest_gateways(self) -> int:
        """The gateways that run at the least: replicas, or min_replicas (default 1) when autoscaled."""
        return (self.min_replicas or 1) if self.autoscaled else self.replicas

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
