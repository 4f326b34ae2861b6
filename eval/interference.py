"""`olmo-inject analyze interference RUN_OR_CHECKPOINT --data BUILD`: gradient interference between the injected
tasks and the rest of the training data, per checkpoint, overall and per layer.

Gradients (of the parameters of one checkpoint, no optimizer involved), each the gradient of a mean
cross-entropy:
- `task:<name>`: each task's examples (the build's seen instances, rendered as in training); the loss is on
  the answer tokens only;
- `dolma`: plain Dolma sequences, instances of the build that hold no example; loss on every next token;
- `batch`: the real training batch that the checkpoint trains on next (batch of step N+1 for a step-N
  checkpoint, read by the build's ledger and ai2-olmo's instance order), loss on every next token as in
  training; split exactly into `batch_task:<name>` (the positions whose target token belongs to one of
  that task's examples, from the EOS before it to its closing EOS) and `batch_other` (every other
  position): batch = sum of its parts, each part normalized by the batch's token count.

Measurements (rows of stepN.jsonl, `type`):
- `norm`: the L2 norm of each gradient per parameter group: `embedding`, `block<i>`, `final_norm`, `lm_head`
  (these partition the parameters: their squares sum to the square of `all`), `blocks` (every block) and
  `all`; with the loss and its token count;
- `cosine`: the cosine similarity of every pair of gradients in every group, also in the group
  `block0.mlp.top<k>:<task>`: the first MLP layer's k neurons that respond most to the task (largest
  mean |activation| on the task's tokens minus that on Dolma tokens), their input-projection rows and
  output-projection columns;
- `projection`: per task and group, how much of the training batch's gradient lies along the task's
  gradient direction u = g_task / |g_task|: `along_task` = g_batch . u (signed length),
  `share` = g_batch . u / |g_batch| (the cosine; its square is the fraction of |g_batch|^2 along u), and
  the same length split by origin, `from_task_tokens` = g_batch_task . u and `from_other_tokens` =
  g_batch_other . u (they sum to `along_task`; a negative `from_other_tokens` is the rest of the batch
  pushing against the task).

Outputs in RUN/interference (or --out): stepN.jsonl, norms.csv, cosines.csv, projections.csv,
interference_vs_step.png (cosines with Dolma, with the batch's other tokens and with the other tasks,
and the batch's share along each task, against step, one colour per model size),
interference_by_layer.png (cosine with Dolma and gradient norms per layer at each model's last step),
interference-config.json.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from inject.build import load_manifest
from inject.ledger import read_ledger

from .analysis import (AnalysisReport, blocks_of, default_out, group_order, parameter_group, read_jsonl_folder,
                       run_over_checkpoints, write_csv)
from .sets import build_eval_set

Gradient = dict[str, torch.Tensor]


@dataclass
class InterferenceSettings:
    """What decides an interference results folder; stored as interference-config.json."""

    build: str
    n_task: int
    n_dolma: int
    batch_instances: int | None
    top_neurons: int
    seed: int


# ---- pure functions on gradients ---------------------------------------------------------------------------

def dot(g1: Gradient, g2: Gradient, names=None) -> float:
    """Sum over the parameters `names` (default: all of g1) of the elementwise products, in float64."""
    return float(sum((g1[n].double() * g2[n].double()).sum() for n in (names if names is not None else g1)))


def norm(g: Gradient, names=None) -> float:
    return math.sqrt(dot(g, g, names))


def cosine(g1: Gradient, g2: Gradient, names=None) -> float | None:
    """Cosine similarity of two gradients given as dicts of tensors (None when either is zero)."""
    a, b = norm(g1, names), norm(g2, names)
    return dot(g1, g2, names) / (a * b) if a > 0 and b > 0 else None


def groups_of(parameter_names) -> dict[str, list[str]]:
    """Parameter groups: embedding, block<i>, final_norm, lm_head (a partition), then blocks and all."""
    parts: dict[str, list[str]] = {}
    for n in parameter_names:
        parts.setdefault(parameter_group(n), []).append(n)
    groups = {g: parts[g] for g in group_order(parts)}
    groups["blocks"] = [n for g, names in parts.items() if g.startswith("block") for n in names]
    groups["all"] = list(parameter_names)
    return groups


def gram(gradients: dict[str, Gradient], names: list[str]) -> np.ndarray:
    """Matrix of dot products between all gradients (in the order of `gradients`) over parameters `names`."""
    keys = list(gradients)
    G = np.zeros((len(keys), len(keys)))
    for n in names:
        M = torch.stack([gradients[k][n].reshape(-1).double() for k in keys])
        G += (M @ M.T).numpy()
    return G


def measurements(gradients: dict[str, Gradient], groups: dict[str, list[str]], tasks: list[str],
                 extra: dict[str, dict[str, torch.Tensor]] | None = None) -> list[dict]:
    """norm, cosine and projection rows (see the module docstring) for every group; `extra` adds groups
    given directly as one flat vector per gradient (e.g. a slice of neurons)."""
    keys = list(gradients)
    grams = {g: gram(gradients, names) for g, names in groups.items()}
    for g, vectors in (extra or {}).items():
        M = torch.stack([vectors[k].double() for k in keys])
        grams[g] = (M @ M.T).numpy()
    rows = []
    for g, G in grams.items():
        norms = np.sqrt(np.clip(np.diag(G), 0, None))
        for i, k in enumerate(keys):
            rows.append({"type": "norm", "gradient": k, "group": g, "norm": float(norms[i])})
        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                c = float(G[i, j] / (norms[i] * norms[j])) if norms[i] > 0 and norms[j] > 0 else None
                rows.append({"type": "cosine", "a": keys[i], "b": keys[j], "group": g, "cosine": c})
        if "batch" not in keys:
            continue
        b = keys.index("batch")
        for task in tasks:
            t = keys.index(f"task:{task}")
            if norms[t] == 0:
                continue
            along = float(G[b, t] / norms[t])
            own = keys.index(f"batch_task:{task}") if f"batch_task:{task}" in keys else None
            from_task = float(G[own, t] / norms[t]) if own is not None else 0.0
            rows.append({"type": "projection", "task": task, "group": g, "along_task": along,
                         "share": along / norms[b] if norms[b] > 0 else None,
                         "from_task_tokens": from_task, "from_other_tokens": along - from_task})
    return rows


# ---- losses and gradients of a model ------------------------------------------------------------------------

def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(next(model.parameters()).device)).logits.float()


def accumulate_gradients(model, sequences: list[list[int]], weights: list[dict[str, np.ndarray]], total: float,
                         micro_batch: int = 8) -> tuple[dict[str, Gradient], dict[str, float]]:
    """(gradient, loss) per part of the loss: sum over sequences and positions of weight[part][j] *
    CE(position j predicts token j + 1), divided by `total`. `weights[i][part]` has len(sequence i) - 1
    entries. Sequences are batched by length (no padding enters a forward pass)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    parts = sorted({k for w in weights for k in w})
    out = {k: {n: torch.zeros_like(p, device="cpu") for n, p in params} for k in parts}
    losses = {k: 0.0 for k in parts}
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(sequences):
        by_length.setdefault(len(s), []).append(i)
    model.eval()  # no dropout; gradients still flow
    for _, members in sorted(by_length.items()):
        for start in range(0, len(members), micro_batch):
            chunk = members[start : start + micro_batch]
            ids = torch.tensor([sequences[i] for i in chunk])
            logits = _logits(model, ids[:, :-1])
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten().to(logits.device),
                                                   reduction="none").view(len(chunk), -1)
            present = [k for k in parts if any(k in weights[i] and weights[i][k].any() for i in chunk)]
            for n_done, k in enumerate(present):
                w = torch.tensor(np.stack([weights[i].get(k, np.zeros(ids.shape[1] - 1)) for i in chunk]),
                                 dtype=ce.dtype, device=ce.device)
                loss = (ce * w).sum() / total
                losses[k] += float(loss.detach())
                grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=n_done < len(present) - 1,
                                            allow_unused=True)
                for (n, _), g in zip(params, grads):
                    if g is not None:
                        out[k][n] += g.detach().float().cpu()
    return out, losses


