"""Every bad input gives one clear message naming the file/line/key, a non-zero exit, and no finished output."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from conftest import docs, make_texts, run_cli, write_config, write_shard


def build(tmp_path, capsys, *extra, **config):
    config.setdefault("sequence_length", 16)
    cfg = write_config(tmp_path / "b.yaml", **config)
    before = inputs(tmp_path)
    code = run_cli("build", cfg, "--out", tmp_path / "out", *extra)
    assert inputs(tmp_path) == before  # whatever happened, every input is byte-identical
    return code, capsys.readouterr().err


def inputs(tmp_path) -> dict:
    """Every file but the build's own (out/, out.partial/), with its bytes."""
    return {p: p.read_bytes() for p in tmp_path.rglob("*")
            if p.is_file() and not {"out", "out.partial"} & set(p.relative_to(tmp_path).parts)}


def assert_failed(tmp_path, code, err, *fragments):
    assert code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not (tmp_path / "out").exists()


def test_corrupt_gzip_names_the_file(tmp_path, capsys):
    path = write_shard(tmp_path / "bad.json.gz", docs(make_texts(50)))
    data = bytearray(path.read_bytes())
    data[30:60] = b"\xff" * 30
    path.write_bytes(bytes(data))
    code, err = build(tmp_path, capsys, inputs=["bad.json.gz"])
    assert_failed(tmp_path, code, err, "bad.json.gz", "corrupt or truncated gzip")


def test_truncated_zstd_names_the_file_and_line(tmp_path, capsys):
    path = write_shard(tmp_path / "cut.jsonl.zst", docs(make_texts(200)))
    path.write_bytes(path.read_bytes()[:-40])
    code, err = build(tmp_path, capsys, inputs=["cut.jsonl.zst"])
    assert_failed(tmp_path, code, err, "cut.jsonl.zst", "corrupt or truncated zstd", "after line")


def test_truncated_gzip(tmp_path, capsys):
    path = write_shard(tmp_path / "cut.jsonl.gz", docs(make_texts(200)))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    code, err = build(tmp_path, capsys, inputs=["cut.jsonl.gz"])
    assert_failed(tmp_path, code, err, "cut.jsonl.gz", "corrupt or truncated gzip")


BAD_RECORDS = [
    (b"{not json\n", "invalid_json", "invalid JSON"),
    (b'{"id": "x"}\n', "missing_text", "no 'text' field"),
    (b'{"id": "x", "text": 42}\n', "non_string_text", "'text' is int"),
    (b'{"id": "x", "text": "caf\xe9"}\n', "invalid_utf8", "not UTF-8"),
    (b'[1, 2]\n', "invalid_json", "expected a JSON object"),
    (b'{"id": "x", "text": "half a pair \\ud800 here"}\n', "invalid_unicode", "lone surrogate \\ud800"),
]


@pytest.mark.parametrize("line,kind,message", BAD_RECORDS)
def test_bad_records_are_counted_and_listed_or_fatal_with_strict(tmp_path, capsys, line, kind, message):
    good = docs(make_texts(5))
    write_shard(tmp_path / "in.jsonl", [*good[:2], line, *good[2:]])
    code, err = build(tmp_path, capsys, "--strict", inputs=["in.jsonl"])
    assert_failed(tmp_path, code, err, "in.jsonl:3", message, "--strict")
    code, err = build(tmp_path, capsys, inputs=["in.jsonl"])
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["documents"] == 5
    assert manifest["counts"]["problems_by_kind"] == {kind: 1}
    listed = [json.loads(l) for l in (tmp_path / "out" / "problems.jsonl").read_text().splitlines()]
    assert listed == [{"file": str(tmp_path / "in.jsonl"), "line": 3, "kind": kind, "message": listed[0]["message"]}]
    assert message in listed[0]["message"]


def test_empty_inputs(tmp_path, capsys):
    code, err = build(tmp_path, capsys, inputs=["nothing-*.jsonl.gz"])
    assert_failed(tmp_path, code, err, "inputs", "nothing-*.jsonl.gz", "matches no input file")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "empty.json.gz").write_bytes(gzip.compress(b""))
    code, err = build(tmp_path, capsys, inputs=["empty.jsonl", "empty.json.gz"])
    assert_failed(tmp_path, code, err, "no usable document", "empty.jsonl")


def test_unknown_tokenizer_and_unknown_or_mistyped_keys(tmp_path, capsys):
    write_shard(tmp_path / "in.jsonl", docs(make_texts(3)))
    code, err = build(tmp_path, capsys, inputs=["in.jsonl"], tokenizer="gpt2")
    assert_failed(tmp_path, code, err, "tokenizer", "'gpt2'", "allenai/gpt-neox-olmo-dolma-v1_5")
    code, err = build(tmp_path, capsys, inputs=["in.jsonl"], seqence_length=5)
    assert_failed(tmp_path, code, err, "seqence_length", "unknown key", "sequence_length")
    code, err = build(tmp_path, capsys, inputs=["in.jsonl"], sequence_length="long")
    assert_failed(tmp_path, code, err, "sequence_length", "expected int", "'long'")
    code, err = build(tmp_path, capsys, inputs="in.jsonl")
    assert_failed(tmp_path, code, err, "inputs", "expected a list")


def test_token_ids_that_do_not_fit(tmp_path, capsys):
    write_shard(tmp_path / "in.jsonl", docs(make_texts(3)))
    code, err = build(tmp_path, capsys, inputs=["in.jsonl"], tokenizer="allenai/dolma2-tokenizer", dtype="uint16")
    assert_failed(tmp_path, code, err, "dtype", "uint16 cannot hold token ids", "uint32")
    np.array([5, 7, 50279, 60000, 50279], dtype=np.uint16).tofile(tmp_path / "tokens.npy")
    code, err = build(tmp_path, capsys, inputs=["tokens.npy"])
    assert_failed(tmp_path, code, err, "tokens.npy", "token id 60000 at offset 3", "vocabulary")
    np.array([5, 70000, 100257], dtype=np.uint32).tofile(tmp_path / "wide.npy")
    code, err = build(tmp_path, capsys, inputs=["wide.npy"], tokenizer="allenai/dolma2-tokenizer",
                      dtype="uint16", input_dtype="uint32")
    assert_failed(tmp_path, code, err, "dtype")
    (tmp_path / "odd.npy").write_bytes(b"\x01\x02\x03")
    code, err = build(tmp_path, capsys, inputs=["odd.npy"])
    assert_failed(tmp_path, code, err, "odd.npy", "not a whole number of uint16 tokens")


def test_existing_output_needs_overwrite(tmp_path, capsys):
    write_shard(tmp_path / "in.jsonl", docs(make_texts(3)))
    code, _ = build(tmp_path, capsys, inputs=["in.jsonl"])
    assert code == 0
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    code, err = build(tmp_path, capsys, inputs=["in.jsonl"])
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before  # nothing lost
    code, _ = build(tmp_path, capsys, "--overwrite", inputs=["in.jsonl"])
    assert code == 0
