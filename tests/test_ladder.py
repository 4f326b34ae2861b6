"""The OLMo size ladder: configs load, models build on the meta device, counts match DataDecide, files are current."""

from __future__ import annotations

import pytest

from conftest import run_cli
from olmo_configs import generate
from olmo_configs.ladder import DATADECIDE, PRESETS, SIZES, measure_params


def test_generated_files_are_up_to_date():
    """Regenerating from the table reproduces every committed YAML byte for byte."""
    stale = [p for p, text in generate.all_files().items() if not p.exists() or p.read_text() != text]
    assert not stale, f"run python -m olmo_configs.generate: {stale}"


@pytest.mark.parametrize("name", [n for n in SIZES if SIZES[n].published_params])
def test_datadecide_sizes_have_their_published_parameter_counts(name):
    _, without_input_embedding = measure_params(SIZES[name])
    assert without_input_embedding == SIZES[name].published_params


def test_every_ladder_config_loads_and_builds_on_meta():
    import torch
    from olmo.config import TrainConfig
    from olmo.model import OLMo

    paths = sorted(p for p in generate.HERE.glob("*/*.yaml") if p.parent.name in PRESETS) + [generate.HERE / "tiny.yaml"]
    assert len(paths) == len(PRESETS["datadecide"].sizes) + len(PRESETS["reference"].sizes) + 1
    for path in paths:
        cfg = TrainConfig.load(path)
        cfg.model.init_device = "meta"
        with torch.device("meta"):
            model = OLMo(cfg.model, init_params=False)
        assert model.num_params() > 0
        assert cfg.global_train_batch_size % 8 == 0 or path.name == "tiny.yaml"
        if path.parent.name == "reference":
            assert cfg.global_train_batch_size == 2048 and cfg.max_duration == 50_000
    assert {p.stem for p in (generate.HERE / "datadecide").glob("*.yaml")} >= set(DATADECIDE)


def test_ladder_dry_run_prints_every_size_and_a_total(capsys):
    assert run_cli("ladder", "dry-run", "--preset", "reference", "--gpus", "16") == 0
    out = capsys.readouterr().out
    for name in PRESETS["reference"].sizes:
        assert f"\n{name:>5s} " in out
    assert "3,744,832" in out and "209.72B" in out and "total:" in out and "GPU-hours" in out
    assert run_cli("ladder", "dry-run", "--size", "7M") == 2
    assert "unknown size '7M'" in capsys.readouterr().err
