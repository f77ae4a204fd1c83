"""Tensor <-> wire codec: dtype name + shape + raw bytes, exact for every supported dtype, checked on decode."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from protos import expert_service_pb2 as pb

# bfloat16 has no numpy dtype: it travels as its raw 16-bit pattern.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 8  # the wire's tensors have 1 or 2; numpy stops at 64
MAX_BYTES = 2**40  # no tensor's shape may describe more (its bytes must come in a message or a shared file)


class CodecError(ValueError):
    """A wire tensor is malformed; the message names the field."""


def tensor_to_proto(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode a tensor on any device (one copy into the protobuf bytes field; a GPU tensor is first copied to
    the host, here and nowhere else)."""
    if t.dtype not in NAMES:
        raise CodecError(f"dtype {t.dtype} is not supported on the wire (supported: {sorted(DTYPES)})")
    msg = out if out is not None else pb.Tensor()
    msg.dtype = NAMES[t.dtype]
    msg.shape[:] = list(t.shape)
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    msg.data = raw.numpy().tobytes()
    return msg


def wire_layout(msg: pb.Tensor, field: str) -> tuple[torch.dtype, np.dtype, tuple[int, ...], int]:
    """A wire tensor's (torch dtype, numpy dtype of its bytes, shape, element count), checked; CodecError naming
    the field. bfloat16 is read as its int16 bit pattern."""
    if msg.dtype not in DTYPES:
        raise CodecError(f"{field}.dtype={msg.dtype!r}: expected one of {sorted(DTYPES)}")
    shape = tuple(msg.shape)
    if len(shape) > MAX_DIMS:
        raise CodecError(f"{field}.shape has {len(shape)} dimensions, expected at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise CodecError(f"{field}.shape={list(shape)}: dimensions must be >= 0")
    dtype = DTYPES[msg.dtype]
    np_dtype = np.dtype(np.int16) if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
    # counted exactly (Python ints: no int64 wrap-around); zero dimensions aside, so that numpy can still lay
    # out an empty tensor's strides
    if math.prod(max(d, 1) for d in shape) * np_dtype.itemsize > MAX_BYTES:
        raise CodecError(f"{field}.shape={list(shape)}: over 2**40 bytes of {msg.dtype} (0 dimensions counted as "
                         f"1), expected at most 2**40")
    return dtype, np_dtype, shape, math.prod(shape)


def proto_to_tensor(msg: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """Decode, checking dtype name, shape and byte count. The tensor shares the message's bytes (read-only)."""
    dtype, np_dtype, shape, count = wire_layout(msg, field)
    expected = count * np_dtype.itemsize
    if len(msg.data) != expected:
        raise CodecError(f"{field}.data has {len(msg.data)} bytes, expected {expected} for {msg.dtype}{list(shape)}")
    return numpy_to_tensor(np.frombuffer(msg.data, dtype=np_dtype).reshape(shape), dtype)


def readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only numpy buffer (wire bytes, Ray's shared-memory objects), without a copy.

    Callers only read it; torch warns about non-writable arrays, which is silenced here on purpose.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a tensor for Ray's object store (bfloat16 travels as its int16 bit pattern).

    A CPU tensor is viewed without a copy; a tensor on another device (the gateway's GPU) is copied to the host
    here: the one host copy on the numpy / gRPC paths, so transports never do their own.
    """
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def numpy_to_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of tensor_to_numpy, without a copy (the result may be read-only)."""
    t = readonly_tensor(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
