"""A layer's batch in shared memory for gRPC on one host: the gateway writes it once into a file in /dev/shm and
every expert group on that host reads its rows in place (ForwardRequest.shared), instead of each call carrying its
rows through gRPC's bytes and the loopback socket."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import stat
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
    restarted) is unmapped when the next new name arrives, so it does not hold its memory.

    Every call opens the name again (never following a symlink, never blocking on a FIFO) and checks what it is
    before any mapped byte is read: a regular file of this user's, readable by it alone, holding the bytes the
    batch needs. A file replaced under the same name (another inode) is mapped afresh; a file that shrank is
    refused by its size, so no read touches a page past its end (SIGBUS). Only the file's owner, this user,
    could still shrink it between that check and the read."""

    def __init__(self, directory: Path = SHM_DIR, keep: int = 8) -> None:
        self.directory, self.keep = directory, keep
        self._maps: OrderedDict[str, tuple[tuple[int, int], mmap.mmap]] = OrderedDict()  # name -> ((dev, ino), map)
        self._lock = threading.Lock()

    def batch(self, shared: pb.SharedBatch) -> torch.Tensor:
        """The whole batch [T, H] (read-only view); CodecError naming the field when the request is malformed,
        SharedBatchUnreadable naming the file when it cannot be read here (absent, not a regular file, a
        symlink, another user's, readable by others, shorter than the batch)."""
        if not NAME.fullmatch(shared.name):
            raise CodecError(f"shared.name={shared.name[:80]!r}: expected {PREFIX}<32 hex digits>")
        dtype, np_dtype, shape, count = wire_layout(shared.batch, "shared.batch")
        if len(shape) != 2:
            raise CodecError(f"shared.batch.shape={list(shape)}: expected [T, H]")
        need = count * np_dtype.itemsize
        data = self._map(shared.name, need, f"{shared.batch.dtype}{list(shape)}")
        if data is None:  # an empty batch: nothing to read
            return numpy_to_tensor(np.empty(shape, dtype=np_dtype), dtype)
        return numpy_to_tensor(np.frombuffer(data, dtype=np_dtype, count=count).reshape(shape), dtype)

    def _map(self, name: str, need: int, what: str) -> mmap.mmap | None:
        """The mapping of the file `name` now is (None when `need` is 0), at least `need` bytes long."""
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            why = "a symbolic link: not followed" if exc.errno == errno.ELOOP else exc.strerror
            raise SharedBatchUnreadable(f"shared.name={name}: cannot open it in {self.directory} ({why})") from None
        try:
            st = os.fstat(fd)
            _check_file(path, st)
            if st.st_size < need:
                raise SharedBatchUnreadable(f"shared.batch: {what} needs {need} bytes, the file has {st.st_size} "
                                            f"(shared.name={path})")
            if need == 0:
                return None
            key = (st.st_dev, st.st_ino)
            with self._lock:
                cached = self._maps.get(name)
                if cached is not None and cached[0] == key and len(cached[1]) >= need:
                    self._maps.move_to_end(name)
                    return cached[1]
            data = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        with self._lock:
            for gone in [n for n in self._maps if not (self.directory / n).exists()]:
                del self._maps[gone]  # unmapped once no view of it is left
            self._maps[name] = (key, data)  # a replaced file's old mapping goes the same way
            self._maps.move_to_end(name)
            while len(self._maps) > self.keep:
                self._maps.popitem(last=False)
        return data

    @property
    def mapped(self) -> list[str]:
        with self._lock:
            return list(self._maps)


def _check_file(path: Path, st: os.stat_result) -> None:
    """SharedBatchUnreadable naming `path` unless it is a regular file of this user's that only this user can read
    (what BatchFile makes): not a FIFO or a device (reading could block or never end), not anyone else's."""
    if not stat.S_ISREG(st.st_mode):
        raise SharedBatchUnreadable(f"shared.name={path.name}: {path} is not a regular file "
                                    f"({_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')})")
    if st.st_uid != os.geteuid():
        raise SharedBatchUnreadable(f"shared.name={path.name}: {path} is owned by uid {st.st_uid}, expected this "
                                    f"server's uid {os.geteuid()}")
    if st.st_mode & 0o077:
        raise SharedBatchUnreadable(f"shared.name={path.name}: {path} has mode {oct(stat.S_IMODE(st.st_mode))}, "
                                    f"expected 0o600 (its owner's alone)")


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
