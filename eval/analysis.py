"""What the mechanism analyses (`olmo-inject analyze probe|interference`) share with each other and with
`olmo-inject eval`: one results folder per run, one JSONL per checkpoint written atomically (finished steps
are skipped on a rerun), a settings file that refuses a rerun with other settings, checkpoint metadata,
hidden states and group names of parameters for both model kinds (ai2-olmo OLMo and transformers).

A results folder is locked while its checkpoints are analyzed (OUT/.lock: a second process into the same
folder is refused), is bound to its build (OUT/build.json: a rerun with another build is refused), and the
build must be the one the run trained on (RUN/build.json, written by `olmo-inject train`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from inject.build import load_manifest
from inject.errors import InjectError
from inject.identity import check_run_build, difference, read_record, same_build, write_record
from inject.lock import folder_lock

from .checkpoints import STEP, Checkpoint, CheckpointRefused, LoadedModel, find_checkpoints, load_model


@dataclass
class AnalysisReport:
    analyzed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # the failed ones refused as unsafe to unpickle (exit 2)
    out_dir: Path | None = None


LOCK = ".lock"


def run_folder(path: Path) -> Path:
    """The run folder of a run folder or of one of its checkpoints (stepN, stepN-unsharded)."""
    path = Path(path)
    return path.parent if STEP.search(path.name) and path.name.startswith("step") else path


def default_out(path: Path, name: str) -> Path:
    """RUN/<name>, or next to a single checkpoint (its run folder)/<name>."""
    return run_folder(path) / name


def bind_results(out_dir: Path, identity: dict) -> None:
    """Record the build a results folder is made with; refuse adding results of another build."""
    recorded = read_record(out_dir)
    if recorded is None:
        write_record(out_dir, identity)
    elif not same_build(recorded, identity):
        raise InjectError(f"{out_dir}: results made with the build {recorded['path']}, not with {identity['path']} "
                          f"({difference(recorded, identity)}); use another --out or delete the folder")


def check_results_build(results: Path) -> None:
    """`report`: a results folder inside a run must have been made with the run's build."""
    made_with, trained_on = read_record(results), read_record(Path(results).parent)
    if made_with is not None and trained_on is not None and not same_build(trained_on, made_with):
        raise InjectError(f"{results}: results made with the build {made_with['path']}, but the run "
                          f"{Path(results).parent} trained on {trained_on['path']} ({difference(trained_on, made_with)}); "
                          f"evaluate it again with --data {trained_on['path']}")


def check_settings(out_dir: Path, settings: dict, filename: str) -> None:
    """Store `settings` in out_dir/filename, or refuse when the folder was made with other settings."""
    target = out_dir / filename
    if target.exists():
        old = json.loads(target.read_text())
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise InjectError(f"{out_dir}: results made with other settings ({', '.join(changed)} differ: "
                              f"{target} has {old}); use another --out or delete the folder")
    else:
        write_atomic(target, json.dumps(settings, indent=2) + "\n")


def write_atomic(target: Path, text: str) -> Path:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)
    return target


