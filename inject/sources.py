"""Streaming readers for the kinds of input: documents (Dolma shards, Parquet, Arrow) and pre-tokenized OLMo
token files.

Dolma: one JSON object a line with a string `text`, in gzip, zstd or plain files (compression is
detected from the first bytes, not trusted from the name). Per-record problems (bad JSON, missing or
non-string text, bytes that are not UTF-8) are reported to a callback and skipped; a damaged
compressed stream is fatal and names the file and the last good line.

Parquet shards (FineWeb, DCLM and most Hub corpora) and the Arrow files of a `datasets.save_to_disk` folder:
read in record batches of the text column only (never a whole file), rows in file order; a null or empty
text is a per-record problem (its row number stands where a line number would), a missing or non-string
text column is a configuration error naming the file and the columns it has. The text field's name is the
build's `text_field` for every kind.

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
from .stream import TokenFile

DOLMA_SUFFIXES = (".json.gz", ".jsonl.gz", ".json.zst", ".jsonl.zst", ".jsonl", ".json", ".gz", ".zst")
TABLE_SUFFIXES = (".parquet", ".arrow")
TOKEN_SUFFIXES = (".npy", ".bin")
INPUT_SUFFIXES = DOLMA_SUFFIXES + TABLE_SUFFIXES + TOKEN_SUFFIXES
SAVED_DATASET = ("state.json", "dataset_info.json")  # what `datasets.Dataset.save_to_disk` writes beside its Arrow files
TABLE_BATCH_ROWS = 1024  # rows per record batch read from a Parquet or Arrow file
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
NUMPY_MAGIC = b"\x93NUMPY"
MANIFEST = "manifest.json"  # what marks a folder as an olmo-inject build (inject.build writes it last)
LINE_CHUNK = 1 << 16  # decompressed bytes per read: a damaged stream loses at most the lines of one read


@dataclass(frozen=True)
class Problem:
    """A record that was skipped; kept in the manifest and in problems.jsonl."""

    file: str
    line: int
    kind: str
    message: str


def source_kind(path: str | Path) -> str:
    """`tokens`, `dolma` (JSON lines), `parquet` or `arrow`, from the file name."""
    name = str(path).lower()
    if name.endswith(TOKEN_SUFFIXES):
        return "tokens"
    if name.endswith(DOLMA_SUFFIXES):
        return "dolma"
    for suffix in TABLE_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    raise ConfigError(f"inputs: {path}: unknown file type; expected one of {INPUT_SUFFIXES}")


def expand_inputs(entries: list[str], base_dir: Path | None = None, problems: list[Problem] | None = None) -> list[Path]:
    """Files named by each entry (a file, a directory searched recursively, or a glob), in a stable order.

    Refused: a file reached twice (compared by real path, so through a link or `d/../d/f` too), and a folder
    of inputs that holds an olmo-inject build (its files are outputs; named explicitly, e.g. `build/data/*.npy`,
    its token files are a legitimate source). Links inside a folder or glob that lead to no file are not
    read; each is appended to `problems` (when given) as a `dangling_link`.
    """
    files: list[Path] = []
    for entry in entries:
        pattern = entry_path(entry, base_dir)
        if pattern.is_dir():
            found = _walk(pattern, problems)
        elif pattern.is_file():
            found = [pattern]
        elif pattern.is_symlink():
            raise ConfigError(f"inputs: {entry!r} is a link to {os.readlink(pattern)!r}, which leads to no file")
        else:
            matches = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True))
            found = [p for p in matches if p.is_file()]
            _note_dangling([p for p in matches if p.is_symlink() and not p.exists()], problems)
        if not found:
            raise ConfigError(f"inputs: {entry!r} matches no input file")
        for path in found:
            source_kind(path)
            if _is_build(path.parent) or (path.parent.name == ".work" and _is_build(path.parent.parent)):
                raise ConfigError(f"inputs: {path} is a file of the olmo-inject build {path.parent}, an output; "
                                  "only its token files (data/*.npy) may be an input")
        files.extend(found)
    _refuse_same_file_twice(files)
    return files


def entry_path(entry: str, base_dir: Path | None = None) -> Path:
    """An `inputs` entry as a path: relative entries are relative to `base_dir` (the config file's folder)."""
    return Path(entry) if base_dir is None or os.path.isabs(entry) else base_dir / entry


def _walk(folder: Path, problems: list[Problem] | None) -> list[Path]:
    """Input files under `folder`, recursively, in path order (links to folders are not followed, as `Path.rglob`
    does not); a `datasets.save_to_disk` folder gives its Arrow files in the dataset's own order."""
    found: list[tuple[Path, list[Path]]] = []  # (sort key, files): a saved dataset's files stay in its own order
    for root, dirs, names in os.walk(folder):
        if _is_build(Path(root)):
            raise ConfigError(
                f"inputs: {root} is an olmo-inject build ({MANIFEST} or .work/) inside the input folder {folder}: "
                f"a build is an output and is never read as an input; move it out of {folder}, or name its token "
                f"files explicitly ({root}/data/*.npy)")
        if all(n in names for n in SAVED_DATASET):
            found.append((Path(root), saved_dataset_files(Path(root))))
            dirs[:] = []
            continue
        for name in names:
            path = Path(root) / name
            if not name.lower().endswith(INPUT_SUFFIXES):
                continue
            if path.is_file():
                found.append((path, [path]))
            else:
                _note_dangling([path], problems)
    return [path for _, files in sorted(found) for path in files]


def saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a `datasets.Dataset.save_to_disk` folder, in the dataset's row order (state.json's
    `_data_files`, not the names' order)."""
    state = folder / SAVED_DATASET[0]
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"inputs: {state}: not the state.json of a datasets.save_to_disk folder "
                          f"(expected _data_files: [{{filename: ...}}]): {e}") from None
    files = [folder / name for name in names]
    for path in files:
        if not path.is_file() or source_kind(path) != "arrow":
            raise ConfigError(f"inputs: {state} lists {path.name}, which is not an Arrow file in {folder}")
    return files


