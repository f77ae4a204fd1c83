"""`expertmesh plan`: replay routing through the project's own routing, placement and dispatch-plan code for each
candidate deployment (D devices, top-M, R redundant slots) and price what it would send with the cost model.

Routing comes from recorded traces (`<dir>/<request id>.json`, written by the routing-trace store) or is synthetic:
Zipf(S) expert popularity over a random permutation of each layer's experts; every token draws its experts without
replacement in proportion to popularity (Gumbel-top-k, turned into router scores), then the model's own gate (group
limit, top-k) and, when M is given, the deployment's top-M device limit select them, exactly as serving does.

Top-M on traces: a trace records the experts finally chosen, not the router scores, so a device limit that was not
in force when it was recorded cannot be applied exactly. The replay ranks each token's devices by its recorded
experts (their normalised weights, scored like the model scores groups) and, where the recorded experts span more
than M devices, refills the dropped slots with the layer's most-loaded experts on the kept devices. Tokens whose
recorded experts already fit on M devices (every token, when the trace was recorded under the same placement and M)
replay exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gateway.dispatch.dispatcher import batch_bytes, plan_dispatch
from gateway.serving.routing_trace import RequestTrace
from model_core.make_model import PRESETS, preset_config
from model_core.spec import ConfigError, ModelSpec
from router_service.cost_model import (
    Hardware,
    LayerTraffic,
    Workload,
    gateway_moe_seconds,
    step_cost,
    tokens_per_s_per_gpu,
)
from router_service.eplb import plan_placement
from router_service.placement import Placement
from router_service.routing import select_experts

# Shape legend: T = replayed tokens, K = experts per token, E = routed experts, L = MoE layers, D = devices,
# G = gateways, S = steps, M = top-M devices.

# DeepSeek-V3 (671B) as released: huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
MODEL_CONFIGS: dict[str, dict[str, Any]] = {"deepseek-v3": DEEPSEEK_V3}


def load_spec(model: str) -> ModelSpec:
    """A checkpoint directory, a config.json file, a built-in model ('deepseek-v3') or a generator preset."""
    path = Path(model)
    if path.is_dir():
        return ModelSpec.from_dir(path)
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--model {path}: cannot read a config.json ({exc})") from None
        try:
            return ModelSpec.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if model in MODEL_CONFIGS:
        return ModelSpec.from_dict(MODEL_CONFIGS[model])
    if model in PRESETS:
        return ModelSpec.from_dict(preset_config(model))
    raise ConfigError(f"--model {model!r}: not a checkpoint directory, a config.json file or a known model "
                      f"(expected one of {sorted(MODEL_CONFIGS) + sorted(PRESETS)})")


def parse_synthetic(text: str) -> float:
    """'zipf:S' -> S (>= 0; 0 is uniform popularity)."""
    kind, _, value = text.partition(":")
    try:
        skew = float(value)
    except ValueError:
        skew = -1.0
    if kind != "zipf" or not math.isfinite(skew) or skew < 0:
        raise ValueError(f"--synthetic {text!r}: expected zipf:S with S >= 0, e.g. zipf:1.2")
    return skew


Routed = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # ids [T, K] int64, weights [T, K], devices [T, M]


class SyntheticRouting:
    """Router scores of `n_tokens` tokens per MoE layer with Zipf(`skew`) expert popularity (seeded)."""

    def __init__(self, spec: ModelSpec, n_tokens: int, skew: float, seed: int = 0) -> None:
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"--tokens {n_tokens!r}: expected an integer >= 1")
        self.spec, self.n_tokens, self.skew, self.seed = spec, n_tokens, skew, seed
        self.layers = spec.moe_layers
        self.source = f"synthetic zipf:{skew:g}, {n_tokens} tokens, seed {seed}"
        self._exact: dict[int, Routed] = {}

    def scores(self, j: int) -> torch.Tensor:
        """[T, E] scores of MoE layer index j: sigmoid (V3) or softmax (V2) of log-popularity + Gumbel noise, so
        the top-k of each row is a draw without replacement in proportion to popularity."""
        n_experts = self.spec.n_routed_experts
        gen = torch.Generator().manual_seed(self.seed * 100_003 + j)
        rank = torch.randperm(n_experts, generator=gen).double()  # [E] popularity rank of each expert
        log_p = -self.skew * torch.log1p(rank)
        log_p = log_p - torch.logsumexp(log_p, 0)  # normalised: sigmoid stays in its exp-like range
        u = torch.rand(self.n_tokens, n_experts, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        logits = (log_p - torch.log(-torch.log(u))).float()  # [T, E]
        return logits.sigmoid() if self.spec.router.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def route(self, j: int, members: torch.Tensor | None = None, top_m: int | None = None) -> Routed:
        if top_m is None and j in self._exact:
            return self._exact[j]
        r = select_experts(self.scores(j), self.spec.router, None, members, top_m)
        if top_m is None:
            self._exact[j] = (r.ids, r.weights, None)
        return r.ids, r.weights, r.devices


class TraceRouting:
    """The recorded routing of every request in a trace directory (positions taken from the prefix cache, never
    dispatched by their request, are skipped)."""

    def __init__(self, spec: ModelSpec, directory: str | Path) -> None:
        directory = Path(directory)
        files = sorted(directory.glob("*.json")) if directory.is_dir() else []
        if not files:
            raise FileNotFoundError(f"--traces {directory}: no routing traces (<request id>.json) there")
        self.spec, self.layers = spec, spec.moe_layers
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.layers]
        weights: list[list[torch.Tensor]] = [[] for _ in self.layers]
        for file in files:
            try:
                trace = RequestTrace.from_json(json.loads(file.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{file}: not a routing trace ({exc})") from None
            if trace.layers != self.layers or trace.top_k != spec.top_k:
                raise ValueError(f"{file}: layers={trace.layers}, top_k={trace.top_k}: expected the model's MoE "
                                 f"layers {self.layers} and num_experts_per_tok={spec.top_k}")
            ids, w = trace.ids.long(), trace.weights
            if ids.numel() and int(ids.max()) >= spec.n_routed_experts:
                raise ValueError(f"{file}: expert id {int(ids.max())} is outside [0, {spec.n_routed_experts})")
            for j in range(len(self.layers)):
                routed = ids[:, j, 0] >= 0  # [P]; -1: served from the prefix cache for another request
                per_layer[j].append(ids[routed, j])
                weights[j].append(w[routed, j])
        self.ids = [torch.cat(chunks) for chunks in per_layer]  # [L] of [T, K]
        self.weights = [torch.cat(chunks) for chunks in weights]
        self.n_tokens = int(self.ids[0].shape[0])
        if self.n_tokens == 0:
            raise ValueError(f"--traces {directory}: the traces hold no routed positions")
        self.source = f"{len(files)} routing traces in {directory}, {self.n_tokens} tokens"

    def route(self, j: int, members: torch.Tensor | None = None, top_m: int | None = None) -> Routed:
        ids, weights = self.ids[j], self.weights[j]
        if top_m is None:
            return ids, weights, None
        # Pseudo-scores: recorded experts 2 + normalised weight (>= 2), the others their layer load scaled into
        # [0, 0.001): devices holding a recorded expert outrank every other and rank by the recorded weights,
        # recorded experts are kept first, and dropped slots go to the most-loaded experts of the kept devices.
        n_experts = self.spec.n_routed_experts
        load = torch.bincount(ids.flatten(), minlength=n_experts).float()
        pseudo = (1e-3 * load / (load.max() + 1)).expand(ids.shape[0], n_experts).clone()  # [T, E]
        pseudo.scatter_(1, ids, 2.0 + weights / (weights.sum(dim=-1, keepdim=True) + 1e-20))
        flat = dataclasses.replace(self.spec.router, n_group=1, topk_group=1)  # groups were applied when recorded
        r = select_experts(pseudo, flat, None, members, top_m)
        return r.ids, r.weights, r.devices  # weights are pseudo: the dispatch plan's counts do not read them


def expert_loads(source: SyntheticRouting | TraceRouting) -> torch.Tensor:
    """[L, E] tokens per expert under the model's own routing (what an EPLB planner would observe)."""
    n = source.spec.n_routed_experts
    return torch.stack([torch.bincount(source.route(j)[0].flatten(), minlength=n) for j in range(len(source.layers))])


