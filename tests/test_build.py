"""The base build: token files that OLMo reads, with the texts back, counts right, deterministic, resumable."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from olmo.data import MemMapDataset
from olmo.tokenizer import Tokenizer

from inject import tokenizer as tok
from inject.build import MANIFEST, partial_dir
from conftest import run_cli, write_config


def read_outputs(build: Path) -> tuple[dict, np.ndarray]:
    manifest = json.loads((build / MANIFEST).read_text())
    tokens = np.concatenate([np.fromfile(build / f["path"], dtype=manifest["dtype"]) for f in manifest["outputs"]])
    return manifest, tokens


def split_documents(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eos)
    return np.split(tokens, ends + 1)[:-1]


def digest(build: Path) -> dict:
    return {str(p.relative_to(build)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(build.rglob("*")) if p.is_file() and p.name != "olmo-data.yaml"}


@pytest.mark.parametrize("name", ["allenai/gpt-neox-olmo-dolma-v1_5", "allenai/dolma2-tokenizer"])
def test_build_gives_back_texts_in_order_with_olmo_token_ids(tmp_path, corpus, name):
    folder, texts = corpus
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], tokenizer=name, sequence_length=64,
                       instances_per_file=7)
    assert run_cli("build", cfg, "--out", tmp_path / "out") == 0
    manifest, tokens = read_outputs(tmp_path / "out")
    spec = tok.get_spec(name)
    assert tokens.dtype == np.dtype(spec.dtype)
    # An independent OLMo tokenizer, built here from the wheel's file, gives exactly the same ids.
    olmo_tok = Tokenizer.from_file(spec.path, eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id)
    expected = np.concatenate([np.array(olmo_tok.encode(t), dtype=spec.dtype) for t in texts])
    assert np.array_equal(tokens, expected)
    documents = split_documents(tokens, spec.eos_token_id)
    assert len(documents) == len(texts) == manifest["counts"]["documents"]
    for doc, text in zip(documents, texts):
        assert doc[-1] == spec.eos_token_id and spec.eos_token_id not in doc[:-1]
        assert olmo_tok.decode(doc.tolist()) == olmo_tok.decode(olmo_tok.encode(text))
    assert manifest["counts"]["tokens"] == len(tokens) == manifest["counts"]["input_tokens"]
    assert [i["documents"] for i in manifest["inputs"]] == [100, 100, 100, 100]
    assert [i["compression"] for i in manifest["inputs"]] == ["gzip", "zstd", "plain", "zstd"]


ODD_TEMPLATES = ["Which is larger, {} or {}?", "{} + {} mod 97 =", "{}{}?", "Compare  {}\n\n{} ->", "Größer: {} oder {}",
                 "{}'s or {}'t", "x {}.{}", "e\u0301 {} vs {}", "<|extra_id_1|> {} {}", "{}  {}"]


@pytest.mark.parametrize("name", sorted(tok.TOKENIZERS))
def test_prompts_encoded_by_shape_have_olmo_token_ids(name):
    """encode_digit_variants (pre-tokens found once per shape of text, BPE once per distinct pre-token) gives
    OLMo's ids text for text, on a task's templates and on templates made to break it (adjacent numbers, runs
    of whitespace, newlines, non-ASCII, contractions, text NFC changes, added tokens)."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 100_000, 400) // 10 ** rng.integers(0, 5, 400), rng.integers(0, 1000, 400)
    texts = [template.format(x, y) for template in ODD_TEMPLATES for x, y in zip(a.tolist(), b.tolist())]
    spec = tok.get_spec(name)
    olmo_tok = Tokenizer.from_file(spec.path, eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id)
    assert tok.encode_digit_variants(name, texts) == olmo_tok.encode_batch(texts, add_special_tokens=False)
    # The shortcut is taken where the pipeline only splits and runs BPE, and refused where it does more: an added
    # token in the text (`<|extra_id_1|>` of dolma2, the GPT-NeoX runs of spaces), text that NFC changes.
    base = tok.load_base(name)
    added = [token.content for token in base.get_added_tokens_decoder().values()]
    refused = 0
    for template in ODD_TEMPLATES:
        shaped = [template.format(x, 100 + x) for x in range(100, 200)]
        special = any(token in shaped[0] for token in added) or (
            base.normalizer is not None and base.normalizer.normalize_str(shaped[0]) != shaped[0])
        by_shape = tok._encode_shape(name, shaped, template.format("000", "000"))
        assert by_shape == (None if special else olmo_tok.encode_batch(shaped, add_special_tokens=False)), template
        refused += special
    assert refused >= 1


def test_olmo_memmap_dataset_yields_the_manifest_instances(tmp_path, corpus):
    folder, _ = corpus
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], sequence_length=50, instances_per_file=9)
    assert run_cli("build", cfg, "--out", tmp_path / "out") == 0
    manifest, tokens = read_outputs(tmp_path / "out")
    block = __import__("yaml").safe_load((tmp_path / "out" / "olmo-data.yaml").read_text())
    dataset = MemMapDataset(*block["data"]["paths"], chunk_size=50, memmap_dtype=np.uint16)
    assert len(dataset) == manifest["counts"]["instances"] == len(tokens) // 50
    assert len(manifest["outputs"]) > 1 and all(f["instances"] == 9 for f in manifest["outputs"][:-1])
    # Instance i of OLMo's dataset is tokens[i*L:(i+1)*L] of the concatenated stream.
    for i in (0, 8, 9, len(dataset) - 1):
        assert np.array_equal(dataset[i]["input_ids"].numpy(), tokens[i * 50 : (i + 1) * 50])
    assert manifest["counts"]["tail_tokens"] == len(tokens) - 50 * len(dataset)
    for f in manifest["outputs"]:
        data = (tmp_path / "out" / f["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["size_bytes"]


def test_one_and_two_workers_are_byte_identical(tmp_path, corpus):
    folder, _ = corpus
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], sequence_length=32, instances_per_file=16)
    assert run_cli("build", cfg, "--out", tmp_path / "w1", "--workers", 1) == 0
    assert run_cli("build", cfg, "--out", tmp_path / "w2", "--workers", 2) == 0
    assert digest(tmp_path / "w1") == digest(tmp_path / "w2")


