"""inject/order.py, the self-contained order of both trainers, against each trainer's own code: ai2-olmo 0.6.0
here (the main environment), OLMo-core 3.0.0 in its own environment (tests/install-olmo-core.sh), run as a
subprocess (tests/olmo_core_side.py). Without that environment these tests skip, and fail under CI=true."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from inject.config import TrainingConfig
from inject.configtools import from_dict
from inject.errors import ConfigError
from inject.injection import olmo_order, training_order
from inject.order import ai2_olmo_order, olmo_core_num_instances, olmo_core_order, rank_instances

ROOT = Path(__file__).resolve().parent.parent
N, B = 1_000_003, 512
SEEDS = [0, 7, 6198]


def olmo_core_python() -> Path:
    venv = Path(os.environ.get("OLMO_CORE_VENV", ROOT / ".venv-olmo-core"))
    python = venv / "bin" / "python"
    if not python.exists():
        message = f"no OLMo-core environment at {venv}: run bash tests/install-olmo-core.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return python


def run_olmo_core(command: str, job: dict, tmp_path: Path) -> dict:
    """tests/olmo_core_side.py COMMAND in the OLMo-core environment; its arrays."""
    job_path, out = tmp_path / f"{command}.json", tmp_path / f"{command}.npz"
    job_path.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(olmo_core_python()), str(ROOT / "tests" / "olmo_core_side.py"), command, str(job_path), str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(out) as arrays:
        return {k: arrays[k] for k in arrays.files}


def sha(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.uint32).tobytes()).hexdigest()


@pytest.mark.parametrize("drop_last", [False, True])
def test_ai2_olmo_order_is_ai2_olmos_own(drop_last):
    from olmo.data.iterable_dataset import IterableDataset

    for seed in SEEDS:
        for world_size in (1, 2, 4):
            theirs = IterableDataset(range(N), B, seed=seed, epoch=0, shuffle=True, drop_last=drop_last,
                                     world_size=world_size, rank=0, fs_local_rank=0)._build_global_indices()
            ours = ai2_olmo_order(N, seed, drop_last, world_size=world_size)
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), (seed, world_size, drop_last)
        assert np.array_equal(olmo_order(N, B, seed, drop_last), ai2_olmo_order(N, seed, drop_last))


def token_files(folder: Path, L: int, instances: list[int], tail: int) -> list[str]:
    """Zero-filled headerless uint16 token files of `instances[i]` * L tokens (the last `tail` tokens more)."""
    paths = []
    for i, n in enumerate(instances):
        path = folder / f"part-{i}.npy"
        with open(path, "wb") as f:
            f.truncate((n * L + (tail if i == len(instances) - 1 else 0)) * 2)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def olmo_core_orders(tmp_path_factory) -> dict:
    """OLMo-core's own orders over two files of 600,001 and 400,002 instances (N = 1,000,003), without and
    with max_target_sequence_length = 4 L (whole groups of 4 per file: 600,000 + 400,000)."""
    tmp = tmp_path_factory.mktemp("olmo-core-order")
    L = 8
    paths = token_files(tmp, L, [600_001, 400_002], tail=5)
    results = {}
    for target in (None, 4 * L):
        job = {"paths": paths, "dtype": "uint16", "sequence_length": L, "batch_instances": B, "seeds": SEEDS,
               "max_target_sequence_length": target, "world_sizes": [1, 2, 4]}
        results[target] = run_olmo_core("order", job, tmp)
    return results


@pytest.mark.parametrize("group", [1, 4])
def test_olmo_core_order_is_olmo_cores_own(olmo_core_orders, group):
    theirs = olmo_core_orders[None if group == 1 else 4 * 8]
    files = [600_001, 400_002]
    count = olmo_core_num_instances(files, group)
    assert count == int(theirs["num_instances"]) == (N if group == 1 else 1_000_000)
    for seed in SEEDS:
        assert int(theirs[f"epoch_{seed}"]) == 1  # OLMo-core's first epoch; ai2-olmo's is 0
        ours = olmo_core_order(count, B, seed, group)
        assert len(ours) == B * (count // B)
        assert np.array_equal(ours, theirs[f"global_{seed}"]), (seed, group)
        for world_size in (1, 2, 4):
            for rank in range(world_size):
                assert sha(rank_instances(ours, B, rank, world_size)) == str(theirs[f"local_{seed}_{world_size}_{rank}"])


def test_olmo_core_first_epoch_is_ai2_olmos_order_with_seed_plus_one():
    assert np.array_equal(olmo_core_order(N, B, 41), ai2_olmo_order(N, 42)[: B * (N // B)])


def olmo_core_training(**values) -> TrainingConfig:
    t = TrainingConfig(steps=values.pop("steps", 10), trainer="olmo-core", **values)
    t.validate(sequence_length=64)
    return t


def test_a_build_computes_the_targeted_trainers_order():
    t = olmo_core_training(global_batch_size_tokens=64 * 8, seed=3, max_target_sequence_length=128)
    assert t.global_batch_size == 8 and t.instance_group(64) == 2
    assert np.array_equal(training_order(t, 1001, 64), olmo_core_order(1000, 8, 3, 2))
    legacy = TrainingConfig(global_batch_size=8, steps=10, seed=3)
    legacy.validate()
    assert np.array_equal(training_order(legacy, 1001, 64), ai2_olmo_order(1001, 3))


@pytest.mark.parametrize("values, field", [
    ({"global_batch_size_tokens": None}, "training.global_batch_size_tokens"),
    ({"global_batch_size_tokens": 100}, "training.global_batch_size_tokens"),
    ({"global_batch_size_tokens": 512, "global_batch_size": 4}, "training.global_batch_size"),
    ({"global_batch_size_tokens": 512, "drop_last": True}, "training.drop_last"),
    ({"global_batch_size_tokens": 512, "max_target_sequence_length": 96}, "training.max_target_sequence_length"),
    ({"global_batch_size_tokens": 512, "trainer": "olmo-cor"}, "training.trainer"),
])
def test_olmo_core_settings_are_checked_by_name(values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ":"):
        TrainingConfig(steps=10, **{"trainer": "olmo-core", **values}).validate(sequence_length=64)


def test_olmo_core_settings_are_refused_for_ai2_olmo():
    with pytest.raises(ConfigError, match=r"training\.global_batch_size_tokens: an OLMo-core setting"):
        TrainingConfig(global_batch_size=8, steps=10, global_batch_size_tokens=512).validate()
    with pytest.raises(ConfigError, match=r"training\.global_batch_size: required"):
        TrainingConfig(steps=10).validate()


# --- builds made for OLMo-core, read by OLMo-core's own data loader -------------------------------------------

L_BUILD, B_BUILD, STEPS = 64, 6, 12
BUILDS = {  # name: (tokenizer, placement, max_target_sequence_length)
    "neox-start": ("allenai/gpt-neox-olmo-dolma-v1_5", "sequence-start", None),
    "dolma2-boundary-grouped": ("allenai/dolma2-tokenizer", "document-boundary", 2 * L_BUILD),
}


@pytest.fixture(scope="module")
def olmo_core_builds(tmp_path_factory) -> dict[str, Path]:
    import yaml

    from conftest import docs, make_texts, run_cli, write_shard

    work = tmp_path_factory.mktemp("olmo-core-builds")
    write_shard(work / "corpus" / "a.jsonl", docs(make_texts(300, seed=5)))
    builds = {}
    for name, (tokenizer, placement, target) in BUILDS.items():
        training = {"trainer": "olmo-core", "global_batch_size_tokens": B_BUILD * L_BUILD, "steps": STEPS, "seed": 11}
        if target:
            training["max_target_sequence_length"] = target
        config = {"inputs": [str(work / "corpus")], "sequence_length": L_BUILD, "tokenizer": tokenizer,
                  "placement": placement, "instances_per_file": 16, "training": training,
                  "tasks": [{"name": "mod97", "task": "modular_addition", "params": {"modulus": 97}, "encoding": "tokens",
                             "schedule": {"kind": "even", "rate": 2.5},
                             **({"number_tokens": "offset", "token_offset": 1000} if "dolma2" in tokenizer else {})},
                            {"name": "cmp", "task": "comparison", "params": {"digits": 2}, "schedule": {"kind": "even", "rate": 1}}]}
        (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
        assert run_cli("build", work / f"{name}.yaml", "--out", work / name) == 0
        builds[name] = work / name
    return builds


@pytest.fixture(scope="module")
def olmo_core_reads(olmo_core_builds, tmp_path_factory) -> dict:
    """What OLMo-core's own NumpyFSLDataLoader yields over each build, for 1, 2 and 3 ranks."""
    runs, keys = [], []
    for name, build in olmo_core_builds.items():
        manifest = json.loads((build / "manifest.json").read_text())
        t = manifest["injection"]["training"]
        for world_size in (1, 2, 3):
            runs.append({"paths": [str(build / f["path"]) for f in manifest["outputs"]], "dtype": manifest["dtype"],
                         "sequence_length": L_BUILD, "batch_instances": t["global_batch_size"], "seed": t["seed"],
                         "max_target_sequence_length": t["max_target_sequence_length"], "world_size": world_size,
                         "steps": STEPS, "pad_token_id": manifest["tokenizer"]["pad_token_id"],
                         "eos_token_id": manifest["tokenizer"]["eos_token_id"], "vocab_size": 200_000})
            keys.append((name, world_size))
    arrays = run_olmo_core("batches", {"runs": runs}, tmp_path_factory.mktemp("olmo-core-reads"))
    return {key: {k: v for k, v in arrays.items() if k.split("_")[-3] == str(run)} for run, key in enumerate(keys)}


