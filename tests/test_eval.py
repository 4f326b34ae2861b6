"""Checkpoint evaluation: exact scores, chance for an untrained model, incremental runs, bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import docs, make_texts, run_cli, write_shard

TINY = Path(__file__).parent.parent / "olmo_configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("evalbuild")
    write_shard(folder / "c.jsonl", docs(make_texts(1500)))
    config = {"inputs": ["c.jsonl"], "sequence_length": 64, "training": {"global_batch_size": 8, "steps": 60},
              "tasks": [{"name": "mod13", "task": "modular_addition", "params": {"modulus": 13}, "encoding": "tokens",
                         "pool": {"held_out": 0.5}, "schedule": {"kind": "even", "rate": 2}},
                        {"name": "cmp2", "task": "comparison", "params": {"digits": 2}, "schedule": {"kind": "even", "rate": 1}},
                        {"name": "cmp4", "task": "comparison", "params": {"digits": 4},
                         "schedule": {"kind": "even", "rate": 0.5}}]}
    (folder / "b.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", folder / "b.yaml", "--out", folder / "build") == 0
    return folder / "build"


def save_checkpoint(folder: Path, seed: int) -> None:
    """An untrained tiny model in ai2-olmo's unsharded checkpoint format (config.yaml + model.pt)."""
    from olmo.config import TrainConfig
    from olmo.model import OLMo

    cfg = TrainConfig.load(TINY)
    cfg.model.init_device = "cpu"
    torch.manual_seed(seed)
    model = OLMo(cfg.model)
    model.reset_parameters()
    folder.mkdir(parents=True)
    cfg.save(folder / "config.yaml")
    torch.save(model.state_dict(), folder / "model.pt")


def test_scores_equal_a_direct_computation_and_an_untrained_model_is_at_chance(build, tmp_path):
    from eval.run import load_checkpoint
    from eval.score import score_items
    from eval.sets import build_eval_set

    save_checkpoint(tmp_path / "run" / "step0-unsharded", seed=0)
    manifest = json.loads((build / "manifest.json").read_text())
    model = load_checkpoint(tmp_path / "run" / "step0-unsharded", manifest, "cpu")
    items = build_eval_set(build, seen=60, held_out=60)
    results = score_items(model, items, pad=1, batch_size=16)
    assert {it.task for it in items} == {"mod13", "cmp2", "cmp4"}
    multi = [i for i, it in enumerate(items) if any(len(c) > 1 for c in it.candidates)]
    assert multi  # 4-digit answers are two tokens: the multi-token path
    for i in [0, 1, 70, 130, *multi[:3]]:
        it, result = items[i], results[i]
        direct = []
        for cand in it.candidates:  # one unpadded forward per candidate
            x = torch.tensor([it.context + cand])
            with torch.no_grad():
                logp = torch.log_softmax(model(x).logits[0].float(), -1)
            direct.append(sum(float(logp[len(it.context) - 1 + k, t]) for k, t in enumerate(cand)))
        assert result["logprob"] == pytest.approx(direct[it.correct], abs=1e-4)
        assert result["rank"] == 1 + sum(d > direct[it.correct] + 1e-6 for d in direct)
    from eval.score import wilson_interval

    mod = [r for r in results if r["task"] == "mod13"]
    low, high = wilson_interval(sum(r["correct"] for r in mod), len(mod))
    assert low <= 1 / 13 <= high and len(mod) == 120


def test_eval_is_incremental_and_reports_bad_checkpoints(build, tmp_path, capsys):
    run = tmp_path / "run"
    save_checkpoint(run / "step0-unsharded", seed=0)
    assert run_cli("eval", run, "--data", build, "--seen", 10, "--held-out", 10) == 0
    assert "evaluated steps [0]" in capsys.readouterr().out
    save_checkpoint(run / "step5-unsharded", seed=1)
    (run / "step7-unsharded").mkdir()  # half-written
    (run / "step9-unsharded").mkdir()
    (run / "step9-unsharded" / "config.yaml").write_text((run / "step0-unsharded" / "config.yaml").read_text())
    (run / "step9-unsharded" / "model.pt").write_bytes(b"not a checkpoint")
    assert run_cli("eval", run, "--data", build, "--seen", 10, "--held-out", 10) == 1
    captured = capsys.readouterr()
    assert "evaluated steps [5]; already done [0]" in captured.out
    assert "step7-unsharded: no config.yaml" in captured.err and "step9-unsharded: cannot load model.pt" in captured.err
    rows = [json.loads(l) for l in (run / "eval" / "step5.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and {r["split"] for r in rows} == {"seen", "held_out"}
    seen = [r for r in rows if r["split"] == "seen"]
    assert all(r["exposures"] >= 0 for r in seen) and any(r["exposures"] > 0 for r in seen)
    summary = (run / "eval" / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("step,task,split,n,accuracy,ci_low,ci_high") and len(summary) == 1 + 2 * 3 * 2
