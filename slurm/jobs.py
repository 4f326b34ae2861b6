"""What a submission runs, as readable sbatch scripts: dataset build (job array + finishing job), one
training job per model size, and one evaluation job after each training job.

Rendering is pure (no SLURM, no files written): `render --dry-run` and the golden-file tests see exactly
what `submit` would send.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from inject.errors import ConfigError

from .profile import ClusterProfile, JobResources, seconds
from .resources import estimate

SLURM_DIR = "slurm"  # inside the runs folder: scripts, logs/, state.json


@dataclass
class Training:
    """One training run of the submission (one ladder size)."""

    name: str
    """Run name: the run folder RUNS/<name> and the job names."""
    config: Path
    """The run config: an ai2-olmo TrainConfig YAML or an OLMo-core run config (`trainer: olmo-core`)."""
    overrides: list[str] = field(default_factory=list)
    """Config overrides, `key=value`."""
    steps: int = 0
    """Steps the run trains (ai2-olmo: max_duration; OLMo-core: train.max_steps; overrides applied)."""
    nodes: int = 1
    estimate: str = ""
    """How the node count was chosen, for the script's header."""
    params: int = 0
    """The model's parameters as the node arithmetic counts them (0: not counted): sets the memory estimate."""
    trainer: str = "ai2-olmo"
    """The config's trainer (`olmo-inject train` dispatches on it; it decides how a complete run is recognized)."""

    def final_checkpoint_test(self, run: Path) -> str:
        """A shell test that is true once the run's last checkpoint is complete (the trainer's own markers)."""
        from inject import trainers

        markers = trainers.get(self.trainer).final_checkpoint_markers(self.steps)
        return " || ".join(f"[ -e {q(run)}/{marker} ]" for marker in markers)


@dataclass
class Job:
    key: str
    """Unique within a submission: build-tokenize, build-finish, train-<name>, eval-<name>."""
    script: str
    after: list[str]
    """Keys of the jobs this one waits for (afterok)."""
    kind: str
    """build, train or eval: how `status` checks whether it is done."""
    name: str = ""
    """The training run it belongs to (train and eval jobs)."""


