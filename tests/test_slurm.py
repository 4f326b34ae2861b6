"""SLURM: rendered scripts (golden files), cluster profiles, and real jobs on a two-node SLURM cluster on this
machine, memory enforced, started by the tests (tests/slurm_cluster.py): an array build equal to a local build,
training followed by evaluation (each job within its measured memory estimate), resubmission that submits
nothing twice, a job preempted with USR2 and then requeued with `scontrol requeue` (TERM) that resumes with
every step once, a two-node training job, and `status` saying why jobs failed (memory, time limit, exit code,
node failure).

UPDATE_GOLDEN=1 python -m pytest tests/test_slurm.py -k golden   # after an intended change to the scripts
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import slurm_cluster
from conftest import run_cli
from inject.cli import EXAMPLES_DIR
from inject.errors import ConfigError
from inject.sample import write_demo_corpus
from slurm.jobs import Submission
from slurm.profile import load_profile

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "slurm"
TINY = REPO / "olmo_configs" / "tiny.yaml"


# ------------------------------------------------------------------------------ rendering, no SLURM


def reference_submission() -> Submission:
    """The reference ladder on the example 8-GPU profile, building its data first (fixed paths)."""
    from slurm.submit import training_for

    profile = load_profile("example-8gpu")
    trainings = [training_for(REPO / "olmo_configs" / "reference" / f"{s}.yaml", [], profile)
                 for s in ("4M", "20M", "300M", "1B", "4B")]
    return Submission(runs=Path("/scratch/lab/runs"), data=Path("/scratch/lab/build"), profile=profile,
                      trainings=trainings, build_config=Path("/home/lab/reference-build.yaml"), build_inputs=2500,
                      eval_args=["--seen", "200", "--held-out", "200"], analyses=["probe", "interference"],
                      workdir=Path("/home/lab/olmo-inject"))


def test_rendered_scripts_match_the_golden_files():
    jobs = reference_submission().jobs()
    rendered = {f"{job.key}.sbatch": job.script.replace(str(REPO), "<repo>") for job in jobs}
    if os.environ.get("UPDATE_GOLDEN"):
        shutil.rmtree(GOLDEN, ignore_errors=True)
        GOLDEN.mkdir(parents=True)
        for name, text in rendered.items():
            (GOLDEN / name).write_text(text)
    assert sorted(rendered) == sorted(p.name for p in GOLDEN.glob("*.sbatch"))
    for name, text in rendered.items():
        assert text == (GOLDEN / name).read_text(), f"{name} differs from tests/golden/slurm (UPDATE_GOLDEN=1 if intended)"


def sbatch_options(script: str) -> dict[str, str]:
    return dict(line[len("#SBATCH --"):].partition("=")[::2] for line in script.splitlines() if line.startswith("#SBATCH --"))


def test_reference_ladder_scripts_are_what_a_cluster_accepts():
    sub = reference_submission()
    jobs = {job.key: job for job in sub.jobs()}
    assert list(jobs) == ["build-tokenize", "build-finish"] + [f"{k}-{s}" for s in ("4M", "20M", "300M", "1B", "4B")
                                                               for k in ("train", "eval")]
    for job in jobs.values():
        syntax = subprocess.run(["bash", "-n"], input=job.script, capture_output=True, text=True)
        assert syntax.returncode == 0, f"{job.key}: {syntax.stderr}"
        options = sbatch_options(job.script)
        assert options["partition"] == ("cpu" if job.kind == "build" else "gpu")  # builds need no GPU
        assert options["account"] == "my-lab" and options["qos"] == "normal"
        assert ("module load cuda/12.4" in job.script) == (job.kind != "build")  # the build's own setup lines
        assert "source $HOME/venvs/olmo-inject/bin/activate" in job.script
        if job.kind != "train":  # a measured estimate, its arithmetic in the header
            assert re.search(rf"^# memory {options['mem']}: .* measured", job.script, re.M), job.key
    # Training: whole nodes of 8 GPUs, as many as the FLOPs need in 72 hours, preemption-safe.
    nodes = {t.name: t.nodes for t in sub.trainings}
    assert nodes == {"4M": 1, "20M": 1, "300M": 1, "1B": 2, "4B": 8}
    for t in sub.trainings:
        script = jobs[f"train-{t.name}"].script
        options = sbatch_options(script)
        assert options["nodes"] == str(t.nodes) and options["gpus-per-node"] == "8" and options["ntasks-per-node"] == "1"
        assert options["time"] == "48:00:00" and options["signal"] == "B:USR2@300" and "requeue" in options
        assert "srun --kill-on-bad-exit=1" in script and f"--nproc 8 --nnodes {t.nodes}" in script
        assert "MASTER_ADDR=$(hostname -I" in script and "MASTER_PORT=$(( 10000 + SLURM_JOB_ID % 20000 ))" in script
        assert jobs[f"train-{t.name}"].after == ["build-finish"] and jobs[f"eval-{t.name}"].after == [f"train-{t.name}"]
        assert options["mem"] == "0"  # whole nodes
        assert sbatch_options(jobs[f"eval-{t.name}"].script)["gpus"] == "1"
        assert f"olmo-inject analyze interference /scratch/lab/runs/{t.name} --data /scratch/lab/build --device cuda" \
            in jobs[f"eval-{t.name}"].script
    # Evaluation memory grows with the model: 16 GiB more for the 4B than for the 4M.
    mems = [int(sbatch_options(jobs[f"eval-{s}"].script)["mem"].rstrip("G")) for s in ("4M", "4B")]
    assert mems[0] < 4 and mems[1] > mems[0] + 16, mems
    # The build: 2,500 inputs over tasks of 8 CPUs, 8 inputs each (313 tasks, under MaxArraySize 1001), at most
    # 32 running at once; each task and the finishing job run 8 tokenizer processes.
    tokenize = jobs["build-tokenize"].script
    options = sbatch_options(tokenize)
    assert options["array"] == "0-312%32" and '--part "$SLURM_ARRAY_TASK_ID/313"' in tokenize
    assert options["cpus-per-task"] == "8" and "--workers 8 --part" in tokenize
    assert options["mem"] == "1G"  # a tokenizing task: 0.09 GiB + 8 x 0.07 GiB, x 1.5
    assert "--workers 8" in jobs["build-finish"].script
    assert sbatch_options(jobs["build-finish"].script)["mem"] == "7G"  # verify: 9 x 0.45 GiB, x 1.5
    assert jobs["build-finish"].after == ["build-tokenize"]


@pytest.mark.parametrize("complete, signum", [(False, signal.SIGUSR2), (True, signal.SIGUSR2), (False, signal.SIGTERM)])
def test_a_signal_after_the_last_step_does_not_requeue_a_complete_run(tmp_path, complete, signum):
    """The training script's own shell logic, run by bash with real signals. Only the two cluster commands it
    calls are stand-ins (srun: a trainer that runs until signalled; scontrol: records a requeue); the real
    cluster's requeue is tested in test_a_preempted_training_job_saves_requeues_and_resumes_from_its_checkpoint."""
    sub = reference_submission()
    t = sub.trainings[0]
    sub.runs = tmp_path / "runs"
    script = next(job for job in sub.jobs() if job.key == f"train-{t.name}").script
    script = "\n".join(line for line in script.splitlines() if not line.startswith(("module ", "source ", "cd ")))
    if complete:
        (sub.runs / t.name / f"step{t.steps}-unsharded").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\ntrap 'exit 0' USR2\ntouch \"$STARTED\"\nwhile :; do sleep 0.1; done\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[ \"$1\" = requeue ] && echo \"$2\" >> \"$REQUEUED\"\n"
                                      "[ \"$1\" = show ] && echo node1\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node1",
           "SLURM_CPUS_PER_TASK": "1", "STARTED": str(tmp_path / "started"), "REQUEUED": str(tmp_path / "requeued")}
    job = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signum)
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 0, out
    if signum == signal.SIGTERM:  # the trainer was told to save; SLURM requeues (or ends) the job, not the script
        assert "TERM, saving after the current step" in out and not (tmp_path / "requeued").exists(), out
        return
    assert "USR2, saving" in out
    assert (tmp_path / "requeued").exists() is not complete, out
    if not complete:
        assert (tmp_path / "requeued").read_text().split() == ["77"]


