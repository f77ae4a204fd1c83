"""Cost model for planning a deployment: the time of a decode step from what its dispatch sends, at given hardware
rates (hardware.py).

Pure functions of counts. The planner's replay (replay.py) runs routing through the project's own placement and
dispatch-plan code and hands the counts here; nothing here knows how they were obtained.

What one decode step is, as modelled (every assumption the numbers rest on):

- G gateways (data-parallel attention replicas, one GPU each) each run `batch` sequences and produce one token per
  sequence per step; D expert groups, one GPU each, serve every gateway. Per-GPU throughput divides by D + G.
- A gateway GPU runs, per layer, MLA attention over `context` cached tokens per sequence (absorbed decode), the
  shared experts and the router gate (MoE layers) or the dense MLP (the first `first_k_dense_replace` layers), then
  the LM head once per step. Embeddings, norms, rotary and sampling are left out (small next to these).
- Every kernel runs at its roofline: max(FLOPs / matmul rate, bytes read / HBM bandwidth) at the hardware file's
  rates. Nominal rates are peaks; real kernels reach a fraction of them (calibrate to replace them).
- An expert group reads the weights of each expert it serves in the step once (3 matrices of H x I) and computes
  2·3·H·I FLOPs per (token, expert) pair. Activation reads, the combine's scatter-add and kernel launches are left out.
- Dispatch, then experts, then combine. Each is a phase whose time is its slowest endpoint: a gateway sends its
  rows to each device it reaches (one message per device) and a device receives one message per gateway that
  reaches it; combine is the same with the partial sums flowing back. An endpoint's time is
  max(intra-node bytes / NVLink bandwidth, inter-node bytes / InfiniBand bandwidth) (separate links, used at once)
  plus its messages x the per-message latency of their link. Switch contention, congestion and the memcpy into and
  out of transport buffers are left out.
- Nodes hold `gpus_per_node` expert groups each (device d on node d // gpus_per_node); gateway g is on node
  g mod (number of expert nodes): its traffic to devices on that node is intra-node, the rest inter-node.
- Without overlap a MoE layer costs gateway + dispatch + experts + combine. With overlap (DeepSeek's two
  micro-batches: one's attention runs while the other's all-to-all and experts do) it costs
  max(gateway, dispatch + experts + combine); the split's own costs (twice the messages, weights read twice) are
  left out, so overlap is an optimistic bound.
- Memory capacity does not enter the time: memory.py counts each GPU's bytes and checks them on their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deploy.planning.hardware import ExpertRate, Hardware, TransportRate
from model_core.spec import ModelSpec

# Shape legend: D = expert devices (groups), G = gateways.


@dataclass(frozen=True)
class Workload:
    """What each step carries: `batch` decode tokens per gateway (one per running sequence), over `gateways`
    gateways, each sequence attending over `context` cached tokens; weights, activations and the latent cache in
    `dtype_bytes` bytes per value (2: bf16; FP8 checkpoints are dequantized to the serving dtype on load)."""

    batch: int
    gateways: int = 1
    context: int = 4096
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name, low in (("batch", 1), ("gateways", 1), ("context", 0), ("dtype_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: expected an integer >= {low}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.gateways


@dataclass(frozen=True)
class LayerTraffic:
    """One MoE layer of one step as the dispatch plans sent it (every gateway's batch)."""

    tokens: torch.Tensor  # [D] token rows each device received
    pairs: torch.Tensor  # [D] (token, expert) pairs each device computed
    experts_hit: torch.Tensor  # [D] distinct experts whose weights each device read
    bytes_out: torch.Tensor  # [G, D] bytes gateway g sent device d (hidden rows, ids, weights); 0: no message
    bytes_back: torch.Tensor  # [G, D] bytes of partial sums device d returned to gateway g
    # With several gateways, the first gateway's part and the others' (local_step.py: a replica computes the first
    # call alone and merges the rest); None: not recorded (one merged pass is priced).
    first_pairs: torch.Tensor | None = None  # [D] gateway 0's pairs on each device
    first_hits: torch.Tensor | None = None  # [D] distinct experts gateway 0's pairs hit on each device
    rest_hits: torch.Tensor | None = None  # [D] distinct experts the other gateways' pairs hit on each device


@dataclass(frozen=True)
class LayerCost:
    """Seconds of one MoE layer in one step, and the bytes it moved (dispatch + combine) by link."""

    gateway_s: float  # attention + router + shared experts on a gateway
    dispatch_s: float
    expert_s: float  # the slowest device
    combine_s: float
    bytes_intra: int
    bytes_inter: int

    @property
    def serial_s(self) -> float:
        return self.gateway_s + self.dispatch_s + self.expert_s + self.combine_s

    @property
    def overlapped_s(self) -> float:
        return max(self.gateway_s, self.dispatch_s + self.expert_s + self.combine_s)


@dataclass(frozen=True)
class StepCost:
    """One decode step: its MoE layers and the rest of the gateway's work (dense layers, LM head); `floor_s` the
    least it can last whatever the layers (local_step.py: every process's CPU work over the machine's cores)."""

    layers: tuple[LayerCost, ...]
    other_s: float
    floor_s: float = 0.0

    @property
    def serial_s(self) -> float:
        return max(self.floor_s, self.other_s + sum(c.serial_s for c in self.layers))

    @property
    def overlapped_s(self) -> float:
        return max(self.floor_s, self.other_s + sum(c.overlapped_s for c in self.layers))


def roofline_seconds(flops: float, nbytes: float, hw: Hardware) -> float:
    """A kernel bound by compute or by memory, whichever is slower."""
    return max(flops / hw.flops, nbytes / hw.hbm)


def attention_seconds(spec: ModelSpec, hw: Hardware, work: Workload) -> float:
    """One layer of MLA decode on one gateway: `batch` tokens, each attending over `context` cached latents.

    Absorbed form (W_UK folded into the query, W_UV into the output): per token q projection (through q_lora_rank
    when the model compresses q), kv_a, W_UK absorption, scores over context·(kv_lora + rope), values over
    context·kv_lora, W_UV and o_proj. Bytes: every projection's weights once per step, plus each token's cached
    latents (kv_lora + rope values per cached token).
    """
    h, n = spec.hidden_size, spec.num_attention_heads
    qk, nope, rope, kv, v = spec.qk_head_dim, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank, \
        spec.v_head_dim
    q_params = h * n * qk if spec.q_lora_rank is None else h * spec.q_lora_rank + spec.q_lora_rank * n * qk
    params = q_params + h * (kv + rope) + kv * n * (nope + v) + n * v * h  # [q], kv_a, kv_b (W_UK, W_UV), o
    per_token_macs = q_params + h * (kv + rope) + n * nope * kv + n * work.context * (2 * kv + rope) + n * kv * v \
        + n * v * h
    flops = 2 * per_token_macs * work.batch
    nbytes = (params + work.batch * work.context * (kv + rope)) * work.dtype_bytes
    return roofline_seconds(flops, nbytes, hw)


def ffn_seconds(hidden: int, intermediate: int, tokens: int, hw: Hardware, dtype_bytes: int) -> float:
    """A SwiGLU FFN (gate, up, down: 3 matrices of hidden x intermediate) over `tokens` tokens."""
    params = 3 * hidden * intermediate
    return roofline_seconds(2 * params * tokens, params * dtype_bytes, hw)


def gateway_moe_seconds(spec: ModelSpec, hw: Hardware, work: Workload) -> float:
    """A MoE layer's gateway side: attention, the router gate (H x E) and the shared experts."""
    h = spec.hidden_size
    router = roofline_seconds(2 * h * spec.n_routed_experts * work.batch, h * spec.n_routed_experts * work.dtype_bytes,
                              hw)
    shared = 0.0
    if spec.n_shared_experts:
        shared = ffn_seconds(h, spec.moe_intermediate_size * spec.n_shared_experts, work.batch, hw, work.dtype_bytes)
    return attention_seconds(spec, hw, work) + router + shared


def other_step_seconds(spec: ModelSpec, hw: Hardware, work: Workload) -> float:
    """What a step costs outside the MoE layers: the dense layers (attention + MLP) and the LM head."""
    dense = len([i for i in range(spec.num_hidden_layers) if not spec.is_moe_layer(i)])
    layer = attention_seconds(spec, hw, work) + ffn_seconds(spec.hidden_size, spec.intermediate_size, work.batch, hw,
                                                             work.dtype_bytes)
    head_params = spec.hidden_size * spec.vocab_size
    return dense * layer + roofline_seconds(2 * head_params * work.batch, head_params * work.dtype_bytes, hw)


def expert_seconds(traffic: LayerTraffic, spec: ModelSpec, hw: Hardware, dtype_bytes: int) -> torch.Tensor:
    """[D] seconds each device spends on its routed experts: max(2·3·H·I FLOPs per pair / rate,
    3·H·I weights per expert hit / HBM bandwidth)."""
    params = 3 * spec.hidden_size * spec.moe_intermediate_size
    flops = 2.0 * params * traffic.pairs.double()
    nbytes = float(params * dtype_bytes) * traffic.experts_hit.double()
    return torch.maximum(flops / hw.flops, nbytes / hw.hbm)


def device_nodes(n_devices: int, gpus_per_node: int) -> torch.Tensor:
    """[D] the node of each expert device: consecutive devices fill a node."""
    return torch.arange(n_devices) // gpus_per_node


def gateway_nodes(gateways: int, n_devices: int, gpus_per_node: int) -> torch.Tensor:
    """[G] the node of each gateway: spread round-robin over the expert nodes."""
    return torch.arange(gateways) % math.ceil(n_devices / gpus_per_node)


def split_bytes(nbytes: torch.Tensor, gateway_node: torch.Tensor, device_node: torch.Tensor) -> tuple[int, int]:
    """(intra-node, inter-node) totals of a [G, D] byte matrix."""
    same = gateway_node[:, None] == device_node[None, :]  # [G, D]
    return int(nbytes[same].sum()), int(nbytes[~same].sum())


def transfer_seconds(nbytes: torch.Tensor, gateway_node: torch.Tensor, device_node: torch.Tensor,
                     hw: Hardware) -> float:
    """One phase (dispatch or combine) of a [G, D] byte matrix: its slowest endpoint. An endpoint's time is
    max(intra bytes / NVLink bw, inter bytes / IB bw) + its intra messages · intra latency + inter messages · inter
    latency; a message is a non-zero entry (one per (gateway, device) pair that exchanges rows)."""
    same = (gateway_node[:, None] == device_node[None, :])  # [G, D]
    b = nbytes.double()
    sent = b > 0
    intra, inter = torch.where(same, b, 0.0), torch.where(same, 0.0, b)
    lat_intra, lat_inter = hw.intra_node_latency_us * 1e-6, hw.inter_node_latency_us * 1e-6
    bw_intra, bw_inter = hw.intra_node_gbytes_per_s * 1e9, hw.inter_node_gbytes_per_s * 1e9
    worst = 0.0
    for dim in (1, 0):  # gateways (rows), then devices (columns)
        link = torch.maximum(intra.sum(dim) / bw_intra, inter.sum(dim) / bw_inter)
        latency = (sent & same).sum(dim) * lat_intra + (sent & ~same).sum(dim) * lat_inter
        worst = max(worst, float((link + latency).max()))
    return worst


def layer_cost(traffic: LayerTraffic, spec: ModelSpec, hw: Hardware, work: Workload, gateway_s: float) -> LayerCost:
    """Price one MoE layer of one step; gateway_s from `gateway_moe_seconds` (the same for every layer)."""
    n_devices = traffic.tokens.shape[0]
    dev_node = device_nodes(n_devices, hw.gpus_per_node)
    gw_node = gateway_nodes(work.gateways, n_devices, hw.gpus_per_node)
    out_intra, out_inter = split_bytes(traffic.bytes_out, gw_node, dev_node)
    back_intra, back_inter = split_bytes(traffic.bytes_back, gw_node, dev_node)
    return LayerCost(
        gateway_s=gateway_s,
        dispatch_s=transfer_seconds(traffic.bytes_out, gw_node, dev_node, hw),
        expert_s=float(expert_seconds(traffic, spec, hw, work.dtype_bytes).max()),
        combine_s=transfer_seconds(traffic.bytes_back, gw_node, dev_node, hw),
        bytes_intra=out_intra + back_intra,
        bytes_inter=out_inter + back_inter,
    )


def step_cost(step: list[LayerTraffic], spec: ModelSpec, hw: Hardware, work: Workload) -> StepCost:
    """Price one decode step from its MoE layers' traffic (in layer order)."""
    gateway_s = gateway_moe_seconds(spec, hw, work)
    return StepCost(tuple(layer_cost(t, spec, hw, work, gateway_s) for t in step), other_step_seconds(spec, hw, work))


def tokens_per_s_per_gpu(step_s: float, work: Workload, n_devices: int) -> float:
    """Output tokens per second per GPU: every gateway's batch each step, over D expert GPUs + G gateway GPUs."""
    return work.tokens_per_step / step_s / (n_devices + work.gateways)


# -- a deployment on the machine at hand: calibrated transport and expert rates (calibrate.py) -----------------


def local_layer_seconds(calls: list[tuple[int, int, int]], transport: TransportRate, experts: ExpertRate,
                        cores: int) -> float:
    """One layer dispatch of a deployment whose groups share this machine's `cores`: calls [(bytes moved, pairs,
    experts hit)] per device. Each call costs the transport's round trip plus the group's compute; the calls run
    at once, but their compute shares the cores (a group computes on one core), so the layer lasts as long as the
    slowest call or as the compute divided over the cores plus one round trip, whichever is longer."""
    if not calls:
        return 0.0
    trips = [transport.seconds(b) for b, _, _ in calls]
    compute = [experts.seconds(p, h) for _, p, h in calls]
    slowest = max(t + c for t, c in zip(trips, compute, strict=True))
    shared = max(trips) + sum(compute) / max(1, min(cores, len(calls)))
    return max(slowest, shared)
