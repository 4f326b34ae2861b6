"""Shared helpers: small Dolma corpora written by the tests themselves."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from inject.cli import main as cli

WORDS = ("the model learns rare tasks slowly while common ones crowd its capacity and the gradient of one "
         "task interferes with another so larger models remember more of what they saw").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + ("." if i % 3 else "\n\nÜber café 42!")
            for i in range(n)]


def write_shard(path: Path, records: list, compression: str | None = None) -> Path:
    """Write records (dicts, or raw bytes lines) as a Dolma shard; compression from the name unless given."""
    data = b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in records)
    kind = compression or ("gzip" if path.name.endswith(".gz") else "zstd" if path.name.endswith(".zst") else "plain")
    if kind == "gzip":
        data = gzip.compress(data, mtime=0)
    elif kind == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def docs(texts: list[str], prefix: str = "d") -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": t, "source": "test", "added": "2024-01-01", "created": "2024-01-01",
             "metadata": {}} for i, t in enumerate(texts)]


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """Four shards in four formats; returns the folder and all texts in input (sorted file) order."""
    texts = make_texts(400)
    folder = tmp_path / "corpus"
    write_shard(folder / "a.json.gz", docs(texts[:100], "a"))
    write_shard(folder / "b.jsonl.zst", docs(texts[100:200], "b"))
    write_shard(folder / "c.jsonl", docs(texts[200:300], "c"))
    write_shard(folder / "d.json.zst", docs(texts[300:], "d"))
    return folder, texts


def write_config(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


def run_cli(*args) -> int:
    return cli([str(a) for a in args])
