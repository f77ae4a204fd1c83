"""Checkpoint reading: lazy, by name, single-file or sharded, with errors that name the file and tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from model_core.checkpoint import INDEX_NAME, CheckpointError, CheckpointReader, is_routed_expert_tensor
from model_core.layout import checkpoint_layout
from model_core.make_model import make_model
from model_core.spec import ModelSpec


@pytest.fixture(scope="module")
def single_and_sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    single = make_model("tiny-v2", root / "single", seed=3)
    sharded = make_model("tiny-v2", root / "sharded", seed=3, shard_bytes=64 << 10)
    return single, sharded


def test_sharded_and_single_file_hold_the_same_tensors(single_and_sharded):
    single, sharded = single_and_sharded
    assert (sharded / INDEX_NAME).is_file() and not (single / INDEX_NAME).exists()
    shards = json.loads((sharded / INDEX_NAME).read_text())["weight_map"]
    assert len(set(shards.values())) > 2
    a, b = CheckpointReader(single), CheckpointReader(sharded)
    spec = ModelSpec.from_dir(single)
    assert a.names() == b.names() == sorted(checkpoint_layout(spec))
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name


def test_reading_is_lazy_and_recorded(single_and_sharded):
    reader = CheckpointReader(single_and_sharded[1])
    assert reader.loaded == set()
    reader.get("model.norm.weight")
    assert reader.loaded == {"model.norm.weight"}


def test_missing_tensor_and_wrong_shape_name_file_and_tensor(single_and_sharded):
    reader = CheckpointReader(single_and_sharded[1])
    with pytest.raises(CheckpointError, match="'model.layers.9.mlp.gate.weight' is missing"):
        reader.get("model.layers.9.mlp.gate.weight")
    with pytest.raises(
        CheckpointError,
        match=r"model-\d+-of-\d+\.safetensors: tensor 'model\.norm\.weight' has "
        r"shape \[64\], expected \[65\]",
    ):
        reader.get("model.norm.weight", shape=(65,))


def test_index_naming_a_missing_shard_is_reported(tmp_path):
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="names shard 'model-00001-of-00002.safetensors'"):
        CheckpointReader(tmp_path)


def test_empty_directory_and_damaged_file_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json and no"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot open as safetensors"):
        CheckpointReader(tmp_path)


def test_engine_reports_a_checkpoint_tensor_with_the_wrong_shape(tmp_path):
    from gateway import Engine

    d = make_model("tiny-v3-plain", tmp_path / "m", seed=1)
    reader = CheckpointReader(d)
    tensors = {n: reader.get(n) for n in reader.names()}
    tensors["model.layers.1.mlp.gate.weight"] = torch.randn(15, 64)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.1\.mlp\.gate\.weight' has shape \[15, 64\], "
        r"expected \[16, 64\]",
    ):
        Engine.from_pretrained(d)


def test_routed_expert_names_are_recognised():
    assert is_routed_expert_tensor("model.layers.3.mlp.experts.7.up_proj.weight")
    assert not is_routed_expert_tensor("model.layers.3.mlp.shared_experts.up_proj.weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_one_nan_or_inf_anywhere(dtype):
    from model_core.checkpoint import all_finite

    clean = torch.randn(37, 129).to(dtype)  # odd sizes: the value may sit in a vector loop's tail
    assert all_finite(clean) and all_finite(clean[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in ((0, 0), (36, 128), (17, 64)):
            poisoned = clean.clone()
            poisoned[at] = bad
            assert not all_finite(poisoned) and not all_finite(poisoned.t()), (bad, at)
