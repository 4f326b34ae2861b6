"""Checkpoint evaluation: exact scores, chance for an untrained model, incremental runs, bad checkpoints."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
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


def assert_narrowed_logits_change_nothing(model, items, results, batch_size: int, monkeypatch) -> None:
    """Logits computed only at the positions a score reads (the final norm's output narrowed to them) give
    the numbers of every position's logits (the path of a model whose final norm is not found): the same
    ranks and verdicts, log-probabilities within 1e-5 (a matrix product of another shape may round the
    last bit otherwise)."""
    from eval import score

    assert score._final_norm(model) is not None  # else both paths below are the same one
    monkeypatch.setattr(score, "_final_norm", lambda model: None)
    everywhere = score.score_items(model, items, pad=1, batch_size=batch_size)
    assert [{k: v for k, v in r.items() if k != "logprob"} for r in everywhere] == \
           [{k: v for k, v in r.items() if k != "logprob"} for r in results]
    assert [r["logprob"] for r in everywhere] == pytest.approx([r["logprob"] for r in results], abs=1e-5)


def test_scores_equal_a_direct_computation_and_an_untrained_model_is_at_chance(build, tmp_path, monkeypatch):
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
    assert_narrowed_logits_change_nothing(model, items, results, 16, monkeypatch)


def answer_logprob(model, context: list[int], candidate: list[int]) -> float:
    """log p(candidate | context), from one unpadded forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([context + candidate])).logits[0].float(), -1)
    return sum(float(logp[len(context) - 1 + k, t]) for k, t in enumerate(candidate))


def test_the_calibrated_score_subtracts_each_candidate_under_the_content_free_prompt(build, tmp_path):
    from inject import tokenizer as tok
    from eval.run import load_checkpoint
    from eval.score import score_items
    from eval.sets import build_eval_set

    save_checkpoint(tmp_path / "step0-unsharded", seed=2)
    manifest = json.loads((build / "manifest.json").read_text())
    model = load_checkpoint(tmp_path / "step0-unsharded", manifest, "cpu")
    items = build_eval_set(build, seen=3, held_out=1)
    tokenizer = tok.load(manifest["tokenizer"]["name"])
    eos = manifest["tokenizer"]["eos_token_id"]
    for it in items:
        null = tokenizer.decode(it.null_context[1:])
        assert it.null_context[0] == eos
        assert null == {"mod13": "", "cmp2": "Which is larger, N/A or N/A?", "cmp4": "Which is larger, N/A or N/A?"}[it.task]
    results = score_items(model, items, pad=1, batch_size=4)
    for it, result in zip(items, results):
        calibrated = [answer_logprob(model, it.context, c) - answer_logprob(model, it.null_context, c) for c in it.candidates]
        rank = 1 + sum(c > calibrated[it.correct] + 1e-5 for c in calibrated)
        assert result["calibrated_rank"] == rank and result["calibrated_correct"] == (rank == 1)


def ledger_history(build: Path) -> dict[tuple[int, int], list[int]]:
    """(spec, item) -> steps of its ledger rows, read directly."""
    import numpy as np

    ledger = np.load(build / "ledger.npy")
    history: dict = {}
    for row in ledger:
        history.setdefault((int(row["spec"]), int(row["item"])), []).append(int(row["step"]))
    return history


