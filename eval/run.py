"""`olmo-inject eval RUN_OR_CHECKPOINT --data BUILD`: score every checkpoint of a run on the build's
seen and held-out instances; one JSONL per checkpoint, a summary CSV; already evaluated steps are skipped.

Checkpoints: ai2-olmo unsharded folders (`stepN-unsharded/` with `config.yaml` and `model.pt`). A
checkpoint that cannot be read (missing files, corrupt `model.pt`, another vocabulary) is reported by
name; the others are still evaluated and the exit code says that something failed.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inject.build import load_manifest
from inject.errors import InjectError

from .score import score_items, wilson_interval
from .sets import build_eval_set

STEP = re.compile(r"^step(\d+)(-unsharded)?$")


@dataclass
class EvalReport:
    evaluated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def find_checkpoints(path: Path) -> list[tuple[int, Path]]:
    """(step, folder) of a checkpoint folder itself, or of every stepN-unsharded folder in a run."""
    if STEP.match(path.name) and path.is_dir():
        return [(int(STEP.match(path.name).group(1)), path)]
    found = [(int(m.group(1)), p) for p in path.glob("step*") if p.is_dir() and (m := STEP.match(p.name))]
    if not found:
        raise InjectError(f"{path}: no stepN-unsharded checkpoint folders")
    return sorted(found)


def load_checkpoint(folder: Path, manifest: dict, device: str):
    from olmo.config import ModelConfig
    from olmo.model import OLMo

    for name in ("config.yaml", "model.pt"):
        if not (folder / name).exists():
            raise InjectError(f"{folder}: no {name} (a half-written or sharded checkpoint?)")
    config = ModelConfig.load(folder / "config.yaml", key="model")
    vocab = manifest["tokenizer"]["vocab_size"]
    if config.vocab_size != vocab or config.eos_token_id != manifest["tokenizer"]["eos_token_id"]:
        raise InjectError(f"{folder}: vocabulary {config.vocab_size} / EOS {config.eos_token_id} differ from the build's "
                          f"{vocab} / {manifest['tokenizer']['eos_token_id']}")
    try:
        return OLMo.from_checkpoint(folder, device=device).eval()
    except Exception as e:  # torch raises many types for a damaged file
        raise InjectError(f"{folder}: cannot load model.pt: {e}") from None


def exposure_fields(item, step: int) -> dict:
    before = item.exposure_steps[item.exposure_steps <= step]
    return {"exposures": int(len(before)), "steps_since_last": int(step - before[-1]) if len(before) else None}


def evaluate(path: Path, build_dir: Path, out_dir: Path | None = None, seen: int = 200, held_out: int = 200,
             seed: int = 0, device: str = "cpu", batch_size: int = 64) -> EvalReport:
    manifest = load_manifest(build_dir)
    checkpoints = find_checkpoints(path)
    out_dir = out_dir or (path if not STEP.match(path.name) else path.parent) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    items = build_eval_set(build_dir, seen, held_out, seed)
    report = EvalReport()
    for step, folder in checkpoints:
        target = out_dir / f"step{step}.jsonl"
        if target.exists():
            report.skipped.append(step)
            continue
        try:
            model = load_checkpoint(folder, manifest, device)
        except InjectError as e:
            report.failed.append(str(e))
            continue
        rows = score_items(model, items, manifest["tokenizer"]["pad_token_id"], batch_size)
        tmp = target.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for item, row in zip(items, rows):
                f.write(json.dumps({"step": step, **row, **exposure_fields(item, step)}) + "\n")
        tmp.replace(target)  # complete files only: a rerun skips exactly the finished steps
        report.evaluated.append(step)
    write_summary(out_dir)
    return report


def write_summary(out_dir: Path) -> Path:
    """Accuracy with a 95% Wilson interval, per step, task and split (seen / held-out)."""
    groups: dict[tuple, list] = {}
    for path in sorted(out_dir.glob("step*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            groups.setdefault((row["step"], row["task"], row["split"]), []).append(row)
    target = out_dir / "summary.csv"
    with open(target, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "task", "split", "n", "accuracy", "ci_low", "ci_high", "greedy_exact", "mean_logprob", "mean_rank"])
        for (step, task, split), rows in sorted(groups.items()):
            n, hits = len(rows), sum(r["correct"] for r in rows)
            low, high = wilson_interval(hits, n)
            writer.writerow([step, task, split, n, f"{hits / n:.4f}", f"{low:.4f}", f"{high:.4f}",
                             f"{np.mean([r['greedy_exact'] for r in rows]):.4f}",
                             f"{np.mean([r['logprob'] for r in rows]):.4f}", f"{np.mean([r['rank'] for r in rows]):.2f}"])
    return target
