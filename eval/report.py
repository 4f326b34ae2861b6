"""`olmo-inject report RESULTS... --out DIR`: one table across runs and sizes, PNG plots and a one-page
summary (Markdown and HTML) from the per-checkpoint JSONL files that `olmo-inject eval` writes.

RESULTS are eval folders (with stepN.jsonl) or run folders that hold one (RUN/eval). Plots:
- accuracy_vs_tokens.png: ranked-choice accuracy against training tokens, one panel per task, one
  colour per model size, seen solid and held-out dashed;
- memorization_vs_generalization.png: per modular-addition task (every task if there is none) and
  size, seen and held-out accuracy over training with the gap between them shaded;
- retention.png: accuracy of seen instances against steps since their last exposure and against
  their number of exposures (all checkpoints pooled), per size;
- heatmap.png: final held-out accuracy per model size (rows) and task rate (columns).
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

import numpy as np

from inject.errors import InjectError

from .analysis import check_results_build
from .run import read_results, summarize, write_table
from .score import wilson_interval

PLOTS = ["accuracy_vs_tokens.png", "memorization_vs_generalization.png", "retention.png", "heatmap.png"]


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
    from .analysis import read_jsonl_folder
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
    written.append(plot_accuracy_vs_tokens(main, out / PLOTS[0]))
    written.append(plot_memorization(main, out / PLOTS[1]))
    written.append(plot_retention(rows, out / PLOTS[2]))
    written.append(plot_heatmap(main, out / PLOTS[3]))
    mechanism = mechanism_plots(paths, out)
    written.extend(mechanism)
    written.extend(write_summary_page(table, out, [p.name for p in mechanism]))
    return written


def _models(table: list[dict]) -> list[str]:
    """Model names from the smallest to the largest."""
    params = {r["model"]: r["params"] or 0 for r in table}
    return sorted(params, key=lambda m: (params[m], m))


def _colors(models: list[str]) -> dict[str, tuple]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    return {m: cmap(i / max(1, len(models) - 1) * 0.9) for i, m in enumerate(models)}


def _curve(table, model, task, split):
    points = sorted((r["tokens"], r["step"], r["accuracy"], r["ci_low"], r["ci_high"]) for r in table
                    if r["model"] == model and r["task"] == task and r["split"] == split)
    return [np.array(c) for c in zip(*points)] if points else None


def _chance(ax, table: list[dict], task: str) -> None:
    """A dotted line at the accuracy of guessing among the task's candidates."""
    chance = next((r.get("chance") for r in table if r["task"] == task and r.get("chance") is not None), None)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")


def _save(fig, target: Path) -> Path:
    tmp = target.with_name(target.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    tmp.replace(target)
    return target


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
            for split, style in (("seen", "-"), ("held_out", "--")):
                curve = _curve(table, model, task, split)
                if curve is not None:
                    tokens, _, acc, low, high = curve
                    ax.plot(tokens, acc, style, marker="o", ms=3, color=colors[model], label=f"{model} {split}")
                    ax.fill_between(tokens, low, high, color=colors[model], alpha=0.12)
        _chance(ax, table, task)
        ax.set(title=_task_label(table, task), xlabel="training tokens", ylabel="ranked-choice accuracy", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Accuracy against training tokens (solid: seen instances, dashed: held-out, dotted: chance)")
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
            if seen is not None:
                ax.plot(seen[1], seen[2], "-o", ms=3, label="seen (memorized)", color="tab:blue")
            if held is not None:
                ax.plot(held[1], held[2], "--o", ms=3, label="held-out (rule)", color="tab:orange")
            if seen is not None and held is not None and len(seen[1]) == len(held[1]):
                ax.fill_between(seen[1], held[2], seen[2], color="tab:blue", alpha=0.1)
            _chance(ax, table, task)
            ax.set(title=f"{model}: {task}", xlabel="training step", ylabel="accuracy", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("From memorization to generalization (shaded: seen minus held-out)")
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
            x, acc, low, high, _ = _binned_accuracy(mine, key, edges)
            if x:
                ax.errorbar(x, acc, yerr=np.clip([acc - low, high - acc], 0, None), marker="o", capsize=3,
                            color=colors[model], label=model)
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
    import matplotlib.pyplot as plt

    final = [r for r in final_rows(table) if r["split"] == "held_out"]
    models = _models(final) or _models(table)
    columns = sorted({(r["rate"] or 0, r["task"]) for r in final}, reverse=True)
    grid = np.full((len(models), max(1, len(columns))), np.nan)
    for r in final:
        grid[models.index(r["model"]), columns.index((r["rate"] or 0, r["task"]))] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 1.4 * len(columns)), max(3.4, 1.6 + 0.6 * len(models))))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(columns)), [f"{task}\n{rate:.3g}/batch" for rate, task in columns], fontsize=7)
    ax.set_yticks(range(len(models)), models)
    ax.set(xlabel="task and injection rate (examples per batch)", ylabel="model size",
           title="Final held-out accuracy")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    return _save(fig, target)


def write_summary_page(table: list[dict], out: Path, mechanism: list[str] = ()) -> list[Path]:
    """summary.md and summary.html: the final accuracies, the four plots and any mechanism plots on one page."""
    final = [r for r in final_rows(table) if r["exposures"] == "all"]
    header = ["model", "step", "task", "rate", "split", "format", "n", "accuracy", "95% CI", "greedy exact"]
    body = [[r["model"], r["step"], r["task"], f"{r['rate']:.3g}" if r["rate"] is not None else "", r["split"], r["format"],
             r["n"], f"{r['accuracy']:.3f}", f"{r['ci_low']:.3f}-{r['ci_high']:.3f}", f"{r['greedy_exact']:.3f}"]
            for r in final]
    models = sorted({r["model"] for r in table})
    intro = (f"{len(models)} model(s): {', '.join(models)}; steps evaluated: "
             f"{', '.join(str(s) for s in sorted({r['step'] for r in table}))}. Accuracy is ranked choice over each "
             "task's answer candidates; intervals are 95% Wilson intervals. Every checkpoint's numbers are in results.csv.")
    md = ["# olmo-inject report", "", intro, "", "## Final checkpoint of each model", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in PLOTS]
    if mechanism:
        md += ["", "## Mechanism analyses (`olmo-inject analyze`)", ""] + [f"![{p}]({p})" for p in mechanism]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>olmo-inject report</title>",
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}</style></head><body>",
            "<h1>olmo-inject report</h1>", f"<p>{html.escape(intro)}</p>", "<h2>Final checkpoint of each model</h2>",
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    page += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body]
    page += ["</table><h2>Plots</h2>"] + [f"<p><img src='{p}' alt='{p}'></p>" for p in PLOTS]
    if mechanism:
        page += ["<h2>Mechanism analyses (olmo-inject analyze)</h2>"] + [f"<p><img src='{p}' alt='{p}'></p>" for p in mechanism]
    page += ["</body></html>"]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.html").write_text("\n".join(page) + "\n")
    return [out / "summary.md", out / "summary.html"]
