"""ModelRunner: the gateway model on its device; one forward over a step's new tokens (routing booked), sampling."""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from gateway.config import DeploymentConfig, DeploymentConfigError
from gateway.dispatch.dispatcher import Dispatcher
from gateway.model.kv_cache import PagedLatentCache
from gateway.model.model import GatewayModel
from gateway.model.sampling import NOT_SAMPLED, apply_logit_bias, apply_penalties, mask_tokens, sample, token_logprobs
from gateway.model.step import StepBatch
from gateway.serving.balancing import BalanceClient
from gateway.serving.constraints import GrammarCompiler, fill_bitmask, unpack_bitmask
from gateway.serving.micro_batching import MicroBatchChooser
from gateway.serving.routing_summary import RoutingSummary
from gateway.serving.routing_trace import RequestTrace, RoutingTraceStore
from gateway.serving.scheduler import Request
from model_core.spec import ModelSpec

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


def load_model(config: DeploymentConfig, spec: ModelSpec, backend: Dispatcher, device: torch.device,
               tracer=None) -> GatewayModel:
    """The gateway's part of the model on `device`, decode attention by config.attention_kernel ('auto': the Triton
    paged-MLA kernel on CUDA), its MoE layers and their dispatches traced when `tracer` is set."""
    model = GatewayModel(config.model, spec, backend, config.torch_dtype, top_m_devices=config.top_m_devices,
                         device=device, half_matmul=config.half_matmul)
    kernel = config.attention_kernel
    model.use_decode_kernel(kernel == "triton" or (kernel == "auto" and device.type == "cuda"))
    model.tracer = tracer
    backend.set_tracer(tracer)
    return model


def latent_cache(config: DeploymentConfig, spec: ModelSpec, model: GatewayModel) -> PagedLatentCache:
    """The paged latent-cache pool, sized by cache.max_tokens or cache.memory_fraction (at most what
    scheduler.max_running sequences of max_position_embeddings tokens could fill)."""
    per_token = spec.num_hidden_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim) * model.dtype.itemsize
    most = config.scheduler.max_running * spec.max_position_embeddings
    tokens = config.cache.pool_tokens(per_token, model.device, most)
    cache = model.new_cache(tokens, config.cache.block_size, config.cache.prefix_caching)
    logger.info("latent cache: %d blocks of %d tokens (%d tokens, %.1f MiB) on %s", cache.n_blocks,
                cache.block_size, cache.capacity_tokens, cache.pool.nbytes / 2**20, model.device)
    return cache


def traced(tracer, name: str, links: list | None = None, **attributes):
    """A span under the current one (linked to `links` spans), or nothing when tracing is off (tracer None)."""
    if tracer is None:
        return contextlib.nullcontext()
    from opentelemetry.trace import Link

    return tracer.start_as_current_span(name, attributes={f"expertmesh.{k}": v for k, v in attributes.items()},
                                        links=[Link(s.get_span_context()) for s in links or []])


