"""One hostile call cannot hurt an expert server: malformed protobuf is INVALID_ARGUMENT (not UNKNOWN), a call
cannot make the group sort more pairs than T x top-k, a token cannot name an expert twice, and a shape whose
element count overflows is refused naming the field. The server keeps answering after each."""

from __future__ import annotations

import grpc
import pytest
import torch

from expert_workers.expert_group import ExpertRequestError
from expert_workers.grpc_server import SERVICE_NAME
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos import frame
from tests.expert_workers.test_grpc_server import TIMEOUT, assert_good_request_works, request, routing


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ExpertServiceStub:
    return pb_grpc.ExpertServiceStub(channel)


def refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=TIMEOUT)
    return info.value


@pytest.mark.parametrize("method, message", [("Forward", "ForwardRequest"), ("Describe", "DescribeRequest")])
@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"])
def test_malformed_protobuf_is_invalid_argument_naming_the_message(channel, stub, group, method, message, data):
    error = refused(channel.unary_unary(f"/{SERVICE_NAME}/{method}"), data)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert message in error.details() and "not a valid protobuf message" in error.details()
    assert_good_request_works(stub, group)


def test_a_million_duplicate_ids_for_one_token_are_refused_by_their_shape(stub, group):
    """T = 1, K = 2**20 ids of expert 0 (8 MiB): refused on K alone, before any pair is made."""
    k = 1 << 20
    error = refused(stub.Forward, request(1, torch.randn(1, 64), torch.zeros(1, k, dtype=torch.long),
                                          torch.rand(1, k)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"expert_ids.shape=[1, {k}]: expected K <= 4 (the model's num_experts_per_tok)" in error.details()
    assert_good_request_works(stub, group)


@pytest.mark.parametrize("ids, expected", [
    ([[0, 1, 2, 3, 4]], "expert_ids.shape=[1, 5]: expected K <= 4"),  # distinct, but more than top-k
    ([[3, -1, 3, -1]], "expert_ids[0]: expert 3 appears more than once"),
    ([[0, 1, -1, -1], [5, 2, 7, 2]], "expert_ids[1]: expert 2 appears more than once"),
])
def test_more_ids_than_top_k_or_an_expert_twice_in_a_row_are_refused(stub, group, ids, expected):
    ids = torch.tensor(ids)
    error = refused(stub.Forward, request(1, torch.randn(len(ids), 64), ids, torch.rand(ids.shape)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in error.details(), error.details()
    assert_good_request_works(stub, group)


def test_every_transport_gets_the_same_check(group):
    """The check lives in ExpertGroup.run, which the Ray actor, RDT and the in-process transport call too;
    -1 (an expert elsewhere) may repeat."""
    hidden, weights = torch.randn(2, 64), torch.rand(2, 4)
    with pytest.raises(ExpertRequestError, match=r"expert_ids\[1\]: expert 6 appears more than once"):
        group.run(1, hidden, torch.tensor([[1, -1, -1, 0], [6, 4, 6, -1]]), weights)
    ok = group.run(1, hidden, torch.tensor([[1, -1, -1, 0], [6, 4, -1, -1]]), weights)
    assert ok.output.shape == (2, 64)


@pytest.mark.parametrize("shape, expected", [
    ([2**62, 4], "hidden.shape=[4611686018427387904, 4]: over 2**40 bytes of float32"),  # wraps to 0 in int64
    ([0, 2**62], "hidden.shape=[0, 4611686018427387904]: over 2**40 bytes"),
    ([2**32, 2**32], "hidden.shape=[4294967296, 4294967296]: over 2**40 bytes"),
    ([1] * 70, "hidden.shape has 70 dimensions, expected at most 8"),
])
def test_a_shape_whose_element_count_overflows_is_refused_naming_it(channel, stub, group, shape, expected):
    req = request(1, *routing(3, seed=2))
    req.hidden.ClearField("data")
    req.hidden.shape[:] = shape
    error = refused(stub.Forward, req)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in error.details(), error.details()
    framed_req = pb.ForwardRequest(layer=1)  # the framed path reads the same layout
    framed_req.hidden.dtype, framed_req.hidden.shape[:] = "float32", shape
    framed_req.expert_ids.CopyFrom(req.expert_ids)
    framed_req.weights.CopyFrom(req.weights)
    error = refused(channel.unary_unary(frame.METHOD), frame.encode(framed_req, []))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in error.details(), error.details()
    assert_good_request_works(stub, group)