def test_submit_dry_run_prints_every_script_and_writes_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run_cli("slurm", "submit", "--profile", "example-8gpu", "--preset", "reference", "--size", "1B",
                   "--data", tmp_path / "build", "--runs", runs, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "train-1B.sbatch" in out and "eval-1B.sbatch  (afterok: train-1B)" in out and "#SBATCH --nodes=2" in out
    assert "1,040 GPU-hours" in out  # the arithmetic behind the node count is printed
    assert not runs.exists()


def test_bad_profiles_and_arguments_name_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    for text, field in [("gpus_per_node: -1", "gpus_per_node"), ("time_limit: 2 days", "time_limit"),
                        ("eval: {mem: lots}", "eval.mem"), ("partitoin: gpu", "partitoin"),
                        ("setup: module load cuda", "setup"), ("rendezvous_ports: [30000, 40000]", "rendezvous_ports"),
                        ("rendezvous_ports: [29999, 10000]", "rendezvous_ports"), ("env: {1BAD: x}", "env"),
                        ("max_array_running: 0", "max_array_running"), ("build: {setup: module load x}", "build.setup"),
                        ("build: {cpus: 0}", "build.cpus"), ("mem: lots", "mem")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(field)) as e:
            load_profile(bad)
        assert str(bad) in str(e.value)
    assert run_cli("slurm", "render", "--profile", "no-such-cluster", "--data", "b", "--runs", tmp_path / "r",
                   "--config", TINY) == 2
    assert "no profile 'no-such-cluster'" in capsys.readouterr().err
    assert run_cli("slurm", "render", "--profile", "local-cpu", "--data", "b", "--runs", tmp_path / "r",
                   "--config", TINY, "--nodes", "tiny=two") == 2
    assert "--nodes: 'tiny=two' is not NAME=N" in capsys.readouterr().err
    assert run_cli("slurm", "status", "--runs", tmp_path / "nothing") == 2
    assert "nothing was submitted" in capsys.readouterr().err


@pytest.mark.parametrize("interface", [None, "lo"])
def test_the_rendezvous_is_an_address_and_a_port_outside_the_ephemeral_range(tmp_path, interface):
    """The training script's rendezvous lines, run by bash as on a head node: MASTER_ADDR is an address (not a
    node name, not 127.0.1.1 from `hostname --ip-address`), MASTER_PORT stays in the profile's range for any job
    id, and the profile's environment is exported."""
    profile = load_profile("local-cpu")
    profile.rendezvous_interface = interface
    profile.env = {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "WARN"}
    sub = Submission(runs=tmp_path / "runs", data=tmp_path / "b", profile=profile, trainings=[], build_config=None,
                     build_inputs=0, workdir=tmp_path)
    lines = "\n".join(sub._rendezvous_lines())
    for job_id in (0, 1, 12345, 19999, 20000, 987654321):
        done = subprocess.run(["bash", "-c", f"set -euo pipefail\nSLURM_JOB_ID={job_id}\n{lines}\n"
                               "echo \"$MASTER_ADDR $MASTER_PORT $NCCL_SOCKET_IFNAME $NCCL_DEBUG\""],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        address, port, ifname, debug = done.stdout.split()
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", address), address
        assert (address == "127.0.0.1") == (interface == "lo")
        assert 10000 <= int(port) <= 29999 and int(port) == 10000 + job_id % 20000
        assert (ifname, debug) == ("eth0", "WARN")
        assert "ephemeral" not in done.stderr


def test_build_parts_refuse_a_part_outside_the_array(tmp_path, capsys):
    assert run_cli("build", EXAMPLES_DIR / "demo.yaml", "--out", tmp_path / "b", "--part", "4/4") == 2
    assert "--part: 4/4 is not a part of 4" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a real SLURM


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.missing_requirements()
    state = tmp_path_factory.mktemp("slurm-state")
    saved = dict(os.environ)  # start() sets SLURM_CONF
    if why is None:
        try:
            slurm_cluster.start(state)
        except (slurm_cluster.ClusterUnavailable, subprocess.CalledProcessError) as e:
            why = f"the test cluster did not start: {e}"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM tests cannot run in CI: {why}")
        pytest.skip(f"no local SLURM: {why}")
    # Jobs inherit the submitting environment (sbatch's default): put this interpreter's olmo-inject on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    yield state
    subprocess.run(["scancel", "--user", "root"], capture_output=True)
    slurm_cluster.stop(state)
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The demo corpus in 8 shards and the demo build config over it."""
    work = tmp_path_factory.mktemp("slurm-project")
    write_demo_corpus(work / "corpus", shards=8)
    shutil.copyfile(EXAMPLES_DIR / "demo.yaml", work / "build.yaml")
    return work


def built(project: Path) -> Path:
    """The project's build: made by the array-build test, or here when that test did not run."""
    data = project / "build"
    if not (data / "manifest.json").exists():
        assert run_cli("build", project / "build.yaml", "--out", data) == 0
    return data


def job_state(job_id: str) -> tuple[str, int]:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return re.search(r"JobState=(\S+)", text).group(1), int(re.search(r"Restarts=(\d+)", text).group(1))


def node_state(node: str) -> str:
    return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True).stdout.strip()


def node_idle() -> bool:
    return subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split() == ["idle"]


def wait_for(condition, what: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def wait_finished(runs: Path, timeout: float = 900) -> dict:
    """Wait until SLURM holds none of the runs folder's jobs as active; their state.json entries."""
    from slurm.submit import ACTIVE, job_states

    state = json.loads((runs / "slurm" / "state.json").read_text())["jobs"]
    ids = [job["id"] for job in state.values()]
    wait_for(lambda: not any(s & ACTIVE for s in job_states(ids).values()), f"jobs {ids} of {runs}", timeout)
    return state


def logs(runs: Path, key: str) -> str:
    return "".join(p.read_text() for p in sorted((runs / "slurm" / "logs").glob(f"{key}-*.out")))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_array_build_then_training_then_eval_and_a_resubmission_submits_nothing(cluster, project, capsys):
    runs, data = project / "runs", project / "build"
    submit = ["slurm", "submit", "--profile", "local-cpu", "--config", TINY, "--set", "max_duration=4",
              "--data", data, "--build", project / "build.yaml", "--runs", runs, "--eval-seen", "10", "--eval-held-out", "10",
              "--analyze", "probe"]
    assert run_cli(*submit) == 0
    out = capsys.readouterr().out
    assert re.search(r"build-finish +submitted as \d+ \(after \d+\)", out)
    assert re.search(r"eval-tiny +submitted as \d+ \(after \d+\)", out)
    state = wait_finished(runs)
    for key, job in state.items():
        assert job_state(job["id"])[0] == "COMPLETED", f"{key}:\n{logs(runs, key)[-3000:]}"

    # The array (8 inputs, MaxArraySize 4: 4 tasks of 2 inputs) and its finishing job built the same bytes
    # as a local build of the same config.
    assert len(list((runs / "slurm" / "logs").glob("build-tokenize-*.out"))) == 4
    assert "verify: OK" in logs(runs, "build-finish")
    local = project / "local-build"
    assert run_cli("build", project / "build.yaml", "--out", local) == 0
    built, expected = tree(data), tree(local)
    built["olmo-data.yaml"] = built["olmo-data.yaml"].replace(str(data).encode(), str(local).encode())
    assert built.keys() == expected.keys() and all(built[k] == expected[k] for k in built), \
        [k for k in built if built[k] != expected.get(k)]

    # Training reached its last step; evaluation covered every checkpoint.
    run = runs / "tiny"
    assert (run / "step4-unsharded" / "model.pt").exists()
    for results in ("eval", "probe"):  # scoring, then the probes, in the evaluation job
        assert sorted(p.name for p in (run / results).glob("step*.jsonl")) == [f"step{s}.jsonl" for s in (0, 1, 2, 4)]

    # Everything is done: submitting again submits nothing; status says where each run stands.
    assert run_cli(*submit) == 0
    out = capsys.readouterr().out
    assert "submitted" not in out and out.count(" done") == 4
    assert run_cli("slurm", "status", "--runs", runs) == 0
    status = capsys.readouterr().out
    assert re.search(r"train-tiny +\d+ COMPLETED +4 +4 +4/4", status), status


def last_step(run: Path) -> int:
    lines = (run / "data-indices" / "rank0.tsv").read_text().splitlines()
    return int(lines[-1].split("\t", 1)[0]) if lines else 0


def release(job_id: str) -> None:
    """A requeued job becomes eligible after a delay (about two minutes, for the first run's credential to be
    revoked); release it a few seconds after the requeue instead (slurmd refuses a launch in the same second
    as the revocation: "Job credential revoked")."""
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], check=True)


