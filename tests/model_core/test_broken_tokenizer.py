"""A broken tokenizer.json is reported once, naming the file and the error; the model still serves token ids and a
text prompt gets a clear error (the CLI's generate, and the Serve replica's constructor)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest

from model_core.tokenizer import TokenizerError, load_tokenizer

BROKEN = {
    "not json": "{not json",
    "not an object": "[1, 2]",
    "bad vocab": json.dumps({"model": {"type": "BPE", "merges": [], "vocab": {"a": "x"}}}),
    "unknown model": json.dumps({"model": {"type": "Nonsense"}}),
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def broken(model_dirs, tmp_path):
    d = shutil.copytree(model_dirs["tiny-v3"], tmp_path / "m")
    (d / "tokenizer.json").write_text(BROKEN["not json"])
    return d


@pytest.mark.parametrize("content", list(BROKEN.values()), ids=list(BROKEN))
def test_every_broken_tokenizer_json_is_one_error_naming_the_file(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match=rf"{tmp_path / 'tokenizer.json'}: unusable tokenizer \("):
        load_tokenizer(tmp_path)


def test_a_fifo_as_tokenizer_json_is_refused_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a regular file"):
        load_tokenizer(tmp_path)


def test_cli_generates_from_token_ids_and_warns_once_naming_the_file(broken):
    result = run_cli("generate", "--model", str(broken), "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"]) == 2
    warning = f"{broken / 'tokenizer.json'}: unusable tokenizer ("
    assert result.stderr.count(warning) == 1 and "Traceback" not in result.stderr, result.stderr


def test_cli_refuses_a_text_prompt_naming_the_file(broken):
    result = run_cli("generate", "--model", str(broken), "--prompt", "hello", "--max-new-tokens", "2")
    assert result.returncode == 2
    assert f"error: {broken / 'tokenizer.json'}: unusable tokenizer (" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_serve_replica_starts_serves_token_ids_and_answers_text_with_400(broken, caplog):
    from deploy.serve_app import GatewayDeployment
    from gateway.serving.completions import CompletionRequest, completions

    replica = GatewayDeployment.func_or_class({"model": str(broken)})  # the replica's own constructor, no Serve
    try:
        assert replica.state.tokenizer is None
        assert f"{broken / 'tokenizer.json'}: unusable tokenizer (" in caplog.text
        ids = asyncio.run(completions(replica.state, CompletionRequest(prompt=[5, 6, 7], max_tokens=2, temperature=0)))
        assert ids["usage"]["completion_tokens"] == 2
        text = asyncio.run(completions(replica.state, CompletionRequest(prompt="hello", max_tokens=2)))
        assert text.status_code == 400 and "no usable tokenizer.json" in json.loads(text.body)["error"]["message"]
    finally:
        replica.state.engine_loop.close()
