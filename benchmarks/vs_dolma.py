"""Dolma text -> OLMo token files: `olmo-inject build` against `dolma tokens` (dolma 1.2.1), tokens/s on the
same corpus with the same number of processes, and the same token ids for every document.

    python benchmarks/vs_dolma.py [--processes 2] [--repeat 1] [--rounds 2] [--workdir bench-vs-dolma]

dolma goes into its own virtual environment (WORKDIR/dolma-venv, made on first use; dolma 1.2.1 with
boto3 1.26.76 and s3fs 2023.6.0 pinned, or pip backtracks for half an hour), so its dependencies never
meet the project's. The corpus is the sample corpus's documents (stripped, since `dolma tokens` strips
each text before tokenizing; empty ones left out) as `.json.gz` shards, Dolma's own format, `--repeat`
times over. Both commands run as a user runs them, each in its own process, alternately `--rounds`
times; the best wall time of each counts, start-up included. Then every document's ids are compared:
dolma's by document id (it shuffles documents across its output files), ours in input order (each
document ends with EOS in the build's token stream; the documents of the stream's unfinished last
instance are not in the build and not compared).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DOLMA_PINS = ["dolma==1.2.1", "boto3==1.26.76", "s3fs==2023.6.0"]


def dolma_venv(folder: Path) -> Path:
    """The `dolma` command of a virtual environment of its own, installed on first use."""
    dolma = folder / "bin" / "dolma"
    if not dolma.exists():
        print(f"installing {' '.join(DOLMA_PINS)} into {folder} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(folder / "bin" / "pip"), "install", "-q", *DOLMA_PINS], check=True)
    return dolma


def write_corpus(folder: Path, shards: int, repeat: int) -> tuple[list[Path], list[str]]:
    """Sample-corpus documents as Dolma `.json.gz` shards; returns the shards and the ids in input order."""
    from inject.sample import iter_documents

    texts = [d["text"].strip() for d in iter_documents()]
    texts = [t for t in texts if t]
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(texts) * repeat // shards)
    paths, ids = [], []
    for s in range(shards):
        path = folder / f"shard-{s:03d}.json.gz"
        rows = []
        for n in range(s * per_shard, min((s + 1) * per_shard, len(texts) * repeat)):
            rows.append({"id": f"doc-{n}", "text": texts[n % len(texts)], "source": "sample"})
            ids.append(f"doc-{n}")
        if not path.exists():
            with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        paths.append(path)
    return paths, ids


def timed(command: list[str], log: Path) -> tuple[float, float]:
    """Wall and CPU seconds (the command's processes together) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def dolma_command(dolma: Path, shards: list[Path], out: Path, processes: int) -> list[str]:
    from inject import tokenizer

    spec = tokenizer.get_spec(tokenizer.DEFAULT_TOKENIZER)
    return [str(dolma), "tokens", "--documents", *map(str, shards), "--destination", str(out),
            "--tokenizer.name_or_path", str(spec.path), "--tokenizer.eos_token_id", str(spec.eos_token_id),
            "--tokenizer.pad_token_id", str(spec.pad_token_id), "--no-tokenizer.segment_before_tokenization",
            "--processes", str(processes), "--dtype", spec.dtype, "--seed", "3"]


def ours_command(config: Path, out: Path, processes: int) -> list[str]:
    olmo_inject = Path(sys.executable).parent / "olmo-inject"
    return [str(olmo_inject), "build", str(config), "--out", str(out), "--workers", str(processes), "--overwrite"]


def dolma_documents(out: Path, dtype: str) -> dict[str, np.ndarray]:
    """Each document's ids in `dolma tokens`' output, by document id (from its .csv.gz metadata)."""
    documents = {}
    for meta in sorted(out.rglob("*.csv.gz")):
        tokens = np.memmap(str(meta)[: -len(".csv.gz")] + ".npy", dtype=dtype, mode="r")
        with gzip.open(meta, "rt") as f:
            for start, end, doc_id, _src, _loc in csv.reader(f):
                documents[doc_id] = np.asarray(tokens[int(start) : int(end)])
    return documents


def our_documents(build: Path, dtype: str, eos: int) -> list[np.ndarray]:
    """The build's token stream cut after every EOS: its documents in input order."""
    manifest = json.loads((build / "manifest.json").read_text())
    stream = np.concatenate([np.fromfile(build / f["path"], dtype=dtype) for f in manifest["outputs"]])
    ends = np.flatnonzero(stream == eos) + 1
    return np.split(stream[: ends[-1]], ends[:-1])


def compare(ids: list[str], ours: list[np.ndarray], theirs: dict[str, np.ndarray]) -> tuple[int, int]:
    """(documents compared, documents whose ids differ)."""
    differ = 0
    for doc_id, mine in zip(ids, ours):
        if doc_id not in theirs or not np.array_equal(mine, theirs[doc_id]):
            differ += 1
    return min(len(ids), len(ours)), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="processes for both (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="copies of the sample corpus (default 1: ~5M tokens)")
    parser.add_argument("--shards", type=int, default=8, help="input files (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each command, alternately (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-vs-dolma"))
    args = parser.parse_args()

    from inject import tokenizer

    spec = tokenizer.get_spec(tokenizer.DEFAULT_TOKENIZER)
    work = args.workdir.resolve()
    dolma = dolma_venv(work / "dolma-venv")
    shards, ids = write_corpus(work / f"corpus-x{args.repeat}", args.shards, args.repeat)
    config = work / "build.yaml"
    config.write_text(json.dumps({"inputs": [str(s) for s in shards], "sequence_length": 2048}))
    runs = {"dolma tokens": [], "olmo-inject build": []}
    for r in range(args.rounds):
        dolma_out = work / "out-dolma"
        subprocess.run(["rm", "-rf", str(dolma_out)], check=True)
        runs["dolma tokens"].append(timed(dolma_command(dolma, shards, dolma_out, args.processes), work / "dolma.log"))
        runs["olmo-inject build"].append(timed(ours_command(config, work / "out-ours", args.processes), work / "ours.log"))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f} s wall / {v[-1][1]:.1f} s CPU" for k, v in runs.items()),
              flush=True)

    ours = our_documents(work / "out-ours", spec.dtype, spec.eos_token_id)
    theirs = dolma_documents(work / "out-dolma", spec.dtype)
    tokens = sum(len(t) for t in theirs.values())
    compared, differ = compare(ids, ours, theirs)
    best = {k: min(v) for k, v in runs.items()}
    print(f"\ncorpus: {len(ids):,} documents, {tokens / 1e6:.2f}M tokens, {len(shards)} .json.gz shards; "
          f"{args.processes} processes each; load average {os.getloadavg()[0]:.1f} at the end")
    for name, (wall, cpu) in best.items():
        print(f"  {name:18s} {wall:7.1f} s wall  {cpu:7.1f} s CPU  {tokens / wall / 1e6:5.2f}M tok/s")
    ratio = best["dolma tokens"][0] / best["olmo-inject build"][0]
    print(f"  olmo-inject / dolma tokens/s: {ratio:.2f}x (CPU seconds: "
          f"{best['dolma tokens'][1] / best['olmo-inject build'][1]:.2f}x)")
    print(f"  same token ids: {compared - differ:,} of {compared:,} documents compared"
          + ("" if not differ else f"; {differ} DIFFER"))
    if differ:
        sys.exit(1)


if __name__ == "__main__":
    main()
