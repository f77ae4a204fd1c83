"""The stepping core: one continuous-batching step schedules, runs the forward, samples, calls back and retires."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from pathlib import Path

import torch

from gateway.config import DeploymentConfig, DeploymentConfigError
from gateway.dispatch.dispatcher import Dispatcher
from gateway.model.kv_cache import PagedLatentCache
from gateway.model.model import GatewayModel
from gateway.model.sampling import apply_penalties, sample, token_logprobs
from gateway.model.step import StepBatch
from gateway.serving.balancing import start_balancing
from gateway.serving.micro_batching import MicroBatchChooser
from gateway.serving.routing_summary import RoutingSummary
from gateway.serving.routing_trace import RequestTrace, RoutingTraceStore
from gateway.serving.scheduler import Request, Scheduler
from model_core.spec import ModelSpec
from model_core.telemetry import Telemetry
from router_service.bias import EPLB_MODES
from router_service.placement import Placement

logger = logging.getLogger(__name__)


def gateway_device(config: DeploymentConfig) -> torch.device:
    """config.gateway_device resolved, refusing a GPU this process cannot see (the error names the setting)."""
    device = config.gateway_torch_device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeploymentConfigError(f"gateway_device={config.gateway_device!r}: CUDA is not available in this "
                                        "process (use 'auto' or 'cpu', or run where a GPU is visible)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeploymentConfigError(f"gateway_device={config.gateway_device!r}: this process sees "
                                        f"{torch.cuda.device_count()} GPUs (CUDA_VISIBLE_DEVICES)")
    return device


class EngineCore:
    """The model, the scheduler and the latent cache; `step()` advances every live request by one forward.

    A failure stays with what failed: a failed forward fails that step's requests, a raising callback fails its
    own request; either way the request retires and frees its cache, and the engine keeps serving.
    """

    def __init__(self, config: DeploymentConfig, spec: ModelSpec, backend: Dispatcher, dtype: torch.dtype) -> None:
        self.config = config
        self.model_dir = Path(config.model)
        self.spec = spec
        self.backend = backend
        self.device = gateway_device(config)
        self.model = GatewayModel(config.model, spec, backend, dtype, top_m_devices=config.top_m_devices,
                                  device=self.device, half_matmul=config.half_matmul)
        self.routing_summary = RoutingSummary(spec.moe_layers, spec.n_routed_experts, self.device)
        self.balance = start_balancing(config, spec, self.model, backend.placement)
        self.telemetry = Telemetry(config.tracing, "gateway")
        self.model.tracer = self.telemetry.tracer
        backend.set_tracer(self.telemetry.tracer)
        tracing = config.tracing
        self.traces = RoutingTraceStore(tracing.routing_trace_capacity, tracing.routing_trace_dir,
                                        max_bytes=int(tracing.routing_trace_max_mb * 2**20))
        self._seq_ids = itertools.count()  # for one-shot scoring (logits); the scheduler numbers requests
        self.cache = self._new_cache()  # sequences get blocks on admission and as they grow, free them on finish
        self.model.use_decode_kernel(self._decode_kernel())
        self.scheduler = Scheduler(config.scheduler, self.cache)
        self._micro_batches = 1
        self.micro_chooser = None  # scheduler.micro_batches 'auto': measures both settings while serving
        if config.scheduler.micro_batches == "auto":
            self.micro_chooser = MicroBatchChooser()
        else:
            self.micro_batches = config.scheduler.micro_batches
        self._traces_of: dict[str, RequestTrace] = {}
        self._step_lock = threading.RLock()  # one forward at a time; close() waits for it too
        self._queue_lock = threading.Lock()  # submit() and cancel() from other threads vs. schedule()
        self._cancelled: dict[str, str] = {}  # request id -> the finish_reason it ends with
        self.rearrangements = 0  # placements switched to while serving (EPLB proposals and apply_placement)
        self.rearrangement_failures = 0
        self._rearranging: threading.Thread | None = None
        if self.balance is not None and config.balancing.mode in EPLB_MODES:
            self.balance.current_placement = lambda: self.backend.placement.to_dict()
            self.balance.on_proposal = self._rearrange_in_background

    def _new_cache(self) -> PagedLatentCache:
        """The paged latent-cache pool, sized by cache.max_tokens or cache.memory_fraction (at most what
        scheduler.max_running sequences of max_position_embeddings tokens could fill)."""
        cfg, spec = self.config.cache, self.spec
        per_token = spec.num_hidden_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim) * self.model.dtype.itemsize
        most = self.config.scheduler.max_running * spec.max_position_embeddings
        tokens = cfg.pool_tokens(per_token, self.device, most)
        cache = self.model.new_cache(tokens, cfg.block_size, cfg.prefix_caching)
        logger.info("latent cache: %d blocks of %d tokens (%d tokens, %.1f MiB) on %s", cache.n_blocks,
                    cache.block_size, cache.capacity_tokens, cache.pool.nbytes / 2**20, self.device)
        return cache

    @property
    def micro_batches(self) -> int:
        """Ping-pong micro-batches per step (scheduler.micro_batches); may be changed between steps (in float32 a
        sequence's tokens do not depend on it; in bfloat16 they can, as on any change of batch: see README)."""
        return self._micro_batches

    @micro_batches.setter
    def micro_batches(self, value: int) -> None:
        """A fixed setting (ends 'auto')."""
        if value not in (1, 2) or isinstance(value, bool):
            raise ValueError(f"micro_batches={value!r}: expected 1 or 2")
        if value == 2 and self.config.backend == "ray-dag":
            raise ValueError("micro_batches=2: backend 'ray-dag' runs one layer's compiled graph at a time; use "
                             "backend 'ray' for ping-pong micro-batches")
        self._micro_batches, self.micro_chooser = value, None

    def _decode_kernel(self) -> bool:
        """Whether decode attention runs the Triton paged-MLA kernel: attention_kernel, 'auto' = on CUDA."""
        kind = self.config.attention_kernel
        return kind == "triton" or (kind == "auto" and self.device.type == "cuda")

    def apply_placement(self, placement: Placement) -> None:
        """Re-place the routed experts without stopping: every expert group loads `placement` beside the current
        one while requests keep flowing, the gateway switches to it between two steps (a step in flight
        finishes on the old one), then the groups free what they no longer need. Answers never change: copies
        and moves only change where each (token, expert) pair is computed. Blocks until done; call it from any
        thread but the one stepping the engine. `placement.version` must be above the current one."""
        placement.check_top_m(self.spec.top_k, self.config.top_m_devices)
        pool = getattr(self.backend, "pool", None)
        lock = pool.placement_lock if pool is not None else threading.RLock()
        with lock:  # no replica starts (scaling, replacement) between staging and the switch
            self.backend.stage(placement)
            with self._step_lock:  # between two steps
                self.backend.switch(placement)
                self.model.set_placement(placement)
        self.backend.release()
        self.rearrangements += 1
        logger.info("placement version %d in use (%d redundant slots in the first MoE layer)", placement.version,
                    placement.redundant_slots(self.spec.moe_layers[0]))

    def _rearrange_in_background(self, placement: dict) -> None:
        """Apply a proposed placement on a thread of its own (the step that received it goes on); one at a time."""
        if self._rearranging is not None and self._rearranging.is_alive():
            return
        new = Placement.from_device_lists(placement["devices"], self.spec.n_routed_experts, placement.get("layers"),
                                          self.spec.moe_layers, placement.get("version", 0))

        def run() -> None:
            try:
                self.apply_placement(new)
            except Exception:  # the current placement keeps serving; the next proposal tries again
                self.rearrangement_failures += 1
                logger.exception("re-placement to version %d failed; serving on with version %d", new.version,
                                 self.backend.placement.version)

        self._rearranging = threading.Thread(target=run, name=f"rearrange-v{new.version}", daemon=True)
        self._rearranging.start()

    def wait_rearranged(self, timeout_s: float = 300.0) -> None:
        """Wait for a re-placement in progress to finish (tests, benchmarks, shutdown)."""
        thread = self._rearranging
        if thread is not None:
            thread.join(timeout_s)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One continuous-batching step: every running sequence decodes a token, prompts are prefilled (in chunks
        under scheduler.max_prefill_tokens), all in one forward. Returns the requests that finished."""
        with self._step_lock:
            retired = self._retire(self._take_cancelled())
            with self._queue_lock:
                batch = self.scheduler.schedule()
            if not batch:
                return retired
            chooser = self.micro_chooser
            if chooser is not None:
                self._micro_batches = chooser.next_setting()
            started = time.perf_counter()
            try:
                new = [r.next_input() for r in batch]
                ready = [r.ready_to_sample for r in batch]
                hidden, step = self._forward(
                    self.cache, [r.seq_id for r in batch], [r.computed for r in batch], new,
                    [self._traces_of[r.request_id] for r in batch], [r.span for r in batch if r.span is not None])
                for r in batch:
                    r.computed += r.scheduled
                rows = [row for row, last in zip(step.last_rows(), ready, strict=True) if last]
                logits = self.model.logits(hidden[rows]) if rows else None
                if chooser is not None:
                    chooser.record(self._micro_batches, time.perf_counter() - started, step.n_tokens)
            except Exception as exc:  # a failed dispatch fails this step's requests; the engine keeps serving
                logger.exception("step failed for %d requests", len(batch))
                for r in batch:
                    r.fail(f"{type(exc).__name__}: {exc}")
                return retired + self._retire(batch)
            sampling = [r for r, last in zip(batch, ready, strict=True) if last]  # a prompt's last chunk, or decode
            if not sampling:
                return retired
            # Sampled on the device; the ids are the one thing this step copies to the host (in one transfer),
            # with the logprobs of the requests that asked for them.
            sampled = torch.cat([
                sample((apply_penalties(row, r.prompt, r.output, r.penalties) if r.penalties.active else row)[None],
                       r.temperature, r.top_p, r.generator)
                for r, row in zip(sampling, logits, strict=True)])
            self._book_logprobs(sampling, logits, sampled)
            for r, token in zip(sampling, sampled.tolist(), strict=True):
                self._emit(r, token)
            return retired + self._retire([r for r in sampling if r.done])

    def _forward(
        self, cache: PagedLatentCache | None, seqs: list[int], starts: list[int], new: list[list[int]],
        traces: list[RequestTrace], request_spans: list | None = None,
    ) -> tuple[torch.Tensor, StepBatch]:
        """Run one forward over `new` tokens of each sequence (their cache room reserved; cache None: whole
        prompts, no cache); returns final hidden [N, H] and books the routing."""
        step = StepBatch(seqs, starts, [len(t) for t in new], self.device)
        tokens = torch.tensor([t for ts in new for t in ts], dtype=torch.long).to(self.device)
        one = [n == 1 for n in step.lengths]
        kind = "decode_step" if all(one) else "prefill" if not any(one) else "mixed_step"
        # A step serves many requests: it links to each request's span (continuous batching has no single parent).
        with self._span(kind, links=request_spans, tokens=step.n_tokens, sequences=len(seqs)):
            hidden, routings = self.model.forward(tokens, step, cache, new_tokens=new,
                                                  micro_batches=self.micro_batches)
        self.routing_summary.add(routings)
        self.traces.record_step(traces, step.starts, step.offsets, step.lengths, new, routings,
                                self.model.expert_device)
        if self.balance is not None:
            self.balance.observe(routings, step)
        return hidden, step

    @staticmethod
    def _book_logprobs(sampling: list[Request], logits: torch.Tensor, sampled: torch.Tensor) -> None:
        """Append (logprob of the sampled token, top tokens) to each request that asked for logprobs."""
        wanting = [i for i, r in enumerate(sampling) if r.logprobs is not None]
        if not wanting:
            return
        index = torch.tensor(wanting, device=logits.device)
        chosen, tops = token_logprobs(logits[index], sampled[index], max(sampling[i].logprobs for i in wanting))
        for i, lp, top in zip(wanting, chosen, tops, strict=True):
            sampling[i].token_logprobs.append((lp, top[: sampling[i].logprobs]))

    def _emit(self, r: Request, token: int) -> None:
        """Hand a sampled token to its request: its callback, then whether it is done."""
        r.output.append(token)
        if r.on_token is not None:
            try:
                r.on_token(r, token)
            except Exception as exc:
                self._callback_failed(r, "on_token", exc)
                return
        if token in r.stop_ids:
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
            gone = [r for r in [*waiting, *running] if r.request_id in cancelled]
            self.scheduler.waiting = type(waiting)(r for r in waiting if r.request_id not in cancelled)
        for r in gone:
            r.finish_reason = cancelled[r.request_id]
        return gone

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

    def _span(self, name: str, links: list | None = None, **attributes):
        """A span under the current one (linked to `links` spans), or nothing when tracing is off."""
        if self.telemetry.tracer is None:
            return contextlib.nullcontext()
        from opentelemetry.trace import Link

        return self.telemetry.tracer.start_as_current_span(
            name, attributes={f"expertmesh.{k}": v for k, v in attributes.items()},
            links=[Link(s.get_span_context()) for s in links or []])
