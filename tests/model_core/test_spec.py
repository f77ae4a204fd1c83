"""ModelSpec parses every supported DeepSeek config shape and rejects bad ones by field name."""

from __future__ import annotations

import json

import pytest

from model_core.make_model import PRESETS, preset_config
from model_core.spec import ConfigError, ModelSpec


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_parse(preset):
    spec = ModelSpec.from_dict(preset_config(preset))
    assert spec.moe_layers == list(range(spec.first_k_dense_replace, spec.num_hidden_layers))


def test_v2_and_v3_router_semantics():
    v2 = ModelSpec.from_dict(preset_config("tiny-v2-group")).router
    assert (v2.scoring_func, v2.topk_method, v2.group_score, v2.group_limited) == (
        "softmax",
        "group_limited_greedy",
        "max",
        True,
    )
    assert not v2.has_correction_bias and not v2.normalize
    v3 = ModelSpec.from_dict(preset_config("tiny-v3")).router
    assert (v3.scoring_func, v3.topk_method, v3.group_score) == ("sigmoid", "noaux_tc", "top2_sum")
    assert v3.has_correction_bias and v3.normalize and v3.routed_scaling_factor == 2.5


def test_q_lora_rank_null_and_set():
    assert ModelSpec.from_dict(preset_config("tiny-v2")).q_lora_rank is None
    assert ModelSpec.from_dict(preset_config("tiny-v3")).q_lora_rank == 48


def test_yarn_from_legacy_rope_scaling_and_from_rope_parameters():
    cfg = preset_config("tiny-v3")
    legacy = ModelSpec.from_dict(cfg)
    assert legacy.rope.kind == "yarn" and legacy.rope.factor == 4.0
    modern = dict(cfg)
    scaling = modern.pop("rope_scaling")
    modern["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": modern.pop("rope_theta"),
        **{k: v for k, v in scaling.items() if k != "type"},
    }
    assert ModelSpec.from_dict(modern).rope == legacy.rope
    # mscale_all_dim folds mscale² into the softmax scale (0.1·ln 4 + 1)²
    assert legacy.attention_scale == pytest.approx(legacy.qk_head_dim**-0.5 * (0.1 * 1.3862943611 + 1) ** 2)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_size": None}, "hidden_size"),
        ({"hidden_size": -4}, "hidden_size"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
        ({"topk_method": "greedy"}, "topk_method"),  # V3 routes with noaux_tc
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"first_k_dense_replace": 10}, "first_k_dense_replace"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type"),
        ({"rope_scaling": {"type": "yarn", "factor": "big"}}, "rope_scaling.factor"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
        ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps=nan: expected a finite positive number"),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
        ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor=inf: expected a finite positive number"),
        ({"rope_theta": float("inf")}, "rope_theta=inf"),
        ({"hidden_size": 2**40}, "hidden_size=1099511627776: expected at most"),
        ({"eos_token_id": 272}, r"eos_token_id=272: expected a token id in \[0, vocab_size=272\)"),
        ({"bos_token_id": "1"}, "bos_token_id='1'"),
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers=-1"),
        ({"torch_dtype": 16}, "torch_dtype=16"),
        ({"rope_scaling": [1, 2]}, "rope_scaling=\\[1, 2\\]: expected an object"),
        ({"rope_scaling": {"type": "yarn", "factor": float("nan")}}, "rope_scaling.factor=nan"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "beta_fast": "x"}}, "rope_scaling.beta_fast='x'"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "mscale": -1}}, "rope_scaling.mscale=-1"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "attention_factor": float("inf")}},
         "rope_scaling.attention_factor=inf"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(change, field):
    cfg = {**preset_config("tiny-v3"), **change}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelSpec.from_dict(cfg)


def test_group_limit_that_cannot_hold_top_k_is_rejected():
    cfg = {**preset_config("tiny-v2-group"), "num_experts_per_tok": 6, "topk_group": 1}
    with pytest.raises(ConfigError, match="topk_group=1"):
        ModelSpec.from_dict(cfg)


def test_from_dir_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        ModelSpec.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelSpec.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**preset_config("tiny-v2"), "kv_lora_rank": 0}))
    with pytest.raises(ConfigError, match=r"config\.json: kv_lora_rank=0"):
        ModelSpec.from_dir(tmp_path)
