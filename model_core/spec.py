"""Model spec: a validated, typed view of a Hugging Face `deepseek_v2` / `deepseek_v3` config.json (every number
checked for type, finiteness and the range the math needs, naming the field)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = {
    "deepseek_v2": ("greedy", "group_limited_greedy"),
    "deepseek_v3": ("noaux_tc",),
}
SCORING_FUNCS = {"deepseek_v2": "softmax", "deepseek_v3": "sigmoid"}
MAX_SIZE = 2**31 - 1  # sizes and ids index int32 tensors (and larger ones would not fit in memory anyway)


class ConfigError(ValueError):
    """A config.json (or deployment) value is missing, unknown or inconsistent; the message names it."""


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """Rotary embedding settings; `kind` is 'default' or 'yarn'."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """How the router scores and selects experts (DeepSeek V2/V3 gate)."""

    scoring_func: str  # "softmax" (V2) | "sigmoid" (V3)
    topk_method: str  # "greedy" | "group_limited_greedy" (V2) | "noaux_tc" (V3)
    n_routed_experts: int
    top_k: int
    n_group: int
    topk_group: int
    normalize: bool  # divide the top-k weights by their sum (V3 norm_topk_prob)
    routed_scaling_factor: float
    has_correction_bias: bool  # V3 checkpoints carry e_score_correction_bias

    @property
    def group_score(self) -> str:
        """How a group (or device) is scored: 'max' (V2) or 'top2_sum' (V3)."""
        return "top2_sum" if self.topk_method == "noaux_tc" else "max"

    @property
    def group_limited(self) -> bool:
        return self.topk_method in ("group_limited_greedy", "noaux_tc") and self.n_group > 1


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything the gateway and expert groups need to know about the model's shapes and math."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_shared_experts: int
    first_k_dense_replace: int
    moe_layer_freq: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_interleave: bool
    attention_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    torch_dtype: str
    rope: RopeSpec
    router: RouterSpec
    fp8_block: tuple[int, int] | None = None  # block-wise FP8 weights (DeepSeek-V3's release): scale block size
    mtp_layers: int = 0  # num_nextn_predict_layers: multi-token-prediction layers stored after the model's, unused

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_routed_experts(self) -> int:
        return self.router.n_routed_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek's rule: dense for the first k layers, then MoE every `moe_layer_freq` layers."""
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def attention_scale(self) -> float:
        """Softmax scale: 1/sqrt(qk_head_dim), times mscale² under YaRN with mscale_all_dim (DeepSeek-V2)."""
        scale = self.qk_head_dim**-0.5
        if self.rope.kind == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelSpec:
        """Read and validate `<path>/config.json`."""
        file = Path(path) / "config.json"
        if not file.exists():
            raise ConfigError(f"{file}: not found (a model directory needs config.json)")
        if not file.is_file():
            raise ConfigError(f"{file}: not a regular file")
        try:
            raw = json.loads(file.read_text())
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ConfigError(f"{file}: not valid JSON: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read ({exc})") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        """Validate a config.json dict; every error names the offending field."""
        f = _Fields(raw)
        model_type = f.choice("model_type", SUPPORTED_MODEL_TYPES)
        hidden = f.pos_int("hidden_size")
        heads = f.pos_int("num_attention_heads")
        kv_heads = f.opt_int("num_key_value_heads", default=heads)
        if kv_heads != heads:
            raise ConfigError(f"num_key_value_heads={kv_heads}: MLA needs it equal to num_attention_heads={heads}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r}: only 'silu' is supported")
        if raw.get("mlp_bias", False):
            raise ConfigError("mlp_bias=true: DeepSeek MLPs have no bias; not supported")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"pretraining_tp={raw.get('pretraining_tp')}: expected 1")
        layers = f.pos_int("num_hidden_layers")
        n_routed = f.pos_int("n_routed_experts")
        top_k = f.pos_int("num_experts_per_tok")
        if top_k > n_routed:
            raise ConfigError(f"num_experts_per_tok={top_k}: must be <= n_routed_experts={n_routed}")
        topk_method = raw.get("topk_method", "noaux_tc" if model_type == "deepseek_v3" else "greedy")
        if topk_method not in TOPK_METHODS[model_type]:
            raise ConfigError(
                f"topk_method={topk_method!r}: expected one of {list(TOPK_METHODS[model_type])} for {model_type}"
            )
        scoring = raw.get("scoring_func", SCORING_FUNCS[model_type])
        if scoring != SCORING_FUNCS[model_type]:
            raise ConfigError(
                f"scoring_func={scoring!r}: {model_type} uses {SCORING_FUNCS[model_type]!r} "
                "(this is what transformers computes)"
            )
        n_group = f.opt_int("n_group", default=1) or 1
        topk_group = f.opt_int("topk_group", default=n_group) or n_group
        if topk_method != "greedy":
            if n_routed % n_group:
                raise ConfigError(f"n_group={n_group}: must divide n_routed_experts={n_routed}")
            if not 1 <= topk_group <= n_group:
                raise ConfigError(f"topk_group={topk_group}: expected 1..n_group={n_group}")
            if topk_group * (n_routed // n_group) < top_k:
                raise ConfigError(
                    f"topk_group={topk_group}: the chosen groups hold {topk_group * (n_routed // n_group)} "
                    f"experts, fewer than num_experts_per_tok={top_k}"
                )
            if topk_method == "noaux_tc" and n_routed // n_group < 2:
                raise ConfigError(
                    f"n_group={n_group}: noaux_tc scores a group by its top two, so it needs >= 2 experts"
                )
        norm = f.bool_("norm_topk_prob", default=model_type == "deepseek_v3")
        if model_type == "deepseek_v2" and norm:
            # transformers' DeepseekV2TopkRouter ignores norm_topk_prob; we follow the reference.
            logger.warning("norm_topk_prob=true is ignored for deepseek_v2, as transformers does")
            norm = False
        first_dense = f.opt_int("first_k_dense_replace", default=0, minimum=0)
        if first_dense > layers:
            raise ConfigError(f"first_k_dense_replace={first_dense}: exceeds num_hidden_layers={layers}")
        moe_freq = f.opt_int("moe_layer_freq", default=1, minimum=1)
        if moe_freq != 1:
            raise ConfigError(
                f"moe_layer_freq={moe_freq}: transformers builds an MoE in every layer after "
                "first_k_dense_replace; only 1 is supported"
            )
        q_lora = raw.get("q_lora_rank")
        if q_lora is not None:
            q_lora = f.pos_int("q_lora_rank")
        rope_dim = f.pos_int("qk_rope_head_dim")
        if rope_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={rope_dim}: must be even")
        vocab = f.pos_int("vocab_size")
        max_pos = f.pos_int("max_position_embeddings")
        fp8_block = _parse_quantization(raw.get("quantization_config"))
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=f.pos_int("intermediate_size"),
            moe_intermediate_size=f.pos_int("moe_intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            q_lora_rank=q_lora,
            kv_lora_rank=f.pos_int("kv_lora_rank"),
            qk_nope_head_dim=f.pos_int("qk_nope_head_dim"),
            qk_rope_head_dim=rope_dim,
            v_head_dim=f.pos_int("v_head_dim"),
            n_shared_experts=f.opt_int("n_shared_experts", default=0, minimum=0) or 0,
            first_k_dense_replace=first_dense,
            moe_layer_freq=moe_freq,
            rms_norm_eps=f.pos_float("rms_norm_eps", default=1e-6),
            max_position_embeddings=max_pos,
            rope_interleave=f.bool_("rope_interleave", default=True) if model_type == "deepseek_v3" else True,
            attention_bias=f.bool_("attention_bias", default=False),
            tie_word_embeddings=f.bool_("tie_word_embeddings", default=False),
            bos_token_id=f.token_id("bos_token_id", vocab),
            eos_token_id=f.token_id("eos_token_id", vocab),
            torch_dtype=_torch_dtype(raw),
            rope=_parse_rope(raw, max_pos),
            router=RouterSpec(
                scoring_func=scoring,
                topk_method=topk_method,
                n_routed_experts=n_routed,
                top_k=top_k,
                n_group=n_group,
                topk_group=topk_group,
                normalize=norm,
                routed_scaling_factor=f.pos_float("routed_scaling_factor", default=1.0),
                has_correction_bias=topk_method == "noaux_tc",
            ),
            fp8_block=fp8_block,
            mtp_layers=f.opt_int("num_nextn_predict_layers", default=0, minimum=0),
        )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-scale correction: 0.1·mscale·ln(scale) + 1 (1 when not scaled)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse_quantization(q: Any) -> tuple[int, int] | None:
    """DeepSeek-V3's block-wise FP8 (`quant_method: fp8`, `weight_block_size: [128, 128]`); other methods fail."""
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise ConfigError(f"quantization_config.quant_method={method!r}: only 'fp8' (block-wise) is supported")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"quantization_config.weight_block_size={block!r}: expected two positive integers")
    return block[0], block[1]