def _is_build(folder: Path) -> bool:
    """A finished olmo-inject build (its manifest) or an unfinished one (`OUT.partial/.work`)."""
    if folder.name.endswith(".partial") and (folder / ".work").is_dir():
        return True
    try:
        with open(folder / MANIFEST, "rb") as f:
            return b'"format": "olmo-inject/' in f.read(256)
    except OSError:
        return False


def _note_dangling(links: list[Path], problems: list[Problem] | None) -> None:
    for link in links:
        if problems is not None:
            problems.append(Problem(str(link), 0, "dangling_link",
                                    f"link to {os.readlink(link)!r}, which leads to no file; not read"))


def _refuse_same_file_twice(files: list[Path]) -> None:
    first: dict[str, Path] = {}
    for path in files:
        real = os.path.realpath(path)
        if real in first:
            twice = f"{path} is listed twice" if first[real] == path else f"{first[real]} and {path} are the same file {real}"
            raise ConfigError(f"inputs: {twice}; each input file must be read once: list it once")
        first[real] = path


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


def _decompressed(path: Path, hashing: HashingReader):
    """A stream of the file's decompressed bytes with `read1` (one underlying read a call), and its compression."""
    with open(path, "rb") as f:
        head = f.read(4)
    buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb"), "gzip"
    if head.startswith(ZSTD_MAGIC):
        return io.BufferedReader(_ZstdReader(buffered), buffer_size=LINE_CHUNK), "zstd"
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
            chunk = self.raw.read(LINE_CHUNK)
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


def iter_texts(path: Path, on_problem: Callable[[Problem], None], stats: FileStats | None = None,
               text_field: str = "text", id_field: str = "id") -> Iterator[str]:
    """The text of every good document of a document input (Dolma JSON lines, Parquet, Arrow), in file order.
    A skipped record's problem quotes its `id_field` where it has one."""
    if source_kind(path) == "dolma":
        return iter_dolma_texts(path, on_problem, stats, text_field, id_field)
    return iter_table_texts(path, on_problem, stats, text_field, id_field)


def iter_dolma_texts(
    path: Path, on_problem: Callable[[Problem], None], stats: FileStats | None = None, text_field: str = "text",
    id_field: str = "id",
) -> Iterator[str]:
    """The `text` (`text_field`) of every good document in a Dolma shard, in file order."""
    hashing = HashingReader(open(path, "rb"))
    line_no = 0
    try:
        stream, compression = _decompressed(path, hashing)
        for line_no, raw in enumerate(_lines(stream, path, compression), start=1):
            text = _parse_record(raw, path, line_no, on_problem, text_field, id_field)
            if text is not None:
                yield text
        hashing.drain()
    finally:
        hashing.raw.close()
    if stats is not None:
        stats.sha256, stats.size_bytes, stats.compression = hashing.sha256.hexdigest(), hashing.bytes_read, compression


def _lines(stream, path: Path, compression: str) -> Iterator[bytes]:
    """The file's lines (without the newline). Read in small pieces and yielded as they come, so that when
    the stream turns out damaged every line decoded before the damage has been seen and is counted."""
    line_no = 0
    unfinished: list[bytes] = []  # the pieces of a line that spans reads
    while True:
        try:
            chunk = stream.read1(LINE_CHUNK)
        except (EOFError, OSError, zlib.error, zstandard.ZstdError) as e:
            raise InjectError(
                f"{path}: corrupt or truncated {compression} stream after line {line_no}: {e}"
            ) from None
        if not chunk:
            break
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            unfinished.append(chunk)
            continue
        unfinished.append(pieces[0])
        pieces[0] = b"".join(unfinished)
        unfinished = [pieces.pop()]
        for line in pieces:
            line_no += 1
            yield line
    if any(unfinished):
        yield b"".join(unfinished)


