"""A local file under a shared-batch name cannot stop an expert server: a file truncated while mapped, a FIFO, a
symlink, a directory, an empty file, another user's or a group-readable file, a file replaced under the same name.
Each call gets a clear error naming the file (or the fresh file's rows) and the server keeps serving."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from protos import expert_service_pb2 as pb
from protos import frame
from protos.channel import channel_options
from protos.shared_batch import PREFIX, SHM_DIR, BatchWriter
from tests.expert_workers.test_grpc_server import HOSTED, TIMEOUT, routing, shared_call

ROOT = Path(__file__).resolve().parents[2]
REFUSED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
# An expert server in its own process (a SIGBUS there must not take pytest down): prints its port, serves until
# its stdin closes.
SERVER = f"""
import sys
from expert_workers.expert_group import ExpertGroup
from expert_workers.grpc_server import ExpertServer
srv = ExpertServer(ExpertGroup(sys.argv[1], {HOSTED}))
print(srv.start(), flush=True)
sys.stdin.read()
srv.stop(grace=0.0)
"""


def output_of(reply: bytes) -> torch.Tensor:
    header, view = frame.decode(reply, pb.ForwardResponse)
    payload = frame.Payload(view)
    out = payload.take(header.output, "output")
    payload.finish()
    return out






@pytest.fixture
def shm_name() -> Iterator[Path]:
    """A fresh batch name in /dev/shm (the server reads only there), removed afterwards whatever it became."""
    path = SHM_DIR / (PREFIX + os.urandom(16).hex())
    yield path
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)


def call(channel: grpc.Channel, name: str, batch: torch.Tensor, seed: int = 1) -> bytes:
    rows = torch.tensor([0, 2, 3])
    _, ids, weights = routing(rows.numel(), seed=seed)
    return shared_call(channel, 1, name, batch, rows, ids, weights)


def assert_refused(channel: grpc.Channel, name: str, batch: torch.Tensor, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(channel, name, batch)
    assert info.value.code() in REFUSED, (info.value.code(), info.value.details())
    for word in words:
        assert word in info.value.details()


def assert_serves(channel: grpc.Channel, group) -> None:
    """A valid shared call right after: the server still answers, and exactly."""
    writer = BatchWriter()
    batch, _, _ = routing(6, seed=5)
    file = writer.acquire(batch)
    try:
        rows = torch.tensor([0, 2, 3])
        _, ids, weights = routing(rows.numel(), seed=1)
        assert torch.equal(output_of(call(channel, file.name, batch)), group.run(1, batch[rows], ids, weights).output)
    finally:
        writer.close()


def test_a_batch_file_truncated_while_mapped_is_refused_and_the_server_process_lives(model_dirs):
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(model_dirs["tiny-v3"])], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    writer = BatchWriter()
    try:
        ready, _, _ = select.select([server.stdout], [], [], 120)
        assert ready, "the expert server process did not print its port within 120 s"
        port = int(server.stdout.readline())
        batch, _, _ = routing(6, seed=5)
        file = writer.acquire(batch)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as ch:
            first = output_of(call(ch, file.name, batch))  # the server maps the file and keeps it mapped
            os.truncate(file.path, 0)  # as a careless cleanup would
            assert_refused(ch, file.name, batch, str(file.path), "the file has 0")
            assert server.poll() is None, f"the expert server died: exit status {server.returncode}"
            os.truncate(file.path, file.capacity)  # the file is whole again (its bytes are now zeros)
            file.write(batch)
            assert torch.equal(output_of(call(ch, file.name, batch)), first)
    finally:
        writer.close()
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


def test_a_fifo_under_a_batch_name_is_refused_at_once_and_does_not_block_the_server(channel, group, shm_name):
    os.mkfifo(shm_name, 0o600)
    batch, _, _ = routing(6, seed=5)
    started = time.monotonic()
    try:
        assert_refused(channel, shm_name.name, batch, shm_name.name, "not a regular file")
    finally:  # without the fix, the server's thread is blocked opening the FIFO: a writer releases it
        try:
            os.close(os.open(shm_name, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert time.monotonic() - started < TIMEOUT / 2
    assert_serves(channel, group)


def test_a_symlink_under_a_batch_name_is_not_followed(channel, group, shm_name, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(torch.randn(64, 64).numpy().tobytes())  # a file the server could read, outside /dev/shm
    shm_name.symlink_to(secret)
    assert_refused(channel, shm_name.name, torch.empty(6, 64), shm_name.name, "symbolic link")
    assert_serves(channel, group)


@pytest.mark.parametrize("kind", ["directory", "empty file", "another user's file", "group-readable file"])
def test_files_that_are_not_a_batch_are_refused_naming_the_file(channel, group, shm_name, kind):
    batch = torch.randn(6, 64)
    if kind == "directory":
        shm_name.mkdir(mode=0o700)
        expected = ["not a regular file"]
    else:
        fd = os.open(shm_name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        if kind == "empty file":
            expected = ["needs 1536 bytes, the file has 0"]
        else:
            shm_name.write_bytes(batch.numpy().tobytes())
            if kind == "another user's file":
                os.chown(shm_name, 65534, 65534)
                expected = ["owned by uid 65534", f"this server's uid {os.geteuid()}"]
            else:
                shm_name.chmod(0o640)
                expected = ["mode 0o640", "expected 0o600"]
    assert_refused(channel, shm_name.name, batch, shm_name.name, *expected)
    assert_serves(channel, group)


def test_a_file_replaced_under_the_same_name_is_read_afresh(channel, group):
    writer = BatchWriter()
    old, new = torch.randn(6, 64), torch.randn(6, 64)
    file = writer.acquire(old)
    try:
        rows = torch.tensor([0, 2, 3])
        _, ids, weights = routing(rows.numel(), seed=1)
        assert torch.equal(output_of(call(channel, file.name, old)), group.run(1, old[rows], ids, weights).output)
        replacement = file.path.with_name(file.name + ".new")
        fd = os.open(replacement, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(new.numpy().tobytes())
        os.replace(replacement, file.path)  # a new inode under the old name: the old mapping holds `old`
        assert torch.equal(output_of(call(channel, file.name, new)), group.run(1, new[rows], ids, weights).output)
    finally:
        writer.close()
