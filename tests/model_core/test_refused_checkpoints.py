"""A checkpoint that would serve a wrong model is refused at load, naming the tensor, field, file or index entry:
non-finite or integer weights, a config that leaves tensors unread (or lacks some), non-regular files, a malformed
shard index or one whose paths leave the checkpoint directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gateway import Engine
from model_core.checkpoint import INDEX_NAME, CheckpointError, CheckpointReader
from model_core.make_model import make_model, preset_config, write_checkpoint
from model_core.spec import ConfigError

GATEWAY_TENSOR = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
EXPERT_TENSOR = "model.layers.2.mlp.experts.5.down_proj.weight"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def generate(model: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("generate", "--model", str(model), "--prompt-ids", "5,6,7", "--max-new-tokens", "2",
                   timeout=timeout)


def with_tensor(out: Path, name: str, value: torch.Tensor) -> Path:
    """tiny-v3 with one tensor replaced (by name)."""
    return write_checkpoint(out, preset_config("tiny-v3"), seed=2, overrides={name: value})


def with_config(src: Path, out: Path, **changes) -> Path:
    """A copy of the checkpoint at `src` whose config.json has `changes` (the weights unchanged)."""
    shutil.copytree(src, out)
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))  # NaN / Infinity as JSON writes them
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_model("tiny-v3", tmp_path_factory.mktemp("sharded") / "m", seed=2, shard_bytes=64 << 10)


def test_cli_refuses_a_nan_weight_naming_the_tensor(tmp_path):
    w = torch.randn(40, 64)
    w[3, 7] = float("nan")
    result = generate(with_tensor(tmp_path / "m", GATEWAY_TENSOR, w))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"tensor {GATEWAY_TENSOR!r} has 1 non-finite value" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_infinite_expert_weight_is_refused_by_its_expert_group(tmp_path):
    w = torch.randn(64, 32)
    w[0, :2] = float("inf")
    with pytest.raises(CheckpointError, match=rf"tensor '{EXPERT_TENSOR}' has 2 non-finite values"):
        Engine.from_pretrained(with_tensor(tmp_path / "m", EXPERT_TENSOR, w))


@pytest.mark.slow
def test_an_expert_actor_that_refuses_its_weights_ends_the_cli_with_one_line_naming_the_tensor(tmp_path):
    w = torch.randn(64, 32)
    w[5, 5] = float("nan")
    model = with_tensor(tmp_path / "m", EXPERT_TENSOR, w)
    result = run_cli("generate", "--model", str(model), "--backend", "ray", "--devices", "2", "--prompt-ids", "5,6",
                     "--max-new-tokens", "2", timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "a replica failed to start" in result.stderr
    assert f"tensor {EXPERT_TENSOR!r} has 1 non-finite" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_value_that_overflows_the_serving_dtype_is_refused(tmp_path):
    w = torch.randn(40, 64)
    w[1, 1] = 1e6  # finite in float32, inf in float16
    d = with_tensor(tmp_path / "m", GATEWAY_TENSOR, w)
    with pytest.raises(CheckpointError, match=rf"'{GATEWAY_TENSOR}' has 1 non-finite value.*float16"):
        Engine.from_pretrained(d, dtype="float16")


def test_cli_refuses_a_nan_config_number_naming_the_field(sharded, tmp_path):
    result = generate(with_config(sharded, tmp_path / "m", rms_norm_eps=float("nan")))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "config.json: rms_norm_eps=nan: expected a finite positive number" in result.stderr


def test_an_infinite_routed_scaling_factor_is_refused(sharded, tmp_path):
    with pytest.raises(ConfigError, match="routed_scaling_factor=inf: expected a finite positive number"):
        Engine.from_pretrained(with_config(sharded, tmp_path / "m", routed_scaling_factor=float("inf")))


def test_an_integer_weight_is_refused_naming_tensor_and_dtype(tmp_path):
    d = with_tensor(tmp_path / "m", GATEWAY_TENSOR, torch.randint(-3, 3, (40, 64), dtype=torch.int32))
    with pytest.raises(CheckpointError, match=rf"tensor '{GATEWAY_TENSOR}' is int32: expected a floating-point"):
        Engine.from_pretrained(d)


def test_a_config_with_fewer_layers_than_the_checkpoint_is_refused(sharded, tmp_path):
    d = with_config(sharded, tmp_path / "m", num_hidden_layers=2)
    with pytest.raises(CheckpointError, match=r"not used by config\.json.*'model\.layers\.2\."):
        Engine.from_pretrained(d)


def test_no_shared_experts_against_a_checkpoint_that_has_them_is_refused(sharded, tmp_path):
    d = with_config(sharded, tmp_path / "m", n_shared_experts=0)
    with pytest.raises(CheckpointError, match=r"not used by config\.json.*'model\.layers\.1\.mlp\.shared_experts\."):
        Engine.from_pretrained(d)


def test_tensors_the_config_needs_are_listed_when_missing(sharded, tmp_path):
    d = with_config(sharded, tmp_path / "m", num_hidden_layers=4)
    with pytest.raises(CheckpointError, match=r"missing \d+ tensors config\.json implies.*'model\.layers\.3\."):
        CheckpointReader.for_model(d, preset_spec(d))


def test_mtp_layers_the_config_declares_are_not_refused(tmp_path):
    """DeepSeek-V3 ships its multi-token-prediction layer as layer num_hidden_layers; transformers skips it."""
    config = {**preset_config("tiny-v3"), "num_hidden_layers": 3}
    d = write_checkpoint(tmp_path / "m", config, seed=2)
    config["num_hidden_layers"], config["num_nextn_predict_layers"] = 2, 1
    (d / "config.json").write_text(json.dumps(config))
    reader = CheckpointReader.for_model(d, preset_spec(d))
    assert "model.layers.2.mlp.gate.weight" in reader  # there, never read


def test_cli_refuses_a_fifo_as_the_weights_file(tmp_path):
    d = make_model("tiny-v3", tmp_path / "m", seed=2)
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    result = generate(d, timeout=60)  # hung in open() before
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{d / 'model.safetensors'}: not a regular file" in result.stderr


def test_an_index_whose_weight_map_is_a_list_is_refused(sharded, tmp_path):
    d = shutil.copytree(sharded, tmp_path / "m")
    index = json.loads((d / INDEX_NAME).read_text())
    (d / INDEX_NAME).write_text(json.dumps({"weight_map": list(index["weight_map"].items())}))
    with pytest.raises(CheckpointError, match=r"weight_map: expected an object of tensor name -> shard file, got "
                                              r"a list"):
        Engine.from_pretrained(d)


def outside_shard(sharded: Path, tmp_path: Path) -> tuple[Path, str, Path]:
    """A copy of `sharded` with its first shard moved out of the directory: (dir, shard name, the moved file)."""
    d = shutil.copytree(sharded, tmp_path / "m")
    shard = sorted(set(json.loads((d / INDEX_NAME).read_text())["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere" / shard
    outside.parent.mkdir()
    shutil.move(d / shard, outside)
    return d, shard, outside


def rewrite_index(d: Path, shard: str, entry: str) -> None:
    index = json.loads((d / INDEX_NAME).read_text())
    index["weight_map"] = {n: entry if f == shard else f for n, f in index["weight_map"].items()}
    (d / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_shard_paths_that_leave_the_checkpoint_directory_are_refused(sharded, tmp_path, how):
    d, shard, outside = outside_shard(sharded, tmp_path)
    if how == "dotdot":
        entry = f"../elsewhere/{shard}"
        rewrite_index(d, shard, entry)
    elif how == "absolute":
        entry = str(outside)
        rewrite_index(d, shard, entry)
    else:
        entry = shard
        (d / shard).symlink_to(outside)
    with pytest.raises(CheckpointError, match=rf"{INDEX_NAME}: shard {entry!r}.*outside {d}"):
        Engine.from_pretrained(d)


def test_a_hugging_face_cache_snapshot_of_symlinks_into_its_blobs_loads(sharded, tmp_path):
    """The hub cache keeps snapshots/<rev>/<file> as links to ../../blobs/<hash>: that is not leaving the model."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(sharded.iterdir())):
        shutil.copy(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    with Engine.from_pretrained(snapshot) as a, Engine.from_pretrained(sharded) as b:
        assert a.generate([[5, 6, 7]], max_new_tokens=3) == b.generate([[5, 6, 7]], max_new_tokens=3)


def preset_spec(d: Path):
    from model_core.spec import ModelSpec

    return ModelSpec.from_dir(d)
