"""The dispatcher: one dispatch plan per MoE layer, every device's batch in flight at once, partial sums combined."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from gateway.dispatch.transports import ExpertCall, ExpertReply, Transport
from router_service.placement import Placement

# Shape legend: T = tokens in the layer, K = experts per token, H = hidden, n = rows sent to one device.


@dataclass(frozen=True)
class DeviceBatch:
    """What one expert group receives for one layer."""

    device: int
    rows: torch.Tensor  # [n] int64 token indices into the layer's batch
    ids: torch.Tensor  # [n, K] global expert ids, -1 where the expert lives on another device
    weights: torch.Tensor  # [n, K] float32

    def nbytes(self, hidden_size: int, hidden_itemsize: int) -> tuple[int, int]:
        """(bytes out, bytes back) of this batch (see batch_bytes)."""
        return batch_bytes(*self.ids.shape, hidden_size, hidden_itemsize, self.ids.element_size())

    @cached_property
    def pairs(self) -> int:
        """(token, expert) pairs computed there."""
        return int((self.ids >= 0).sum())

    @cached_property
    def experts_hit(self) -> int:
        """Distinct experts whose weights the group reads (one torch.unique, shared by the span and the log)."""
        return int(torch.unique(self.ids[self.ids >= 0]).numel())


def plan_dispatch(
    ids: torch.Tensor, weights: torch.Tensor, hosts: torch.Tensor, n_devices: int,
    token_devices: torch.Tensor | None = None,
) -> list[DeviceBatch]:
    """One batch per device that any token reaches; a token goes to a device once, with all its experts there.

    ids, weights: [T, K]; hosts: [E] expert -> device, or [E, C] the devices hosting each expert's copies (-1
    padded, see `choose_copies`); token_devices: [T, M] the devices top-M routing chose per token, or None ->
    batches in device order.
    """
    return split_by_device(ids, weights, pair_devices(ids, hosts, token_devices), n_devices)


def split_by_device(ids: torch.Tensor, weights: torch.Tensor, device_of: torch.Tensor,
                    n_devices: int) -> list[DeviceBatch]:
    """The device batches of a plan whose pairs go to device_of [T, K] (see plan_dispatch)."""
    batches = []
    for d in range(n_devices):
        here = device_of == d  # [T, K]
        rows = torch.nonzero(here.any(dim=1)).flatten()
        if rows.numel() == 0:
            continue
        batches.append(DeviceBatch(d, rows, torch.where(here[rows], ids[rows], -1), weights[rows]))
    return batches


def host_tables(placement: Placement,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The tables `plan_dispatch` reads for a placement: [E] expert -> device of the base map, and for each layer
    whose placement has copies or a layout of its own, [E, C] devices per expert. A layer dispatches with
    `hosts.get(layer, expert_device)`. The Dispatcher builds them once per placement; the planner's replay too."""
    expert_device = placement.device_tensor().to(device)
    hosts = {layer: placement.copy_table(layer).to(device) for layer, _ in placement.layers}
    return expert_device, hosts


def pair_devices(ids: torch.Tensor, hosts: torch.Tensor, token_devices: torch.Tensor | None = None) -> torch.Tensor:
    """[T, K] the device serving each (token, expert) pair: a lookup in an [E] (or [E, 1]) table, else the copy
    `choose_copies` picks. hosts must be on ids' device (the Dispatcher's)."""
    if hosts.dim() == 1 or hosts.shape[1] == 1:
        return hosts.view(hosts.shape[0])[ids]
    return choose_copies(ids, hosts, token_devices)


