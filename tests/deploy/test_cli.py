"""The `expertmesh` console script: make-model and generate, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import Engine
from model_core.tokenizer import ByteTokenizer


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, timeout=120)


def test_make_model_then_generate_json_matches_the_engine(tmp_path):
    out = tmp_path / "tiny"
    made = run_cli("make-model", "--preset", "tiny-v2-group", "--out", str(out), "--seed", "4", "--shard-mb", "1")
    assert made.returncode == 0, made.stderr
    assert (out / "model.safetensors.index.json").is_file()
    gen = run_cli("generate", "--model", str(out), "--prompt", "MoE!", "--max-new-tokens", "6", "--json")
    assert gen.returncode == 0, gen.stderr
    result = json.loads(gen.stdout)
    prompt = ByteTokenizer.from_dir(out).encode("MoE!")
    assert result["prompt_ids"] == prompt
    with Engine.from_pretrained(out) as engine:
        assert result["tokens"] == engine.generate([prompt], max_new_tokens=6)[0]
    assert [r["layer"] for r in result["routing"]] == [1, 2]
    assert all(r["tokens"] == len(prompt) + len(result["tokens"]) - 1 for r in result["routing"])


def test_generate_text_output_shows_tokens_and_routing_table(model_dirs):
    gen = run_cli("generate", "--model", str(model_dirs["tiny-v3"]), "--prompt-ids", "5,6,7", "--max-new-tokens", "3")
    assert gen.returncode == 0, gen.stderr
    assert "new tokens :" in gen.stdout and "experts hit" in gen.stdout


def test_errors_are_reported_without_a_traceback(tmp_path, model_dirs):
    missing = run_cli("generate", "--model", str(tmp_path), "--prompt-ids", "1", "--max-new-tokens", "2")
    assert missing.returncode == 2 and "config.json: not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_ids = run_cli("generate", "--model", str(model_dirs["tiny-v2"]), "--prompt-ids", "1,x")
    assert bad_ids.returncode == 2 and "expected comma-separated integers" in bad_ids.stderr
    oob = run_cli("generate", "--model", str(model_dirs["tiny-v2"]), "--prompt-ids", "1,4000")
    assert oob.returncode == 2 and "outside [0, vocab_size=272)" in oob.stderr


@pytest.mark.slow
def test_generate_from_a_deployment_file_on_embedded_ray_matches_the_in_process_engine(model_dirs):
    path = model_dirs["tiny-v3"]
    config = Path(__file__).parents[2] / "deploy" / "configs" / "tiny-grpc.yaml"
    gen = run_cli("generate", "--config", str(config), "--model", str(path), "--prompt-ids", "9,8,7,6",
                  "--max-new-tokens", "6", "--json")
    assert gen.returncode == 0, gen.stderr
    result = json.loads(gen.stdout)
    assert (result["backend"], result["devices"]) == ("grpc", 2)
    with Engine.from_pretrained(path, backend="local", devices=2, top_m_devices=1) as engine:
        assert result["tokens"] == engine.generate([[9, 8, 7, 6]], max_new_tokens=6)[0]
        expected_changed = [r["changed"] for r in engine.routing_summary.rows()]
    assert [r["changed"] for r in result["routing"]] == expected_changed
