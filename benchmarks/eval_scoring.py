"""Scoring speed: `eval.score.score_items` (prompts batched by length and run once, candidates scored
from the prompt's last position or from its key/value cache) against the plain way, one forward pass
of prompt + candidate for every candidate of every instance. Same model, same items, same process;
the two must agree on every log-probability.

    python benchmarks/eval_scoring.py [--seen 100] [--model tiny|20M|60M] [--device cpu] [--workdir bench-out]

Prints instances/s of each and the ratio, for single-token tasks (comparison, modular addition with
one-token residues) and multi-token ones (4-digit comparison, residues up to 997).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seen", type=int, default=60, help="seen (and as many held-out) instances per task")
    parser.add_argument("--baseline-items", type=int, default=12, help="instances per task timed one by one (slow)")
    parser.add_argument("--model", default="tiny", help="tiny, or a datadecide size such as 20M")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/eval-scoring"))
    args = parser.parse_args()

    from eval.score import score_items
    from eval.sets import build_eval_set

    args.workdir.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    main()
