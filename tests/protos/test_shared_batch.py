"""Layer batches in /dev/shm for gRPC on one host: what the gateway writes is what a group reads, files are reused
and removed, and a bad or unreadable name is refused by name."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from protos import expert_service_pb2 as pb
from protos import frame
from protos.codec import CodecError
from protos.shared_batch import MIN_CAPACITY, PREFIX, BatchReader, BatchWriter, SharedBatchUnreadable


def describe(name: str, batch: torch.Tensor) -> pb.SharedBatch:
    shared = pb.SharedBatch(name=name)
    frame.describe(batch, shared.batch)
    return shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_group_reads_what_the_gateway_wrote_and_a_reused_file_holds_the_new_batch(tmp_path, dtype):
    writer, reader = BatchWriter(tmp_path), BatchReader(tmp_path)
    gen = torch.Generator().manual_seed(1)
    first, second = (torch.randn(t, 48, generator=gen).to(dtype) for t in (37, 20))
    file = writer.acquire(first)
    assert file.name.startswith(PREFIX) and file.capacity == MIN_CAPACITY
    assert stat.S_IMODE(file.path.stat().st_mode) == 0o600  # hidden states are users' data
    assert torch.equal(reader.batch(describe(file.name, first)), first)
    writer.release(file)
    again = writer.acquire(second)  # the free file is large enough: reused, rewritten
    assert again is file and writer.files == 1
    assert torch.equal(reader.batch(describe(file.name, second)), second)
    other = writer.acquire(first)  # the first is in use: a second file
    assert other is not file and writer.files == 2
    writer.close()
    assert not list(tmp_path.iterdir())


def test_a_reader_lets_go_of_files_the_gateway_removed(tmp_path):
    old, new = BatchWriter(tmp_path), BatchWriter(tmp_path)
    reader = BatchReader(tmp_path)
    batch = torch.randn(5, 8)
    first = old.acquire(batch)
    reader.batch(describe(first.name, batch))
    old.close()  # a gateway that went away
    second = new.acquire(batch)
    assert torch.equal(reader.batch(describe(second.name, batch)), batch)
    assert reader.mapped == [second.name]
    new.close()


def test_a_batch_larger_than_the_free_files_gets_a_file_of_the_next_power_of_two(tmp_path):
    writer = BatchWriter(tmp_path)
    small = writer.acquire(torch.zeros(4, 8))
    writer.release(small)
    big = writer.acquire(torch.zeros(1 << 19, 1))  # 2 MiB of float32
    assert big is not small and big.capacity == 2 * MIN_CAPACITY
    writer.close()


def test_bad_names_layouts_and_missing_files_are_refused_by_name(tmp_path):
    writer, reader = BatchWriter(tmp_path), BatchReader(tmp_path)
    batch = torch.randn(6, 8)
    file = writer.acquire(batch)
    with pytest.raises(CodecError, match=r"shared.name='../etc/passwd': expected expertmesh-batch-"):
        reader.batch(describe("../etc/passwd", batch))
    with pytest.raises(CodecError, match=r"shared.batch.shape=\[48\]: expected \[T, H\]"):
        reader.batch(describe(file.name, batch.view(-1)))
    # the file's state, not the request: the gateway sends the rows instead (FAILED_PRECONDITION)
    with pytest.raises(SharedBatchUnreadable, match=r"shared.batch: float32\[1024, 1024\] needs 4194304 bytes, "
                                                    r"the file has 1048576 \(shared.name=.*expertmesh-batch-"):
        reader.batch(describe(file.name, torch.empty(1024, 1024)))
    with pytest.raises(SharedBatchUnreadable, match=r"cannot open it in"):
        reader.batch(describe(PREFIX + "0" * 32, batch))
    writer.close()


def test_a_gateway_that_exits_without_closing_leaves_no_file(tmp_path):
    import subprocess
    import sys

    code = ("import sys, torch; from pathlib import Path; from protos.shared_batch import BatchWriter; "
            f"f = BatchWriter(Path({str(tmp_path)!r})).acquire(torch.ones(3, 4)); print(f.path.exists())")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True" and not list(tmp_path.iterdir())


def test_no_room_for_a_file_means_rows_are_sent_instead(tmp_path, caplog):
    writer = BatchWriter(tmp_path / "missing")  # as when /dev/shm is absent or full
    assert writer.acquire(torch.randn(3, 4)) is None and writer.files == 0
    assert "shared layer batches off for now" in caplog.text
