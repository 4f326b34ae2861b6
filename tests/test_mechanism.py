"""Mechanism analyses (`olmo-inject analyze probe|interference`): their numbers against direct computations on
small cases, and both analyses end to end on tiny ai2-olmo checkpoints."""

from __future__ import annotations

import json
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