def read_instances(build_dir: Path, manifest: dict, indices) -> list[np.ndarray]:
    """Token rows of OLMo instances (MemMapDataset indexing: files in order, whole instances per file)."""
    L = manifest["sequence_length"]
    starts = np.cumsum([0] + [f["instances"] for f in manifest["outputs"]])
    arrays = {}
    rows = []
    for i in indices:
        k = int(np.searchsorted(starts, i, side="right")) - 1
        if k not in arrays:
            arrays[k] = np.memmap(Path(build_dir) / manifest["outputs"][k]["path"], dtype=manifest["dtype"], mode="r")
        local = int(i) - int(starts[k])
        rows.append(np.asarray(arrays[k][local * L : (local + 1) * L], dtype=np.int64))
    return rows


def batch_of_step(build_dir: Path, manifest: dict, step: int) -> np.ndarray:
    """The OLMo instance indices of training step `step` (1-based), in ai2-olmo's order."""
    t = manifest["injection"]["training"]
    B = t["global_batch_size"]
    order = _olmo_order(manifest["injection"]["num_instances"], B, t["seed"], t.get("drop_last", False))
    return np.asarray(order[(step - 1) * B : step * B], dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _olmo_order(num_instances: int, batch_size: int, seed: int, drop_last: bool) -> np.ndarray:
    """OLMo's order, computed once for all checkpoints of a run (6 s and ~400 MB at 100M instances)."""
    from inject.injection import olmo_order

    return olmo_order(num_instances, batch_size, seed, drop_last)


def batch_parts(build_dir: Path, manifest: dict, step: int, task_names: list[str], ledger: np.ndarray,
                limit: int | None, seed: int) -> tuple[list[list[int]], list[dict[str, np.ndarray]], dict]:
    """(sequences, per-position weights per part, info) of a training batch; parts `batch_task:<name>` and
    `batch_other`. With `limit`, every instance with examples is kept and other instances fill up to it."""
    instances = batch_of_step(build_dir, manifest, step)
    rows = ledger[ledger["step"] == step]
    holding = set(rows["instance"].astype(np.int64).tolist())
    if limit is not None and len(instances) > limit:
        others = [i for i in instances if i not in holding]
        keep = set(np.random.default_rng([seed, step]).permutation(others)[: max(0, limit - len(holding))].tolist())
        instances = np.array([i for i in instances if i in holding or i in keep], dtype=np.int64)
    tokens = read_instances(build_dir, manifest, instances)
    weights, examples, task_tokens = [], {n: 0 for n in task_names}, {n: 0 for n in task_names}
    for instance, row in zip(instances, tokens):
        positions = len(row) - 1  # position j predicts token j + 1
        mask = {}
        for r in rows[rows["instance"] == instance]:
            name = task_names[int(r["spec"])]
            m = mask.setdefault(f"batch_task:{name}", np.zeros(positions))
            lo, hi = max(int(r["offset"]) - 1, 0), int(r["offset"]) + int(r["length"]) - 1  # targets offset .. offset+length-1 (offset 0: its first token has no predictor)
            m[lo:hi] = 1.0
            examples[name] += 1
            task_tokens[name] += hi - lo
        other = np.ones(positions) - sum(mask.values(), np.zeros(positions))
        mask["batch_other"] = other
        weights.append(mask)
    info = {"batch_step": step, "batch_instances": len(instances), "batch_loss_tokens": len(instances) * (tokens[0].size - 1 if tokens else 0),
            "task_examples_in_batch": examples, "task_tokens_in_batch": task_tokens}
    return [t.tolist() for t in tokens], weights, info


def plain_instances(manifest: dict, ledger: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n seeded instances that hold no example (plain Dolma), among those training reads."""
    t = manifest["injection"]["training"]
    used = min(manifest["injection"]["num_instances"], t["steps"] * t["global_batch_size"])
    holding = np.unique(ledger["instance"].astype(np.int64))
    rng = np.random.default_rng([seed, 7])
    chosen = []
    for i in rng.permutation(used):
        if len(chosen) == n:
            break
        at = int(np.searchsorted(holding, i))
        if at == len(holding) or holding[at] != i:
            chosen.append(int(i))
    return np.array(sorted(chosen), dtype=np.int64)


def task_sequences(items) -> tuple[list[list[int]], list[dict[str, np.ndarray]], float]:
    """Each item's prompt + right answer, with weight 1 on the positions that predict the answer tokens."""
    sequences, weights = [], []
    for it in items:
        answer = it.candidates[it.correct]
        s = it.context + answer
        w = np.zeros(len(s) - 1)
        w[len(it.context) - 1 :] = 1.0
        sequences.append(s)
        weights.append({"task": w})
    return sequences, weights, float(sum(w["task"].sum() for w in weights))


# ---- neurons of the first MLP layer ------------------------------------------------------------------------

def first_mlp(loaded) -> tuple[torch.nn.Module, list[str], str] | None:
    """(output projection module, input-projection parameter names, output-projection parameter name) of
    block 0's MLP, for ai2-olmo (ff_proj, ff_out) and Llama-style models (gate_proj/up_proj, down_proj)."""
    block = blocks_of(loaded)[0]
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    if hasattr(block, "ff_out") and hasattr(block, "ff_proj"):
        return block.ff_out, [names[id(block.ff_proj.weight)]], names[id(block.ff_out.weight)]
    mlp = getattr(block, "mlp", None)
    if mlp is not None and hasattr(mlp, "down_proj"):
        ins = [names[id(getattr(mlp, k).weight)] for k in ("gate_proj", "up_proj") if hasattr(mlp, k)]
        return mlp.down_proj, ins, names[id(mlp.down_proj.weight)]
    return None


def neuron_activity(model, out_proj: torch.nn.Module, sequences: list[list[int]], masks: list[np.ndarray]) -> np.ndarray:
    """Mean |activation| of each neuron (input feature of `out_proj`) over the masked positions."""
    total, count = None, 0.0
    captured = []
    handle = out_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().float().abs().cpu()))
    try:
        for s, m in zip(sequences, masks):
            captured.clear()
            with torch.no_grad():
                _logits(model, torch.tensor([s]))
            act = captured[0][0]  # [length, hidden]
            w = torch.tensor(m, dtype=act.dtype)[: act.shape[0]]
            part = (act[: len(w)] * w[:, None]).sum(0)
            total = part if total is None else total + part
            count += float(w.sum())
    finally:
        handle.remove()
    return (total / max(count, 1.0)).numpy()


