"""`olmo-inject train CONFIG --data BUILD --run RUN`: train an ai2-olmo model on an olmo-inject build.

The launcher checks the TrainConfig against the build (the data order, and so every injection rate,
depends on batch size, sequence length and seed), fills in the build's paths, dtype, tokenizer and EOS,
writes the resolved config into the run folder and starts `torchrun` (one process per GPU, or one on
CPU). Running it again on the same run folder resumes from the latest checkpoint, with the data order
continuing where it stopped (OLMo restores the loader position from the trainer state); on a run that is
already complete it trains nothing.

One trainer per run folder: the launcher holds RUN/.lock (shared by the launchers of one multi-node run)
and hands it to the trainer, which dies with its launcher (parent-death signal), so a killed launcher
leaves no trainer behind and a second `train` on the same folder is refused. RUN/build.json records the
build's identity (`inject.identity`): a resume on a replaced build is refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

from inject.build import load_manifest
from inject.errors import ConfigError
from inject.identity import bind_run
from inject.lock import die_with_parent, folder_lock
from inject.trainers.ai2_olmo import order_settings

RESOLVED = "config.yaml"
LOCK = ".lock"


def resolve_config(config_path: Path, build_dir: Path, run_dir: Path, overrides: list[str]):
    """The TrainConfig for this run, checked against the build; raises ConfigError naming the field."""
    from olmo.config import TrainConfig

    try:
        cfg = TrainConfig.load(config_path, overrides=[o.lstrip("-") for o in overrides])
    except Exception as e:  # omegaconf raises several types for bad keys/values
        raise ConfigError(f"{config_path}: {e}") from None
    manifest = load_manifest(build_dir)
    tok = manifest["tokenizer"]
    problems = [(name, got, want) for name, got, want in order_settings(cfg, manifest) if got != want]
    if cfg.tokenizer.identifier and Path(cfg.tokenizer.identifier).name != tok["file"]:
        problems.append(("tokenizer.identifier", cfg.tokenizer.identifier, tok["olmo_identifier"]))
    inj = manifest.get("injection")
    if inj:
        t = inj["training"]
        steps = int(cfg.max_duration) if str(cfg.max_duration).isdigit() else None
        if steps is None or steps > t["steps"]:
            problems.append(("max_duration", cfg.max_duration, f"at most {t['steps']} steps (the plan's length)"))
    if problems:
        order = {name for name, _, _ in order_settings(cfg, manifest)}
        why = (" (these fields decide which instances each step reads; the build's plan holds only for the values "
               "it was made for, as in its olmo-data.yaml)") if order & {name for name, _, _ in problems} else ""
        raise ConfigError("; ".join(f"{name} is {got!r} in {config_path}, the build {build_dir} needs {want!r}"
                                    for name, got, want in problems) + why)
    cfg.data.paths = [str((Path(build_dir) / f["path"]).resolve()) for f in manifest["outputs"]]
    cfg.data.memmap_dtype = manifest["dtype"]
    cfg.data.datasets = None
    cfg.model.eos_token_id = tok["eos_token_id"]
    cfg.model.pad_token_id = tok["pad_token_id"]
    cfg.model.vocab_size = tok["vocab_size"]
    if (cfg.model.embedding_size or 0) < tok["vocab_size"]:
        cfg.model.embedding_size = -(-tok["vocab_size"] // 128) * 128
    cfg.tokenizer.identifier = tok["olmo_identifier"]
    cfg.save_folder = str(Path(run_dir).resolve())
    cfg.run_name = cfg.run_name or Path(run_dir).name
    cfg.canceled_check_interval = 1  # SIGUSR2 (preemption) is acted on after the current step
    return cfg


def render(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg), sort_keys=False)


def write_resolved(cfg, run_dir: Path) -> Path:
    """Write the run's config; an existing run folder must hold the same one (resume, not a new run)."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESOLVED
    text = render(cfg)
    if path.exists() and path.read_text() != text:
        old = OmegaConf.to_container(OmegaConf.load(path))
        new = OmegaConf.to_container(OmegaConf.create(text))
        raise ConfigError(f"{run_dir}: holds a run with another config (first difference: {_first_difference(old, new)}); "
                          f"use a new run folder")
    tmp = path.with_name(f"{RESOLVED}.{os.getpid()}.tmp")  # one launcher per node may write it at once
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def train(cfg, build_dir: Path, run_dir: Path, nproc: int | None = None, nnodes: int = 1,
          rendezvous: str | None = None) -> int:
    """Train the resolved `cfg` into `run_dir` under the run's lock; returns the trainer's exit code
    (0 without starting it when the run is complete)."""
    run_dir = Path(run_dir)
    with folder_lock(run_dir / LOCK, f"the run folder {run_dir}", shared=nnodes > 1) as lock_fd:
        path = write_resolved(cfg, run_dir)
        bind_run(run_dir, build_dir)
        done = completed_step(run_dir, cfg)
        if done is not None:
            print(f"olmo-inject train: {run_dir} is complete (its latest checkpoint is step {done}, the run's end); "
                  f"nothing to train")
            return 0
        return launch(path, nproc, nnodes, rendezvous, keep_open=lock_fd)


