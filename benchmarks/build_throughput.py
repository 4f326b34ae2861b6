"""Build throughput (tokens/s) and peak memory: sample corpus vs a 10x larger one, 1 vs 2 workers,
and the pre-tokenized path against a plain copy of the same bytes.

    python benchmarks/build_throughput.py [--repeat 10] [--workdir bench-out]

Each build runs in a fresh child process so that its peak RSS (self + worker processes) is its own.
"""

from __future__ import annotations

import argparse
import json
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
    rows = []
    for name, corpus in (("sample", small), (f"sample x{args.repeat}", large)):
        config = work / f"{corpus.name}.yaml"
        config.write_text(yaml.safe_dump({"inputs": [str(corpus)], "sequence_length": 2048}))
        for workers in (1, 2):
            r = measure(config, work / f"out-{corpus.name}-{workers}", workers)
            rows.append((name, f"text, {workers} worker(s)", r))
            print(f"{name:14s} text   workers={workers}  {r['tokens']/1e6:7.1f}M tokens  {r['tokens']/r['seconds']/1e6:6.2f}M tok/s  peak {r['peak_mb']:6.0f} MB", flush=True)

    # Pre-tokenized input: the large build's token files as the source, against copying the same bytes.
    built = work / f"out-{large.name}-1" / "data"
    config = work / "pretokenized.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(built / "*.npy")], "sequence_length": 2048}))
    r = measure(config, work / "out-pretokenized", 1)
    start = time.perf_counter()
    copy_dir = work / "plain-copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_dir.mkdir()
    for f in sorted(built.iterdir()):
        shutil.copyfile(f, copy_dir / f.name)
    copy_seconds = time.perf_counter() - start
    print(f"{'pre-tokenized':14s} tokens workers=1  {r['tokens']/1e6:7.1f}M tokens  {r['tokens']/r['seconds']/1e6:6.2f}M tok/s  "
          f"peak {r['peak_mb']:6.0f} MB  plain copy {r['tokens']/copy_seconds/1e6:.1f}M tok/s  ratio build/copy time {r['seconds']/copy_seconds:.1f}x")


if __name__ == "__main__":
    main()
