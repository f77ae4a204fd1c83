"""Memory per GPU for `expertmesh plan`: the bytes an expert-group GPU and a gateway GPU hold, with routed experts in
bf16 and in block-wise FP8, against the hardware file's per-GPU memory (less a headroom), and the fewest nodes each
dtype fits on. Counted from the model's config (its tensor shapes), never from constants.

- An expert-group GPU holds the routed experts it hosts, summed over the MoE layers (redundant copies included);
  one expert is gate [I, H], up [I, H] and down [H, I]: 2 bytes per value in bf16; in FP8 1 byte per value plus a
  float32 scale_inv per (block_out x block_in) tile of each matrix (DeepSeek-V3: 128 x 128; partial tiles count).
- A gateway GPU holds everything but the routed experts (embeddings, every layer's MLA projections and norms, the
  dense layers' MLPs, shared experts, router gates, the final norm, lm_head) and its sequences' MLA latent cache:
  (kv_lora_rank + qk_rope_head_dim) values per token per layer, in bf16. In FP8 (`--gateway-dtype fp8`) its 2-D
  projection weights (`*_proj.weight`, `kv_a_proj_with_mqa.weight`) are FP8 with tile scales, as the released
  DeepSeek-V3 checkpoint has them; embeddings, lm_head, router gates and norms stay bf16.
- Left out: activations and workspaces, the CUDA context, transport buffers, the multi-token-prediction layer
  (not served). The headroom (`utilization`, vLLM's gpu_memory_utilization) is what is left for them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from deploy.planning.cost_model import Workload
from model_core.layout import expert_shapes, gateway_layout
from model_core.spec import ModelSpec
from router_service.placement import Placement

DTYPES = ("bf16", "fp8")  # how routed experts are stored: the table has a column for each
DEFAULT_FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size, for configs without a quantization_config
DEFAULT_UTILIZATION = 0.9  # share of a GPU's memory the plan may fill (vLLM's default gpu_memory_utilization)
CACHE_BYTES = 2  # the latent cache is bf16


def fp8_block(spec: ModelSpec) -> tuple[int, int]:
    """The FP8 scale tile of `spec` (its quantization_config's weight_block_size, else 128 x 128)."""
    return spec.fp8_block or DEFAULT_FP8_BLOCK


def matrix_bytes(shape: tuple[int, ...], dtype: str, block: tuple[int, int] = DEFAULT_FP8_BLOCK) -> int:
    """Bytes of one [out, in] weight: bf16 2 per value; fp8 1 per value + a float32 scale per block tile."""
    values = math.prod(shape)
    if dtype == "bf16":
        return 2 * values
    if dtype == "fp8":
        rows, cols = shape
        return values + 4 * math.ceil(rows / block[0]) * math.ceil(cols / block[1])
    raise ValueError(f"dtype={dtype!r}: expected one of {list(DTYPES)}")


def expert_bytes(spec: ModelSpec, dtype: str) -> int:
    """One routed expert of one layer (gate, up, down)."""
    return sum(matrix_bytes(shape, dtype, fp8_block(spec)) for shape in expert_shapes(spec))


def gateway_weight_bytes(spec: ModelSpec, dtype: str = "bf16") -> int:
    """Every weight but the routed experts; with dtype fp8, the 2-D projection weights in FP8 with tile scales."""
    if dtype not in DTYPES:
        raise ValueError(f"gateway dtype={dtype!r}: expected one of {list(DTYPES)}")
    total = 0
    for name, shape in gateway_layout(spec).items():
        module = name.rsplit(".", 2)[-2]  # q_a_proj, kv_a_proj_with_mqa, gate_proj, embed_tokens, gate, ...
        if dtype == "fp8" and len(shape) == 2 and "_proj" in module:
            total += matrix_bytes(shape, "fp8", fp8_block(spec))
        else:
            total += matrix_bytes(shape, "bf16")
    return total


def latent_cache_bytes(spec: ModelSpec, batch: int, context: int) -> int:
    """A gateway's MLA latent cache: `batch` sequences of `context` tokens, every layer, bf16."""
    return (spec.kv_lora_rank + spec.qk_rope_head_dim) * spec.num_hidden_layers * batch * context * CACHE_BYTES


def experts_per_device(placement: Placement, moe_layers: list[int]) -> list[int]:
    """Routed experts each device hosts, summed over the MoE layers (copies included)."""
    base = [0] * placement.n_devices
    for device in placement.expert_device:
        base[device] += 1
    own = dict(placement.layers)
    totals = [0] * placement.n_devices
    for layer in moe_layers:
        counts = [len(experts) for experts in own[layer]] if layer in own else base
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
    return totals


def busiest_experts(spec: ModelSpec, devices: int) -> int:
    """Experts on the busiest of `devices` expert GPUs without copies: ceil(E / D) per MoE layer (contiguous)."""
    return len(spec.moe_layers) * math.ceil(spec.n_routed_experts / devices)


@dataclass(frozen=True)
class MemoryBudget:
    """What the plan may fill on one GPU: `capacity_gb` (the hardware file's memory_gb; None: unknown) times
    `utilization`; and the dtype of the gateway's weights."""

    capacity_gb: float | None
    utilization: float = DEFAULT_UTILIZATION
    gateway_dtype: str = "bf16"

    def __post_init__(self) -> None:
        u = self.utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization={u!r}: expected a number in (0, 1]")
        if self.gateway_dtype not in DTYPES:
            raise ValueError(f"gateway_dtype={self.gateway_dtype!r}: expected one of {list(DTYPES)}")

    @property
    def usable_bytes(self) -> float | None:
        return None if self.capacity_gb is None else self.capacity_gb * 1e9 * self.utilization

    def fits(self, nbytes: float) -> bool | None:
        """Whether `nbytes` on one GPU fit the usable memory (None: the capacity is unknown)."""
        usable = self.usable_bytes
        return None if usable is None else nbytes <= usable

    def gateway_bytes(self, spec: ModelSpec, work: Workload) -> int:
        """One gateway: its weights and the latent cache of its `work.batch` sequences of `work.context` tokens."""
        return gateway_weight_bytes(spec, self.gateway_dtype) + latent_cache_bytes(spec, work.batch, work.context)


def layout_memory(spec: ModelSpec, placement: Placement, budget: MemoryBudget, work: Workload) -> dict[str, Any]:
    """A planned layout's bytes per GPU (PlanRow's memory fields): its busiest expert GPU in each expert dtype
    and a gateway GPU; it fits a dtype when both do (None: the capacity is unknown)."""
    experts = max(experts_per_device(placement, spec.moe_layers))
    gateway = budget.gateway_bytes(spec, work)
    out: dict[str, Any] = {"experts_per_gpu": experts, "gateway_gpu_bytes": gateway}
    for dtype in DTYPES:
        held = experts * expert_bytes(spec, dtype)
        fit = (budget.fits(held), budget.fits(gateway))
        out[f"expert_gpu_bytes_{dtype}"] = held
        out[f"fits_{dtype}"] = None if None in fit else all(fit)
    return out


@dataclass(frozen=True)
class Fit:
    """The fewest GPUs one expert dtype fits on: `devices` expert GPUs, `gpus` in all, on `nodes` nodes; the
    busiest GPU holds `gpu_bytes`."""

    devices: int
    gpus: int
    nodes: int
    gpu_bytes: int


def smallest_dedicated(spec: ModelSpec, budget: MemoryBudget, dtype: str, work: Workload,
                       node_size: int) -> Fit | None:
    """D expert GPUs + G gateway GPUs of their own (the planner's layout): the least D whose busiest GPU fits,
    when a gateway GPU fits at all (None: nothing fits, or the capacity is unknown)."""
    if not budget.fits(budget.gateway_bytes(spec, work)):
        return None
    per_expert = expert_bytes(spec, dtype)
    for d in range(1, spec.n_routed_experts + 1):
        held = busiest_experts(spec, d) * per_expert
        if budget.fits(held):
            gpus = d + work.gateways
            return Fit(d, gpus, math.ceil(gpus / node_size), held)
    return None


def smallest_colocated(spec: ModelSpec, budget: MemoryBudget, dtype: str, work: Workload,
                       node_size: int) -> Fit | None:
    """The G gateways on the D expert GPUs (data-parallel attention beside expert parallelism, as vLLM and SGLang
    serve DeepSeek-V3): the busiest GPU holds its experts and ceil(G / D) gateways; the least D that fits."""
    per_expert, gateway = expert_bytes(spec, dtype), budget.gateway_bytes(spec, work)
    for d in range(1, spec.n_routed_experts + 1):
        held = busiest_experts(spec, d) * per_expert + math.ceil(work.gateways / d) * gateway
        if budget.fits(held):
            return Fit(d, d, math.ceil(d / node_size), held)
    return None


def memory_summary(spec: ModelSpec, budget: MemoryBudget, work: Workload, node_size: int,
                   planned: dict[str, dict | None]) -> dict[str, Any]:
    """The model's memory and the fewest nodes each expert dtype fits on, dedicated and colocated (computed from
    the config) and among the planned layouts (`planned`: dtype -> the smallest fitting row, from plan.py)."""
    n_experts = spec.n_routed_experts * len(spec.moe_layers)
    weights = gateway_weight_bytes(spec, budget.gateway_dtype)
    experts = {dtype: n_experts * expert_bytes(spec, dtype) for dtype in DTYPES}
    return {
        "capacity_gb": budget.capacity_gb, "utilization": budget.utilization, "usable_bytes": budget.usable_bytes,
        "gateway_dtype": budget.gateway_dtype, "node_size": node_size, "gateways": work.gateways,
        "batch": work.batch, "context": work.context, "routed_experts": n_experts,
        "expert_bytes": experts, "fp8_scale_bytes": experts["fp8"] - experts["bf16"] // 2,
        "gateway_weight_bytes": weights, "latent_cache_bytes": latent_cache_bytes(spec, work.batch, work.context),
        "model_bytes": {dtype: experts[dtype] + weights for dtype in DTYPES},
        "dedicated": {d: _fit(smallest_dedicated(spec, budget, d, work, node_size)) for d in DTYPES},
        "colocated": {d: _fit(smallest_colocated(spec, budget, d, work, node_size)) for d in DTYPES},
        "planned": planned,
    }


def _fit(fit: Fit | None) -> dict | None:
    return None if fit is None else dataclasses.asdict(fit)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def _nodes(fit: dict | None) -> str:
    return "none fits" if fit is None else f"{fit['nodes']} node{'s' if fit['nodes'] > 1 else ''}"


def format_memory(summary: dict[str, Any]) -> str:
    """The block printed under the table: what one GPU may hold, what the model needs, the fewest nodes."""
    s, node = summary, summary["node_size"]
    gateway = s["gateway_weight_bytes"] + s["latent_cache_bytes"]
    lines = [
        f"memory (GB = 1e9 bytes): routed experts {s['routed_experts']}: {_gb(s['expert_bytes']['bf16'])} bf16, "
        f"{_gb(s['expert_bytes']['fp8'])} fp8 ({s['fp8_scale_bytes'] / 1e9:.2f} GB of it scales); a gateway "
        f"{_gb(s['gateway_weight_bytes'])} {s['gateway_dtype']} weights + {_gb(s['latent_cache_bytes'])} latent "
        f"cache (batch {s['batch']} x context {s['context']}) = {_gb(gateway)}; whole model (experts + one "
        f"gateway's weights) {_gb(s['model_bytes']['bf16'])} bf16 / {_gb(s['model_bytes']['fp8'])} fp8 experts"]
    if s["capacity_gb"] is None:
        lines.append("  the hardware file has no memory_gb: nothing is checked (fits: ?)")
        return "\n".join(lines)
    lines.append(f"  usable per GPU {_gb(s['usable_bytes'])} ({s['utilization']:g} x {s['capacity_gb']:g} GB, "
                 f"--gpu-memory-utilization); a node of {node}: {_gb(node * s['usable_bytes'])} usable of "
                 f"{_gb(node * s['capacity_gb'] * 1e9)}")
    for dtype in DTYPES:
        ded, col, planned = s["dedicated"][dtype], s["colocated"][dtype], s["planned"][dtype]
        text = f"  {dtype} experts: dedicated {_nodes(ded)}"
        if ded:
            text += (f" ({ded['devices']} expert GPUs x {_gb(ded['gpu_bytes'])} + {s['gateways']} gateway GPU(s) x "
                     f"{_gb(gateway)} = {ded['gpus']} GPUs)")
        text += f"; colocated {_nodes(col)}"
        if col:
            text += f" ({col['devices']} GPUs x {_gb(col['gpu_bytes'])}, {s['gateways']} gateway(s) on them)"
        text += f"; planned layouts {_nodes(planned)}"
        if planned:
            text += f" (D={planned['devices']}, R={planned['redundant']}: {planned['gpus']} GPUs)"
        lines.append(text)
    return "\n".join(lines)