def test_seen_pending_and_held_out_at_a_step_mean_what_they_say(build):
    from eval.run import exposure_fields
    from eval.sets import EvalSampler

    history = ledger_history(build)
    first = {key: min(steps) for key, steps in history.items()}
    sampler = EvalSampler(build, seen=10, held_out=5, pending=10)
    drawn = {}
    for step in (0, 3, 20, 60):
        items = sampler.items_at(step)
        for spec, task in enumerate(["mod13", "cmp2", "cmp4"]):
            mine = [it for it in items if it.spec == spec]
            assert all(it.task == task for it in mine)
            exposed = sum(1 for (s, _), f in first.items() if s == spec and f <= step)
            unexposed = sum(1 for (s, _), f in first.items() if s == spec and f > step)
            counts = {split: sum(it.split == split for it in mine) for split in ("seen", "pending", "held_out")}
            assert counts == {"seen": min(10, exposed), "pending": min(10, unexposed), "held_out": 5}, (step, task)
            for it in mine:
                fields = exposure_fields(it, step)
                steps = history.get((spec, it.item), [])
                if it.split == "seen":
                    assert fields["exposures"] == sum(s <= step for s in steps) >= 1
                    assert fields["first_exposure"] == min(steps) <= step
                    assert fields["exposures_by_task"] == {task: fields["exposures"]}
                elif it.split == "pending":
                    assert fields["exposures"] == 0 and fields["first_exposure"] == min(steps) > step
                    assert fields["steps_since_last"] is None and fields["exposures_by_task"] == {}
                else:
                    assert not steps and fields["exposures"] == 0 and fields["first_exposure"] is None
                instance = sampler.view.encoders[spec].task.instance(it.item)  # its twin: the operands swapped
                twin = sampler.view.encoders[spec].task.index(tuple(reversed(instance)))
                twin_steps = history.get((spec, twin), []) if twin != it.item else []
                assert fields["twin_exposures"] == sum(s <= step for s in twin_steps)
                assert it.split != "held_out" or not twin_steps  # split: symmetric, the default
                drawn.setdefault((spec, it.item, it.split == "held_out"), []).append(
                    (it.template, it.context, it.candidates, it.sample_rank))
        followed = {(it.spec, it.item) for it in items if it.split != "held_out" and it.sample_rank < 10}
        if step == 0:
            always = followed
        assert followed == always  # the first min(seen, pending) of the order are scored at every step
    assert all(len(set(map(repr, renderings))) == 1 for renderings in drawn.values())  # same rendering each time
    assert [(it.task, it.item, it.split) for it in EvalSampler(build, 10, 5, 0, False, 10).items_at(20)] == \
        [(it.task, it.item, it.split) for it in sampler.items_at(20)]  # reproducible


@pytest.fixture(scope="module")
def shared_build(tmp_path_factory) -> Path:
    """Two token tasks on one space in one `share` group: the same instances in the same order, `late` starting
    at step 21 (so at step 20 it has shown nothing, while `early` has shown 20 instances)."""
    folder = tmp_path_factory.mktemp("sharedbuild")
    write_shard(folder / "c.jsonl", docs(make_texts(700)))
    task = {"task": "modular_addition", "params": {"modulus": 13}, "encoding": "tokens", "pool": {"held_out": 0.3, "share": "g"}}
    config = {"inputs": ["c.jsonl"], "sequence_length": 64, "training": {"global_batch_size": 4, "steps": 40},
              "tasks": [{"name": "early", **task, "schedule": {"kind": "even", "rate": 1}},
                        {"name": "late", **task, "schedule": {"kind": "even", "rate": 1, "start": 21}}]}
    (folder / "b.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", folder / "b.yaml", "--out", folder / "build") == 0
    return folder / "build"


def test_exposures_count_every_task_on_the_same_instance_space(shared_build):
    from eval.run import exposure_fields
    from eval.sets import EvalSampler

    ledger = np.load(shared_build / "ledger.npy")
    manifest = json.loads((shared_build / "manifest.json").read_text())
    assert len({t["space"] for t in manifest["injection"]["tasks"]}) == 1
    sampler = EvalSampler(shared_build, seen=1000, held_out=1000, pending=1000)
    names = ["early", "late"]
    through_early = 0
    for step in (10, 20, 30, 40):
        for it in sampler.items_at(step):
            fields = exposure_fields(it, step)
            mine = ledger[(ledger["item"] == it.item) & (ledger["step"] <= step)]  # rows of both tasks
            by_task = {names[s]: int((mine["spec"] == s).sum()) for s in (0, 1) if (mine["spec"] == s).any()}
            assert fields["exposures"] == len(mine) and fields["exposures_by_task"] == by_task
            if it.split == "held_out":
                assert not (ledger["item"] == it.item).any()
                continue
            first = int(ledger["step"][ledger["item"] == it.item].min())
            assert fields["first_exposure"] == first and (it.split == "seen") == (first <= step)
            if it.task == "late" and it.split == "seen" and "late" not in by_task:
                through_early += 1  # seen by the model only through the other task
    assert through_early >= 10


