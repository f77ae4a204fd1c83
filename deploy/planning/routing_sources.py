"""Where the planner's routing comes from: recorded traces or synthetic router scores, routed by the model's own gate.

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
from pathlib import Path
from typing import Any

import torch

from gateway.serving.routing_trace import RequestTrace
from model_core.make_model import PRESETS, preset_config
from model_core.spec import ConfigError, ModelSpec
from router_service.routing import select_experts

# Shape legend: T = replayed tokens, K = experts per token, E = routed experts, L = MoE layers, M = top-M devices.

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


RoutingSource = SyntheticRouting | TraceRouting


def expert_loads(source: RoutingSource) -> torch.Tensor:
    """[L, E] tokens per expert under the model's own routing (what an EPLB planner would observe)."""
    n = source.spec.n_routed_experts
    return torch.stack([torch.bincount(source.route(j)[0].flatten(), minlength=n) for j in range(len(source.layers))])