def _parse_rope(raw: dict[str, Any], max_pos: int) -> RopeSpec:
    """Accept the legacy `rope_theta` + `rope_scaling` pair and transformers-5 `rope_parameters`."""
    section = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    params = raw.get(section) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{section}={params!r}: expected an object or null")
    p = _Fields(params, prefix=f"{section}.")
    theta = (p if "rope_theta" in params else _Fields(raw)).pos_float("rope_theta", default=10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind != "yarn":
        raise ConfigError(f"rope_scaling.type={kind!r}: expected 'yarn' or none")
    orig = p.opt_int("original_max_position_embeddings", default=max_pos)
    if orig > MAX_SIZE:
        raise ConfigError(f"{section}.original_max_position_embeddings={orig}: expected at most {MAX_SIZE}")
    attention_factor = params.get("attention_factor")
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"{section}.truncate={truncate!r}: expected true or false")
    return RopeSpec(
        theta=theta,
        kind="yarn",
        factor=p.pos_float("factor", default=None),
        original_max_position_embeddings=orig,
        beta_fast=p.pos_float("beta_fast", default=32.0),
        beta_slow=p.pos_float("beta_slow", default=1.0),
        mscale=p.pos_float("mscale", default=0.0, zero=True),
        mscale_all_dim=p.pos_float("mscale_all_dim", default=0.0, zero=True),
        attention_factor=None if attention_factor is None else p.pos_float("attention_factor", default=None),
        truncate=truncate,
    )