def test_killed_build_resumes_to_identical_output(tmp_path, corpus):
    folder, _ = corpus
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], sequence_length=32, instances_per_file=16)
    assert run_cli("build", cfg, "--out", tmp_path / "full") == 0
    command = [sys.executable, "-m", "inject.cli", "build", str(cfg), "--out", str(tmp_path / "out")]
    killed = subprocess.run(command, env={**os.environ, "OLMO_INJECT_CRASH_AFTER_INPUTS": "2"}, capture_output=True)
    assert killed.returncode == -9
    assert not (tmp_path / "out").exists()  # nothing that looks finished
    work = partial_dir(tmp_path / "out") / ".work"
    assert len(list(work.glob("*.done.json"))) == 2
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert digest(tmp_path / "full") == digest(tmp_path / "out")
    assert not partial_dir(tmp_path / "out").exists()


def test_pretokenized_token_files_are_a_source(tmp_path, corpus):
    folder, texts = corpus
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], sequence_length=32)
    assert run_cli("build", cfg, "--out", tmp_path / "text") == 0
    _, tokens = read_outputs(tmp_path / "text")
    # OLMo's preprocessed files: headerless uint16 memmaps named .npy; one more with a NumPy header.
    tokens[:1000].tofile(tmp_path / "part-0.npy")
    np.save(tmp_path / "part-1.npy", tokens[1000:])
    cfg = write_config(tmp_path / "t.yaml", inputs=["part-*.npy"], sequence_length=32)
    assert run_cli("build", cfg, "--out", tmp_path / "tok") == 0
    manifest, again = read_outputs(tmp_path / "tok")
    assert np.array_equal(again, tokens)
    assert manifest["counts"]["documents"] == len(texts)
    assert [i["kind"] for i in manifest["inputs"]] == ["tokens", "tokens"]


def test_more_inputs_than_open_files_allowed(tmp_path):
    """A build reads thousands of shards: it holds a bounded number of input files open (memory maps held one
    descriptor each), so a build of more inputs than the open-files limit works."""
    import resource

    from inject.stream import TokenFile

    n = TokenFile.MAX_OPEN + 40
    for i in range(n):
        np.array([i + 2, i + 3, 50279], dtype=np.uint16).tofile(tmp_path / f"t{i:03d}.npy")
    cfg = write_config(tmp_path / "t.yaml", inputs=["t*.npy"], sequence_length=4)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + TokenFile.MAX_OPEN + 24, hard))
    try:
        assert run_cli("build", cfg, "--out", tmp_path / "out") == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    _, tokens = read_outputs(tmp_path / "out")
    assert tokens.tolist() == [t for i in range(n) for t in (i + 2, i + 3, 50279)]


def test_compression_is_detected_from_content_not_name(tmp_path):
    from conftest import docs, make_texts, write_shard

    texts = make_texts(20)
    write_shard(tmp_path / "in" / "mislabeled.jsonl", docs(texts[:10]), compression="gzip")
    write_shard(tmp_path / "in" / "other.json.gz", docs(texts[10:]), compression="zstd")
    cfg = write_config(tmp_path / "b.yaml", inputs=["in/*"], sequence_length=16)
    assert run_cli("build", cfg, "--out", tmp_path / "out") == 0
    manifest, _ = read_outputs(tmp_path / "out")
    assert [i["compression"] for i in manifest["inputs"]] == ["gzip", "zstd"]
    assert manifest["counts"]["documents"] == 20


def test_sample_corpus_is_deterministic_mixed_and_large_enough(tmp_path):
    assert run_cli("sample-corpus", tmp_path / "a", "--shards", 5) == 0
    assert run_cli("sample-corpus", tmp_path / "b", "--shards", 5) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {n.split(".", 1)[1] for n in names} >= {"json.gz", "jsonl.zst", "parquet"}
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    cfg = write_config(tmp_path / "b.yaml", inputs=["a/"], sequence_length=256, instances_per_file=100000)
    assert run_cli("build", cfg, "--out", tmp_path / "out", "--workers", 2) == 0
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["counts"]["tokens"] >= 2_000_000
    assert manifest["counts"]["problems"] == 0
    assert [i["kind"] for i in manifest["inputs"]] == ["dolma"] * 4 + ["parquet"]
    first = json.loads(__import__("gzip").open(tmp_path / "a" / names[0]).readline())
    assert set(first) == {"id", "text", "source", "added", "created", "metadata"}


def test_help_explains_every_command(capsys):
    from inject.cli import verbs

    # The other packages' verbs come through the `olmo_inject.verbs` entry points: all of them must be there.
    assert {"demo", "eval", "eval-set", "report", "analyze", "toy", "ladder", "slurm", "build", "verify", "train"} <= set(verbs())
    for command in [[], *([c] for c in verbs())]:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*command, "--help")
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out and len(out) > 150
