"""`eval-set export`: the eval sets as Hugging Face datasets (Parquet + save_to_disk) that round-trip, and as
lm-evaluation-harness tasks that score a Hugging Face checkpoint exactly as `eval` does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import docs, make_texts, run_cli, write_shard

STEP = 12
SIZES = ("--seen", "6", "--pending", "6", "--held-out", "6")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exportbuild")
    write_shard(folder / "c.jsonl", docs(make_texts(600)))
    config = {"inputs": ["c.jsonl"], "sequence_length": 64, "training": {"global_batch_size": 8, "steps": 30},
              "tasks": [{"name": "mod13", "task": "modular_addition", "params": {"modulus": 13}, "encoding": "tokens",
                         "pool": {"held_out": 0.5}, "schedule": {"kind": "even", "rate": 2}},
                        {"name": "cmp2", "task": "comparison", "params": {"digits": 2}, "schedule": {"kind": "even", "rate": 1}},
                        {"name": "mod7-text", "task": "modular_addition", "params": {"modulus": 7},
                         "schedule": {"kind": "even", "rate": 1}}]}
    (folder / "b.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", folder / "b.yaml", "--out", folder / "build") == 0
    return folder / "build"


@pytest.fixture(scope="module")
def exported(build, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "sets"
    assert run_cli("eval-set", "export", build, "--out", out, "--step", STEP, *SIZES) == 0
    return out


def test_the_exported_sets_are_evals_own_draw_and_round_trip(build, exported):
    import datasets

    from eval.sets import EvalSampler

    items = EvalSampler(build, seen=6, held_out=6, pending=6).items_at(STEP)
    summary = json.loads((exported / "export.json").read_text())
    assert summary["step"] == STEP and set(summary["rows"]) == {"mod13", "cmp2", "mod7-text"}
    for task in summary["rows"]:
        saved = datasets.load_from_disk(str(exported / "hf" / task))
        for split in ("seen", "pending", "held_out"):
            parquet = datasets.load_dataset("parquet", data_files=str(exported / "data" / task / f"{split}.parquet"),
                                            split="train")
            assert parquet.to_list() == saved[split].to_list()
            want = [it for it in items if it.task == task and it.split == split]
            assert summary["rows"][task][split] == len(want) == len(parquet) > 0
            for row, it in zip(parquet, want):
                assert (row["instance"], row["context_ids"], row["candidate_ids"], row["answer_index"]) == \
                    (it.item, it.context, it.candidates, it.correct)
                assert row["first_exposure"] == it.first_exposure and row["exposures"] == len(it.exposure_steps)
                if split == "seen":
                    assert row["first_exposure"] <= STEP and row["exposures_at_step"] >= 1
                elif split == "pending":
                    assert row["first_exposure"] > STEP and row["exposures_at_step"] == 0
                else:
                    assert row["first_exposure"] is None and row["exposures"] == 0
    # lm-eval tasks only for text-encoded tasks (a tokens-encoded prompt has no faithful text form).
    assert sorted(p.stem for p in (exported / "lm_eval").glob("*.yaml")) == sorted(
        ["olmo_inject"] + [f"olmo_inject_{t}_{s}" for t in ("cmp2", "mod7_text") for s in ("seen", "pending", "held_out")])


def test_an_export_never_overwrites(build, exported, capsys):
    assert run_cli("eval-set", "export", build, "--out", exported) == 2
    assert "exists" in capsys.readouterr().err
    assert run_cli("eval-set", "export", build, "--out", exported.with_name("x"), "--step", "31") == 2
    assert "--step: 31 is outside the build's plan" in capsys.readouterr().err


def test_lm_eval_scores_the_exported_tasks_as_eval_does(build, exported, tmp_path):
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM, PreTrainedTokenizerFast

    from inject import tokenizer as tok

    torch.manual_seed(0)
    model_dir = tmp_path / f"hf-step{STEP}"
    config = OlmoConfig(vocab_size=50304, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=256, eos_token_id=50279, pad_token_id=1)
    OlmoForCausalLM(config).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_file=str(tok.get_spec(tok.DEFAULT_TOKENIZER).path), eos_token="<|endoftext|>",
                            pad_token="<|padding|>").save_pretrained(model_dir)

    assert run_cli("eval", model_dir, "--data", build, "--out", tmp_path / "ours", *SIZES) == 0
    ours = {(r["task"], r["split"], r["item"]): r["correct"]
            for r in map(json.loads, (tmp_path / "ours" / f"step{STEP}.jsonl").read_text().splitlines())
            if r["task"] != "mod13"}
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={model_dir},dtype=float32", "--include_path", str(exported / "lm_eval"),
                           "--tasks", "olmo_inject", "--device", "cpu", "--batch_size", "16", "--log_samples",
                           "--output_path", str(tmp_path / "lm")], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = {}
    for samples in (tmp_path / "lm").rglob("samples_olmo_inject_*.jsonl"):
        for line in samples.read_text().splitlines():
            sample = json.loads(line)
            doc = sample["doc"]
            theirs[(doc["task"], doc["split"], doc["instance"])] = bool(sample["acc"])
    rows = json.loads((exported / "export.json").read_text())["rows"]
    assert len(theirs) == len(ours) == sum(n for t in ("cmp2", "mod7-text") for n in rows[t].values()) >= 30
    assert theirs == ours  # the same verdict on every instance, so the same accuracy per split