@pytest.mark.parametrize("name", list(BUILDS))
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_olmo_core_reads_every_planned_example_in_its_planned_batch(olmo_core_builds, olmo_core_reads, name, world_size):
    from inject.ledger import read_ledger

    build = olmo_core_builds[name]
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["injection"]["training"]["trainer"] == "olmo-core"
    reads = olmo_core_reads[(name, world_size)]
    run = next(k for k in reads if k.startswith("index_")).split("_")[1]
    t = from_dict(TrainingConfig, manifest["injection"]["training"])
    order = training_order(t, manifest["injection"]["num_instances"], L_BUILD)
    files = [np.fromfile(build / f["path"], dtype=manifest["dtype"]) for f in manifest["outputs"]]
    flat = np.concatenate([f[: len(f) // L_BUILD * L_BUILD] for f in files]).reshape(-1, L_BUILD)  # whole files of 16
    eos = manifest["tokenizer"]["eos_token_id"]
    ledger = read_ledger(build)
    seen = 0
    for step in range(1, STEPS + 1):
        batch = order[(step - 1) * B_BUILD : step * B_BUILD]
        rows = {}
        for rank in range(world_size):
            index = reads[f"index_{run}_{rank}_{step}"]
            ids = reads[f"input_ids_{run}_{rank}_{step}"]
            assert index.tolist() == batch[rank::world_size].tolist(), (step, rank)  # the planned order, rank by rank
            for r, i in enumerate(index):
                assert np.array_equal(ids[r], flat[i]), (step, rank, int(i))  # instance i: the build's tokens
                rows[int(i)] = ids[r]
        assert sorted(rows) == sorted(batch.tolist())
        planned = ledger[ledger["step"] == step]
        assert len(planned)
        for row in planned:  # the ledger's instance is in the batch and holds an example, EOS-delimited, there
            tokens = rows[int(row["instance"])]
            offset, length = int(row["offset"]), int(row["length"])
            assert tokens[offset + length - 1] == eos and (offset == 0 or tokens[offset - 1] == eos)
            seen += 1
    assert seen == len(ledger)


@pytest.mark.parametrize("name", list(BUILDS))
def test_verify_replays_an_olmo_core_build(olmo_core_builds, name, capsys):
    from conftest import run_cli

    assert run_cli("verify", olmo_core_builds[name]) == 0
    out = capsys.readouterr().out
    assert "OLMo-core 3.0.0's order" in out, out


def test_ai2_olmo_train_refuses_an_olmo_core_build(olmo_core_builds, tmp_path, capsys):
    import yaml

    from conftest import run_cli
    from test_train import TINY

    build = olmo_core_builds["neox-start"]
    config = yaml.safe_load(TINY.read_text())
    config["max_duration"] = 2
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("train", tmp_path / "train.yaml", "--data", build, "--run", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "training.trainer is 'ai2-olmo'" in err and "'olmo-core'" in err, err
    assert not (tmp_path / "run").exists()


def test_files_must_hold_whole_groups_of_max_target_sequence_length():
    from inject.config import BuildConfig

    training = {"trainer": "olmo-core", "global_batch_size_tokens": 512, "steps": 4, "max_target_sequence_length": 192}
    config = from_dict(BuildConfig, {"inputs": ["x.jsonl"], "sequence_length": 64, "instances_per_file": 100,
                                     "training": training})
    with pytest.raises(ConfigError, match=r"instances_per_file: 100 is not a multiple of .* = 3"):
        config.validate()
    config.instances_per_file = 99
    config.validate()
    assert config.training.global_batch_size == 8 and config.training.instance_group(64) == 3


@pytest.mark.parametrize("name, args", [
    ("neox-start", ["--ranks", "3"]),
    ("dolma2-boundary-grouped", ["--ranks", "2", "--sample", "7"]),
])
def test_verify_reads_an_olmo_core_build_with_olmo_cores_own_loader(olmo_core_builds, name, args, capsys):
    from conftest import run_cli

    assert run_cli("verify", olmo_core_builds[name], "--olmo-core-python", olmo_core_python(), *args) == 0
    out = capsys.readouterr().out
    ranks = args[1]
    assert f"OLMo-core's own NumpyFSLDataLoader, {ranks} rank(s)" in out, out


def test_verify_names_a_batch_where_olmo_cores_loader_and_the_build_order_differ(olmo_core_builds, monkeypatch, capsys):
    import inject.trainers.olmo_core
    from conftest import run_cli

    real = inject.trainers.olmo_core.training_order

    def swapped(*args):  # the build's order with batches 2 and 3 swapped
        order = real(*args).copy()
        order[B_BUILD : 2 * B_BUILD], order[2 * B_BUILD : 3 * B_BUILD] = order[2 * B_BUILD : 3 * B_BUILD].copy(), order[B_BUILD : 2 * B_BUILD].copy()
        return order

    monkeypatch.setattr(inject.trainers.olmo_core, "training_order", swapped)
    assert run_cli("verify", olmo_core_builds["neox-start"], "--olmo-core-python", olmo_core_python()) == 1
    out = capsys.readouterr().out
    assert "step 2: OLMo-core's loader gives rank 0 of 1 instances" in out, out
    assert "step 3: OLMo-core's loader gives rank 0 of 1 instances" in out and "step 4:" not in out, out


@pytest.mark.parametrize("args, message", [
    (["--ranks", "4", "--olmo-core-python", "python"], "--ranks: 4 ranks do not split a batch of 6 instances"),
    (["--ranks", "2"], "--ranks: only with --olmo-core-python"),
    (["--olmo-core-python", "/nonexistent/python"], "--olmo-core-python: cannot run /nonexistent/python"),
])
def test_verify_refuses_bad_olmo_core_options(olmo_core_builds, args, message, capsys):
    from conftest import run_cli

    assert run_cli("verify", olmo_core_builds["neox-start"], *args) == 2
    assert message in capsys.readouterr().err


def test_the_data_block_of_an_olmo_core_build_carries_olmo_cores_order_fields(olmo_core_builds):
    import yaml

    block = yaml.safe_load((olmo_core_builds["dolma2-boundary-grouped"] / "olmo-data.yaml").read_text())
    assert block["dataset"] == {"sequence_length": L_BUILD, "max_target_sequence_length": 2 * L_BUILD}
    assert block["data_loader"] == {"global_batch_size": B_BUILD * L_BUILD, "seed": 11}
    assert "global_train_batch_size" not in block and "epoch" not in block  # ai2-olmo's fields would read another order


def test_verify_checks_an_olmo_core_run_config_field_by_field(olmo_core_builds, tmp_path, capsys):
    import yaml

    from conftest import run_cli
    from inject.trainers import olmo_core

    build = olmo_core_builds["neox-start"]
    template = yaml.safe_load((ROOT / "olmo_configs" / "olmo_core" / "tiny.yaml").read_text())
    template["data"] = {"seed": 11}
    template["train"].update(max_steps=STEPS, rank_microbatch_tokens=L_BUILD)
    good = tmp_path / "template.yaml"
    good.write_text(yaml.safe_dump(template))
    # The template and the run's completed config (what `train` writes to RUN/config.yaml) both match the build.
    completed = tmp_path / "config.yaml"
    completed.write_text(olmo_core.render(olmo_core.resolve_train_config(good, build, tmp_path / "run")))
    for config in (good, completed):
        assert run_cli("verify", build, "--train-config", config, "--sample", 2) == 0, capsys.readouterr().out
        assert f"train config: {config}" in capsys.readouterr().out
    bad = yaml.safe_load(completed.read_text())
    bad["data"]["seed"], bad["tokenizer"]["eos_token_id"], bad["train"]["max_steps"] = 12, 0, STEPS + 1
    bad["data"]["paths"] = bad["data"]["paths"][::-1]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert run_cli("verify", build, "--train-config", tmp_path / "bad.yaml", "--sample", 2) == 1
    out = capsys.readouterr().out
    assert "data.seed is 12, the build was made for 11" in out
    assert "tokenizer.eos_token_id is 0, the build was made for 50279" in out
    assert f"train.max_steps {STEPS + 1} exceeds the {STEPS} steps the plan covers" in out
    assert "data.paths are not the build's" in out
    # ai2-olmo's TrainConfig would not read this build's order at all.
    assert run_cli("verify", build, "--train-config", ROOT / "olmo_configs" / "tiny.yaml", "--sample", 2) == 1
    assert "a run config for ai2-olmo (its `trainer`), the build was made for olmo-core" in capsys.readouterr().out
