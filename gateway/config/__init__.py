"""Typed deployment configuration (the YAML file and CLI flags), validated once at the edge; the bottom floor of the
gateway (it imports nothing from the gateway above it).

`deployment` holds DeploymentConfig and the top-level settings, `sections` the ray/mesh/scheduler/cache sections,
`endpoints` the rpc/server sections (files, TLS, keys), `errors` the error that names a setting.
"""

from gateway.config.deployment import BACKENDS, MESH_BACKENDS, DeploymentConfig, read_deployment_yaml
from gateway.config.endpoints import ADMIN_KEY_ENV, API_KEY_ENV, TENSOR_TRANSPORTS, RpcConfig, ServerConfig
from gateway.config.errors import DeploymentConfigError
from gateway.config.sections import CacheConfig, MeshConfig, RayConfig, SchedulerConfig
from model_core.telemetry import TracingConfig
from router_service.bias import BalanceConfig

__all__ = [
    "ADMIN_KEY_ENV",
    "API_KEY_ENV",
    "BACKENDS",
    "MESH_BACKENDS",
    "TENSOR_TRANSPORTS",
    "BalanceConfig",
    "CacheConfig",
    "DeploymentConfig",
    "DeploymentConfigError",
    "MeshConfig",
    "RayConfig",
    "RpcConfig",
    "SchedulerConfig",
    "ServerConfig",
    "TracingConfig",
    "read_deployment_yaml",
]
