"""The public Python API: load a checkpoint, score prompts, submit and generate tokens, scale, inspect, close."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gateway.config import DeploymentConfig, RayConfig, RpcConfig
from gateway.dispatch.dispatcher import Dispatcher
from gateway.dispatch.groups import build_dispatcher
from gateway.dispatch.transports import DispatchError
from gateway.model.sampling import Penalties, token_logprobs
from gateway.serving.engine_core import EngineCore, gateway_device
from gateway.serving.routing_trace import RequestTrace
from gateway.serving.scheduler import Request
from model_core.spec import ModelSpec
from router_service.placement import Placement
from router_service.service import report_table

logger = logging.getLogger(__name__)
MAX_LOGPROBS = 20  # top tokens a request may ask logprobs for (vLLM's default limit; OpenAI's completions allow 5)


class Engine(EngineCore):
    """A DeepSeek-V2/V3 model served as gateway + expert backend (EngineCore does the stepping).

    >>> engine = Engine.from_pretrained("models/tiny-v3", backend="local")
    >>> engine.generate([[1, 2, 3]], max_new_tokens=8)
    """

    def __init__(self, config: DeploymentConfig, spec: ModelSpec, backend: Dispatcher, dtype: torch.dtype) -> None:
        super().__init__(config, spec, backend, dtype)
        self.last_request_ids: list[str] = []  # one per prompt of the latest generate() / logits() call

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        backend: str = "local",
        dtype: str = "float32",
        devices: int = 1,
        top_m_devices: int | None = None,
        placement: str = "contiguous",
        address: str | None = None,
        cpus_per_group: float = 1.0,
        timeout_s: float = 30.0,
        expert_kernel: str = "auto",
        gateway_device: str = "auto",
        half_matmul: str = "auto",
    ) -> Engine:
        """Load a Hugging Face DeepSeek-V2/V3 checkpoint directory and start its expert groups.

        backend: 'local' (experts in this process), 'ray' (one actor per device, Ray calls) or 'grpc' (the same
        actors, reached over gRPC). devices: expert groups; placement: 'contiguous' or a placement file;
        top_m_devices: None for the model's exact routing, M to cap each token at M devices. address: a Ray
        cluster to join (default: RAY_ADDRESS, else Ray starts embedded in this process). expert_kernel: 'auto'
        (Triton on GPU, torch on CPU), 'triton' or 'torch'. gateway_device: where the gateway's per-token path
        runs, 'auto' (CUDA when visible, else CPU), 'cpu', 'cuda' or 'cuda:N'; local expert groups share it.
        half_matmul: a bfloat16/float16 model's matmuls on a CPU, 'native' or 'float32' (weights widened exactly;
        'auto': float32 where the CPU lacks the instructions), see model_core/half_matmul.py.
        """
        config = DeploymentConfig(
            model=str(model_dir),
            dtype=dtype,
            backend=backend,
            devices=devices,
            placement=placement,
            top_m_devices=top_m_devices,
            expert_kernel=expert_kernel,
            gateway_device=gateway_device,
            half_matmul=half_matmul,
            ray=RayConfig(address=address, cpus_per_group=cpus_per_group),
            rpc=RpcConfig(timeout_s=timeout_s),
        )
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: DeploymentConfig) -> Engine:
        """Start a deployment described by a DeploymentConfig (a YAML file parsed by DeploymentConfig.from_yaml)."""
        spec = ModelSpec.from_dir(config.model)
        n = spec.n_routed_experts
        if config.placement == "contiguous":
            placement = Placement.contiguous(n, config.devices)
        else:
            placement = Placement.from_file(config.placement, n, spec.moe_layers)
        if placement.n_devices != config.devices:
            raise ValueError(
                f"placement {config.placement}: has {placement.n_devices} devices, but devices={config.devices}"
            )
        placement.check_top_m(spec.top_k, config.top_m_devices)
        gateway_device(config)  # a GPU this process cannot see fails here, naming the setting, before any loading
        backend = build_dispatcher(config, spec, placement)
        try:
            return cls(config, spec, backend, config.torch_dtype)
        except Exception:
            backend.close()
            raise

    def balance_stats(self, sync: bool = True) -> dict:
        """The router service's view (last closed window per layer, bias version) plus this gateway's metrics.

        sync: first push this gateway's pending counts and fetch the current bias (blocks on the service).
        """
        if self.balance is None:
            return {"mode": "off", "last_window": []}
        if sync:
            self.balance.sync()
        try:
            stats = self.balance.call("stats")
        except Exception as exc:  # the service is down: report what this gateway knows
            logger.warning("router service stats unavailable", exc_info=True)
            stats = {"mode": self.config.balancing.mode, "last_window": [], "error": str(exc)}
        return {**stats, "gateway": self.balance.metrics()}

    def stats_table(self) -> str:
        """The live per-layer balance table (what `expertmesh stats` prints)."""
        stats = self.balance_stats()
        head = (f"balancing mode={stats['mode']} bias version={stats.get('version', '-')} "
                f"windows closed={stats.get('windows_closed', 0)} gateway={stats.get('gateway', {})}")
        if not stats["last_window"]:
            return head + "\n(no window closed yet)"
        return head + "\n" + report_table(stats["last_window"])

    def scale(self, group: int, replicas: int) -> list[int]:
        """Run `replicas` replicas of expert group `group` (ray / grpc backends). New replicas load their
        weights before they take traffic; removed ones drain first; requests keep flowing meanwhile."""
        pool = getattr(self.backend, "pool", None)
        if pool is None:
            raise ValueError(f"backend={self.config.backend!r}: scaling needs the ray or grpc backend")
        return pool.scale(group, replicas)

    def routing_trace(self, request_id: str) -> RequestTrace:
        """The routing a request received: experts, weights and devices per token position and MoE layer.

        A running request's trace is a snapshot of what it has run so far. Raises KeyError when the id was never
        seen or has been evicted (see tracing.routing_trace_capacity and tracing.routing_trace_max_mb).
        """
        return self.traces.get(request_id)

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

    def _check_prompts(self, prompts: list[list[int]], max_new_tokens: int = 0, single: bool = False) -> None:
        """Errors name the prompt: `prompts[i]` for a batch, `prompt` for one submitted request."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts: expected a non-empty list of token-id lists")
        vocab, limit = self.spec.vocab_size, self.spec.max_position_embeddings
        for i, p in enumerate(prompts):
            field = "prompt" if single else f"prompts[{i}]"
            if not isinstance(p, (list, tuple)) or not p:
                raise ValueError(f"{field}: expected a non-empty list of token ids")
            bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{field}: token ids {bad[:5]} are outside [0, vocab_size={vocab})")
            if len(p) + max_new_tokens > limit:
                raise ValueError(
                    f"{field}: {len(p)} tokens + max_new_tokens={max_new_tokens} exceeds "
                    f"max_position_embeddings={limit}"
                )
            if max_new_tokens and self.cache.blocks_for(len(p) + max_new_tokens) > self.cache.n_blocks:
                raise ValueError(
                    f"{field}: {len(p)} tokens + max_new_tokens={max_new_tokens} can never fit the latent cache "
                    f"({self.cache.capacity_tokens} tokens: cache.max_tokens / cache.memory_fraction)")

    def _begin(self, prompts: list[list[int]], request_ids: list[str] | None) -> tuple[list[int], list[RequestTrace]]:
        """Sequence ids and routing traces for a call's prompts (request ids given or generated)."""
        if request_ids is None:
            request_ids = [uuid.uuid4().hex[:16] for _ in prompts]
        elif len(request_ids) != len(prompts) or len(set(request_ids)) != len(request_ids):
            raise ValueError(f"request_ids: expected {len(prompts)} distinct ids, one per prompt")
        self.last_request_ids = list(request_ids)
        traces = [self.traces.start(r, self.spec.moe_layers, self.spec.top_k, list(p))
                  for r, p in zip(request_ids, prompts, strict=True)]
        return [next(self._seq_ids) for _ in prompts], traces

    @torch.inference_mode()
    def logits(self, prompts: list[list[int]], request_ids: list[str] | None = None) -> list[torch.Tensor]:
        """Full-sequence logits of a ragged batch: one float32 host tensor [len_i, vocab] per prompt."""
        with self._step_lock:
            return self._logits(prompts, request_ids)

    def _logits(self, prompts: list[list[int]], request_ids: list[str] | None) -> list[torch.Tensor]:
        self._check_prompts(prompts)
        seqs, traces = self._begin(prompts, request_ids)
        try:  # whole prompts in one forward with no cache: nothing to keep afterwards
            with self._span("logits", request_ids=self.last_request_ids, prompts=len(prompts)):
                hidden, step = self._forward(None, seqs, [0] * len(prompts), [list(p) for p in prompts], traces)
                logits = self.model.logits(hidden)
            logits = logits.cpu()  # scoring returns logits to the caller: one host copy, whatever the device
            return [logits[o : o + n].clone() for o, n in zip(step.offsets, step.lengths, strict=True)]
        finally:
            for t in traces:
                self.traces.finish(t.request_id)

    def prompt_logprobs(self, prompt: list[int], top: int) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """Each prompt position's logprob given the positions before it (None for the first) and the `top` most
        likely tokens there (empty for the first), scored in one forward without the cache (`logits`)."""
        logits = self.logits([prompt])[0]  # [L, V] float32 on the host
        if len(prompt) < 2:
            return [(None, [])]
        chosen, tops = token_logprobs(logits[:-1], torch.tensor(prompt[1:]), top)
        return [(None, [])] + list(zip(chosen, tops, strict=True))

    def submit(
        self,
        prompt: list[int],
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        request_id: str | None = None,
        on_token: Callable[[Request, int], None] | None = None,
        on_finish: Callable[[Request], None] | None = None,
        trace_context: Any = None,
        penalties: Penalties | None = None,
        logprobs: int | None = None,
    ) -> Request:
        """Queue one request for continuous batching; `step()` (or the serving loop) runs it.

        trace_context: an OpenTelemetry context (a client's, from its `traceparent`) the request's span continues;
        None: the current context. penalties: presence / frequency / repetition (gateway.model.sampling);
        logprobs: book the model's logprob of each sampled token and of the `logprobs` most likely ones (0 to
        MAX_LOGPROBS) in `request.token_logprobs`.

        Raises ValueError naming the bad field, QueueFull when scheduler.max_waiting requests already wait.
        on_token(request, token) and on_finish(request) are called on the thread that runs `step()`; one that
        raises fails this request alone (finish_reason 'error', the error names the callback).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature={temperature!r}: expected a number >= 0")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r}: expected 0 < top_p <= 1")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= min(MAX_LOGPROBS, self.spec.vocab_size)):
            raise ValueError(f"logprobs={logprobs!r}: expected null or an integer in [0, "
                             f"{min(MAX_LOGPROBS, self.spec.vocab_size)}]")
        self._check_prompts([prompt], max_new_tokens, single=True)
        request = Request(
            request_id=request_id or uuid.uuid4().hex[:16], prompt=list(prompt), max_new_tokens=max_new_tokens,
            temperature=float(temperature), top_p=float(top_p),
            stop_ids=frozenset([self.spec.eos_token_id]) if stop_at_eos and self.spec.eos_token_id is not None
            else frozenset(),
            # On the gateway's device: sampling stays there (see gateway.model.sampling on seeds across devices).
            generator=torch.Generator(self.device).manual_seed(seed) if seed is not None else None,
            on_token=on_token, on_finish=on_finish, penalties=penalties or Penalties(), logprobs=logprobs,
        )
        if self.telemetry.tracer is not None:  # one span per request, from submission to its last token
            request.span = self.telemetry.tracer.start_span("request", context=trace_context, attributes={
                "expertmesh.request_id": request.request_id, "expertmesh.prompt_tokens": len(prompt),
                "expertmesh.max_new_tokens": max_new_tokens})
        try:
            with self._queue_lock:
                self.scheduler.add(request)  # QueueFull before anything is allocated
                try:
                    self._traces_of[request.request_id] = self.traces.start(
                        request.request_id, self.spec.moe_layers, self.spec.top_k, list(prompt))
                except ValueError:
                    self.scheduler.waiting.pop()
                    raise
        except Exception:
            if request.span is not None:
                request.span.end()
            raise
        return request

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        """Stop a request at the next step, finishing with `reason`: 'cancelled' (its client went away) or 'stop'
        (the caller found a stop string in its text)."""
        if reason not in ("cancelled", "stop"):
            raise ValueError(f"reason={reason!r}: expected 'cancelled' or 'stop'")
        with self._queue_lock:
            self._cancelled.setdefault(request_id, reason)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        request_ids: list[str] | None = None,
    ) -> list[list[int]]:
        """New tokens for each prompt, through the continuous-batching scheduler (prompts that fit the token
        budget prefill together, then one decode step per token over the live batch).

        A sequence stops after max_new_tokens or after emitting the model's eos token (kept in the output).
        Each prompt is one request: its id (given, or generated) is in `engine.last_request_ids` afterwards,
        and `engine.routing_trace(request_id)` returns the routing it received. seed: request i samples
        with a generator seeded seed + i.
        """
        self._check_prompts(prompts, max_new_tokens if isinstance(max_new_tokens, int) else 0)
        if request_ids is not None and (len(request_ids) != len(prompts) or len(set(request_ids)) != len(request_ids)):
            raise ValueError(f"request_ids: expected {len(prompts)} distinct ids, one per prompt")
        requests = []
        with self._span("generate", prompts=len(prompts), max_new_tokens=max_new_tokens):
            for i, prompt in enumerate(prompts):
                requests.append(self.submit(
                    prompt, max_new_tokens, temperature, top_p, None if seed is None else seed + i, stop_at_eos,
                    request_ids[i] if request_ids else None))
            self.last_request_ids = [r.request_id for r in requests]
            while not all(r.done for r in requests):
                self.step()
        failed = [r for r in requests if r.error]
        if failed:
            raise DispatchError(f"request {failed[0].request_id}: {failed[0].error}")
        return [r.output for r in requests]