@dataclass
class Submission:
    runs: Path
    data: Path
    profile: ClusterProfile
    trainings: list[Training]
    build_config: Path | None = None
    build_inputs: int = 0
    """Input files of the build (sets the array's size)."""
    eval_args: list[str] | None = field(default_factory=list)
    """Extra `olmo-inject eval` arguments; None: no evaluation jobs."""
    analyses: list[str] = field(default_factory=list)
    """`olmo-inject analyze` analyses (probe, interference) the evaluation job runs after scoring."""
    workdir: Path = field(default_factory=Path.cwd)

    @property
    def folder(self) -> Path:
        return self.runs / SLURM_DIR

    def jobs(self) -> list[Job]:
        """Every job, dependencies first."""
        jobs = []
        if self.build_config is not None:
            jobs += [self._tokenize_job(), self._finish_job()]
        for training in self.trainings:
            jobs.append(self._train_job(training, ["build-finish"] if self.build_config else []))
            if self.eval_args is not None:
                jobs.append(self._eval_job(training))
        return jobs

    # -------------------------------------------------------------------------------- the scripts

    def _header(self, key: str, title: str, resources: list[str], requeue: bool = False, array: str | None = None,
                own: JobResources | None = None) -> list[str]:
        p = self.profile
        log = self.folder / "logs" / (f"{key}-%A_%a.out" if array else f"{key}-%j.out")
        placement = {"partition": p.partition, "account": p.account, "qos": p.qos, "constraint": p.constraint}
        if own is not None and own.partition:
            placement.update(partition=own.partition, constraint=None)
        options = [f"--job-name=oi-{self.runs.name}-{key}"]
        options += [f"--{name}={value}" for name, value in placement.items() if value]
        options += resources
        if array:
            options.append(f"--array={array}")
        if requeue:
            options += [f"--signal=B:USR2@{p.signal_seconds}", "--requeue"]
        options += ["--open-mode=append", f"--output={log}", *p.extra_sbatch]
        lines = ["#!/bin/bash", f"# olmo-inject: {title}", f"# cluster profile: {p.name}; rendered by `olmo-inject slurm render`"]
        lines += [f"#SBATCH {o}" for o in options]
        setup = own.setup if own is not None and own.setup is not None else p.setup
        lines += ["", "set -euo pipefail", *setup, f"cd {q(self.workdir)}", ""]
        return lines

    def _tokenize_job(self) -> Job:
        p, b = self.profile, self.profile.build
        # Each task tokenizes its inputs with as many processes as it has CPUs: at least that many inputs a task.
        parts = max(1, min(math.ceil(self.build_inputs / b.cpus), p.max_array_size))
        array = f"0-{parts - 1}" + (f"%{p.max_array_running}" if parts > p.max_array_running else "")
        command = (f"olmo-inject build {q(self.build_config)} --out {q(self.data)} --workers {b.cpus} "
                   f"--part \"$SLURM_ARRAY_TASK_ID/{parts}\"")
        memory = self._memory(b, "tokenize", workers=b.cpus)
        lines = self._header("build-tokenize", f"tokenize {self.build_inputs} inputs of {self.build_config} in "
                             f"{parts} array tasks (task K takes inputs i with i % {parts} == K), at most "
                             f"{p.max_array_running} at once", _resources(b, memory[0]), array=array, own=b)
        lines[2:2] = memory[1:]
        lines += ["echo \"olmo-inject: array task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on $(hostname)\"",
                  command, ""]
        return Job("build-tokenize", "\n".join(lines), [], "build")

    def _finish_job(self) -> Job:
        b = self.profile.build
        memory = self._memory(b, "finish", workers=b.cpus)
        lines = self._header("build-finish", f"finish the build of {self.build_config} into {self.data} "
                             f"(reuses the array's tokenized inputs; injects, writes, checks)",
                             _resources(b, memory[0]), own=b)
        lines[2:2] = memory[1:]
        lines += [f"olmo-inject build {q(self.build_config)} --out {q(self.data)} --workers {b.cpus}",
                  f"olmo-inject verify {q(self.data)} --workers {b.cpus}", ""]
        return Job("build-finish", "\n".join(lines), ["build-tokenize"], "build")

    def _train_job(self, t: Training, after: list[str]) -> Job:
        p = self.profile
        gpus = [f"--gpus-per-node={p.gpus_per_node}"] if p.gpus_per_node else []
        if p.mem is not None:
            memory = [p.mem]
        elif p.gpus_per_node:
            memory = ["0", "# memory: all of each node's (a GPU profile's training takes whole nodes)"]
        else:
            memory = self._memory(JobResources(), "train", params=t.params)
        resources = [f"--nodes={t.nodes}", "--ntasks-per-node=1", *gpus, f"--cpus-per-task={p.cpus_per_node}",
                     f"--mem={memory[0]}", f"--time={p.time_limit}"]
        run = self.runs / t.name
        title = f"train {t.name} ({t.config}) on {self.data} into {run}, {t.steps:,d} steps"
        lines = self._header(f"train-{t.name}", title, resources, requeue=True)
        lines[2:2] = ([f"# {t.estimate}"] if t.estimate else []) + memory[1:]
        overrides = "".join(f" --{o}" for o in t.overrides)
        lines += [
            *self._rendezvous_lines(),
            "echo \"olmo-inject: job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST, "
            "rendezvous $MASTER_ADDR:$MASTER_PORT\"",
            "",
            "# Preemption and the time limit: SLURM sends USR2 to this shell, which passes it to srun and srun to the",
            "# trainer; the trainer saves a checkpoint and exits, and the job requeues itself. The requeued job",
            "# resumes from that checkpoint with the same data order.",
            "# SIGTERM (`scontrol requeue`, preemption without --signal, scancel) reaches every process of the job;",
            "# the trainer saves after its current step as for USR2, if KillWait (scontrol show config) leaves it",
            "# the time, and SLURM itself requeues (or ends) the job: the script does not requeue it again.",
            "preempted=0 terminated=0 child=",
            "trap 'preempted=1; echo \"olmo-inject: USR2, saving and requeueing\"; kill -USR2 \"$child\" 2>/dev/null || true' USR2",
            "trap 'terminated=1; echo \"olmo-inject: TERM, saving after the current step\"; kill -USR2 \"$child\" 2>/dev/null || true' TERM",
            "",
            "# srun does not take --cpus-per-task from the job since SLURM 22.05: pass it, or each node gets one core.",
            "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=\"$SLURM_CPUS_PER_TASK\" \\",
            f"  olmo-inject train {q(t.config)} --data {q(self.data)} --run {q(run)} \\",
            f"    --nproc {max(p.gpus_per_node, 1)} --nnodes {t.nodes} --rendezvous \"$MASTER_ADDR:$MASTER_PORT\"{overrides} &",
            "child=$!",
            "status=0",
            "wait \"$child\" || status=$?",
            "while kill -0 \"$child\" 2>/dev/null; do status=0; wait \"$child\" || status=$?; done  # woken by the trap",
            "# A run whose last checkpoint exists is complete: a signal after its last step does not requeue it.",
            f"complete() {{ {t.final_checkpoint_test(run)}; }}",
            "if [ \"$terminated\" = 1 ]; then",
            "  exit 0",
            "fi",
            "if [ \"$preempted\" = 1 ] && ! complete; then",
            "  scontrol requeue \"$SLURM_JOB_ID\"",
            "  exit 0",
            "fi",
            "exit \"$status\"",
            "",
        ]
        return Job(f"train-{t.name}", "\n".join(lines), after, "train", t.name)

    def _rendezvous_lines(self) -> list[str]:
        """Shell lines setting MASTER_ADDR/MASTER_PORT (and the profile's env) in a training job's script, which
        SLURM runs on the allocation's first node: the head node, where rank 0 listens."""
        p = self.profile
        first, last = p.rendezvous_ports
        if p.rendezvous_interface:
            address = (f"MASTER_ADDR=$(ip -4 -o addr show dev {q(p.rendezvous_interface)} | "
                       "awk '{split($4, a, \"/\"); print a[1]; exit}')")
        else:
            address = "MASTER_ADDR=$(hostname -I | awk '{print $1}')"
        where = f"interface {p.rendezvous_interface}" if p.rendezvous_interface else "first address, `hostname -I`"
        return [
            *(f"export {k}={q(v)}" for k, v in sorted(p.env.items())),
            f"# Rendezvous on this (the head) node by address ({where}): a node name need not resolve",
            "# everywhere. The port comes from the job id, so jobs sharing a node differ, and lies below the ephemeral",
            "# range, where outgoing connections take ports.",
            address,
            "if [ -z \"$MASTER_ADDR\" ]; then echo \"olmo-inject: no address for the rendezvous on $(hostname)\" >&2; exit 1; fi",
            f"MASTER_PORT=$(( {first} + SLURM_JOB_ID % {last - first + 1} ))",
            "read -r low high < /proc/sys/net/ipv4/ip_local_port_range || true",
            "if [ -n \"${low:-}\" ] && [ \"$MASTER_PORT\" -ge \"$low\" ] && [ \"$MASTER_PORT\" -le \"$high\" ]; then",
            "  echo \"olmo-inject: warning: port $MASTER_PORT is in this node's ephemeral range $low-$high (profile: rendezvous_ports)\" >&2",
            "fi",
        ]

    def _eval_job(self, t: Training) -> Job:
        e = self.profile.eval
        run = self.runs / t.name
        device = "cuda" if e.gpus else "cpu"
        args = "".join(f" {q(a)}" for a in self.eval_args or [])
        also = f", then {' and '.join(self.analyses)}" if self.analyses else ""
        memory = self._memory(e, "eval", params=t.params)
        lines = self._header(f"eval-{t.name}", f"evaluate every checkpoint of {run} (seen vs held-out{also}) after "
                             "its training job; finished steps are skipped", _resources(e, memory[0]), own=e)
        lines[2:2] = memory[1:]
        lines += [f"olmo-inject eval {q(run)} --data {q(self.data)} --device {device}{args}"]
        lines += [f"olmo-inject analyze {a} {q(run)} --data {q(self.data)} --device {device}" for a in self.analyses]
        lines += [""]
        return Job(f"eval-{t.name}", "\n".join(lines), [f"train-{t.name}"], "eval", t.name)


    @staticmethod
    def _memory(r: JobResources, kind: str, params: int = 0, workers: int = 1) -> list[str]:
        """[--mem value] from the profile, or [the measured estimate, its arithmetic as a header comment]."""
        if r.mem is not None:
            return [r.mem]
        mem, how = estimate(kind, params, workers)
        return [mem, f"# {how}"]


