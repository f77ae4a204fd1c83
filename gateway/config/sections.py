"""The plain sections of a deployment: `ray:` (where expert groups run), `scheduler:` and `cache:`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gateway.config.errors import DeploymentConfigError


@dataclass(frozen=True)
class RayConfig:
    """Where expert groups run. address None = start Ray embedded in this process (or use RAY_ADDRESS)."""

    address: str | None = None
    device_resource: str = "cpu"  # "gpu": one {"GPU": gpus_per_group} bundle per expert group
    cpus_per_group: float = 1.0
    gpus_per_group: float = 1.0  # with device_resource 'gpu': a share of one GPU (0.25: four groups per GPU) or N
    namespace: str = "expertmesh"


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
