"""Bounded property tests of a real expert server (127.0.0.1): random Forward and ForwardFramed calls (dtypes,
shapes, byte counts, expert ids, layers, placement versions, shared-batch names and layouts, bit flips in the
frame) are answered OK, INVALID_ARGUMENT or FAILED_PRECONDITION (UNAVAILABLE for a placement version this group
does not hold), never UNKNOWN or INTERNAL, and the server still answers a valid call afterwards.

Derandomized (the same examples every run) and bounded: a few seconds each."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos import frame
from protos.codec import DTYPES, proto_to_tensor, tensor_to_proto
from protos.shared_batch import PREFIX, SHM_DIR, BatchWriter
from tests.expert_workers.test_grpc_server import HOSTED, TIMEOUT, assert_good_request_works

H = 64
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
DTYPE_NAMES = [*sorted(DTYPES), "", "float99", "int4"]
FIELDS = ("layer", "hidden", "expert_ids", "weights", "placement_version", "shared", "rows", "frame")
DIMS = st.one_of(st.integers(0, 8), st.sampled_from([H, H + 1, -1, 2**31, 2**40, 2**62, 2**63 - 1]))


@dataclass
class Field:
    """One wire tensor as the fuzzer sends it: what the header says and the bytes that come with it."""

    dtype: str
    shape: list[int]
    data: bytes

    def proto(self, with_data: bool = True) -> pb.Tensor:
        return pb.Tensor(dtype=self.dtype, shape=self.shape, data=self.data if with_data else b"")






@pytest.fixture(scope="module")
def shm_names() -> Iterator[list[str]]:
    """Names a fuzzed call may give shared.name: a real batch file [8, H] float32, one that does not exist, a
    FIFO, a directory, a symlink to the batch, an empty file, and names that are not batch names."""
    writer = BatchWriter()
    real = writer.acquire(torch.randn(8, H))
    made = {kind: SHM_DIR / (PREFIX + os.urandom(16).hex()) for kind in ("fifo", "dir", "link", "empty", "gone")}
    os.mkfifo(made["fifo"], 0o600)
    made["dir"].mkdir(mode=0o700)
    made["link"].symlink_to(real.path)
    os.close(os.open(made["empty"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        yield [real.name, *(p.name for p in made.values()), "../etc/passwd", PREFIX + "X" * 32, ""]
    finally:
        writer.close()
        made["dir"].rmdir()
        for kind in ("fifo", "link", "empty"):
            made[kind].unlink()


@st.composite
def field(draw, dtype: str, shape: list[int], seed: int, ids: bool = False) -> Field | None:
    """A tensor near the valid one (dtype, shape, values), mutated now and then: absent, another dtype name,
    another shape, too few or too many bytes."""
    gen = torch.Generator().manual_seed(seed)
    if ids and len(shape) == 2 and draw(st.integers(0, 3)):  # mostly routable: distinct hosted ids, some -1
        rows = [torch.randperm(len(HOSTED), generator=gen)[: shape[1]] for _ in range(shape[0])]
        t = torch.stack(rows) if rows else torch.empty(shape, dtype=torch.long)
        t = torch.where(torch.rand(t.shape, generator=gen) < 0.2, -1, t)
    elif ids:
        t = torch.randint(-2, 18, shape, generator=gen)
    else:
        t = torch.randn(shape, generator=gen) * draw(st.sampled_from([1.0, 1e30, float("inf"), float("nan")]))
    wire = tensor_to_proto(t.to(DTYPES[dtype]))
    f = Field(wire.dtype, list(wire.shape), wire.data)
    mutation = draw(st.sampled_from(["none"] * 6 + ["absent", "dtype", "shape", "bytes"]))
    if mutation == "absent":
        return None
    if mutation == "dtype":
        f.dtype = draw(st.sampled_from(DTYPE_NAMES))
    elif mutation == "shape":
        f.shape = draw(st.lists(DIMS, max_size=4))
    elif mutation == "bytes":
        cut = draw(st.integers(-len(f.data), 16))
        f.data = f.data[:cut] if cut < 0 else f.data + bytes(cut)
    return f


@st.composite
def forward_inputs(draw):
    """(layer, placement_version, {field: Field}): hidden [T, H], expert_ids [T, K], weights [T, K]."""
    t, k, seed = draw(st.integers(0, 6)), draw(st.integers(1, 6)), draw(st.integers(0, 2**16))
    fields = {
        "hidden": draw(field(draw(st.sampled_from(["float32", "bfloat16", "float16", "float64"])), [t, H], seed)),
        "expert_ids": draw(field(draw(st.sampled_from(["int64", "int32"])), [t, k], seed + 1, ids=True)),
        "weights": draw(field(draw(st.sampled_from(["float32", "bfloat16", "float64"])), [t, k], seed + 2)),
    }
    layer = draw(st.sampled_from([1, 2]) | st.integers(-2**31, 2**31 - 1))
    version = draw(st.none() | st.just(0) | st.integers(-2**63, 2**63 - 1))
    return layer, version, fields


def header(layer: int, version: int | None) -> pb.ForwardRequest:
    req = pb.ForwardRequest(layer=layer)
    if version is not None:
        req.placement_version = version
    return req


def check_answer(call) -> None:
    """The call's status is one of ANSWERS (UNAVAILABLE only for an unknown placement version), and a refusal
    begins with the field it is about."""
    try:
        call()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        assert code in ANSWERS or (code == grpc.StatusCode.UNAVAILABLE and details.startswith("placement_version=")), \
            f"{code.name}: {details}"
        assert details.startswith(FIELDS), f"{code.name}: {details!r} names no field"


def test_fuzzed_forward_calls_get_a_clear_answer(channel, group):
    stub = pb_grpc.ExpertServiceStub(channel)

    wrapping = Field("float32", [2**62, 4], b"")  # 2**64 elements: 0 in int64
    ids, weights = Field("int64", [0, 2], b""), Field("float32", [0, 2], b"")

    @FUZZ
    @given(forward_inputs())
    @example((1, None, {"hidden": wrapping, "expert_ids": ids, "weights": weights}))
    def forward(inputs):
        layer, version, fields = inputs
        req = header(layer, version)
        for name, f in fields.items():
            if f is not None:
                getattr(req, name).CopyFrom(f.proto())

        def call():
            reply = stub.Forward(req, timeout=TIMEOUT)
            assert list(proto_to_tensor(reply.output, "output").shape) == fields["hidden"].shape

        check_answer(call)

    forward()
    assert_good_request_works(stub, group)


def test_fuzzed_framed_calls_and_shared_batches_get_a_clear_answer(channel, group, shm_names):
    forward_framed = channel.unary_unary(frame.METHOD)

    @FUZZ
    @given(forward_inputs(), st.data())
    def framed(inputs, data):
        layer, version, fields = inputs
        req = header(layer, version)
        if data.draw(st.booleans(), "shared"):  # rows of a shared batch instead of hidden (or beside it)
            if data.draw(st.integers(0, 3), "keep hidden") != 0:
                fields.pop("hidden")
            req.shared.name = data.draw(st.sampled_from(shm_names), "shared.name")
            batch = data.draw(field("float32", [8, H], 0), "shared.batch") or Field("float32", [8, H], b"")
            req.shared.batch.CopyFrom(batch.proto(with_data=False))
            ids = fields["expert_ids"]
            n = ids.shape[0] if ids is not None and ids.shape and 0 <= ids.shape[0] <= 8 else 3
            rows = data.draw(field("int64", [n], 3, ids=True), "shared.rows")
            if rows is not None:
                req.shared.rows.CopyFrom(rows.proto(with_data=False))
                fields = {"rows": rows, **fields}
        present = {name: f for name, f in fields.items() if f is not None}
        for name, f in present.items():
            if name != "rows":
                getattr(req, name).CopyFrom(f.proto(with_data=False))
        head = req.SerializeToString()
        parts = [frame.PREFIX.pack(len(head)), head, bytes(-(frame.PREFIX.size + len(head)) % frame.ALIGN)]
        for f in present.values():
            parts += [f.data, bytes(-len(f.data) % frame.ALIGN)]
        message = bytearray(b"".join(parts))
        if data.draw(st.integers(0, 3), "corrupt") == 0:  # (b) the frame decoder: bytes overwritten, or cut short
            for at, value in data.draw(st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)),
                                                min_size=1, max_size=3), "overwrites"):
                if message:
                    message[at % len(message)] = value
            if data.draw(st.booleans(), "truncate"):
                message = message[: data.draw(st.integers(0, len(message)), "length")]

        def call():
            reply_header, view = frame.decode(forward_framed(bytes(message), timeout=TIMEOUT), pb.ForwardResponse)
            payload = frame.Payload(view)
            output = payload.take(reply_header.output, "output")
            payload.finish()
            assert output.dim() == 2 and output.shape[1] == H

        check_answer(call)

    framed()
    assert_good_request_works(pb_grpc.ExpertServiceStub(channel), group)
