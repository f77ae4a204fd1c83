"""Framed tensors (ForwardFramed's wire format) round-trip every dtype exactly, start aligned, and malformed
frames are refused naming what is wrong."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protos import expert_service_pb2 as pb
from protos import frame
from protos.codec import CodecError


def framed(tensors: dict[str, torch.Tensor], layer: int = 3) -> bytes:
    req = pb.ForwardRequest(layer=layer)
    for name, t in tensors.items():
        frame.describe(t, getattr(req, name))
    return frame.encode(req, list(tensors.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                                   torch.uint8, torch.bool])
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_every_dtype_round_trips_exactly_and_every_tensor_starts_aligned(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    hidden = (torch.randn(rows, 5, generator=gen) * 10).to(dtype)
    ids = torch.randint(-1, 9, (rows, 3), generator=gen)
    weights = torch.rand(rows, 3, generator=gen)
    data = framed({"hidden": hidden, "expert_ids": ids, "weights": weights})
    header, view = frame.decode(data, pb.ForwardRequest)
    assert header.layer == 3 and (len(data) - len(view)) % frame.ALIGN == 0
    payload = frame.Payload(view)
    got = [payload.take(header.hidden, "hidden"), payload.take(header.expert_ids, "expert_ids"),
           payload.take(header.weights, "weights")]
    payload.finish()
    for a, b in zip(got, (hidden, ids, weights), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_malformed_frames_name_what_is_wrong():
    data = framed({"hidden": torch.randn(4, 6), "expert_ids": torch.zeros(4, 2, dtype=torch.long),
                   "weights": torch.rand(4, 2)})
    with pytest.raises(CodecError, match="shorter than its 4-byte header length"):
        frame.decode(data[:2], pb.ForwardRequest)
    with pytest.raises(CodecError, match="header length"):
        frame.decode(b"\xff\xff\x00\x00" + data[4:40], pb.ForwardRequest)
    header, view = frame.decode(data[:-16], pb.ForwardRequest)  # the weights cut short
    payload = frame.Payload(view)
    payload.take(header.hidden, "hidden")
    payload.take(header.expert_ids, "expert_ids")
    with pytest.raises(CodecError, match="weights: float32\\[4, 2\\] needs 32 bytes, the frame has 16 left"):
        payload.take(header.weights, "weights")
    header, view = frame.decode(data + bytes(8), pb.ForwardRequest)
    payload = frame.Payload(view)
    for name in ("hidden", "expert_ids", "weights"):
        payload.take(getattr(header, name), name)
    with pytest.raises(CodecError, match="8 bytes past the tensors"):
        payload.finish()
    bad = pb.Tensor(dtype="complex64", shape=[1])
    with pytest.raises(CodecError, match="hidden.dtype='complex64'"):
        frame.Payload(memoryview(bytes(8))).take(bad, "hidden")


VALID = framed({"hidden": torch.randn(3, 6), "expert_ids": torch.tensor([[0, 1], [2, -1], [5, 4]]),
                "weights": torch.rand(3, 2)})
# a header whose hidden.shape has 2**64 elements: 0 in int64, as an unchecked product wraps
WRAPPING = frame.encode(pb.ForwardRequest(hidden=pb.Tensor(dtype="float32", shape=[2**62, 4])), [])


@settings(max_examples=200, deadline=None, derandomize=True, database=None, print_blob=False)
@given(st.one_of(
    st.binary(max_size=256),  # any bytes
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4).map(
        lambda writes: _overwrite(VALID, writes)),  # a valid frame with a few bytes overwritten
    st.integers(0, len(VALID) - 1).map(lambda n: VALID[:n]),  # cut short
    st.binary(min_size=1, max_size=64).map(lambda tail: VALID + tail),  # with bytes after it
))
@example(WRAPPING)
def test_the_decoder_refuses_any_bad_frame_with_a_codec_error_only(data):
    """Whatever the bytes, decoding a frame and taking its tensors either works or raises CodecError (the server's
    INVALID_ARGUMENT), never another exception; every tensor it hands out lies within the frame."""
    try:
        header, view = frame.decode(data, pb.ForwardRequest)
        payload = frame.Payload(view)
        for name in ("hidden", "expert_ids", "weights"):
            t = payload.take(getattr(header, name), name)
            assert t.numel() * t.element_size() <= len(view)
        payload.finish()
    except CodecError:
        pass


def _overwrite(data: bytes, writes: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in writes:
        out[at] = value
    return bytes(out)