def _parse_record(raw: bytes, path: Path, line_no: int, on_problem: Callable[[Problem], None],
                  field: str = "text", id_field: str = "id") -> str | None:
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
    doc = _document_id(record.get(id_field), id_field)
    if field not in record:
        on_problem(Problem(str(path), line_no, "missing_text", f"record has no {field!r} field{doc}"))
        return None
    text = record[field]
    if not isinstance(text, str):
        on_problem(Problem(str(path), line_no, "non_string_text", f"{field!r} is {type(text).__name__}, expected a string{doc}"))
        return None
    if not text:
        on_problem(Problem(str(path), line_no, "empty_text", f"{field!r} is empty{doc}"))
        return None
    if "\\u" in line:  # the bytes were UTF-8, so only a JSON escape can have made a lone surrogate
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            on_problem(Problem(str(path), line_no, "invalid_unicode", f"{field!r} holds a lone surrogate "
                               f"\\u{ord(text[e.start]):04x} at character {e.start}: not text UTF-8 can encode{doc}"))
            return None
    return text


def _document_id(value, id_field: str) -> str:
    """` (id_field X)` for a problem message, or "" where the record has no usable id."""
    return f" ({id_field} {value!r})" if isinstance(value, (str, int)) and not isinstance(value, bool) else ""


def iter_table_texts(path: Path, on_problem: Callable[[Problem], None], stats: FileStats | None = None,
                     text_field: str = "text", id_field: str = "id") -> Iterator[str]:
    """The `text_field` of every good row of a Parquet file or an Arrow file (IPC stream, as save_to_disk writes,
    or IPC file), in row order, read one record batch of that column at a time."""
    import pyarrow as pa

    row = 0
    try:
        with pa.memory_map(str(path)) as source:
            for batch in _record_batches(path, source, text_field, id_field):
                ids = batch.column(1).to_pylist() if batch.num_columns > 1 else [None] * batch.num_rows
                for text, doc in zip(batch.column(0).to_pylist(), ids):
                    row += 1
                    if not text:
                        kind, what = ("missing_text", "null") if text is None else ("empty_text", "empty")
                        on_problem(Problem(str(path), row, kind, f"row {row}: {text_field!r} is {what}"
                                                                 f"{_document_id(doc, id_field)}"))
                    else:
                        yield text
    except (pa.ArrowException, OSError) as e:
        raise InjectError(f"{path}: damaged or unreadable {source_kind(path)} file after row {row}: {e}") from None
    if stats is not None:
        stats.sha256, stats.size_bytes, stats.compression = _file_sha256(path), path.stat().st_size, source_kind(path)


def _record_batches(path: Path, source, field: str, id_field: str) -> Iterator:
    """Record batches of the column `field` and, where the file has it, `id_field` (a ConfigError when the file
    has no string column `field`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if source_kind(path) == "parquet":
        reader = pq.ParquetFile(source)
        schema = reader.schema_arrow
        _check_text_column(path, schema, field)
        columns = [field] + ([id_field] if id_field in schema.names and id_field != field else [])
        return reader.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=columns)
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        file_reader = pa.ipc.open_file(source)
        reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        schema = file_reader.schema
    else:
        schema = reader.schema
    _check_text_column(path, schema, field)
    columns = [field] + ([id_field] if id_field in schema.names and id_field != field else [])
    return (batch.select([schema.get_field_index(c) for c in columns]) for batch in reader)


def _check_text_column(path: Path, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise ConfigError(f"{path}: no column {field!r} (text_field); its columns: {', '.join(schema.names)}")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"{path}: column {field!r} (text_field) holds {kind}, expected strings")


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


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


def token_file(path: Path, dtype: str) -> TokenFile:
    """The ids of a pre-tokenized OLMo token file (checked as `open_token_file` does), read by slices."""
    array = open_token_file(path, dtype)
    return TokenFile(path, array.dtype, getattr(array, "offset", 0), len(array))


def check_token_ids(path: Path, tokens: np.ndarray, vocab_size: int, start: int = 0) -> None:
    """Refuse ids outside the tokenizer's vocabulary, naming the first offending offset (`tokens` begins at
    offset `start` of the file). One max over the array when every id is good."""
    if not len(tokens) or int(tokens.max()) < vocab_size:
        return
    bad = int(np.flatnonzero(tokens >= vocab_size)[0])
    raise InjectError(
        f"{path}: token id {int(tokens[bad])} at offset {start + bad} is outside the tokenizer's vocabulary "
        f"(size {vocab_size}); was the file made with another tokenizer or dtype?"
    )
