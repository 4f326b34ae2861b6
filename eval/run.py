"""`olmo-inject eval RUN_OR_CHECKPOINT --data BUILD`: score every checkpoint of a run on the build's
seen, pending and held-out instances (drawn per checkpoint step, see `eval.sets`); one JSONL per checkpoint,
a summary CSV; already evaluated steps are skipped.

Every row of a checkpoint also carries `dolma_loss`: the model's mean next-token loss (nats) on a fixed
sample of the build's Dolma instances that no planned batch holds (OLMo's order puts them after the last
planned step; `dolma_sample` says "unplanned"), or, in a build whose plan uses every instance, on instances
without injected examples (`dolma_sample` "planned, not injected": trained on by then).

Checkpoints: ai2-olmo unsharded or sharded, or Hugging Face folders (see `eval.checkpoints`). A
checkpoint that cannot be read (missing files, corrupt weights, another vocabulary) is reported by
name; the others are still evaluated and the exit code says that something failed. The settings of a
results folder are kept in `eval-config.json`: a rerun with other settings is refused rather than
mixing two eval sets in one table.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from inject.build import load_manifest

from .analysis import default_out, read_jsonl_folder, run_over_checkpoints
from .checkpoints import STEP, find_checkpoints, load_checkpoint, load_model  # noqa: F401 (re-exported)
from .score import score_items, wilson_interval
from .sets import EvalSampler, check_sizes, task_info

DOLMA_INSTANCES = 8
BUCKETS = [(0, 0, "0"), (1, 1, "1"), (2, 3, "2-3"), (4, 7, "4-7"), (8, 15, "8-15"), (16, 10**12, "16+")]


@dataclass
class EvalReport:
    evaluated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # the failed ones refused as unsafe to unpickle


@dataclass
class EvalSettings:
    """What decides a results folder's eval set; stored as eval-config.json."""

    build: str
    seen: int
    held_out: int
    seed: int
    unseen_templates: bool
    pending: int = 0
    """pending instances per task and checkpoint (injected later than the checkpoint's step)"""
    dolma_instances: int = DOLMA_INSTANCES
    """Dolma instances in the validation-loss sample"""


def exposure_fields(item, step: int) -> dict:
    """What the checkpoint at `step` had seen of the item's instance, over every task on its space."""
    before = item.exposure_steps <= step
    by_task: dict[str, int] = {}
    for name in np.asarray(item.exposure_tasks, dtype=object)[before]:
        by_task[name] = by_task.get(name, 0) + 1
    last = item.exposure_steps[before]
    return {"exposures": int(before.sum()), "steps_since_last": int(step - last[-1]) if len(last) else None,
            "first_exposure": item.first_exposure, "exposures_by_task": dict(sorted(by_task.items())),
            "twin_exposures": int((item.twin_steps <= step).sum()),
            "sample_rank": item.sample_rank, "requested": item.requested}


