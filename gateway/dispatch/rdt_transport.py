"""Ray Direct Transport: a layer's rows and partial outputs move actor to actor over Gloo, NCCL or CUDA IPC.

Ray moves such tensors only between actors, and (for the collective transports) only for the process that
created the collective group (docs/gpu-data-path.md). So this transport runs inside the actor that hosts the
gateway: that actor mixes in `RdtEndpoint`, whose `rdt_stage_*` methods hand a staged tensor to Ray and whose
`rdt_land` receives an expert group's reply. One call per device and layer is three actor tasks:
stage (gateway) → forward (expert group) → land (gateway); the tensors never enter the object store.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from typing import Any

import ray
import torch

from gateway.config import DeploymentConfig
from gateway.dispatch.dispatcher import Dispatcher
from gateway.dispatch.replica_pool import ExpertGroupPool
from gateway.dispatch.transports import (
    ExpertReply,
    RayTransport,
    _Call,
    _describe,
    _ReplicaDown,
    _ReplicaSlow,
    _ReplicaTransport,
)
from model_core.spec import ModelSpec
from protos.codec import tensor_to_numpy
from router_service.placement import Placement

logger = logging.getLogger(__name__)

TENSOR_TRANSPORTS = ("gloo", "nccl", "cuda_ipc")
GROUP_BACKENDS = {"gloo": "torch_gloo", "nccl": "nccl"}  # CUDA IPC is one-sided: no collective group


def pick_tensor_transport(setting: str, device: torch.device, shares_one_gpu: bool) -> str:
    """`rpc.tensor_transport`: 'auto' picks Gloo for CPU tensors, CUDA IPC when the gateway and every expert
    group share one GPU, NCCL between GPUs; anything else must be one of TENSOR_TRANSPORTS and fit the device."""
    if setting == "auto":
        if device.type != "cuda":
            return "gloo"
        return "cuda_ipc" if shares_one_gpu else "nccl"
    if setting not in TENSOR_TRANSPORTS:
        raise ValueError(f"rpc.tensor_transport={setting!r}: expected 'auto' or one of {list(TENSOR_TRANSPORTS)}")
    if (setting == "gloo") != (device.type == "cpu"):
        raise ValueError(f"rpc.tensor_transport={setting!r}: does not carry {device.type} tensors "
                         f"(gloo is for CPU tensors, nccl and cuda_ipc for CUDA tensors)")
    return setting


class RdtEndpoint:
    """Mixin for the actor hosting the gateway (it needs `max_concurrency >= 2`: its stage and land tasks run
    while its engine thread waits). Tensors are staged under a key, handed to Ray by `rdt_stage_<transport>`,
    and replies land in `_rdt_landed` under the same key."""

    def _rdt_init(self) -> None:
        self._rdt_staged: dict[int, torch.Tensor] = {}
        self._rdt_landed: dict[int, tuple] = {}

    @ray.method(tensor_transport="gloo")
    def rdt_stage_gloo(self, key: int) -> torch.Tensor:
        return self._rdt_staged.pop(key)

    @ray.method(tensor_transport="nccl")
    def rdt_stage_nccl(self, key: int) -> torch.Tensor:
        return self._rdt_staged.pop(key)

    @ray.method(tensor_transport="cuda_ipc")
    def rdt_stage_cuda_ipc(self, key: int) -> torch.Tensor:
        return self._rdt_staged.pop(key)

    def rdt_land(self, key: int, reply: tuple) -> None:
        """reply: (output [n, H], tokens_per_expert, compute_ms) as the expert group returned it."""
        self._rdt_landed[key] = reply


class RdtTransport(_ReplicaTransport):
    """Replicas, retries and timeouts as the `ray` transport (shared base class); only the bytes move differently.

    The collective group spans the hosting actor and every replica of the pool; when the pool's replicas change
    (scaling, eviction) or an actor of the group dies (which destroys the group), it is created again before
    the next call."""

    def __init__(self, pool, host: RdtEndpoint, transport: str, timeout_s: float, deadline_s: float) -> None:
        if transport not in TENSOR_TRANSPORTS:
            raise ValueError(f"transport={transport!r}: expected one of {list(TENSOR_TRANSPORTS)}")
        super().__init__(pool, timeout_s, deadline_s)
        self.host, self.transport = host, transport
        self.me = ray.get_runtime_context().current_actor  # raises outside an actor: RDT needs one
        self._keys = itertools.count()
        self._group: Any = None
        self._members: tuple[str, ...] = ()
        self._broken = False  # an actor of the group died: destroy the group and make it again
        self.group_builds = 0

    # -- the collective group -------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        backend = GROUP_BACKENDS.get(self.transport)
        if backend is None:
            return
        replicas = [r for d in sorted(self.pool.groups) for r in self.pool.live(d)]
        members = tuple(r.name for r in replicas)
        if self._group is not None and members == self._members and not self._broken:
            return
        self._drop_group()
        from ray.experimental.collective import create_collective_group

        self._group = create_collective_group([self.me, *(r.actor for r in replicas)], backend=backend)
        self._members = members
        self.group_builds += 1
        logger.info("collective group (%s) over the gateway and %d expert replicas", backend, len(replicas))

    def _drop_group(self) -> None:
        group, self._group, self._members, self._broken = self._group, None, (), False
        if group is not None:
            from ray.experimental.collective import destroy_collective_group

            try:
                destroy_collective_group(group)
            except Exception as exc:  # a group an actor's death already broke
                logger.info("destroying the collective group: %s", _describe(exc))

    # -- calls ------------------------------------------------------------------------------------------
    def send(self, device, layer, hidden, ids, weights, carrier=None):
        args = (layer, hidden.contiguous(), tensor_to_numpy(ids), tensor_to_numpy(weights), carrier)
        return self._submit(device, args, hidden.dtype)

    def _call(self, replica, args):
        self._ensure_group()
        layer, hidden, ids, weights, carrier = args
        key = next(self._keys)
        self.host._rdt_staged[key] = hidden
        staged = getattr(self.me, f"rdt_stage_{self.transport}").remote(key)
        out = getattr(replica.actor, f"forward_rdt_{self.transport}").remote(layer, staged, ids, weights, carrier)
        return self.me.rdt_land.remote(key, out), key

    def _wait(self, call: _Call) -> ExpertReply:
        landed, key = call.handle
        try:
            ray.get(landed, timeout=self.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self._forget(key)
            self._broken = True  # an actor's death breaks the group: make it again before the next call
            raise _ReplicaDown(_describe(exc)) from None
        except ray.exceptions.GetTimeoutError:
            raise _ReplicaSlow(f"no reply in {self.timeout_s}s") from None
        except ray.exceptions.RayTaskError as exc:
            self._forget(key)
            if isinstance(exc.cause, ray.exceptions.RayActorError):
                self._broken = True
                raise _ReplicaDown(_describe(exc.cause)) from None
            raise
        output, counts, ms = self.host._rdt_landed.pop(key)
        return ExpertReply(output, counts, ms)

    def _forget(self, key: int) -> None:
        self.host._rdt_staged.pop(key, None)
        self.host._rdt_landed.pop(key, None)

    def _finished(self, call: _Call) -> bool:
        landed, key = call.handle
        if ray.wait([landed], timeout=0)[0]:
            self._forget(key)  # a reply nobody waits for any more
            return True
        return False

    def _cancel(self, call: _Call) -> None:
        pass  # a started actor task runs to its end; _finished drops its reply

    def _settle(self, calls: list[_Call], timeout_s: float) -> None:
        if calls:
            ray.wait([c.handle[0] for c in calls], num_returns=len(calls), timeout=timeout_s)

    def close(self) -> None:
        self._drop_group()
        super().close()


class RdtHost(RdtEndpoint):
    """An actor that owns the collective group and dispatches MoE layers over it: the piece the gateway's relay
    grows from (docs/gpu-data-path.md). `ray.remote(max_concurrency=4)(RdtHost)` makes the actor; `start` must
    run after construction (creating the group runs a task on this actor too). For comparison in the same
    process, `numpy` dispatches to the same replicas over plain Ray calls."""

    def __init__(self) -> None:
        self._rdt_init()
        self.rdt: Dispatcher | None = None
        self.numpy: Dispatcher | None = None

    def start(self, config: DeploymentConfig, transport: str = "gloo") -> None:
        spec = ModelSpec.from_dir(config.model)
        pool = ExpertGroupPool(config, Placement.contiguous(spec.n_routed_experts, config.devices))
        rpc = config.rpc
        rdt = RdtTransport(pool, self, transport, rpc.timeout_s, rpc.replica_deadline_s)
        self.rdt = Dispatcher(pool.placement, rdt, pool=pool, on_close=pool.shutdown)
        self.numpy = Dispatcher(pool.placement, RayTransport(pool, rpc.timeout_s, rpc.replica_deadline_s), pool=pool)

    def dispatch(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 over: str = "rdt") -> torch.Tensor:
        """The routed-expert output [T, H] of one layer, over RDT or ('numpy') plain Ray calls."""
        return (self.rdt if over == "rdt" else self.numpy).dispatch(layer, hidden, ids, weights).wait()

    def time_layer(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   runs: int) -> dict[str, float]:
        """Median ms of one layer's round trip over each path, alternating them (drift hits both alike)."""
        times: dict[str, list[float]] = {"numpy": [], "rdt": []}
        for over in times:  # warm-up
            self.dispatch(layer, hidden, ids, weights, over)
        for _ in range(runs):
            for over, samples in times.items():
                started = time.perf_counter()
                self.dispatch(layer, hidden, ids, weights, over)
                samples.append((time.perf_counter() - started) * 1e3)
        return {over: statistics.median(samples) for over, samples in times.items()}

    def counters(self) -> dict:
        t = self.rdt.transport
        return {"retries": t.retries, "group_builds": t.group_builds,
                "inflight": sorted(set(self.rdt.pool.inflight().values())), "staged": len(self._rdt_staged),
                "landed": len(self._rdt_landed)}

    def close(self) -> None:
        self.numpy.transport.close()
        self.rdt.close()
