"""`olmo-inject eval-set export BUILD --out DIR`: a build's eval sets as Hugging Face datasets and
lm-evaluation-harness tasks, so that other tools score exactly the instances `eval` scores.

The rows are `EvalSampler.items_at(step)`'s, the same draw `eval` makes at that checkpoint step (same seed,
sizes, templates): per task, `seen` (first exposure <= step), `pending` (first exposure > step) and
`held_out`. Each row holds the prompt as text and as token ids (EOS first, as in training), the candidates
(text, with the answer's leading space; and ids), the right candidate's index, and the instance's exposure
history. DIR gets:

    data/TASK/SPLIT.parquet     one Parquet file per task and split (`datasets.load_dataset("parquet", ...)`)
    hf/TASK/                    the same as a DatasetDict (`datasets.load_from_disk`), splits seen/pending/held_out
    lm_eval/*.yaml              one lm-eval `multiple_choice` task per text-encoded task and non-empty split,
                                plus the group `olmo_inject` (`lm_eval --include_path DIR/lm_eval --tasks olmo_inject`)
    export.json                 what was exported (build, step, sizes, seed, row counts), written last

lm-eval scores a candidate as the log-probability of its tokens after the context, tokenizing context +
candidate together and cutting at the context's length; with the context ending before the candidate's
leading space (`target_delimiter: ""`), that gives the ids `eval` scores (tested on the GPT-NeoX tokenizer).
Tasks with the `tokens` encoding have no faithful text form (their prompt is token ids): they are exported
as datasets (ids included) but get no lm-eval task.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from inject.build import load_manifest
from inject.errors import InjectError
from inject.identity import build_identity

from .sets import EvalSampler, task_info

SPLITS = ("seen", "pending", "held_out")


def export_eval_sets(build_dir: Path, out_dir: Path, step: int | None = None, seen: int = 200, pending: int = 200,
                     held_out: int = 200, seed: int = 0) -> dict:
    """Write DIR (see the module docstring) through DIR.partial, renamed when complete; returns export.json."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise InjectError(f"--out: {out_dir} exists; choose a new folder (an export is never merged into another)")
    sampler = EvalSampler(build_dir, seen=seen, held_out=held_out, seed=seed, pending=pending)
    step = sampler.last_step if step is None else step
    if not 0 <= step <= sampler.last_step:
        raise InjectError(f"--step: {step} is outside the build's plan (steps 0..{sampler.last_step})")
    manifest = load_manifest(build_dir)
    rows = rows_of(sampler, step, manifest, task_info(build_dir))
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    counts = {}
    for task in sampler.names:
        counts[task] = {split: len(rows[task][split]) for split in SPLITS}
        _write_task(partial, task, rows[task])
    text_tasks = [t["name"] for t in manifest["injection"]["tasks"] if t["encoding"] == "text"]
    _write_lm_eval(partial, out_dir, {t: counts[t] for t in text_tasks})
    summary = {"build": str(Path(build_dir).resolve()), "manifest_sha256": build_identity(build_dir)["manifest_sha256"],
               "step": step, "sizes": {"seen": seen, "pending": pending, "held_out": held_out}, "seed": seed,
               "rows": counts, "lm_eval_tasks": sorted(_lm_eval_names(text_tasks, counts))}
    (partial / "export.json").write_text(json.dumps(summary, indent=1) + "\n")
    partial.rename(out_dir)
    return summary


def rows_of(sampler: EvalSampler, step: int, manifest: dict, info: dict) -> dict[str, dict[str, list[dict]]]:
    """Per task and split, one row per eval item at `step` (training-template items only)."""
    from inject import tokenizer as tok

    tokenizer = tok.load(manifest["tokenizer"]["name"])
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    rows: dict = {t: {s: [] for s in SPLITS} for t in sampler.names}
    for item in sampler.items_at(step):
        task = info[item.task]
        candidates = [decode(c) for c in item.candidates]
        rows[item.task][item.split].append({
            "task": item.task, "split": item.split, "kind": task["kind"], "complexity": task["complexity"],
            "encoding": task["encoding"], "rate": task["rate"], "instance": item.item, "template": item.template,
            "context": decode(item.context), "prompt": decode(item.context[1:]), "candidates": candidates,
            "answer_index": item.correct, "answer": candidates[item.correct],
            "context_ids": [int(i) for i in item.context], "candidate_ids": [[int(i) for i in c] for c in item.candidates],
            "first_exposure": item.first_exposure, "exposures": int(len(item.exposure_steps)),
            "exposures_at_step": int((item.exposure_steps <= step).sum()), "sample_rank": item.sample_rank,
        })
    return rows


def _write_task(folder: Path, task: str, splits: dict[str, list[dict]]) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = {split: pa.Table.from_pylist(rows, schema=_schema()) for split, rows in splits.items()}
    for split, table in tables.items():
        path = folder / "data" / task / f"{split}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    from datasets.table import InMemoryTable

    splits_ = {s: datasets.Dataset(InMemoryTable(t)) for s, t in tables.items()}
    datasets.DatasetDict(splits_).save_to_disk(str(folder / "hf" / task))


def _schema():
    import pyarrow as pa

    ids = pa.list_(pa.int64())
    return pa.schema([("task", pa.string()), ("split", pa.string()), ("kind", pa.string()), ("complexity", pa.int64()),
                      ("encoding", pa.string()), ("rate", pa.float64()), ("instance", pa.int64()),
                      ("template", pa.int64()), ("context", pa.string()), ("prompt", pa.string()),
                      ("candidates", pa.list_(pa.string())), ("answer_index", pa.int64()), ("answer", pa.string()),
                      ("context_ids", ids), ("candidate_ids", pa.list_(ids)), ("first_exposure", pa.int64()),
                      ("exposures", pa.int64()), ("exposures_at_step", pa.int64()), ("sample_rank", pa.int64())])


def _lm_eval_names(tasks: list[str], counts: dict) -> list[str]:
    return [lm_eval_task_name(t, s) for t in tasks for s in SPLITS if counts[t][s]]


def lm_eval_task_name(task: str, split: str) -> str:
    return f"olmo_inject_{task}_{split}".replace("-", "_").replace(".", "_")


def _write_lm_eval(folder: Path, final: Path, counts: dict[str, dict[str, int]]) -> None:
    """One YAML per text task and non-empty split; the data files are named by their final absolute path."""
    import yaml

    target = folder / "lm_eval"
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for task, per_split in counts.items():
        for split, n in per_split.items():
            if not n:
                continue
            name = lm_eval_task_name(task, split)
            names.append(name)
            data = str((final / "data" / task / f"{split}.parquet").resolve())
            spec = {"task": name, "dataset_path": "parquet", "dataset_kwargs": {"data_files": {"test": data}},
                    "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
                    "doc_to_choice": "{{candidates}}", "doc_to_target": "{{answer_index}}", "target_delimiter": "",
                    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                    "metadata": {"version": 1, "olmo_inject_task": task, "split": split}}
            (target / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if names:
        group = {"group": "olmo_inject", "task": names,
                 "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}]}
        (target / "olmo_inject.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