def dolma_sample(build_dir: Path, count: int = DOLMA_INSTANCES, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """(token rows, which kind) of `count` Dolma instances for the validation loss, see the module docstring."""
    from inject import trainers
    from inject.config import TrainingConfig
    from inject.configtools import from_dict
    from inject.injection import training_order
    from inject.ledger import read_ledger

    manifest = load_manifest(build_dir)
    t = from_dict(TrainingConfig, manifest["injection"]["training"], "manifest.injection.training")
    L = manifest["sequence_length"]
    order = training_order(t, manifest["injection"]["num_instances"], L)  # the target trainer's order
    pool, kind = np.sort(order[t.steps * t.global_batch_size:]), "unplanned"
    if not len(pool):
        injected = np.unique(np.asarray(read_ledger(build_dir)["instance"]))
        pool, kind = np.setdiff1d(np.arange(manifest["injection"]["num_instances"]), injected), "planned, not injected"
    chosen = np.sort(np.random.default_rng([seed, 7]).choice(pool, size=min(count, len(pool)), replace=False))
    outputs = manifest["outputs"]
    per_file = trainers.get(t.trainer).file_instances([f["tokens"] // L for f in outputs], t, L)  # as the trainer reads them
    files = [(np.memmap(Path(build_dir) / f["path"], dtype=manifest["dtype"], mode="r"), n) for f, n in zip(outputs, per_file)]
    rows = []
    for index in chosen:
        for tokens, instances in files:  # each file holds `instances` whole instances of L tokens, in file order
            if index < instances:
                rows.append(np.asarray(tokens[index * L : (index + 1) * L], np.int64))
                break
            index -= instances
    return rows, kind


def dolma_loss(model, rows: list[np.ndarray]) -> float | None:
    """Mean next-token cross-entropy (nats) over every position of every row."""
    import torch

    if not rows:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for row in rows:
        x = torch.tensor(row[None], device=device)
        with torch.no_grad():
            logits = model(x).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += len(row) - 1
    return total / count


def exposure_bucket(exposures: int) -> str:
    return next(name for low, high, name in BUCKETS if low <= exposures <= high)


def evaluate(path: Path, build_dir: Path, out_dir: Path | None = None, seen: int = 200, held_out: int = 200,
             seed: int = 0, device: str = "cpu", batch_size: int = 64, unseen_templates: bool = False,
             pending: int = 200, dolma_instances: int = DOLMA_INSTANCES) -> EvalReport:
    check_sizes(seen=seen, pending=pending, held_out=held_out, dolma_instances=dolma_instances)
    path, build_dir = Path(path), Path(build_dir)
    out_dir = Path(out_dir) if out_dir else default_out(path, "eval")
    pad = load_manifest(build_dir)["tokenizer"]["pad_token_id"]
    settings = asdict(EvalSettings(str(build_dir.resolve()), seen, held_out, seed, unseen_templates, pending,
                                   dolma_instances))
    eval_set: dict = {}  # drawn at the first checkpoint that needs it: a run with nothing new reads no ledger

    def score(loaded, checkpoint, meta) -> list[dict]:
        if not eval_set:
            eval_set.update(sampler=EvalSampler(build_dir, seen, held_out, seed, unseen_templates, pending),
                            tasks=task_info(build_dir), dolma=dolma_sample(build_dir, dolma_instances, seed))
        items, tasks = eval_set["sampler"].items_at(checkpoint.step), eval_set["tasks"]
        rows = score_items(loaded.model, items, pad, batch_size)
        dolma = {"dolma_loss": dolma_loss(loaded.model, eval_set["dolma"][0]), "dolma_sample": eval_set["dolma"][1]}
        return [{**row, "kind": tasks[item.task]["kind"], "complexity": tasks[item.task]["complexity"],
                 "rate": tasks[item.task]["rate"], **exposure_fields(item, checkpoint.step), **dolma}
                for item, row in zip(items, rows)]

    done = run_over_checkpoints(path, build_dir, out_dir, settings, "eval-config.json", score, device)
    write_summary(out_dir)
    return EvalReport(done.analyzed, done.skipped, done.failed, done.refused)


def read_results(out_dir: Path) -> list[dict]:
    """Every row of a results folder, checkpoints in step order."""
    return read_jsonl_folder(out_dir)


SUMMARY_COLUMNS = ["model", "params", "step", "tokens", "task", "kind", "complexity", "rate", "split", "format",
                   "exposures", "n", "requested", "accuracy", "ci_low", "ci_high", "chance", "above_chance",
                   "normalized", "calibrated_accuracy", "greedy_exact", "mean_logprob", "mean_rank", "dolma_loss"]
SPLITS = ["seen", "pending", "held_out"]


def summarize(rows: list[dict]) -> list[dict]:
    """Accuracy with a 95% Wilson interval per model, step, task, split and format; seen instances also
    per exposure bucket (exposures before that step). `requested` is the split's asked-for size (blank for
    buckets): n below it means the build had fewer instances of that kind at that step. `above_chance` is
    accuracy minus chance, `normalized` (accuracy - chance) / (1 - chance): 0 at chance, 1 when perfect."""
    groups: dict[tuple, list] = {}
    for row in rows:
        key = (row.get("model", ""), row["step"], row["task"], row["split"], row.get("format", "training"))
        groups.setdefault((*key, "all"), []).append(row)
        if row["split"] == "seen":
            groups.setdefault((*key, exposure_bucket(row["exposures"])), []).append(row)
    requested, steps, neighbours = {}, defaultdict(set), {}
    for (model, step, task, split, fmt, bucket), members in groups.items():
        requested[(model, task, split, fmt)] = members[0].get("requested")  # the size asked for
        steps[(model, task, fmt)].add(step)
        neighbours.setdefault((model, step, task), members)  # what an empty split takes chance and meta from
    for (model, task, split, fmt) in requested:  # a split with no rows at a step is shown with n = 0
        for step in steps[(model, task, fmt)]:
            groups.setdefault((model, step, task, split, fmt, "all"), [])
    return [_summary_row(*key, members, requested[(key[0], key[2], key[3], key[4])], neighbours[key[:3]])
            for key, members in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))]


def _summary_row(model, step, task, split, fmt, bucket, members, requested, neighbours) -> dict:
    """One summary row; `neighbours` (rows of the same checkpoint and task) give what an empty split lacks."""
    first = (members or neighbours)[0]
    n, hits = len(members), sum(r["correct"] for r in members)
    low, high = wilson_interval(hits, n)
    chance = float(np.mean([1 / r["candidates"] for r in members or neighbours]))
    accuracy = hits / n if n else None
    calibrated = [r["calibrated_correct"] for r in members if r.get("calibrated_correct") is not None]
    return {"model": model, "params": first.get("params"), "step": step, "tokens": first.get("tokens"),
            "task": task, "kind": first.get("kind"), "complexity": first.get("complexity"),
            "rate": first.get("rate"), "split": split, "format": fmt, "exposures": bucket, "n": n,
            "requested": requested if bucket == "all" else None,
            "accuracy": accuracy, "ci_low": low, "ci_high": high, "chance": chance,
            "above_chance": accuracy - chance if n else None, "normalized": normalized(accuracy, chance) if n else None,
            "calibrated_accuracy": float(np.mean(calibrated)) if calibrated else None,
            "greedy_exact": float(np.mean([r["greedy_exact"] for r in members])) if n else None,
            "mean_logprob": float(np.mean([r["logprob"] for r in members])) if n else None,
            "mean_rank": float(np.mean([r["rank"] for r in members])) if n else None,
            "dolma_loss": first.get("dolma_loss")}


def normalized(accuracy: float, chance: float) -> float:
    """(accuracy - chance) / (1 - chance): 0 at chance, 1 when perfect, negative below chance."""
    return (accuracy - chance) / (1 - chance) if chance < 1 else 0.0


def short_splits(table: list[dict]) -> list[dict]:
    """Summary rows of whole splits with fewer rows than asked for."""
    return [r for r in table if r["exposures"] == "all" and r.get("requested") is not None and r["n"] < r["requested"]]


def _sort_key(key: tuple) -> tuple:
    model, step, task, split, fmt, bucket = key
    order = [name for _, _, name in BUCKETS]
    return (model, step, task, SPLITS.index(split) if split in SPLITS else 9, split, fmt,
            -1 if bucket == "all" else order.index(bucket))


def write_table(table: list[dict], target: Path) -> Path:
    tmp = target.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in table:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items() if k in SUMMARY_COLUMNS})
    tmp.replace(target)
    return target


