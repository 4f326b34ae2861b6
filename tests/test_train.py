"""Training with ai2-olmo's Trainer on CPU: the tiny model learns, checkpoints load, a killed run resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from inject.cli import EXAMPLES_DIR
from inject.injection import olmo_order
from inject.sample import write_demo_corpus

TINY = Path(__file__).parent.parent / "olmo_configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("demo")
    write_demo_corpus(work / "corpus")
    shutil.copyfile(EXAMPLES_DIR / "demo.yaml", work / "build.yaml")
    assert run_cli("build", work / "build.yaml", "--out", work / "build") == 0
    return work / "build"


def step_indices(run: Path) -> dict[int, list[int]]:
    """Instance indices of every step, as OLMo's trainer wrote them."""
    steps = {}
    with open(run / "data-indices" / "rank0.tsv") as f:
        for line in f:
            step, *indices = line.split()
            assert int(step) not in steps, f"step {step} written twice"
            steps[int(step)] = [int(i) for i in indices]
    return steps


def mean_loss(checkpoint: Path, build: Path, batches: int = 4) -> float:
    from olmo.model import OLMo

    model = OLMo.from_checkpoint(checkpoint, device="cpu").eval()
    manifest = json.loads((build / "manifest.json").read_text())
    tokens = np.fromfile(build / manifest["outputs"][-1]["path"], dtype=np.uint16)
    L = manifest["sequence_length"]
    x = torch.from_numpy(tokens[: batches * 8 * L].astype(np.int64).reshape(batches * 8, L))
    with torch.no_grad():
        logits = model(x).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_trains_100_steps_on_the_demo_build(demo_build, tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = tmp_path / "tiny-wandb.yaml"  # ai2-olmo's own wandb block; offline: no network, files under RUN/wandb
    config.write_text(TINY.read_text().replace("wandb: null", "wandb: {project: olmo-inject-test, entity: null, log_interval: 25}"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run_cli("train", config, "--data", demo_build, "--run", run) == 0
    saved = sorted(int(p.name[4:].split("-")[0]) for p in run.glob("step*-unsharded"))
    assert saved == [0, 1, 2, 4, 8, 16, 25, 50, 75, 100]  # dense early, then every 25
    assert mean_loss(run / "step100-unsharded", demo_build) < mean_loss(run / "step0-unsharded", demo_build) - 1.0
    # The batches the trainer saw are OLMo's order over the build, which the injection was planned for.
    manifest = json.loads((demo_build / "manifest.json").read_text())
    order = olmo_order(manifest["injection"]["num_instances"], 32, 6198, False)
    indices = step_indices(run)
    assert sorted(indices) == list(range(1, 101))
    assert all(indices[s] == order[(s - 1) * 32 : s * 32].tolist() for s in indices)
    # metrics.jsonl: one row per step; the loss falls; 32 x 256 more tokens each step.
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 101))
    assert all(r["loss"] > 0 and r["learning_rate"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert np.mean([r["loss"] for r in rows[-10:]]) < np.mean([r["loss"] for r in rows[:10]]) - 1.0
    assert [r["tokens_seen"] for r in rows] == [s * 32 * 256 for s in range(1, 101)]
    assert all(r["tokens_per_second"] > 0 for r in rows[1:])
    [offline] = (run / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))


def test_a_killed_run_resumes_with_the_same_batches_and_weights(demo_build, tmp_path):
    args = ["train", str(TINY), "--data", str(demo_build), "--max_duration=20"]
    assert run_cli(*args, "--run", tmp_path / "full") == 0
    killed = subprocess.Popen([sys.executable, "-m", "inject.cli", *args, "--run", str(tmp_path / "killed")],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "step8-unsharded").exists():
        assert killed.poll() is None and time.time() < deadline, "training ended before step 8"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "step20-unsharded").exists()
    assert run_cli(*args, "--run", tmp_path / "killed") == 0
    assert step_indices(tmp_path / "killed") == step_indices(tmp_path / "full")
    assert [r["step"] for r in metrics(tmp_path / "killed")] == list(range(1, 21))  # each step once
    full = torch.load(tmp_path / "full" / "step20-unsharded" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "step20-unsharded" / "model.pt", weights_only=True)
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # bitwise equal on CPU


def test_train_refuses_a_config_that_does_not_match_the_build(demo_build, tmp_path, capsys):
    code = run_cli("train", TINY, "--data", demo_build, "--run", tmp_path / "r", "--global_train_batch_size=16", "--seed=1")
    err = capsys.readouterr().err
    assert code == 2
    assert "global_train_batch_size is 16" in err and "needs 32" in err and "data.seed (or seed) is 1" in err
    code = run_cli("train", TINY, "--data", demo_build, "--run", tmp_path / "r", "--max_duration=101")
    assert code == 2 and "at most 100 steps" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_sigusr2_or_sigterm_saves_a_checkpoint_and_stops_then_the_run_resumes(demo_build, tmp_path):
    args = ["train", str(TINY), "--data", str(demo_build), "--max_duration=20", "--run", str(tmp_path / "run")]
    process = subprocess.Popen([sys.executable, "-m", "inject.cli", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (tmp_path / "run" / "step4-unsharded").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR2)  # what SLURM sends before a preemption or the time limit
    assert process.wait(timeout=600) == 0
    stopped = max(int(p.name[4:].split("-")[0]) for p in (tmp_path / "run").glob("step*-unsharded"))
    assert 4 <= stopped < 20  # saved where it stopped, not at the end
    assert sorted(step_indices(tmp_path / "run")) == list(range(1, stopped + 1))
    # SIGTERM to every process of the run, as `scontrol requeue` or a preemption sends it: the same save and stop.
    process = subprocess.Popen([sys.executable, "-m", "inject.cli", *args], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while len(step_indices(tmp_path / "run")) < stopped + 2:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=600) == 0
    termed = max(int(p.name[4:].split("-")[0]) for p in (tmp_path / "run").glob("step*-unsharded"))
    assert stopped + 2 <= termed < 20
    assert sorted(step_indices(tmp_path / "run")) == list(range(1, termed + 1))
    assert run_cli(*args) == 0
    assert (tmp_path / "run" / "step20-unsharded").exists()
    assert sorted(step_indices(tmp_path / "run")) == list(range(1, 21))


def test_two_processes_on_cpu_share_each_batch_and_train_like_one(demo_build, tmp_path):
    """torchrun with 2 gloo processes (DDP): the ranks' halves of every step make up the one-process batch,
    and the weights after 3 steps equal the one-process run's up to float reassociation."""
    from olmo.model import OLMo

    for nproc in (1, 2):
        assert run_cli("train", TINY, "--data", demo_build, "--run", tmp_path / f"n{nproc}", "--nproc", nproc,
                       "--max_duration=3") == 0
    one = step_indices(tmp_path / "n1")
    halves = [{int(l.split()[0]): [int(i) for i in l.split()[1:]]
               for l in (tmp_path / "n2" / "data-indices" / f"rank{r}.tsv").read_text().splitlines()} for r in (0, 1)]
    assert sorted(one) == [1, 2, 3]
    for step, batch in one.items():
        assert len(halves[0][step]) == len(halves[1][step]) == len(batch) // 2
        assert sorted(halves[0][step] + halves[1][step]) == sorted(batch)
    a = OLMo.from_checkpoint(tmp_path / "n1" / "step3-unsharded", device="cpu").state_dict()
    b = OLMo.from_checkpoint(tmp_path / "n2" / "step3-unsharded", device="cpu").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    start = OLMo.from_checkpoint(tmp_path / "n1" / "step0-unsharded", device="cpu").state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the runs did train


def test_two_nodes_meet_at_a_rendezvous_and_usr2_to_each_launcher_stops_them_together(demo_build, tmp_path):
    """What a 2-node SLURM job runs: one launcher per node (`--nnodes 2 --rendezvous HOST:PORT`, torchrun with
    a c10d rendezvous) and, on preemption, USR2 to every launcher (srun forwards it); the launchers pass it
    past torchrun's agent to the trainers, which stop at the same step; a restart resumes from there."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    args = ["train", str(TINY), "--data", str(demo_build), "--run", str(run), "--max_duration=20"]
    nodes = [subprocess.Popen([sys.executable, "-m", "inject.cli", *args, "--nproc", "1", "--nnodes", "2",
                               "--rendezvous", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(2)]
    deadline = time.time() + 600
    while not (run / "step4-unsharded").exists():
        assert all(n.poll() is None for n in nodes) and time.time() < deadline, "training ended before step 4"
        time.sleep(0.2)
    for node in nodes:
        node.send_signal(signal.SIGUSR2)
    assert [n.wait(timeout=600) for n in nodes] == [0, 0]
    stopped = max(int(p.name[4:].split("-")[0]) for p in run.glob("step*-unsharded"))
    assert 4 <= stopped < 20
    assert run_cli(*args, "--nproc", "2") == 0  # same world size, one node
    for rank in (0, 1):
        steps = [int(line.split()[0]) for line in (run / "data-indices" / f"rank{rank}.tsv").read_text().splitlines()]
        assert steps == list(range(1, 21))  # every step once per rank, across the stop
