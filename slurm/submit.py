"""`olmo-inject slurm render|submit|status|cancel`: talk to SLURM (sbatch, squeue, scontrol, scancel).

The runs folder holds the whole story: RUNS/slurm/ has the rendered scripts, logs/, submission.json (the
arguments) and state.json (job ids, written after every sbatch). Resubmitting skips what is done (its
outputs exist) and what SLURM still runs or queues; everything else is submitted again, with its
dependencies on the jobs that are still pending or running.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from inject.errors import ConfigError, InjectError

from .jobs import SLURM_DIR, Job, Submission, Training, choose_nodes
from .profile import ClusterProfile

STATE = "state.json"
SETTINGS = "submission.json"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


# ------------------------------------------------------------------------------ building a submission


def training_for(config: Path, overrides: list[str], profile: ClusterProfile, nodes: int | None = None) -> Training:
    """A training run from its config (an ai2-olmo TrainConfig, or an OLMo-core run config: `trainer: olmo-core`):
    steps, and nodes from the model's size (or `nodes`)."""
    from inject import trainers

    trainer = trainers.config_trainer(config)
    # OLMo-core counts parameters in its own environment: only where a GPU profile needs them
    steps, params, tokens, batch = trainers.get(trainer).run_size(config, overrides, bool(profile.gpus_per_node))
    chosen, estimate = choose_nodes(params, tokens, batch, profile)
    if nodes is not None:
        if not 1 <= nodes <= profile.max_nodes:
            raise ConfigError(f"--nodes: {nodes} for {config.stem} is outside 1..{profile.max_nodes} (profile max_nodes)")
        chosen, estimate = nodes, f"{nodes} node(s), set with --nodes ({estimate})"
    return Training(config.stem, config, overrides, steps, chosen, estimate, params=params, trainer=trainer)


def count_inputs(build_config: Path) -> int:
    from inject.config import load_build_config
    from inject.sources import expand_inputs

    config = load_build_config(build_config)
    return len(expand_inputs(config.inputs, config.base_dir))


# ------------------------------------------------------------------------------ SLURM commands


