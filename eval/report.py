"""`olmo-inject report RESULTS... --out DIR`: one table across runs and sizes, PNG plots and a one-page
summary (Markdown and HTML) from the per-checkpoint JSONL files that `olmo-inject eval` writes.

RESULTS are eval folders (with stepN.jsonl) or run folders that hold one (RUN/eval). Plots:
- accuracy_vs_tokens.png: ranked-choice accuracy against training tokens, one panel per task, one
  colour per model size, seen solid, pending dash-dotted, held-out dashed, chance dotted;
- memorization_vs_generalization.png: per modular-addition task (every task if there is none) and
  size, seen, pending and held-out accuracy over training with the seen/held-out gap shaded;
- answer_logprob.png: mean log-probability and mean rank of the right answer against step, per split
  (these move before accuracy does);
- retention.png: accuracy of seen instances against steps since their last exposure and against
  their number of exposures (all checkpoints pooled), per size, with n per bin;
- heatmap.png: final held-out accuracy relative to chance, (accuracy - chance) / (1 - chance), per model
  size (rows) and task rate (columns), with the raw accuracy, chance and n in each cell;
- dolma_loss.png: each run's training loss per step (RUN/metrics.jsonl, where the run has one) beside the Dolma
  validation loss of each checkpoint (see eval.run).

onset.csv (and a table on the summary page): per model and task, the grokking onset, the first evaluated
step at which held-out accuracy is at least halfway from chance to perfect ((accuracy - chance) / (1 - chance)
>= 0.5) and its 95% Wilson interval lies entirely above chance; empty when no evaluated step qualifies.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from inject.errors import InjectError

from .analysis import check_results_build, read_jsonl_folder, write_csv
from .plotting import colors_for as _colors
from .plotting import save_figure as _save
from .run import read_results, short_splits, summarize, write_table
from .score import wilson_interval

PLOTS = ["accuracy_vs_tokens.png", "memorization_vs_generalization.png", "answer_logprob.png", "retention.png",
         "heatmap.png", "dolma_loss.png"]
SPLIT_STYLE = {"seen": "-", "pending": "-.", "held_out": "--"}
ONSET_THRESHOLD = 0.5
ONSET_COLUMNS = ["model", "params", "task", "kind", "complexity", "rate", "onset_step", "onset_tokens", "accuracy",
                 "chance", "n", "last_step", "last_normalized"]


def results_folder(path: Path) -> Path:
    path = Path(path)
    for candidate in (path, path / "eval"):
        if candidate.is_dir() and any(candidate.glob("step*.jsonl")):
            return candidate
    raise InjectError(f"{path}: no eval results (stepN.jsonl); run `olmo-inject eval` first")


def load_rows(paths: list[Path]) -> list[dict]:
    """Every result row of every folder."""
    rows = []
    for path in paths:
        folder = results_folder(path)
        check_results_build(folder)
        for row in read_results(folder):
            row.setdefault("run", folder.parent.name)
            row.setdefault("model", row["run"])
            row.setdefault("format", "training")
            rows.append(row)
    return tell_runs_apart(rows)


def tell_runs_apart(rows: list[dict]) -> list[dict]:
    """`model` names the series in plots, so two runs of one model config (say two seeds of `tiny`)
    become `tiny (run-a)` and `tiny (run-b)`."""
    runs_of = defaultdict(set)
    for row in rows:
        runs_of[row["model"]].add(row["run"])
    for row in rows:
        if len(runs_of[row["model"]]) > 1:
            row["model"] = f"{row['model']} ({row['run']})"
    return rows


def mechanism_plots(paths: list[Path], out: Path) -> list[Path]:
    """The probe and interference plots over every run that has those results (RUN/probe, RUN/interference)."""
    from .interference import plot_interference
    from .probe import plot_probes

    written = []
    for name, plot in (("probe", plot_probes), ("interference", plot_interference)):
        folders = [results_folder(p).parent / name for p in paths]
        rows = [r for folder in folders if folder.is_dir() for r in read_jsonl_folder(folder)]
        if rows:
            written += plot(tell_runs_apart(rows), out)
    return written


def make_report(paths: list[Path], out: Path) -> list[Path]:
    """Write results.csv, the PNGs and summary.md/summary.html into `out`; return the written files."""
    import matplotlib

    matplotlib.use("Agg")
    everything = load_rows(paths)
    rows = [r for r in everything if r["format"] == "training"]
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(everything)
    written = [write_table(table, out / "results.csv")]
    main = [r for r in table if r["exposures"] == "all" and r["format"] == "training"]
    onsets = onset_table(main)
    written.append(write_csv(out / "onset.csv", onsets, ONSET_COLUMNS))
    written.append(plot_accuracy_vs_tokens(main, out / PLOTS[0]))
    written.append(plot_memorization(main, out / PLOTS[1]))
    written.append(plot_answer_logprob(main, out / PLOTS[2]))
    written.append(plot_retention(rows, out / PLOTS[3]))
    written.append(plot_heatmap(main, out / PLOTS[4]))
    written.append(plot_losses(main, training_losses(paths, everything), out / PLOTS[5]))
    mechanism = mechanism_plots(paths, out)
    written.extend(mechanism)
    written.extend(write_summary_page(table, out, [p.name for p in mechanism], onsets))
    return written


def onset_table(table: list[dict], threshold: float = ONSET_THRESHOLD) -> list[dict]:
    """Per model and task (whole held-out split, training format): the first evaluated step whose held-out
    accuracy is at least `threshold` of the way from chance to perfect and whose 95% Wilson interval lies
    above chance (see the module docstring); onset_step None when no evaluated step qualifies."""
    series = defaultdict(list)
    for r in table:
        if r["split"] == "held_out" and r["exposures"] == "all" and r.get("format", "training") == "training" and r["n"]:
            series[(r["model"], r["task"])].append(r)
    out = []
    for (model, task), rows in sorted(series.items(), key=lambda kv: (kv[1][0].get("params") or 0, kv[0])):
        rows = sorted(rows, key=lambda r: r["step"])
        onset = next((r for r in rows if r["normalized"] >= threshold and r["ci_low"] > r["chance"]), None)
        last = rows[-1]
        out.append({"model": model, "params": last.get("params"), "task": task, "kind": last.get("kind"),
                    "complexity": last.get("complexity"), "rate": last.get("rate"),
                    "onset_step": onset["step"] if onset else None, "onset_tokens": onset["tokens"] if onset else None,
                    "accuracy": onset["accuracy"] if onset else None, "chance": last["chance"],
                    "n": onset["n"] if onset else None, "last_step": last["step"], "last_normalized": last["normalized"]})
    return out


def _models(table: list[dict]) -> list[str]:
    """Model names from the smallest to the largest."""
    params = {r["model"]: r["params"] or 0 for r in table}
    return sorted(params, key=lambda m: (params[m], m))


def _curve(table, model, task, split):
    points = sorted((r["tokens"], r["step"], r["accuracy"], r["ci_low"], r["ci_high"]) for r in table
                    if r["model"] == model and r["task"] == task and r["split"] == split and r["n"])
    return [np.array(c) for c in zip(*points)] if points else None


def _chance(ax, table: list[dict], task: str) -> None:
    """A dotted line at the accuracy of guessing among the task's candidates."""
    chance = next((r.get("chance") for r in table if r["task"] == task and r.get("chance") is not None), None)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")


