"""Eval of OLMo-core checkpoints: a checkpoint saved by OLMo-core's own Checkpointer (a torch distributed checkpoint,
read here in the main environment into transformers' Olmo2ForCausalLM) and the Hugging Face folder OLMo-core's own
converter makes of it give the same scores; its logits equal OLMo-core's own forward pass; a checkpoint whose
metadata pickle would run code is refused.

OLMo-core 3.0.0 runs in its own environment (tests/install-olmo-core.sh); without it these tests skip, and fail
under CI=true."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import docs, make_texts, run_cli, write_shard
from inject.errors import ConfigError
from inject.trainers import olmo_core

MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4}
L, B, STEPS = 64, 8, 40
EMBEDDING_ROWS = 50304  # the neox tokenizer's 50280 tokens padded to a multiple of 128, as OLMo configs do


@pytest.fixture(scope="module")
def olmo_core_python() -> str:
    try:
        return olmo_core.python()
    except ConfigError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """A small build for OLMo-core's order, with a token-encoded and a text-encoded task."""
    folder = tmp_path_factory.mktemp("oc-evalbuild")
    write_shard(folder / "c.jsonl", docs(make_texts(1500)))
    config = {"inputs": ["c.jsonl"], "sequence_length": L,
              "training": {"trainer": "olmo-core", "global_batch_size_tokens": B * L, "steps": STEPS, "seed": 6198},
              "tasks": [{"name": "mod13", "task": "modular_addition", "params": {"modulus": 13}, "encoding": "tokens",
                         "pool": {"held_out": 0.5}, "schedule": {"kind": "even", "rate": 2}},
                        {"name": "cmp4", "task": "comparison", "params": {"digits": 4}, "schedule": {"kind": "even", "rate": 1}}]}
    (folder / "b.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", folder / "b.yaml", "--out", folder / "build") == 0
    return folder / "build"


@pytest.fixture(scope="module")
def run(olmo_core_python, tmp_path_factory) -> Path:
    """An OLMo-core run folder: RUN/config.yaml (the agreed run config) and step1/, step3/ saved by OLMo-core's
    Checkpointer from a seeded model block trained a few AdamW steps (the optimizer state is in the checkpoint)."""
    run = tmp_path_factory.mktemp("oc-run") / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({  # the parts eval reads of what the launcher writes
        "trainer": "olmo-core", "model": {**MODEL, "vocab_size": EMBEDDING_ROWS},
        "data": {"sequence_length": L, "global_batch_size_tokens": B * L, "seed": 6198},
        "tokenizer": {"name": "allenai/gpt-neox-olmo-dolma-v1_5", "vocab_size": 50280, "eos_token_id": 50279,
                      "pad_token_id": 1}}))
    olmo_core.run_child("save-checkpoint", {"run": str(run), "model": MODEL, "vocab_size": EMBEDDING_ROWS, "init_seed": 5,
                                            "steps": [1, 3], "sequence_length": L}, olmo_core_python)
    return run


@pytest.fixture(scope="module")
def converted(run, olmo_core_python, tmp_path_factory) -> Path:
    """step3 converted to a Hugging Face folder by OLMo-core's own converter (with its own logit check; the
    tokenizer the run config names)."""
    out = tmp_path_factory.mktemp("oc-hf") / "converted"
    assert run_cli("convert-checkpoint", run / "step3", "--out", out, "--olmo-core-python", olmo_core_python) == 0
    return out


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in folder.read_text().splitlines()]


def test_a_distributed_checkpoint_and_its_converted_hf_folder_score_the_same(build, run, converted, tmp_path, capsys):
    from eval.checkpoints import find_checkpoints

    assert [(c.step, c.format) for c in find_checkpoints(run)] == [(1, "olmo-core"), (3, "olmo-core")]
    assert json.loads((converted / "config.json").read_text())["architectures"] == ["Olmo2ForCausalLM"]
    assert run_cli("eval", run, "--data", build, "--seen", 20, "--pending", 10, "--held-out", 20) == 0
    assert "evaluated steps [1, 3]" in capsys.readouterr().out
    assert run_cli("eval", converted, "--data", build, "--out", tmp_path / "hf-eval",
                   "--seen", 20, "--pending", 10, "--held-out", 20) == 0
    distributed, hf = rows(run / "eval" / "step3.jsonl"), rows(tmp_path / "hf-eval" / "step3.jsonl")
    assert len(distributed) == len(hf) > 60
    assert {r["split"] for r in hf} >= {"seen", "held_out"}
    where = ("run", "model", "checkpoint_format")  # the folders' names and formats
    assert {r["checkpoint_format"] for r in distributed} == {"olmo-core"} and {r["checkpoint_format"] for r in hf} == {"hf"}
    for ours, theirs in zip(distributed, hf):
        assert {k: v for k, v in ours.items() if not isinstance(v, float) and k not in where} == \
               {k: v for k, v in theirs.items() if not isinstance(v, float) and k not in where}  # items, ranks, accuracies
        for key, value in ours.items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs[key], abs=1e-5), key
    step1 = rows(run / "eval" / "step1.jsonl")
    assert [r["logprob"] for r in step1] != [r["logprob"] for r in distributed]  # each step's own weights


