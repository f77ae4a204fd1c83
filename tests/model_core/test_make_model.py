"""The checkpoint generator: seeded, loadable by transformers, routes over many experts, byte tokenizer."""

from __future__ import annotations

import json

import torch

from gateway import Engine
from model_core.checkpoint import CheckpointReader
from model_core.make_model import make_model
from model_core.tokenizer import ByteTokenizer
from tests.conftest import random_prompts


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = CheckpointReader(make_model("tiny-v3", tmp_path / "a", seed=5))
    b = CheckpointReader(make_model("tiny-v3", tmp_path / "b", seed=5))
    c = CheckpointReader(make_model("tiny-v3", tmp_path / "c", seed=6))
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    assert torch.equal(a.get(name), b.get(name))
    assert not torch.equal(a.get(name), c.get(name))
    bias = a.get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.abs().min() > 0  # a non-zero correction bias


def test_routing_spreads_over_many_experts(model_dirs):
    for name, path in model_dirs.items():
        with Engine.from_pretrained(path) as engine:
            engine.logits(random_prompts(engine.spec.vocab_size, [64, 64], seed=11))
            for row in engine.routing_summary.rows():
                n = engine.spec.n_routed_experts
                assert row["experts_hit"] >= 0.75 * n, (name, row)
                assert row["max_over_mean"] < 4, (name, row)


def test_tokenizer_round_trips_and_agrees_with_hf_tokenizers(model_dirs):
    from tokenizers import Tokenizer

    path = model_dirs["tiny-v3"]
    ours = ByteTokenizer.from_dir(path)
    theirs = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "Hello, experts! ünïcödé ✓ 12\n\ttabs"
    ids = ours.encode(text, add_bos=False)
    assert ids == theirs.encode(text).ids
    assert ours.decode(ids) == text == theirs.decode(ids)
    assert ours.encode("a")[0] == ours.bos_id == json.loads((path / "config.json").read_text())["bos_token_id"]


def test_other_tokenizer_json_files_load_through_the_tokenizers_library(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from model_core.tokenizer import HFTokenizer, load_tokenizer

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "!": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode("hello world !") == [1, 2, 3] and loaded.decode([1, 2]) == "hello world"
    import pytest

    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nowhere")


def test_v2_lite_moe_preset_has_deepseek_v2_lite_moe_shapes_and_transformers_agrees_on_its_tensors():
    """Checked from the config alone: the checkpoint (~3.4 GiB in bf16) is written only by the GPU benchmark."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from model_core.layout import checkpoint_layout
    from model_core.make_model import preset_config
    from model_core.spec import ModelSpec

    cfg = preset_config("v2-lite-moe")
    spec = ModelSpec.from_dict(cfg)
    assert (spec.hidden_size, spec.moe_intermediate_size, spec.n_routed_experts, spec.top_k) == (2048, 1408, 64, 6)
    assert (spec.n_shared_experts, spec.kv_lora_rank, spec.q_lora_rank) == (2, 512, None)
    assert (spec.router.scoring_func, spec.router.topk_method, spec.router.normalize) == ("softmax", "greedy", False)
    assert spec.moe_layers == [1, 2, 3] and cfg["torch_dtype"] == "bfloat16"
    ours = checkpoint_layout(spec)
    assert ours["model.layers.1.mlp.experts.63.gate_proj.weight"] == (1408, 2048)
    with torch.device("meta"):  # shapes only, nothing allocated
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    theirs = {name: tuple(p.shape) for name, p in hf.state_dict().items()}
    assert {k: v for k, v in theirs.items() if ".mlp.experts." not in k} == \
        {k: v for k, v in ours.items() if ".mlp.experts." not in k}
    for layer in spec.moe_layers:  # transformers holds each layer's experts fused: [E, 2I, H] and [E, H, I]
        assert theirs[f"model.layers.{layer}.mlp.experts.gate_up_proj"] == (64, 2 * 1408, 2048)
        assert theirs[f"model.layers.{layer}.mlp.experts.down_proj"] == (64, 2048, 1408)
        assert ours[f"model.layers.{layer}.mlp.experts.0.down_proj.weight"] == (2048, 1408)
