"""The write stage's primitives: the input token stream read in order, and the writer of output token files.

Shared by the plain build (`inject.build`), the injected build (`inject.place`) and `verify`; they import
nothing of those modules, so the build's stages read one way (build -> place -> stream).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


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
    """Writes `data/part-NNNNN.npy` files of a fixed number of tokens, hashing as it goes."""

    def __init__(self, out_dir: Path, tokens_per_file: int, sequence_length: int):
        self.data_dir = out_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tokens_per_file = tokens_per_file
        self.sequence_length = sequence_length
        self.files: list[dict] = []
        self._handle = None
        self._sha = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._handle is None:
                self._open()
            room = self.tokens_per_file - self._count
            part, tokens = tokens[:room], tokens[room:]
            data = part.tobytes()
            self._handle.write(data)
            self._sha.update(data)
            self._count += len(part)
            if self._count == self.tokens_per_file:
                self._close()

    def _open(self) -> None:
        name = f"part-{len(self.files):05d}.npy"
        self._handle = open(self.data_dir / name, "wb")
        self._sha = hashlib.sha256()
        self._count = 0
        self.files.append({"path": f"data/{name}"})

    def _close(self) -> None:
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