def test_eval_is_incremental_and_reports_bad_checkpoints(build, tmp_path, capsys):
    run = tmp_path / "run"
    save_checkpoint(run / "step0-unsharded", seed=0)
    assert run_cli("eval", run, "--data", build, "--seen", 10, "--pending", 10, "--held-out", 10) == 0
    assert "evaluated steps [0]" in capsys.readouterr().out
    save_checkpoint(run / "step5-unsharded", seed=1)
    (run / "step7-unsharded").mkdir()  # half-written
    (run / "step9-unsharded").mkdir()
    (run / "step9-unsharded" / "config.yaml").write_text((run / "step0-unsharded" / "config.yaml").read_text())
    (run / "step9-unsharded" / "model.pt").write_bytes(b"not a checkpoint")
    assert run_cli("eval", run, "--data", build, "--seen", 10, "--pending", 10, "--held-out", 10) == 1
    captured = capsys.readouterr()
    assert "evaluated steps [5]; already done [0]" in captured.out
    assert "step7-unsharded: no config.yaml" in captured.err
    assert "step9-unsharded: cannot load the unsharded weights" in captured.err
    rows = [json.loads(l) for l in (run / "eval" / "step5.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"seen", "pending", "held_out"}
    seen, pending = [r for r in rows if r["split"] == "seen"], [r for r in rows if r["split"] == "pending"]
    assert all(r["exposures"] >= 1 and r["first_exposure"] <= 5 for r in seen)
    assert all(r["exposures"] == 0 and r["first_exposure"] > 5 for r in pending)
    assert {r["model"] for r in rows} == {"tiny"} and rows[0]["tokens"] == 5 * 8 * 64
    assert {r["dolma_sample"] for r in rows} == {"unplanned"} and len({r["dolma_loss"] for r in rows}) == 1
    assert 5 < rows[0]["dolma_loss"] < 15  # an untrained model: about ln(50k) nats per token
    first = {}
    for spec, item, step in np.load(build / "ledger.npy")[["spec", "item", "step"]].tolist():
        first[(spec, item)] = min(step, first.get((spec, item), step))
    with open(run / "eval" / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    overall = [r for r in summary if r["exposures"] == "all"]
    assert len(overall) == 2 * 3 * 3  # steps x tasks x splits
    for r in overall:
        spec = ["mod13", "cmp2", "cmp4"].index(r["task"])
        exposed = sum(1 for (s, _), f in first.items() if s == spec and f <= int(r["step"]))
        available = {"seen": exposed, "pending": len([k for k in first if k[0] == spec]) - exposed, "held_out": 10}
        assert int(r["n"]) == min(10, available[r["split"]]) and int(r["requested"]) == 10, r  # all where fewer
        if int(r["n"]):
            assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
            assert float(r["above_chance"]) == pytest.approx(float(r["accuracy"]) - float(r["chance"]), abs=2e-4)
        else:
            assert r["accuracy"] == "" and r["split"] == "seen" and r["step"] == "0"  # shown, with n = 0
    buckets = [r for r in summary if r["exposures"] != "all"]
    assert buckets and all(r["split"] == "seen" for r in buckets)
    for (step, task) in {(r["step"], r["task"]) for r in buckets}:  # the buckets partition the seen instances
        total = next(int(r["n"]) for r in overall if (r["step"], r["task"], r["split"]) == (step, task, "seen"))
        assert sum(int(r["n"]) for r in buckets if (r["step"], r["task"]) == (step, task)) == total

    (run / "step11-unsharded").mkdir()  # a model for another tokenizer
    config = yaml.safe_load((run / "step0-unsharded" / "config.yaml").read_text())
    config["model"]["vocab_size"] = 1000
    (run / "step11-unsharded" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "step11-unsharded" / "model.pt").write_bytes(b"")
    assert run_cli("eval", run, "--data", build, "--seen", 10, "--pending", 10, "--held-out", 10) == 1
    assert "step11-unsharded: vocabulary 1000" in capsys.readouterr().err

    assert run_cli("eval", run, "--data", build, "--seen", 20, "--pending", 10, "--held-out", 10) == 2  # refused
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

    assert evaluate(memorized_run, build, seen=15, held_out=15, pending=15).failed == []
    rows = [r for r in read_results(memorized_run / "eval") if r["step"] == 100]
    seen = [r for r in rows if r["split"] == "seen"]
    assert len(seen) == 45 and all(r["correct"] and r["greedy_exact"] and r["rank"] == 1 for r in seen)
    untrained = [r for r in read_results(memorized_run / "eval") if r["step"] == 0]
    assert not [r for r in untrained if r["split"] == "seen"]  # nothing was injected before step 1
    pending = [r for r in untrained if r["split"] == "pending"]  # the same instances, not yet trained on
    assert {(r["task"], r["item"]) for r in pending} == {(r["task"], r["item"]) for r in seen}
    assert sum(r["correct"] for r in pending) < 40  # the step-0 checkpoint does not know them
    formats = memorized_run.parent / "formats"
    for folder, fmt in ((formats / "step100", "sharded"), (formats / "step100-hf", "hf")):
        out = formats / f"eval-{fmt}"
        assert (folder / "config.json").exists() == (fmt == "hf")
        assert evaluate(folder, build, out_dir=out, seen=15, held_out=15, pending=15).failed == []
        other = read_results(out)
        assert {r["checkpoint_format"] for r in other} == {fmt}
        assert [(r["task"], r["item"], r["correct"]) for r in other] == [(r["task"], r["item"], r["correct"]) for r in rows]
        assert [r["logprob"] for r in other] == pytest.approx([r["logprob"] for r in rows], abs=1e-4)


def test_a_transformers_olmo_model_scores_like_a_direct_forward_pass(build, tmp_path, monkeypatch):
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
    assert_narrowed_logits_change_nothing(model, items, results, 4, monkeypatch)


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

    assert evaluate(memorized_run, build, seen=15, held_out=15, pending=15).failed == []
    untrained = tmp_path / "small-run"
    save_checkpoint(untrained / "step0-unsharded", seed=3)
    save_checkpoint(untrained / "step50-unsharded", seed=4)
    assert run_cli("eval", untrained, "--data", build, "--seen", 15, "--pending", 15, "--held-out", 15) == 0
    # The training loss of a run with RUN/metrics.jsonl (as `train` writes it) is drawn beside the Dolma loss.
    (untrained / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 10 - s / 20}) + "\n" for s in range(1, 51)))
    for run in (memorized_run, untrained):  # the report also draws the mechanism analyses it finds
        assert run_cli("analyze", "probe", run, "--data", build, "--seen", 40, "--held-out", 20) == 0
    assert run_cli("report", memorized_run, untrained, "--out", tmp_path / "report") == 0
    for name in ("accuracy_vs_tokens.png", "memorization_vs_generalization.png", "answer_logprob.png", "retention.png",
                 "heatmap.png", "dolma_loss.png", "probe_vs_step.png", "probe_by_layer.png"):
        image = matplotlib.image.imread(tmp_path / "report" / name)
        assert image.shape[0] >= 300 and image.shape[1] >= 400, name
        assert image[..., :3].std() > 0.05, f"{name} is blank"
        assert (image[..., :3] < 0.5).mean() > 0.005, f"{name} has no lines or text"
    from eval.report import load_rows, training_losses

    losses = training_losses([memorized_run, untrained], load_rows([memorized_run, untrained]))
    assert losses == {"tiny (small-run)": [(s, 10 - s / 20) for s in range(1, 51)]}  # the other run has none
    with open(tmp_path / "report" / "results.csv") as f:
        table = list(csv.DictReader(f))
    models = {r["model"] for r in table}
    assert models == {"tiny (run)", "tiny (small-run)"}  # one model config, two runs: told apart
    final = [r for r in table if r["step"] == "100" and r["split"] == "seen" and r["exposures"] == "all"]
    assert final and all(float(r["accuracy"]) == 1.0 for r in final)
    page = (tmp_path / "report" / "summary.html").read_text()
    assert page.count("<img") == 8 and "tiny (small-run)" in page and "Mechanism analyses" in page
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| tiny (run) | 100 |" in summary and "Grokking onset" in summary
    assert "| pending | training | 0 of 15 |" in summary  # step 100: every instance injected, none pending
    with open(tmp_path / "report" / "onset.csv") as f:
        onsets = list(csv.DictReader(f))
    assert {(o["model"], o["task"]) for o in onsets} == {(m, t) for m in models for t in ("mod13", "cmp2", "cmp4")}


