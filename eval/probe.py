"""`olmo-inject analyze probe RUN_OR_CHECKPOINT --data BUILD`: linear probes on the residual stream at the
answer position (the last prompt token, where the model must produce the answer), per layer and checkpoint,
that decode each task's features. Probes are trained on seen instances and tested on held-out ones, so a
high score means the feature is linearly present for instances the model never trained on.

Features (from each eval item's instance, see `inject.tasks`):
- comparison `(a, b)`: `outcome` (1 if a > b: which number is larger; logistic regression, accuracy) and
  the numbers' positions on the number line, `a_value` and `b_value` (ridge regression, R^2);
- modular addition `(a, b, ...)` mod p: `residue` (sum mod p; p-way logistic regression, accuracy) and
  Fourier components `cos_k_sum`/`sin_k_sum` = cos/sin(2 pi k r / p) of the residue r and
  `cos_k_a`/`sin_k_a` of the first operand a, for k = 1..3 (ridge regression, R^2).

Every probe standardizes the activations (statistics of the training set) and has a fixed seed. Each
score comes with a control: the same probe trained on shuffled training labels and tested on the true
held-out labels (near chance, or R^2 <= 0, when the probe itself cannot invent the feature), and a
baseline: the training set's majority class (accuracy) or mean (R^2) applied to the test set.

Layer 0 is the embedding output, layer i the output of block i (before the final norm).

The "best layer" (probe_vs_step.png) is chosen on a validation split, never on the test score: the same probe
is also fit on a seeded 80% of the training rows and scored on the other 20% (`validation`); at each step the
plot shows the test score of the layer with the highest validation score.

Outputs in RUN/probe (or --out): stepN.jsonl (one row per task, feature and layer), probe.csv (all
steps), probe_vs_step.png (the best layer's score against step, per model size, with the control
dotted), probe_by_layer.png (score against layer at each model's last step), probe-config.json.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inject.verify import BuildView

from .analysis import AnalysisReport, default_out, hidden_states_at_last, read_jsonl_folder, run_over_checkpoints, write_csv
from .sets import build_eval_set, task_info

FOURIER_KS = (1, 2, 3)
COLUMNS = ["model", "run", "params", "step", "tokens", "task", "kind", "complexity", "rate", "feature", "probe", "metric",
           "layer", "score", "control", "baseline", "validation", "n_train", "n_test", "n_validation", "classes"]
VALIDATION_SHARE = 0.2


@dataclass
class ProbeSettings:
    """What decides a probe results folder; stored as probe-config.json."""

    build: str
    seen: int
    held_out: int
    seed: int
    alpha: float       # ridge penalty
    C: float           # inverse logistic-regression penalty


def fit_probe(X_train, y_train, X_test, y_test, kind: str, seed: int = 0, alpha: float = 1.0, C: float = 1.0,
              control: bool = True) -> dict:
    """A linear probe trained on (X_train, y_train) and scored on (X_test, y_test).

    kind "classification": logistic regression, score = test accuracy; "regression": ridge, score = test R^2.
    Returns {"score", "control", "baseline", "n_train", "n_test", "classes"}; `control` is the same probe
    trained on a seeded shuffle of y_train; score and control are None where no probe can be fit (fewer
    than two training classes, or no test rows)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    X_train, X_test = np.asarray(X_train, np.float64), np.asarray(X_test, np.float64)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    result = {"score": None, "control": None, "baseline": None, "n_train": len(y_train), "n_test": len(y_test),
              "classes": int(len(np.unique(y_train))) if kind == "classification" else None}
    if len(y_test) == 0 or len(y_train) < 2:
        return result
    scaler = StandardScaler().fit(X_train)
    A, B = scaler.transform(X_train), scaler.transform(X_test)

    def score(labels) -> float | None:
        if kind == "classification":
            if len(np.unique(labels)) < 2:
                return None
            with warnings.catch_warnings():  # p-way residues: many classes for few rows is the point, not a mistake
                warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
                model = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(A, labels)
            return float((model.predict(B) == y_test).mean())
        if kind == "regression":
            model = Ridge(alpha=alpha, random_state=seed).fit(A, labels)
            return float(r2_score(y_test, model.predict(B))) if len(y_test) > 1 else None
        raise ValueError(f"kind: expected classification or regression, got {kind!r}")

    result["score"] = score(y_train)
    if control:
        result["control"] = score(np.random.default_rng(seed).permutation(y_train))
    if kind == "classification":
        values, counts = np.unique(y_train, return_counts=True)
        result["baseline"] = float((y_test == values[counts.argmax()]).mean())
    elif len(y_test) > 1:
        result["baseline"] = float(r2_score(y_test, np.full(len(y_test), y_train.mean())))
    return result


