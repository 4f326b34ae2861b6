"""Placements keep their promise: `document-boundary` splits no document (the documents read back from
the output are the input texts), `sequence-start-insert` inserts at the instance start, and `verify`
fails a build whose block was moved off a document boundary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import docs, make_texts, write_shard
from test_build import read_outputs, split_documents
from test_injection import TEXT_CMP, TOKEN_MOD, build, verify
from inject.ledger import read_ledger

EOS = 50279
TASKS = [{**TEXT_CMP, "schedule": {"kind": "even", "rate": 2}},
         {**TOKEN_MOD, "schedule": {"kind": "burst", "burst_size": 4, "burst_every": 5}}]
# 128-token instances: every instance holds a document end (no text is longer), so no block lacks a boundary
ROOMY = dict(sequence_length=128, placement="document-boundary", training={"global_batch_size": 8, "steps": 40, "seed": 3},
             tasks=TASKS)
# 32-token instances, ~12 of them examples: some instances lie inside one document and have no boundary
CRAMPED = dict(sequence_length=32, placement="document-boundary", max_batch_share=0.9,
               training={"global_batch_size": 8, "steps": 40, "seed": 5},
               tasks=[{**TOKEN_MOD, "schedule": {"kind": "even", "rate": 20}}])


@pytest.fixture(scope="module")
def texts_and_corpus(tmp_path_factory) -> tuple[list[str], Path]:
    folder = tmp_path_factory.mktemp("corpus")
    texts = make_texts(1200, seed=2)
    write_shard(folder / "a.jsonl.gz", docs(texts[:600], "a"))
    write_shard(folder / "b.jsonl.zst", docs(texts[600:], "b"))
    return texts, folder


@pytest.fixture(scope="module")
def roomy(tmp_path_factory, texts_and_corpus) -> Path:
    code, out_dir = build(tmp_path_factory.mktemp("roomy"), texts_and_corpus[1], **ROOMY)
    assert code == 0
    return out_dir


def example_starts(out_dir: Path, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Global token position and length (closing EOS included) of every injected example."""
    ledger = read_ledger(out_dir)
    return ledger["instance"].astype(np.int64) * L + ledger["offset"].astype(np.int64), ledger["length"].astype(np.int64)


