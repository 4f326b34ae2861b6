"""Training with OLMo-core 3.0.0's own Trainer on an OLMo-core build (CPU, gloo): every rank trains on the planned
instances step by step, a killed run resumes with the same batches and weights, SIGUSR2/SIGTERM save and stop,
configs that disagree with the build are refused. The OLMo-core side runs in its own environment
(tests/install-olmo-core.sh); without it these tests skip, and fail under CI=true."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import docs, make_texts, run_cli, write_shard
from inject.ledger import read_ledger
from inject.order import olmo_core_order
from inject.trainers.olmo_core import checkpoint_steps
from test_order_olmo_core import olmo_core_python

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "olmo_configs" / "olmo_core" / "tiny.yaml"
STEPS = 10
"""Steps of the test runs (the build plans more: a run may stop before the plan's end)."""
SHORT = [f"--train.max_steps={STEPS}", "--train.save_interval=5", "--train.log_interval=5"]


def build(work: Path, training: dict) -> Path:
    """A build of a small corpus with two comparison examples a step, for `training`'s trainer."""
    if not (work / "corpus").exists():
        write_shard(work / "corpus" / "a.jsonl", docs(make_texts(1200, seed=5)))
    config = {"inputs": [str(work / "corpus")], "sequence_length": 64, "tokenizer": "allenai/gpt-neox-olmo-dolma-v1_5",
              "placement": "sequence-start", "instances_per_file": 64, "training": training,
              "tasks": [{"name": "cmp", "task": "comparison", "params": {"digits": 2}, "schedule": {"kind": "even", "rate": 2}}]}
    (work / "build.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", work / "build.yaml", "--out", work / "build") == 0
    return work / "build"


@pytest.fixture(scope="module")
def oc_build(tmp_path_factory) -> Path:
    """An OLMo-core build with tiny.yaml's order settings (sequence 64, 1,024 tokens = 16 instances a batch, seed
    6198), planned for 40 steps."""
    tiny = yaml.safe_load(TINY.read_text())["data"]
    assert tiny["sequence_length"] == 64
    return build(tmp_path_factory.mktemp("oc-train"), {"trainer": "olmo-core", "steps": 40, "seed": tiny["seed"],
                                                        "global_batch_size_tokens": tiny["global_batch_size_tokens"]})


def train_args(build: Path, run: Path, *more) -> list[str]:
    return ["train", str(TINY), "--data", str(build), "--run", str(run), "--olmo-core-python", str(olmo_core_python()),
            *SHORT, *more]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """`olmo-inject train` as its own process (session), as a user or SLURM starts it; its output in `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "inject.cli", *args], start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.time() + 600
    while not condition():
        assert process.poll() is None, f"training ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} in 10 minutes:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def exit_after_stop(process: subprocess.Popen, log: Path) -> int:
    """The exit code of a launcher that was told to stop (its log's tail when it does not within 5 minutes)."""
    try:
        return process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"training did not stop:\n{log.read_text()[-5000:]}") from None


def trained_steps(run: Path, rank: int = 0) -> dict[int, list[int]]:
    """Instance indices of every step rank `rank` trained on (RUN/data-indices/rank{r}.tsv); each step once."""
    steps = {}
    for line in (run / "data-indices" / f"rank{rank}.tsv").read_text().splitlines():
        step, indices = line.split("\t")
        assert int(step) not in steps, f"step {step} written twice"
        steps[int(step)] = [int(i) for i in indices.split()]
    return steps


def metrics_rows(run: Path) -> dict[int, dict]:
    """RUN/metrics.jsonl by step; each step once."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows), "a step written twice"
    return {r["step"]: r for r in rows}


def planned_order(build: Path) -> tuple[np.ndarray, int]:
    manifest = json.loads((build / "manifest.json").read_text())
    t = manifest["injection"]["training"]
    return olmo_core_order(manifest["injection"]["num_instances"], t["global_batch_size"], t["seed"]), t["global_batch_size"]


def assert_trained_on_the_plan(build: Path, run: Path, world_size: int) -> None:
    """Every step 1..STEPS: rank r's instances are row[r::W] of the build's order, and every example the ledger
    plans for the step lies in an instance of that step."""
    order, B = planned_order(build)
    ranks = [trained_steps(run, r) for r in range(world_size)]
    ledger = read_ledger(build)
    for rank, steps in enumerate(ranks):
        assert sorted(steps) == list(range(1, STEPS + 1)), rank
        for step, indices in steps.items():
            assert indices == order[(step - 1) * B : step * B][rank::world_size].tolist(), (rank, step)
    for step in range(1, STEPS + 1):
        batch = {i for steps in ranks for i in steps[step]}
        planned = ledger[ledger["step"] == step]
        assert len(planned) == 2 and all(int(i) in batch for i in planned["instance"]), step


def model_states(checkpoints: list[Path], tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    """The model weights of OLMo-core checkpoints (torch distributed checkpoints, unsharded by OLMo-core in its
    environment, all in one process)."""
    script = ("import sys; from olmo_core.distributed.checkpoint import unshard_checkpoint\n"
              "for i, path in enumerate(sys.argv[2:]):\n"
              "    print(unshard_checkpoint(path, f'{sys.argv[1]}/{i}', optim=False, quiet=True)[0])")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(olmo_core_python()), "-c", script, str(tmp_path / "unsharded"),
                             *(str(c / "model_and_optim") for c in checkpoints)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(line, weights_only=True) for line in result.stdout.split()]


@pytest.fixture(scope="module")
def one_rank_run(oc_build, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("oc-run") / "one"
    assert run_cli(*train_args(oc_build, run)) == 0
    return run


def test_one_rank_trains_on_the_planned_instances_step_by_step(oc_build, one_rank_run):
    assert_trained_on_the_plan(oc_build, one_rank_run, 1)
    assert checkpoint_steps(one_rank_run) == [0, 1, 2, 4, 5, 10]  # init, dense early, every 5, the end
    metrics = metrics_rows(one_rank_run)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert metrics[1]["learning_rate"] == pytest.approx(1e-4)  # tiny.yaml: lr 1e-3, 10 warmup steps
    assert metrics[STEPS]["loss"] < metrics[1]["loss"] and metrics[STEPS]["tokens_seen"] == STEPS * 1024
    config = yaml.safe_load((one_rank_run / "config.yaml").read_text())
    assert config["data"]["seed"] == 6198 and config["model"]["vocab_size"] == 50304
    assert config["tokenizer"]["eos_token_id"] == 50279 and len(config["data"]["paths"]) > 1


def test_a_killed_run_resumes_with_the_same_batches_and_weights(oc_build, one_rank_run, tmp_path):
    run = tmp_path / "killed"
    log = tmp_path / "killed.log"
    process = start(train_args(oc_build, run), log)
    wait_for(lambda: 5 in checkpoint_steps(run) and 5 in metrics_rows(run), process, "the step-5 checkpoint", log)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert max(checkpoint_steps(run)) < STEPS
    assert run_cli(*train_args(oc_build, run)) == 0
    assert trained_steps(run) == trained_steps(one_rank_run)  # the steps after the checkpoint were cut and redone
    losses = {step: row["loss"] for step, row in metrics_rows(run).items()}
    assert losses == {step: row["loss"] for step, row in metrics_rows(one_rank_run).items()}
    resumed, whole, start_weights = model_states([run / f"step{STEPS}", one_rank_run / f"step{STEPS}", run / "step0"],
                                                 tmp_path)
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # bitwise, on CPU
    assert any(not torch.equal(start_weights[k], whole[k]) for k in whole)  # it did train


def test_a_complete_run_trains_nothing(oc_build, one_rank_run, capsys):
    before = sorted(p.name for p in one_rank_run.iterdir())
    indices = (one_rank_run / "data-indices" / "rank0.tsv").read_text()
    assert run_cli(*train_args(oc_build, one_rank_run)) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert sorted(p.name for p in one_rank_run.iterdir()) == before
    assert (one_rank_run / "data-indices" / "rank0.tsv").read_text() == indices


def test_two_fsdp_ranks_train_on_their_halves_stop_on_usr2_and_term_resume_and_train_like_one(oc_build, one_rank_run,
                                                                                            tmp_path):
    """torchrun with 2 gloo processes, FSDP (sharded parameters and checkpoints): each rank trains on its row[r::2] of
    every planned batch. SIGUSR2 (SLURM's warning before preemption or the time limit) and SIGTERM (scontrol
    requeue) to the launcher each stop both ranks after the current step with a checkpoint there; reruns resume from
    it, every step is trained once, and the final weights are the one-rank run's up to float reassociation."""
    run = tmp_path / "two"
    args = train_args(oc_build, run, "--nproc", "2", "--train.data_parallel=fsdp")
    for signum in (signal.SIGUSR2, signal.SIGTERM):
        done = max(checkpoint_steps(run), default=0)
        log = tmp_path / f"{signum.name}.log"
        process = start(args, log)
        wait_for(lambda: (run / "data-indices" / "rank1.tsv").exists() and max(trained_steps(run, 1), default=0) > done + 1,
                 process, f"step {done + 2}", log)
        process.send_signal(signum)
        assert exit_after_stop(process, log) == 0
        stopped = max(checkpoint_steps(run))
        assert done + 2 <= stopped < STEPS, signum  # saved where it stopped, not at the end
        assert sorted(trained_steps(run, 0)) == sorted(trained_steps(run, 1)) == list(range(1, stopped + 1))
    assert run_cli(*args) == 0
    assert max(checkpoint_steps(run)) == STEPS
    assert_trained_on_the_plan(oc_build, run, 2)
    assert sorted(metrics_rows(run)) == list(range(1, STEPS + 1))
    two, one = model_states([run / f"step{STEPS}", one_rank_run / f"step{STEPS}"], tmp_path)
    assert two.keys() == one.keys()
    assert all(torch.allclose(two[k], one[k], atol=1e-5, rtol=1e-4) for k in one), \
        max(float((two[k] - one[k]).abs().max()) for k in one)
    from inject.trainers import olmo_core

    model, _ = olmo_core.read_model(run / f"step{STEPS}")  # eval's in-process read of the sharded checkpoint
    ours = dict(model.named_parameters())
    assert sorted(ours) == sorted(olmo_core.hf_name(k) for k in two)
    assert all(torch.equal(ours[olmo_core.hf_name(k)], two[k]) for k in two)  # = OLMo-core's own unsharding


def test_train_refuses_an_olmo_core_config_that_does_not_match_the_build(oc_build, tmp_path, capsys):
    run = tmp_path / "refused"
    assert run_cli(*train_args(oc_build, run, "--data.seed=1", "--data.global_batch_size_tokens=512")) == 2
    err = capsys.readouterr().err
    assert "data.seed is 1" in err and "needs 6198" in err and "data.global_batch_size_tokens is 512" in err, err
    assert str(TINY) in err and str(oc_build) in err
    assert run_cli(*train_args(oc_build, run, "--train.max_steps=41")) == 2
    assert "train.max_steps is 41" in capsys.readouterr().err
    assert not run.exists()


def test_train_refuses_an_ai2_olmo_build_for_an_olmo_core_config(oc_build, tmp_path, capsys):
    ai2_build = build(tmp_path, {"global_batch_size": 16, "steps": 40, "seed": 6198})  # ai2-olmo's order (the default)
    capsys.readouterr()
    assert run_cli(*train_args(ai2_build, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "trainer is 'olmo-core'" in err and "made for 'ai2-olmo'" in err, err
    assert not (tmp_path / "run").exists()


def test_eval_reads_the_runs_checkpoints_with_olmo_cores_own_logits(oc_build, one_rank_run, tmp_path, capsys):
    """The checkpoints the Trainer wrote are eval's: every step found, the last one scored, its in-process model
    (transformers' Olmo2) giving OLMo-core's own logits (tests/test_eval_olmo_core.py checks the rest of eval)."""
    from eval.checkpoints import find_checkpoints
    from inject.trainers import olmo_core

    assert [(c.step, c.format) for c in find_checkpoints(one_rank_run)] == \
           [(s, "olmo-core") for s in checkpoint_steps(one_rank_run)]
    last = one_rank_run / f"step{STEPS}"
    assert run_cli("eval", last, "--data", oc_build, "--out", tmp_path / "eval", "--seen", 5, "--pending", 5,
                   "--held-out", 5) == 0
    assert f"evaluated steps [{STEPS}]" in capsys.readouterr().out
    tokens = np.random.default_rng(0).integers(0, 50280, size=(2, 20)).tolist()
    model_block = yaml.safe_load((one_rank_run / "config.yaml").read_text())["model"]
    olmo_core.run_child("forward", {"checkpoint": str(last), "model": model_block, "vocab_size": model_block["vocab_size"],
                                    "tokens": tokens, "out": str(tmp_path / "logits.npy")}, str(olmo_core_python()))
    model, _ = olmo_core.read_model(last)
    with torch.no_grad():
        ours = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, np.load(tmp_path / "logits.npy"), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ slurm submit for OLMo-core runs


def test_slurm_sizes_an_olmo_core_run_with_olmo_cores_own_parameter_count():
    """An OLMo-core run config in a submission: its steps (train.max_steps), nodes from OLMo-core's own parameter
    count (child.py params) and the data block's batch, a script that calls `olmo-inject train` on it and
    recognizes the complete run by OLMo-core's checkpoint marker."""
    from slurm.jobs import Submission
    from slurm.profile import load_profile
    from slurm.submit import training_for

    profile = load_profile("example-8gpu")
    config = ROOT / "olmo_configs" / "olmo_core" / "reference" / "1B.yaml"
    t = training_for(config, ["train.max_steps=1000"], profile)
    assert (t.trainer, t.steps, t.nodes) == ("olmo-core", 1000, 1)
    sizes = yaml.safe_load((ROOT / "olmo_configs" / "olmo_core" / "sizes.yaml").read_text())
    assert f"{sizes['1B']['olmo_core_params_without_input_embedding']:,d} params" in t.estimate
    sub = Submission(runs=Path("/scratch/runs"), data=Path("/scratch/build"), profile=profile, trainings=[t])
    script = next(job.script for job in sub.jobs() if job.kind == "train")
    assert f"olmo-inject train {config} --data /scratch/build --run /scratch/runs/1B" in script
    assert "--train.max_steps=1000" in script and "[ -e /scratch/runs/1B/step1000/.metadata.json ]" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_the_slurm_script_of_an_olmo_core_run_trains_it(oc_build, tmp_path):
    """The rendered training script (local-cpu profile) run by bash, srun standing in as a plain exec: it trains
    the OLMo-core run to its end, on the plan, and exits 0 without requeueing."""
    from slurm.jobs import Submission
    from slurm.profile import load_profile
    from slurm.submit import training_for

    profile = load_profile("local-cpu")
    t = training_for(TINY, ["train.max_steps=3", "train.save_interval=3"], profile)
    sub = Submission(runs=tmp_path / "runs", data=oc_build, profile=profile, trainings=[t], eval_args=None,
                     workdir=ROOT)
    script = next(job.script for job in sub.jobs() if job.kind == "train")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho requeue >> \"$REQUEUED\"\n")
    (bin_dir / "olmo-inject").write_text(f'#!/bin/bash\nexec {sys.executable} -m inject.cli "$@" '
                                         f'--olmo-core-python {olmo_core_python()}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "78",
           "SLURM_JOB_NODELIST": "node1", "SLURM_CPUS_PER_TASK": "1", "REQUEUED": str(tmp_path / "requeued")}
    job = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert checkpoint_steps(run) == [0, 1, 2, 3] and not (tmp_path / "requeued").exists()
    order, B = planned_order(oc_build)
    assert trained_steps(run) == {s: order[(s - 1) * B : s * B].tolist() for s in (1, 2, 3)}


def test_a_checkpoint_that_needs_other_classes_is_refused_before_resuming(oc_build, one_rank_run, tmp_path, capsys):
    """OLMo-core un-pickles the trainer state it resumes from: the launcher first reads it with the allowlist and
    refuses one that names any other global (here datetime.date), naming the file; no trainer starts."""
    import datetime
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "build.json"):
        shutil.copy(one_rank_run / name, run / name)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["save_folder"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copytree(one_rank_run / "step5", run / "step5")
    torch.save({"when": datetime.date(2026, 1, 1)}, run / "step5" / "train" / "rank0.pt")
    assert run_cli(*train_args(oc_build, run)) == 2
    err = capsys.readouterr().err
    assert str(run / "step5" / "train" / "rank0.pt") in err and "datetime" in err, err
    assert checkpoint_steps(run) == [5] and not (run / "data-indices").exists()
