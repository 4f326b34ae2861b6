"""The settings that fix OLMo's data order travel with the build: olmo-data.yaml carries every one of them
(a TrainConfig merged with it alone reads the planned batches), and `train` refuses a config or override
that would make a step read another batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import docs, make_texts, run_cli, write_shard
from test_train import TINY, step_indices
from inject.trainers.ai2_olmo import order_fields
from inject.injection import olmo_order
from inject.ledger import read_ledger

# Every order setting differs from OLMo's defaults and from tiny.yaml's (seed 6198, batch 32, length 256).
TRAINING = {"global_batch_size": 8, "steps": 6, "seed": 7, "drop_last": True}


@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("order")
    write_shard(work / "corpus" / "a.jsonl", docs(make_texts(400, seed=3)))
    config = {"inputs": [str(work / "corpus")], "sequence_length": 64, "training": TRAINING,
              "tasks": [{"name": "mod97", "task": "modular_addition", "params": {"modulus": 97}, "encoding": "tokens",
                         "schedule": {"kind": "even", "rate": 2}}]}
    (work / "build.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", work / "build.yaml", "--out", work / "build") == 0
    return work / "build"


def merged(base: dict, fragment: dict) -> dict:
    """`fragment` laid over `base`, key by key (what a user does with olmo-data.yaml)."""
    out = dict(base)
    for key, value in fragment.items():
        out[key] = merged(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def test_olmo_data_block_carries_every_order_field(small_build):
    block = yaml.safe_load((small_build / "olmo-data.yaml").read_text())
    fields = order_fields(64, TRAINING)
    assert set(fields) >= {"data.seed", "global_train_batch_size", "data.drop_last", "model.max_sequence_length", "epoch"}
    for name, value in fields.items():
        node = block
        for part in name.split("."):
            node = node[part]
        assert node == value, name


def test_a_config_merged_with_the_data_block_alone_trains_on_the_planned_batches(small_build, tmp_path):
    config = merged(yaml.safe_load(TINY.read_text()), yaml.safe_load((small_build / "olmo-data.yaml").read_text()))
    config["max_duration"] = 2
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("train", tmp_path / "train.yaml", "--data", small_build, "--run", tmp_path / "run") == 0
    manifest = json.loads((small_build / "manifest.json").read_text())
    order = olmo_order(manifest["injection"]["num_instances"], 8, 7, True)
    indices = step_indices(tmp_path / "run")
    assert indices == {step: order[(step - 1) * 8 : step * 8].tolist() for step in (1, 2)}
    ledger = read_ledger(small_build)
    for step in (1, 2):  # the examples planned for a step are in the instances the trainer read at that step
        planned = ledger["instance"][ledger["step"] == step]
        assert len(planned) == 2 and set(planned.tolist()) <= set(indices[step])


@pytest.mark.parametrize("override, message", [
    ("--epoch=1", "epoch is 1"),
    ("--fast_forward_batches=3", "fast_forward_batches is 3"),
    ("--restore_dataloader=false", "restore_dataloader is False"),
    ("--data.seed=8", "data.seed (or seed) is 8"),
    ("--data.drop_last=false", "data.drop_last is False"),
])
def test_train_refuses_an_override_that_changes_which_batch_a_step_reads(small_build, tmp_path, capsys, override, message):
    config = merged(yaml.safe_load(TINY.read_text()), yaml.safe_load((small_build / "olmo-data.yaml").read_text()))
    config["max_duration"] = 2
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("train", tmp_path / "train.yaml", "--data", small_build, "--run", tmp_path / "run", override) == 2
    err = capsys.readouterr().err
    assert message in err and "decide which instances each step reads" in err, err
    assert not (tmp_path / "run").exists()