def final_step(cfg) -> int | None:
    """The step a run stops at (stop_at, else max_duration in steps); None when given in tokens or epochs."""
    steps = int(cfg.max_duration) if str(cfg.max_duration).isdigit() else None
    if cfg.stop_at is not None:
        steps = min(cfg.stop_at, steps) if steps is not None else cfg.stop_at
    return steps


def completed_step(run_dir: Path, cfg) -> int | None:
    """The latest checkpoint's step when it is at or past the run's end (the run is complete), else None.
    The same test as the trainer's after it restores that checkpoint (olmo_configs.worker)."""
    from olmo.util import find_latest_checkpoint

    end = final_step(cfg)
    latest = find_latest_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    if end is None or latest is None:
        return None
    step = int(Path(latest).name.replace("step", "").replace("-unsharded", ""))
    return step if step >= end else None


def launch(config_path: Path, nproc: int | None = None, nnodes: int = 1, rendezvous: str | None = None,
           keep_open: int | None = None) -> int:
    """torchrun with one process per GPU (or one on CPU), on this node of `nnodes`; returns its exit code.

    Several nodes (one launcher per node, e.g. under `srun`) meet at `rendezvous` (HOST:PORT of the first node).
    `keep_open`: a file descriptor (the run's lock) the trainer keeps open for as long as it runs.
    """
    import torch

    nproc = nproc or max(torch.cuda.device_count(), 1)
    _check_resume_checkpoint(Path(config_path).parent)
    worker = ["-m", "olmo_configs.worker", str(config_path)]
    env = {
        "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // nproc)),  # the cores this job may use
        # glibc returns large freed blocks to the OS by default; the logits (tokens x 50k) are reallocated
        # every micro-batch, and the page faults tripled step time on CPU. Keep them.
        "MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
        **os.environ,
    }
    passed = (keep_open,) if keep_open is not None else ()
    if nproc == 1 and nnodes == 1:  # one process: no agent in between, so that a kill or a signal reaches the trainer itself
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), **env}
        process = subprocess.Popen([sys.executable, *worker], env=env, preexec_fn=partial(die_with_parent, os.getpid()),
                                   pass_fds=passed)
        forward = process.send_signal
    else:
        if nnodes == 1:
            placement = ["--standalone"]
        elif not rendezvous:
            raise ConfigError(f"--nnodes {nnodes} needs --rendezvous HOST:PORT (the first node's address)")
        else:
            placement = [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rendezvous}",
                         f"--rdzv_id={os.environ.get('SLURM_JOB_ID', 'olmo-inject')}"]
        command = [sys.executable, "-m", "torch.distributed.run", *placement, f"--nproc_per_node={nproc}", *worker]
        # torchrun's agent would die on SIGUSR2, so it ignores it (an inherited SIG_IGN); its workers run in
        # sessions of their own and install their own handler first thing: the signal goes to each of them.
        process = subprocess.Popen(command, env=env, preexec_fn=partial(_agent_preexec, os.getpid()), pass_fds=passed)
        forward = lambda signum: [_signal(pid, signum) for pid in _children(process.pid)]  # noqa: E731
    # SLURM signals the job's shell (--signal=B:USR2@...), which passes it to srun and srun to us: pass it on
    # to the trainer, which saves a checkpoint and stops.
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: forward(signal.SIGUSR2))
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        return process.wait()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _agent_preexec(launcher: int) -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    die_with_parent(launcher)  # the agent's workers set their own (olmo_configs.worker): they die with the agent


def _check_resume_checkpoint(run_dir: Path) -> None:
    """The checkpoint a rerun resumes from is read with weights_only and an allowlist (olmo_configs.safe_load):
    one that needs any other class is refused here, naming the file, before any trainer starts."""
    from olmo.util import find_latest_checkpoint

    from .safe_load import check_checkpoint, check_environment

    check_environment()
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:
        check_checkpoint(latest)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc): torchrun's workers, not the workers' own children
    (data loader processes, which a stray SIGUSR2 would kill)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
