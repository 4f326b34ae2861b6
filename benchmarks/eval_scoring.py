"""Scoring speed, two parts.

`--part methods`: `eval.score.score_items` (prompts batched by length and run once, candidates scored from
the prompt's last position or from its key/value cache, the vocabulary's logits only where a score reads
them) against the plain way, one forward pass of prompt + candidate for every candidate of every instance.
Same model, same items, same process; the two must agree on every log-probability. Prints instances/s of
each and the ratio, for single-token tasks (comparison, modular addition with one-token residues) and
multi-token ones (4-digit comparison, residues up to 997).

`--part checkpoint`: what `olmo-inject eval` costs per checkpoint in the demo's setting: the demo's build
(`inject/examples/demo.yaml` on the demo corpus; 4 tasks) and a run folder of 7 tiny-model checkpoints
(steps 0, 1, 2, 4, 8, 16, 20 of a 20-step run; untrained weights: the cost does not depend on them), scored
on 100 seen, 100 pending and 100 held-out instances per task. Prints (1) the whole `olmo-inject eval`
command as a user runs it, wall and CPU seconds, process start-up included; (2) in one process, the one-time
set-up (the eval set's orders, the Dolma sample) and per checkpoint: loading the model, drawing its items,
scoring them, the Dolma validation loss; (3) the same items scored with every position's logits (the path
of a model whose final norm is not found, and of eval before it narrowed the logits), the ratio, and how
closely the two agree.

    python benchmarks/eval_scoring.py [--part methods|checkpoint|both] [--seen 60] [--model tiny|20M|60M]
                                      [--device cpu] [--threads N] [--workdir bench-out/eval-scoring]

Wall times depend on what else runs on the cores: the load average is printed beside them, and CPU seconds,
which other jobs inflate less (torch's spinning threads still count), are printed too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

TASKS = [
    {"name": "cmp2", "task": "comparison", "params": {"digits": 2}, "schedule": {"kind": "even", "rate": 2}},
    {"name": "mod97", "task": "modular_addition", "params": {"modulus": 97}, "schedule": {"kind": "even", "rate": 2}},
    {"name": "cmp4", "task": "comparison", "params": {"digits": 4}, "schedule": {"kind": "even", "rate": 2}},
    {"name": "mod997", "task": "modular_addition", "params": {"modulus": 997}, "schedule": {"kind": "even", "rate": 2}},
]


def make_build(workdir: Path) -> Path:
    from inject.build import run_build
    from inject.config import load_build_config
    from inject.sample import write_sample_corpus

    if (workdir / "build" / "manifest.json").exists():
        return workdir / "build"
    write_sample_corpus(workdir / "corpus", shards=2)
    config = {"inputs": ["corpus/*"], "sequence_length": 256, "tasks": TASKS,
              "training": {"global_batch_size": 16, "steps": 200}}
    (workdir / "build.yaml").write_text(yaml.safe_dump(config))
    run_build(load_build_config(workdir / "build.yaml"), workdir / "build", overwrite=True)
    return workdir / "build"


def make_model(name: str, device: str):
    from olmo.config import TrainConfig
    from olmo.model import OLMo

    import olmo_configs

    root = Path(olmo_configs.__file__).parent
    path = root / "tiny.yaml" if name == "tiny" else root / "datadecide" / f"{name}.yaml"
    cfg = TrainConfig.load(path)
    cfg.model.init_device = "cpu"
    cfg.model.flash_attention = False
    torch.manual_seed(0)
    model = OLMo(cfg.model)
    model.reset_parameters()
    return model.to(device).eval()


def one_by_one(model, items) -> list[float]:
    """The baseline: every candidate of every instance in its own forward pass; the right answer's logprob."""
    out = []
    device = next(model.parameters()).device
    for it in items:
        scores = []
        for cand in it.candidates:
            with torch.no_grad():
                logits = model(torch.tensor([it.context + cand], device=device)).logits[0].float()
            logp = torch.log_softmax(logits, -1).cpu()
            scores.append(sum(float(logp[len(it.context) - 1 + k, t]) for k, t in enumerate(cand)))
        out.append(scores[it.correct])
    return out


