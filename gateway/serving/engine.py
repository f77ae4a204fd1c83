"""Engine: the public Python API (load, score, submit, step, generate, re-place, scale, inspect, close) composed of a
scheduler, a model runner and a placement switch."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gateway.config import DeploymentConfig
from gateway.dispatch.dispatcher import Dispatcher
from gateway.dispatch.first_placement import initial_placement
from gateway.dispatch.groups import build_dispatcher
from gateway.dispatch.transports import DispatchError
from gateway.model.sampling import token_logprobs
from gateway.serving.balancing import balance_table, start_balancing
from gateway.serving.engine_metrics import EngineMetrics
from gateway.serving.model_runner import ModelRunner, gateway_device, latent_cache, load_model, traced
from gateway.serving.placement_switch import PlacementSwitch
from gateway.serving.request_checks import check_prompts, new_request_id, request_ids_for
from gateway.serving.routing_summary import RoutingSummary
from gateway.serving.routing_trace import RequestTrace, RoutingTraceStore
from gateway.serving.sampling_params import SamplingParams
from gateway.serving.scheduler import Request, Scheduler
from model_core.spec import ModelSpec
from model_core.telemetry import Telemetry
from router_service.placement import Placement

logger = logging.getLogger(__name__)
SHORT_SETTINGS = {"address": "ray.address", "cpus_per_group": "ray.cpus_per_group", "timeout_s": "rpc.timeout_s"}


class Engine:
    """A DeepSeek-V2/V3 model served as gateway + expert backend. `step()` is schedule → run → sample → hand out the
    tokens → retire (nano-vllm's LLMEngine): the Scheduler picks each request's next tokens under the token budgets
    and the paged latent cache, the ModelRunner forwards them and samples.

    A failure stays with what failed: a failed forward fails that step's requests, a raising callback fails its
    own request; either way the request retires and frees its cache, and the engine keeps serving.

    >>> engine = Engine.from_pretrained("models/tiny-v3", backend="local")
    >>> engine.generate([[1, 2, 3]], max_new_tokens=8)
    """

    def __init__(self, config: DeploymentConfig, spec: ModelSpec, backend: Dispatcher) -> None:
        self.config, self.spec, self.backend = config, spec, backend
        self.device = gateway_device(config)
        self.telemetry = Telemetry(config.tracing, "gateway")
        self.model = load_model(config, spec, backend, self.device, self.telemetry.tracer)
        self._step_lock = threading.RLock()  # one forward at a time; close() and placement switches wait for it
        self._queue_lock = threading.Lock()  # submit() and cancel() from other threads vs. schedule()
        self.placements = PlacementSwitch(spec, config.top_m_devices, backend, self.model, self._step_lock)
        self.balance = start_balancing(config, spec, self.model, backend.placement, self.placements)
        tracing = config.tracing
        self.routing_summary = RoutingSummary(spec.moe_layers, spec.n_routed_experts, self.device)
        self.traces = RoutingTraceStore(tracing.routing_trace_capacity, tracing.routing_trace_dir,
                                        max_bytes=int(tracing.routing_trace_max_mb * 2**20))
        self.runner = ModelRunner(config, self.model, self.routing_summary, self.traces, self.balance,
                                  self.telemetry.tracer)
        self.cache = latent_cache(config, spec, self.model)  # blocks on admission and as sequences grow
        self.scheduler = Scheduler(config.scheduler, self.cache)
        self._traces_of: dict[str, RequestTrace] = {}  # a running request's routing trace
        self._cancelled: dict[str, str] = {}  # request id -> the finish_reason it ends with
        self._dequeued: list[Request] = []  # cancelled while waiting: out of the queue, to retire at the next step
        self._seq_ids = itertools.count()  # for one-shot scoring (logits); the scheduler numbers requests
        self.last_request_ids: list[str] = []  # one per prompt of the latest generate() / logits() call
        self.last_batch_size = 0  # requests the latest step() forwarded (0: it had nothing to run)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **settings: Any) -> Engine:
        """Load a Hugging Face DeepSeek-V2/V3 checkpoint directory and start its expert groups.

        settings: DeploymentConfig fields (gateway/config/): backend 'local' | 'ray' | 'grpc' | ..., devices,
        placement, top_m_devices, dtype, expert_kernel, gateway_device, half_matmul, ...; a section's field by its
        dotted name (**{"rpc.timeout_s": 10}); address, cpus_per_group and timeout_s are short for ray.address,
        ray.cpus_per_group and rpc.timeout_s.
        """
        overrides = {SHORT_SETTINGS.get(name, name): value for name, value in settings.items()}
        return cls.from_config(DeploymentConfig(model=str(model_dir)).with_overrides(**overrides))

    @classmethod
    def from_config(cls, config: DeploymentConfig) -> Engine:
        """Start a deployment described by a DeploymentConfig (a YAML file parsed by DeploymentConfig.from_yaml)."""
        spec = ModelSpec.from_dir(config.model)
        placement = initial_placement(config, spec)
        gateway_device(config)  # a GPU this process cannot see fails here, naming the setting, before any loading
        backend = build_dispatcher(config, spec, placement)
        try:
            return cls(config, spec, backend)
        except Exception:
            backend.close()
            raise

    # -- requests ------------------------------------------------------------------------------------------------
    def submit(
        self, prompt: list[int], params: SamplingParams | None = None, *, request_id: str | None = None,
        on_token: Callable[[Request, int], None] | None = None, on_finish: Callable[[Request], None] | None = None,
        trace_context: Any = None, **sampling: Any,
    ) -> Request:
        """Queue one request for continuous batching; `step()` (or the serving loop) runs it.

        params: how it samples (SamplingParams); its fields may also go by keyword (max_new_tokens=8, seed=3, ...),
        replacing those of `params`. trace_context: an OpenTelemetry context (a client's, from its `traceparent`)
        the request's span continues; None: the current context.

        Raises ValueError naming the bad field, QueueFull when scheduler.max_waiting requests already wait.
        on_token(request, token) and on_finish(request) are called on the thread that runs `step()`; one that
        raises fails this request alone (finish_reason 'error', the error names the callback).
        """
        params = SamplingParams.of(params, **sampling)
        check_prompts(self.spec, self.cache, [prompt], params, single=True)
        return self._enqueue(prompt, params, request_id or new_request_id(), on_token, on_finish, trace_context)

    def generate(self, prompts: list[list[int]], max_new_tokens: int | None = None, *,
                 params: SamplingParams | None = None, request_ids: list[str] | None = None,
                 **sampling: Any) -> list[list[int]]:
        """New tokens for each prompt, through the continuous-batching scheduler (prompts that fit the token
        budget prefill together, then one decode step per token over the live batch).

        params / keywords: as for `submit` (a sequence stops after max_new_tokens or after emitting the model's eos
        token, kept in the output); with a seed, request i samples with seed + i. Each prompt is one request: its
        id (given, or generated) is in `engine.last_request_ids` afterwards, and `engine.routing_trace(id)` returns
        the routing it received. Raises DispatchError when a request failed.
        """
        params = SamplingParams.of(params, max_new_tokens=max_new_tokens, **sampling)
        check_prompts(self.spec, self.cache, prompts, params)
        ids = self.last_request_ids = request_ids_for(prompts, request_ids)
        with traced(self.telemetry.tracer, "generate", prompts=len(prompts), max_new_tokens=params.max_new_tokens):
            requests = [self._enqueue(p, params.for_choice(i), ids[i], None, None, None)
                        for i, p in enumerate(prompts)]
            while not all(r.done for r in requests):
                self.step()
        failed = [r for r in requests if r.error]
        if failed:
            raise DispatchError(f"request {failed[0].request_id}: {failed[0].error}")
        return [r.output for r in requests]

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        """Stop a request at the next step, finishing with `reason`: 'cancelled' (its client went away) or 'stop'
        (the caller found a stop string in its text). One still waiting leaves the queue at once (it no longer
        counts against scheduler.max_waiting); it retires, calling on_finish, at the next step."""
        if reason not in ("cancelled", "stop"):
            raise ValueError(f"reason={reason!r}: expected 'cancelled' or 'stop'")
        with self._queue_lock:
            self._cancelled.setdefault(request_id, reason)
            waiting = self.scheduler.waiting
            queued = next((r for r in waiting if r.request_id == request_id), None)
            if queued is not None:
                waiting.remove(queued)
                self._dequeued.append(queued)

    @torch.inference_mode()
    def logits(self, prompts: list[list[int]], request_ids: list[str] | None = None) -> list[torch.Tensor]:
        """Full-sequence logits of a ragged batch: one float32 host tensor [len_i, vocab] per prompt (one forward,
        no cache: nothing is kept afterwards but the routing traces)."""
        check_prompts(self.spec, self.cache, prompts)
        ids = self.last_request_ids = request_ids_for(prompts, request_ids)
        with self._step_lock:
            traces = [self.traces.start(r, self.spec.moe_layers, self.spec.top_k, list(p))
                      for r, p in zip(ids, prompts, strict=True)]
            try:
                with traced(self.telemetry.tracer, "logits", request_ids=ids, prompts=len(prompts)):
                    return self.runner.score([next(self._seq_ids) for _ in prompts], prompts, traces)
            finally:
                for r in ids:
                    self.traces.finish(r)

    def prompt_logprobs(self, prompt: list[int], top: int) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """Each prompt position's logprob given the positions before it (None for the first) and the `top` most
        likely tokens there (empty for the first), scored in one forward without the cache (`logits`)."""
        logits = self.logits([prompt])[0]  # [L, V] float32 on the host
        if len(prompt) < 2:
            return [(None, [])]
        chosen, tops = token_logprobs(logits[:-1], torch.tensor(prompt[1:]), top)
        return [(None, [])] + list(zip(chosen, tops, strict=True))

    def _enqueue(self, prompt: list[int], params: SamplingParams, request_id: str, on_token, on_finish,
                 trace_context: Any) -> Request:
        """A checked prompt's request, queued with its routing trace started (neither when the queue is full)."""
        request = params.request(request_id, prompt, self.spec.eos_token_id, self.device, on_token, on_finish,
                                 vocab_size=self.spec.vocab_size, grammars=self.runner.grammars)
        if self.telemetry.tracer is not None:  # one span per request, from submission to its last token
            request.span = self.telemetry.tracer.start_span("request", context=trace_context, attributes={
                "expertmesh.request_id": request_id, "expertmesh.prompt_tokens": len(prompt),
                "expertmesh.max_new_tokens": params.max_new_tokens})
        try:
            with self._queue_lock:
                self.scheduler.add(request)  # QueueFull before anything is allocated
                try:
                    self._traces_of[request_id] = self.traces.start(request_id, self.spec.moe_layers,
                                                                    self.spec.top_k, list(prompt))
                except ValueError:
                    self.scheduler.waiting.pop()
                    raise
        except Exception:
            if request.span is not None:
                request.span.end()
            raise
        return request

    # -- stepping ------------------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._dequeued)

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One continuous-batching step: every running sequence decodes a token, prompts are prefilled (in chunks
        under scheduler.max_prefill_tokens), all in one forward. Returns the requests that finished."""
        with self._step_lock:
            retired = self._retire(self._take_cancelled())
            retired += self._retire(self._take_stalled())  # after: a cancelled request has left `running`
            with self._queue_lock:
                batch = self.scheduler.schedule()
            self.last_batch_size = len(batch)
            if not batch:
                return retired
            try:
                sampling, logits = self.runner.run(batch, self.cache, [self._traces_of[r.request_id] for r in batch])
            except Exception as exc:  # a failed dispatch fails this step's requests; the engine keeps serving
                logger.exception("step failed for %d requests", len(batch))
                for r in batch:
                    r.fail(f"{type(exc).__name__}: {exc}")
                return retired + self._retire(batch)
            if not sampling:
                return retired
            try:  # a request that cannot be sampled fails alone (None); raising here is a bug in sampling itself
                tokens = self.runner.sample(sampling, logits)
            except Exception as exc:
                logger.exception("sampling failed for %d requests", len(sampling))
                tokens = [None] * len(sampling)
                for r in sampling:
                    r.fail(f"sampling raised {type(exc).__name__}: {exc}")
            for r, token in zip(sampling, tokens, strict=True):
                if token is not None:
                    self._emit(r, token)
            return retired + self._retire([r for r in sampling if r.done])

    def _emit(self, r: Request, token: int) -> None:
        """Hand a sampled token to its request: its callback, then whether it is done."""
        r.output.append(token)
        if r.on_token is not None:
            try:
                r.on_token(r, token)
            except Exception as exc:
                self._callback_failed(r, "on_token", exc)
                return
        if token in r.stop_ids or r.grammar_complete:  # eos, or a structured output's text is complete
            r.finish_reason = "stop"
        elif len(r.output) >= r.max_new_tokens:
            r.finish_reason = "length"

    def _callback_failed(self, r: Request, name: str, exc: Exception) -> None:
        """A caller's callback raised: that request fails (the batch does not); a first error is kept."""
        logger.error("request %s: its %s callback raised; failing the request", r.request_id, name, exc_info=exc)
        if r.error is None:
            r.fail(f"{name} callback raised {type(exc).__name__}: {exc}")

    def _take_cancelled(self) -> list[Request]:
        """Remove cancelled requests from both queues (they retire before the next schedule)."""
        with self._queue_lock:
            if not self._cancelled:
                return []
            waiting, running = self.scheduler.waiting, self.scheduler.running
            cancelled, self._cancelled = self._cancelled, {}
            gone = self._dequeued + [r for r in [*waiting, *running] if r.request_id in cancelled]
            self._dequeued = []
            self.scheduler.waiting = type(waiting)(r for r in waiting if r.request_id not in cancelled)
        for r in gone:
            r.finish_reason = cancelled.get(r.request_id, "cancelled")
        return gone

    def _take_stalled(self) -> list[Request]:
        """Running requests never given a token for their last forward (a bug) fail: no request waits forever."""
        with self._queue_lock:
            stalled = self.scheduler.stalled()
        for r in stalled:
            logger.error("request %s: its forwarded tokens were never sampled; failing it", r.request_id)
            r.fail("internal error: the engine stopped generating for this request")
        return stalled

    def _retire(self, finished: list[Request]) -> list[Request]:
        """Take finished requests out of the batch, free their cache and trace, then call their on_finish."""
        if not finished:
            return finished
        with self._queue_lock:
            self.scheduler.retire(finished)
        for r in finished:
            self.cache.free(r.seq_id)  # a request cancelled before admission (or preempted) has none: a no-op
            self.traces.finish(r.request_id)
            self._traces_of.pop(r.request_id, None)
            if r.on_finish is not None:
                try:
                    r.on_finish(r)
                except Exception as exc:
                    self._callback_failed(r, "on_finish", exc)
            if r.span is not None:
                r.span.set_attributes({"expertmesh.completion_tokens": len(r.output),
                                       "expertmesh.finish_reason": r.finish_reason})
                r.span.end()
        return finished

    @property
    def micro_batches(self) -> int:
        """Ping-pong micro-batches per step (scheduler.micro_batches), settable between steps (see ModelRunner)."""
        return self.runner.micro_batches

    @micro_batches.setter
    def micro_batches(self, value: int) -> None:
        self.runner.micro_batches = value

    @property
    def micro_chooser(self):
        """The MicroBatchChooser of scheduler.micro_batches 'auto' (None once a fixed setting is set)."""
        return self.runner.micro_chooser

    # -- operations ----------------------------------------------------------------------------------------------
    def apply_placement(self, placement: Placement) -> None:
        """Re-place the routed experts without stopping (PlacementSwitch.apply): groups load `placement` beside the
        current one, the gateway switches between two steps, the old one is freed. Blocks until done; call it
        from any thread but the one stepping the engine. `placement.version` must be above the current one."""
        self.placements.apply(placement)

    @property
    def rearrangements(self) -> int:
        """Placements switched to while serving (EPLB proposals and apply_placement)."""
        return self.placements.switched

    @property
    def rearrangement_failures(self) -> int:
        return self.placements.failures

    def wait_rearranged(self, timeout_s: float = 300.0) -> None:
        """Wait for a re-placement in progress to finish (tests, benchmarks, shutdown)."""
        self.placements.wait(timeout_s)

    def scale(self, group: int, replicas: int) -> list[int]:
        """Run `replicas` replicas of expert group `group` (ray / grpc backends). New replicas load their
        weights before they take traffic; removed ones drain first; requests keep flowing meanwhile."""
        if self.backend.pool is None:
            raise ValueError(f"backend={self.config.backend!r}: scaling needs the ray or grpc backend")
        return self.backend.pool.scale(group, replicas)

    def poll_replicas(self) -> None:
        """Apply what background probes of failed replicas found (restarts, evictions): each dispatch does this
        while traffic flows; the engine loop calls it while idle."""
        if self.backend.pool is not None:
            self.backend.pool.poll()

    # -- inspection ----------------------------------------------------------------------------------------------
    def routing_trace(self, request_id: str) -> RequestTrace:
        """The routing a request received: experts, weights and devices per token position and MoE layer.

        A running request's trace is a snapshot of what it has run so far. Raises KeyError when the id was never
        seen or has been evicted (see tracing.routing_trace_capacity and tracing.routing_trace_max_mb).
        """
        return self.traces.get(request_id)

    def balance_stats(self, sync: bool = True) -> dict:
        """The router service's view plus this gateway's (BalanceClient.report; sync: push and pull first)."""
        if self.balance is None:
            return {"mode": "off", "last_window": []}
        return self.balance.report(self.config.balancing.mode, sync)

    def stats_table(self) -> str:
        """The live per-layer balance table (what `expertmesh stats` prints)."""
        return balance_table(self.balance_stats())

    def metrics(self) -> EngineMetrics:
        """What a metrics scrape reports, copied out as plain data; reading changes nothing (no probe polled)."""
        return EngineMetrics.of(self)

    # -- shutdown ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush balancing counts, stop tracing and the expert groups. Waits for a running step to end first:
        tearing the backend down under a forward would fail or hang it; so does a re-placement in progress."""
        self.wait_rearranged()
        with self._step_lock:
            if self.balance is not None:
                self.balance.sync()
            self.telemetry.shutdown()
            self.backend.close()
            if self.balance is not None and self.balance.started_ray:
                import ray

                ray.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