def test_logits_equal_olmo_cores_own_forward_pass(run, olmo_core_python, tmp_path):
    """The name map of the in-process loader: logits of a few token rows against OLMo-core's Transformer."""
    tokens = np.random.default_rng(0).integers(0, 50280, size=(3, 24)).tolist()
    olmo_core.run_child("forward", {"checkpoint": str(run / "step3"), "model": MODEL, "vocab_size": EMBEDDING_ROWS,
                                    "tokens": tokens, "out": str(tmp_path / "logits.npy")}, olmo_core_python)
    theirs = np.load(tmp_path / "logits.npy")
    model, name = olmo_core.read_model(run / "step3")  # every embedding row
    with torch.no_grad():
        ours = model(torch.tensor(tokens)).logits.numpy()
    assert name == "run" and ours.shape == theirs.shape == (3, 24, EMBEDDING_ROWS)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    trimmed, _ = olmo_core.read_model(run / "step3", vocab_size=50280)  # eval's: the tokenizer's rows only
    with torch.no_grad():
        np.testing.assert_array_equal(trimmed(torch.tensor(tokens)).logits.numpy(), ours[..., :50280])


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_metadata_pickle_that_would_run_code_is_refused(build, run, tmp_path, capsys):
    marker = tmp_path / "marker"
    tampered = tmp_path / "run"
    tampered.mkdir()
    shutil.copy(run / "config.yaml", tampered / "config.yaml")
    shutil.copytree(run / "step3", tampered / "step3")
    shutil.copytree(run / "step1", tampered / "step1")
    metadata = tampered / "step3" / "model_and_optim" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    assert run_cli("eval", tampered, "--data", build, "--seen", 5, "--pending", 0, "--held-out", 5) == 2
    captured = capsys.readouterr()
    assert f"{metadata}: refused: loading it needs posix.system," in captured.err
    assert "evaluated steps [1]" in captured.out  # the untouched checkpoint still is
    assert not marker.exists()


def test_half_written_and_foreign_checkpoints_are_named(build, run, tmp_path, capsys):
    half = tmp_path / "run"
    shutil.copytree(run, half, ignore=shutil.ignore_patterns("eval", ".metadata.json"))
    assert run_cli("eval", half / "step3", "--data", build, "--seen", 5, "--pending", 0, "--held-out", 5) == 1
    assert f"{half / 'step3'}: no .metadata.json (a half-written checkpoint?)" in capsys.readouterr().err
    config = yaml.safe_load((half / "config.yaml").read_text())
    (half / "config.yaml").write_text(yaml.safe_dump({**config, "model": {**MODEL, "n_layers": 3}}))
    (half / "step3" / ".metadata.json").write_text("{}")
    assert run_cli("eval", half / "step3", "--data", build, "--seen", 5, "--pending", 0, "--held-out", 5) == 1
    assert "the checkpoint has 2 blocks, model.n_layers is 3" in capsys.readouterr().err
    (half / "config.yaml").write_text(yaml.safe_dump({**config, "model": {"d_model": 64, "n_layers": 2}}))
    assert run_cli("eval", half / "step3", "--data", build, "--seen", 5, "--pending", 0, "--held-out", 5) == 1
    assert "config.yaml: model.n_heads: expected a positive integer, got None" in capsys.readouterr().err


def test_convert_checkpoint_refuses_a_folder_that_is_not_a_checkpoint_and_an_existing_output(run, tmp_path, capsys):
    assert run_cli("convert-checkpoint", tmp_path, "--out", tmp_path / "hf") == 2
    assert f"{tmp_path}: not an OLMo-core checkpoint" in capsys.readouterr().err
    (tmp_path / "hf").mkdir()
    assert run_cli("convert-checkpoint", run / "step1", "--out", tmp_path / "hf") == 2
    assert f"{tmp_path / 'hf'}: exists" in capsys.readouterr().err
    assert list((tmp_path / "hf").iterdir()) == [] and not (tmp_path / "hf.partial").exists()


def test_the_analyses_read_an_olmo_core_checkpoint(build, run, tmp_path):
    """Probes (hidden states per layer) and gradient interference (per-parameter gradients, the first MLP's
    neurons) run on the in-process OLMo-core model like on any transformers model."""
    assert run_cli("analyze", "probe", run / "step3", "--data", build, "--out", tmp_path / "probe",
                   "--seen", 30, "--held-out", 20) == 0
    probes = (tmp_path / "probe" / "probe.csv").read_text().splitlines()
    assert len(probes) > 1 and all(line.startswith("run,run,") for line in probes[1:])
    assert {line.split(",")[12] for line in probes[1:]} == {"0", "1", "2"}  # embeddings and both blocks
    assert run_cli("analyze", "interference", run / "step3", "--data", build, "--out", tmp_path / "interference",
                   "--n-task", 8, "--n-dolma", 4, "--batch-instances", 4, "--top-neurons", 4) == 0
    layers = (tmp_path / "interference").glob("*.csv")
    assert any("block0.mlp.top4" in path.read_text() for path in layers)