def without_examples(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    keep = np.ones(len(tokens), dtype=bool)
    for start, length in zip(starts, lengths):
        keep[start : start + length] = False
    return tokens[keep]


def test_document_boundary_splits_no_document(roomy, texts_and_corpus):
    from olmo.tokenizer import Tokenizer
    from inject import tokenizer as tok

    texts, _ = texts_and_corpus
    manifest, tokens = read_outputs(roomy)
    assert manifest["injection"]["placement"] == "document-boundary"
    assert manifest["injection"]["totals"]["blocks_without_boundary"] == 0
    starts, lengths = example_starts(roomy, 128)
    assert (starts % 128 > 0).any() and (starts % 128 == 0).any()  # mid-instance blocks and blocks at the start
    # Every EOS-terminated segment of the output is an injected example or one input text, whole and in order.
    ends = np.flatnonzero(tokens == EOS)
    segment_starts = np.concatenate([[0], ends[:-1] + 1])
    examples = set(starts.tolist())
    assert examples <= set(segment_starts.tolist())  # each example starts a segment: the token before is EOS
    documents = [d for s, d in zip(segment_starts, split_documents(tokens, EOS)) if s not in examples]
    spec = tok.get_spec("allenai/gpt-neox-olmo-dolma-v1_5")
    olmo_tok = Tokenizer.from_file(spec.path, eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id)
    assert len(documents) == len(texts)
    for document, text in zip(documents, texts):
        assert document.tolist() == olmo_tok.encode(text)
    # ... and the Dolma tokens, examples removed, are the input stream, nothing lost or moved
    assert np.array_equal(without_examples(tokens, starts, lengths), np.concatenate(documents))


def test_verify_passes_document_boundary_and_fails_a_block_moved_off_the_boundary(roomy, tmp_path, capsys):
    code, out = verify(roomy, capsys)
    assert code == 0, out
    assert "placement: document-boundary" in out and "0 not after EOS" in out
    # Move one block from its boundary to the start of its instance, where a document is running: the tokens
    # and the ledger agree, every batch holds its examples, the Dolma stream is intact; only the placement lies.
    _, tokens = read_outputs(roomy)
    ledger = np.load(roomy / "ledger.npy")
    L = 128
    first = {}
    for row in ledger:
        first[int(row["instance"])] = min(first.get(int(row["instance"]), L), int(row["offset"]))
    instance, offset = next((i, o) for i, o in sorted(first.items()) if o > 0 and tokens[i * L - 1] != EOS)
    rows = ledger["instance"] == instance
    block_end = int((ledger["offset"][rows] + ledger["length"][rows]).max())
    tampered = tmp_path / "tampered"
    shutil.copytree(roomy, tampered)
    row = tokens[instance * L : (instance + 1) * L].copy()
    row[:block_end] = np.concatenate([row[offset:block_end], row[:offset]])
    tokens[instance * L : (instance + 1) * L] = row
    files = json.loads((roomy / "manifest.json").read_text())["outputs"]
    position = 0
    for f in files:
        tokens[position : position + f["tokens"]].tofile(tampered / f["path"])
        position += f["tokens"]
    ledger["offset"][rows] -= offset
    np.save(tampered / "ledger.npy", ledger)
    code, out = verify(tampered, capsys)
    assert code == 1
    assert f"[placement] instance {instance}: block at offset 0 follows token" in out and "splits a document" in out
    assert "1 block(s) are not preceded by EOS (split a document), the manifest records 0" in out
    assert "[order]" not in out and "[ledger]" not in out and "[dolma]" not in out


def test_an_instance_without_a_boundary_takes_its_block_at_the_start_and_is_counted(tmp_path, texts_and_corpus, capsys):
    code, out_dir = build(tmp_path, texts_and_corpus[1], **CRAMPED)
    assert code == 0
    manifest, tokens = read_outputs(out_dir)
    counted = manifest["injection"]["totals"]["blocks_without_boundary"]
    starts, lengths = example_starts(out_dir, 32)
    ledger = read_ledger(out_dir)
    first_of_block = np.array([s == starts[ledger["instance"] == i].min() for s, i in zip(starts, ledger["instance"])])
    after_eos = np.array([s == 0 or tokens[s - 1] == EOS for s in starts])
    assert after_eos[~first_of_block].all()  # later examples of a block follow the previous one's EOS
    split = starts[first_of_block & ~after_eos]
    assert counted == len(split) > 0
    for s in split:  # a block off a boundary only at the start of an instance whose Dolma tokens hold no EOS
        assert s % 32 == 0
        block = (ledger["instance"] == s // 32)
        assert EOS not in tokens[s + int(lengths[block].sum()) : s - s % 32 + 32]
    assert np.array_equal(without_examples(tokens, starts, lengths), read_outputs(build(tmp_path, texts_and_corpus[1], "base", sequence_length=32)[1])[1])
    code, out = verify(out_dir, capsys)
    assert code == 0, out
    assert f"{counted} not after EOS" in out


def test_sequence_start_insert_puts_blocks_at_the_start_and_counts_the_documents_it_splits(tmp_path, texts_and_corpus, capsys):
    code, out_dir = build(tmp_path, texts_and_corpus[1], **{**ROOMY, "placement": "sequence-start-insert"})
    assert code == 0
    manifest, tokens = read_outputs(out_dir)
    ledger = read_ledger(out_dir)
    instances = np.unique(ledger["instance"].astype(np.int64))
    assert all(ledger["offset"][ledger["instance"] == i].min() == 1 and tokens[i * 128] == EOS for i in instances)
    split = sum(i > 0 and tokens[i * 128 - 1] != EOS for i in instances)
    assert manifest["injection"]["totals"]["blocks_without_boundary"] == split > len(instances) // 2
    code, out = verify(out_dir, capsys)
    assert code == 0, out


def test_an_unknown_placement_names_the_choices(tmp_path, texts_and_corpus, capsys):
    code, _ = build(tmp_path, texts_and_corpus[1], **{**ROOMY, "placement": "document-start"})
    assert code == 2
    assert ("placement: 'document-start' is not one of ['sequence-start', 'sequence-start-insert', 'document-boundary']"
            in capsys.readouterr().err)
