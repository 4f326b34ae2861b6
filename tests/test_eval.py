"""Checkpoint evaluation: exact scores, chance for an untrained model, incremental runs, bad checkpoints."""

from __future__ import annotations

import csv
import json
import shutil
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
    assert "step7-unsharded: no config.yaml" in captured.err
    assert "step9-unsharded: cannot load the unsharded weights" in captured.err
    rows = [json.loads(l) for l in (run / "eval" / "step5.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and {r["split"] for r in rows} == {"seen", "held_out"}
    seen = [r for r in rows if r["split"] == "seen"]
    assert all(r["exposures"] >= 0 for r in seen) and any(r["exposures"] > 0 for r in seen)
    assert {r["model"] for r in rows} == {"tiny"} and rows[0]["tokens"] == 5 * 8 * 64
    with open(run / "eval" / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    overall = [r for r in summary if r["exposures"] == "all"]
    assert len(overall) == 2 * 3 * 2  # steps x tasks x splits
    for r in overall:
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]) and int(r["n"]) == 10
    buckets = [r for r in summary if r["exposures"] != "all"]
    assert buckets and all(r["split"] == "seen" for r in buckets)
    for (step, task) in {(r["step"], r["task"]) for r in buckets}:  # the buckets partition the seen instances
        assert sum(int(r["n"]) for r in buckets if (r["step"], r["task"]) == (step, task)) == 10

    (run / "step11-unsharded").mkdir()  # a model for another tokenizer
    config = yaml.safe_load((run / "step0-unsharded" / "config.yaml").read_text())
    config["model"]["vocab_size"] = 1000
    (run / "step11-unsharded" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "step11-unsharded" / "model.pt").write_bytes(b"")
    assert run_cli("eval", run, "--data", build, "--seen", 10, "--held-out", 10) == 1
    assert "step11-unsharded: vocabulary 1000" in capsys.readouterr().err

    assert run_cli("eval", run, "--data", build, "--seen", 20, "--held-out", 10) == 2  # other settings: refused
    assert "seen differ" in capsys.readouterr().err


def memorize(model, items, steps: int = 400) -> None:
    """Train on the items' prompts and right answers (loss on the answer tokens only) until every one is
    learned: a model that knows the answers."""
    sequences = [it.context + it.candidates[it.correct] for it in items]
    length = max(map(len, sequences))
    x = torch.full((len(sequences), length), 1, dtype=torch.long)
    target = torch.full_like(x, -100)
    for i, (it, s) in enumerate(zip(items, sequences)):
        x[i, : len(s)] = torch.tensor(s)
        target[i, len(it.context) - 1 : len(s) - 1] = torch.tensor(it.candidates[it.correct])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1).float(), target.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    model.eval()


@pytest.fixture(scope="module")
def memorized_run(build, tmp_path_factory) -> Path:
    """A run whose step-100 checkpoint knows the answers of the eval set's seen instances, saved in all
    three formats: ai2-olmo unsharded, sharded (torch distributed checkpoint) and hf_olmo."""
    import torch.distributed.checkpoint as dcp
    from hf_olmo.convert_olmo_to_hf import convert_checkpoint

    from eval.run import load_checkpoint
    from eval.sets import build_eval_set

    run = tmp_path_factory.mktemp("memorized") / "run"
    save_checkpoint(run / "step0-unsharded", seed=0)
    manifest = json.loads((build / "manifest.json").read_text())
    model = load_checkpoint(run / "step0-unsharded", manifest)
    memorize(model, [it for it in build_eval_set(build, seen=15, held_out=0) if it.split == "seen"])
    unsharded = run / "step100-unsharded"
    unsharded.mkdir()
    shutil.copy(run / "step0-unsharded" / "config.yaml", unsharded)
    torch.save(model.state_dict(), unsharded / "model.pt")
    sharded = run.parent / "formats" / "step100"
    sharded.mkdir(parents=True)
    shutil.copy(unsharded / "config.yaml", sharded)
    dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(str(sharded / "model_and_optim")),
             no_dist=True)
    hf = run.parent / "formats" / "step100-hf"
    shutil.copytree(unsharded, hf)
    convert_checkpoint(str(hf), ignore_olmo_compatibility=True)  # ai2-olmo's own converter
    return run