def build_placement(spec: ModelSpec, loads: torch.Tensor, n_devices: int, redundant: int) -> Placement:
    """Contiguous without redundant slots; with R > 0, the EPLB plan for `loads` (every MoE layer its own layout)."""
    if redundant == 0:
        return Placement.contiguous(spec.n_routed_experts, n_devices)
    plan = plan_placement(loads, n_devices, redundant, moe_layers=spec.moe_layers)
    return plan.to_placement(spec.moe_layers)


@dataclass
class Replay:
    """What the dispatch plans of a replay sent: exact totals over every token, and per-step traffic to price."""

    tokens_per_device: torch.Tensor  # [L, D] token rows sent to each device, over every replayed token
    bytes_sent: int  # hidden rows + ids + weights, over every layer and token (DispatchStats.bytes_sent)
    bytes_received: int  # partial sums back (DispatchStats.bytes_received)
    calls: int  # device batches (one message each way); depends on how tokens are batched
    n_tokens: int  # tokens replayed per MoE layer
    changed_tokens: int  # (token, layer) pairs whose experts the top-M limit changed
    steps: list[list[LayerTraffic]]  # [S][L] for the full steps only (G batches of `batch` tokens)


def replay(spec: ModelSpec, source: SyntheticRouting | TraceRouting, placement: Placement, top_m: int | None,
           work: Workload) -> Replay:
    """Route every layer's tokens (with top-M when given), cut them into batches of `work.batch` tokens (G
    consecutive batches form a step, batch g from gateway g), and run `plan_dispatch` on each batch with the
    placement's per-layer copy table, as the dispatcher does. Tokens per device and bytes are sums over tokens,
    so they do not depend on the batching; with redundant copies, which copy serves a pair does (round-robin
    within a batch), and so does the number of calls."""
    n_devices, n_experts, top_k, hidden = placement.n_devices, spec.n_routed_experts, spec.top_k, spec.hidden_size
    t, b, g = source.n_tokens, work.batch, work.gateways
    n_steps = t // (b * g)
    if n_steps == 0:
        raise ValueError(f"--batch {b} x --gateways {g} = {b * g} tokens per step: more than the {t} replayed "
                         "tokens; lower --batch or replay more tokens")
    expert_device = placement.device_tensor()
    hosts = {layer: placement.copy_table(layer) for layer, _ in placement.layers}  # as Dispatcher._use
    totals = torch.zeros(len(source.layers), n_devices, dtype=torch.long)
    sent = received = calls = changed = 0
    per_layer: list[list[LayerTraffic]] = []
    for j, layer in enumerate(source.layers):
        members = placement.members(layer) if top_m is not None else None
        ids, weights, token_devices = source.route(j, members, top_m)
        if top_m is not None:
            exact = source.route(j)[0]
            changed += int((ids.sort(dim=-1).values != exact.sort(dim=-1).values).any(dim=-1).sum())
        table = hosts.get(layer, expert_device)
        tokens = torch.zeros(n_steps, n_devices, dtype=torch.long)
        pairs = torch.zeros(n_steps, n_devices, dtype=torch.long)
        hits = torch.zeros(n_steps, n_devices, dtype=torch.long)
        hit = torch.zeros(n_devices, n_experts, dtype=torch.bool)  # the current step's experts read per device
        out = torch.zeros(n_steps, g, n_devices, dtype=torch.long)
        back = torch.zeros(n_steps, g, n_devices, dtype=torch.long)
        for i, start in enumerate(range(0, t, b)):
            rows = slice(start, start + b)
            td = token_devices[rows] if token_devices is not None else None
            step, gw = divmod(i, g)
            for batch in plan_dispatch(ids[rows], weights[rows], table, n_devices, td):
                n = int(batch.rows.numel())
                nbytes_out, nbytes_back = batch_bytes(n, top_k, hidden, work.dtype_bytes, batch.ids.element_size())
                totals[j, batch.device] += n
                sent, received, calls = sent + nbytes_out, received + nbytes_back, calls + 1
                if step < n_steps:
                    here = batch.ids[batch.ids >= 0]
                    tokens[step, batch.device] += n
                    pairs[step, batch.device] += here.numel()
                    hit[batch.device, here] = True
                    out[step, gw, batch.device] = nbytes_out
                    back[step, gw, batch.device] = nbytes_back
            if gw == g - 1 and step < n_steps:  # the step's last batch
                hits[step] = hit.sum(dim=-1)
                hit.zero_()
        per_layer.append([LayerTraffic(tokens[s], pairs[s], hits[s], out[s], back[s])
                          for s in range(n_steps)])
    steps = [[per_layer[j][s] for j in range(len(source.layers))] for s in range(n_steps)]
    return Replay(totals, sent, received, calls, t, changed, steps)


