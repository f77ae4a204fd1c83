"""The decode step of a deployment on the machine at hand, priced from the rates `expertmesh plan --calibrate`
measured there (hardware.py: TransportRate, ExpertRate, GatewayRate) instead of link rates and GPU rooflines.

What one decode step is, as modelled here (every assumption the numbers rest on):

- G gateways, each a process running `batch` sequences, share D expert groups (one replica each). Every gateway
  steps in lockstep with the others: its step is its own work (the calibrated gateway step at `batch` tokens) plus,
  per MoE layer, its slowest call.
- A call costs the transport's round trip for the bytes it moves (out + back: call_us + us_per_mb · MB), plus the
  caller's part (caller_us) of each other call its gateway sends in that layer (a gateway sends its calls and takes
  their replies one after another on one thread), plus the compute of the passes it waits for: the calibrated
  expert compute of each pass's pairs over the distinct experts they hit. A replica computes a call that finds it
  idle at once (expert_workers/merging.py), and with G gateways in near-lockstep the others' calls for that layer
  arrive while it runs. Joining (LocalPricing.joining, the default: the torch per-expert loop a CPU replica runs
  for bf16) takes them into the running pass expert by expert, so the G calls are one pass that every gateway
  waits for (the experts a joiner missed are recomputed at the pass's end; in lockstep they are few, and not
  priced). Without joining (whole calls merge: the GPU kernels, float32 decode steps on padded_bmm) the first call
  (gateway 0's, by convention) is computed alone and the other G − 1 gateways' calls are merged into a second
  pass, which they wait for after the first. One gateway: one pass.
- The machine's cores are shared by every process (gateways, groups, Ray's workers). A step cannot be shorter than
  all the CPU work of one step of every gateway divided over `cores`: the G gateways' own steps, every pass's
  compute, and every round trip (on one machine a round trip is CPU work on both ends: the codec, Ray's or gRPC's
  workers). The step is the longer of that bound and the lockstep path above. Scheduling delays, cache effects of
  processes sharing a core, memory bandwidth shared between them and Ray's own background work are not modelled.
- Without a calibrated gateway the gateway's step is its GPU roofline (cost_model.py), labelled as such; without a
  calibrated expert rate, a device's compute is its roofline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from deploy.planning.cost_model import (
    LayerCost,
    LayerTraffic,
    StepCost,
    Workload,
    expert_seconds,
    gateway_moe_seconds,
    other_step_seconds,
)
from deploy.planning.hardware import Hardware
from model_core.spec import ModelSpec

# Shape legend: D = expert devices (groups), G = gateways.


@dataclass(frozen=True)
class LocalPricing:
    """Price steps from a hardware file's calibrated rates: `transport` (a key of Hardware.transports) for the hop,
    on a machine whose every gateway and group share `cores` cores' worth of work at once; `joining`: the gateways'
    calls for a layer join one pass (else the first is computed alone and the others merged after it)."""

    transport: str
    cores: float
    joining: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.cores, bool) or not isinstance(self.cores, (int, float)) or not self.cores > 0:
            raise ValueError(f"cores={self.cores!r}: expected a number > 0")


def pricing_label(hw: Hardware, pricing: LocalPricing | None) -> str:
    """How a step is priced, for the table's title and the JSON report."""
    if pricing is None:
        nominal = "" if hw.calibrated else ", nominal rates (unvalidated)"
        return f"link rates and GPU rooflines{nominal}"
    gateway = "calibrated" if hw.gateway is not None else "GPU roofline (no calibrated gateway)"
    experts = "calibrated" if hw.experts is not None else "GPU roofline (no calibrated experts)"
    merging = "calls join one pass" if pricing.joining else "first call alone, the others merged after it"
    return (f"calibrated {pricing.transport} round trips on {pricing.cores:g} shared core(s); gateway step: {gateway}; "
            f"expert compute: {experts} ({merging})")


def gateway_step_seconds(spec: ModelSpec, hw: Hardware, work: Workload) -> float:
    """One gateway's own step (all but the routed experts): calibrated when the file has it, else the roofline of
    its MoE layers' gateway side, its dense layers and its LM head."""
    if hw.gateway is not None:
        return hw.gateway.seconds(work.batch)
    return other_step_seconds(spec, hw, work) + len(spec.moe_layers) * gateway_moe_seconds(spec, hw, work)


