"""A real SLURM cluster for the tests on this one machine: munged, slurmctld, and two slurmd, one per node.

Recipe (../shared/DESIGN.md, section 5): Debian's `slurm-wlm` and `munge` packages, munged run as the
`munge` user, a slurm.conf whose nodes come from `slurmd -C`, every state/spool/log path under a
temporary folder. Needs root (slurmd runs jobs as their users).

Two nodes on one host: the machine's CPUs and memory split in two NodeName entries (`node1`, `node2`), each
its own `slurmd -N nodeN` on its own port (Debian's slurmd accepts -N, and `%n` in the spool, pid and log
paths), so multi-node jobs (srun over two nodes, a two-node rendezvous) run for real.

Resources are enforced as on production clusters: cores and memory are consumable
(`SelectTypeParameters=CR_Core_Memory`), and a job step whose processes' summed RSS exceeds its `--mem` is
killed (`JobAcctGatherType=jobacct_gather/linux`, `JobAcctGatherParams=OverMemoryKill`; the cgroup plugins
need a cgroup hierarchy slurmd may manage, which containers rarely give). There is no accounting database
(slurmdbd needs MariaDB), but the job completion log (`JobCompType=jobcomp/filetxt`) is kept, which `sacct -c`
reads. `KillWait=30`, SLURM's default: the grace between SIGTERM and SIGKILL.

    python tests/slurm_cluster.py start /tmp/slurm    # by hand, for trying the scripts; then
    export SLURM_CONF=/tmp/slurm/slurm.conf            # for sbatch, squeue, scontrol, olmo-inject slurm
    python tests/slurm_cluster.py stop /tmp/slurm
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path



class ClusterUnavailable(RuntimeError):
    pass


def missing_requirements() -> str | None:
    """Why a cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as their users)"
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"):
        if shutil.which(tool) is None:
            return f"`{tool}` not installed (apt-get install slurm-wlm munge)"
    return None


NODES = ("node1", "node2")


def node_lines() -> list[str]:
    """Two nodes sharing this host: half its CPUs (at least one) and a bit less than half its memory each
    (slurmd refuses a node that has less than its line says), each slurmd on its own port."""
    report = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(part.split("=", 1) for part in report.split() if "=" in part)
    cpus = max(int(fields["CPUs"]) // len(NODES), 1)
    memory = int(int(fields["RealMemory"]) * 0.9) // len(NODES)
    return [f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={_free_port()} "
            f"CPUs={cpus} RealMemory={memory} State=UNKNOWN" for name in NODES]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def slurm_conf(state: Path) -> str:
    host = socket.gethostname()
    return "\n".join([
        "ClusterName=olmo-inject-test",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={_free_port()}",  # not 6817/6818: a SLURM the machine already runs is left alone
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"StateSaveLocation={state}/ctld",
        f"SlurmdSpoolDir={state}/spool-%n",
        f"SlurmctldPidFile={state}/slurmctld.pid",
        f"SlurmdPidFile={state}/slurmd-%n.pid",
        f"SlurmctldLogFile={state}/slurmctld.log",
        f"SlurmdLogFile={state}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/linux",
        "JobAcctGatherParams=OverMemoryKill",
        "JobAcctGatherFrequency=task=2",  # memory sampled every 2 s (default 30)
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={state}/jobcomp.txt",
        "MpiDefault=none",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1",  # the main scheduler every second, not every minute
        "MaxArraySize=4",  # small, so that the tests exercise chunking of job arrays
        "MinJobAge=3600",  # keep finished jobs visible to scontrol for the whole test session
        "KillWait=30",
        "OverTimeLimit=0",
        *node_lines(),
        f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        "",
    ])


def _start_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    for folder in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["mungekey", "--create"], check=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)


def start(state: Path, timeout: float = 60.0) -> Path:
    """Start munged, slurmctld and slurmd with their config and state under `state`; wait until the node is
    idle. Returns the config file: SLURM commands (and the jobs, which inherit it) find the cluster through
    SLURM_CONF, which this sets in os.environ; /etc/slurm is not touched."""
    why = missing_requirements()
    if why:
        raise ClusterUnavailable(why)
    stop(state)
    state.mkdir(parents=True, exist_ok=True)
    for sub in ("ctld", *(f"spool-{n}" for n in NODES)):
        (state / sub).mkdir(exist_ok=True)
    _start_munge()
    conf = state / "slurm.conf"
    conf.write_text(slurm_conf(state))
    os.environ["SLURM_CONF"] = str(conf)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True)
    for name in NODES:
        subprocess.run(["slurmd", "-f", str(conf), "-N", name], check=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split()
        if out and all(s == "idle" for s in out):
            return conf
        time.sleep(0.5)
    logs = "".join(p.read_text()[-2000:] for p in sorted(state.glob("slurm*.log")))
    raise ClusterUnavailable(f"the node did not become idle in {timeout:.0f} s; daemon logs:\n{logs}")


def stop(state: Path) -> None:
    """Stop the daemons by their pid files (munged is left running: it is harmless and shared)."""
    for pid_file in [*(state / f"slurmd-{n}.pid" for n in NODES), state / "slurmctld.pid"]:
        if not pid_file.exists():
            continue
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
        except (ValueError, ProcessLookupError):
            pass
        pid_file.unlink(missing_ok=True)


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    start(folder) if action == "start" else stop(folder)
