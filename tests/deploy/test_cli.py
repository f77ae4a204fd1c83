"""The `expertmesh` console script: make-model, generate, serve and trace, as a user runs them; bad input is one line
on stderr with status 2, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from deploy.cli import build_parser
from gateway import Engine
from model_core.tokenizer import ByteTokenizer


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def assert_refused(result: subprocess.CompletedProcess, command: str, message: str) -> None:
    """Status 2 and one line, `expertmesh <command>: error: ...<message>...`, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"expertmesh {command}: error: ") and message in last, result.stderr[-2000:]


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


SERVE_REFUSALS = {  # deployment file -> what the one line names; {model} is a real checkpoint, {tmp} a scratch dir
    "inf": ("model: {model}\nray: {{cpus_per_group: .inf}}\n",
            "ray.cpus_per_group=inf: expected a finite number in (0, "),  # test_config has every other setting
    "no-model": ("model: {tmp}/nowhere\n", "{tmp}/nowhere/config.json: not found"),
    "no-weights": ("model: {tmp}/no-weights\n",
                   "{tmp}/no-weights: no model.safetensors.index.json and no *.safetensors files"),
    "placement": ("model: {model}\ndevices: 2\nplacement: {tmp}/placement.yaml\n",
                  "{tmp}/placement.yaml: experts [3, 4,"),
    "cuda-index": ("model: {model}\ngateway_device: cuda:1\n",
                   "gateway_device='cuda:1': the gateway replica is granted one GPU"),
}


@pytest.mark.parametrize("text, message", SERVE_REFUSALS.values(), ids=SERVE_REFUSALS.keys())
def test_serve_refuses_a_bad_deployment_before_starting_ray_naming_the_path_or_field(tmp_path, model_dirs, text,
                                                                                     message):
    """Issue 23: these escaped as tracebacks, or failed ~14 s later inside the Serve replica without the path."""
    (tmp_path / "no-weights").mkdir()
    shutil.copy(model_dirs["tiny-v3"] / "config.json", tmp_path / "no-weights")
    (tmp_path / "placement.yaml").write_text("devices: [[0, 1], [2]]\n")
    config = tmp_path / "deployment.yaml"
    config.write_text(text.format(model=model_dirs["tiny-v3"], tmp=tmp_path))
    served = run_cli("serve", "--config", str(config), "--port", "1")
    assert_refused(served, "serve", message.format(tmp=tmp_path))
    assert "Started a local Ray instance" not in served.stderr  # refused before any Ray


def test_serve_refuses_a_port_outside_tcps_range_as_a_usage_error(capsys):
    for port in ("0", "65536", "-1", "80x"):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(["serve", "--config", "d.yaml", "--port", port])
        assert info.value.code == 2 and f"--port: {port!r}: expected a TCP port, 1 to 65535" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--config", "d.yaml", "--port", "65535"]).port == 65535


def test_trace_and_make_model_refuse_bad_input_in_one_line(tmp_path):
    (tmp_path / "r1.json").write_text('{"request_id": "r1"}')
    assert_refused(run_cli("trace", "r1", "--dir", str(tmp_path)), "trace",
                   f"{tmp_path}/r1.json: not a routing trace written by the gateway (KeyError")
    (tmp_path / "r2.json").write_text("[1, 2]")
    assert_refused(run_cli("trace", "r2", "--dir", str(tmp_path)), "trace", "r2.json: not a routing trace")
    assert_refused(run_cli("trace", "../r2", "--dir", str(tmp_path / "sub")), "trace",
                   "request_id '../r2': expected a request id, not a path")
    made = run_cli("make-model", "--preset", "tiny-v3", "--out", str(tmp_path / "m"), "--shard-mb", "-1")
    assert made.returncode == 2 and "--shard-mb: '-1': expected a positive integer" in made.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_embedded_ray_starts_its_own_even_where_ray_start_left_a_cluster_record(model_dirs):
    """ray.address null and no RAY_ADDRESS: embedded, even with `ray start`'s record of another cluster on the
    machine (<temp dir>/ray/ray_current_cluster), which a plain ray.init() joins, refusing num_cpus there. The
    record is written under a temp dir of this test's own (RAY_TMPDIR), so no other Ray on the machine sees it."""
    with socket.socket() as s:  # an address where no cluster answers
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="emray", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        record = Path(tmp) / "ray" / "ray_current_cluster"
        record.parent.mkdir()
        record.write_text(f"127.0.0.1:{port}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
        gen = run_cli("generate", "--model", str(model_dirs["tiny-v3"]), "--backend", "ray", "--prompt-ids", "5,6,7",
                      "--max-new-tokens", "3", "--json", env=env)
        assert gen.returncode == 0, gen.stderr[-3000:]
        assert "Started a local Ray instance" in gen.stderr
        assert any(p.name.startswith("session_") for p in record.parent.iterdir())  # its own, under RAY_TMPDIR
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with Engine.from_pretrained(model_dirs["tiny-v3"]) as engine:
        assert json.loads(gen.stdout)["tokens"] == engine.generate([[5, 6, 7]], max_new_tokens=3)[0]
