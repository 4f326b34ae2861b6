"""Training throughput: `olmo-inject train` (ai2-olmo's Trainer, data loader and checkpointing, through our
launcher and worker) against a plain PyTorch loop over the same model, batch and micro-batches (AdamW,
cross-entropy, no data loader, no checkpoints). Both run as child processes of this command, one after
the other, with the same environment, so the ratio is the cost of the Trainer and its data path.

    python benchmarks/train_throughput.py [--config olmo_configs/tiny.yaml] [--window 17:31] [--workdir bench-out]

The Trainer's tokens/s is taken from its own log timestamps over a window of steps with no checkpoint
inside it (our worker saves at steps 1, 2, 4, 8, 16, then every save interval); peak memory is each
child's max RSS. On a GPU machine the same command measures the GPU path (`--device cuda` is implied by
CUDA being available; the config's precision applies).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\s.*\[step=(\d+)/")


def make_build(workdir: Path, cfg, steps: int) -> Path:
    from inject.build import run_build
    from inject.config import load_build_config
    from inject.sample import write_sample_corpus

    build = workdir / "build"
    if (build / "manifest.json").exists():
        return build
    write_sample_corpus(workdir / "corpus", shards=2)
    config = {"inputs": ["corpus/*"], "sequence_length": cfg.model.max_sequence_length,
              "training": {"global_batch_size": cfg.global_train_batch_size, "steps": steps, "seed": cfg.data.seed or cfg.seed},
              "tasks": [{"name": "cmp2", "task": "comparison", "params": {"digits": 2}, "schedule": {"kind": "even", "rate": 2}}]}
    (workdir / "build.yaml").write_text(yaml.safe_dump(config))
    run_build(load_build_config(workdir / "build.yaml"), build, overwrite=True)
    return build


def child_env() -> dict:
    """What the launcher gives the trainer, given to the plain loop too."""
    return {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
            "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def trainer_run(config: Path, build: Path, run: Path, steps: int, window: tuple[int, int]) -> dict:
    command = [sys.executable, "-m", "inject.cli", "train", str(config), "--data", str(build), "--run", str(run),
               f"--max_duration={steps}", f"--save_interval_unsharded={steps}", "--console_log_interval=1"]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=child_env())
    if done.returncode:
        sys.exit(f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    stamps = {}
    for line in (done.stdout + done.stderr).splitlines():
        match = STEP_LINE.match(line)
        if match:
            stamps[int(match.group(2))] = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    first, last = window
    return {"seconds": stamps[last] - stamps[first], "steps": last - first, "wall_s": time.time() - started}


def plain_loop(config: Path, build: Path, steps: int, warmup: int) -> dict:
    """The same model and batches, trained by hand (runs in a child process: --child)."""
    import numpy as np
    import torch
    from olmo.config import TrainConfig
    from olmo.model import OLMo

    cfg = TrainConfig.load(config)
    manifest = json.loads((build / "manifest.json").read_text())
    cfg.model.vocab_size = manifest["tokenizer"]["vocab_size"]
    cfg.model.init_device = "cpu"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = OLMo(cfg.model).to(device)
    model.reset_parameters()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    L, B, micro = cfg.model.max_sequence_length, cfg.global_train_batch_size, cfg.device_train_microbatch_size
    tokens = np.memmap(build / manifest["outputs"][0]["path"], dtype=manifest["dtype"], mode="r")
    instances = len(tokens) // L
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and "bf16" in str(cfg.precision))

    def step(k: int) -> None:
        rows = [(k * B + i) % instances for i in range(B)]
        batch = torch.from_numpy(np.stack([tokens[r * L:(r + 1) * L] for r in rows]).astype(np.int64)).to(device)
        optim.zero_grad(set_to_none=True)
        for chunk in batch.split(micro):
            with autocast:
                logits = model(chunk).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     chunk[:, 1:].reshape(-1)) * len(chunk) / B
            loss.backward()
        optim.step()

    for k in range(warmup):
        step(k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for k in range(warmup, warmup + steps):
        step(k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "olmo_configs" / "tiny.yaml")
    parser.add_argument("--window", default="17:31", help="steps FIRST:LAST timed in the Trainer's log (no checkpoint inside)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/train"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    first, last = (int(x) for x in args.window.split(":"))
    from olmo.config import TrainConfig

    cfg = TrainConfig.load(args.config)
    build = args.workdir / "build"
    if args.child:
        print(json.dumps(plain_loop(args.config, build, last - first, warmup=3)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    steps = last + 1
    make_build(args.workdir, cfg, steps)
    tokens_per_step = cfg.global_train_batch_size * cfg.model.max_sequence_length

    run = args.workdir / "run"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    trainer = trainer_run(args.config, build, run, steps, (first, last))
    trainer_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    done = subprocess.run([sys.executable, __file__, "--child", "--config", str(args.config), "--workdir", str(args.workdir),
                           "--window", args.window], capture_output=True, text=True, env=child_env(), check=True)
    loop = json.loads(done.stdout.strip().splitlines()[-1])
    both_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    trainer_tps = tokens_per_step * trainer["steps"] / trainer["seconds"]
    loop_tps = tokens_per_step * loop["steps"] / loop["seconds"]
    print(f"config {args.config.name}: batch {cfg.global_train_batch_size} x {cfg.model.max_sequence_length} tokens, "
          f"micro-batch {cfg.device_train_microbatch_size}, precision {cfg.precision}; {device}")
    print(f"olmo-inject train (ai2-olmo Trainer): {trainer_tps:,.0f} tokens/s over steps {first}-{last} "
          f"({trainer['wall_s']:.0f} s wall for {steps} steps incl. start-up and checkpoints), peak RSS {trainer_rss:,.0f} MB")
    print(f"plain PyTorch loop (same model):      {loop_tps:,.0f} tokens/s over {loop['steps']} steps, "
          f"peak RSS of the larger child {both_rss:,.0f} MB")
    print(f"ratio Trainer / plain loop: {trainer_tps / loop_tps:.2f}")


if __name__ == "__main__":
    main()
