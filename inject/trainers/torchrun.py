"""Starting a trainer's worker processes (one directly, several under torchrun) and passing them SLURM's signals:
what every trainer's `launch` shares (ai2-olmo's and OLMo-core's differ only in the python and the worker).
Moved here from olmo_configs/train.py."""

from __future__ import annotations

import os
import signal
import subprocess
from functools import partial
from pathlib import Path

from ..errors import ConfigError
from ..lock import die_with_parent


STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
"""Passed on to every worker, which saves after its current step and stops: SLURM's preemption warning (USR2),
and `scontrol requeue`, preemption without a signal or the time limit (TERM, then SIGKILL after KillWait)."""


def run_workers(python: str, worker: list[str], nproc: int, nnodes: int = 1, rendezvous: str | None = None,
                keep_open: int | None = None, env: dict[str, str] | None = None) -> int:
    """`python WORKER...` as `nproc` processes on this node of `nnodes` (one process: started directly; more: under
    torchrun, `python -m torch.distributed.run`); returns its exit code. SIGUSR2 or SIGTERM sent to this process
    reaches every worker (they save and stop; this launcher waits for them instead of dying); the workers die
    with this process. `env`: the workers' environment (default: this one's).

    Several nodes (one launcher per node, e.g. under `srun`) meet at `rendezvous` (HOST:PORT of the first node).
    `keep_open`: a file descriptor (the run's lock) the workers keep open for as long as they run.
    """
    env = {
        "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // nproc)),  # the cores this job may use
        # glibc returns large freed blocks to the OS by default; the logits (tokens x 50k) are reallocated
        # every micro-batch, and the page faults tripled step time on CPU. Keep them.
        "MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
        **(os.environ if env is None else env),
    }
    passed = (keep_open,) if keep_open is not None else ()
    if nproc == 1 and nnodes == 1:  # one process: no agent in between, so that a kill or a signal reaches the trainer itself
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), **env}
        process = subprocess.Popen([python, *worker], env=env, preexec_fn=partial(die_with_parent, os.getpid()),
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
            # Under srun, the allocation's first node (where the batch script found the address) hosts the
            # rendezvous store. torchrun would guess it from the host's names, which need not resolve to that
            # address (e.g. a hostname in /etc/hosts as 127.0.x.x): then no node hosts it and all time out.
            if os.environ.get("SLURM_NODEID", "").isdigit():
                placement.append(f"--rdzv_conf=is_host={int(os.environ['SLURM_NODEID'] == '0')}")
        command = [python, "-m", "torch.distributed.run", *placement, f"--nproc_per_node={nproc}", *worker]
        # torchrun's agent would die on SIGUSR2, so it ignores it (an inherited SIG_IGN); its workers run in
        # sessions of their own and install their own handler first thing: the signal goes to each of them.
        process = subprocess.Popen(command, env=env, preexec_fn=partial(_agent_preexec, os.getpid()), pass_fds=passed)
        forward = lambda signum: [_signal(pid, signum) for pid in _children(process.pid)]  # noqa: E731
    # SLURM signals the job's shell (--signal=B:USR2@...), which passes it to srun and srun to us; a requeue
    # TERMs every process of the job. Pass either on to the trainers, which save a checkpoint and stop. (torchrun's
    # agent installs its own TERM handler: on TERM it gives its workers 30 s before killing them.)
    handlers = {signum: signal.signal(signum, lambda signum, frame: forward(signum)) for signum in STOP_SIGNALS}
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        return process.wait()
    finally:
        for signum, previous in handlers.items():
            signal.signal(signum, previous)


def _agent_preexec(launcher: int) -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    die_with_parent(launcher)  # the agent's workers set their own (e.g. olmo_configs/worker.py): they die with the agent


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
