"""`olmo-inject eval RUN_OR_CHECKPOINT --data BUILD`: score every checkpoint of a run on the build's
seen and held-out instances; one JSONL per checkpoint, a summary CSV; already evaluated steps are skipped.

Checkpoints: ai2-olmo unsharded or sharded, or Hugging Face folders (see `eval.checkpoints`). A
checkpoint that cannot be read (missing files, corrupt weights, another vocabulary) is reported by
name; the others are still evaluated and the exit code says that something failed. The settings of a
results folder are kept in `eval-config.json`: a rerun with other settings is refused rather than
mixing two eval sets in one table.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from inject.build import load_manifest

from .analysis import default_out, read_jsonl_folder, run_over_checkpoints
from .checkpoints import STEP, find_checkpoints, load_checkpoint, load_model  # noqa: F401 (re-exported)
from .score import score_items, wilson_interval
from .sets import build_eval_set, task_info

BUCKETS = [(0, 0, "0"), (1, 1, "1"), (2, 3, "2-3"), (4, 7, "4-7"), (8, 15, "8-15"), (16, 10**12, "16+")]


@dataclass
class EvalReport:
    evaluated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass
class EvalSettings:
    """What decides a results folder's eval set; stored as eval-config.json."""

    build: str
    seen: int
    held_out: int
    seed: int
    unseen_templates: bool


def exposure_fields(item, step: int) -> dict:
    before = item.exposure_steps[item.exposure_steps <= step]
    return {"exposures": int(len(before)), "steps_since_last": int(step - before[-1]) if len(before) else None}


def exposure_bucket(exposures: int) -> str:
    return next(name for low, high, name in BUCKETS if low <= exposures <= high)


def evaluate(path: Path, build_dir: Path, out_dir: Path | None = None, seen: int = 200, held_out: int = 200,
             seed: int = 0, device: str = "cpu", batch_size: int = 64, unseen_templates: bool = False) -> EvalReport:
    path, build_dir = Path(path), Path(build_dir)
    out_dir = Path(out_dir) if out_dir else default_out(path, "eval")
    pad = load_manifest(build_dir)["tokenizer"]["pad_token_id"]
    settings = asdict(EvalSettings(str(build_dir.resolve()), seen, held_out, seed, unseen_templates))
    eval_set: dict = {}  # drawn at the first checkpoint that needs it: a run with nothing new reads no ledger

    def score(loaded, checkpoint, meta) -> list[dict]:
        if not eval_set:
            eval_set.update(items=build_eval_set(build_dir, seen, held_out, seed, unseen_templates),
                            tasks=task_info(build_dir))
        items, tasks = eval_set["items"], eval_set["tasks"]
        rows = score_items(loaded.model, items, pad, batch_size)
        return [{**row, "kind": tasks[item.task]["kind"], "complexity": tasks[item.task]["complexity"],
                 "rate": tasks[item.task]["rate"], **exposure_fields(item, checkpoint.step)}
                for item, row in zip(items, rows)]

    done = run_over_checkpoints(path, build_dir, out_dir, settings, "eval-config.json", score, device)
    write_summary(out_dir)
    return EvalReport(done.analyzed, done.skipped, done.failed)


def read_results(out_dir: Path) -> list[dict]:
    """Every row of a results folder, checkpoints in step order."""
    return read_jsonl_folder(out_dir)


SUMMARY_COLUMNS = ["model", "params", "step", "tokens", "task", "kind", "complexity", "rate", "split", "format",
                   "exposures", "n", "accuracy", "ci_low", "ci_high", "chance", "greedy_exact", "mean_logprob", "mean_rank"]


def summarize(rows: list[dict]) -> list[dict]:
    """Accuracy with a 95% Wilson interval per model, step, task, split and format; seen instances also
    per exposure bucket (exposures before that step)."""
    groups: dict[tuple, list] = {}
    for row in rows:
        key = (row.get("model", ""), row["step"], row["task"], row["split"], row.get("format", "training"))
        groups.setdefault((*key, "all"), []).append(row)
        if row["split"] == "seen":
            groups.setdefault((*key, exposure_bucket(row["exposures"])), []).append(row)
    table = []
    for (model, step, task, split, fmt, bucket), members in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        n, hits = len(members), sum(r["correct"] for r in members)
        low, high = wilson_interval(hits, n)
        first = members[0]
        table.append({"model": model, "params": first.get("params"), "step": step, "tokens": first.get("tokens"),
                      "task": task, "kind": first.get("kind"), "complexity": first.get("complexity"),
                      "rate": first.get("rate"), "split": split, "format": fmt, "exposures": bucket, "n": n,
                      "accuracy": hits / n, "ci_low": low, "ci_high": high,
                      "chance": float(np.mean([1 / r["candidates"] for r in members])),
                      "greedy_exact": float(np.mean([r["greedy_exact"] for r in members])),
                      "mean_logprob": float(np.mean([r["logprob"] for r in members])),
                      "mean_rank": float(np.mean([r["rank"] for r in members]))})
    return table


def _sort_key(key: tuple) -> tuple:
    model, step, task, split, fmt, bucket = key
    order = [name for _, _, name in BUCKETS]
    return (model, step, task, split, fmt, -1 if bucket == "all" else order.index(bucket))


def write_table(table: list[dict], target: Path) -> Path:
    tmp = target.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in table:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(target)
    return target


def write_summary(out_dir: Path) -> Path:
    return write_table(summarize(read_results(out_dir)), Path(out_dir) / "summary.csv")