DEMO_STEPS = (0, 1, 2, 4, 8, 16, 20)  # the checkpoints of a 20-step run (the demo trains 10 steps: 0, 1, 2, 4, 8, 10)


def make_demo_run(workdir: Path) -> tuple[Path, Path]:
    """(build, run folder): the demo's build and 7 tiny-model checkpoints in ai2-olmo's unsharded format."""
    import shutil

    from olmo.config import TrainConfig

    from inject.build import run_build
    from inject.config import load_build_config
    from inject.sample import write_demo_corpus
    import olmo_configs

    build, run = workdir / "demo-build", workdir / "demo-run"
    if not (build / "manifest.json").exists():
        write_demo_corpus(workdir / "corpus")
        shutil.copyfile(Path(__file__).parent.parent / "inject" / "examples" / "demo.yaml", workdir / "demo.yaml")
        run_build(load_build_config(workdir / "demo.yaml"), build, overwrite=True)
    cfg = TrainConfig.load(Path(olmo_configs.__file__).parent / "tiny.yaml")
    for step in DEMO_STEPS:
        folder = run / f"step{step}-unsharded"
        if not (folder / "model.pt").exists():
            folder.mkdir(parents=True, exist_ok=True)
            cfg.save(folder / "config.yaml")
            torch.save(make_model("tiny", "cpu").state_dict(), folder / "model.pt")
    return build, run


