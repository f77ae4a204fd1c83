"""Seeded random checkpoints of named presets, written in the Hugging Face layout, for offline runs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model_core.chat_template import write_default as write_default_chat_template
from model_core.checkpoint import INDEX_NAME, SINGLE_NAME
from model_core.fp8 import quantize_blocks
from model_core.layout import checkpoint_layout
from model_core.spec import ModelSpec
from model_core.tokenizer import ByteTokenizer

_TINY: dict[str, Any] = {
    "vocab_size": 272,
    "hidden_size": 64,
    "intermediate_size": 160,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
}

# Each preset: (architecture, config overrides on top of the family defaults).
PRESETS: dict[str, dict[str, Any]] = {
    # V2 softmax + greedy top-k, no q compression (like DeepSeek-V2-Lite)
    "tiny-v2": {
        **_TINY,
        "model_type": "deepseek_v2",
        "topk_method": "greedy",
        "q_lora_rank": None,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
    },
    # V2 softmax + group-limited greedy, compressed q, scaled weights (like DeepSeek-V2)
    "tiny-v2-group": {
        **_TINY,
        "model_type": "deepseek_v2",
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "q_lora_rank": 48,
        "norm_topk_prob": False,
        "routed_scaling_factor": 2.0,
        "n_shared_experts": 2,
    },
    # V3 sigmoid + noaux_tc with a non-zero correction bias, YaRN rope, interleaved rope
    "tiny-v3": {
        **_TINY,
        "model_type": "deepseek_v3",
        "topk_method": "noaux_tc",
        "n_group": 4,
        "topk_group": 2,
        "q_lora_rank": 48,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "n_shared_experts": 1,
        "rope_interleave": True,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
    # V3 without q compression, non-interleaved rope, no dense layer, no YaRN
    "tiny-v3-plain": {
        **_TINY,
        "model_type": "deepseek_v3",
        "topk_method": "noaux_tc",
        "n_group": 2,
        "topk_group": 1,
        "q_lora_rank": None,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "rope_interleave": False,
        "first_k_dense_replace": 0,
        "num_hidden_layers": 2,
    },
    # CPU benchmark model: DeepSeek-V3-like routing, 64 experts, top-6, 2 shared, 4 MoE layers
    "small-v3": {
        "model_type": "deepseek_v3",
        "vocab_size": 272,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 5,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 384,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "n_shared_experts": 2,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rope_interleave": True,
        "max_position_embeddings": 8192,  # room for the engine benchmark's 4096-token prompt and its decode
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
    },
    # GPU benchmark model: DeepSeek-V2-Lite's shapes (attention, dense MLP, 64 routed experts of width 1408,
    # top-6 softmax greedy, 2 shared) with 1 dense + 3 MoE layers instead of 27, and a byte-sized vocabulary
    "v2-lite-moe": {
        "model_type": "deepseek_v2",
        "vocab_size": 272,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "n_shared_experts": 2,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
    },
}


def _fp8(preset: str, block: list[int]) -> dict[str, Any]:
    """`preset` released as DeepSeek-V3 is: every linear projection block-wise FP8 with float32 scale_inv tiles."""
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block}
    return {**PRESETS[preset], "quantization_config": quantization}


# Blocks of 24 x 16 give the tiny model's experts partial tiles (an intermediate of 32 = 24 + 8 rows); small-v3
# uses DeepSeek-V3's own 128 x 128.
PRESETS["tiny-v3-fp8"] = _fp8("tiny-v3", [24, 16])
PRESETS["small-v3-fp8"] = _fp8("small-v3", [128, 128])

_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def preset_config(name: str) -> dict[str, Any]:
    """A full config.json dict for a preset."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}: expected one of {sorted(PRESETS)}")
    tok = ByteTokenizer.default()
    cfg = {
        "architectures": [_ARCHITECTURES[PRESETS[name]["model_type"]]],
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.specials["<|pad|>"],
        "initializer_range": 0.02,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
        **copy.deepcopy(PRESETS[name]),  # callers (transformers' config classes) may change nested dicts in place
    }
    if cfg["vocab_size"] < tok.size:
        raise ValueError(f"preset {name}: vocab_size={cfg['vocab_size']} is smaller than the tokenizer ({tok.size})")
    return cfg


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Initial values chosen so that activations keep unit scale and routing spreads over experts."""
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=gen)
    # Linear weights [out, in]: std 1/sqrt(in) keeps outputs (and router logits) at unit scale.
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])


def write_checkpoint(
    out: str | Path,
    config: dict[str, Any],
    seed: int = 0,
    shard_bytes: int | None = None,
    overrides: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config.json, tokenizer.json, tokenizer_config.json (special tokens and a chat template) and
    safetensors (sharded with an index past `shard_bytes`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec.from_dict(config)
    dtype = getattr(torch, spec.torch_dtype)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in checkpoint_layout(spec).items():
        value = random_tensor(name, shape, gen)
        if name.endswith("e_score_correction_bias"):
            tensors[name] = value.float()  # transformers keeps this buffer in float32
        else:
            tensors[name] = value.to(dtype)
    if spec.fp8_block is not None:
        tensors.update(_quantized(tensors, spec.fp8_block))
    for name, value in (overrides or {}).items():
        tensors[name] = value
    shards = _split(tensors, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    ByteTokenizer.default().save(out)
    write_default_chat_template(out, "<|bos|>", "<|eos|>")
    return out


def _quantized(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The linear projections (`*proj.weight`, as DeepSeek-V3 ships them: not embeddings, norms, router gates or
    lm_head) as float8_e4m3fn with their `<name>_scale_inv` tiles."""
    out = {}
    for name, value in tensors.items():
        if name.endswith("proj.weight") and value.dim() == 2:
            out[name], out[f"{name}_scale_inv"] = quantize_blocks(value, block)
    return out


def make_model(preset: str, out: str | Path, seed: int = 0, shard_bytes: int | None = None) -> Path:
    """Generate the checkpoint of a named preset (see PRESETS)."""
    default_shard = None if preset.startswith("tiny") else 256 << 20
    return write_checkpoint(out, preset_config(preset), seed=seed, shard_bytes=shard_bytes or default_shard)


def _split(tensors: dict[str, torch.Tensor], shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not shard_bytes:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards
