"""The OLMo-core ladder: run configs generated from the ladder table, parameter counts measured with OLMo-core 3.0.0
itself (in its environment, tests/install-olmo-core.sh; without it that test skips, and fails under CI=true), and
`ladder dry-run --trainer olmo-core`."""

from __future__ import annotations

import os

import pytest
import yaml

from conftest import run_cli
from inject.errors import ConfigError
from olmo_configs import generate_olmo_core
from olmo_configs.ladder import PRESETS, SIZES, olmo_core_model


def test_run_configs_are_up_to_date_and_keep_ai2_olmos_shapes_and_plans():
    stale = [p for p, text in generate_olmo_core.run_config_files().items() if not p.exists() or p.read_text() != text]
    assert not stale, f"run python -m olmo_configs.generate_olmo_core: {stale}"
    for preset in PRESETS.values():
        assert {p.stem for p in (generate_olmo_core.HERE / preset.name).glob("*.yaml")} == set(preset.sizes)
    reference = yaml.safe_load((generate_olmo_core.HERE / "reference" / "4B.yaml").read_text())
    ai2_olmo = yaml.safe_load((generate_olmo_core.HERE.parent / "reference" / "4B.yaml").read_text())
    assert reference["data"]["global_batch_size_tokens"] == ai2_olmo["global_train_batch_size"] * 2048
    assert reference["train"]["max_steps"] == ai2_olmo["max_duration"] == 50_000
    assert reference["optim"]["lr"] == ai2_olmo["optimizer"]["learning_rate"]
    assert reference["optim"]["warmup_steps"] == ai2_olmo["scheduler"]["t_warmup"]
    assert reference["train"]["save_interval"] == ai2_olmo["save_interval"]
    assert [(n, yaml.safe_load((generate_olmo_core.HERE / "datadecide" / f"{n}.yaml").read_text())["train"]["data_parallel"])
            for n in ("1B", "3B")] == [("1B", "ddp"), ("3B", "fsdp")]  # FSDP above 1.2B nominal, as ai2-olmo's ladder


def test_every_ladder_config_is_a_valid_olmo_core_run_config():
    """What `olmo-inject train` loads (field names, types, ranges; the data block is checked against a build later)."""
    from inject.trainers.olmo_core import load_run_config

    for path in generate_olmo_core.run_config_files():
        config = load_run_config(path)
        assert config.model.d_model == SIZES[path.stem].d_model and config.train.dtype == "bfloat16"


@pytest.fixture(scope="module")
def olmo_core_python() -> str:
    from inject.trainers import olmo_core

    try:
        return olmo_core.python()
    except ConfigError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))


def test_parameter_counts_are_olmo_cores_own_and_differ_from_ai2_olmo_by_the_qk_norms(olmo_core_python):
    measured = generate_olmo_core.measure_olmo_core(olmo_core_python)
    assert generate_olmo_core.SIZES_FILE.read_text() == generate_olmo_core.sizes_table(measured), \
        "run python -m olmo_configs.generate_olmo_core"
    for name, row in generate_olmo_core.measured_sizes().items():
        size = SIZES[name]
        assert row["mlp_hidden_size"] == 4 * size.d_model and row["head_dim"] == size.d_model // size.n_heads
        qk_norms = 2 * size.d_model * size.n_layers  # OLMo-2's only extra weights over ai2-olmo's shape
        assert row["olmo_core_params_total"] - row["ai2_olmo_params_total"] == qk_norms
        assert row["olmo_core_params_without_input_embedding"] - row["ai2_olmo_params_without_input_embedding"] == qk_norms
        assert {k: row[k] for k in olmo_core_model(size)} == olmo_core_model(size)


def test_ladder_dry_run_for_olmo_core_prints_its_measured_counts_and_the_run_arithmetic(capsys):
    assert run_cli("ladder", "dry-run", "--trainer", "olmo-core", "--preset", "reference", "--gpus", "16") == 0
    out = capsys.readouterr().out
    measured = generate_olmo_core.measured_sizes()
    for name in PRESETS["reference"].sizes:
        assert f"\n{name:>5s} {measured[name]['olmo_core_params_without_input_embedding']:>14,d} " in out
    assert "    4,194,304 " in out and "209.72B" in out and " fsdp " in out and "total:" in out
    assert run_cli("ladder", "dry-run", "--trainer", "olmo-core", "--size", "7M") == 2
    assert "unknown size '7M'" in capsys.readouterr().err
