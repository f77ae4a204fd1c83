"""The checkpoint's tensor names and shapes for a ModelSpec (what the generator writes and loaders expect)."""

from __future__ import annotations

from model_core.spec import ModelSpec

Shape = tuple[int, ...]


def expert_weight_names(layer: int, expert: int) -> tuple[str, str, str]:
    """On-disk names of one routed expert's (gate, up, down) projections."""
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"


def expert_shapes(spec: ModelSpec) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Shapes of one routed expert's (gate, up, down) weights: [I, H], [I, H], [H, I]."""
    h, i = spec.hidden_size, spec.moe_intermediate_size
    return (i, h), (i, h), (h, i)


def attention_layout(spec: ModelSpec, layer: int) -> dict[str, Shape]:
    """MLA projections of one layer, on-disk names -> shapes."""
    p = f"model.layers.{layer}.self_attn"
    h, heads = spec.hidden_size, spec.num_attention_heads
    out: dict[str, Shape] = {}
    if spec.q_lora_rank is None:
        out[f"{p}.q_proj.weight"] = (heads * spec.qk_head_dim, h)
    else:
        out[f"{p}.q_a_proj.weight"] = (spec.q_lora_rank, h)
        if spec.attention_bias:
            out[f"{p}.q_a_proj.bias"] = (spec.q_lora_rank,)
        out[f"{p}.q_a_layernorm.weight"] = (spec.q_lora_rank,)
        out[f"{p}.q_b_proj.weight"] = (heads * spec.qk_head_dim, spec.q_lora_rank)
    out[f"{p}.kv_a_proj_with_mqa.weight"] = (spec.kv_lora_rank + spec.qk_rope_head_dim, h)
    if spec.attention_bias:
        out[f"{p}.kv_a_proj_with_mqa.bias"] = (spec.kv_lora_rank + spec.qk_rope_head_dim,)
    out[f"{p}.kv_a_layernorm.weight"] = (spec.kv_lora_rank,)
    out[f"{p}.kv_b_proj.weight"] = (heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank)
    out[f"{p}.o_proj.weight"] = (h, heads * spec.v_head_dim)
    if spec.attention_bias:
        out[f"{p}.o_proj.bias"] = (h,)
    return out


def mlp_layout(prefix: str, hidden: int, inter: int) -> dict[str, Shape]:
    return {
        f"{prefix}.gate_proj.weight": (inter, hidden),
        f"{prefix}.up_proj.weight": (inter, hidden),
        f"{prefix}.down_proj.weight": (hidden, inter),
    }


def gateway_layout(spec: ModelSpec) -> dict[str, Shape]:
    """Every tensor the gateway owns: all of the model except routed experts."""
    h = spec.hidden_size
    out: dict[str, Shape] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        out.update(attention_layout(spec, layer))
        if spec.is_moe_layer(layer):
            out[f"{p}.mlp.gate.weight"] = (spec.n_routed_experts, h)
            if spec.router.has_correction_bias:
                out[f"{p}.mlp.gate.e_score_correction_bias"] = (spec.n_routed_experts,)
            if spec.n_shared_experts:
                out.update(mlp_layout(f"{p}.mlp.shared_experts", h, spec.moe_intermediate_size * spec.n_shared_experts))
        else:
            out.update(mlp_layout(f"{p}.mlp", h, spec.intermediate_size))
    out["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, h)
    return out


def expert_layout(spec: ModelSpec, experts: list[int] | None = None) -> dict[str, Shape]:
    """Routed-expert tensors of every MoE layer (all experts, or only `experts`)."""
    ids = range(spec.n_routed_experts) if experts is None else experts
    shapes = expert_shapes(spec)
    out: dict[str, Shape] = {}
    for layer in spec.moe_layers:
        for e in ids:
            out.update(zip(expert_weight_names(layer, e), shapes, strict=True))
    return out


def checkpoint_layout(spec: ModelSpec) -> dict[str, Shape]:
    return {**gateway_layout(spec), **expert_layout(spec)}