def _task_label(table: list[dict], task: str) -> str:
    row = next(r for r in table if r["task"] == task)
    return f"{task} ({row['rate']:.3g}/batch)" if row.get("rate") is not None else task


def plot_accuracy_vs_tokens(table: list[dict], target: Path) -> Path:
    import matplotlib.pyplot as plt

    tasks, models = sorted({r["task"] for r in table}), _models(table)
    colors = _colors(models)
    from matplotlib.ticker import EngFormatter

    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        ax.xaxis.set_major_formatter(EngFormatter())
        for model in models:
            for split, style in SPLIT_STYLE.items():
                curve = _curve(table, model, task, split)
                if curve is not None:
                    tokens, _, acc, low, high = curve
                    ax.plot(tokens, acc, style, marker="o", ms=3, color=colors[model], label=f"{model} {split}")
                    ax.fill_between(tokens, low, high, color=colors[model], alpha=0.12)
        _chance(ax, table, task)
        ax.set(title=_task_label(table, task), xlabel="training tokens", ylabel="ranked-choice accuracy", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Accuracy against training tokens (solid: seen, trained on by then; dash-dot: pending, injected "
                 "later; dashed: held-out; dotted: chance)")
    fig.tight_layout()
    return _save(fig, target)


def plot_memorization(table: list[dict], target: Path) -> Path:
    import matplotlib.pyplot as plt

    kinds = {r["task"]: r.get("kind") for r in table}
    tasks = sorted(t for t, k in kinds.items() if k == "modular_addition") or sorted(kinds)
    models = _models(table)
    fig, axes = plt.subplots(len(tasks), len(models), figsize=(3.6 * len(models), 3.0 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, model in enumerate(models):
            ax = axes[row][col]
            seen, held = _curve(table, model, task, "seen"), _curve(table, model, task, "held_out")
            pending = _curve(table, model, task, "pending")
            if seen is not None:
                ax.plot(seen[1], seen[2], "-o", ms=3, label="seen (memorized)", color="tab:blue")
            if pending is not None:
                ax.plot(pending[1], pending[2], "-.o", ms=3, label="pending (not yet injected)", color="tab:green")
            if held is not None:
                ax.plot(held[1], held[2], "--o", ms=3, label="held-out (rule)", color="tab:orange")
            if seen is not None and held is not None:
                steps = np.intersect1d(seen[1], held[1])
                if len(steps):
                    ax.fill_between(steps, held[2][np.isin(held[1], steps)], seen[2][np.isin(seen[1], steps)],
                                    color="tab:blue", alpha=0.1)
            _chance(ax, table, task)
            ax.set(title=f"{model}: {task}", xlabel="training step", ylabel="accuracy", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("From memorization to generalization\n(shaded: seen minus held-out)")
    fig.tight_layout()
    return _save(fig, target)


def _binned_accuracy(rows: list[dict], key, edges: list[int]):
    """(bin positions, accuracy, low, high, n) of rows grouped by key(row) into [edges[i], edges[i+1])."""
    positions, acc, low, high, counts = [], [], [], [], []
    for position, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        members = [r for r in rows if key(r) is not None and a <= key(r) < b]
        if not members:
            continue
        hits = sum(r["correct"] for r in members)
        lo, hi = wilson_interval(hits, len(members))
        positions.append(position)
        acc.append(hits / len(members))
        low.append(lo)
        high.append(hi)
        counts.append(len(members))
    return positions, np.array(acc), np.array(low), np.array(high), counts


def _bin_labels(edges: list[int]) -> list[str]:
    return [f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]


def plot_retention(rows: list[dict], target: Path) -> Path:
    import matplotlib.pyplot as plt

    seen = [r for r in rows if r["split"] == "seen" and r["exposures"] > 0]
    models = _models([{"model": r["model"], "params": r.get("params")} for r in rows])
    colors = _colors(models)
    longest = max([r["steps_since_last"] for r in seen] + [1])
    gap_edges = sorted({0, 1, *[int(2**k) for k in range(1, int(np.log2(longest)) + 2)]})
    most = max([r["exposures"] for r in seen] + [1])
    count_edges = sorted({1, 2, *[int(2**k) for k in range(1, int(np.log2(most)) + 2)]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for model in models:
        mine = [r for r in seen if r["model"] == model]
        for ax, key, edges in ((axes[0], lambda r: r["steps_since_last"], gap_edges),
                               (axes[1], lambda r: r["exposures"], count_edges)):
            x, acc, low, high, counts = _binned_accuracy(mine, key, edges)
            if x:
                ax.errorbar(x, acc, yerr=np.clip([acc - low, high - acc], 0, None), marker="o", capsize=3,
                            color=colors[model], label=model)
                for xi, yi, n in zip(x, high, counts):  # n per bin, above its interval
                    ax.annotate(f"n={n}", (xi, yi), textcoords="offset points", xytext=(0, 3), ha="center",
                                fontsize=6, color=colors[model])
    for ax, edges in ((axes[0], gap_edges), (axes[1], count_edges)):
        ax.set_xticks(range(len(edges) - 1), _bin_labels(edges), rotation=45, fontsize=7)
    axes[0].set(title="Retention: accuracy against time since the last exposure",
                xlabel="steps since last exposure (bins)", ylabel="accuracy on seen instances", ylim=(-0.02, 1.02))
    axes[1].set(title="Accuracy against number of exposures", xlabel="exposures before the checkpoint (bins)",
                ylabel="accuracy on seen instances", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, target)


def final_rows(table: list[dict]) -> list[dict]:
    """Each model's rows at its last evaluated step."""
    last = defaultdict(int)
    for r in table:
        last[r["model"]] = max(last[r["model"]], r["step"])
    return [r for r in table if r["step"] == last[r["model"]]]


def plot_heatmap(table: list[dict], target: Path) -> Path:
    """Final held-out accuracy relative to chance, (accuracy - chance) / (1 - chance); each cell also shows the
    raw accuracy, chance and n."""
    import matplotlib.pyplot as plt

    final = [r for r in final_rows(table) if r["split"] == "held_out" and r["n"]]
    models = _models(final) or _models(table)
    columns = sorted({(r["rate"] or 0, r["task"]) for r in final}, reverse=True)
    grid = np.full((len(models), max(1, len(columns))), np.nan)
    cells = {}
    for r in final:
        i, j = models.index(r["model"]), columns.index((r["rate"] or 0, r["task"]))
        grid[i, j] = r["normalized"]
        cells[(i, j)] = f"{r['normalized']:+.2f}\nacc {r['accuracy']:.2f} / {r['chance']:.2f}\nn={r['n']}"
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 1.6 * len(columns)), max(3.4, 1.6 + 0.8 * len(models))))
    image = ax.imshow(grid, vmin=-1, vmax=1, cmap="RdBu", aspect="auto")
    for (i, j), text in cells.items():
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if abs(grid[i, j]) > 0.6 else "black")
    ax.set_xticks(range(len(columns)), [f"{task}\n{rate:.3g}/batch" for rate, task in columns], fontsize=7)
    ax.set_yticks(range(len(models)), models)
    ax.set(xlabel="task and injection rate (examples per batch)", ylabel="model size",
           title="Final held-out accuracy vs chance: (acc - chance) / (1 - chance)\n"
                 "0 = chance, 1 = perfect; cells: that, acc / chance, n")
    fig.colorbar(image, ax=ax, label="normalized accuracy")
    fig.tight_layout()
    return _save(fig, target)


def plot_answer_logprob(table: list[dict], target: Path) -> Path:
    """Mean log-probability (top row) and mean rank (bottom row) of the right answer against step, per split."""
    import matplotlib.pyplot as plt

    tasks, models = sorted({r["task"] for r in table}), _models(table)
    colors = _colors(models)
    fig, axes = plt.subplots(2, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 6.6), squeeze=False)
    for col, task in enumerate(tasks):
        for row, (key, label) in enumerate((("mean_logprob", "log p(right answer)"), ("mean_rank", "rank of right answer"))):
            ax = axes[row][col]
            for model in models:
                for split, style in SPLIT_STYLE.items():
                    points = sorted((r["step"], r[key]) for r in table if r["model"] == model and r["task"] == task
                                    and r["split"] == split and r["n"])
                    if points:
                        x, y = zip(*points)
                        ax.plot(x, y, style, marker="o", ms=3, color=colors[model], label=f"{model} {split}")
            ax.set(title=task if row == 0 else "", xlabel="training step", ylabel=label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("The right answer's log-probability and rank (solid: seen, dash-dot: pending, dashed: held-out)")
    fig.tight_layout()
    return _save(fig, target)


def training_losses(paths: list[Path], rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per model (as the plots name it), (step, training loss) from its run's RUN/metrics.jsonl, where it has one."""
    label = {r["run"]: r["model"] for r in rows}
    losses = {}
    for path in paths:
        run = results_folder(path).parent
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and run.name in label:
            points = [(r["step"], r["loss"]) for r in map(json.loads, metrics.read_text().splitlines())
                      if r.get("loss") is not None]
            losses[label[run.name]] = points
    return losses


def plot_losses(table: list[dict], training: dict[str, list[tuple[int, float]]], target: Path) -> Path:
    """Left: each run's training loss per step (RUN/metrics.jsonl, a 10-step moving average over the raw
    curve). Right: the Dolma validation loss per checkpoint."""
    import matplotlib.pyplot as plt

    models = _models(table)
    colors = _colors(models)
    fig, (left, ax) = plt.subplots(1, 2, figsize=(11.0, 3.8))
    for model, points in training.items():
        steps, loss = np.array(points, dtype=float).T if points else (np.zeros(0), np.zeros(0))
        left.plot(steps, loss, color=colors.get(model), alpha=0.25, lw=0.8)
        if len(loss) >= 10:
            left.plot(steps[9:], np.convolve(loss, np.ones(10) / 10, "valid"), color=colors.get(model), label=model)
    if not training:
        left.text(0.5, 0.5, "no RUN/metrics.jsonl in these runs", ha="center", transform=left.transAxes)
    left.set(title="training loss (RUN/metrics.jsonl)", xlabel="training step", ylabel="cross-entropy (nats)")
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=7)
    for model in models:
        points = sorted({(r["step"], r["dolma_loss"]) for r in table if r["model"] == model and r.get("dolma_loss") is not None})
        if points:
            x, y = zip(*points)
            ax.plot(x, y, "-o", ms=3, color=colors[model], label=model)
    if not any(r.get("dolma_loss") is not None for r in table):
        ax.text(0.5, 0.5, "no Dolma loss in these results (evaluated before it was measured)", ha="center",
                transform=ax.transAxes)
    ax.set(title="Dolma validation loss (instances no planned batch holds)", xlabel="training step",
           ylabel="mean next-token loss (nats)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, target)


def _fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def write_summary_page(table: list[dict], out: Path, mechanism: list[str] = (), onsets: list[dict] = ()) -> list[Path]:
    """summary.md and summary.html: the final accuracies, the onset table, the plots and any mechanism plots."""
    final = [r for r in final_rows(table) if r["exposures"] == "all"]
    header = ["model", "step", "task", "rate", "split", "format", "n", "accuracy", "95% CI", "chance", "acc - chance",
              "normalized", "calibrated", "greedy exact"]
    body = [[r["model"], r["step"], r["task"], _fmt(r["rate"], ".3g"), r["split"], r["format"],
             f"{r['n']} of {r['requested']}" if r.get("requested") is not None and r["n"] < r["requested"] else r["n"],
             _fmt(r["accuracy"]), f"{r['ci_low']:.3f}-{r['ci_high']:.3f}" if r["n"] else "", _fmt(r["chance"]),
             _fmt(r["above_chance"], "+.3f"), _fmt(r["normalized"], "+.3f"), _fmt(r.get("calibrated_accuracy")),
             _fmt(r["greedy_exact"])] for r in final]
    models = sorted({r["model"] for r in table})
    short = short_splits(table)
    intro = (f"{len(models)} model(s): {', '.join(models)}; steps evaluated: "
             f"{', '.join(str(s) for s in sorted({r['step'] for r in table}))}. Accuracy is ranked choice over each "
             "task's answer candidates; intervals are 95% Wilson intervals. seen: instances injected at or before "
             "the checkpoint's step (every row exposed at least once); pending: instances the build injects only "
             "after that step (not yet trained on: the control); held-out: never injected by any task on the same "
             "instance space. normalized = (accuracy - chance) / (1 - chance). calibrated: ranked choice after "
             "subtracting each candidate's log-probability under the content-free prompt. "
             "Every checkpoint's numbers are in results.csv.")
    notes = [(f"{len(short)} split cell(s) over all steps have fewer rows than asked (the build had fewer "
              "instances of that split at that step; such n is shown as 'n of asked' and `requested` in results.csv).")
             if short else "Every split has the number of rows asked for."]
    onset_header = ["model", "task", "rate", "onset step", "onset tokens", "held-out accuracy", "chance", "n",
                    "last step", "last normalized"]
    onset_body = [[o["model"], o["task"], _fmt(o["rate"], ".3g"), o["onset_step"] if o["onset_step"] is not None else "not reached",
                   o["onset_tokens"] or "", _fmt(o["accuracy"]), _fmt(o["chance"]), o["n"] or "", o["last_step"],
                   _fmt(o["last_normalized"], "+.3f")] for o in onsets]
    onset_intro = (f"First evaluated step whose held-out accuracy is at least {ONSET_THRESHOLD:g} of the way from "
                   "chance to perfect and whose 95% interval lies above chance.")

    def md_table(head, rows):
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
               ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]

    def html_table(head, rows):
        return (["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
                + ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
                + ["</table>"])

    md = ["# olmo-inject report", "", intro, "", *notes, "", "## Final checkpoint of each model", ""]
    md += md_table(header, body)
    md += ["", "## Grokking onset (held-out)", "", onset_intro, ""] + md_table(onset_header, onset_body)
    md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in PLOTS]
    if mechanism:
        md += ["", "## Mechanism analyses (`olmo-inject analyze`)", ""] + [f"![{p}]({p})" for p in mechanism]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>olmo-inject report</title>",
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}</style></head><body>",
            "<h1>olmo-inject report</h1>", f"<p>{html.escape(intro)}</p>"] + [f"<p>{html.escape(n)}</p>" for n in notes]
    page += ["<h2>Final checkpoint of each model</h2>"] + html_table(header, body)
    page += ["<h2>Grokking onset (held-out)</h2>", f"<p>{html.escape(onset_intro)}</p>"] + html_table(onset_header, onset_body)
    page += ["<h2>Plots</h2>"] + [f"<p><img src='{p}' alt='{p}'></p>" for p in PLOTS]
    if mechanism:
        page += ["<h2>Mechanism analyses (olmo-inject analyze)</h2>"] + [f"<p><img src='{p}' alt='{p}'></p>" for p in mechanism]
    page += ["</body></html>"]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.html").write_text("\n".join(page) + "\n")
    return [out / "summary.md", out / "summary.html"]
