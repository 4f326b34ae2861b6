"""The write stage's primitives: the input token stream read in order, and the writer of output token files.

Shared by the plain build (`inject.build`), the injected build (`inject.place`) and `verify`; they import
nothing of those modules, so the build's stages read one way (build -> place -> stream).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_HASH_THREADS: list[ThreadPoolExecutor] = []
_hashes_started = 0


class BackgroundHash:
    """sha256 of a byte stream, computed in a worker thread so that hashing overlaps reading, checking and writing
    (hashlib releases the GIL on buffers above 2 KiB). Successive hashes (files) take turns on two threads, so
    that one file's hash can run beside the next one's; each hash stays on one thread, in submission order. A
    buffer passed to `update` must not change until `hexdigest` returns; a few stay pending at most."""

    PENDING = 4
    THREADS = 2

    def __init__(self):
        global _hashes_started
        if not _HASH_THREADS:
            _HASH_THREADS.extend(ThreadPoolExecutor(1, thread_name_prefix="olmo-inject-hash") for _ in range(self.THREADS))
        self._thread = _HASH_THREADS[_hashes_started % self.THREADS]
        _hashes_started += 1
        self._sha = hashlib.sha256()
        self._pending: deque = deque()

    def update(self, data) -> None:
        if len(self._pending) >= self.PENDING:
            self._pending.popleft().result()
        self._pending.append(self._thread.submit(self._sha.update, data))

    def hexdigest(self) -> str:
        while self._pending:
            self._pending.popleft().result()
        return self._sha.hexdigest()


class TokenFile:
    """A token file's ids, read by slices with plain file reads into fresh arrays: a whole pass over it costs the
    chunk in memory, not the pages of a memory map (resident and counted in RSS as it is read). At most
    MAX_OPEN files are held open at once (least recently read closed first): a build reads thousands."""

    MAX_OPEN = 64
    _open: "OrderedDict[int, int]" = OrderedDict()  # id(TokenFile) -> file descriptor

    def __init__(self, path: Path, dtype, offset: int, length: int):
        self.path, self.dtype, self.offset, self.length = Path(path), np.dtype(dtype), offset, length

    def __len__(self) -> int:
        return self.length

    def _fd(self) -> int:
        fd = self._open.pop(id(self), None)
        if fd is None:
            fd = os.open(self.path, os.O_RDONLY)
            while len(self._open) >= self.MAX_OPEN:
                os.close(self._open.popitem(last=False)[1])
        self._open[id(self)] = fd
        return fd

    def __getitem__(self, item) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("TokenFile reads contiguous slices only")
        start, stop, _ = item.indices(self.length)
        out = np.empty(max(0, stop - start), dtype=self.dtype)
        view, position = memoryview(out).cast("B"), self.offset + start * self.dtype.itemsize
        fd = self._fd() if len(view) else None
        while len(view):
            got = os.preadv(fd, [view], position)
            if not got:
                raise OSError(f"{self.path}: ended {len(view)} bytes early (was it truncated while being read?)")
            view, position = view[got:], position + got
        return out

    def __del__(self):
        fd = self._open.pop(id(self), None)
        if fd is not None:
            os.close(fd)


class TokenStream:
    """The concatenated token caches of all inputs, read front to back in chunks (constant memory)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = [a for a in arrays if len(a)]
        self.total = sum(len(a) for a in self.arrays)
        self._file = 0
        self._pos = 0
        self.consumed = 0

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0 and self._file < len(self.arrays):
            array = self.arrays[self._file]
            part = array[self._pos : self._pos + n]
            parts.append(np.asarray(part))
            self._pos += len(part)
            n -= len(part)
            if self._pos == len(array):
                self._file, self._pos = self._file + 1, 0
        if not parts:
            return np.zeros(0, dtype=self.arrays[0].dtype if self.arrays else np.uint16)
        out = np.concatenate(parts) if len(parts) != 1 else parts[0]
        self.consumed += len(out)
        return out


class CastArray:
    """A token array read in another dtype, converted chunk by chunk."""

    def __init__(self, array: np.ndarray, dtype: str):
        self.array, self.dtype = array, np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, item):
        return np.asarray(self.array[item]).astype(self.dtype)


class OutputWriter:
    """Writes `data/part-NNNNN.npy` files of a fixed number of tokens, hashing as it goes (in the hash thread).
    Small writes are gathered into one buffer of about COALESCE bytes; an array passed to `write` must not be
    modified afterwards (it may be hashed later)."""

    COALESCE = 1 << 20

    def __init__(self, out_dir: Path, tokens_per_file: int, sequence_length: int):
        self.data_dir = out_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tokens_per_file = tokens_per_file
        self.sequence_length = sequence_length
        self.files: list[dict] = []
        self._handle = None
        self._sha = None
        self._count = 0
        self._small: list[np.ndarray] = []
        self._small_bytes = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._handle is None:
                self._open()
            room = self.tokens_per_file - self._count
            part, tokens = tokens[:room], tokens[room:]
            if part.nbytes < self.COALESCE:
                self._small.append(part)
                self._small_bytes += part.nbytes
                if self._small_bytes >= self.COALESCE:
                    self._flush()
            else:
                self._flush()
                self._put(np.ascontiguousarray(part))
            self._count += len(part)
            if self._count == self.tokens_per_file:
                self._close()

    def _flush(self) -> None:
        if self._small:
            self._put(np.concatenate(self._small) if len(self._small) > 1 else np.ascontiguousarray(self._small[0]))
            self._small, self._small_bytes = [], 0

    def _put(self, data: np.ndarray) -> None:
        view = memoryview(data).cast("B")
        self._handle.write(view)
        self._sha.update(view)

    def _open(self) -> None:
        name = f"part-{len(self.files):05d}.npy"
        self._handle = open(self.data_dir / name, "wb")
        self._sha = BackgroundHash()
        self._count = 0
        self.files.append({"path": f"data/{name}"})

    def _close(self) -> None:
        self._flush()
        self._handle.close()
        self.files[-1].update(
            tokens=self._count, instances=self._count // self.sequence_length,
            size_bytes=(self.data_dir.parent / self.files[-1]["path"]).stat().st_size, sha256=self._sha.hexdigest(),
        )
        self._handle = None

    def finish(self) -> list[dict]:
        if self._handle is not None:
            self._close()
        return self.files
