"""One writer per build output, run folder and results folder; a run bound to its build; a killed launcher
takes its trainer with it; a complete run trains nothing more (issue 13 items 4-7, issue 17 item 2).

The second process of each pair is a real `olmo-inject` process, held still with SIGSTOP while it holds
its lock, so that nothing depends on timing. Training is the expensive part: one tiny run (killed, then
resumed) is shared by every test of the module."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import docs, make_texts, run_cli, write_shard
from inject.identity import build_identity
from inject.lock import FolderBusy, folder_lock

TINY = Path(__file__).parent.parent / "olmo_configs" / "tiny.yaml"
SMALL = ["--global_train_batch_size=8", "--device_train_microbatch_size=8", "--model.max_sequence_length=64"]
STEPS = 12
HOST = socket.gethostname()


def build_config(rate: float) -> dict:
    return {"inputs": ["c1.jsonl", "c2.jsonl"], "sequence_length": 64, "training": {"global_batch_size": 8, "steps": 60},
            "tasks": [{"name": "mod13", "task": "modular_addition", "params": {"modulus": 13}, "encoding": "tokens",
                       "pool": {"held_out": 0.5}, "schedule": {"kind": "even", "rate": rate}}]}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> Path:
    """FOLDER/build (rate 2) and FOLDER/other (rate 1), from FOLDER/b.yaml and FOLDER/other.yaml."""
    folder = tmp_path_factory.mktemp("lockbuilds")
    texts = make_texts(1500)
    write_shard(folder / "c1.jsonl", docs(texts[:750]))
    write_shard(folder / "c2.jsonl", docs(texts[750:], prefix="e"))
    (folder / "b.yaml").write_text(yaml.safe_dump(build_config(2)))
    (folder / "other.yaml").write_text(yaml.safe_dump(build_config(1)))
    assert run_cli("build", folder / "b.yaml", "--out", folder / "build") == 0
    assert run_cli("build", folder / "other.yaml", "--out", folder / "other") == 0
    return folder


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "inject.cli", *map(str, args)]


def lock_holders(lock_file: Path) -> list[int]:
    try:
        return [int(line.split("\t")[0]) for line in lock_file.read_text().splitlines() if line]
    except (FileNotFoundError, ValueError):
        return []


def wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"the process ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


STOP_WHEN_LOCKED = """
import os, runpy, signal, sys
from contextlib import contextmanager
from pathlib import Path
import inject.lock

take = inject.lock.folder_lock
target = Path(os.environ["STOP_WHEN_LOCKED"]).resolve()

@contextmanager
def folder_lock(lock_file, *args, **kwargs):
    with take(lock_file, *args, **kwargs) as held:
        if Path(lock_file).resolve() == target:
            os.kill(os.getpid(), signal.SIGSTOP)
        yield held

