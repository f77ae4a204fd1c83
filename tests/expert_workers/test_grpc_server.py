"""The gRPC expert server answers Forward exactly like the in-process group, rejects bad requests and keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expert_workers.expert_group import ExpertGroup
from expert_workers.grpc_server import SERVICE_NAME, ExpertServer
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos.channel import channel_options
from protos.codec import proto_to_tensor, tensor_to_proto
from tests.expert_workers.conftest import HOSTED

H, K = 64, 4
TIMEOUT = 10.0




@pytest.fixture(scope="module")
def server(group: ExpertGroup) -> Iterator[ExpertServer]:
    srv = ExpertServer(group)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server: ExpertServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address, options=channel_options()) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ExpertServiceStub:
    return pb_grpc.ExpertServiceStub(channel)


def routing(
    t: int, seed: int, hosted: list[int] = HOSTED, k: int = K
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random hidden [T, H], ids [T, k] drawn from `hosted` with some -1 (elsewhere), weights [T, k]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, H, generator=gen)
    pool = torch.tensor(hosted)
    ids = torch.empty(0, k, dtype=torch.long)
    if t:
        ids = torch.stack([pool[torch.randperm(len(hosted), generator=gen)[:k]] for _ in range(t)])
    ids = torch.where(torch.rand(t, k, generator=gen) < 0.2, -1, ids)
    return hidden, ids, torch.rand(t, k, generator=gen)


def request(layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> pb.ForwardRequest:
    req = pb.ForwardRequest(layer=layer)
    tensor_to_proto(hidden, out=req.hidden)
    tensor_to_proto(ids, out=req.expert_ids)
    tensor_to_proto(weights, out=req.weights)
    return req


def assert_good_request_works(stub: pb_grpc.ExpertServiceStub, group: ExpertGroup, seed: int = 99) -> None:
    hidden, ids, weights = routing(5, seed)
    reply = stub.Forward(request(2, hidden, ids, weights), timeout=TIMEOUT)
    assert torch.equal(proto_to_tensor(reply.output, "output"), group.run(2, hidden, ids, weights).output)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", [1, 2])
def test_forward_equals_in_process_group(stub, group, dtype, layer):
    hidden, ids, weights = routing(37, seed=layer)
    hidden = hidden.to(dtype)
    reply = stub.Forward(request(layer, hidden, ids, weights), timeout=TIMEOUT)
    output = proto_to_tensor(reply.output, "output")
    assert output.dtype == dtype
    assert torch.equal(output, group.run(layer, hidden, ids, weights).output)
    assert output.abs().sum() > 0
    assert reply.compute_ms > 0
    assert [f.name for f, _ in reply.ListFields()] == ["output", "compute_ms"]  # 2 (tokens_per_expert) is reserved


def test_forward_with_int32_ids_and_non_identity_hosting(model_dirs):
    group = ExpertGroup(model_dirs["tiny-v3"], [13, 2, 9], device=1)
    with ExpertServer(group) as srv, grpc.insecure_channel(srv.address, options=channel_options()) as ch:
        hidden, ids, weights = routing(11, seed=5, hosted=[13, 2, 9], k=2)
        ids = ids.to(torch.int32)
        reply = pb_grpc.ExpertServiceStub(ch).Forward(request(1, hidden, ids, weights), timeout=TIMEOUT)
    assert torch.equal(proto_to_tensor(reply.output), group.run(1, hidden, ids.long(), weights).output)


def test_forward_with_zero_tokens(stub):
    hidden, ids, weights = routing(0, seed=3)
    reply = stub.Forward(request(1, hidden, ids, weights), timeout=TIMEOUT)
    assert list(reply.output.shape) == [0, H]


def test_describe_reports_the_group(stub, group):
    reply = stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT)
    assert list(reply.expert_ids) == HOSTED
    assert list(reply.moe_layers) == [1, 2]
    assert reply.hidden_size == H
    assert reply.weight_bytes == group.weight_bytes > 0
    assert reply.dtype == "float32"
    assert reply.model_type == group.spec.model_type
    assert reply.device == 0


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_health_check_is_serving(channel, service):
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _set_tensor(field: str, t: torch.Tensor) -> Callable[[pb.ForwardRequest], None]:
    return lambda req: tensor_to_proto(t, out=getattr(req, field))


def _with_id(value: int) -> Callable[[pb.ForwardRequest], None]:
    def mutate(req: pb.ForwardRequest) -> None:
        ids = proto_to_tensor(req.expert_ids).clone()
        ids[1, 2] = value
        tensor_to_proto(ids, out=req.expert_ids)

    return mutate


BAD_REQUESTS = {
    "unknown dtype": (lambda req: setattr(req.hidden, "dtype", "float99"), ["hidden.dtype", "float99"]),
    "rows mismatch": (_set_tensor("expert_ids", torch.randint(0, 8, (7, K))), ["expert_ids.shape", "T=6"]),
    "dense layer": (lambda req: setattr(req, "layer", 0), ["layer=0"]),
    "unknown layer": (lambda req: setattr(req, "layer", 99), ["layer=99"]),
    "expert elsewhere": (_with_id(12), ["not hosted", "[12]"]),
    "truncated bytes": (lambda req: setattr(req.hidden, "data", req.hidden.data[:-3]), ["hidden.data"]),
    "missing hidden": (lambda req: req.ClearField("hidden"), ["hidden", "missing"]),
    "missing weights": (lambda req: req.ClearField("weights"), ["weights", "missing"]),
    "int hidden": (_set_tensor("hidden", torch.randint(1, 9, (6, H))), ["hidden.dtype", "floating"]),
    "id too large": (_with_id(16), ["expert_ids", "[16]", "outside"]),
    "id below -1": (_with_id(-2), ["expert_ids", "[-2]", "outside"]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_and_server_keeps_serving(stub, group, case):
    mutate, expected = BAD_REQUESTS[case]
    req = request(1, *routing(6, seed=11))
    mutate(req)
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(req, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in expected:
        assert word in info.value.details()
    assert_good_request_works(stub, group)


def test_unexpected_error_is_internal_and_server_keeps_serving(stub, group, monkeypatch):
    def broken_run(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(group, "run", broken_run)
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(request(1, *routing(4, seed=1)), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "kernel exploded" in info.value.details()
    monkeypatch.undo()
    assert_good_request_works(stub, group)


def test_health_answers_while_a_forward_computes(stub, channel, group, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real_run = group.run

    def slow_run(*args):
        entered.set()
        release.wait(TIMEOUT)
        return real_run(*args)

    monkeypatch.setattr(group, "run", slow_run)
    hidden, ids, weights = routing(4, seed=8)
    pending = stub.Forward.future(request(1, hidden, ids, weights), timeout=TIMEOUT)
    try:
        assert entered.wait(TIMEOUT)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert not pending.done()
    finally:
        release.set()
    assert torch.equal(proto_to_tensor(pending.result().output), group.run(1, hidden, ids, weights).output)


def test_oversize_message_is_resource_exhausted(group):
    limit = 64 * 1024
    with ExpertServer(group, max_message_bytes=limit) as srv:
        # the client allows big messages, so the server's receive limit is the one that trips
        with grpc.insecure_channel(srv.address, options=channel_options()) as ch:
            small_stub = pb_grpc.ExpertServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                small_stub.Forward(request(1, *routing(300, seed=2)), timeout=TIMEOUT)  # ~90 KiB
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in info.value.details()
            assert_good_request_works(small_stub, group)


def test_stop_is_idempotent_and_the_port_stops_answering(group):
    srv = ExpertServer(group)
    srv.start()
    address = srv.address
    with grpc.insecure_channel(address) as ch:
        pb_grpc.ExpertServiceStub(ch).Describe(pb.DescribeRequest(), timeout=TIMEOUT)
    srv.stop()
    srv.stop()
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.address
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as info:
        pb_grpc.ExpertServiceStub(ch).Describe(pb.DescribeRequest(), timeout=0.5)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def framed_call(channel: grpc.Channel, layer: int, hidden, ids, weights, **fields) -> bytes:
    from protos import frame

    req = pb.ForwardRequest(layer=layer, **fields)
    for name, t in (("hidden", hidden), ("expert_ids", ids), ("weights", weights)):
        frame.describe(t, getattr(req, name))
    return channel.unary_unary(frame.METHOD)(frame.encode(req, [hidden, ids, weights]), timeout=TIMEOUT)


def test_forward_framed_answers_what_forward_answers(channel, stub, group):
    from protos import frame

    hidden, ids, weights = routing(9, seed=41)
    header, view = frame.decode(framed_call(channel, 1, hidden, ids, weights), pb.ForwardResponse)
    payload = frame.Payload(view)
    output = payload.take(header.output, "output")
    payload.finish()
    reply = stub.Forward(request(1, hidden, ids, weights), timeout=TIMEOUT)
    assert torch.equal(output, proto_to_tensor(reply.output, "output"))
    assert header.compute_ms > 0 and [f.name for f, _ in header.ListFields()] == ["output", "compute_ms"]


def test_a_bad_frame_is_invalid_argument_naming_the_field_and_the_server_keeps_serving(channel, stub, group):
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/expertmesh.v1.ExpertService/ForwardFramed")(b"\x03", timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "frame" in info.value.details()
    hidden, ids, weights = routing(3, seed=42)
    with pytest.raises(grpc.RpcError) as info:
        framed_call(channel, 1, hidden[:, :10], ids, weights)  # the wrong hidden width
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hidden.shape=[3, 10]" in info.value.details()
    assert_good_request_works(stub, group)


def shared_call(channel: grpc.Channel, layer: int, name: str, batch, rows, ids, weights, hidden=None) -> bytes:
    """ForwardFramed naming a shared batch file: the frame carries rows, ids, weights (and hidden, if given)."""
    from protos import frame

    req = pb.ForwardRequest(layer=layer)
    req.shared.name = name
    frame.describe(batch, req.shared.batch)
    frame.describe(rows, req.shared.rows)
    tensors = [rows, ids, weights]
    if hidden is not None:
        frame.describe(hidden, req.hidden)
        tensors.append(hidden)
    for field, t in (("expert_ids", ids), ("weights", weights)):
        frame.describe(t, getattr(req, field))
    return channel.unary_unary(frame.METHOD)(frame.encode(req, tensors), timeout=TIMEOUT)


def test_rows_read_from_a_shared_batch_answer_what_rows_in_the_frame_answer(channel, stub, group):
    from protos import frame
    from protos.shared_batch import PREFIX, BatchWriter

    batch, _, _ = routing(30, seed=43)
    rows = torch.tensor([0, 3, 4, 9, 17, 29])
    _, ids, weights = routing(rows.numel(), seed=44)
    writer = BatchWriter()  # /dev/shm: the server reads there
    file = writer.acquire(batch)
    try:
        header, view = frame.decode(shared_call(channel, 1, file.name, batch, rows, ids, weights), pb.ForwardResponse)
        payload = frame.Payload(view)
        output = payload.take(header.output, "output")
        payload.finish()
        assert torch.equal(output, group.run(1, batch[rows], ids, weights).output)
        for bad, code, message in (
            (dict(rows=torch.tensor([0, 30, 1, 2, 3, 4])), grpc.StatusCode.INVALID_ARGUMENT, "rows: values in [0, 30]"),
            (dict(hidden=batch[rows]), grpc.StatusCode.INVALID_ARGUMENT, "hidden and shared"),
            (dict(name=PREFIX + "f" * 32), grpc.StatusCode.FAILED_PRECONDITION, "cannot open it in /dev/shm"),
        ):
            fields = {"name": file.name, "rows": rows, **bad}
            with pytest.raises(grpc.RpcError) as info:
                shared_call(channel, 1, fields["name"], batch, fields["rows"], ids, weights, bad.get("hidden"))
            assert info.value.code() == code and message in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # only the framed method reads shared batches
            stub.Forward(pb.ForwardRequest(layer=1, shared=pb.SharedBatch(name=file.name)), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "only ForwardFramed" in info.value.details()
    finally:
        writer.close()
    assert_good_request_works(stub, group)
