"""Verify speed: `olmo-inject verify` over builds dense with examples (100 three-digit comparison examples, text
encoding, in every batch of 32 x 256 tokens), with 1 and with N processes, each run in its own child process, the
reports compared byte for byte; then each check timed in one process (best of 2), to project the reference run.

    python benchmarks/verify_throughput.py [--workers 2] [--large] [--workdir bench-out/verify]

Builds: `dense`, 600 steps (60,000 examples); with --large also `large`, 10,000 steps (1,000,000 examples; its
input is the dense build's base token files repeated 16 times, 85.7M tokens, pre-tokenized) and `sparse`, the same
tokens in instances of 2048 tokens (the reference's) with 16 examples per batch of 32 (one per 4,096 tokens; the
reference run has one per 4,194), on which the checks that read every token are timed. Each draws from a seen pool
sized so that an item recurs as often as in the reference run (48.8M examples over the ~729,000 seen three-digit
comparisons: ~67 times): verify encodes each distinct example once per process, so the rate depends on that ratio;
the encoding rate is printed on its own.

Prints examples verified per second for each run (start-up included) and the time the reference run's 48.8M
examples would take at that rate; then per check: examples/s of the batch checks with the examples already
encoded, distinct examples encoded per second, tokens/s of the checks that read every token (batch reads, held-out
scan, Dolma check) beside two floors (reading the files, sha256 of them), and the reference run (204.8B tokens)
projected per check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REFERENCE_EXAMPLES = 48_829 * 1_000
REFERENCE_TOKENS = 48_829 * 2048 * 2048
REFERENCE_DISTINCT = 729_000
TASK = {"name": "cmp3-r100", "task": "comparison", "params": {"digits": 3}, "schedule": {"kind": "even", "rate": 100}}


def make_builds(workdir: Path, large: bool) -> dict[str, Path]:
    from inject.build import run_build
    from inject.config import load_build_config
    from inject.sample import write_sample_corpus

    def build(name: str, inputs: list[str], steps: int, seen: int, rate: float = 100, length: int = 256) -> Path:
        out = workdir / name
        if not (out / "manifest.json").exists():
            config = {"inputs": inputs, "sequence_length": length}
            if steps:
                task = {**TASK, "schedule": {"kind": "even", "rate": rate}, "pool": {"seen": seen}}
                config.update(training={"global_batch_size": 32, "steps": steps}, tasks=[task])
            (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config))
            run_build(load_build_config(workdir / f"{name}.yaml"), out, overwrite=True)
        return out

    if not (workdir / "corpus").exists():
        write_sample_corpus(workdir / "corpus", shards=4)
    builds = {"dense": build("dense", ["corpus/*"], 600, 60_000 // 67)}
    if large:
        base = build("base", ["corpus/*"], 0, 0)
        copies = workdir / "large-input"
        if not copies.exists():
            copies.mkdir()
            for k in range(16):
                for f in sorted((base / "data").glob("*.npy")):
                    shutil.copyfile(f, copies / f"{k:02d}-{f.name}")
        builds["large"] = build("large", ["large-input/*.npy"], 10_000, 1_000_000 // 67)
        # For the checks that read every token, at the reference's instances of 2048 tokens (the batch gather reads
        # whole instances, in shuffled order) and about its density: 16 examples per batch of 32 x 2048 tokens, one
        # per 4,096 tokens (the reference: one per 4,194).
        builds["sparse"] = build("sparse-2048", ["large-input/*.npy"], 1_300, 1_300 * 16 // 67, rate=16, length=2048)
    return builds


def timed_verify(build: Path, workers: int) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "inject.cli", "verify", str(build), "--workers", str(workers)],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"verify failed:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def per_check(build: str) -> None:
    """(child process) each check of verify timed in one process; prints one JSON line."""
    import numpy as np

    from inject import trainers
    from inject import verify as V
    from inject.ledger import read_ledger

    timings = {}
    start = time.perf_counter()
    view = V.BuildView.load(Path(build))
    view.manifest["_dir"] = Path(build).resolve()
    ledger = read_ledger(build)
    import olmo.data  # noqa: F401  (ai2-olmo's loader code, imported once)
    timings["start-up"] = time.perf_counter() - start
    steps = list(range(1, view.manifest["injection"]["training"]["steps"] + 1))
    chunks = [(f, s) for f in range(len(view.manifest["outputs"]))
              for s in range(0, view.manifest["outputs"][f]["tokens"], V.HELD_OUT_CHUNK)]
    longest = int(ledger["length"].max()) + 8
    rows_of_step = np.searchsorted(ledger["step"], np.arange(1, len(steps) + 2))

    def encode_all() -> None:
        i = 0
        while i < len(steps):
            i = V._encode_ahead(view, ledger, rows_of_step, steps, i)

    def read_batches() -> None:  # what the batch checks read: the loader's batches, nothing checked
        for _ in trainers.of_manifest(view.manifest).loader_batches(view.manifest, steps, True, V.Report()):
            pass

    files = [view.path / f["path"] for f in view.manifest["outputs"]]

    def read_files() -> None:  # the floor of every per-token check: the files' bytes read once
        for f in files:
            np.fromfile(f, dtype=np.uint8)

    def sha256_files() -> None:  # the floor of the Dolma hash: sha256 over the same bytes, in one thread
        sha = hashlib.sha256()
        for f in files:
            sha.update(np.fromfile(f, dtype=np.uint8))

    def gather() -> None:  # the batch reads' own cost per token: instances in shuffled order, 65,536 per call
        from inject.trainers.ai2_olmo import _read_instances

        L = view.manifest["sequence_length"]
        per_file = [np.asarray(np.memmap(f, dtype=view.manifest["dtype"], mode="r")) for f in files]
        counts = [len(a) // L for a in per_file]
        firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        arrays = [a[: n * L].reshape(n, L) for a, n in zip(per_file, counts)]
        order = np.random.default_rng(0).permutation(int(sum(counts)))
        for i in range(0, len(order), 1 << 16):
            _read_instances((firsts, arrays), order[i : i + (1 << 16)])

    for name, run in [("read", read_files), ("sha256", sha256_files), ("gather", gather),
                      ("encode", encode_all), ("batch reads", read_batches),
                      ("batches", lambda: V._check_steps(view, ledger, steps)),
                      ("held-out scan", lambda: V._held_out_in((build, chunks, longest), view, ledger)),
                      ("dolma", lambda: V.check_dolma(view, ledger, V.Report()))]:
        best = float("inf")
        for _ in range(1 if name == "encode" else 2):  # encoding happens once (then the examples are known)
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    tokens = sum(f["tokens"] for f in view.manifest["outputs"])
    print(json.dumps({"timings": timings, "examples": len(ledger), "distinct": view.examples.slots, "tokens": tokens}))


def checks_of(build: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--per-check", str(build)], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:
        sys.exit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_checks(build: Path, m: dict) -> None:
    t, examples, distinct, tokens = m["timings"], m["examples"], m["distinct"], m["tokens"]
    batches, reads = t["batches"], t["batch reads"]  # batches: every example already encoded
    rate = lambda seconds: f"{tokens / seconds / 1e6:,.0f}M tokens/s"  # noqa: E731
    print(f"per check, one process, best of 2, {build.name} build ({examples:,} examples, {distinct:,} distinct, "
          f"{tokens / 1e6:.1f}M tokens; load average {os.getloadavg()[0]:.1f}):")
    print(f"  floors: reading the files {rate(t['read'])} (page cache), sha256 of them {rate(t['sha256'])}")
    print(f"  start-up (imports, ai2-olmo's loader code): {t['start-up']:.1f} s")
    print(f"  encoding: {distinct / t['encode']:,.0f} distinct examples/s")
    print(f"  batch checks, examples already encoded: {examples / batches:,.0f} examples/s ({batches:.1f} s, of which "
          f"{reads:.1f} s reading {steps_of(build):,} batches; instances gathered in shuffled order: {rate(t['gather'])})")
    print(f"  held-out scan: {rate(t['held-out scan'])} ({t['held-out scan'] / t['read']:.0f}x the read floor); "
          f"Dolma check: {rate(t['dolma'])} ({t['dolma'] / t['sha256']:.1f}x the sha256 floor)")


def steps_of(build: Path) -> int:
    return json.loads((build / "manifest.json").read_text())["injection"]["training"]["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--large", action="store_true", help="also the 1M-example build (builds it once: a few minutes)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/verify"))
    parser.add_argument("--per-check", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.per_check:
        return per_check(args.per_check)
    args.workdir.mkdir(parents=True, exist_ok=True)
    builds = make_builds(args.workdir, args.large)
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), 2 cores shared")
    for name, build in builds.items():
        if name == "sparse":
            continue
        manifest = json.loads((build / "manifest.json").read_text())
        examples = manifest["injection"]["totals"]["examples"]
        steps = manifest["injection"]["training"]["steps"]
        print(f"{name}: {examples:,} examples in {steps:,} batches of 32 x 256 tokens")
        one, report_one = timed_verify(build, 1)
        many, report_many = timed_verify(build, args.workers)
        assert report_one == report_many, "the reports differ between 1 and N processes"
        for n, seconds in ((1, one), (args.workers, many)):
            rate = examples / seconds
            print(f"  verify --workers {n}: {seconds:.1f} s (start-up included), {rate:,.0f} examples/s; the reference "
                  f"run's {REFERENCE_EXAMPLES / 1e6:.1f}M examples at this rate: {REFERENCE_EXAMPLES / rate / 60:.1f} min")
        print(f"  ratio 1 / {args.workers} processes: {one / many:.2f}x; reports identical; load average {os.getloadavg()[0]:.2f}")
    dense = builds["large" if "large" in builds else "dense"]   # for the per-example costs
    sparse = builds.get("sparse", dense)                       # for the per-token costs
    m = {name: checks_of(build) for name, build in (("dense", dense), ("sparse", sparse))}
    for name, build in (("dense", dense), ("sparse", sparse)):
        report_checks(build, m[name])
        if sparse == dense:
            break
    t, d = m["sparse"]["timings"], m["dense"]["timings"]
    tokens, examples, distinct = m["sparse"]["tokens"], m["dense"]["examples"], m["dense"]["distinct"]
    ref = {"encoding (~729,000 distinct examples)": REFERENCE_DISTINCT * d["encode"] / distinct,
           "batch checks beyond reading (per example; per-batch costs of 100-example batches included)":
               REFERENCE_EXAMPLES * max(d["batches"] - d["batch reads"], 0) / examples,
           "reading the batches (per token, instances gathered in shuffled order)": REFERENCE_TOKENS * t["gather"] / tokens,
           "held-out scan (per token)": REFERENCE_TOKENS * t["held-out scan"] / tokens,
           "Dolma check (per token; one sha256 stream: not shared by workers)": REFERENCE_TOKENS * t["dolma"] / tokens,
           "  of which the sha256 floor": REFERENCE_TOKENS * t["sha256"] / tokens,
           "reading the token files once (floor, from the page cache)": REFERENCE_TOKENS * t["read"] / tokens}
    print(f"the reference run (48.8M examples, 204.8B tokens) at these rates (per example: {dense.name}; per token: "
          f"{sparse.name}), in one process:")
    for name, seconds in ref.items():
        print(f"  {name}: {seconds / 60:,.1f} min")
    one = sum(seconds for name, seconds in ref.items() if not name.startswith(" ") and not name.startswith("reading the token"))
    dolma = ref["Dolma check (per token; one sha256 stream: not shared by workers)"]
    encoding = ref["encoding (~729,000 distinct examples)"]
    # --workers 2 on 2 cores: the workers share all but the Dolma check, which the main process runs meanwhile; each
    # worker encodes the examples it meets (about all of them): the CPU time over 2 cores, at least the Dolma check
    two = max(dolma, (one + encoding) / 2)
    print(f"  total: {one / 60:,.1f} min in one process; with --workers 2 on 2 cores at least {two / 60:,.1f} min")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
