"""Peak memory of each SLURM job kind, counted as SLURM's `jobacct_gather/linux` counts it: the summed RSS of
every process of the job (launcher, trainer, tokenizer workers), each process at its own peak (VmHWM). These
peaks are the measured estimates in slurm/resources.py (the `--mem` a job asks for when its profile does not
say), so rerun this after a change that moves memory (a new dependency, another model size default).

    python benchmarks/slurm_memory.py [--workdir bench-memory]

Runs, one after the other, what the local-cpu jobs run on the demo corpus (8 shards): a tokenize array task
(`build --part 0/4 --workers 1`; part 1/4 with `--workers 2`: the main process and two tokenizer processes),
the finishing build and verify (`--workers 1`), tiny training (4 steps,
one CPU process, under our launcher and torchrun) and evaluation of its checkpoints (10 + 10 per task).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def high_water(pid: int) -> int:
    """The process's peak RSS so far (bytes): the kernel's VmHWM, which no sampling interval misses."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak(command: list[str], cwd: Path) -> tuple[int, float]:
    """Run `command`; the sum over its processes of each one's peak RSS (bytes: an upper bound of the summed
    RSS at any moment, which jobacct_gather samples) and wall seconds. Fails loudly when the command fails."""
    start = time.time()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    while child.poll() is None:
        for pid in tree(child.pid):
            peaks[pid] = max(peaks.get(pid, 0), high_water(pid))
        time.sleep(0.1)
    if child.returncode:
        sys.exit(f"{' '.join(command)} failed ({child.returncode}):\n{child.stderr.read()[-3000:]}")
    return sum(peaks.values()), time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-memory"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from inject.cli import EXAMPLES_DIR
    from inject.sample import write_demo_corpus

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_demo_corpus(work / "corpus", shards=8)
    shutil.copyfile(EXAMPLES_DIR / "demo.yaml", work / "build.yaml")
    cli = [sys.executable, "-m", "inject.cli"]
    tiny = REPO / "olmo_configs" / "tiny.yaml"
    kinds = [
        ("build-tokenize", cli + ["build", "build.yaml", "--out", "build", "--workers", "1", "--part", "0/4"]),
        ("build-tokenize, 2 workers", cli + ["build", "build.yaml", "--out", "build", "--workers", "2", "--part", "1/4"]),
        ("build-finish", cli + ["build", "build.yaml", "--out", "build", "--workers", "1"]),
        ("build-finish (verify)", cli + ["verify", "build", "--workers", "1"]),
        ("train tiny", cli + ["train", str(tiny), "--data", "build", "--run", "run", "--max_duration=4"]),
        ("eval tiny", cli + ["eval", "run", "--data", "build", "--device", "cpu", "--seen", "10", "--held-out", "10"]),
    ]
    print(f"load average {os.getloadavg()[0]:.1f}; summed peak RSS of each job's processes")
    for kind, command in kinds:
        highest, wall = peak(command, work)
        print(f"{kind:24s} {highest / 2**30:6.2f} GiB   ({wall:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
