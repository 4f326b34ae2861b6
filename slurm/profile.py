"""Cluster profiles: everything that differs between SLURM clusters, in one YAML file, out of the code.

Two ship with the toolkit (slurm/profiles/): `example-8gpu` (8 GPUs per node, the shape of most
clusters; copy and edit it) and `local-cpu` (CPU nodes, one process each, e.g. the two-node SLURM of the tests).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from inject.errors import ConfigError

PROFILES_DIR = Path(__file__).parent / "profiles"
TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$|^\d+$")  # D-HH:MM:SS, HH:MM:SS or minutes
MEMORY = re.compile(r"^\d+[KMGT]?$")
EPHEMERAL = (32768, 60999)
"""Linux's default ephemeral port range (net.ipv4.ip_local_port_range)."""


@dataclass
class JobResources:
    """What one evaluation or one build job asks for (training jobs take whole nodes)."""

    gpus: int = 0
    """GPUs for the job (evaluation: 1 is plenty; builds: 0)."""
    cpus: int = 4
    """CPU cores (builds: tokenizer processes, `--workers`; every array task and the finishing job use them all)."""
    mem: str | None = None
    """Memory, in SLURM's notation (`32G`; `0` = all of the node's); None: the measured estimate for the job
    kind (and the run's model size), slurm/resources.py, stated in the script's header."""
    time_limit: str = "04:00:00"
    """Wall-clock limit, D-HH:MM:SS or HH:MM:SS."""
    partition: str | None = None
    """Another partition for these jobs (e.g. a CPU partition for builds; the profile's `constraint` is then
    dropped); None: the profile's partition."""
    setup: list[str] | None = None
    """Shell lines these jobs run first instead of the profile's `setup` (e.g. builds on a CPU partition without
    `module load cuda`); None: the profile's `setup`."""


