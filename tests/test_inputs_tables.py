"""Parquet shards and `datasets.save_to_disk` folders as inputs: the same documents build the same tokens as
JSON lines, bad rows are counted like bad lines, and a missing or non-string text column is refused naming
the file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import docs, make_texts, run_cli, write_config, write_shard
from inject.build import MANIFEST
from inject.sources import expand_inputs

TEXTS = make_texts(300, seed=3)
EXAMPLE = {"sequence_length": 64, "instances_per_file": 16}


def write_parquet(path, texts, field="text", row_group_size=70, id_field="id"):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({id_field: [f"p{i}" for i in range(len(texts))], field: texts})
    pq.write_table(table, path, row_group_size=row_group_size)  # several row groups: read batch by batch
    return path


def write_saved_dataset(folder, texts, shards=3):
    import datasets

    datasets.Dataset.from_dict({"id": [f"s{i}" for i in range(len(texts))], "text": texts}).save_to_disk(
        str(folder), num_shards=shards)
    return folder


def build(tmp_path, name, inputs, **extra):
    cfg = write_config(tmp_path / f"{name}.yaml", inputs=inputs, **EXAMPLE, **extra)
    out = tmp_path / f"out-{name}"
    assert run_cli("build", cfg, "--out", out) == 0
    return out


def token_files(out):
    return {p.name: p.read_bytes() for p in sorted((out / "data").glob("*.npy"))}


def test_parquet_and_saved_datasets_build_the_same_tokens_as_json_lines(tmp_path):
    write_shard(tmp_path / "jsonl" / "a.jsonl", docs(TEXTS[:200]))
    write_shard(tmp_path / "jsonl" / "b.jsonl.gz", docs(TEXTS[200:]))
    write_parquet(tmp_path / "parquet" / "a.parquet", TEXTS[:200])
    write_parquet(tmp_path / "parquet" / "b.parquet", TEXTS[200:])
    saved = write_saved_dataset(tmp_path / "saved", TEXTS)
    # save_to_disk's shards are read in the dataset's order (state.json), whatever the folder listing says.
    assert [p.name for p in expand_inputs([str(saved)])] == [
        e["filename"] for e in json.loads((saved / "state.json").read_text())["_data_files"]]

    reference = token_files(build(tmp_path, "jsonl", ["jsonl"]))
    assert len(reference) >= 2
    assert token_files(build(tmp_path, "parquet", ["parquet"])) == reference
    assert token_files(build(tmp_path, "saved", ["saved"])) == reference
    # Mixed in one folder: Parquet and JSON lines by path order.
    write_parquet(tmp_path / "mixed" / "a.parquet", TEXTS[:200])
    write_shard(tmp_path / "mixed" / "b.jsonl.gz", docs(TEXTS[200:]))
    out = build(tmp_path, "mixed", ["mixed"])
    assert token_files(out) == reference
    inputs = json.loads((out / MANIFEST).read_text())["inputs"]
    assert [(i["kind"], i["documents"]) for i in inputs] == [("parquet", 200), ("dolma", 100)]
    assert all(len(i["sha256"]) == 64 for i in inputs)


def test_bad_rows_are_counted_like_bad_lines_and_text_field_names_the_column(tmp_path):
    texts = TEXTS[:50] + [None, ""] + TEXTS[50:100]
    write_parquet(tmp_path / "p" / "a.parquet", texts, field="content", row_group_size=20, id_field="doc")
    out = build(tmp_path, "p", ["p"], text_field="content", id_field="doc")
    [record] = json.loads((out / MANIFEST).read_text())["inputs"]
    assert record["documents"] == 100
    assert record["problem_counts"] == {"missing_text": 1, "empty_text": 1}
    problems = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [(p["file"], p["line"], p["kind"]) for p in problems] == [
        (str(tmp_path / "p" / "a.parquet"), 51, "missing_text"), (str(tmp_path / "p" / "a.parquet"), 52, "empty_text")]
    assert [p["message"] for p in problems] == ["row 51: 'content' is null (doc 'p50')",
                                                "row 52: 'content' is empty (doc 'p51')"]
    # The same documents as JSON lines with the same field name build the same tokens.
    write_shard(tmp_path / "j" / "a.jsonl", [{"content": t} for t in TEXTS[:100]])
    assert token_files(build(tmp_path, "j", ["j"], text_field="content")) == token_files(out)


@pytest.mark.parametrize("table, message", [
    (pa.table({"body": ["some text here"] * 3}), "no column 'text' (text_field); its columns: body"),
    (pa.table({"text": [1, 2, 3]}), "column 'text' (text_field) holds int64, expected strings"),
])
def test_a_missing_or_non_string_text_column_is_refused_naming_the_file(tmp_path, capsys, table, message):
    path = tmp_path / "in" / "a.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    cfg = write_config(tmp_path / "b.yaml", inputs=["in"], **EXAMPLE)
    assert run_cli("build", cfg, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_damaged_parquet_file_is_refused_naming_it(tmp_path, capsys):
    path = write_parquet(tmp_path / "in" / "a.parquet", TEXTS)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cfg = write_config(tmp_path / "b.yaml", inputs=["in"], **EXAMPLE)
    assert run_cli("build", cfg, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "parquet" in err and "Traceback" not in err
