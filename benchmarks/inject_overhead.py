"""Injection cost: (1) an injected build against the base build of the same corpus, same process;
(2) the plan and OLMo's order for a 100-million-instance run: time and peak memory (and what the build's
placement adds on top of them).

    python benchmarks/inject_overhead.py [--repeat 4] [--workdir bench-out] [--plan-only]

Each measurement runs in a fresh child process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

TASKS = [
    {"name": "cmp3-r1000", "task": "comparison", "params": {"digits": 3}, "schedule": {"kind": "even", "rate": 1000}},
    {"name": "mod113-r0.1", "task": "modular_addition", "params": {"modulus": 113}, "encoding": "tokens",
     "schedule": {"kind": "even", "rate": 0.1}},
    {"name": "mod113-burst", "task": "modular_addition", "params": {"modulus": 113}, "encoding": "tokens",
     "schedule": {"kind": "burst", "burst_size": 10, "burst_every": 100}},
]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_builds(config: str, out: str) -> dict:
    """Base build and the same corpus with tasks, in one process, alternating (best of two each)."""
    from inject.build import run_build
    from inject.config import load_build_config

    result = {}
    # Alternate, twice, and keep each one's best time: the first build also warms the page cache.
    for name in ("base", "injected", "base", "injected"):
        data = yaml.safe_load(Path(config).read_text())
        if name == "base":
            data.pop("tasks"), data.pop("training")
        path = Path(out) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        start = time.perf_counter()
        manifest = run_build(load_build_config(path), Path(out) / name, overwrite=True)
        seconds = time.perf_counter() - start
        best = min(seconds, result.get(name, {}).get("seconds", seconds))
        result[name] = {"seconds": best, "tokens": manifest["counts"]["tokens"]}
    return result


def child_plan(steps: int, batch: int) -> dict:
    """The plan (every example drawn, encoded, placed in its batch slot and checked against the capacity, a
    block of steps at a time) and OLMo's order, each timed in wall and CPU seconds (CPU: all threads of the
    process; the tokenizer runs on two), with the tokenizer's own share of the plan."""
    from inject import tokenizer
    from inject.config import from_dict, BuildConfig
    from inject.injection import make_plan, make_specs, olmo_order

    config = from_dict(BuildConfig, {"inputs": ["-"], "sequence_length": 2048,
                                     "training": {"global_batch_size": batch, "steps": steps}, "tasks": TASKS}).validate()
    spent, depth = [0.0, 0.0], [0]

    def timed(encode):
        def timed_encode(name, texts):
            depth[0] += 1
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return encode(name, texts)
            finally:
                depth[0] -= 1
                if not depth[0]:  # the outermost call only (encode_digit_variants calls encode_texts)
                    spent[0] += time.perf_counter() - wall
                    spent[1] += time.process_time() - cpu
        return timed_encode

    tokenizer.encode_texts = timed(tokenizer.encode_texts)
    tokenizer.encode_digit_variants = timed(tokenizer.encode_digit_variants)
    wall, cpu = time.perf_counter(), time.process_time()
    plan = make_plan(config, make_specs(config))
    plan_seconds, plan_cpu = time.perf_counter() - wall, time.process_time() - cpu
    plan_peak = peak_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    order = olmo_order(steps * batch, batch, 6198, False)
    result = {"plan_seconds": plan_seconds, "plan_cpu": plan_cpu, "tokenizer_seconds": spent[0], "tokenizer_cpu": spent[1],
              "examples": plan.examples, "plan_peak_mb": plan_peak, "order_seconds": time.perf_counter() - wall,
              "order_cpu": time.process_time() - cpu, "instances": len(order), "peak_mb": peak_mb()}
    # What the build's placement adds today: every example's row at once, its instance, sorted by instance.
    wall = time.perf_counter()
    rows = plan.all_rows()
    instance = rows.instances(order)
    np.lexsort((rows.offset, instance))
    result.update(placement_seconds=time.perf_counter() - wall, placement_peak_mb=peak_mb(), load=os.getloadavg()[0])
    return result


def run_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the sample corpus (default 4: ~21M tokens)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--plan-steps", type=int, default=48_829, help="steps of the big plan (x 2048 = 100M instances)")
    parser.add_argument("--plan-only", action="store_true", help="measure only the big plan")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_builds(*rest) if kind == "builds" else child_plan(int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return

    if not args.plan_only:
        builds(args)
    plan(args)


def builds(args) -> None:
    from inject.sample import write_sample_corpus

    work = args.workdir
    corpus = work / "corpus-inject"
    write_sample_corpus(work / "corpus-one")
    corpus.mkdir(parents=True, exist_ok=True)
    for r in range(args.repeat):
        for shard in sorted((work / "corpus-one").iterdir()):
            shutil.copyfile(shard, corpus / f"r{r:03d}-{shard.name}")
    tokens = 5_357_337 * args.repeat
    batch, seq = 64, 256
    steps = int(tokens / seq / batch * 0.95)
    config = {"inputs": [str(corpus.resolve())], "sequence_length": seq, "max_batch_share": 0.5,
              "training": {"global_batch_size": batch, "steps": steps},
              "tasks": [{**TASKS[0], "schedule": {"kind": "even", "rate": 16}}, *TASKS[1:]]}
    (work / "inject.yaml").write_text(yaml.safe_dump(config))
    print(f"load average {os.getloadavg()[0]:.1f}")
    r = run_child("builds", work / "inject.yaml", work)
    base, inj = r["base"], r["injected"]
    print(f"build, {base['tokens'] / 1e6:.1f}M tokens, {steps:,} steps x {batch} x {seq}, 16 + 0.1 + burst examples/batch:")
    print(f"  base      {base['seconds']:7.1f} s  {base['tokens'] / base['seconds'] / 1e6:6.2f}M tok/s")
    print(f"  injected  {inj['seconds']:7.1f} s  {inj['tokens'] / inj['seconds'] / 1e6:6.2f}M tok/s  "
          f"cost of injection: {100 * (inj['seconds'] / base['seconds'] - 1):+.1f}%")


def plan(args) -> None:
    r = run_child("plan", args.plan_steps, 2048)
    print(f"plan, {args.plan_steps:,} steps x 2048 = {r['instances'] / 1e6:.0f}M instances, 1000 + 0.1 + burst examples/batch:")
    print(f"  plan ({r['examples']:,} examples) {r['plan_seconds']:.1f} s wall, {r['plan_cpu']:.1f} s CPU, of which the "
          f"tokenizer {r['tokenizer_seconds']:.1f} s wall, {r['tokenizer_cpu']:.1f} s CPU; peak memory {r['plan_peak_mb']:,.0f} MB")
    print(f"  OLMo order of {r['instances']:,} instances {r['order_seconds']:.1f} s wall, {r['order_cpu']:.1f} s CPU; "
          f"peak memory of plan + order {r['peak_mb']:,.0f} MB")
    print(f"  the build's placement (every example's row at once, its instance, sorted by instance) "
          f"{r['placement_seconds']:.1f} s more; peak memory {r['placement_peak_mb']:,.0f} MB")
    print(f"load average {r['load']:.1f} (1 min) at the end")


if __name__ == "__main__":
    main()