class ModelRunner:
    """Runs the GatewayModel for the engine. `run` forwards a scheduled batch through the latent cache and returns
    the logits of the requests ready to sample; `sample` picks their tokens on the device (structured outputs'
    grammars, compiled by `grammars`, mask their rows there); `score` forwards whole prompts without a cache. Every
    forward books its routing: the running summary, each request's trace, and the balancing client (None:
    balancing off)."""

    def __init__(self, config: DeploymentConfig, model: GatewayModel, routing_summary: RoutingSummary,
                 traces: RoutingTraceStore, balance: BalanceClient | None, tracer=None) -> None:
        self.backend_kind = config.backend
        self.model, self.device = model, model.device
        self.routing_summary, self.traces, self.balance, self.tracer = routing_summary, traces, balance, tracer
        self.grammars = GrammarCompiler(config.model, model.spec.vocab_size, model.spec.eos_token_id)
        self._micro_batches = 1
        self.micro_chooser = None  # scheduler.micro_batches 'auto': measures both settings while serving
        if config.scheduler.micro_batches == "auto":
            self.micro_chooser = MicroBatchChooser()
        else:
            self.micro_batches = config.scheduler.micro_batches

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
        if value == 2 and self.backend_kind == "ray-dag":
            raise ValueError("micro_batches=2: backend 'ray-dag' runs one layer's compiled graph at a time; use "
                             "backend 'ray' for ping-pong micro-batches")
        self._micro_batches, self.micro_chooser = value, None

    def run(self, batch: list[Request], cache: PagedLatentCache,
            traces: list[RequestTrace]) -> tuple[list[Request], torch.Tensor | None]:
        """Forward each request's next `scheduled` tokens (their cache room reserved) in one step; returns the
        requests ready to sample (a prompt's last chunk, or a decode) and their logits [S, V] (None when none)."""
        chooser = self.micro_chooser
        if chooser is not None:
            self._micro_batches = chooser.next_setting()
        started = time.perf_counter()
        ready = [r.ready_to_sample for r in batch]  # before `computed` moves on
        hidden, step = self.forward(cache, [r.seq_id for r in batch], [r.computed for r in batch],
                                    [r.next_input() for r in batch], traces,
                                    [r.span for r in batch if r.span is not None])
        for r in batch:
            r.computed += r.scheduled
        rows = [row for row, last in zip(step.last_rows(), ready, strict=True) if last]
        logits = self.model.logits(hidden[rows]) if rows else None
        if chooser is not None:
            chooser.record(self._micro_batches, time.perf_counter() - started, step.n_tokens)
        return [r for r, last in zip(batch, ready, strict=True) if last], logits

    def score(self, seqs: list[int], prompts: list[list[int]], traces: list[RequestTrace]) -> list[torch.Tensor]:
        """Whole prompts in one forward with no cache: one float32 host tensor [len_i, V] of logits per prompt."""
        hidden, step = self.forward(None, seqs, [0] * len(prompts), [list(p) for p in prompts], traces)
        logits = self.model.logits(hidden).cpu()  # scoring returns logits to the caller: one host copy
        return [logits[o : o + n].clone() for o, n in zip(step.offsets, step.lengths, strict=True)]

    def forward(
        self, cache: PagedLatentCache | None, seqs: list[int], starts: list[int], new: list[list[int]],
        traces: list[RequestTrace], request_spans: list | None = None,
    ) -> tuple[torch.Tensor, StepBatch]:
        """Run one forward over `new` tokens of each sequence (cache None: whole prompts, no cache); returns the
        final hidden states [N, H] and books the routing."""
        step = StepBatch(seqs, starts, [len(t) for t in new], self.device)
        tokens = torch.tensor([t for ts in new for t in ts], dtype=torch.long).to(self.device)
        one = [n == 1 for n in step.lengths]
        kind = "decode_step" if all(one) else "prefill" if not any(one) else "mixed_step"
        # A step serves many requests: it links to each request's span (continuous batching has no single parent).
        with traced(self.tracer, kind, links=request_spans, tokens=step.n_tokens, sequences=len(seqs)):
            hidden, routings = self.model.forward(tokens, step, cache, new_tokens=new,
                                                  micro_batches=self.micro_batches)
        self.routing_summary.add(routings)
        self.traces.record_step(traces, step.starts, step.offsets, step.lengths, new, routings)
        if self.balance is not None:
            self.balance.observe(routings, step)
        return hidden, step

    def sample(self, requests: list[Request], logits: torch.Tensor) -> list[int | None]:
        """One token per request from its logits row [V] (penalties, logit_bias, its grammar's mask, temperature,
        top-p, its generator), sampled on the device; the ids are the one thing a step copies to the host (in one
        transfer), with the logprobs of the requests that asked for them (booked in `request.token_logprobs`, the
        model's own: before penalties, bias and mask). Each constrained request's grammar then takes its token.

        A request whose row cannot be sampled (its distribution is not finite, sampling it raised, its grammar
        failed or refused the token) gets None and is failed, naming why; the others sample exactly as they would
        without it: free rows are never touched by another request's bias or mask."""
        failed: dict[int, str] = {}
        allowed = self._grammar_masks(requests, logits.shape[-1], logits.device, failed)
        rows = []
        for i, (r, row) in enumerate(zip(requests, logits, strict=True)):
            token = None
            if i not in failed:  # else its grammar failed
                try:
                    token = self._sample_row(r, row, allowed.get(i))
                except Exception as exc:  # this request's settings or state: it fails alone
                    logger.exception("request %s: sampling raised", r.request_id)
                    failed[i] = f"sampling raised {type(exc).__name__}: {exc}"
            rows.append(token if token is not None else
                        torch.full((1,), NOT_SAMPLED, dtype=torch.long, device=logits.device))
        sampled = torch.cat(rows)  # [S]
        wanting = [i for i, r in enumerate(requests) if r.logprobs is not None]
        tops: list = []
        if wanting:
            index = torch.tensor(wanting, device=logits.device)
            tops = list(zip(wanting, *token_logprobs(logits[index], sampled[index].clamp(min=0),
                                                     max(requests[i].logprobs for i in wanting)), strict=True))
        tokens: list[int | None] = sampled.tolist()
        for i, token in enumerate(tokens):
            if token == NOT_SAMPLED:
                failed.setdefault(i, "sampling: the next-token distribution is not finite (NaN or inf logits after "
                                     "penalties and temperature)")
            elif requests[i].constraint is not None and i not in failed:
                why = requests[i].constraint.advance(token)
                if why is not None:
                    logger.error("request %s: %s", requests[i].request_id, why)
                    failed[i] = why
        for i, lp, top in tops:
            if i not in failed:
                requests[i].token_logprobs.append((lp, top[: requests[i].logprobs]))
        for i, why in failed.items():
            requests[i].fail(why)
            tokens[i] = None
        return tokens

    @staticmethod
    def _sample_row(r: Request, row: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """One request's token [1] from its logits row [V]: penalties, logit_bias, its grammar's mask, sampling."""
        scored = apply_penalties(row, r.prompt, r.output, r.penalties) if r.penalties.active else row
        if r.logit_bias is not None:
            scored = apply_logit_bias(scored, *r.logit_bias)
        if allowed is not None:
            scored = mask_tokens(scored, allowed)
        return sample(scored[None], r.temperature, r.top_p, r.generator)

    def _grammar_masks(self, requests: list[Request], vocab: int, device: torch.device,
                       failed: dict[int, str]) -> dict[int, torch.Tensor]:
        """Row index -> the allowed next tokens [V] bool (on `device`) of each constrained request: one bitmask
        filled on the host for all of them, one copy to the device. A grammar in an error state fails its request
        (booked in `failed`)."""
        constrained = [i for i, r in enumerate(requests) if r.constraint is not None]
        if not constrained:
            return {}
        try:
            bits = fill_bitmask([requests[i].constraint for i in constrained], vocab, pin=device.type == "cuda")
            masks = unpack_bitmask(bits, vocab, device)  # [C, V]
        except Exception as exc:
            logger.exception("grammar masks failed for %d requests", len(constrained))
            failed.update((i, f"structured output: computing the token mask raised {type(exc).__name__}: {exc}")
                          for i in constrained)
            return {}
        for i in constrained:
            c = requests[i].constraint
            if c.matcher.is_error():
                failed[i] = f"{c.field}: the grammar failed ({c.error()})"
        return {i: masks[j] for j, i in enumerate(constrained)}
