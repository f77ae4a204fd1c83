"""The plain sections of a deployment: `ray:` (where expert groups run), `mesh:` (the expert mesh gateways attach
to), `scheduler:` and `cache:`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from gateway.config.errors import DeploymentConfigError
from model_core.settings import check_settings, setting

DEVICE_RESOURCES = ("cpu", "gpu")
MESH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class RayConfig:
    """Where expert groups run. address None = start Ray embedded in this process (or use RAY_ADDRESS)."""

    address: str | None = None
    device_resource: str = setting("cpu", choices=DEVICE_RESOURCES)  # "gpu": a {"GPU": gpus_per_group} bundle each
    cpus_per_group: float = setting(1.0, gt=0, le=1024)
    gpus_per_group: float = setting(1.0, gt=0, le=1024)  # device_resource 'gpu': a share of one GPU (0.25) or N
    namespace: str = "expertmesh"

    def __post_init__(self) -> None:
        check_settings(self, "ray", DeploymentConfigError)
        gpus = self.gpus_per_group
        if not (gpus <= 1 or float(gpus).is_integer()):
            # Ray schedules fractions of one GPU, or whole GPUs: 1.5 GPUs cannot be granted.
            raise DeploymentConfigError(f"ray.gpus_per_group={gpus!r}: expected a share of one GPU (0 < x <= 1) "
                                        "or a whole number of GPUs")


@dataclass(frozen=True)
class MeshConfig:
    """The `mesh:` section: the expert mesh (groups, replicas, placement, router) that gateways attach to, for the
    ray, ray-rdt and grpc backends. A named mesh is a long-lived service of its own: the first gateway (or
    `expertmesh mesh up`) starts it, every gateway naming it attaches, and `expertmesh mesh down` stops it. With no
    name, a gateway starts a private mesh and stops it when it closes (the embedded default)."""

    name: str | None = None  # the control actor's name in ray.namespace
    start: bool = True  # start the named mesh when it is not running (False: attaching to a missing one is an error)
    merge: bool = True  # a replica merges calls for one layer that wait together (several gateways) into one pass
    # stop the mesh when its last gateway detaches (a closed gateway, not a dead one): `expertmesh serve` sets it for
    # the mesh it names itself, so that removing the app removes its experts
    stop_with_last_gateway: bool = False
    gateway_timeout_s: float = setting(15.0, gt=0, le=3600, unit="seconds")  # silent this long: detached
    attach_timeout_s: float = setting(300.0, gt=0, unit="seconds")  # waiting for the mesh's groups to load

    def __post_init__(self) -> None:
        check_settings(self, "mesh", DeploymentConfigError)
        if self.name is not None and not MESH_NAME.fullmatch(self.name):
            raise DeploymentConfigError(f"mesh.name={self.name!r}: expected 1-64 letters, digits, '-', '_' or '.', "
                                        "starting with a letter or digit")


@dataclass(frozen=True)
class SchedulerConfig:
    """The `scheduler:` section: the budgets continuous batching schedules each step under."""

    max_batch_tokens: int = setting(8192, ge=1)  # tokens per forward step (one per decoding sequence + prefills)
    max_prefill_tokens: int = setting(512, ge=1)  # prompt tokens prefilled per step: longer prompts are chunked
    max_running: int = setting(64, ge=1)  # sequences decoding at once
    max_waiting: int = setting(256, ge=1)  # queued requests before new ones are refused
    request_timeout_s: float = setting(600.0, gt=0, unit="seconds")  # still unanswered after this: cancelled (504)
    # 2: ping-pong (one half's expert hop overlaps the other's attention); 'auto'
    micro_batches: int | str = setting(1, choices=(1, 2, "auto"))

    def __post_init__(self) -> None:
        check_settings(self, "scheduler", DeploymentConfigError)


@dataclass(frozen=True)
class CacheConfig:
    """The `cache:` section: how big the latent-cache pool is and how it is cut into blocks."""

    block_size: int = setting(16, ge=1)  # tokens per block (every layer's c_kv + k_pe for those tokens)
    max_tokens: int | None = setting(None, ge=1)  # pool size in tokens; None: memory_fraction of free memory
    memory_fraction: float = setting(0.1, gt=0, le=0.95)  # used when max_tokens is None: share of free memory
    prefix_caching: bool = True  # reuse full blocks of an identical prefix (hash-chained) across requests

    def __post_init__(self) -> None:
        check_settings(self, "cache", DeploymentConfigError)

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
