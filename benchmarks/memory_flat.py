"""Peak memory of `build`, `verify` and `eval` on the sample corpus and on 10 copies of it: memory must not grow
with the corpus (target: the 10x peak within 1.2x of the 1x peak, each verb).

    python benchmarks/memory_flat.py [--repeat 10] [--workdir bench-memory]

The two builds have the same config (the same tasks, rates and steps, so the same examples and ledger) and
differ only in the corpus, so a verb whose memory follows the corpus shows it in the ratio. `eval` scores a
tiny model trained for 2 steps on each build (every stepN checkpoint). Each command runs as a user runs it;
its peak is the largest resident set of the command and its child processes (GNU time's %M).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
STEPS = 100


def peak_mb(command: list[str], log: Path) -> float:
    """Max RSS of a command (with its children) in MB, from GNU time."""
    stats = log.with_suffix(".time")
    with open(log, "w") as out:
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(stats), *command], stdout=out, stderr=subprocess.STDOUT,
                       check=True)
    return int(stats.read_text().split()[-1]) / 1024


def olmo_inject(*args) -> list[str]:
    return [sys.executable, "-m", "inject.cli", *map(str, args)]


def corpus(work: Path, repeat: int) -> Path:
    from inject.sample import write_sample_corpus

    one = work / "corpus-x1"
    if not one.exists():
        write_sample_corpus(one)
    if repeat == 1:
        return one
    folder = work / f"corpus-x{repeat}"
    for r in range(repeat):
        for shard in sorted(one.iterdir()):
            target = folder / f"r{r:03d}-{shard.name}"
            if not target.exists():
                folder.mkdir(exist_ok=True)
                shutil.copyfile(shard, target)
    return folder


def measure(work: Path, repeat: int) -> dict:
    folder = corpus(work, repeat)
    config = yaml.safe_load((REPO / "inject" / "examples" / "demo.yaml").read_text())
    config.update(inputs=[str(folder)], workers=1)
    config["training"]["steps"] = STEPS
    (work / f"x{repeat}.yaml").write_text(yaml.safe_dump(config))
    build, run = work / f"build-x{repeat}", work / f"run-x{repeat}"
    shutil.rmtree(run, ignore_errors=True)
    peaks = {"build": peak_mb(olmo_inject("build", work / f"x{repeat}.yaml", "--out", build, "--overwrite"),
                              work / f"build-x{repeat}.log")}
    peaks["verify"] = peak_mb(olmo_inject("verify", build), work / f"verify-x{repeat}.log")
    subprocess.run(olmo_inject("train", REPO / "olmo_configs" / "tiny.yaml", "--data", build, "--run", run,
                               "--max_duration=2"), check=True, capture_output=True)
    peaks["eval"] = peak_mb(olmo_inject("eval", run, "--data", build, "--seen", 100, "--pending", 100,
                                        "--held-out", 100), work / f"eval-x{repeat}.log")
    tokens = __import__("json").loads((build / "manifest.json").read_text())["counts"]["tokens"]
    return {"tokens": tokens, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10, help="copies of the sample corpus in the large run (default 10)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-memory"))
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    small, large = measure(work, 1), measure(work, args.repeat)
    print(f"peak memory (MB), demo build config over {STEPS} steps; load average {os.getloadavg()[0]:.1f}")
    print(f"{'verb':8s} {'x1 (%.1fM tokens)' % (small['tokens'] / 1e6):>20s} {'x%d (%.1fM tokens)' % (args.repeat, large['tokens'] / 1e6):>21s}  ratio")
    worst = 0.0
    for verb in ("build", "verify", "eval"):
        ratio = large[verb] / small[verb]
        worst = max(worst, ratio)
        print(f"{verb:8s} {small[verb]:20.0f} {large[verb]:21.0f}  {ratio:.2f}x")
    print(f"largest ratio {worst:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
