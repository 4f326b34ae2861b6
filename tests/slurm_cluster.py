"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd on this machine.

Recipe (../shared/DESIGN.md, section 5): Debian's `slurm-wlm` and `munge` packages, munged run as the
`munge` user, a slurm.conf whose node line comes from `slurmd -C`, every state/spool/log path under a
temporary folder. Needs root (slurmd runs jobs as their users). Without an accounting database there is
no `sacct`: the tests poll `squeue` and `scontrol show job`.

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

DAEMONS = ("slurmd", "slurmctld")  # stopped in this order


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


def node_line() -> str:
    """The node's real CPUs and a bit less memory than it reports (slurmd refuses a node with less)."""
    report = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(part.split("=", 1) for part in report.split() if "=" in part)
    memory = int(int(fields["RealMemory"]) * 0.9)
    return (f"NodeName={socket.gethostname()} CPUs={fields['CPUs']} Boards={fields.get('Boards', 1)} "
            f"SocketsPerBoard={fields.get('SocketsPerBoard', 1)} CoresPerSocket={fields.get('CoresPerSocket', fields['CPUs'])} "
            f"ThreadsPerCore={fields.get('ThreadsPerCore', 1)} RealMemory={memory} State=UNKNOWN")


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
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"StateSaveLocation={state}/ctld",
        f"SlurmdSpoolDir={state}/spool",
        f"SlurmctldPidFile={state}/slurmctld.pid",
        f"SlurmdPidFile={state}/slurmd.pid",
        f"SlurmctldLogFile={state}/slurmctld.log",
        f"SlurmdLogFile={state}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1",  # the main scheduler every second, not every minute
        "MaxArraySize=4",  # small, so that the tests exercise chunking of job arrays
        "MinJobAge=3600",  # keep finished jobs visible to scontrol for the whole test session
        "KillWait=5",
        "OverTimeLimit=0",
        node_line(),
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
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
    for sub in ("ctld", "spool"):
        (state / sub).mkdir(exist_ok=True)
    _start_munge()
    conf = state / "slurm.conf"
    conf.write_text(slurm_conf(state))
    os.environ["SLURM_CONF"] = str(conf)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True)
    subprocess.run(["slurmd", "-f", str(conf)], check=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split()
        if out and all(s == "idle" for s in out):
            return conf
        time.sleep(0.5)
    logs = "".join((state / f"{d}.log").read_text()[-2000:] for d in DAEMONS if (state / f"{d}.log").exists())
    raise ClusterUnavailable(f"the node did not become idle in {timeout:.0f} s; daemon logs:\n{logs}")


def stop(state: Path) -> None:
    """Stop the daemons by their pid files (munged is left running: it is harmless and shared)."""
    for daemon in DAEMONS:
        pid_file = state / f"{daemon}.pid"
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