def test_a_negative_split_size_is_refused_before_anything_is_written(build, tmp_path, capsys):
    save_checkpoint(tmp_path / "run" / "step0-unsharded", seed=0)
    assert run_cli("eval", tmp_path / "run", "--data", build, "--pending", -1) == 2
    assert "--pending: expected a count of instances >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "eval").exists()


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
    assert evaluate(run / "step3", build, out_dir=tmp_path / "sharded", seen=10, held_out=10, pending=10).failed == []
    assert evaluate(run / "step3-unsharded", build, out_dir=tmp_path / "unsharded", seen=10, held_out=10, pending=10).failed == []
    sharded, unsharded = read_results(tmp_path / "sharded"), read_results(tmp_path / "unsharded")
    assert {r["checkpoint_format"] for r in sharded} == {"sharded"}
    assert [r["logprob"] for r in sharded] == [r["logprob"] for r in unsharded]
    assert evaluate(run / "step0", build, out_dir=tmp_path / "step0", seen=10, held_out=10, pending=10).failed == []
    step0 = [r["logprob"] for r in read_results(tmp_path / "step0")]
    assert step0 != [r["logprob"] for r in sharded]  # three steps of training moved the scores


def test_onset_is_the_first_step_whose_held_out_accuracy_is_halfway_above_chance_and_significant():
    from eval.report import onset_table
    from eval.run import summarize

    def rows(model, step, hits, n=40, candidates=2):
        return [{"model": model, "params": 1 if model == "small" else 2, "step": step, "tokens": step * 100,
                 "task": "cmp", "kind": "comparison", "complexity": 2, "rate": 1.0, "split": "held_out",
                 "format": "training", "exposures": 0, "correct": i < hits, "candidates": candidates,
                 "greedy_exact": False, "logprob": -1.0, "rank": 1, "requested": n} for i in range(n)]

    # large: step 10 is 30/40 = 0.75 (normalized 0.5, interval above 0.5): the onset; step 5 at 0.7 is not
    table = summarize(rows("large", 0, 20) + rows("large", 5, 28) + rows("large", 10, 30) + rows("large", 20, 40)
                      + rows("small", 0, 20) + rows("small", 10, 29) + rows("small", 20, 3, n=4))  # 3/4: CI too wide
    onsets = {o["model"]: o for o in onset_table(table)}
    assert onsets["large"]["onset_step"] == 10 and onsets["large"]["onset_tokens"] == 1000
    assert onsets["large"]["accuracy"] == 0.75 and onsets["large"]["n"] == 40
    assert onsets["small"]["onset_step"] is None and onsets["small"]["last_step"] == 20
    assert [o["model"] for o in onset_table(table)] == ["small", "large"]  # smallest model first