def choose_copies(ids: torch.Tensor, hosts: torch.Tensor, token_devices: torch.Tensor | None = None) -> torch.Tensor:
    """The device serving each (token, expert) pair: [T, K]. Every copy computes the same function, so the choice
    never changes a result; it only spreads the work. An expert's pairs take its copies in turn (the j-th pair
    of expert e in token order goes to copy j mod copies), so its tokens split evenly. With top-M routing a
    pair is served from a copy on one of its token's chosen devices where one exists.

    hosts: [E, C] devices hosting each expert, -1 padded; token_devices: [T, M] or None.
    """
    candidates = hosts[ids]  # [T, K, C]
    usable = candidates >= 0
    if token_devices is not None:
        on_chosen = (candidates[..., None] == token_devices[:, None, None, :]).any(dim=-1) & usable
        usable = torch.where(on_chosen.any(dim=-1, keepdim=True), on_chosen, usable)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    ranked = flat[order]
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=flat.device) - torch.searchsorted(ranked, ranked)
    pick = rank.view_as(ids) % usable.sum(dim=-1)  # [T, K]: which usable copy
    chosen = usable & (usable.cumsum(dim=-1) == (pick + 1)[..., None])  # exactly one per pair
    return candidates.masked_fill(~chosen, 0).sum(dim=-1)


