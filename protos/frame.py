"""Framed tensors for ExpertService.ForwardFramed: a length-prefixed protobuf header with each tensor's dtype and
shape (no data), then the tensors' raw bytes back to back, each at a multiple of 8 bytes. The payload is copied
once into the frame and read in place on the other side; it never passes through protobuf's bytes fields."""

from __future__ import annotations

import struct

import numpy as np
import torch

from protos import expert_service_pb2 as pb
from protos.codec import DTYPES, NAMES, CodecError, numpy_to_tensor, tensor_to_numpy, wire_layout

PREFIX = struct.Struct("<I")  # the header's byte length, little-endian
ALIGN = 8  # every tensor starts at a multiple of this (torch and numpy read aligned elements)


def _pad(n: int) -> int:
    return -n % ALIGN
METHOD = "/expertmesh.v1.ExpertService/ForwardFramed"


def describe(t: torch.Tensor, out: pb.Tensor) -> None:
    """The header's entry for a tensor: dtype and shape only."""
    if t.dtype not in NAMES:
        raise CodecError(f"dtype {t.dtype} is not supported on the wire (supported: {sorted(DTYPES)})")
    out.dtype = NAMES[t.dtype]
    out.shape[:] = list(t.shape)


def encode(header, tensors: list[torch.Tensor]) -> bytes:
    """One frame: the header (a protobuf message whose Tensor fields carry dtype and shape), then each tensor's
    bytes in order (host copies of device tensors are made here, in tensor_to_numpy)."""
    head = header.SerializeToString()
    parts = [PREFIX.pack(len(head)), head, bytes(_pad(PREFIX.size + len(head)))]
    for t in tensors:
        data = tensor_to_numpy(t).data
        parts += [data, bytes(_pad(data.nbytes))]
    return b"".join(parts)


def decode(data: bytes, message_type):
    """(header message, payload memoryview) of a frame; CodecError naming what is wrong."""
    if len(data) < PREFIX.size:
        raise CodecError(f"frame: {len(data)} bytes, shorter than its {PREFIX.size}-byte header length")
    (n,) = PREFIX.unpack_from(data)
    if PREFIX.size + n > len(data):
        raise CodecError(f"frame: header length {n} exceeds the {len(data) - PREFIX.size} bytes that follow")
    try:
        header = message_type.FromString(data[PREFIX.size : PREFIX.size + n])
    except Exception as exc:  # protobuf's DecodeError
        raise CodecError(f"frame: the header is not a {message_type.DESCRIPTOR.name} ({exc})") from None
    start = PREFIX.size + n + _pad(PREFIX.size + n)
    return header, memoryview(data)[start:]


class Payload:
    """Reads the frame's tensors in order, each checked against its header entry, as read-only views."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.offset = view, 0

    def take(self, meta: pb.Tensor, field: str) -> torch.Tensor:
        dtype, np_dtype, shape, count = wire_layout(meta, field)
        nbytes = count * np_dtype.itemsize
        if self.offset + nbytes > len(self.view):
            raise CodecError(f"{field}: {meta.dtype}{list(shape)} needs {nbytes} bytes, the frame has "
                             f"{len(self.view) - self.offset} left")
        array = np.frombuffer(self.view, dtype=np_dtype, count=count, offset=self.offset).reshape(shape)
        self.offset = min(self.offset + nbytes + _pad(nbytes), len(self.view))
        return numpy_to_tensor(array, dtype)

    def finish(self) -> None:
        if self.offset != len(self.view):
            raise CodecError(f"frame: {len(self.view) - self.offset} bytes past the tensors its header describes")
