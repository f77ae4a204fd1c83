"""The tensor codec is bit-exact for every wire dtype and names the field it rejects; the committed stubs are fresh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protos import expert_service_pb2 as pb
from protos.codec import DTYPES, CodecError, proto_to_tensor, tensor_to_proto
from protos.generate import ROOT, generate

# integer view of the same width, for comparing float bit patterns (NaN != NaN)
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
        flat = t.view(-1)
        if flat.numel() >= 4:
            flat[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=dtype)
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype in BITS:
        assert torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))
    else:
        assert torch.equal(a, b)


def roundtrip(t: torch.Tensor) -> torch.Tensor:
    wire = pb.Tensor.FromString(tensor_to_proto(t).SerializeToString())
    return proto_to_tensor(wire, "t")


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(5, 7), (), (0, 3), (2, 0, 4)])
def test_roundtrip_is_bit_exact(name, shape):
    t = random_tensor(DTYPES[name], shape, seed=len(shape))
    msg = tensor_to_proto(t)
    assert msg.dtype == name and list(msg.shape) == list(shape)
    assert_bit_equal(roundtrip(t), t)


@pytest.mark.parametrize("name", list(DTYPES))
def test_roundtrip_of_non_contiguous_views(name):
    base = random_tensor(DTYPES[name], (6, 8), seed=3)
    for view in (base.t(), base[::2, 1::3], base.expand(3, 6, 8)[:, :, 2]):
        assert not view.is_contiguous()
        assert_bit_equal(roundtrip(view), view)


def test_float_specials_survive():
    t = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-40], dtype=torch.float32)
    back = roundtrip(t)
    assert torch.isnan(back[0]) and back[1] == float("inf") and back[2] == float("-inf")
    assert torch.signbit(back[3]) and back[4] == t[4]


def test_encode_into_existing_message():
    req = pb.ForwardRequest()
    t = random_tensor(torch.bfloat16, (3, 4), seed=9)
    assert tensor_to_proto(t, out=req.hidden) is req.hidden
    assert_bit_equal(proto_to_tensor(req.hidden, "hidden"), t)


def test_unsupported_dtype_is_rejected_on_encode():
    with pytest.raises(CodecError, match="complex64"):
        tensor_to_proto(torch.randn(2, 2, dtype=torch.complex64))


def _malformed(**changes) -> pb.Tensor:
    msg = tensor_to_proto(random_tensor(torch.float32, (3, 4), seed=4))
    for key, value in changes.items():
        if key == "shape":
            msg.shape[:] = value
        else:
            setattr(msg, key, value)
    return msg


@pytest.mark.parametrize(
    "msg, expected",
    [
        (_malformed(dtype="float99"), "hidden.dtype='float99'"),
        (_malformed(dtype=""), "hidden.dtype=''"),
        (_malformed(shape=[3, -4]), "hidden.shape=[3, -4]"),
        (_malformed(data=b"\x01" * 47), "hidden.data has 47 bytes, expected 48"),
        (_malformed(data=b"\x01" * 49), "hidden.data has 49 bytes, expected 48"),
        (_malformed(dtype="float64"), "hidden.data has 48 bytes, expected 96"),
    ],
    ids=["unknown dtype", "empty dtype", "negative dim", "truncated", "excess", "dtype size mismatch"],
)
def test_decode_errors_name_the_field(msg, expected):
    with pytest.raises(CodecError) as info:
        proto_to_tensor(msg, "hidden")
    assert expected in str(info.value)


def test_committed_stubs_match_regenerated(tmp_path: Path):
    assert generate(out_dir=tmp_path) == 0
    for name in ("expert_service_pb2.py", "expert_service_pb2_grpc.py"):
        assert (tmp_path / "protos" / name).read_bytes() == (ROOT / "protos" / name).read_bytes(), name