@dataclass
class PlanRow:
    """One candidate deployment: D devices, top-M, R redundant slots; predictions per MoE layer are means over
    the replayed steps and layers. `skipped` says why a combination has no numbers."""

    devices: int
    top_m: int | None
    redundant: int
    gpus: int = 0  # D expert GPUs + G gateway GPUs
    skipped: str | None = None
    tokens_per_device_max: float = 0.0  # per layer and step: the busiest device's token rows
    tokens_per_device_mean: float = 0.0
    dispatch_bytes_per_token: float = 0.0  # per token per MoE layer, out to the devices
    combine_bytes_per_token: float = 0.0  # per token per MoE layer, back
    intra_node_bytes_per_token: float = 0.0  # dispatch + combine over NVLink
    inter_node_bytes_per_token: float = 0.0  # dispatch + combine over InfiniBand
    expert_us: float = 0.0  # per layer: the slowest device's routed-expert time
    comm_us: float = 0.0  # per layer: dispatch + combine
    gateway_us: float = 0.0  # per layer: attention + router + shared experts on a gateway
    step_ms_serial: float = 0.0
    step_ms_overlapped: float = 0.0
    tokens_per_s_per_gpu_serial: float = 0.0
    tokens_per_s_per_gpu_overlapped: float = 0.0
    changed_by_top_m: float = 0.0  # share of (token, layer) pairs whose experts the device limit changed
    exact: dict | None = None  # totals over every replayed token: tokens per device per layer, bytes, calls

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def price(spec: ModelSpec, hw: Hardware, work: Workload, row: PlanRow, result: Replay) -> PlanRow:
    """Fill a row's predictions from a replay."""
    n_layers, n_steps = len(result.steps[0]), len(result.steps)
    costs = [step_cost(step, spec, hw, work) for step in result.steps]
    layer_costs = [c for cost in costs for c in cost.layers]
    traffic = [t for step in result.steps for t in step]
    per_layer_tokens = n_steps * n_layers * work.tokens_per_step
    serial = sum(c.serial_s for c in costs) / n_steps
    overlapped = sum(c.overlapped_s for c in costs) / n_steps
    return dataclasses.replace(
        row,
        gpus=row.devices + work.gateways,
        tokens_per_device_max=sum(float(t.tokens.max()) for t in traffic) / len(traffic),
        tokens_per_device_mean=sum(float(t.tokens.double().mean()) for t in traffic) / len(traffic),
        dispatch_bytes_per_token=sum(int(t.bytes_out.sum()) for t in traffic) / per_layer_tokens,
        combine_bytes_per_token=sum(int(t.bytes_back.sum()) for t in traffic) / per_layer_tokens,
        intra_node_bytes_per_token=sum(c.bytes_intra for c in layer_costs) / per_layer_tokens,
        inter_node_bytes_per_token=sum(c.bytes_inter for c in layer_costs) / per_layer_tokens,
        expert_us=1e6 * sum(c.expert_s for c in layer_costs) / len(layer_costs),
        comm_us=1e6 * sum(c.dispatch_s + c.combine_s for c in layer_costs) / len(layer_costs),
        gateway_us=1e6 * gateway_moe_seconds(spec, hw, work),
        step_ms_serial=1e3 * serial,
        step_ms_overlapped=1e3 * overlapped,
        tokens_per_s_per_gpu_serial=tokens_per_s_per_gpu(serial, work, row.devices),
        tokens_per_s_per_gpu_overlapped=tokens_per_s_per_gpu(overlapped, work, row.devices),
        changed_by_top_m=result.changed_tokens / (result.n_tokens * n_layers),
        exact={"layers": list(spec.moe_layers), "tokens_per_device": result.tokens_per_device.tolist(),
               "bytes_sent": result.bytes_sent, "bytes_received": result.bytes_received, "calls": result.calls},
    )