def features(kind: str, instance: tuple[int, ...], modulus: int | None = None) -> dict[str, tuple[str, float]]:
    """feature name -> (probe kind, value) for one instance of a task of `kind`."""
    if kind == "comparison":
        a, b = instance
        return {"outcome": ("classification", int(a > b)), "a_value": ("regression", float(a)),
                "b_value": ("regression", float(b))}
    if kind == "modular_addition":
        p = int(modulus)
        r, a = sum(instance) % p, instance[0]
        out = {"residue": ("classification", r)}
        for k in FOURIER_KS:
            if k > p // 2:
                break
            for name, v in (("sum", r), ("a", a)):
                out[f"cos_{k}_{name}"] = ("regression", math.cos(2 * math.pi * k * v / p))
                out[f"sin_{k}_{name}"] = ("regression", math.sin(2 * math.pi * k * v / p))
        return out
    return {}


def probe_rows(states: np.ndarray, items, tasks: dict[str, dict], instances: list[tuple[int, ...]],
               settings: ProbeSettings) -> list[dict]:
    """One row per task, feature and layer; `states` is [layers + 1, items, d]."""
    rows = []
    for task in sorted({it.task for it in items}):
        info = tasks[task]
        mine = [i for i, it in enumerate(items) if it.task == task]
        feats = [features(info["kind"], instances[i], info["complexity"]) for i in mine]
        if not feats or not feats[0]:
            continue
        train = np.array([items[i].split == "seen" for i in mine])
        for name, (kind, _) in feats[0].items():
            y = np.array([f[name][1] for f in feats])
            fit_part, validation_part = validation_split(int(train.sum()), settings.seed)
            for layer in range(states.shape[0]):
                X = states[layer, mine]
                fit = fit_probe(X[train], y[train], X[~train], y[~train], kind, settings.seed, settings.alpha, settings.C)
                X_train, y_train = X[train], y[train]
                check = fit_probe(X_train[fit_part], y_train[fit_part], X_train[validation_part], y_train[validation_part],
                                  kind, settings.seed, settings.alpha, settings.C, control=False)
                fit.update(validation=check["score"], n_validation=check["n_test"])
                rows.append({"task": task, "kind": info["kind"], "complexity": info["complexity"], "rate": info["rate"],
                             "feature": name, "probe": "logistic" if kind == "classification" else "ridge",
                             "metric": "accuracy" if kind == "classification" else "r2", "layer": layer, **fit})
    return rows