def test_a_model_that_knows_the_answers_scores_one_in_every_checkpoint_format(build, memorized_run):
    from eval.run import evaluate, read_results

    assert evaluate(memorized_run, build, seen=15, held_out=15).failed == []
    rows = [r for r in read_results(memorized_run / "eval") if r["step"] == 100]
    seen = [r for r in rows if r["split"] == "seen"]
    assert len(seen) == 45 and all(r["correct"] and r["greedy_exact"] and r["rank"] == 1 for r in seen)
    untrained = [r for r in read_results(memorized_run / "eval") if r["step"] == 0 and r["split"] == "seen"]
    assert sum(r["correct"] for r in untrained) < 40  # the step-0 checkpoint does not
    formats = memorized_run.parent / "formats"
    for folder, fmt in ((formats / "step100", "sharded"), (formats / "step100-hf", "hf")):
        out = formats / f"eval-{fmt}"
        assert (folder / "config.json").exists() == (fmt == "hf")
        assert evaluate(folder, build, out_dir=out, seen=15, held_out=15).failed == []
        other = read_results(out)
        assert {r["checkpoint_format"] for r in other} == {fmt}
        assert [(r["task"], r["item"], r["correct"]) for r in other] == [(r["task"], r["item"], r["correct"]) for r in rows]
        assert [r["logprob"] for r in other] == pytest.approx([r["logprob"] for r in rows], abs=1e-4)


def test_a_transformers_olmo_model_scores_like_a_direct_forward_pass(build, tmp_path):
    from transformers import OlmoConfig, OlmoForCausalLM

    from eval.checkpoints import find_checkpoints, load_model
    from eval.score import score_items
    from eval.sets import build_eval_set

    torch.manual_seed(0)
    config = OlmoConfig(vocab_size=50304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=256, eos_token_id=50279, pad_token_id=1)
    OlmoForCausalLM(config).save_pretrained(tmp_path / "hf-step3")
    manifest = json.loads((build / "manifest.json").read_text())
    [checkpoint] = find_checkpoints(tmp_path / "hf-step3")
    assert (checkpoint.step, checkpoint.format) == (3, "hf")
    model = load_model(checkpoint, manifest).model
    items = build_eval_set(build, seen=5, held_out=5)
    multi = [it for it in items if any(len(c) > 1 for c in it.candidates)]
    results = score_items(model, items, pad=1, batch_size=4)
    for it, result in zip(items, results):
        if it in multi[:2] or it is items[0]:
            direct = []
            for cand in it.candidates:
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([it.context + cand])).logits[0].float(), -1)
                direct.append(sum(float(logp[len(it.context) - 1 + k, t]) for k, t in enumerate(cand)))
            assert result["logprob"] == pytest.approx(direct[it.correct], abs=1e-4)


def test_unseen_templates_ask_the_same_instances_in_new_phrasings(build):
    from inject import tokenizer as tok
    from eval.sets import build_eval_set

    plain = build_eval_set(build, seen=8, held_out=8)
    both = build_eval_set(build, seen=8, held_out=8, unseen_templates=True)
    assert [(i.task, i.item) for i in both if i.format == "training"] == [(i.task, i.item) for i in plain]
    unseen = [i for i in both if i.format == "unseen_template"]
    assert {i.task for i in unseen} == {"cmp2", "cmp4"}  # text tasks only; mod13 is token-encoded
    tokenizer = tok.load(json.loads((build / "manifest.json").read_text())["tokenizer"]["name"])
    for it in unseen[:6]:
        text = tokenizer.decode(it.context[1:])
        assert "Which is larger" not in text and ("larger number is" in text or text.startswith("max("))
        answer = tokenizer.decode(it.candidates[it.correct]).strip()
        assert answer in text  # comparison: the answer is one of the two numbers in the prompt


