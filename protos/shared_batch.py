"""A layer's batch in shared memory for gRPC on one host: the gateway writes it once into a file in /dev/shm and
every expert group on that host reads its rows in place (ForwardRequest.shared), instead of each call carrying its
rows through gRPC's bytes and the loopback socket."""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
import uuid
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from protos import expert_service_pb2 as pb
from protos.codec import CodecError, numpy_to_tensor, wire_layout

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "expertmesh-batch-"
NAME = re.compile(PREFIX + "[0-9a-f]{32}")
MIN_CAPACITY = 1 << 20  # files come in powers of two from 1 MiB, so a few serve every batch size


class SharedBatchUnreadable(RuntimeError):
    """The group cannot open the named file (not on this host, another user's, gone): the gateway sends the call
    again with its rows in the frame, and keeps doing so for this group."""


class BatchFile:
    """One reusable file of `capacity` bytes, mapped read-write, readable only by this user (hidden states are
    users' data). Its space is reserved at creation (posix_fallocate), so a full /dev/shm fails here with
    OSError rather than later as SIGBUS on a write."""

    def __init__(self, capacity: int, directory: Path = SHM_DIR) -> None:
        self.name = PREFIX + uuid.uuid4().hex
        self.path = directory / self.name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, capacity)
            self._map = mmap.mmap(fd, capacity)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self.capacity = capacity
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        # removed at close, or when the file object is collected, or at interpreter exit if the gateway never
        # closed (only a killed process leaves its files behind)
        self._remove = weakref.finalize(self, _unlink, self.path)

    def write(self, hidden: torch.Tensor) -> None:
        """hidden's raw bytes at the file's start (copied from the gateway's device here: the one copy)."""
        raw = hidden.detach().contiguous().view(-1).view(torch.uint8)
        self._bytes[: raw.numel()].copy_(raw)

    def close(self) -> None:
        self._bytes = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere: unmapped when it goes
            pass
        self._remove()


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


class BatchWriter:
    """The gateway's files: `acquire` hands out a free one large enough (or makes one) holding the batch, and
    `release` returns it once the layer's calls are over. None from acquire (no /dev/shm, or it is full): send
    the rows instead."""

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self.directory = directory
        self._free: list[BatchFile] = []
        self._all: list[BatchFile] = []
        self._lock = threading.Lock()
        self._failed = False

    def acquire(self, hidden: torch.Tensor) -> BatchFile | None:
        need = hidden.numel() * hidden.element_size()
        with self._lock:
            fits = [f for f in self._free if f.capacity >= need]
            file = min(fits, key=lambda f: f.capacity) if fits else None
            if file is not None:
                self._free.remove(file)
        if file is None:
            try:
                file = BatchFile(max(MIN_CAPACITY, 1 << (need - 1).bit_length()), self.directory)
            except OSError as exc:
                if not self._failed:
                    logger.warning("shared layer batches off for now: cannot make a %d-byte file in %s (%s); "
                                   "calls carry their rows", need, self.directory, exc)
                    self._failed = True
                return None
            with self._lock:
                self._all.append(file)
        file.write(hidden)
        return file

    def release(self, file: BatchFile) -> None:
        with self._lock:
            if file in self._all and file not in self._free:
                self._free.append(file)

    @property
    def files(self) -> int:
        return len(self._all)

    def close(self) -> None:
        with self._lock:
            files, self._all, self._free = self._all, [], []
        for file in files:
            file.close()


class BatchReader:
    """The expert server's side: maps named batch files read-only (the last `keep` stay mapped: the gateway
    reuses a few) and returns the batch the request describes, checked. A file the gateway removed (it closed or
    restarted) is unmapped when the next new name arrives, so it does not hold its memory."""

    def __init__(self, directory: Path = SHM_DIR, keep: int = 8) -> None:
        self.directory, self.keep = directory, keep
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()

    def batch(self, shared: pb.SharedBatch) -> torch.Tensor:
        """The whole batch [T, H] (read-only view); CodecError naming the field when the request is malformed,
        SharedBatchUnreadable when the file cannot be opened here."""
        if not NAME.fullmatch(shared.name):
            raise CodecError(f"shared.name={shared.name[:80]!r}: expected {PREFIX}<32 hex digits>")
        dtype, np_dtype, shape, count = wire_layout(shared.batch, "shared.batch")
        if len(shape) != 2:
            raise CodecError(f"shared.batch.shape={list(shape)}: expected [T, H]")
        data = self._map(shared.name)
        if count * np_dtype.itemsize > len(data):
            raise CodecError(f"shared.batch: {shared.batch.dtype}{list(shape)} needs {count * np_dtype.itemsize} "
                             f"bytes, the file has {len(data)}")
        return numpy_to_tensor(np.frombuffer(data, dtype=np_dtype, count=count).reshape(shape), dtype)

    def _map(self, name: str) -> mmap.mmap:
        with self._lock:
            if name in self._maps:
                self._maps.move_to_end(name)
                return self._maps[name]
        try:
            fd = os.open(self.directory / name, os.O_RDONLY)
        except OSError as exc:
            raise SharedBatchUnreadable(f"shared.name={name}: cannot open it in {self.directory} ({exc.strerror})"
                                        ) from None
        try:
            data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        with self._lock:
            for gone in [n for n in self._maps if not (self.directory / n).exists()]:
                del self._maps[gone]  # unmapped once no view of it is left
            self._maps[name] = data
            while len(self._maps) > self.keep:
                self._maps.popitem(last=False)
        return data

    @property
    def mapped(self) -> list[str]:
        with self._lock:
            return list(self._maps)
