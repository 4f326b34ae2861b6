"""Mechanism analyses (`olmo-inject analyze probe|interference`): their numbers against direct computations on
small cases, and both analyses end to end on tiny ai2-olmo checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from test_eval import build, save_checkpoint  # noqa: F401 (the module-scoped build fixture)


@pytest.fixture(scope="module")
def run(build, tmp_path_factory) -> Path:  # noqa: F811
    """Two checkpoints of an untrained tiny model (different seeds stand in for two training steps)."""
    folder = tmp_path_factory.mktemp("mech") / "run"
    save_checkpoint(folder / "step0-unsharded", seed=0)
    save_checkpoint(folder / "step5-unsharded", seed=1)
    return folder


# ---- probes ------------------------------------------------------------------------------------------------

def test_a_probe_finds_a_linear_feature_and_not_shuffled_labels():
    from eval.probe import fit_probe

    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 24))
    w = rng.normal(size=24)
    labels = (X @ w > 0).astype(int)
    fit = fit_probe(X[:400], labels[:400], X[400:], labels[400:], "classification")
    assert fit["score"] >= 0.95 and 0.35 <= fit["control"] <= 0.65
    assert fit["baseline"] == pytest.approx(max(np.mean(labels[400:]), 1 - np.mean(labels[400:])), abs=0.15)
    value = X @ w + 0.05 * rng.normal(size=600)
    fit = fit_probe(X[:400], value[:400], X[400:], value[400:], "regression")
    assert fit["score"] >= 0.99 and fit["control"] < 0.1 and fit["baseline"] <= 0.0
    noise = rng.normal(size=600)  # no feature at all: nothing to find
    fit = fit_probe(X[:400], noise[:400], X[400:], noise[400:], "regression")
    assert fit["score"] < 0.1
    classes = rng.integers(0, 5, size=600)  # 5 classes along 5 directions
    X5 = np.eye(5)[classes] @ rng.normal(size=(5, 24)) + 0.1 * rng.normal(size=(600, 24))
    fit = fit_probe(X5[:400], classes[:400], X5[400:], classes[400:], "classification")
    assert fit["score"] >= 0.95 and fit["control"] < 0.4 and fit["classes"] == 5
    assert fit_probe(X[:10], np.zeros(10), X[10:20], np.zeros(10), "classification")["score"] is None  # one class


def test_task_features_are_the_instances_own():
    from eval.probe import features

    assert features("comparison", (42, 17)) == {"outcome": ("classification", 1), "a_value": ("regression", 42.0),
                                                "b_value": ("regression", 17.0)}
    f = features("modular_addition", (9, 7), 13)
    assert f["residue"] == ("classification", 3)
    assert f["cos_2_sum"][1] == pytest.approx(np.cos(2 * np.pi * 2 * 3 / 13))
    assert f["sin_1_a"][1] == pytest.approx(np.sin(2 * np.pi * 9 / 13))


def test_probe_runs_on_tiny_checkpoints_and_matches_a_direct_computation(build, run, tmp_path, capsys):  # noqa: F811
    import matplotlib.image

    from eval.checkpoints import load_checkpoint
    from eval.probe import fit_probe
    from eval.sets import build_eval_set

    out = tmp_path / "probe"
    args = ("analyze", "probe", run, "--data", build, "--seen", 60, "--held-out", 40, "--out", out)
    assert run_cli(*args) == 0
    assert "analyzed steps [0, 5]" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "step5.jsonl").read_text().splitlines()]
    assert {r["layer"] for r in rows} == {0, 1, 2}  # embeddings + two blocks
    assert {r["feature"] for r in rows if r["task"] == "cmp2"} == {"outcome", "a_value", "b_value"}
    assert {"residue", "cos_1_sum", "sin_3_a"} <= {r["feature"] for r in rows if r["task"] == "mod13"}
    assert all(r["step"] == 5 and r["model"] == "tiny" for r in rows)

    # The same probe on hidden states from ai2-olmo's own output_hidden_states (inputs of each block).
    manifest = json.loads((build / "manifest.json").read_text())
    model = load_checkpoint(run / "step5-unsharded", manifest)
    items = [it for it in build_eval_set(build, seen=60, held_out=40) if it.task == "cmp2"]
    states = []
    for it in items:
        with torch.no_grad():
            hidden = model(torch.tensor([it.context]), output_hidden_states=True).hidden_states
        states.append(hidden[1][0, -1].numpy())  # the output of block 0 = layer 1
    X = np.array(states)
    seen = np.array([it.split == "seen" for it in items])
    from inject.tasks import Comparison

    y = np.array([int(a > b) for a, b in (Comparison(2).instance(it.item) for it in items)])
    direct = fit_probe(X[seen], y[seen], X[~seen], y[~seen], "classification")
    [row] = [r for r in rows if r["task"] == "cmp2" and r["feature"] == "outcome" and r["layer"] == 1]
    assert row["score"] == pytest.approx(direct["score"], abs=1e-9) and row["n_test"] == 40
    assert row["control"] == pytest.approx(direct["control"], abs=1e-9)

    assert run_cli(*args) == 0  # incremental
    assert "analyzed steps -; already done [0, 5]" in capsys.readouterr().out
    assert run_cli("analyze", "probe", run, "--data", build, "--seen", 30, "--held-out", 40, "--out", out) == 2
    assert "seen differ" in capsys.readouterr().err
    for name in ("probe_vs_step.png", "probe_by_layer.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] >= 300 and image[..., :3].std() > 0.05, name
    table = (out / "probe.csv").read_text().splitlines()
    assert table[0].startswith("model,run,params,step") and len(table) == 1 + 2 * len(rows)


# ---- gradient interference ---------------------------------------------------------------------------------

def test_cosines_norms_and_projections_of_hand_made_gradients():
    from eval.interference import cosine, groups_of, measurements, norm

    t = torch.tensor
    names = ["transformer.wte.weight", "transformer.blocks.0.att_proj.weight", "transformer.blocks.1.ff_out.weight",
             "transformer.ln_f.weight", "transformer.ff_out.weight"]
    task = dict(zip(names, [t([[1.0, 0.0]]), t([3.0, 4.0]), t([0.0]), t([0.0]), t([2.0])]))
    dolma = dict(zip(names, [t([[0.0, 1.0]]), t([4.0, -3.0]), t([1.0]), t([0.0]), t([2.0])]))
    assert cosine(task, dolma) == pytest.approx((0 + 0 + 0 + 0 + 4) / (math.sqrt(30) * math.sqrt(31)))
    assert cosine(task, dolma, ["transformer.blocks.0.att_proj.weight"]) == pytest.approx(0.0)
    assert cosine(task, dolma, ["transformer.blocks.1.ff_out.weight"]) is None  # a zero gradient has no direction
    groups = groups_of(names)
    assert list(groups) == ["embedding", "block0", "block1", "final_norm", "lm_head", "blocks", "all"]
    # a batch gradient split into the task's tokens and the other tokens
    own = {n: 0.5 * v for n, v in task.items()}
    other = {n: v.clone() for n, v in dolma.items()}
    batch = {n: own[n] + other[n] for n in names}
    rows = measurements({"task:x": task, "dolma": dolma, "batch": batch, "batch_task:x": own, "batch_other": other},
                        groups, ["x"])
    norms = {(r["gradient"], r["group"]): r["norm"] for r in rows if r["type"] == "norm"}
    for g in ("task:x", "dolma", "batch"):
        assert sum(norms[(g, p)] ** 2 for p in ["embedding", "block0", "block1", "final_norm", "lm_head"]) == \
            pytest.approx(norms[(g, "all")] ** 2)
    assert norms[("task:x", "all")] == pytest.approx(norm(task)) == pytest.approx(math.sqrt(30))
    [p] = [r for r in rows if r["type"] == "projection" and r["group"] == "all"]
    u = {n: v / norm(task) for n, v in task.items()}
    along = sum(float((batch[n] * u[n]).sum()) for n in names)
    assert p["along_task"] == pytest.approx(along) and p["share"] == pytest.approx(along / norm(batch))
    assert p["from_task_tokens"] == pytest.approx(0.5 * norm(task))  # own = task / 2 lies along u
    assert p["from_other_tokens"] == pytest.approx(4 / math.sqrt(30))
    [c] = [r for r in rows if r["type"] == "cosine" and r["group"] == "embedding" and {r["a"], r["b"]} == {"task:x", "dolma"}]
    assert c["cosine"] == pytest.approx(0.0)


def _direct_gradient(model, sequences, targets_from):
    """Mean cross-entropy over the positions j >= targets_from[i] - 1 of each sequence (predicting token j + 1),
    one forward per sequence; returns (gradient dict, loss)."""
    model.zero_grad(set_to_none=True)
    total = sum(len(s) - f for s, f in zip(sequences, targets_from))
    loss = 0.0
    for s, f in zip(sequences, targets_from):
        ids = torch.tensor([s])
        ce = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits[0].float(), ids[0, 1:], reduction="none")
        part = ce[f - 1 :].sum() / total
        part.backward()
        loss += float(part.detach())
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, loss


def test_interference_runs_on_tiny_checkpoints_and_matches_direct_gradients(build, run, tmp_path, capsys):  # noqa: F811
    import matplotlib.image
    from olmo.data import build_train_dataloader

    from eval.checkpoints import load_checkpoint
    from eval.interference import cosine, norm
    from eval.sets import build_eval_set
    from inject.ledger import read_ledger
    from inject.trainers.ai2_olmo import train_config_for

    out = tmp_path / "interference"
    args = ("analyze", "interference", run, "--data", build, "--n-task", 6, "--n-dolma", 3, "--out", out)
    assert run_cli(*args) == 0
    assert "analyzed steps [0, 5]" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "step5.jsonl").read_text().splitlines()]
    norms = {(r["gradient"], r["group"]): r for r in rows if r["type"] == "norm"}
    gradients = {g for g, _ in norms}
    assert {"task:mod13", "task:cmp2", "task:cmp4", "dolma", "batch", "batch_other"} <= gradients
    partition = ["embedding", "block0", "block1", "final_norm", "lm_head"]
    for g in gradients:  # per-layer norms^2 add up to the overall norm^2
        assert sum(norms[(g, p)]["norm"] ** 2 for p in partition) == pytest.approx(norms[(g, "all")]["norm"] ** 2, rel=1e-6)

    # Task gradients computed directly, one forward per example, against the table.
    manifest = json.loads((build / "manifest.json").read_text())
    model = load_checkpoint(run / "step5-unsharded", manifest)
    items = [it for it in build_eval_set(build, seen=6, held_out=0) if it.split == "seen"]
    direct = {}
    for task in ("cmp2", "mod13"):
        mine = [it for it in items if it.task == task]
        direct[task], loss = _direct_gradient(model, [it.context + it.candidates[it.correct] for it in mine],
                                              [len(it.context) for it in mine])
        assert norms[(f"task:{task}", "all")]["loss"] == pytest.approx(loss, rel=1e-5)
    block1 = [n for n in direct["cmp2"] if n.startswith("transformer.blocks.1.")]
    [c] = [r for r in rows if r["type"] == "cosine" and r["group"] == "block1" and {r["a"], r["b"]} == {"task:cmp2", "task:mod13"}]
    assert c["cosine"] == pytest.approx(cosine(direct["cmp2"], direct["mod13"], block1), abs=1e-5)
    assert norms[("task:cmp2", "lm_head")]["norm"] == pytest.approx(norm(direct["cmp2"], ["transformer.ff_out.weight"]), rel=1e-5)

    # The training batch: step 6 for the step-5 checkpoint, read here by ai2-olmo's own training data loader.
    manifest["_dir"] = build.resolve()
    loader = build_train_dataloader(train_config_for(manifest, str(tmp_path / "save"), False), world_size=1, rank=0,
                                    fs_local_rank=0)
    batches = iter(loader)
    for _ in range(6):
        batch = next(batches)
    sequences = batch["input_ids"].tolist()
    g_batch, loss = _direct_gradient(model, sequences, [1] * len(sequences))
    assert norms[("batch", "all")]["loss"] == pytest.approx(loss, rel=1e-5)
    assert norms[("batch", "all")]["norm"] == pytest.approx(norm(g_batch), rel=1e-4)
    ledger = read_ledger(build)
    projections = [r for r in rows if r["type"] == "projection" and r["group"] == "all"]
    assert {p["task"] for p in projections} == {"mod13", "cmp2", "cmp4"}
    for p in projections:
        assert p["batch_step"] == 6 and p["batch_instances"] == 8
        assert p["task_examples_in_batch"] == int(((ledger["step"] == 6) & (ledger["spec"] == ["mod13", "cmp2", "cmp4"].index(p["task"]))).sum())
        assert p["from_task_tokens"] + p["from_other_tokens"] == pytest.approx(p["along_task"])
        u = {n: v / norm(direct[p["task"]]) for n, v in direct[p["task"]].items()} if p["task"] in direct else None
        if u is not None:
            assert p["along_task"] == pytest.approx(sum(float((g_batch[n] * u[n]).sum()) for n in u), rel=1e-4, abs=1e-7)
    neurons = [r for r in rows if r["group"].startswith("block0.mlp.top16:")]
    assert neurons and all(len(r["neurons"]) == 16 for r in neurons)

    assert run_cli(*args) == 0  # incremental
    assert "analyzed steps -; already done [0, 5]" in capsys.readouterr().out
    for name in ("interference_vs_step.png", "interference_by_layer.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] >= 300 and image[..., :3].std() > 0.05, name
    for name in ("norms.csv", "cosines.csv", "projections.csv"):
        assert len((out / name).read_text().splitlines()) > 2


def test_both_analyses_read_a_transformers_model(build, tmp_path):  # noqa: F811
    from transformers import OlmoConfig, OlmoForCausalLM

    from eval.interference import analyze_interference
    from eval.probe import analyze_probes

    torch.manual_seed(0)
    config = OlmoConfig(vocab_size=50304, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=256, eos_token_id=50279, pad_token_id=1)
    OlmoForCausalLM(config).save_pretrained(tmp_path / "hf-step3")
    assert analyze_probes(tmp_path / "hf-step3", build, out_dir=tmp_path / "p", seen=20, held_out=10).failed == []
    assert {json.loads(line)["layer"] for line in (tmp_path / "p" / "step3.jsonl").read_text().splitlines()} == {0, 1, 2}
    assert analyze_interference(tmp_path / "hf-step3", build, out_dir=tmp_path / "i", n_task=4, n_dolma=2).failed == []
    groups = {json.loads(line)["group"] for line in (tmp_path / "i" / "step3.jsonl").read_text().splitlines()}
    assert {"embedding", "block0", "block1", "lm_head", "all", "block0.mlp.top16:cmp2"} <= groups