def neuron_vectors(gradient: Gradient, neurons: np.ndarray, ins: list[str], out: str) -> torch.Tensor:
    """The gradient restricted to the chosen neurons: their rows in each input projection (both halves of a
    fused SwiGLU projection) and their columns in the output projection, as one flat vector."""
    hidden = gradient[out].shape[1]
    idx = torch.as_tensor(neurons, dtype=torch.long)
    pieces = [gradient[out][:, idx].reshape(-1)]
    for name in ins:
        w = gradient[name]
        rows = torch.cat([idx + h * hidden for h in range(w.shape[0] // hidden)])
        pieces.append(w[rows].reshape(-1))
    return torch.cat(pieces)


# ---- the analysis ----------------------------------------------------------------------------------------------

def interference_rows(loaded, build_dir: Path, manifest: dict, step: int, items, task_names: list[str],
                      ledger: np.ndarray, settings: InterferenceSettings, micro_batch: int) -> list[dict]:
    model = loaded.model
    gradients: dict[str, Gradient] = {}
    losses: dict[str, tuple[float, float]] = {}
    activity_inputs: dict[str, tuple[list, list]] = {}
    for name in task_names:
        mine = [it for it in items if it.task == name]
        if not mine:
            continue
        sequences, weights, total = task_sequences(mine)
        grads, loss = accumulate_gradients(model, sequences, weights, total, micro_batch)
        gradients[f"task:{name}"], losses[f"task:{name}"] = grads["task"], (loss["task"], total)
        activity_inputs[name] = (sequences, [np.r_[0.0, np.ones(len(s) - 1)] for s in sequences])  # all but the EOS
    dolma = read_instances(build_dir, manifest, plain_instances(manifest, ledger, settings.n_dolma, settings.seed))
    if dolma:
        sequences = [d.tolist() for d in dolma]
        weights = [{"dolma": np.ones(len(s) - 1)} for s in sequences]
        total = float(sum(len(s) - 1 for s in sequences))
        grads, loss = accumulate_gradients(model, sequences, weights, total, micro_batch)
        gradients["dolma"], losses["dolma"] = grads["dolma"], (loss["dolma"], total)
    steps = manifest["injection"]["training"]["steps"]
    batch_step = min(max(step + 1, 1), steps)
    sequences, weights, info = batch_parts(build_dir, manifest, batch_step, task_names, ledger, settings.batch_instances,
                                           settings.seed)
    total = float(info["batch_loss_tokens"])
    parts, part_losses = accumulate_gradients(model, sequences, weights, total, micro_batch)
    names = list(next(iter(gradients.values())))
    gradients["batch"] = {n: sum(parts[k][n] for k in parts) for n in names}
    for k in sorted(parts, key=lambda k: (k == "batch_other", k)):
        gradients[k] = parts[k]
    losses["batch"] = (sum(part_losses.values()), total)
    losses.update({k: (v, total) for k, v in part_losses.items()})
    tasks = [n for n in task_names if f"task:{n}" in gradients]

    extra, neuron_info = {}, {}
    mlp = first_mlp(loaded)
    if mlp is not None and dolma and settings.top_neurons > 0:
        out_proj, ins, out = mlp
        base = neuron_activity(model, out_proj, [d.tolist() for d in dolma], [np.ones(len(d)) for d in dolma])
        for name in tasks:
            selectivity = neuron_activity(model, out_proj, *activity_inputs[name]) - base
            k = min(settings.top_neurons, len(selectivity))
            top = np.sort(np.argsort(-selectivity, kind="stable")[:k])
            group = f"block0.mlp.top{k}:{name}"
            extra[group] = {g: neuron_vectors(grad, top, ins, out) for g, grad in gradients.items()}
            neuron_info[group] = top.tolist()

    rows = measurements(gradients, groups_of(names), tasks, extra)
    for r in rows:
        if r["type"] == "norm" and r["group"] == "all" and r["gradient"] in losses:
            r["loss"], r["loss_tokens"] = losses[r["gradient"]][0], losses[r["gradient"]][1]
        if r["type"] == "projection":
            r.update(batch_step=batch_step, batch_instances=info["batch_instances"],
                     task_examples_in_batch=info["task_examples_in_batch"][r["task"]],
                     task_tokens_in_batch=info["task_tokens_in_batch"][r["task"]])
        if r["group"] in neuron_info:
            r["neurons"] = neuron_info[r["group"]]
    return rows


def analyze_interference(path: Path, build_dir: Path, out_dir: Path | None = None, n_task: int = 64, n_dolma: int = 8,
                         batch_instances: int | None = None, top_neurons: int = 16, seed: int = 0, device: str = "cpu",
                         micro_batch: int = 8, plot_with: list[Path] | None = None) -> AnalysisReport:
    path, build_dir = Path(path), Path(build_dir)
    out_dir = Path(out_dir) if out_dir else default_out(path, "interference")
    settings = InterferenceSettings(str(build_dir.resolve()), n_task, n_dolma, batch_instances, top_neurons, seed)
    manifest = load_manifest(build_dir)
    cache: dict = {}

    def analyze(loaded, checkpoint, meta):
        if not cache:
            cache["items"] = [it for it in build_eval_set(build_dir, seen=n_task, held_out=0, seed=seed)
                              if it.format == "training" and it.split == "seen"]
            cache["ledger"] = np.asarray(read_ledger(build_dir))
            cache["tasks"] = [t["name"] for t in manifest["injection"]["tasks"]]
        return interference_rows(loaded, build_dir, manifest, checkpoint.step, cache["items"], cache["tasks"],
                                 cache["ledger"], settings, micro_batch)

    report = run_over_checkpoints(path, build_dir, out_dir, asdict(settings), "interference-config.json", analyze, device)
    write_outputs(out_dir, plot_with or [])
    return report


META = ["model", "run", "params", "step", "tokens"]
TABLES = {
    "norm": ("norms.csv", META + ["gradient", "group", "norm", "loss", "loss_tokens"]),
    "cosine": ("cosines.csv", META + ["a", "b", "group", "cosine"]),
    "projection": ("projections.csv", META + ["task", "group", "along_task", "share", "from_task_tokens",
                                              "from_other_tokens", "batch_step", "batch_instances",
                                              "task_examples_in_batch", "task_tokens_in_batch"]),
}


def write_outputs(out_dir: Path, plot_with: list[Path]) -> list[Path]:
    rows = read_jsonl_folder(out_dir)
    order = lambda r: (r.get("params") or 0, r["model"], r["step"])  # noqa: E731
    written = [write_csv(out_dir / file, sorted((r for r in rows if r["type"] == kind), key=order), columns)
               for kind, (file, columns) in TABLES.items()]
    everything = rows + [r for other in plot_with for r in read_jsonl_folder(other)]
    if everything:
        written += plot_interference(everything, out_dir)
    return written


def plot_interference(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import colors_for as _colors, save_figure as _save

    params = {r["model"]: r.get("params") or 0 for r in rows}
    models = sorted(params, key=lambda m: (params[m], m))
    colors = _colors(models)
    tasks = sorted({r["task"] for r in rows if r["type"] == "projection"} |
                   {r["a"][5:] for r in rows if r["type"] == "cosine" and r["a"].startswith("task:")})
    cos = {(r["model"], r["step"], r["group"], r["a"], r["b"]): r["cosine"] for r in rows if r["type"] == "cosine"}

    def cosine_of(model, step, group, a, b):
        return cos.get((model, step, group, a, b), cos.get((model, step, group, b, a)))

    measures = [("vs Dolma", lambda m, s, t: cosine_of(m, s, "all", f"task:{t}", "dolma")),
                ("vs the batch's other tokens", lambda m, s, t: cosine_of(m, s, "all", f"task:{t}", "batch_other")),
                ("vs the other tasks (mean)", lambda m, s, t: _mean([cosine_of(m, s, "all", f"task:{t}", f"task:{o}")
                                                                    for o in tasks if o != t])),
                ("batch share along the task", lambda m, s, t: next((r["share"] for r in rows if r["type"] == "projection"
                                                                     and r["model"] == m and r["step"] == s and r["task"] == t
                                                                     and r["group"] == "all"), None))]
    written = []
    fig, axes = plt.subplots(len(measures), max(1, len(tasks)), figsize=(4.4 * max(1, len(tasks)), 2.9 * len(measures) + 0.4),
                             squeeze=False)
    for row, (title, value) in enumerate(measures):
        for col, task in enumerate(tasks):
            ax = axes[row][col]
            for model in models:
                steps = sorted({r["step"] for r in rows if r["model"] == model})
                pts = [(s, value(model, s, task)) for s in steps]
                pts = [(s, v) for s, v in pts if v is not None]
                if pts:
                    ax.plot(*zip(*pts), "-o", ms=3, color=colors[model], label=model)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set(title=f"{task}: {title}", xlabel="training step",
                   ylabel="share (cosine)" if row == len(measures) - 1 else "gradient cosine")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Gradient interference: cosine of each task's gradient with other data (all parameters)")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "interference_vs_step.png"))

    fig, axes = plt.subplots(2, max(1, len(tasks)), figsize=(4.4 * max(1, len(tasks)), 6.2), squeeze=False)
    for col, task in enumerate(tasks):
        for model in models:
            last = max(r["step"] for r in rows if r["model"] == model)
            groups = group_order({r["group"] for r in rows if r["model"] == model and r["type"] == "norm"
                                  and r["group"] not in ("all", "blocks") and ":" not in r["group"]})
            values = [cosine_of(model, last, g, f"task:{task}", "dolma") for g in groups]
            norms = [next((r["norm"] for r in rows if r["type"] == "norm" and r["model"] == model and r["step"] == last
                           and r["group"] == g and r["gradient"] == f"task:{task}"), np.nan) for g in groups]
            x = np.arange(len(groups))
            axes[0][col].plot(x, [np.nan if v is None else v for v in values], "-o", ms=3, color=colors[model],
                              label=f"{model} (step {last})")
            axes[1][col].plot(x, norms, "-o", ms=3, color=colors[model], label=f"{model} (step {last})")
            for ax in axes[:, col]:
                ax.set_xticks(x, groups, rotation=45, fontsize=7)
        axes[0][col].axhline(0, color="grey", linewidth=0.8)
        axes[0][col].set(title=f"{task}: cosine with Dolma per layer", ylabel="gradient cosine")
        axes[1][col].set(title=f"{task}: gradient norm per layer", ylabel="L2 norm")
        axes[1][col].set_yscale("log")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "interference_by_layer.png"))
    return written


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
