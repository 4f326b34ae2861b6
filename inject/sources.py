"""Streaming readers for the two kinds of input: Dolma shards and pre-tokenized OLMo token files.

Dolma: one JSON object a line with a string `text`, in gzip, zstd or plain files (compression is
detected from the first bytes, not trusted from the name). Per-record problems (bad JSON, missing or
non-string text, bytes that are not UTF-8) are reported to a callback and skipped; a damaged
compressed stream is fatal and names the file and the last good line.

Token files: headerless little-endian uint16/uint32 arrays as OLMo memory-maps them (`.npy` by
convention, although there is no NumPy header); a real `.npy` with a header is accepted too.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import zstandard

from .errors import ConfigError, InjectError

DOLMA_SUFFIXES = (".json.gz", ".jsonl.gz", ".json.zst", ".jsonl.zst", ".jsonl", ".json", ".gz", ".zst")
TOKEN_SUFFIXES = (".npy", ".bin")
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
NUMPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class Problem:
    """A record that was skipped; kept in the manifest and in problems.jsonl."""

    file: str
    line: int
    kind: str
    message: str


def source_kind(path: str | Path) -> str:
    name = str(path).lower()
    if name.endswith(TOKEN_SUFFIXES):
        return "tokens"
    if name.endswith(DOLMA_SUFFIXES):
        return "dolma"
    raise ConfigError(f"inputs: {path}: unknown file type; expected one of {DOLMA_SUFFIXES + TOKEN_SUFFIXES}")


def expand_inputs(entries: list[str], base_dir: Path | None = None) -> list[Path]:
    """Files named by each entry (a file, a directory searched recursively, or a glob), in a stable order."""
    files: list[Path] = []
    for entry in entries:
        pattern = Path(entry) if base_dir is None or os.path.isabs(entry) else base_dir / entry
        if pattern.is_dir():
            found = sorted(p for p in pattern.rglob("*") if p.is_file() and p.name.lower().endswith(DOLMA_SUFFIXES + TOKEN_SUFFIXES))
        elif pattern.is_file():
            found = [pattern]
        else:
            found = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if os.path.isfile(p))
        if not found:
            raise ConfigError(f"inputs: {entry!r} matches no input file")
        for path in found:
            source_kind(path)
        files.extend(found)
    duplicates = {str(p) for p in files if files.count(p) > 1}
    if duplicates:
        raise ConfigError(f"inputs: files listed more than once: {sorted(duplicates)}")
    return files


class HashingReader(io.RawIOBase):
    """Wraps a binary file; hashes and counts every byte read, so inputs are hashed in the same pass."""

    def __init__(self, raw):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
            self.bytes_read += n
        return n

    def drain(self) -> None:
        """Read what the decompressor did not, so the hash covers the whole file."""
        while self.read(1 << 20):
            pass


def _decompressed(path: Path, hashing: HashingReader) -> tuple[io.BufferedReader, str]:
    with open(path, "rb") as f:
        head = f.read(4)
    buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
    if head.startswith(GZIP_MAGIC):
        return io.BufferedReader(gzip.GzipFile(fileobj=buffered, mode="rb"), buffer_size=1 << 20), "gzip"
    if head.startswith(ZSTD_MAGIC):
        return io.BufferedReader(_ZstdReader(buffered), buffer_size=1 << 20), "zstd"
    return buffered, "plain"


class _ZstdReader(io.RawIOBase):
    """Decompresses concatenated zstd frames and, unlike `stream_reader`, fails on a truncated frame."""

    def __init__(self, raw):
        self.raw = raw
        self.decompressor = zstandard.ZstdDecompressor()
        self.frame = self.decompressor.decompressobj()
        self.in_frame = False
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.in_frame:
                    raise zstandard.ZstdError("stream ends inside a frame (truncated file)")
                return 0
            self.pending = self._decompress(chunk)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self.in_frame = True
            out.append(self.frame.decompress(chunk))
            if not self.frame.eof:
                break
            chunk = self.frame.unused_data
            self.frame = self.decompressor.decompressobj()
            self.in_frame = False
        return b"".join(out)


@dataclass
class FileStats:
    """What one pass over an input file saw."""

    sha256: str = ""
    size_bytes: int = 0
    compression: str = ""


def iter_dolma_texts(
    path: Path, on_problem: Callable[[Problem], None], stats: FileStats | None = None
) -> Iterator[str]:
    """The `text` of every good document in a Dolma shard, in file order."""
    hashing = HashingReader(open(path, "rb"))
    line_no = 0
    try:
        stream, compression = _decompressed(path, hashing)
        for line_no, raw in enumerate(_lines(stream, path, compression), start=1):
            text = _parse_record(raw, path, line_no, on_problem)
            if text is not None:
                yield text
        hashing.drain()
    finally:
        hashing.raw.close()
    if stats is not None:
        stats.sha256, stats.size_bytes, stats.compression = hashing.sha256.hexdigest(), hashing.bytes_read, compression


def _lines(stream, path: Path, compression: str) -> Iterator[bytes]:
    line_no = 0
    try:
        for line_no, raw in enumerate(stream, start=1):
            yield raw
    except (EOFError, OSError, zlib.error, zstandard.ZstdError) as e:
        raise InjectError(
            f"{path}: corrupt or truncated {compression} stream after line {line_no}: {e}"
        ) from None


def _parse_record(raw: bytes, path: Path, line_no: int, on_problem: Callable[[Problem], None]) -> str | None:
    if not raw.strip():
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        on_problem(Problem(str(path), line_no, "invalid_utf8", f"bytes that are not UTF-8 at byte {e.start}"))
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        on_problem(Problem(str(path), line_no, "invalid_json", f"invalid JSON: {e.msg} at column {e.colno}"))
        return None
    if not isinstance(record, dict):
        on_problem(Problem(str(path), line_no, "invalid_json", f"expected a JSON object, got {type(record).__name__}"))
        return None
    if "text" not in record:
        on_problem(Problem(str(path), line_no, "missing_text", "record has no 'text' field"))
        return None
    text = record["text"]
    if not isinstance(text, str):
        on_problem(Problem(str(path), line_no, "non_string_text", f"'text' is {type(text).__name__}, expected a string"))
        return None
    if not text:
        on_problem(Problem(str(path), line_no, "empty_text", "'text' is empty"))
        return None
    return text


def open_token_file(path: Path, dtype: str) -> np.ndarray:
    """Memory-map a pre-tokenized OLMo token file (headerless, or a NumPy .npy with a header)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == NUMPY_MAGIC:
        array = np.load(path, mmap_mode="r")
        if array.ndim != 1 or array.dtype != np.dtype(dtype):
            raise InjectError(f"{path}: NumPy array of {array.dtype}{list(array.shape)}, expected 1-D {dtype}")
        return array
    size = path.stat().st_size
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
        raise InjectError(f"{path}: {size} bytes is not a whole number of {dtype} tokens ({itemsize} bytes each)")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def check_token_ids(path: Path, tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Refuse ids outside the tokenizer's vocabulary, naming the first offending offset."""
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start : start + chunk])
        bad = np.flatnonzero(part >= vocab_size)
        if bad.size:
            offset = start + int(bad[0])
            raise InjectError(
                f"{path}: token id {int(part[bad[0]])} at offset {offset} is outside the tokenizer's vocabulary "
                f"(size {vocab_size}); was the file made with another tokenizer or dtype?"
            )