def validation_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) indices of n training rows: a seeded VALIDATION_SHARE of them for choosing the layer."""
    order = np.random.default_rng([seed, 11]).permutation(n)
    held = max(1, int(round(n * VALIDATION_SHARE))) if n >= 5 else 0
    return np.sort(order[held:]), np.sort(order[:held])


def best_layers(rows: list[dict]) -> dict[tuple, dict]:
    """(model, task, feature, step) -> the row of the layer with the highest validation score (ties: the
    lower layer); its `score` is the test score reported for that step."""
    best: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: r["layer"]):
        if r.get("validation") is None or r.get("score") is None:
            continue
        key = (r["model"], r["task"], r["feature"], r["step"])
        if key not in best or r["validation"] > best[key]["validation"]:
            best[key] = r
    return best


def analyze_probes(path: Path, build_dir: Path, out_dir: Path | None = None, seen: int = 400, held_out: int = 200,
                   seed: int = 0, device: str = "cpu", batch_size: int = 64, alpha: float = 1.0, C: float = 1.0,
                   plot_with: list[Path] | None = None) -> AnalysisReport:
    path, build_dir = Path(path), Path(build_dir)
    out_dir = Path(out_dir) if out_dir else default_out(path, "probe")
    settings = ProbeSettings(str(build_dir.resolve()), seen, held_out, seed, alpha, C)
    cache: dict = {}

    def analyze(loaded, checkpoint, meta):
        if not cache:  # the eval set, built once and only when a checkpoint needs it
            items = [it for it in build_eval_set(build_dir, seen, held_out, seed) if it.format == "training"]
            view = BuildView.load(build_dir)
            cache.update(items=items, tasks=task_info(build_dir),
                         instances=[view.encoders[it.spec].task.instance(it.item) for it in items])
        states = hidden_states_at_last(loaded, [it.context for it in cache["items"]], batch_size)
        return probe_rows(states, cache["items"], cache["tasks"], cache["instances"], settings)

    report = run_over_checkpoints(path, build_dir, out_dir, asdict(settings), "probe-config.json", analyze, device)
    write_outputs(out_dir, plot_with or [])
    return report


def write_outputs(out_dir: Path, plot_with: list[Path]) -> list[Path]:
    rows = read_jsonl_folder(out_dir)
    written = [write_csv(out_dir / "probe.csv", sorted(rows, key=_row_key), COLUMNS)]
    everything = rows + [r for other in plot_with for r in read_jsonl_folder(other)]
    if everything:
        written += plot_probes(everything, out_dir)
    return written


def _row_key(r: dict):
    return (r.get("params") or 0, r["model"], r["step"], r["task"], r["feature"], r["layer"])


PLOTTED = {"comparison": ["outcome", "a_value", "b_value"],
           "modular_addition": ["residue", "fourier_sum", "fourier_a"]}


def _panel_rows(rows: list[dict], task: str, feature: str) -> list[dict]:
    """Rows of one panel; `fourier_sum`/`fourier_a` average R^2 over the cos/sin features of every k."""
    mine = [r for r in rows if r["task"] == task]
    if not feature.startswith("fourier_"):
        return [r for r in mine if r["feature"] == feature]
    suffix = "_" + feature.split("_", 1)[1]
    groups: dict[tuple, list] = {}
    for r in mine:
        if r["feature"].endswith(suffix) and r["feature"][:4] in ("cos_", "sin_"):
            groups.setdefault((r["model"], r["step"], r["layer"]), []).append(r)
    out = []
    for (model, step, layer), members in groups.items():
        def mean(key):
            values = [m[key] for m in members if m[key] is not None]
            return float(np.mean(values)) if values else None
        out.append({**members[0], "feature": feature, "score": mean("score"), "control": mean("control"),
                    "baseline": mean("baseline"), "validation": mean("validation")})
    return out


def plot_probes(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import colors_for as _colors, save_figure as _save

    kinds = {r["task"]: r["kind"] for r in rows}
    panels = [(t, f) for t in sorted(kinds) for f in PLOTTED.get(kinds[t], [])]
    panels = [(t, f, _panel_rows(rows, t, f)) for t, f in panels]
    panels = [p for p in panels if p[2]]
    params = {r["model"]: r.get("params") or 0 for r in rows}
    models = sorted(params, key=lambda m: (params[m], m))
    colors = _colors(models)
    written = []
    for target, by_layer in ((out_dir / "probe_vs_step.png", False), (out_dir / "probe_by_layer.png", True)):
        columns = max(1, min(3, len(panels)))
        n_rows = max(1, -(-len(panels) // columns))
        fig, axes = plt.subplots(n_rows, columns, figsize=(4.6 * columns, 3.4 * n_rows + 0.4), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (task, feature, prow) in zip(axes.flat, panels):
            for model in models:
                mine = [r for r in prow if r["model"] == model and r["score"] is not None]
                if not mine:
                    continue
                if by_layer:
                    last = max(r["step"] for r in mine)
                    pts = sorted((r["layer"], r["score"], r["control"]) for r in mine if r["step"] == last)
                    label = f"{model} (step {last})"
                else:  # at each step, the layer chosen on validation: its test score and control
                    pts = sorted((r["step"], r["score"], r["control"]) for r in best_layers(mine).values())
                    label = model
                    if not pts:
                        continue
                x, y, c = zip(*pts)
                ax.plot(x, y, "-o", ms=3, color=colors[model], label=label)
                cx = [a for a, b in zip(x, c) if b is not None]
                if cx:
                    ax.plot(cx, [b for b in c if b is not None], ":", color=colors[model], alpha=0.8)
            metric = prow[0]["metric"]
            ax.set(title=f"{task}: {feature}", xlabel="layer (0 = embeddings)" if by_layer else "training step",
                   ylabel="test accuracy" if metric == "accuracy" else "test R^2")
            if metric == "accuracy":
                ax.set_ylim(-0.02, 1.02)
            else:
                ax.set_ylim(max(-1.0, ax.get_ylim()[0]), 1.02)
            ax.grid(alpha=0.3)
        if panels:
            axes[0][0].legend(fontsize=7)
        fig.suptitle("Linear probes at the answer position, trained on seen and tested on held-out instances"
                     + (" (last step, per layer)" if by_layer else " (layer chosen on validation)")
                     + "; dotted: shuffled-label control")
        fig.tight_layout()
        written.append(_save(fig, target))
    return written