def _slurm(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise InjectError(f"`{command[0]}` not found: run this on a SLURM login node (or render with --dry-run)") from None
    if done.returncode:
        raise InjectError(f"`{' '.join(command)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def sbatch(script: Path, after: list[str]) -> str:
    dependency = [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"] if after else []
    return _slurm("sbatch", "--parsable", *dependency, str(script)).strip().split(";")[0]


def job_states(ids: list[str]) -> dict[str, set[str]]:
    """SLURM's states of each job id (an array job: the states of its tasks); jobs SLURM forgot are absent."""
    if not ids:
        return {}
    done = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%F %i %T"],
                          capture_output=True, text=True, timeout=60)
    states: dict[str, set[str]] = {}
    for line in done.stdout.splitlines():
        array_id, job_id, state = line.split()
        key = array_id if array_id in ids else job_id.split("_")[0]
        states.setdefault(key, set()).add(state)
    return states


# ------------------------------------------------------------------------------ state


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def settings_of(sub: Submission) -> dict:
    """What the runs folder's results depend on. The profile and node counts may change between
    submissions (another partition, a longer time limit): the runs resume from their checkpoints."""
    return {"data": str(sub.data), "build_config": str(sub.build_config or ""), "eval_args": sub.eval_args,
            "analyses": sub.analyses, "trainings": [{"name": t.name, "config": str(t.config), "overrides": t.overrides}
                                                    for t in sub.trainings]}


def is_done(job: Job, sub: Submission) -> bool:
    """Whether a job's outputs exist (so it is not submitted again)."""
    if job.kind == "build":
        return (sub.data / "manifest.json").exists()
    training = next(t for t in sub.trainings if t.name == job.name)
    run = sub.runs / training.name
    steps = _checkpoint_steps(run)
    if job.kind == "train":
        return training.steps in steps
    return bool(steps) and training.steps in steps and all(
        (run / folder / f"step{s}.jsonl").exists() for s in steps for folder in ["eval", *sub.analyses])


def _checkpoint_steps(run: Path) -> set[int]:
    from eval.checkpoints import find_checkpoints

    try:
        return {c.step for c in find_checkpoints(run)} if run.is_dir() else set()
    except InjectError:
        return set()


# ------------------------------------------------------------------------------ the verbs


def write_scripts(sub: Submission) -> dict[str, Path]:
    (sub.folder / "logs").mkdir(parents=True, exist_ok=True)
    paths = {}
    for job in sub.jobs():
        path = sub.folder / f"{job.key}.sbatch"
        path.write_text(job.script)
        paths[job.key] = path
    return paths


def submit(sub: Submission, log=print) -> dict[str, str]:
    """Submit what is neither done nor queued/running; returns key -> what happened."""
    sub.folder.mkdir(parents=True, exist_ok=True)
    settings_path, settings = sub.folder / SETTINGS, settings_of(sub)
    old = _read_json(settings_path, None)
    if old is not None and old != settings:
        changed = next(k for k in settings if old.get(k) != settings[k])
        raise ConfigError(f"{sub.runs}: was submitted with other settings ({changed} differs, see {settings_path}); "
                          f"use a new runs folder, or `olmo-inject slurm cancel` and delete {sub.folder}")
    _write_json(settings_path, settings)
    paths = write_scripts(sub)
    state_path = sub.folder / STATE
    state = _read_json(state_path, {"jobs": {}})
    jobs = sub.jobs()
    live = job_states([state["jobs"][j.key]["id"] for j in jobs if j.key in state["jobs"]])
    ids: dict[str, str] = {}  # jobs that dependents must wait for
    outcome = {}
    for job in jobs:
        known = state["jobs"].get(job.key)
        if is_done(job, sub):
            outcome[job.key] = "done"
        elif known and live.get(known["id"], set()) & ACTIVE:
            ids[job.key] = known["id"]
            outcome[job.key] = f"already queued or running as {known['id']}"
        else:
            after = [ids[k] for k in job.after if k in ids]
            job_id = sbatch(paths[job.key], after)
            ids[job.key] = job_id
            state["jobs"][job.key] = {"id": job_id, "script": str(paths[job.key]),
                                      "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "after": after}
            _write_json(state_path, state)  # after every sbatch: an interrupted submit forgets nothing
            outcome[job.key] = f"submitted as {job_id}" + (f" (after {', '.join(after)})" if after else "")
        log(f"{job.key:24s} {outcome[job.key]}")
    return outcome


def load_submission(runs: Path) -> tuple[dict, dict]:
    folder = Path(runs) / "slurm"
    if not (folder / SETTINGS).exists():
        raise InjectError(f"{runs}: no {folder / SETTINGS}; nothing was submitted with this runs folder")
    return _read_json(folder / SETTINGS, {}), _read_json(folder / STATE, {"jobs": {}})


def status(runs: Path) -> list[dict]:
    """Per job: SLURM state, and why it failed; per training: step reached, last checkpoint, checkpoints evaluated."""
    settings, state = load_submission(runs)
    live = job_states([j["id"] for j in state["jobs"].values()])
    rows = []
    for key, job in state["jobs"].items():
        states = live.get(job["id"], {"(finished)"})
        row = {"job": key, "id": job["id"], "state": ",".join(sorted(states))}
        if not states & ACTIVE and states != {"COMPLETED"}:
            row["why"] = why_failed(job["id"], Path(runs) / SLURM_DIR / "logs", key)
        name = key.split("-", 1)[1] if key.startswith(("train-", "eval-")) else None
        if name:
            run = Path(runs) / name
            steps = sorted(_checkpoint_steps(run))
            row.update(step=_step_reached(run), last_checkpoint=steps[-1] if steps else None,
                       evaluated=f"{sum((run / 'eval' / f'step{s}.jsonl').exists() for s in steps)}/{len(steps)}")
        rows.append(row)
    return rows


LOG_SIGNS = [  # what slurmstepd writes into the job's log, what it means; the first that a log holds is quoted
    (re.compile(r"exceeded memory limit \(\d+ > \d+\)"), "out of memory"),  # jobacct_gather: RSS > --mem
    (re.compile(r"exceeded (?:job )?memory limit|oom[-_ ]kill|out of memory", re.I), "out of memory"),  # cgroup
    (re.compile(r"DUE TO TIME LIMIT"), "time limit"),
    (re.compile(r"DUE TO NODE FAILURE|NODE_FAIL"), "node failure"),
]


def why_failed(job_id: str, log_dir: Path, key: str) -> str | None:
    """Why a job (every task of an array) that is no longer running did not complete, in words: out of
    memory, time limit, node failure, cancelled, or its exit code; None when it completed or nothing is known.
    SLURM's record comes from `sacct` (the accounting database), else `sacct -c` (the job completion log),
    else `scontrol show job` (jobs finished less than MinJobAge ago); the job's log adds what slurmstepd
    wrote there (a step killed over its --mem leaves the job merely FAILED, signal 9)."""
    records = _accounting(job_id) or _scontrol_record(job_id)
    bad = [r for r in records if r[1] != "COMPLETED"]
    if records and not bad:
        return None
    lines = [line.strip() for path in sorted(log_dir.glob(f"{key}-{job_id}*.out")) for line in _tail(path).splitlines()]
    reasons = []
    for task, state, exit_code in bad:
        code, _, signum = exit_code.partition(":")
        words = {"TIMEOUT": "time limit", "OUT_OF_MEMORY": "out of memory", "NODE_FAIL": "node failure",
                 "CANCELLED": "cancelled", "PREEMPTED": "preempted", "BOOT_FAIL": "node failed to boot",
                 "DEADLINE": "deadline"}.get(state.split()[0])
        if words is None:
            words = f"exit code {code}" if code not in ("", "0") else f"killed by signal {signum}" \
                if signum not in ("", "0") else state.lower()
        reasons.append(f"{task}: {state.split()[0]}, {words}")
    for sign, meaning in LOG_SIGNS:
        quoted = [line for line in lines if sign.search(line)]
        if quoted:
            reasons.append(f"{meaning} (log: {quoted[-1][-160:]})")
            break
    return "; ".join(reasons) or None


def _accounting(job_id: str) -> list[tuple[str, str, str]]:
    """(job or array task id, state, exit code) of the job's allocations from sacct: the accounting database,
    else the job completion log (`sacct -c`); [] where neither is kept."""
    for completion in ([], ["-c"]):
        try:
            done = subprocess.run(["sacct", *completion, "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"],
                                  capture_output=True, text=True, timeout=60)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return []
        rows = [tuple(line.split("|")[:3]) for line in done.stdout.splitlines() if line.count("|") >= 2]
        rows = [r for r in rows if r[0].split("_")[0].split(".")[0] == job_id]
        if done.returncode == 0 and rows:
            return _latest(rows)
    return []


def _latest(rows: list[tuple]) -> list[tuple]:
    """One row per job or array task: the last (a requeued job has a row per run)."""
    return list({r[0]: r for r in rows}.values())


def _scontrol_record(job_id: str) -> list[tuple[str, str, str]]:
    try:
        text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in text.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if "JobState" in fields:
            task = fields.get("ArrayTaskId")
            rows.append((f"{fields.get('ArrayJobId', job_id)}_{task}" if task else fields["JobId"],
                         fields["JobState"], fields.get("ExitCode", "")))
    return rows


def _tail(path: Path, size: int = 65536) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def _step_reached(run: Path) -> int | None:
    """The last step the trainer logged (its data-indices file has one line per instance, step first)."""
    path = run / "data-indices" / "rank0.tsv"
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        lines = [line for line in f.read().splitlines() if line.strip()]
    return int(lines[-1].split(b"\t", 1)[0]) if lines else None


def cancel(runs: Path) -> list[str]:
    """scancel every job of the runs folder that SLURM still holds."""
    _, state = load_submission(runs)
    ids = [j["id"] for j in state["jobs"].values()]
    live = [i for i, states in job_states(ids).items() if states & ACTIVE]
    if live:
        _slurm("scancel", *live)
    return live


def environment_note() -> str | None:
    """Jobs inherit the submitting shell's environment: warn when olmo-inject is not on its PATH."""
    if shutil.which("olmo-inject") is None:
        return "olmo-inject is not on PATH: jobs will not find it unless the profile's `setup` lines activate its environment"
    return None