def plan(spec: ModelSpec, source: SyntheticRouting | TraceRouting, hw: Hardware, devices: list[int],
         top_ms: list[int | None], redundants: list[int], work: Workload) -> list[PlanRow]:
    """Every combination of D, top-M and R, in that order; impossible ones are rows with `skipped` set."""
    loads = expert_loads(source) if any(r > 0 for r in redundants) else None
    rows = []
    for n_devices in devices:
        for redundant in redundants:
            try:
                placement = build_placement(spec, loads, n_devices, redundant)
            except ValueError as exc:
                rows += [PlanRow(n_devices, m, redundant, skipped=str(exc)) for m in top_ms]
                continue
            for top_m in top_ms:
                row = PlanRow(n_devices, top_m, redundant)
                try:
                    placement.check_top_m(spec.top_k, top_m)
                except ValueError as exc:
                    rows.append(dataclasses.replace(row, skipped=str(exc)))
                    continue
                rows.append(price(spec, hw, work, row, replay(spec, source, placement, top_m, work)))
    return rows


def format_table(rows: list[PlanRow]) -> str:
    """The printed table: one line per combination (per-layer values are means over steps and MoE layers)."""
    head = (f"{'D':>4} {'M':>4} {'R':>3} {'GPUs':>4} {'tok/dev max':>11} {'mean':>6} {'KB/tok/layer':>12} "
            f"{'intra':>6} {'inter':>6} {'expert us':>9} {'comm us':>8} {'gw us':>6} {'step ms':>8} "
            f"{'overlap':>8} {'tok/s/GPU':>9} {'overlap':>8} {'top-M chg':>9}")
    lines = [head]
    for r in rows:
        m = "none" if r.top_m is None else str(r.top_m)
        if r.skipped:
            lines.append(f"{r.devices:>4} {m:>4} {r.redundant:>3}  skipped: {r.skipped}")
            continue
        kb = (r.dispatch_bytes_per_token + r.combine_bytes_per_token) / 1e3
        lines.append(
            f"{r.devices:>4} {m:>4} {r.redundant:>3} {r.gpus:>4} {r.tokens_per_device_max:>11.1f} "
            f"{r.tokens_per_device_mean:>6.1f} {kb:>12.1f} {r.intra_node_bytes_per_token / 1e3:>6.1f} "
            f"{r.inter_node_bytes_per_token / 1e3:>6.1f} {r.expert_us:>9.1f} {r.comm_us:>8.1f} {r.gateway_us:>6.1f} "
            f"{r.step_ms_serial:>8.2f} {r.step_ms_overlapped:>8.2f} {r.tokens_per_s_per_gpu_serial:>9.1f} "
            f"{r.tokens_per_s_per_gpu_overlapped:>8.1f} {100 * r.changed_by_top_m:>8.1f}%")
    return "\n".join(lines)


