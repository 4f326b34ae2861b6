"""Wall time of `olmo-inject demo`, per stage: the command a new user runs first (issue target: <= 3 minutes
on 2 cores, every stage real).

    python benchmarks/demo_time.py [--workdir /tmp/demo-time] [--keep] [--quiet]

Runs the demo as a child process, exactly as a user would, and prints its total wall time and the demo's
own per-stage table (wall and CPU seconds; the CPU column counts the demo and the trainer it launches).
When other jobs share the cores, wall time inflates and CPU time does not: the CPU total then bounds what
the demo takes on an idle machine (single-threaded stages), and the load average printed before and after
says how loaded the machine was.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = re.compile(r"^stage times \(wall s / CPU s\): (.*); total ([\d.]+)/([\d.]+)$", re.M)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="demo folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the demo folder")
    parser.add_argument("--quiet", action="store_true", help="print only the timings, not the demo's output")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="demo-time-")) / "demo"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    load_before = os.getloadavg()
    start = time.perf_counter()
    demo = subprocess.Popen([sys.executable, "-m", "inject.cli", "demo", "--workdir", str(work)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in demo.stdout:  # the demo's own output, as it comes
        output.append(line)
        if not args.quiet:
            sys.stdout.write(line)
    code = demo.wait()
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    if code != 0:
        print(f"demo failed with exit code {code} after {wall:.1f} s")
        return 1
    match = STAGES.search("".join(output))
    if not match:
        print("the demo printed no stage times", file=sys.stderr)
        return 1
    print(f"olmo-inject demo: {wall:.1f} s wall in all (process start-up included), {os.cpu_count()} cores, "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"{'stage':12s} {'wall s':>8s} {'CPU s':>8s}")
    for part in match.group(1).split(", "):
        name, times = part.rsplit(" ", 1)
        stage_wall, stage_cpu = times.split("/")
        print(f"{name:12s} {float(stage_wall):8.1f} {float(stage_cpu):8.1f}")
    print(f"{'stages':12s} {float(match.group(2)):8.1f} {float(match.group(3)):8.1f}")
    if not args.keep and not args.workdir:
        shutil.rmtree(work.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
