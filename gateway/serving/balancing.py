"""The gateway's side of live balancing: summarise routing per step, push it off the critical path, pull the bias."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Protocol

import torch

from gateway.model.step import StepBatch
from router_service.bias import EPLB_MODES
from router_service.load_stats import LayerWindow, normalised_scores, sequence_balance_sum
from router_service.routing import Routing
from router_service.service import RouterService, report_table, window_to_wire

logger = logging.getLogger(__name__)


class RouterCallFailed(RuntimeError):
    """A router-service call raised, timed out, or found the service gone."""


class RouterHandle(Protocol):
    """How the client calls a RouterService, wherever it runs: `start` a call, see which calls have `finished`
    (never blocking), read a call's `result` (blocking up to timeout_s; raises RouterCallFailed)."""

    def start(self, method: str, *args: Any) -> Any: ...

    def finished(self, calls: list) -> list: ...

    def result(self, call: Any, timeout_s: float | None = None) -> Any: ...


class Answered:
    """An in-process call, already run: its value, or the exception it raised."""

    def __init__(self, value: Any = None, error: Exception | None = None) -> None:
        self.value, self.error = value, error


class InProcessRouter:
    """A RouterService in this process behind the Ray handle's calling convention: a call runs when it starts (under
    a lock: the service is not thread-safe), so it has always finished by the time anyone looks."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._lock = threading.Lock()

    def start(self, method: str, *args: Any) -> Answered:
        with self._lock:
            try:
                return Answered(getattr(self.service, method)(*args))
            except Exception as exc:  # delivered by result(), as a Ray call's error would be
                return Answered(error=exc)

    def finished(self, calls: list) -> list:
        return list(calls)

    def result(self, call: Answered, timeout_s: float | None = None) -> Any:
        if call.error is not None:
            raise RouterCallFailed(f"{type(call.error).__name__}: {call.error}") from call.error
        return call.value


class RayRouter:
    """A RouterService actor: calls are Ray tasks, checked with ray.wait(timeout=0)."""

    def __init__(self, actor: Any) -> None:
        import ray

        self._ray, self.actor = ray, actor

    def start(self, method: str, *args: Any) -> Any:
        return getattr(self.actor, method).remote(*args)

    def finished(self, calls: list) -> list:
        if not calls:
            return []
        return self._ray.wait(calls, num_returns=len(calls), timeout=0)[0]

    def result(self, call: Any, timeout_s: float | None = None) -> Any:
        try:
            return self._ray.get(call, timeout=timeout_s)
        except self._ray.exceptions.RayError as exc:
            raise RouterCallFailed(str(exc)) from exc


class PlacementSource(Protocol):
    """What EPLB modes need from the engine: the placement serving now, and where a proposed one goes."""

    def in_use(self) -> dict: ...

    def propose(self, placement: dict) -> None: ...


class BalanceClient:
    """Feeds a RouterService (through a RouterHandle: in-process or a Ray actor) and applies the bias it publishes.

    Calls are fire-and-forget: pushes and snapshot requests are checked later without blocking, so a slow or dead
    router service never stalls a decode step. When it cannot be reached the gateway keeps routing with its last
    bias and `unreachable` / `failures` say so. At most `max_pending_pushes` pushes are in flight: while that many
    are unanswered, counts keep accumulating in the local window (memory stays bounded, nothing is lost) and go out
    in one push once the service answers again. With `placements` (EPLB modes), each push says which placement
    served its counts, and `poll` asks the service for a better one and hands it to `placements.propose`.

    `observe` runs on the engine thread while `flush` / `sync` may run on a caller's (stats, shutdown): one lock
    guards the window and the calls in flight; nothing waits on a call under it.
    """

    def __init__(self, router: RouterHandle, apply_bias, n_devices: int, n_experts: int, top_k: int,
                 moe_layers: list[int], push_every_steps: int, max_pending_pushes: int = 8,
                 placements: PlacementSource | None = None) -> None:
        self.router, self.apply_bias, self.placements = router, apply_bias, placements
        self.n_devices, self.n_experts, self.top_k = n_devices, n_experts, top_k
        self.moe_layers, self.push_every_steps = moe_layers, push_every_steps
        self.max_pending_pushes = max_pending_pushes
        self.gateway_id = uuid.uuid4().hex[:8]
        self.version = -1
        self.steps = 0
        self.failures = 0
        self.held_back = 0  # flushes kept local because max_pending_pushes pushes were unanswered
        self.unreachable = False
        self.started_ray = False  # whether connecting to the service started Ray (the engine shuts it down)
        self._lock = threading.Lock()
        self._pending_pushes: list = []
        self._pending_snapshot = None
        self._pending_proposal = None
        self._reported_version = -1  # the placement version the service last heard of in a push
        self.last_proposal: dict | None = None
        self._reset()

    def _reset(self) -> None:
        self.window = {layer: LayerWindow.empty(self.n_experts, self.n_devices) for layer in self.moe_layers}
        self._reset_sequences()

    def _reset_sequences(self) -> None:
        # Per-sequence sums for sequence-wise balance: one row per sequence seen since the last fold.
        self.seq_row: dict[int, int] = {}
        self.seq_tokens = torch.zeros(0, dtype=torch.long)  # [S] (every MoE layer routes every token)
        self.seq_counts = {layer: torch.zeros(0, self.n_experts, dtype=torch.long) for layer in self.moe_layers}
        self.seq_scores = {layer: torch.zeros(0, self.n_experts, dtype=torch.float64) for layer in self.moe_layers}

    def _fold_sequences(self) -> None:
        """Close the per-sequence sums into each window's sequence-wise balance (lock held)."""
        if not self.seq_row:
            return
        for layer, w in self.window.items():
            w.seq_balance_sum += sequence_balance_sum(self.seq_counts[layer], self.seq_scores[layer], self.seq_tokens,
                                                      self.top_k)
            w.sequences += len(self.seq_row)
        self._reset_sequences()

    def observe(self, routings: dict[int, Routing], step: StepBatch) -> None:
        """Add one forward step's routing (its counts come from the model's accounting pass); push and poll on
        schedule."""
        n_seqs = len(step.lengths)
        lengths = torch.tensor(step.lengths)
        # Outside the lock: reduce on the routing's device (the gateway's), then copy the small sums to the host.
        device = next(iter(routings.values())).scores.device if routings else torch.device("cpu")
        seq_index = torch.repeat_interleave(torch.arange(n_seqs, device=device), lengths.to(device))  # [T]
        host: dict[int, tuple[torch.Tensor, ...]] = {}
        for layer, r in routings.items():
            score_sum = torch.zeros(n_seqs, self.n_experts, dtype=torch.float64, device=device).index_add_(
                0, seq_index, normalised_scores(r.scores))  # [S, E] normalised scores summed per sequence
            c = r.counts
            host[layer] = (score_sum.cpu(), c.per_sequence.cpu(), c.tokens_per_expert.cpu(), c.tokens_per_device.cpu())
        with self._lock:
            rows = self._rows(step.seq_ids)
            self.seq_tokens.index_add_(0, rows, lengths)
            for layer, r in routings.items():
                score_sum, per_sequence, per_expert, per_device = host[layer]
                self.window[layer].add(LayerWindow(per_expert, score_sum.sum(0), per_device,
                                                   r.ids.shape[0], changed=r.changed_tokens(),
                                                   changed_slots=r.changed_slots()))
                self.seq_counts[layer].index_add_(0, rows, per_sequence)
                self.seq_scores[layer].index_add_(0, rows, score_sum)
            self.steps += 1
            due = self.steps % self.push_every_steps == 0
        if due:
            self.flush()
        self.poll()

    def _rows(self, seq_ids: list[int]) -> torch.Tensor:
        """Rows of the step's sequences in the per-sequence sums, new sequences appended (lock held)."""
        new = [s for s in dict.fromkeys(seq_ids) if s not in self.seq_row]
        if new:
            first = len(self.seq_row)
            self.seq_row.update((s, first + j) for j, s in enumerate(new))
            self.seq_tokens = torch.cat([self.seq_tokens, torch.zeros(len(new), dtype=torch.long)])
            for layer in self.moe_layers:
                grow = torch.zeros(len(new), self.n_experts)
                self.seq_counts[layer] = torch.cat([self.seq_counts[layer], grow.long()])
                self.seq_scores[layer] = torch.cat([self.seq_scores[layer], grow.double()])
        return torch.tensor([self.seq_row[s] for s in seq_ids], dtype=torch.long)

    def flush(self) -> None:
        """Send the accumulated windows (sequence-wise balance per sequence seen in the window), unless
        `max_pending_pushes` earlier pushes are still unanswered: then the window stays here and grows."""
        with self._lock:
            self._fold_sequences()  # also while held back: per-sequence rows must not grow for the whole outage
            self._check_pushes()
            if len(self._pending_pushes) >= self.max_pending_pushes:
                self.held_back += 1
                self.unreachable = True
                return
            wire = {layer: window_to_wire(w) for layer, w in self.window.items() if w.tokens}
            self._reset()
            if not wire:
                return
            placement = None
            if self.placements is not None:  # EPLB: say which placement served these counts, once per change
                placement = self.placements.in_use()
                if placement.get("version", 0) == self._reported_version:
                    placement = None
                else:
                    self._reported_version = placement.get("version", 0)
            args = (self.gateway_id, wire) if placement is None else (self.gateway_id, wire, placement)
            self._pending_pushes.append(self.router.start("push", *args))

    def _check_pushes(self) -> None:
        """Drop answered pushes from the in-flight list (lock held)."""
        done = self.router.finished(self._pending_pushes)
        if not done:
            return
        self._pending_pushes = [call for call in self._pending_pushes if call not in done]
        for call in done:
            try:
                self.router.result(call)
                self.unreachable = False
            except RouterCallFailed as exc:
                self._failed(exc)

    def poll(self) -> None:
        """Apply a newer bias if the service has published one, and pass on a proposed placement (EPLB modes);
        never blocks on the service."""
        self._poll_proposal()
        with self._lock:
            if self._pending_snapshot is None:
                self._pending_snapshot = self.router.start("snapshot", self.version)
            if not self.router.finished([self._pending_snapshot]):
                return
            call, self._pending_snapshot = self._pending_snapshot, None
            try:
                self._apply(*self.router.result(call))
                self.unreachable = False
            except RouterCallFailed as exc:
                self._failed(exc)

    def _poll_proposal(self) -> None:
        """Ask for a placement (the service answers None until enough windows closed) and hand a real one on."""
        if self.placements is None:
            return
        with self._lock:
            if self._pending_proposal is None:
                self._pending_proposal = self.router.start("propose", self.placements.in_use())
            if not self.router.finished([self._pending_proposal]):
                return
            call, self._pending_proposal = self._pending_proposal, None
            try:
                answer = self.router.result(call)
            except RouterCallFailed as exc:
                self._failed(exc)
                return
        if answer is not None:
            self.last_proposal = answer
            if answer["placement"] is not None:
                self.placements.propose(answer["placement"])

    def sync(self, timeout_s: float = 30.0) -> None:
        """Push what is pending and wait for the service's current bias (for tests, benchmarks and shutdown)."""
        self.flush()
        try:
            self._wait_pushes(timeout_s)
            self.flush()  # what was held back while pushes were unanswered
            self._wait_pushes(timeout_s)
            snapshot = self.router.result(self.router.start("snapshot", self.version), timeout_s)
            with self._lock:
                self._pending_snapshot = None
                self._apply(*snapshot)
                self.unreachable = False
        except RouterCallFailed as exc:
            with self._lock:
                self._failed(exc)

    def _wait_pushes(self, timeout_s: float) -> None:
        """Block (without the lock) until the pushes in flight now are answered."""
        with self._lock:
            waiting = list(self._pending_pushes)
        deadline = time.monotonic() + timeout_s
        for call in waiting:
            self.router.result(call, max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._pending_pushes = [call for call in self._pending_pushes if call not in waiting]

    def _apply(self, version: int, biases: dict | None) -> None:
        if biases is not None and version != self.version:
            self.apply_bias({int(layer): torch.tensor(b, dtype=torch.float32) for layer, b in biases.items()})
            self.version = version

    def _failed(self, exc: Exception) -> None:
        """Record a failed call (lock held). Pushes still in flight stay listed: they may yet land, and they
        keep the backlog bounded; answered ones (failed included) leave the list in _check_pushes."""
        self.failures += 1
        self.unreachable = True
        self._pending_snapshot = None
        logger.warning("router service unreachable (%s); routing keeps bias version %d", exc, self.version)

    def call(self, method: str, *args: Any, timeout_s: float = 30.0) -> Any:
        """Call a RouterService method and wait (not for the decode loop: stats, tests); raises RouterCallFailed."""
        return self.router.result(self.router.start(method, *args), timeout_s)

    def report(self, mode: str, sync: bool = True) -> dict:
        """The router service's view (last closed window per layer, bias version) plus this gateway's metrics under
        "gateway"; when the service is down, what this gateway knows (`mode`, the configured one, and the error).

        sync: first push this gateway's pending counts and fetch the current bias (blocks on the service).
        """
        if sync:
            self.sync()
        try:
            stats = self.call("stats")
        except RouterCallFailed as exc:
            logger.warning("router service stats unavailable", exc_info=True)
            stats = {"mode": mode, "last_window": [], "error": str(exc)}
        return {**stats, "gateway": self.metrics()}

    def metrics(self) -> dict:
        with self._lock:
            return {"bias_version": self.version, "router_unreachable": self.unreachable,
                    "router_failures": self.failures, "steps": self.steps,
                    "pending_pushes": len(self._pending_pushes), "held_back_flushes": self.held_back}


def balance_table(stats: dict) -> str:
    """A balance report (BalanceClient.report) as the per-layer table `expertmesh stats` prints."""
    head = (f"balancing mode={stats['mode']} bias version={stats.get('version', '-')} "
            f"windows closed={stats.get('windows_closed', 0)} gateway={stats.get('gateway', {})}")
    if not stats["last_window"]:
        return head + "\n(no window closed yet)"
    return head + "\n" + report_table(stats["last_window"])


def start_balancing(config, spec, model, placement, placements: PlacementSource | None = None) -> BalanceClient | None:
    """Connect the gateway to its router service (created if it does not exist); None when balancing is off.
    placements: where EPLB modes read and propose placements (the engine's PlacementSwitch); other modes ignore it.

    On Ray the service is a named actor (`balancing.name` in `ray.namespace`): every gateway naming it shares
    one bias. It restarts on failure (calls in flight are retried up to 3 times: load counts are at-least-once)
    and resumes from `balancing.checkpoint` when one is configured.
    """
    cfg = config.balancing
    if cfg.mode == "off":
        return None
    model_bias = {
        layer: (model.layers[layer].model_bias if model.layers[layer].model_bias is not None
                else torch.zeros(spec.n_routed_experts)).tolist()
        for layer in spec.moe_layers
    }
    args = (model_bias, list(placement.expert_device), placement.n_devices, spec.top_k, cfg,
            float(config.top_m_devices) if config.top_m_devices else None)
    started_ray = False
    if config.router_on_ray:
        import ray

        from gateway.dispatch.ray_runtime import connect_ray

        started_ray = connect_ray(config)
        router = RayRouter(ray.remote(RouterService).options(
            name=cfg.name, namespace=config.ray.namespace, get_if_exists=True, max_restarts=-1, max_task_retries=3,
            num_cpus=0,
        ).remote(*args))
    else:
        router = InProcessRouter(RouterService(*args))
    client = BalanceClient(router, model.set_selection_bias, placement.n_devices, spec.n_routed_experts, spec.top_k,
                           spec.moe_layers, cfg.push_every_steps, cfg.max_pending_pushes,
                           placements if cfg.mode in EPLB_MODES else None)
    client.started_ray = started_ray
    client.sync()  # wait once, at start-up, for the service and its current bias; later polls never block
    return client