def combine(n_tokens: int, hidden_size: int, batches: list[DeviceBatch], partials: list[torch.Tensor],
            dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Scatter-add each device's partial output back in token order (devices summed in device order), on the
    gateway's `device`. Partials from remote groups arrive as host tensors: each is copied to `device` once."""
    out = torch.zeros(n_tokens, hidden_size, dtype=dtype, device=device)
    for batch, partial in zip(batches, partials, strict=True):
        out.index_add_(0, batch.rows, partial.to(device, dtype))
    return out


def batch_bytes(rows: int, top_k: int, hidden_size: int, hidden_itemsize: int, id_itemsize: int = 8) -> tuple[int, int]:
    """(bytes out, bytes back) of one device batch: `rows` hidden rows, their [rows, top_k] expert ids and float32
    weights go out; the [rows, H] partial sums come back. DispatchStats counts with it, and so does the planner."""
    hidden = rows * hidden_size * hidden_itemsize
    return hidden + rows * top_k * (id_itemsize + 4), hidden


@dataclass(frozen=True)
class DeviceCall:
    """One device batch of a logged layer dispatch: what was sent, what the group computed, what it reported."""

    device: int
    rows: int
    pairs: int  # (token, expert) pairs computed there
    experts_hit: int  # distinct experts whose weights it read
    bytes_out: int
    bytes_back: int
    compute_ms: float  # the group's own compute time (ExpertReply)


@dataclass(frozen=True)
class LayerRecord:
    """One layer dispatch: its calls and the wall time from the plan to the combined output."""

    layer: int
    calls: tuple[DeviceCall, ...]
    seconds: float


class DispatchStats:
    """Counters per (layer, device): token rows sent, calls, bytes out and back (read from the plan's shapes);
    with `keep_layers(n)`, also the last n layer dispatches call by call (LayerRecord), for the planner's check."""

    def __init__(self, n_devices: int) -> None:
        self.layer_log: deque[LayerRecord] | None = None
        self.n_devices = n_devices
        self.tokens: dict[int, torch.Tensor] = {}
        self.calls = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.layers = 0  # layer dispatches completed
        self.wait_seconds = 0.0  # their wall time, send to combine
        self.blocked_seconds = 0.0  # the part the gateway spent blocked collecting replies (its idle time)

    def keep_layers(self, n: int) -> None:
        """Log the next layer dispatches call by call, keeping the last n (0: stop logging)."""
        self.layer_log = deque(maxlen=n) if n else None

    def record(self, layer: int, batches: list[DeviceBatch], nbytes: list[tuple[int, int]]) -> None:
        """Count a layer's dispatch; nbytes: each batch's (bytes out, bytes back), DeviceBatch.nbytes."""
        counts = self.tokens.setdefault(layer, torch.zeros(self.n_devices, dtype=torch.long))
        for b, (out, back) in zip(batches, nbytes, strict=True):
            counts[b.device] += b.rows.numel()
            self.calls += 1
            self.bytes_sent += out
            self.bytes_received += back

    def log_layer(self, layer: int, batches: list[DeviceBatch], nbytes: list[tuple[int, int]],
                  replies: list[ExpertReply], seconds: float) -> None:
        """Keep the layer's calls (with `keep_layers`); nbytes as for `record`."""
        if self.layer_log is None:
            return
        calls = tuple(DeviceCall(b.device, b.rows.numel(), b.pairs, b.experts_hit, out, back, reply.compute_ms)
                      for b, (out, back), reply in zip(batches, nbytes, replies, strict=True))
        self.layer_log.append(LayerRecord(layer, calls, seconds))

    def table(self) -> str:
        """Token rows sent to each device per MoE layer, then the calls and bytes of every layer together."""
        head = f"{'layer':>5} " + " ".join(f"{'device ' + str(d):>9}" for d in range(self.n_devices))
        lines = [head] + [f"{layer:>5} " + " ".join(f"{int(c):>9}" for c in counts.tolist())
                          for layer, counts in sorted(self.tokens.items())]
        lines.append(f"{self.calls} expert-group calls over {self.layers} layer dispatches; "
                     f"{self.bytes_sent / 2**20:.2f} MiB sent, {self.bytes_received / 2**20:.2f} MiB back")
        return "\n".join(lines)


class PendingCombine:
    """A dispatched layer whose routed output is not needed yet (the gateway computes shared experts meanwhile).
    calls[i] is batches[i] as sent, handles[i] what the transport returned for it, nbytes[i] its (out, back)."""

    def __init__(self, transport: Transport, layer: int, batches: list[DeviceBatch], calls: list[ExpertCall],
                 handles: list[Any], nbytes: list[tuple[int, int]], device_of: torch.Tensor, hidden: torch.Tensor,
                 spans: list | None, stats: DispatchStats, started: float) -> None:
        self.transport, self.layer, self.batches, self.calls, self.handles = transport, layer, batches, calls, handles
        self.nbytes, self.spans, self.stats, self.started = nbytes, spans, stats, started
        self.device_of = device_of  # [T, K] the device each pair was sent to
        self.shape, self.dtype, self.device = tuple(hidden.shape), hidden.dtype, hidden.device  # (T, H)
        self.replies: list[ExpertReply] = []

    def tokens_per_device(self, n_devices: int) -> torch.Tensor:
        """[D] int64 tokens this layer sent to each device (on the gateway's device): the load the placement
        really put there (with copies, which copy served a token is decided by the plan)."""
        rows = [0] * n_devices
        for b in self.batches:
            rows[b.device] = int(b.rows.numel())
        return torch.tensor(rows, dtype=torch.long).to(self.device)

    def served_devices(self) -> torch.Tensor:
        """[T, K] int64 the device that computed each (token, expert) pair (the copy the plan chose)."""
        return self.device_of

    def wait(self) -> torch.Tensor:
        """The summed routed-expert output, [T, H] in token order."""
        blocked = time.perf_counter()
        try:
            self.replies = self.transport.receive(self.calls, self.handles)
        finally:
            self.stats.blocked_seconds += time.perf_counter() - blocked
            if self.spans:
                for span, reply in zip(self.spans, self.replies or [None] * len(self.spans), strict=True):
                    if reply is not None and span.is_recording():
                        span.set_attribute("expertmesh.bytes_received",
                                           reply.output.numel() * reply.output.element_size())
                        span.set_attribute("expertmesh.compute_ms", reply.compute_ms)
                    span.end()
        out = combine(*self.shape, self.batches, [r.output for r in self.replies], self.dtype, self.device)
        seconds = time.perf_counter() - self.started
        self.stats.layers += 1
        self.stats.wait_seconds += seconds
        self.stats.log_layer(self.layer, self.batches, self.nbytes, self.replies, seconds)
        return out


class Dispatcher:
    """Computes the routed experts of one MoE layer through the expert groups.

    The local, Ray and gRPC deployments differ only in `transport`; `pool` is the replica pool when the groups
    are Ray actors that can be scaled (None otherwise). `device` is the gateway's: the dispatch plan is made
    there (from routing on that device) and partial sums are combined there.
    """

    def __init__(self, placement: Placement, transport: Transport, pool: Any = None,
                 on_close: Callable[[], None] | None = None, device: torch.device | str = "cpu") -> None:
        self.transport = transport
        self.pool = pool
        self.device = torch.device(device)
        self._use(placement)
        self.stats = DispatchStats(placement.n_devices)
        self.placements_switched = 0
        self.tracer = None  # set by the engine when tracing is on: one CLIENT span per device per layer
        self._on_close = on_close

    def _use(self, placement: Placement) -> None:
        """Plan with `placement` from the next dispatch on (one assignment: a dispatch reads one placement)."""
        expert_device, hosts = host_tables(placement, self.device)
        self._view = (placement, expert_device, hosts)

    @property
    def placement(self) -> Placement:
        return self._view[0]

    @property
    def expert_device(self) -> torch.Tensor:
        return self._view[1]

    # -- re-placement: stage beside the current placement, switch at a step boundary, release the old -------
    def stage(self, placement: Placement) -> None:
        """Every expert group loads `placement` beside the current one while serving; returns when all have."""
        if placement.n_devices != self.placement.n_devices or placement.n_experts != self.placement.n_experts:
            raise ValueError(f"placement: {placement.n_devices} groups for {placement.n_experts} experts, expected "
                             f"{self.placement.n_devices} for {self.placement.n_experts}")
        if placement.version <= self.placement.version:
            raise ValueError(f"placement.version={placement.version}: expected > the current "
                             f"{self.placement.version}")
        self.transport.stage_placement(placement)

    def switch(self, placement: Placement) -> None:
        """Dispatch by `placement` (already staged) from now on: call between steps, with no layer in flight."""
        self._use(placement)
        self.transport.switch_placement(placement)
        self.placements_switched += 1

    def release(self) -> None:
        """Every group frees the placement versions other than the current one."""
        self.transport.release_placements(self.placement.version)

    def set_tracer(self, tracer) -> None:
        """Trace dispatches (None: off). In-process groups record their server spans with the same tracer."""
        self.tracer = tracer
        self.transport.tracer = tracer

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        token_devices: torch.Tensor | None = None,
    ) -> PendingCombine:
        """hidden: [T, H]; topk_ids: [T, K] global expert ids; topk_weights: [T, K] float32; token_devices: [T, M]
        the devices top-M routing chose (copies on them are preferred), or None."""
        started = time.perf_counter()
        placement, expert_device, hosts = self._view
        device_of = pair_devices(topk_ids, hosts.get(layer, expert_device), token_devices)  # [T, K]
        batches = split_by_device(topk_ids, topk_weights, device_of, placement.n_devices)
        calls = [ExpertCall(b.device, layer, hidden, b.ids, b.weights, b.rows, None, placement.version)
                 for b in batches]
        nbytes = [b.nbytes(hidden.shape[1], hidden.element_size()) for b in batches]  # for the stats and spans
        if self.tracer is None:
            handles = [self.transport.send(call) for call in calls]
            spans = None
        else:
            calls, handles, spans = self._send_traced(calls, batches, nbytes)
        self.transport.flush()
        self.stats.record(layer, batches, nbytes)
        return PendingCombine(self.transport, layer, batches, calls, handles, nbytes, device_of, hidden,
                              spans, self.stats, started)

    def _send_traced(self, calls: list[ExpertCall], batches: list[DeviceBatch],
                     nbytes: list[tuple[int, int]]) -> tuple[list[ExpertCall], list, list]:
        """Send each call inside a CLIENT span whose context it carries: (the calls as sent, handles, spans)."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        from model_core.telemetry import inject_context

        sent, handles, spans = [], [], []
        for call, b, (bytes_out, _) in zip(calls, batches, nbytes, strict=True):
            span = self.tracer.start_span(f"dispatch device {b.device}", kind=SpanKind.CLIENT)
            if span.is_recording():  # an unsampled trace pays for no attributes
                span.set_attributes({
                    "expertmesh.layer": call.layer, "expertmesh.device": b.device,
                    "expertmesh.tokens": int(b.rows.numel()), "expertmesh.experts_hit": b.experts_hit,
                    "expertmesh.bytes_sent": bytes_out,
                })
            with trace.use_span(span, end_on_exit=False):
                call = dataclasses.replace(call, carrier=inject_context())
            sent.append(call)
            handles.append(self.transport.send(call))
            spans.append(span)
        return sent, handles, spans

    def close(self) -> None:
        self.transport.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
