"""Verify speed: `olmo-inject verify` over a build dense with examples (100 comparison examples in every
batch of 32 x 256 tokens), with 1 and with N processes; each run in its own child process, the reports
compared byte for byte.

    python benchmarks/verify_throughput.py [--workers 2] [--workdir bench-out/verify]

Prints examples verified per second for each and the ratio, and extrapolates to the reference run's
48.8M examples.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

REFERENCE_EXAMPLES = 48_829 * 1_000


def make_build(workdir: Path) -> Path:
    from inject.build import run_build
    from inject.config import load_build_config
    from inject.sample import write_sample_corpus

    build = workdir / "build"
    if (build / "manifest.json").exists():
        return build
    write_sample_corpus(workdir / "corpus", shards=4)
    config = {"inputs": ["corpus/*"], "sequence_length": 256, "training": {"global_batch_size": 32, "steps": 600},
              "tasks": [{"name": "cmp3-r100", "task": "comparison", "params": {"digits": 3},
                         "schedule": {"kind": "even", "rate": 100}}]}
    (workdir / "build.yaml").write_text(yaml.safe_dump(config))
    run_build(load_build_config(workdir / "build.yaml"), build, overwrite=True)
    return build


def timed_verify(build: Path, workers: int) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "inject.cli", "verify", str(build), "--workers", str(workers)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"verify failed:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/verify"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import json

    build = make_build(args.workdir)
    examples = json.loads((build / "manifest.json").read_text())["injection"]["totals"]["examples"]
    one, report_one = timed_verify(build, 1)
    many, report_many = timed_verify(build, args.workers)
    assert report_one == report_many, "the reports differ between 1 and N processes"
    print(f"build: {examples:,} examples in 600 batches of 32 x 256 tokens")
    for n, seconds in ((1, one), (args.workers, many)):
        rate = examples / seconds
        print(f"verify --workers {n}: {seconds:.1f} s (start-up included), {rate:,.0f} examples/s; "
              f"the reference run's {REFERENCE_EXAMPLES / 1e6:.1f}M examples: ~{REFERENCE_EXAMPLES / rate / 3600:.1f} h")
    print(f"ratio 1 / {args.workers} processes: {one / many:.2f}x; reports identical")


if __name__ == "__main__":
    main()