inject.lock.folder_lock = folder_lock  # before inject.cli imports the modules that take it
sys.argv[0] = "olmo-inject"
runpy.run_module("inject.cli", run_name="__main__")
"""


def stopped_while_locked(args: list, lock_file: Path) -> subprocess.Popen:
    """An `olmo-inject` process that stops itself (SIGSTOP) as soon as it holds `lock_file`: however fast
    the command is, the test finds it holding the lock."""
    process = subprocess.Popen([sys.executable, "-c", STOP_WHEN_LOCKED, *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "STOP_WHEN_LOCKED": str(lock_file)})
    wait_for(lambda: process_state(process.pid) == "T", f"{args[0]} to take its lock", process)
    assert process.pid in lock_holders(lock_file)
    return process


def process_state(pid: int) -> str:
    """R, S, T (stopped), Z, ... from /proc (empty when gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def killed(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def running(pid: int) -> bool:
    """Alive and not a zombie (a dead child not yet reaped)."""
    return process_state(pid) not in ("", "Z")


def processes_using(text: str) -> list[int]:
    """Pids of running processes whose command line contains `text` (a /proc scan)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid() and running(pid)]


def step_indices(run: Path) -> dict[int, list[int]]:
    steps = {}
    for line in (run / "data-indices" / "rank0.tsv").read_text().splitlines():
        step, *indices = line.split()
        assert int(step) not in steps, f"step {step} written twice"
        steps[int(step)] = indices
    return steps


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def outputs(build: Path) -> list:
    return [(f["path"], f["sha256"]) for f in json.loads((build / "manifest.json").read_text())["outputs"]]


# ------------------------------------------------------------------------------------------ the lock itself


def test_exclusive_and_shared_holders_exclude_each_other_and_name_the_holder(tmp_path):
    lock = tmp_path / "x.lock"
    with folder_lock(lock, "thing X"):
        with pytest.raises(FolderBusy, match=f"thing X is in use by pid {os.getpid()} on host {HOST}"):
            with folder_lock(lock, "thing X"):
                pass
        with pytest.raises(FolderBusy):
            with folder_lock(lock, "thing X", shared=True):
                pass
    assert not lock.exists()  # released and removed
    with folder_lock(lock, "thing X", shared=True), folder_lock(lock, "thing X", shared=True):
        assert lock_holders(lock) == [os.getpid(), os.getpid()]
        with pytest.raises(FolderBusy, match=f"pid {os.getpid()} on host {HOST}"):
            with folder_lock(lock, "thing X"):
                pass
    assert not lock.exists()


def test_a_lock_handed_to_a_child_outlives_its_dead_holder_until_the_child_ends(tmp_path):
    """What a SIGKILLed launcher leaves if its trainer survived: the recorded holder is dead, its child still
    holds the lock. A newcomer waits (up to `grace`) for the child, and is refused, naming the holder, if it
    does not end."""
    lock = tmp_path / "x.lock"
    holder = subprocess.run([sys.executable, "-c", (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from inject.lock import folder_lock\n"
        "held = folder_lock(Path(sys.argv[1]), 'x'); held.__enter__()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    os.close(1), os.close(2)\n"
        "    time.sleep(600)\n"  # the child keeps the locked file open
        "print(child, flush=True)\n"
        "os._exit(0)\n"), str(lock)], capture_output=True, text=True, timeout=60)
    child = int(holder.stdout)
    try:
        with pytest.raises(FolderBusy, match=f"still locked 0 s after its holder pid [0-9]+ on host {HOST}"):
            with folder_lock(lock, "thing X", grace=0):
                pass
    finally:
        os.kill(child, signal.SIGKILL)
    with folder_lock(lock, "thing X", grace=60):  # waits for the child's end, then holds the lock
        assert lock_holders(lock) == [os.getpid()]


# ------------------------------------------------------------------------------------------------- builds


def test_a_second_build_into_the_same_output_is_refused_and_a_killed_one_does_not_block(builds, tmp_path, capsys):
    out = tmp_path / "out"
    first = stopped_while_locked(["build", builds / "b.yaml", "--out", out], tmp_path / "out.lock")
    try:
        assert run_cli("build", builds / "b.yaml", "--out", out, "--overwrite") == 2
        err = capsys.readouterr().err
        assert f"the build output {out} is in use by pid {first.pid} on host {HOST}" in err
        assert not out.exists()
    finally:
        killed(first)  # SIGKILL: its lock goes with it
    assert run_cli("build", builds / "b.yaml", "--out", out) == 0
    assert outputs(out) == outputs(builds / "build")  # the same bytes as an undisturbed build
    assert not (tmp_path / "out.lock").exists() and not (tmp_path / "out.partial").exists()


def test_array_parts_run_together_and_a_finishing_build_waits_for_them(builds, tmp_path, capsys):
    out = tmp_path / "out"
    part0 = stopped_while_locked(["build", builds / "b.yaml", "--out", out, "--part", "0/2"], tmp_path / "out.lock")
    try:
        assert run_cli("build", builds / "b.yaml", "--out", out, "--part", "1/2") == 0  # shares the lock
        assert run_cli("build", builds / "b.yaml", "--out", out) == 2
        assert f"is in use by pid {part0.pid} on host {HOST}" in capsys.readouterr().err
        assert not out.exists()
    finally:
        part0.send_signal(signal.SIGCONT)
    assert part0.wait(timeout=600) == 0
    assert run_cli("build", builds / "b.yaml", "--out", out) == 0
    assert outputs(out) == outputs(builds / "build")


# -------------------------------------------------------------------- one run: killed, refused, resumed, done


@pytest.fixture(scope="module")
def run(builds, tmp_path_factory):
    """A tiny run of STEPS steps on FOLDER/build whose launcher was SIGKILLed during training (its trainer
    held still by SIGSTOP), with a second `train` tried meanwhile, then resumed to the end. Returns the run
    folder and what was observed on the way (the test below checks it)."""
    run = tmp_path_factory.mktemp("lockrun") / "run"
    args = ["train", TINY, "--data", builds / "build", "--run", run, *SMALL, f"--max_duration={STEPS}"]
    seen = {}
    launcher = subprocess.Popen(cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainers = []
    try:
        wait_for(lambda: (run / "step1-unsharded").exists(), "step 1", launcher)
        trainers = processes_using(str(run / "config.yaml"))
        for pid in trainers:
            os.kill(pid, signal.SIGSTOP)
        seen["second"] = subprocess.run(cli(*args), capture_output=True, text=True, timeout=600)
        launcher.kill()  # the visible `olmo-inject train`, alone
        launcher.wait()
        deadline = time.time() + 60
        while any(running(pid) for pid in trainers) and time.time() < deadline:
            time.sleep(0.05)
        seen["survivors"] = [pid for pid in trainers if running(pid)]
    finally:
        for pid in processes_using(str(run / "config.yaml")):  # what today's code left behind
            os.kill(pid, signal.SIGKILL)
    seen["trainers"] = trainers
    seen["stopped_at"] = sorted(int(p.name[4:].split("-")[0]) for p in run.glob("step*-unsharded"))[-1]
    seen["resumed"] = subprocess.run(cli(*args), capture_output=True, text=True, timeout=900)
    return run, args, seen


def test_a_killed_launcher_takes_its_trainer_along_and_a_second_trainer_is_refused(run):
    run, args, seen = run
    assert seen["trainers"], "no trainer process found"
    second = seen["second"]
    assert second.returncode == 2
    assert f"the run folder {run} is in use by pid" in second.stderr and f"on host {HOST}" in second.stderr
    assert seen["survivors"] == []  # the trainer died with its launcher
    assert seen["stopped_at"] < STEPS
    assert seen["resumed"].returncode == 0, seen["resumed"].stderr[-3000:]
    assert sorted(step_indices(run)) == list(range(1, STEPS + 1))  # every step once


def test_a_complete_run_trains_nothing_more(run):
    run, args, seen = run
    before = (run / "data-indices" / "rank0.tsv").read_text()
    result = subprocess.run(cli(*args), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0
    assert f"is complete (its latest checkpoint is step {STEPS}" in result.stdout
    assert not (run / f"step{STEPS + 1}-unsharded").exists()
    assert (run / "data-indices" / "rank0.tsv").read_text() == before


def test_a_run_is_bound_to_its_build_and_refuses_it_replaced(builds, run):
    run, args, seen = run
    record = json.loads((run / "build.json").read_text())
    assert record["path"] == str((builds / "build").resolve())
    assert record["manifest_sha256"] == hashlib.sha256((builds / "build" / "manifest.json").read_bytes()).hexdigest()
    before = tree(run)
    try:
        assert run_cli("build", builds / "other.yaml", "--out", builds / "build", "--overwrite") == 0
        result = subprocess.run(cli(*args), capture_output=True, text=True, timeout=600)
        assert result.returncode == 2
        assert "this run started on the build" in result.stderr and "config.tasks.0.schedule.rate: 2.0 -> 1.0" in result.stderr
        assert f"manifest sha256 {record['manifest_sha256'][:12]} vs " in result.stderr
        assert {k: v for k, v in tree(run).items() if k != "config.yaml"} == \
            {k: v for k, v in before.items() if k != "config.yaml"}  # nothing trained
    finally:  # the same config again gives the same build (byte-identical manifest)
        assert run_cli("build", builds / "b.yaml", "--out", builds / "build", "--overwrite") == 0
    assert build_identity(builds / "build")["manifest_sha256"] == record["manifest_sha256"]


# ------------------------------------------------------------------------------ eval, analyze, report


def test_eval_and_analyze_refuse_another_build_than_the_runs(builds, run, capsys):
    run, args, seen = run
    checkpoint = run / f"step{STEPS}-unsharded"
    assert run_cli("eval", checkpoint, "--data", builds / "other", "--seen", 5, "--held-out", 5) == 2
    err = capsys.readouterr().err
    assert f"{run} trained on the build {(builds / 'build').resolve()}, not on {builds / 'other'}" in err
    assert "config.tasks.0.schedule.rate: 2.0 -> 1.0" in err
    assert run_cli("analyze", "probe", run, "--data", builds / "other", "--seen", 5, "--held-out", 5) == 2
    assert "trained on the build" in capsys.readouterr().err
    assert not (run / "eval").exists() and not (run / "probe").exists()


def test_eval_results_are_locked_bound_to_their_build_and_report_checks_them(builds, run, tmp_path, capsys):
    run, args, seen = run
    checkpoint = run / f"step{STEPS}-unsharded"
    out = tmp_path / "results"
    evaluation = ["eval", checkpoint, "--data", builds / "build", "--seen", 5, "--held-out", 5, "--out", out]
    first = stopped_while_locked(evaluation, out / ".lock")
    try:
        assert run_cli(*evaluation) == 2
        assert f"the results folder {out} is in use by pid {first.pid} on host {HOST}" in capsys.readouterr().err
    finally:
        killed(first)
    assert not list(out.glob("step*.jsonl"))
    assert run_cli(*evaluation) == 0  # the killed holder does not block
    assert (out / f"step{STEPS}.jsonl").exists()
    assert json.loads((out / "build.json").read_text())["manifest_sha256"] == json.loads((run / "build.json").read_text())["manifest_sha256"]
    # Results made with another build than the run's (say by an older version) are refused by `report`.
    fake_run = tmp_path / "fake-run"
    shutil.copytree(out, fake_run / "eval")
    (fake_run / "build.json").write_text(json.dumps(build_identity(builds / "other")))
    assert run_cli("report", fake_run, "--out", tmp_path / "report") == 2
    err = capsys.readouterr().err
    assert f"{fake_run / 'eval'}: results made with the build {(builds / 'build').resolve()}" in err
    assert "config.tasks.0.schedule.rate: 1.0 -> 2.0" in err
    assert not (tmp_path / "report").exists()


def test_a_run_without_a_build_record_is_evaluated_with_a_warning(builds, run, tmp_path, capsys):
    run, args, seen = run
    old = tmp_path / "old-run"
    old.mkdir()
    (old / f"step{STEPS}-unsharded").symlink_to(run / f"step{STEPS}-unsharded")
    assert run_cli("eval", old, "--data", builds / "build", "--seen", 5, "--held-out", 5) == 0
    assert f"{old} has no build.json" in capsys.readouterr().err