def pass_seconds(pairs: torch.Tensor, hits: torch.Tensor, traffic: LayerTraffic, spec: ModelSpec, hw: Hardware,
                 work: Workload) -> torch.Tensor:
    """[D] seconds of a pass computing `pairs` [D] over `hits` [D] distinct experts on each device: calibrated, or
    the roofline without a calibrated expert rate."""
    if hw.experts is None:
        return expert_seconds(dataclasses.replace(traffic, pairs=pairs, experts_hit=hits), spec, hw, work.dtype_bytes)
    rate = hw.experts
    return torch.tensor([rate.seconds(int(p), int(h)) for p, h in zip(pairs.tolist(), hits.tolist(), strict=True)],
                        dtype=torch.float64)


def device_passes(traffic: LayerTraffic, spec: ModelSpec, hw: Hardware, work: Workload,
                  joining: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """([D] the pass computing the first gateway's call alone, [D] the pass merging the other gateways' calls).
    Joining, one gateway, or traffic without the first gateway's part: one pass of every pair, and zeros."""
    if joining or traffic.bytes_out.shape[0] == 1 or traffic.first_pairs is None:
        return pass_seconds(traffic.pairs, traffic.experts_hit, traffic, spec, hw, work), \
            torch.zeros(traffic.pairs.shape, dtype=torch.float64)
    first = pass_seconds(traffic.first_pairs, traffic.first_hits, traffic, spec, hw, work)
    rest = pass_seconds(traffic.pairs - traffic.first_pairs, traffic.rest_hits, traffic, spec, hw, work)
    return first, rest


def local_layer_cost(traffic: LayerTraffic, spec: ModelSpec, hw: Hardware, work: Workload,
                     pricing: LocalPricing) -> tuple[LayerCost, float]:
    """One MoE layer: (its cost on the slowest gateway's path, the CPU seconds it takes on the machine). The path is
    the slowest call: round trip of its bytes (dispatch_s) + the passes it waits for (expert_s: joining, the one
    pass; else gateway 0's call the first, the others' the first and the merged second); combine_s is 0, the round
    trip holds both ways."""
    rate = hw.transports[pricing.transport]
    moved = (traffic.bytes_out + traffic.bytes_back).double()  # [G, D]
    sent = traffic.bytes_out > 0  # [G, D] one call each
    trips = torch.where(sent, (rate.call_us + rate.us_per_mb * moved / 1e6) * 1e-6, 0.0)  # [G, D]
    first, rest = device_passes(traffic, spec, hw, work, pricing.joining)  # [D], [D]
    waits = torch.cat([first[None, :], (first + rest)[None, :].expand(sent.shape[0] - 1, -1)])  # [G, D]
    # A gateway sends its calls and takes their replies one after another on its own thread: its other calls'
    # caller part comes before the last reply it takes.
    queued = (sent.sum(dim=1, keepdim=True) - 1).clamp(min=0) * rate.caller_us * 1e-6  # [G, 1]
    path = torch.where(sent, trips + waits + queued, 0.0)  # [G, D]
    g, d = divmod(int(path.argmax()), path.shape[1])
    cost = LayerCost(gateway_s=0.0, dispatch_s=float(trips[g, d] + queued[g, 0]),
                     expert_s=float(waits[g, d]) if sent[g, d] else 0.0,
                     combine_s=0.0, bytes_intra=int(moved.sum()), bytes_inter=0)
    cpu = float(trips.sum()) + float((first + rest)[sent.any(dim=0)].sum())
    return cost, cpu


def local_step_cost(step: list[LayerTraffic], spec: ModelSpec, hw: Hardware, work: Workload,
                    pricing: LocalPricing) -> StepCost:
    """Price one decode step of every gateway on this machine from its MoE layers' traffic (in layer order): the
    gateway's own step plus each layer's slowest call, or all the step's CPU work over the cores, whichever is
    longer (`StepCost.floor_s`). Every byte moves inside the machine (bytes_intra)."""
    if pricing.transport not in hw.transports:
        raise ValueError(f"transport {pricing.transport!r}: {hw.name} has no calibrated rate for it "
                         f"(calibrated: {sorted(hw.transports) or 'none'})")
    gateway_s = gateway_step_seconds(spec, hw, work)
    priced = [local_layer_cost(t, spec, hw, work, pricing) for t in step]
    cpu = work.gateways * gateway_s + sum(c for _, c in priced)
    return StepCost(tuple(cost for cost, _ in priced), gateway_s, floor_s=cpu / pricing.cores)