def write_summary(out_dir: Path) -> Path:
    return write_table(summarize(read_results(out_dir)), Path(out_dir) / "summary.csv")


WANDB_ID = "wandb-id"  # written by `train` (ai2-olmo) when the config has a wandb block


def wandb_history(table: list[dict]) -> list[dict]:
    """The summary as W&B history rows, one per evaluated step: `eval/step` and, per task and split (all
    exposures, training templates), `eval/TASK/SPLIT/{accuracy,normalized,calibrated_accuracy,n}`."""
    rows: dict[int, dict] = {}
    for r in table:
        if r["exposures"] != "all" or r["format"] != "training":
            continue
        row = rows.setdefault(int(r["step"]), {"eval/step": int(r["step"])})
        for name in ("accuracy", "normalized", "calibrated_accuracy", "n"):
            if r[name] is not None:
                row[f"eval/{r['task']}/{r['split']}/{name}"] = r[name]
    return [rows[s] for s in sorted(rows)]


def wandb_run_id(run_dir: Path) -> str:
    """The id of a run folder's W&B run; an InjectError when it has none."""
    from inject.errors import InjectError

    id_file = Path(run_dir) / WANDB_ID
    if not id_file.is_file():
        raise InjectError(f"--wandb: {run_dir} has no W&B run ({WANDB_ID}); train with a `wandb:` block in the config")
    return id_file.read_text().strip()


def log_to_wandb(run_dir: Path, out_dir: Path) -> int:
    """Log the eval summary to the training run's W&B run (RUN/wandb-id; project and entity from the wandb
    block of RUN/config.yaml), on its own x axis `eval/step` (W&B steps only grow, and training logged past
    every checkpoint). Returns the rows logged. `WANDB_MODE=offline` works without network."""
    import yaml

    run_id = wandb_run_id(run_dir)
    block = (yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}).get("wandb") or {}
    history = wandb_history(summarize(read_results(out_dir)))
    import wandb

    wandb.init(dir=str(run_dir), id=run_id, resume="allow", project=block.get("project"), entity=block.get("entity"))
    wandb.define_metric("eval/step")
    wandb.define_metric("eval/*", step_metric="eval/step")
    for row in history:
        wandb.log(row)
    wandb.finish()
    return len(history)