def test_a_preempted_training_job_saves_requeues_and_resumes_from_its_checkpoint(cluster, project, capsys):
    """USR2 (SLURM's warning before a time limit or a preemption): the script requeues the job; then
    `scontrol requeue` (SIGTERM to every process, SIGKILL after KillWait): SLURM requeues it. Both times the
    trainer saves after its current step, and the next run resumes there: every step trained once."""
    data = built(project)
    runs = project / "preempted"
    steps = 16  # room for two stops (after steps 2 and 3 or so) and the rest
    submit = ["slurm", "submit", "--profile", "local-cpu", "--config", TINY, "--set", f"max_duration={steps}",
              "--data", data, "--runs", runs, "--no-eval"]
    assert run_cli(*submit) == 0
    job_id = json.loads((runs / "slurm" / "state.json").read_text())["jobs"]["train-tiny"]["id"]
    run = runs / "tiny"
    wait_for(lambda: (run / "step2-unsharded").exists(), "the first checkpoints")

    # Resubmitting while it runs submits nothing.
    assert run_cli(*submit) == 0
    assert f"already queued or running as {job_id}" in capsys.readouterr().out

    # What SLURM does before a time limit or a preemption: USR2 to the batch shell.
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
    wait_for(lambda: job_state(job_id) == ("PENDING", 1) and node_idle(), "the job to requeue itself", timeout=300)
    release(job_id)
    wait_for(lambda: "(restart count 1)" in logs(runs, "train-tiny"), "the requeued job to resume")
    log = logs(runs, "train-tiny")
    assert "olmo-inject: USR2, saving and requeueing" in log and "restart 1" in log
    resumed = re.search(r"resuming from \S*step(\d+)-unsharded", log)
    assert resumed and 2 <= int(resumed.group(1)) < steps, log[-3000:]
    assert re.search(rf"starting at step {resumed.group(1)} \(restart count 1\)", log), log[-3000:]

    # `scontrol requeue` while it trains: SIGTERM to every process of the job; SLURM requeues it.
    wait_for(lambda: last_step(run) > int(resumed.group(1)), "a step after the resumption")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for(lambda: job_state(job_id) == ("PENDING", 2) and node_idle(), "SLURM to requeue the job", timeout=300)
    trained = last_step(run)  # the last step the TERMed run trained: its checkpoint must be there
    assert trained < steps, "the run ended before the requeue; nothing tested"
    release(job_id)
    wait_finished(runs)
    log = logs(runs, "train-tiny")
    assert job_state(job_id) == ("COMPLETED", 2), log[-3000:]
    assert "olmo-inject: TERM, saving after the current step" in log and "restart 2" in log
    assert re.search(rf"resuming from \S*step{trained}-unsharded", log), (trained, log[-3000:])
    assert re.search(rf"starting at step {trained} \(restart count 2\)", log), log[-3000:]
    # Every step ran once, in OLMo's order, across the three runs of the job.
    logged = [int(line.split("\t", 1)[0]) for line in (run / "data-indices" / "rank0.tsv").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    assert (run / f"step{steps}-unsharded" / "model.pt").exists()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["max_duration"] == steps


def test_cancel_stops_a_runs_jobs_and_a_resubmission_resumes_them(cluster, project, capsys):
    data = built(project)
    runs = project / "cancelled"
    submit = ["slurm", "submit", "--profile", "local-cpu", "--config", TINY, "--set", "max_duration=40",
              "--data", data, "--runs", runs, "--eval-seen", "10", "--eval-held-out", "10"]
    assert run_cli(*submit) == 0
    jobs = json.loads((runs / "slurm" / "state.json").read_text())["jobs"]
    wait_for(lambda: job_state(jobs["train-tiny"]["id"])[0] == "RUNNING", "the training job to start")
    capsys.readouterr()
    assert run_cli("slurm", "cancel", "--runs", runs) == 0
    assert "cancelled 2 job(s)" in capsys.readouterr().out  # training and its pending evaluation
    wait_finished(runs)
    assert {job_state(j["id"])[0] for j in jobs.values()} == {"CANCELLED"}
    # Not done, not queued: submitting again submits both, the evaluation after the new training job.
    assert run_cli(*submit) == 0
    out = capsys.readouterr().out
    assert re.search(r"train-tiny +submitted as \d+\n", out) and re.search(r"eval-tiny +submitted as \d+ \(after \d+\)", out)
    assert run_cli("slurm", "cancel", "--runs", runs) == 0
    wait_finished(runs)
    # Other runs in the same folder are refused, naming what differs.
    capsys.readouterr()
    assert run_cli(*[a if a != "max_duration=40" else "max_duration=50" for a in submit]) == 2
    assert "was submitted with other settings (trainings differs" in capsys.readouterr().err


def test_a_two_node_training_job_meets_at_the_head_node_and_each_rank_reads_its_share(cluster, project):
    """The training script as a cluster runs it on two nodes: one `olmo-inject train` per node under srun, both
    launchers meeting at the head node's address and the job's port; rank r trains on its half of every
    global batch of the build's planned order (ai2-olmo: the order's r::2 slice, 16 instances a step)."""
    from inject.order import FIRST_EPOCH, ai2_olmo_order

    data = built(project)
    runs = project / "two-nodes"
    steps = 3
    assert run_cli("slurm", "submit", "--profile", "local-cpu", "--config", TINY, "--set", f"max_duration={steps}",
                   "--nodes", "tiny=2", "--data", data, "--runs", runs, "--no-eval") == 0
    job_id = wait_finished(runs)["train-tiny"]["id"]
    log = logs(runs, "train-tiny")
    assert job_state(job_id)[0] == "COMPLETED", log[-3000:]
    assert re.search(r"nodes node\[1-2\], rendezvous \d+\.\d+\.\d+\.\d+:\d+", log), log[-3000:]
    config = yaml.safe_load(TINY.read_text())
    instances = json.loads((data / "manifest.json").read_text())["counts"]["instances"]
    order = ai2_olmo_order(instances, config["seed"], config["data"]["drop_last"], epoch=FIRST_EPOCH["ai2-olmo"],
                           world_size=2)
    per_rank = config["global_train_batch_size"] // 2
    for rank in (0, 1):
        lines = (runs / "tiny" / "data-indices" / f"rank{rank}.tsv").read_text().splitlines()
        trained = {int(line.split()[0]): [int(i) for i in line.split()[1:]] for line in lines}
        assert len(lines) == steps and sorted(trained) == list(range(1, steps + 1))
        planned = order[rank::2]
        for step, batch in trained.items():
            assert batch == planned[(step - 1) * per_rank: step * per_rank].tolist(), (rank, step)
    assert (runs / "tiny" / f"step{steps}-unsharded" / "model.pt").exists()


def test_status_says_why_a_job_failed(cluster, project, tmp_path, capsys):
    """Memory is enforced: a training job that asks too little is killed, and `slurm status` says it ran out of
    memory (the tiny jobs' default requests pass: the first test). A time limit, an exit code and a node
    failure, from plain jobs beside it, are reported from SLURM's records (the job completion log, `sacct -c`)."""
    from slurm.submit import why_failed

    plain = tmp_path / "plain"
    (plain / "logs").mkdir(parents=True)
    ids = {}
    for key, options, command in [("slow", "--time=1", "sleep 600"), ("exit3", "--time=5", "exit 3")]:
        script = plain / f"{key}.sbatch"
        script.write_text(f"#!/bin/bash\n#SBATCH --mem=50M {options} --output={plain}/logs/{key}-%j.out\n{command}\n")
        ids[key] = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                                  check=True).stdout.strip()

    data = built(project)
    runs = project / "too-little-memory"
    profile = tmp_path / "small.yaml"
    profile.write_text((REPO / "slurm" / "profiles" / "local-cpu.yaml").read_text() + "mem: 400M\n")
    assert run_cli("slurm", "submit", "--profile", profile, "--config", TINY, "--set", "max_duration=4",
                   "--data", data, "--runs", runs, "--eval-seen", "10", "--eval-held-out", "10") == 0
    jobs = wait_finished(runs)
    capsys.readouterr()
    assert run_cli("slurm", "status", "--runs", runs) == 0
    out = capsys.readouterr().out
    assert re.search(r"train-tiny did not complete: .*FAILED, exit code \d+; out of memory \(log: .*exceeded memory limit \(\d+ > \d+\)", out), out
    assert job_state(jobs["eval-tiny"]["id"])[0] == "CANCELLED"  # its dependency failed
    assert re.search(r"eval-tiny did not complete: .*CANCELLED, cancelled", out), out

    wait_for(lambda: job_state(ids["slow"])[0] == "TIMEOUT", "the time limit", timeout=300)
    assert why_failed(ids["slow"], plain / "logs", "slow").startswith(f"{ids['slow']}: TIMEOUT, time limit")
    assert why_failed(ids["exit3"], plain / "logs", "exit3") == f"{ids['exit3']}: FAILED, exit code 3"

    # A node that fails under a running job (here marked DOWN, as the controller does when its slurmd stops
    # answering): the job ends NODE_FAIL.
    script = plain / "lost.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --mem=50M --time=5 --nodelist=node2 --no-requeue "
                      f"--output={plain}/logs/lost-%j.out\nsleep 600\n")
    lost = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True).stdout.strip()
    wait_for(lambda: job_state(lost)[0] == "RUNNING", "the job on node2", timeout=300)
    try:
        subprocess.run(["scontrol", "update", "nodename=node2", "state=down", "reason=test: node failure"], check=True)
        wait_for(lambda: job_state(lost)[0] == "NODE_FAIL", "the job to fail with its node", timeout=300)
    finally:
        # The controller may already have returned the node to service (its slurmd still answers), and then
        # refuses a resume ("Invalid node state transition ... from=IDLE to=RESUME"): resume only if needed.
        subprocess.run(["scontrol", "update", "nodename=node2", "state=resume"], capture_output=True)
        wait_for(lambda: not node_state("node2").startswith(("down", "drain")), "node2 back in service", timeout=120)
    assert why_failed(lost, plain / "logs", "lost").startswith(f"{lost}: NODE_FAIL, node failure")