def describe(model: str, spec: ModelSpec, source: SyntheticRouting | TraceRouting, hw: Hardware,
             work: Workload) -> str:
    """The line printed above the table: what was replayed, on what, at what load."""
    return (f"plan {model}: {len(spec.moe_layers)} MoE layers, {spec.n_routed_experts} experts, top-{spec.top_k}; "
            f"{source.source}; hardware {hw.name} ({hw.gpus_per_node} GPUs/node); {work.gateways} gateway(s) x "
            f"batch {work.batch}, context {work.context}, {work.dtype_bytes}-byte values")


def report(model: str, source: SyntheticRouting | TraceRouting, hw: Hardware, work: Workload,
           rows: list[PlanRow]) -> dict:
    """What --json writes."""
    return {"model": model, "routing": source.source, "hardware": hw.to_dict(), "workload": dataclasses.asdict(work),
            "rows": [r.to_dict() for r in rows]}


def write_png(rows: list[PlanRow], path: str | Path, title: str) -> Path:
    """Tokens/s per GPU and step time against D, one line per (top-M, R)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--png needs matplotlib: pip install matplotlib") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r.top_m or 0, r.redundant) for r in rows})
    for m, redundant in keys:
        line = [r for r in rows if (r.top_m or 0) == m and r.redundant == redundant and not r.skipped]
        if not line:
            continue
        label = f"top-M {'none' if m == 0 else m}, R={redundant}"
        xs = [r.devices for r in line]
        left.plot(xs, [r.tokens_per_s_per_gpu_overlapped for r in line], marker="o", label=label)
        right.plot(xs, [r.step_ms_overlapped for r in line], marker="o", label=label)
    ticks = sorted({r.devices for r in rows})
    for ax, ylabel in ((left, "output tokens/s per GPU (overlap)"), (right, "decode step ms (overlap)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(d) for d in ticks])
        ax.set_xlabel("expert devices D")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def calibrate(base: Hardware, name: str, seconds: float = 0.5) -> tuple[Hardware, dict[str, str]]:
    """Measure this machine's matmul rate and memory-copy bandwidth; the link rates and node size stay `base`'s
    (transport calibration is not implemented). Returns the hardware and, per field, where its value came from.

    matmul: square matmuls of 2048 (bfloat16 on CUDA, float32 on CPU: the dtypes expertmesh serves there), best of
    repeated runs. Memory: a 256 MiB tensor copy (64 MiB on CPU), counted as bytes read + bytes written.
    """
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = _best_rate(lambda: a @ b, 2 * n**3, seconds, cuda)
    size = (256 if cuda else 64) << 20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = _best_rate(lambda: dst.copy_(src), 2 * size, seconds, cuda)
    measured = dataclasses.replace(base, name=name, matmul_tflops=round(flops / 1e12, 4),
                                   hbm_gbytes_per_s=round(copy / 1e9, 2))
    where = {f.name: f"from {base.name} (not measured)" for f in dataclasses.fields(Hardware)}
    where["name"] = "given"
    where["matmul_tflops"] = f"measured: {n}x{n} {str(dtype).removeprefix('torch.')} matmul on {device}"
    where["hbm_gbytes_per_s"] = f"measured: {size >> 20} MiB copy on {device}, read + write"
    return measured, where


def _best_rate(fn, work_units: float, seconds: float, cuda: bool) -> float:
    """Work units per second of the fastest run of `fn` within about `seconds`."""
    fn()
    best = math.inf
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == math.inf:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return work_units / best


def hardware_yaml(hw: Hardware, where: dict[str, str]) -> str:
    """A hardware file with each value's origin in a comment."""
    lines = ["# written by `expertmesh plan --calibrate`"]
    for key, value in hw.to_dict().items():
        lines.append(f"{key}: {json.dumps(value)}  # {where.get(key, '')}".rstrip(" #"))
    return "\n".join(lines) + "\n"
