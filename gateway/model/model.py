"""The gateway model: all but the routed experts (embeddings, MLA, dense MLPs, router, shared experts, head)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gateway.dispatch.dispatcher import Dispatcher
from gateway.model.kv_cache import PagedLatentCache
from gateway.model.layers import RotaryEmbedding, rms_norm
from gateway.model.mla import MLAttention
from gateway.model.step import StepBatch
from model_core.checkpoint import CheckpointReader
from model_core.ffn import swiglu
from model_core.half_matmul import linear, matmul_dtype
from model_core.layout import gateway_layout
from model_core.spec import ModelSpec
from router_service.accounting import compare_routing, count_routing
from router_service.placement import Placement
from router_service.routing import Routing, concat_routings, route_tokens, select_experts

# Shape legend: N = tokens in the step, H = hidden, V = vocab, K = experts per token.


@dataclass
class LayerWeights:
    """One decoder layer's gateway-side weights (short names, no 'model.layers.L.' prefix)."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    attention: MLAttention
    mlp: tuple[torch.Tensor, torch.Tensor] | None  # dense layers: (gate_up [2I, H], down [H, I]), for swiglu
    gate: torch.Tensor | None  # MoE layers: router weight [E, H]
    model_bias: torch.Tensor | None  # MoE layers: the checkpoint's e_score_correction_bias [E] (V3), else None
    selection_bias: torch.Tensor | None  # the bias routing uses now: model_bias, or the live balancing bias
    shared: tuple[torch.Tensor, torch.Tensor] | None  # MoE layers with shared experts: like mlp


class GatewayModel:
    """Loads only the gateway's tensors and runs one forward step over a ragged batch."""

    def __init__(
        self,
        model_dir: str | Path,
        spec: ModelSpec,
        backend: Dispatcher,
        dtype: torch.dtype,
        top_m_devices: int | None = None,
        device: torch.device | str = "cpu",
        half_matmul: str = "auto",
    ) -> None:
        """device: where every tensor of the per-token path lives (weights, latent cache, routing, combine);
        half_matmul: how a half-precision model multiplies on a CPU (model_core.half_matmul.matmul_dtype)."""
        self.spec, self.backend, self.dtype = spec, backend, dtype
        self.device = torch.device(device)
        self.matmul_dtype = matmul_dtype(dtype, self.device, half_matmul)  # matmul weights are held in it
        backend_device = getattr(backend, "device", self.device)
        if backend_device != self.device:
            raise ValueError(f"device={self.device}: the dispatcher plans on {backend_device}; both must be the "
                             "gateway's device (gateway_device)")
        self.top_m_devices = top_m_devices
        self.tracer = None  # an OpenTelemetry tracer when tracing is on: one span per MoE layer
        self.set_placement(backend.placement)
        self.reader = CheckpointReader.for_model(model_dir, spec)  # refuses a checkpoint the config does not fit
        w = {}
        for name, shape in gateway_layout(spec).items():
            keep_fp32 = name.endswith("e_score_correction_bias")
            # Cast on the host (the read is there anyway), so the device receives each tensor once, at its dtype.
            tensor = self.reader.get(name, shape, torch.float32 if keep_fp32 else dtype)
            if is_matmul_weight(name):  # rounded to the model's dtype first: widening keeps exactly its values
                tensor = tensor.to(self.matmul_dtype)
            w[name] = tensor.to(self.device)
        self.embed = w["model.embed_tokens.weight"]
        self.final_norm = w["model.norm.weight"]
        self.lm_head = self.embed.to(self.matmul_dtype) if spec.tie_word_embeddings else w["lm_head.weight"]
        rope = RotaryEmbedding(spec.rope, spec.qk_rope_head_dim, spec.rope_interleave, self.device)
        self.layers = [self._layer(w, i, rope) for i in range(spec.num_hidden_layers)]

    def set_placement(self, placement: Placement) -> None:
        """Route by `placement` (a Placement) from the next step: top-M routing's device partition per MoE layer
        (with copies an expert belongs to every device hosting it) and the base expert -> device map."""
        self.device_members = None if self.top_m_devices is None else {
            layer: placement.members(layer).to(self.device) for layer in self.spec.moe_layers}
        self.expert_device = placement.device_tensor().to(self.device)
        self.n_devices = placement.n_devices

    def _layer(self, w: dict[str, torch.Tensor], i: int, rope: RotaryEmbedding) -> LayerWeights:
        p = f"model.layers.{i}."
        attn = {k.removeprefix(p + "self_attn."): v for k, v in w.items() if k.startswith(p + "self_attn.")}

        def ffn(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
            gate, up = (w.pop(f"{p}{prefix}.{m}_proj.weight") for m in ("gate", "up"))  # freed once joined
            return torch.cat([gate, up]), w[f"{p}{prefix}.down_proj.weight"]  # one matmul for gate and up

        moe = self.spec.is_moe_layer(i)
        return LayerWeights(
            input_norm=w[p + "input_layernorm.weight"],
            post_attention_norm=w[p + "post_attention_layernorm.weight"],
            attention=MLAttention(self.spec, i, attn, rope),
            mlp=None if moe else ffn("mlp"),
            gate=w[p + "mlp.gate.weight"] if moe else None,
            model_bias=w.get(p + "mlp.gate.e_score_correction_bias") if moe else None,
            selection_bias=w.get(p + "mlp.gate.e_score_correction_bias") if moe else None,
            shared=ffn("mlp.shared_experts") if moe and self.spec.n_shared_experts else None,
        )

    def _moe_begin(
        self, i: int, layer: LayerWeights, u: torch.Tensor, seq_index: torch.Tensor, n_seqs: int
    ) -> tuple[Any, torch.Tensor | None, Routing]:
        """Route and dispatch the routed experts, then compute the shared experts and the routing's accounting
        while they run: (the pending combine, the shared experts' output or None, the accounted routing).
        seq_index: [N] each token's sequence in the (micro-)batch."""
        spec = self.spec
        bias = layer.selection_bias  # read once: the balance client may swap it between layers
        members = self.device_members[i] if self.device_members is not None else None
        routing = route_tokens(u, layer.gate, spec.router, bias, members, self.top_m_devices)
        pending = self.backend.dispatch(i, u, routing.ids, routing.weights, routing.devices)
        shared = swiglu(u, *layer.shared) if layer.shared is not None else None  # overlaps the dispatch
        device_rows = pending.tokens_per_device(self.n_devices)  # the plan knows which copy served each token
        routing = self._account(routing, layer, bias, seq_index, n_seqs, device_rows)  # so does the accounting
        return pending, shared, dataclasses.replace(routing, served=pending.served_devices())  # and the trace

    def _account(
        self, routing: Routing, layer: LayerWeights, bias: torch.Tensor | None, seq_index: torch.Tensor, n_seqs: int,
        tokens_per_device: torch.Tensor | None = None,
    ) -> Routing:
        """The layer's one accounting pass: token counts always; the comparison with the model's own routing
        only when serving could have changed it (device limit, live bias)."""
        spec = self.spec
        counts = count_routing(routing.ids, spec.n_routed_experts, self.expert_device, self.n_devices, seq_index,
                               n_seqs, tokens_per_device)
        limited, biased = self.top_m_devices is not None, bias is not layer.model_bias
        change = None
        if limited or biased:
            # The model's own choice to compare with, and with both, the live-bias choice before the limit,
            # to tell the two causes apart.
            exact = select_experts(routing.scores, spec.router, layer.model_bias).ids
            unlimited = select_experts(routing.scores, spec.router, bias).ids if limited and biased else None
            change = compare_routing(routing.ids, exact, unlimited, limited, biased)
        return dataclasses.replace(routing, counts=counts, change=change)

    def new_cache(self, max_tokens: int = 4096, block_size: int = 16, prefix_caching: bool = True) -> PagedLatentCache:
        """A paged latent cache on the model's device holding `max_tokens` tokens (rounded up to whole blocks)."""
        return PagedLatentCache(self.spec.num_hidden_layers, self.spec.kv_lora_rank, self.spec.qk_rope_head_dim,
                                self.dtype, self.device, n_blocks=-(-max_tokens // block_size), block_size=block_size,
                                prefix_caching=prefix_caching)

    def use_decode_kernel(self, enabled: bool) -> None:
        """Decode attention with the Triton paged-MLA kernel (CUDA) instead of batched torch."""
        for layer in self.layers:
            layer.attention.use_kernel = enabled

    def forward(
        self, tokens: torch.Tensor, step: StepBatch, cache: PagedLatentCache | None, absorb: bool | None = None,
        new_tokens: list[list[int]] | None = None, micro_batches: int = 1,
    ) -> tuple[torch.Tensor, dict[int, Routing]]:
        """tokens: [N] on the model's device -> final normed hidden states [N, H] and each MoE layer's routing
        (both on the model's device). Every sequence in `step` needs cache room for its new tokens (reserve);
        its cache length advances by them; with `new_tokens` (each sequence's ids) the blocks they complete join the
        prefix cache. cache None scores whole sequences with no cache (starts all 0).

        micro_batches 2 (ping-pong): the step's sequences in two contiguous halves (by tokens), staggered through
        the layers — while one half's routed experts compute, the other runs its attention and shared experts.
        Each sequence computes what it computes in one batch; hidden states and routings come back in step order.
        """
        tokens = tokens.to(self.device)
        parts = split_sequences(step.lengths, micro_batches)
        runs = []
        for lo, hi in parts:
            sub = step if (lo, hi) == (0, len(step.lengths)) else StepBatch(
                step.seq_ids[lo:hi], step.starts[lo:hi], step.lengths[lo:hi], self.device)
            first = step.offsets[lo]
            runs.append(self._layers(tokens[first : first + sub.n_tokens], sub, cache, absorb))
        results = interleave(runs)
        if len(results) == 1:
            hidden, routings = results[0]
        else:
            hidden = torch.cat([h for h, _ in results])
            routings = {i: concat_routings([r[i] for _, r in results]) for i in results[0][1]}
        if cache is not None:
            for i, (seq_id, n) in enumerate(zip(step.seq_ids, step.lengths, strict=True)):
                cache.advance(seq_id, n, None if new_tokens is None else new_tokens[i])
        return hidden, routings

    def _layers(self, tokens: torch.Tensor, step: StepBatch, cache: PagedLatentCache | None, absorb: bool | None):
        """One (micro-)batch's pass through every layer, as a generator that pauses right after each MoE layer's
        dispatch (so another micro-batch can run meanwhile); its return value is (normed hidden [N, H], routings)."""
        spec = self.spec
        plan = None if cache is None else cache.plan(step, [n == 1 and absorb is not False for n in step.lengths])
        h = F.embedding(tokens, self.embed)  # [N, H]
        n_seqs = len(step.lengths)
        seq_index = torch.repeat_interleave(torch.arange(n_seqs, device=self.device),
                                            torch.tensor(step.lengths, device=self.device))  # [N]
        routings: dict[int, Routing] = {}
        for i, layer in enumerate(self.layers):
            u = rms_norm(h, layer.input_norm, spec.rms_norm_eps)
            h = h + layer.attention.forward(u, step, cache, plan, absorb)
            u = rms_norm(h, layer.post_attention_norm, spec.rms_norm_eps)
            if layer.mlp is not None:
                h = h + swiglu(u, *layer.mlp)
                continue
            span = None
            if self.tracer is None:
                pending, shared, routing = self._moe_begin(i, layer, u, seq_index, n_seqs)
            else:  # current only while dispatching (its device spans are its children), ended once combined
                from opentelemetry import trace

                span = self.tracer.start_span("moe_layer", attributes={"expertmesh.layer": i,
                                                                       "expertmesh.tokens": int(u.shape[0])})
                with trace.use_span(span, end_on_exit=False):
                    pending, shared, routing = self._moe_begin(i, layer, u, seq_index, n_seqs)
            yield  # the experts compute; another micro-batch may run here
            routed = pending.wait()
            h = h + (routed if shared is None else routed + shared)
            routings[i] = routing
            if span is not None:
                if span.is_recording():
                    span.set_attribute("expertmesh.experts_hit", int((routing.counts.tokens_per_expert > 0).sum()))
                span.end()
        return rms_norm(h, self.final_norm, spec.rms_norm_eps), routings

    def set_selection_bias(self, biases: dict[int, torch.Tensor]) -> None:
        """Route MoE layer L with biases[L] from now on (the live balancing bias)."""
        for layer, bias in biases.items():
            entry = self.layers[layer]
            bias = bias.to(self.device, torch.float32)
            model = entry.model_bias if entry.model_bias is not None else torch.zeros_like(bias)
            # Identity with model_bias marks "the model's own routing" (no comparison routing needed).
            entry.selection_bias = entry.model_bias if torch.equal(bias, model) else bias

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> float32 logits [N, V]."""
        return linear(hidden, self.lm_head).float()


def split_sequences(lengths: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous sequence ranges [lo, hi) for `parts` micro-batches (1 or 2), the two halves as even in tokens as
    a cut between sequences allows; one range when there are fewer sequences than parts."""
    n = len(lengths)
    if parts < 2 or n < 2:
        return [(0, n)]
    total, run, best, cut = sum(lengths), 0, None, 1
    for i in range(1, n):
        run += lengths[i - 1]
        if best is None or abs(2 * run - total) < best:
            best, cut = abs(2 * run - total), i
    return [(0, cut), (cut, n)]


def interleave(runs: list) -> list:
    """Drive generator passes in turn, each to its next pause, until all return; their return values in order."""
    results: list = [None] * len(runs)
    live = list(range(len(runs)))
    while live:
        for j in list(live):
            try:
                next(runs[j])
            except StopIteration as done:
                results[j] = done.value
                live.remove(j)
    return results


def is_matmul_weight(name: str) -> bool:
    """Whether a gateway tensor is a matmul weight (held in matmul_dtype), not a norm, embedding or bias."""
    return name.endswith(("_proj.weight", "mlp.gate.weight")) or name == "lm_head.weight"
