"""`olmo-inject toy`: the synthetic capacity experiment, on a reduced setting (seconds on 2 cores).

The qualitative claims are checked on real training runs, nothing is stubbed: a narrow MLP learns the
common task but not the rarest one, which the wide MLP learns; the same config gives the same bytes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from eval.toy import ToyConfig, field_docs, parameter_count, run_toy
from inject.cli import main
from inject.errors import ConfigError


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    config = ToyConfig.quick()
    out = tmp_path_factory.mktemp("toy") / "out"
    result = run_toy(config, out, progress=False)
    return config, out, result


def _final(result, width, task):
    return next(r["accuracy"] for r in result["final"] if r["width"] == width and r["task"] == task)


def test_wide_model_learns_the_rare_task_that_the_narrow_one_drops(quick_run):
    config, _, result = quick_run
    narrow, wide = min(config.widths), max(config.widths)
    rare, common = config.tasks, 1
    assert config.frequencies()[rare - 1] < config.frequencies()[common - 1] / 5
    # both learn the common task
    assert _final(result, narrow, common) >= 0.9
    assert _final(result, wide, common) >= 0.9
    # only the wide one learns the rarest; the narrow one stays near chance (0.5)
    assert _final(result, wide, rare) >= 0.9
    assert _final(result, narrow, rare) <= 0.7
    assert _final(result, wide, rare) - _final(result, narrow, rare) >= 0.25


def test_the_narrow_model_learns_the_rare_task_alone(quick_run):
    """The control: same initial weights, the rare task's examples of the same stream, nothing else. The narrow
    model that drops it in the mixture learns it alone: competition, not inability."""
    config, _, result = quick_run
    (row,) = result["alone_table"]
    assert row["width"] == min(config.widths) and row["task"] == config.tasks
    assert row["mixture"] == pytest.approx(_final(result, row["width"], config.tasks))
    assert row["alone"] >= row["mixture"] + 0.2 and row["alone_learned"] >= 1
    assert {r["repeat"] for r in result["alone"]} == set(range(config.repeats))


def test_spacing_statistics_are_per_initialization_and_paired(quick_run):
    config, _, result = quick_run
    members = config.spacing_members()
    assert members == [(8, 0), (8, 1), (8, 2), (8, 3), (128, 0), (128, 1)]
    for r in result["spacing_table"]:
        per_init = r["per_init"]
        assert len(per_init) == r["initializations"] == sum(w == r["width"] for w, _ in members)
        assert r["tail_accuracy"] == pytest.approx(np.mean(per_init))
        assert r["tail_accuracy_std"] == pytest.approx(np.std(per_init, ddof=1))
    table = {(r["gap"], r["width"]): r["per_init"] for r in result["spacing_table"]}
    for p in result["spacing_pairs"]:
        difference = np.array(table[(p["gap"], p["width"])]) - np.array(table[(1, p["width"])])
        assert p["difference"] == pytest.approx(difference.mean())
        assert p["reference_better"] == int((difference < 0).sum())
    summary = result["summary"]
    assert "mean ± std over 3 initializations" in summary and "Paired by initialization" in summary
    assert "## Control: task 4 (the rarest) alone" in summary


def test_outputs_are_complete_and_consistent(quick_run):
    config, out, result = quick_run
    assert sorted(p.name for p in out.iterdir()) == ["alone.csv", "config.json", "results.csv", "spacing.csv", "summary.md", "toy.png"]
    assert not list(out.parent.glob(".out.*")), "temporary folders left behind"
    assert ToyConfig(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in json.loads((out / "config.json").read_text()).items()}) == config
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {int(r["width"]) for r in rows} == set(config.widths)
    assert {int(r["task"]) for r in rows} == set(range(1, config.tasks + 1))
    assert {int(r["repeat"]) for r in rows} == set(range(config.repeats))
    last = [r for r in rows if int(r["step"]) == config.steps]
    assert len(last) == len(config.widths) * config.tasks * config.repeats
    # examples seen follow the power law: the common task far more often than the rarest
    seen = {int(r["task"]): int(r["examples_seen"]) for r in last}
    assert sum(seen.values()) == config.steps * config.batch_size
    expected = config.frequencies() * config.steps * config.batch_size
    assert np.allclose([seen[k + 1] for k in range(config.tasks)], expected, rtol=0.05)
    assert all(int(r["params"]) == parameter_count(int(r["width"]), config) for r in last)
    spacing = list(csv.DictReader((out / "spacing.csv").open()))
    assert len(spacing) == len(config.spacing_gaps) * len(config.spacing_members()) * config.spacing_steps
    alone = list(csv.DictReader((out / "alone.csv").open()))
    assert len(alone) == len(config.alone_widths) * config.repeats * len({int(r["step"]) for r in rows})
    assert all(int(r["task"]) == config.tasks for r in alone)
    for gap in config.spacing_gaps:  # every schedule delivers the same number of spacing-task examples
        final = [r for r in spacing if int(r["gap"]) == gap and int(r["step"]) == config.spacing_steps]
        total = int(final[0]["examples_seen"])
        assert abs(total - config.spacing_mean_rate() * config.spacing_steps) <= config.spacing_burst(gap)
    summary = (out / "summary.md").read_text()
    assert "Final held-out accuracy" in summary and "Spacing" in summary
    assert len(result["spacing_table"]) == len(config.spacing_gaps) * len(config.spacing_widths)


def test_plot_is_not_blank(quick_run):
    import matplotlib.image as mpimg

    _, out, _ = quick_run
    image = mpimg.imread(out / "toy.png")
    assert image.shape[0] >= 600 and image.shape[1] >= 1000
    assert image[..., :3].std() > 0.05  # lines, text and axes, not one flat colour


def test_same_config_same_bytes(quick_run, tmp_path):
    config, out, _ = quick_run
    again = tmp_path / "again"
    run_toy(ToyConfig.quick(), again, progress=False)
    for name in ("results.csv", "alone.csv", "spacing.csv", "config.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other-seed"
    run_toy(ToyConfig.quick(seed=1, spacing_widths=(), steps=200), other, progress=False)
    assert (other / "results.csv").read_bytes() != (out / "results.csv").read_bytes()


@pytest.mark.parametrize("overrides, field", [
    (dict(widths=()), "widths"),
    (dict(widths=(8, 8)), "widths"),
    (dict(complexity=(3, 2)), "complexity"),
    (dict(complexity=(3, 2, 3, 13)), "complexity"),
    (dict(steps=0), "steps"),
    (dict(alpha=-1.0), "alpha"),
    (dict(lr=0.0), "lr"),
    (dict(repeats=0), "repeats"),
    (dict(spacing_task=9), "spacing_task"),
    (dict(spacing_gaps=(1, 1000)), "spacing_gaps"),
    (dict(spacing_repeats=(3,)), "spacing_repeats"),
    (dict(alone_widths=(8, 8)), "alone_widths"),
    (dict(spacing_rate=-2.0), "spacing_rate"),
    (dict(eval_every=0), "eval_every"),
])
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"toy config: {field}:"):
        ToyConfig.quick(**overrides).validate()


def test_every_field_is_documented():
    import dataclasses

    docs = field_docs()
    assert {f.name for f in dataclasses.fields(ToyConfig)} == set(docs)
    assert all(len(text) > 10 for text in docs.values())
    ToyConfig().validate()  # the defaults are valid


def test_cli_dry_run_and_bad_input(capsys, tmp_path):
    assert main(["toy", "--dry-run", "--widths", "8,64", "--complexity", "3,2,3", "--spacing-gaps", "1,5"]) == 0
    text = capsys.readouterr().out
    assert "3 sparse-parity tasks" in text and "| 64 | " in text and "expected examples" in text
    assert not (tmp_path / "toy-out").exists()
    assert main(["toy", "--dry-run", "--widths", "8,x"]) == 2
    assert "--widths" in capsys.readouterr().err
    assert main(["toy", "--dry-run", "--spacing-gaps", "1,5000"]) == 2
    assert "spacing_gaps" in capsys.readouterr().err


def test_cli_quick_run(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["toy", "--quick", "--steps", "300", "--spacing-widths", "none", "--repeats", "1", "--out", str(out)]) == 0
    assert (out / "toy.png").exists() and (out / "spacing.csv").read_text().count("\n") == 1
    assert "Final held-out accuracy" in capsys.readouterr().out