def test_the_probes_best_layer_is_chosen_on_validation_not_on_the_test_score():
    from eval.probe import best_layers, validation_split

    def row(step, layer, validation, score):
        return {"model": "tiny", "task": "cmp2", "feature": "outcome", "step": step, "layer": layer,
                "validation": validation, "score": score}

    rows = [row(5, 0, 0.60, 0.90), row(5, 1, 0.80, 0.55), row(5, 2, 0.80, 0.99), row(9, 0, None, 1.0), row(9, 1, 0.7, 0.6)]
    best = best_layers(rows)
    assert best[("tiny", "cmp2", "outcome", 5)]["layer"] == 1  # not layer 2's test score, and the lower of a tie
    assert best[("tiny", "cmp2", "outcome", 9)]["score"] == 0.6
    fit, validation = validation_split(50, seed=0)
    assert len(validation) == 10 and not set(fit) & set(validation) and len(fit) + len(validation) == 50


def test_eval_logs_its_summary_to_the_runs_wandb_run(build, tmp_path, monkeypatch, capsys):
    from eval.run import read_results, summarize, wandb_history

    run = tmp_path / "run"
    save_checkpoint(run / "step0-unsharded", seed=0)
    save_checkpoint(run / "step30-unsharded", seed=1)
    sizes = ("--seen", 5, "--pending", 5, "--held-out", 5)
    assert run_cli("eval", run, "--data", build, *sizes, "--wandb") == 2  # no W&B run: refused before scoring
    assert "has no W&B run (wandb-id)" in capsys.readouterr().err and not (run / "eval").exists()
    (run / "wandb-id").write_text("olmoinject0test\n")  # as `train` writes it for a config with a wandb block
    (run / "config.yaml").write_text(yaml.safe_dump({"wandb": {"project": "olmo-inject-test", "entity": None}}))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run_cli("eval", run, "--data", build, *sizes, "--wandb") == 0
    history = wandb_history(summarize(read_results(run / "eval")))
    assert [h["eval/step"] for h in history] == [0, 30]
    assert history[1]["eval/cmp2/seen/n"] == 5 and 0 <= history[1]["eval/cmp2/held_out/accuracy"] <= 1
    [logged] = (run / "wandb").glob("offline-run-*-olmoinject0test/run-olmoinject0test.wandb")
    data = logged.read_bytes()
    assert all(key.encode() in data for key in history[1])  # every key went into the training run's W&B file