def clock() -> tuple[float, float]:
    """(wall, CPU of this process and its finished children) seconds."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + children.ru_utime + children.ru_stime


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def per_checkpoint(args) -> None:
    import os
    import shutil
    import subprocess
    import sys

    from eval import score
    from eval.checkpoints import find_checkpoints, load_model
    from eval.run import dolma_loss, dolma_sample
    from eval.sets import EvalSampler

    build, run = make_demo_run(args.workdir)
    sizes = ["--seen", "100", "--pending", "100", "--held-out", "100"]
    out = args.workdir / "demo-eval"
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    start = clock()
    subprocess.run([sys.executable, "-m", "inject.cli", "eval", str(run), "--data", str(build), "--out", str(out),
                    "--device", args.device, *sizes], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    wall, cpu = since(start)
    n = len(DEMO_STEPS)
    print(f"`olmo-inject eval` of {n} tiny-model checkpoints, demo build, 4 tasks x 100 seen/pending/held-out "
          f"(load average {load:.1f} before, {os.getloadavg()[0]:.1f} after):")
    print(f"  whole command: {wall:.1f} s wall, {cpu:.1f} s CPU (start-up and imports included): "
          f"{wall / n:.2f} s wall, {cpu / n:.2f} s CPU per checkpoint")

    manifest = json.loads((build / "manifest.json").read_text())
    start = clock()
    sampler = EvalSampler(build, 100, 100, 0, False, 100)
    dolma = dolma_sample(build)[0]
    setup = since(start)
    loads, draws, scores, losses, full_scores, items_scored = [], [], [], [], [], 0
    same, worst = True, 0.0
    for checkpoint in find_checkpoints(run):
        start = clock()
        model = load_model(checkpoint, manifest, args.device).model
        loads.append(since(start))
        start = clock()
        items = sampler.items_at(checkpoint.step)
        draws.append(since(start))
        items_scored += len(items)
        start = clock()
        narrowed = score.score_items(model, items, manifest["tokenizer"]["pad_token_id"])
        scores.append(since(start))
        start = clock()
        dolma_loss(model, dolma)
        losses.append(since(start))
        find_norm, score._final_norm = score._final_norm, lambda model: None  # every position's logits
        try:
            start = clock()
            full = score.score_items(model, items, manifest["tokenizer"]["pad_token_id"])
            full_scores.append(since(start))
        finally:
            score._final_norm = find_norm
        same = same and [{**r, "logprob": 0} for r in full] == [{**r, "logprob": 0} for r in narrowed]
        worst = max([worst] + [abs(a["logprob"] - b["logprob"]) for a, b in zip(full, narrowed)])

    def total(parts):
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    print(f"  in one process: set-up once (eval set drawn, Dolma sample) {setup[0]:.2f} s wall / {setup[1]:.2f} s CPU;"
          f" per checkpoint ({items_scored / n:.0f} items on average), wall / CPU s:")
    for name, parts in [("load the model", loads), ("draw the items", draws), ("score the items", scores),
                        ("Dolma loss (8 x 256 tokens)", losses)]:
        w, c = total(parts)
        print(f"    {name:30s} {w / n:6.2f} / {c / n:5.2f}")
    w, c = total(loads + draws + scores + losses)
    print(f"    {'all, model load included':30s} {w / n:6.2f} / {c / n:5.2f}")
    w, c = total(draws + scores + losses)
    print(f"    {'all, model load excluded':30s} {w / n:6.2f} / {c / n:5.2f}")
    fw, fc = total(full_scores)
    sw, sc = total(scores)
    print(f"  scoring with every position's logits instead: {fw / n:.2f} s wall / {fc / n:.2f} s CPU per checkpoint;"
          f" {fw / sw:.1f}x the wall time ({fc / sc:.1f}x the CPU) of logits at answer positions only;"
          f" same ranks and verdicts: {same}, log-probabilities within {worst:.1e}")


def methods(args) -> None:
    from eval.score import score_items
    from eval.sets import build_eval_set

    build = make_build(args.workdir)
    pad = json.loads((build / "manifest.json").read_text())["tokenizer"]["pad_token_id"]
    items = build_eval_set(build, seen=args.seen, held_out=args.seen)
    model = make_model(args.model, args.device)
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {args.device}")
    print(f"{'task':8s} {'cands':>5s} {'tokens/answer':>13s} {'batched inst/s':>15s} {'one-by-one inst/s':>18s} {'ratio':>6s} {'max |dlogp|':>11s}")
    for task in [t["name"] for t in TASKS]:
        mine = [it for it in items if it.task == task]
        score_items(model, mine[:4], pad, calibrate=False)  # warm-up (the raw scores only, as one_by_one)
        start = time.perf_counter()
        fast = score_items(model, mine, pad, calibrate=False)
        fast_rate = len(mine) / (time.perf_counter() - start)
        sample = mine[: args.baseline_items]
        start = time.perf_counter()
        slow = one_by_one(model, sample)
        slow_rate = len(sample) / (time.perf_counter() - start)
        diff = max(abs(f["logprob"] - s) for f, s in zip(fast, slow))
        answer_tokens = sum(len(c) for it in mine for c in it.candidates) / sum(len(it.candidates) for it in mine)
        print(f"{task:8s} {len(mine[0].candidates):5d} {answer_tokens:13.2f} {fast_rate:15.1f} {slow_rate:18.2f} "
              f"{fast_rate / slow_rate:6.1f} {diff:11.2e}")


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["methods", "checkpoint", "both"], default="both")
    parser.add_argument("--seen", type=int, default=60, help="methods: seen (and as many held-out) instances per task")
    parser.add_argument("--baseline-items", type=int, default=12, help="methods: instances per task timed one by one (slow)")
    parser.add_argument("--model", default="tiny", help="methods: tiny, or a datadecide size such as 20M")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/eval-scoring"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); 1 keeps CPU "
                        "seconds free of the time idle threads spin while other jobs hold the cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores, torch {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    if args.part in ("methods", "both"):
        methods(args)
    if args.part in ("checkpoint", "both"):
        per_checkpoint(args)


if __name__ == "__main__":
    main()
