"""GPU check: train a ladder config on a small injected build with ai2-olmo's Trainer on one GPU, report
tokens/s and MFU, check a preemption and resume, and evaluate the checkpoints on the GPU.

    bash benchmarks/gpu_check.sh [WORKDIR]          # one CUDA GPU, after `pip install -e '.[test]'`
    python benchmarks/gpu_check.py --device cpu --config olmo_configs/tiny.yaml --steps 12   # the same path on CPU

Stages, each through the `olmo-inject` CLI as a user runs it:
  build   the sample corpus, repeated until it holds the run's instances, with comparison examples in every
          batch (16 of 2-digit, 1 of 3-digit) and a modular-addition task every tenth batch;
  train   the config with `--global_train_batch_size`, `--max_duration` and the checkpoint interval set here;
          SIGUSR2 (what SLURM sends before a preemption) at half the steps; the rerun resumes; then every
          step 1..N is in RUN/data-indices exactly once, with the instances of OLMo's order for that step;
  speed   tokens/s: the median of RUN/metrics.jsonl's per-step figures (steps with a checkpoint or just after
          a start are in the tail, not the median); MFU = tokens/s x FLOPs per token / the GPU's peak bf16
          dense FLOP/s, FLOPs per token = 6 x parameters (without the input embedding) + 12 x layers x
          d_model x sequence length (attention scores), the PaLM appendix's count;
  eval    `olmo-inject eval --device cuda` over every checkpoint, its wall time per checkpoint.
Figures are printed and written to WORKDIR/gpu-check.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLE_TOKENS = 5_300_000  # the sample corpus, in tokens (the README's build table)
# Peak dense bf16 tensor FLOP/s by device name (vendor data sheets); GPU_PEAK_TFLOPS overrides.
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4,
               "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2}


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inject.cli", *map(str, args)], check=True, **kwargs)


def make_build(work: Path, cfg, steps: int, batch: int, workers: int) -> Path:
    from inject.sample import write_sample_corpus

    build = work / "build"
    if (build / "manifest.json").exists():
        return build
    L = cfg.model.max_sequence_length
    copies = math.ceil(steps * batch * L * 1.1 / SAMPLE_TOKENS)
    corpus = work / "corpus"
    write_sample_corpus(corpus / "c000")
    for c in range(1, copies):
        target = corpus / f"c{c:03d}"
        if not target.exists():
            target.mkdir(parents=True)
            for shard in sorted((corpus / "c000").iterdir()):
                shutil.copyfile(shard, target / shard.name)  # a copy: a build refuses one file listed twice
    config = {"inputs": ["corpus/"], "sequence_length": L, "workers": workers,
              "training": {"global_batch_size": batch, "steps": steps, "seed": cfg.data.seed or cfg.seed},
              "tasks": [
                  {"name": "cmp2", "task": "comparison", "params": {"digits": 2}, "schedule": {"kind": "even", "rate": 16}},
                  {"name": "cmp3", "task": "comparison", "params": {"digits": 3}, "schedule": {"kind": "even", "rate": 1}},
                  {"name": "mod97", "task": "modular_addition", "params": {"modulus": 97}, "encoding": "tokens",
                   "schedule": {"kind": "even", "rate": 0.1}}]}
    (work / "build.yaml").write_text(yaml.safe_dump(config))
    cli("build", work / "build.yaml", "--out", build, "--overwrite")
    return build


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_with_preemption(config: Path, build: Path, run: Path, steps: int, batch: int, extra: list[str]) -> dict:
    args = ["train", str(config), "--data", str(build), "--run", str(run), f"--max_duration={steps}",
            f"--global_train_batch_size={batch}", f"--save_interval_unsharded={max(steps // 4, 1)}",
            "--console_log_interval=10", *extra]
    start = time.perf_counter()
    first = subprocess.Popen([sys.executable, "-m", "inject.cli", *args], start_new_session=True)
    while len(metrics(run)) < steps // 2:
        if first.poll() is not None:
            sys.exit(f"training stopped before step {steps // 2} (exit {first.returncode})")
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGUSR2)
    if first.wait() != 0:
        sys.exit(f"training did not stop cleanly on SIGUSR2 (exit {first.returncode})")
    stopped = len(metrics(run))
    cli(*args)
    return {"wall_s": time.perf_counter() - start, "stopped_at": stopped}


def check_every_step_once(run: Path, build: Path, steps: int, batch: int) -> None:
    from inject.injection import olmo_order

    manifest = json.loads((build / "manifest.json").read_text())
    seed = manifest["config"]["training"]["seed"]
    order = olmo_order(manifest["injection"]["num_instances"], batch, seed, False)
    seen = {}
    for line in (run / "data-indices" / "rank0.tsv").read_text().splitlines():
        step, *indices = map(int, line.split())
        if step in seen:
            sys.exit(f"resume check FAILED: step {step} trained twice")
        seen[step] = indices
    if sorted(seen) != list(range(1, steps + 1)):
        sys.exit(f"resume check FAILED: steps trained {sorted(set(range(1, steps + 1)) ^ set(seen))[:10]} differ from 1..{steps}")
    wrong = [s for s in seen if seen[s] != order[(s - 1) * batch : s * batch].tolist()]
    if wrong:
        sys.exit(f"resume check FAILED: steps {wrong[:10]} trained other instances than OLMo's order gives")
    if [r["step"] for r in metrics(run)] != list(range(1, steps + 1)):
        sys.exit("resume check FAILED: metrics.jsonl does not hold every step once")


def flops_per_token(cfg) -> tuple[int, float]:
    from olmo.model import OLMo

    cfg.model.init_device = "meta"
    params = OLMo(cfg.model).num_params(include_embedding=False)
    m = cfg.model
    return params, 6 * params + 12 * m.n_layers * m.d_model * m.max_sequence_length


def peak_flops(device: str) -> float | None:
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12
    for name, tflops in PEAK_TFLOPS.items():
        if name in device:
            return tflops * 1e12
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "olmo_configs" / "reference" / "20M.yaml")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch", type=int, help="global batch in instances (default: 64 on a GPU, the config's on CPU)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (ai2-olmo's `compile` block)")
    parser.add_argument("--workdir", type=Path, default=Path("gpu-check"))
    args = parser.parse_args()

    import torch
    from olmo.config import TrainConfig

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: pass --device cpu for the same path on CPU")
    cfg = TrainConfig.load(args.config)
    batch = args.batch or (64 if args.device == "cuda" else cfg.global_train_batch_size)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build = make_build(work, cfg, args.steps, batch, workers=min(8, os.cpu_count() or 1))
    build_s = time.perf_counter() - started

    run = work / "run"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    extra = ["--compile.mode=default"] if args.compile else []
    trained = train_with_preemption(args.config, build, run, args.steps, batch, extra)
    check_every_step_once(run, build, args.steps, batch)

    rows = metrics(run)
    tokens_per_second = statistics.median(r["tokens_per_second"] for r in rows if r["tokens_per_second"])
    params, per_token = flops_per_token(cfg)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    peak = peak_flops(device) if args.device == "cuda" else None
    mfu = tokens_per_second * per_token / peak if peak else None

    eval_started = time.perf_counter()
    cli("eval", run, "--data", build, "--device", args.device, "--seen", 100, "--pending", 100, "--held-out", 100)
    eval_s = time.perf_counter() - eval_started
    checkpoints = len(list(run.glob("step*-unsharded")))
    summary = {
        "device": device, "config": args.config.name, "precision": cfg.precision, "compile": args.compile,
        "batch": f"{batch} x {cfg.model.max_sequence_length}", "steps": args.steps, "params_without_input_embedding": params,
        "tokens_per_second": round(tokens_per_second), "mfu": None if mfu is None else round(mfu, 4),
        "build_s": round(build_s, 1), "train_wall_s": round(trained["wall_s"], 1),
        "preempted_at_step": trained["stopped_at"], "resume": "every step once, OLMo's order",
        "eval_checkpoints": checkpoints, "eval_s_per_checkpoint": round(eval_s / checkpoints, 1),
    }
    (work / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
