"""Build throughput (tokens/s) and peak memory: sample corpus vs a 10x larger one, 1 vs 2 workers (with the
ratio of the peaks), and the pre-tokenized path against a plain copy of the same bytes.

    python benchmarks/build_throughput.py [--repeat 10] [--workdir bench-out]

Each build runs in a fresh child process so that its peak RSS (self + worker processes) is its own. The
pre-tokenized build and the plain copy alternate three times and each keeps its best time (the page cache and
the writeback of the previous writes weigh on whichever runs first); beside them, the time of the two sha256
passes the build must make (inputs and outputs, both recorded in the manifest) over the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def load_tokenizer(name: str) -> None:
    from inject import tokenizer

    tokenizer.load(name)


def child(config: str, out: str, workers: int) -> None:
    from inject.build import run_build
    from inject.config import load_build_config

    config = load_build_config(Path(config), workers=workers)
    load_tokenizer(config.tokenizer)  # imports torch/olmo: start-up, not build throughput
    import inject.place  # noqa: F401  (run_build imports it on first use: start-up too)
    start = time.perf_counter()
    manifest = run_build(config, Path(out), overwrite=True)
    seconds = time.perf_counter() - start
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"tokens": manifest["counts"]["tokens"], "seconds": seconds, "peak_mb": peak_kb / 1024}))


def measure(config: Path, out: Path, workers: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", str(config), str(out), str(workers)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10, help="copies of the sample corpus in the large run (default 10: ~54M tokens)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]))

    from inject.sample import write_sample_corpus

    work = args.workdir
    small = work / "corpus-small"
    write_sample_corpus(small)
    large = work / "corpus-large"
    large.mkdir(parents=True, exist_ok=True)
    for r in range(args.repeat):
        for shard in sorted(small.iterdir()):
            target = large / f"r{r:03d}-{shard.name}"
            if not target.exists():
                shutil.copyfile(shard, target)
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for name, corpus in (("sample", small), (f"sample x{args.repeat}", large)):
        config = work / f"{corpus.name}.yaml"
        config.write_text(yaml.safe_dump({"inputs": [str(corpus)], "sequence_length": 2048}))
        for workers in (1, 2):
            r = measure(config, work / f"out-{corpus.name}-{workers}", workers)
            rows.append((name, f"text, {workers} worker(s)", r))
            print(f"{name:14s} text   workers={workers}  {r['tokens']/1e6:7.1f}M tokens  {r['tokens']/r['seconds']/1e6:6.2f}M tok/s  peak {r['peak_mb']:6.0f} MB", flush=True)
    for workers in (1, 2):
        small_peak, large_peak = (r["peak_mb"] for _, how, r in rows if how == f"text, {workers} worker(s)")
        print(f"peak memory, {workers} worker(s): sample x{args.repeat} / sample = {large_peak / small_peak:.2f}", flush=True)

    # Pre-tokenized input: the large build's token files as the source, against copying the same bytes.
    built = work / f"out-{large.name}-1" / "data"
    config = work / "pretokenized.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(built / "*.npy")], "sequence_length": 2048}))
    copy_dir = work / "plain-copy"
    builds, copies = [], []
    for _ in range(3):
        builds.append(measure(config, work / "out-pretokenized", 1))
        copies.append(plain_copy(built, copy_dir))
    r = min(builds, key=lambda b: b["seconds"])
    copy_seconds, hash_seconds = min(copies), sha256_seconds(built)
    print(f"{'pre-tokenized':14s} tokens workers=1  {r['tokens']/1e6:7.1f}M tokens  {r['tokens']/r['seconds']/1e6:6.2f}M tok/s  "
          f"peak {r['peak_mb']:6.0f} MB  plain copy {r['tokens']/copy_seconds/1e6:.1f}M tok/s  ratio build/copy time "
          f"{r['seconds']/copy_seconds:.1f}x  (best of 3 each: build {r['seconds']:.2f} s, copy {copy_seconds:.2f} s; two sha256 "
          f"passes over the bytes, one thread: {hash_seconds:.2f} s = {hash_seconds / copy_seconds:.1f}x the copy)")
    print(f"load average {os.getloadavg()[0]:.1f}")


def plain_copy(source: Path, target: Path) -> float:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    start = time.perf_counter()
    for f in sorted(source.iterdir()):
        shutil.copyfile(f, target / f.name)
    return time.perf_counter() - start


def sha256_seconds(folder: Path) -> float:
    start = time.perf_counter()
    for _ in range(2):
        for f in sorted(folder.iterdir()):
            hashlib.sha256(f.read_bytes())
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