def test_report_writes_readable_plots_and_a_summary(build, memorized_run, tmp_path):
    import matplotlib.image

    from eval.run import evaluate

    assert evaluate(memorized_run, build, seen=15, held_out=15).failed == []
    untrained = tmp_path / "small-run"
    save_checkpoint(untrained / "step0-unsharded", seed=3)
    save_checkpoint(untrained / "step50-unsharded", seed=4)
    assert run_cli("eval", untrained, "--data", build, "--seen", 15, "--held-out", 15) == 0
    for run in (memorized_run, untrained):  # the report also draws the mechanism analyses it finds
        assert run_cli("analyze", "probe", run, "--data", build, "--seen", 40, "--held-out", 20) == 0
    assert run_cli("report", memorized_run, untrained, "--out", tmp_path / "report") == 0
    for name in ("accuracy_vs_tokens.png", "memorization_vs_generalization.png", "retention.png", "heatmap.png",
                 "probe_vs_step.png", "probe_by_layer.png"):
        image = matplotlib.image.imread(tmp_path / "report" / name)
        assert image.shape[0] >= 300 and image.shape[1] >= 400, name
        assert image[..., :3].std() > 0.05, f"{name} is blank"
        assert (image[..., :3] < 0.5).mean() > 0.005, f"{name} has no lines or text"
    with open(tmp_path / "report" / "results.csv") as f:
        table = list(csv.DictReader(f))
    models = {r["model"] for r in table}
    assert models == {"tiny (run)", "tiny (small-run)"}  # one model config, two runs: told apart
    final = [r for r in table if r["step"] == "100" and r["split"] == "seen" and r["exposures"] == "all"]
    assert final and all(float(r["accuracy"]) == 1.0 for r in final)
    page = (tmp_path / "report" / "summary.html").read_text()
    assert page.count("<img") == 6 and "tiny (small-run)" in page and "Mechanism analyses" in page
    assert "| tiny (run) | 100 |" in (tmp_path / "report" / "summary.md").read_text()


def test_a_build_without_its_ledger_is_named(build, tmp_path, capsys):
    broken = tmp_path / "build"
    shutil.copytree(build, broken)
    (broken / "ledger.npy").unlink()
    save_checkpoint(tmp_path / "run" / "step0-unsharded", seed=0)
    assert run_cli("eval", tmp_path / "run", "--data", broken) == 2
    assert f"{broken}: no ledger.npy" in capsys.readouterr().err


def test_sharded_checkpoints_of_a_real_fsdp_run_score_like_its_unsharded_one(build, tmp_path):
    """ai2-olmo's trainer under FSDP (gloo, on CPU) saves `torch_legacy` sharded checkpoints (rank0.pt);
    eval unshards them with ai2-olmo's own checkpointer."""
    from eval.run import evaluate, read_results

    run = tmp_path / "run"
    assert run_cli("train", TINY, "--data", build, "--run", run, "--distributed_strategy=fsdp", "--max_duration=3",
                   "--global_train_batch_size=8", "--device_train_microbatch_size=8", "--model.max_sequence_length=64") == 0
    assert (run / "step3" / "rank0.pt").exists() and (run / "step3-unsharded" / "model.pt").exists()
    assert evaluate(run / "step3", build, out_dir=tmp_path / "sharded", seen=10, held_out=10).failed == []
    assert evaluate(run / "step3-unsharded", build, out_dir=tmp_path / "unsharded", seen=10, held_out=10).failed == []
    sharded, unsharded = read_results(tmp_path / "sharded"), read_results(tmp_path / "unsharded")
    assert {r["checkpoint_format"] for r in sharded} == {"sharded"}
    assert [r["logprob"] for r in sharded] == [r["logprob"] for r in unsharded]
    assert evaluate(run / "step0", build, out_dir=tmp_path / "step0", seen=10, held_out=10).failed == []
    step0 = [r["logprob"] for r in read_results(tmp_path / "step0")]
    assert step0 != [r["logprob"] for r in sharded]  # three steps of training moved the scores