def _torch_dtype(raw: dict[str, Any]) -> str:
    value = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    if not isinstance(value, str):
        raise ConfigError(f"torch_dtype={value!r}: expected a dtype name such as 'bfloat16'")
    return value


class _Fields:
    """Typed accessors over a raw config dict that raise ConfigError naming the field."""

    def __init__(self, raw: dict[str, Any], prefix: str = "") -> None:
        """prefix: how errors name a nested section's fields ('rope_scaling.')."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(raw).__name__}")
        self.raw, self.prefix = raw, prefix

    def _get(self, name: str) -> Any:
        if name not in self.raw or self.raw[name] is None:
            raise ConfigError(f"{self.prefix}{name}: missing")
        return self.raw[name]

    def pos_int(self, name: str) -> int:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{self.prefix}{name}={value!r}: expected a positive integer")
        if value > MAX_SIZE:
            raise ConfigError(f"{self.prefix}{name}={value}: expected at most {MAX_SIZE}")
        return value

    def opt_int(self, name: str, default: int, minimum: int = 1) -> int:
        value = self.raw.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.prefix}{name}={value!r}: expected an integer >= {minimum}")
        if value > MAX_SIZE:
            raise ConfigError(f"{self.prefix}{name}={value}: expected at most {MAX_SIZE}")
        return value

    def pos_float(self, name: str, default: float | None, zero: bool = False) -> float:
        """A finite number > 0 (>= 0 with `zero`); default None: required. NaN and inf (JSON's NaN, Infinity)
        pass a plain `<= 0` test, and would serve garbage."""
        value = self._get(name) if default is None else self.raw.get(name, default)
        if value is None:
            value = default
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0 or (value == 0 and not zero)):
            expected = "a finite number >= 0" if zero else "a finite positive number"
            raise ConfigError(f"{self.prefix}{name}={value!r}: expected {expected}")
        return float(value)

    def token_id(self, name: str, vocab_size: int) -> int | None:
        """A special token's id (or the first of a list, as transformers' eos lists), inside the vocabulary."""
        value = self.raw.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
            raise ConfigError(f"{self.prefix}{name}={value!r}: expected a token id in [0, vocab_size={vocab_size})")
        return value

    def bool_(self, name: str, default: bool) -> bool:
        value = self.raw.get(name, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.prefix}{name}={value!r}: expected true or false")
        return value

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = self._get(name)
        if value not in allowed:
            raise ConfigError(f"{name}={value!r}: expected one of {list(allowed)}")
        return value