def _resources(r: JobResources, mem: str) -> list[str]:
    gpus = [f"--gpus={r.gpus}"] if r.gpus else []
    return ["--ntasks=1", *gpus, f"--cpus-per-task={r.cpus}", f"--mem={mem}", f"--time={r.time_limit}"]


def q(value) -> str:
    return shlex.quote(str(value))


# ------------------------------------------------------------------------------------ node counts


def choose_nodes(params: int, tokens: int, global_batch: int, profile: ClusterProfile) -> tuple[int, str]:
    """The smallest power-of-two node count that trains in `target_hours` (6ND FLOPs at the profile's MFU),
    capped at `max_nodes` and at what splits the global batch evenly over the GPUs; and the arithmetic."""
    p = profile
    if p.gpus_per_node == 0:
        return 1, "CPU profile: one node, one process"
    gpu_hours = 6.0 * params * tokens / (p.gpu_tflops * 1e12 * p.mfu) / 3600
    nodes = 1
    while nodes < p.max_nodes and gpu_hours / (nodes * p.gpus_per_node) > p.target_hours:
        nodes *= 2
    nodes = min(nodes, p.max_nodes)
    while nodes > 1 and global_batch % (nodes * p.gpus_per_node):
        nodes -= 1
    if global_batch % (nodes * p.gpus_per_node):
        raise ConfigError(f"global_train_batch_size: {global_batch} does not split over {p.gpus_per_node} GPUs "
                          f"(profile {p.name}, gpus_per_node)")
    hours = gpu_hours / (nodes * p.gpus_per_node)
    jobs = math.ceil(hours * 3600 / max(seconds(p.time_limit) - p.signal_seconds, 1))
    return nodes, (f"{params:,d} params x {tokens / 1e9:.2f}B tokens x 6 = {6 * params * tokens:.3e} FLOPs = "
                   f"{gpu_hours:,.0f} GPU-hours at {p.mfu:.0%} MFU of {p.gpu_tflops:g} TFLOP/s -> {nodes} node(s) x "
                   f"{p.gpus_per_node} GPUs, ~{hours:,.1f} h, {jobs} job(s) of {p.time_limit}")