def write_jsonl(target: Path, rows: list[dict]) -> Path:
    return write_atomic(target, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl_folder(out_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(out_dir).glob("step*.jsonl"), key=lambda p: int(STEP.search(p.name).group(1))):
        rows.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return rows


def write_csv(target: Path, rows: list[dict], columns: list[str]) -> Path:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(target)
    return target


def checkpoint_meta(path: Path, checkpoint: Checkpoint, loaded: LoadedModel, manifest: dict) -> dict:
    t = manifest["injection"]["training"]
    return {"step": checkpoint.step, "tokens": checkpoint.step * t["global_batch_size"] * manifest["sequence_length"],
            "run": path.parent.name if checkpoint.folder == path else path.name, "model": loaded.name,
            "params": loaded.params, "non_embedding_params": loaded.non_embedding_params,
            "checkpoint_format": checkpoint.format}


def run_over_checkpoints(path: Path, build_dir: Path, out_dir: Path, settings: dict, settings_file: str,
                         analyze, device: str = "cpu") -> AnalysisReport:
    """Call `analyze(loaded, checkpoint, meta) -> rows` for every checkpoint of `path` not yet in `out_dir`
    and write its rows to out_dir/stepN.jsonl (complete files only: a rerun skips exactly finished steps).
    A checkpoint that cannot be loaded is reported and the others still run. Refuses a build that is not
    the run's, and a results folder that another process is writing."""
    path, build_dir = Path(path), Path(build_dir)
    manifest = load_manifest(build_dir)
    if "injection" not in manifest:
        raise InjectError(f"{build_dir}: a build without injected tasks; nothing to analyze")
    checkpoints = find_checkpoints(path)
    identity = check_run_build(run_folder(path), build_dir)
    with folder_lock(out_dir / LOCK, f"the results folder {out_dir}"):
        check_settings(out_dir, settings, settings_file)
        bind_results(out_dir, identity)
        return _analyze_checkpoints(path, checkpoints, manifest, out_dir, analyze, device)


def _analyze_checkpoints(path: Path, checkpoints: list[Checkpoint], manifest: dict, out_dir: Path, analyze,
                         device: str) -> AnalysisReport:
    report = AnalysisReport(out_dir=out_dir)
    todo = [c for c in checkpoints if not (out_dir / f"step{c.step}.jsonl").exists()]
    report.skipped = [c.step for c in checkpoints if c not in todo]
    for checkpoint in tqdm(todo, desc="checkpoints", unit="ckpt", disable=len(todo) < 2):
        try:
            loaded = load_model(checkpoint, manifest, device)
        except InjectError as e:
            report.failed.append(str(e))
            if isinstance(e, CheckpointRefused):
                report.refused.append(str(e))
            continue
        meta = checkpoint_meta(path, checkpoint, loaded, manifest)
        rows = analyze(loaded, checkpoint, meta)
        write_jsonl(out_dir / f"step{checkpoint.step}.jsonl", [{**meta, **r} for r in rows])
        report.analyzed.append(checkpoint.step)
    return report


# ---- model internals, for both model kinds -------------------------------------------------------------

def blocks_of(loaded: LoadedModel) -> list[torch.nn.Module]:
    """The transformer blocks, in order."""
    from inject import trainers

    model = loaded.model
    ai2_olmo = trainers.get("ai2-olmo")
    if loaded.kind == ai2_olmo.MODEL_KIND:
        return ai2_olmo.model_blocks(model)
    inner = getattr(model, model.base_model_prefix, model)
    for name in ("layers", "h", "blocks"):
        if hasattr(inner, name):
            return list(getattr(inner, name))
    raise InjectError(f"{loaded.name}: cannot find the transformer layers of a {type(model).__name__}")


def hidden_states_at_last(loaded: LoadedModel, contexts: list[list[int]], batch_size: int = 64) -> np.ndarray:
    """Residual-stream states at each context's last token: [layers + 1, len(contexts), d_model] (float32),
    layer 0 the embedding output and layer i the output of block i (before the final norm).

    Contexts are batched by length, so no padding enters (ai2-olmo takes no position ids)."""
    model = loaded.model
    device = next(model.parameters()).device
    blocks = blocks_of(loaded)
    out = [None] * len(contexts)
    captured: list[torch.Tensor] = []

    def pre_hook(module, args, kwargs=None):
        x = args[0] if args else (kwargs or {}).get("hidden_states")
        captured.append(x[:, -1].detach().float().cpu())

    def hook(module, args, output):
        x = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(x[:, -1].detach().float().cpu())

    handles = [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [b.register_forward_hook(hook) for b in blocks]
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(contexts):
        by_length.setdefault(len(c), []).append(i)
    try:
        for _, members in sorted(by_length.items()):
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                captured.clear()
                with torch.no_grad():
                    model(torch.tensor([contexts[i] for i in chunk], device=device))
                stacked = torch.stack(captured, 0)  # [layers + 1, chunk, d]
                for k, i in enumerate(chunk):
                    out[i] = stacked[:, k]
    finally:
        for h in handles:
            h.remove()
    return torch.stack(out, 1).numpy()


def parameter_group(name: str) -> str:
    """embedding, block<i>, final_norm or lm_head for a parameter name of either model kind."""
    import re

    found = re.search(r"(?:^|\.)(?:blocks|layers|h|block_groups)\.(\d+)\.", name)
    if found:
        return f"block{found.group(1)}"
    if re.search(r"(?:^|\.)(wte|embed_tokens|embed_in|wpe)\.", name):
        return "embedding"
    if re.search(r"(?:^|\.)(ln_f|norm|final_layer_norm)\.", name):
        return "final_norm"
    return "lm_head"


def group_order(groups) -> list[str]:
    def key(g: str):
        if g == "embedding":
            return (0, 0)
        if g.startswith("block") and g[5:].isdigit():
            return (1, int(g[5:]))
        return (2, ["final_norm", "lm_head"].index(g) if g in ("final_norm", "lm_head") else 9, g)
    return sorted(set(groups), key=key)