@dataclass
class ClusterProfile:
    name: str
    """A name for the cluster, shown in the rendered scripts."""
    partition: str | None = None
    """`--partition`; None: the cluster's default partition."""
    account: str | None = None
    """`--account` to charge; None: your default account."""
    qos: str | None = None
    """`--qos`; None: the default."""
    constraint: str | None = None
    """`--constraint` (node features, e.g. `h100`); None: any node of the partition."""
    gpus_per_node: int = 8
    """GPUs on one node; 0 for CPU nodes (training then runs one CPU process per node)."""
    cpus_per_node: int = 64
    """CPU cores a training job takes on each node."""
    mem: str | None = None
    """Memory per training node, in SLURM's notation; `0` = all of it; None: all of it on GPU profiles (training
    takes whole nodes), the measured estimate for the run's model size on CPU profiles (slurm/resources.py)."""
    time_limit: str = "48:00:00"
    """Wall-clock limit of one training job. Longer runs are fine: the job checkpoints at the limit and requeues."""
    signal_seconds: int = 300
    """SIGUSR2 arrives this long before the time limit (`--signal=B:USR2@...`): time to save a checkpoint."""
    max_nodes: int = 16
    """Most nodes one training job may use."""
    target_hours: float = 72.0
    """Wall-clock a training run should take: sets its node count (the smallest power of two that fits)."""
    gpu_tflops: float = 989.0
    """Peak bf16 TFLOP/s of one GPU, for the node-count arithmetic (989: H100 SXM)."""
    mfu: float = 0.4
    """Expected model FLOPs utilization, for the node-count arithmetic."""
    max_array_size: int = 1001
    """The cluster's MaxArraySize (`scontrol show config`): build arrays are chunked to it."""
    max_array_running: int = 32
    """Most tasks of a build array running at once (`--array=0-N%K`): a build does not take a whole partition,
    nor all of a shared filesystem's bandwidth."""
    rendezvous_ports: list[int] = field(default_factory=lambda: [10000, 29999])
    """[first, last]: a training job's rendezvous port is `first + job id % (last - first + 1)`, so jobs sharing a
    node differ. Keep it below Linux's ephemeral range (32768-60999, `/proc/sys/net/ipv4/ip_local_port_range`):
    a port in it can be taken by any outgoing connection. The script checks the head node's actual range."""
    rendezvous_interface: str | None = None
    """Network interface whose IPv4 address the other nodes reach the head node on (e.g. `ib0`, `eth0`); None:
    the head node's first address (`hostname -I`). Never the node's name: names need not resolve on every node,
    and `hostname --ip-address` can give 127.0.x.x."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment for training jobs, exported before launch: NCCL and network settings such as
    `NCCL_SOCKET_IFNAME`, `GLOO_SOCKET_IFNAME`, `NCCL_IB_HCA`, `NCCL_DEBUG`; none by default (NCCL's own choice)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines training jobs run first, and evaluation and build jobs unless their own `setup` is given:
    `module load ...`, `source ~/venvs/olmo-inject/bin/activate`."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More `#SBATCH` options, verbatim, for every job (e.g. `--exclusive`, `--mail-type=FAIL`)."""
    eval: JobResources = field(default_factory=lambda: JobResources(gpus=1, cpus=8))
    """Resources of one evaluation job."""
    build: JobResources = field(default_factory=lambda: JobResources(gpus=0, cpus=8))
    """Resources of one build (tokenization) task of the array, and of the finishing job."""

    def validate(self, source: str = "profile") -> "ClusterProfile":
        problems = []
        for name in ("gpus_per_node", "cpus_per_node", "max_nodes", "max_array_size", "max_array_running",
                     "signal_seconds"):
            value = getattr(self, name)
            minimum = 0 if name == "gpus_per_node" else 1
            if not isinstance(value, int) or value < minimum:
                problems.append(f"{name}: expected an integer >= {minimum}, got {value!r}")
        for name in ("target_hours", "gpu_tflops", "mfu"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                problems.append(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for prefix, obj in (("", self), ("eval.", self.eval), ("build.", self.build)):
            if not TIME.match(str(obj.time_limit)):
                problems.append(f"{prefix}time_limit: expected D-HH:MM:SS or HH:MM:SS, got {obj.time_limit!r}")
            if obj.mem is not None and not MEMORY.match(str(obj.mem)):
                problems.append(f"{prefix}mem: expected SLURM memory like 32G or 0, got {obj.mem!r}")
        for prefix, obj in (("eval.", self.eval), ("build.", self.build)):
            if not isinstance(obj.cpus, int) or obj.cpus < 1:
                problems.append(f"{prefix}cpus: expected an integer >= 1, got {obj.cpus!r}")
            if obj.setup is not None and not (isinstance(obj.setup, list) and all(isinstance(x, str) for x in obj.setup)):
                problems.append(f"{prefix}setup: expected a list of strings")
        if not problems and self.signal_seconds >= seconds(self.time_limit) / 2:
            problems.append(f"signal_seconds: {self.signal_seconds} s is half the time limit {self.time_limit} or more")
        ports = self.rendezvous_ports
        if not (isinstance(ports, list) and len(ports) == 2 and all(isinstance(x, int) for x in ports)
                and 1024 <= ports[0] <= ports[1] <= 65535):
            problems.append(f"rendezvous_ports: expected [first, last] with 1024 <= first <= last <= 65535, got {ports!r}")
        elif ports[0] <= EPHEMERAL[1] and ports[1] >= EPHEMERAL[0]:
            problems.append(f"rendezvous_ports: {ports} overlaps Linux's ephemeral port range {list(EPHEMERAL)}, where "
                            f"any outgoing connection may hold the port; choose ports below {EPHEMERAL[0]}")
        if not isinstance(self.env, dict) or not all(isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)
                                                     for k in self.env):
            problems.append(f"env: expected a mapping of environment variable names to values, got {self.env!r}")
        if self.rendezvous_interface is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]+", str(self.rendezvous_interface)):
            problems.append(f"rendezvous_interface: expected an interface name like eth0, got {self.rendezvous_interface!r}")
        for name in ("setup", "extra_sbatch"):
            if not isinstance(getattr(self, name), list) or not all(isinstance(x, str) for x in getattr(self, name)):
                problems.append(f"{name}: expected a list of strings")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        return self


def seconds(time_limit: str) -> int:
    """SLURM time notation in seconds (a bare number is minutes)."""
    text = str(time_limit)
    if text.isdigit():
        return int(text) * 60
    days, _, clock = text.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return (int(days) if days else 0) * 86400 + h * 3600 + m * 60 + s


def available() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> ClusterProfile:
    """A shipped profile by name (`example-8gpu`, `local-cpu`) or a YAML file; unknown keys are errors."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PROFILES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"--profile: no profile {name_or_path!r}; shipped: {available()}, or give a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the profile: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of profile fields")
    data.setdefault("name", path.stem)
    return _build(ClusterProfile, data, str(path)).validate(str(path))


def _build(cls, data: dict, source: str, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown field {prefix}{unknown[0]}; expected one of {sorted(fields)}")
    values = {}
    for key, value in data.items():
        if key in ("eval", "build"):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}{key}: expected a mapping of gpus, cpus, mem, time_limit, partition, setup")
            value = _build(JobResources, value, source, f"{key}.")
        values[key] = value
    return cls(**values)
