"""`olmo-inject plan`: what a build config will inject, per task and per batch, before any work.

Counts per step are exact (they are the build's own schedules); token figures use each task's mean
example length over a sample of its seen pool (exact for `tokens` encoding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import BuildConfig
from .injection import make_specs
from .order import FIRST_EPOCH
from .sources import expand_inputs, open_token_file, source_kind


def mean_example_tokens(spec, sample: int = 256) -> float:
    """Tokens of one example with its closing EOS, averaged over a sample of the seen pool."""
    items = spec.first_seen(sample)
    templates = np.arange(len(items)) % len(spec.encoder.templates)
    return float(np.mean([len(x) + 1 for x in spec.encoder.encode_many(items, templates)]))


def corpus_instances(config: BuildConfig) -> int | None:
    """Instances the inputs give when they are all token files (exact, from sizes); else None."""
    files = expand_inputs(config.inputs, config.base_dir)
    if any(source_kind(f) != "tokens" for f in files):
        return None
    tokens = sum(len(open_token_file(f, config.input_dtype or config.token_dtype)) for f in files)
    return tokens // config.sequence_length


def describe_plan(config: BuildConfig) -> tuple[str, list]:
    t, L = config.training, config.sequence_length
    B = t.global_batch_size
    specs = make_specs(config)
    lines = [f"training: {t.steps:,} steps x {B} instances x {L} tokens = {t.steps * B * L:,} tokens "
             f"({t.trainer}'s order, seed {t.seed}, placement {config.placement})", ""]
    header = f"{'task':20s} {'kind':46s} {'rate/batch':>10s} {'tok/ex':>7s} {'tok/batch':>10s} {'share':>7s} {'examples':>11s} {'seen pool':>10s} {'exp/seen':>9s} {'held-out':>9s}"
    lines.append(header)
    per_step_tokens = np.zeros(t.steps)
    for s in specs:
        length = mean_example_tokens(s)
        total = int(s.counts.sum())
        per_step_tokens += s.counts * length
        sched = s.config.schedule
        kind = f"{s.task.describe()}, {s.config.encoding}, {sched.kind}"
        lines.append(f"{s.name:20s} {kind[:46]:46s} {total / t.steps:10.3g} {length:7.1f} {total / t.steps * length:10.1f} "
                     f"{total * length / (t.steps * B * L):7.3%} {total:11,} {s.seen_size:10,} {total / s.seen_size:9.3g} {len(s.held_out):9,}")
    instances_with = np.minimum(sum(s.counts for s in specs), B)
    peak = (per_step_tokens + instances_with).max() / (B * L)
    lines += ["", f"capacity: at most {peak:.3%} of a batch's tokens are injected (limit max_batch_share {config.max_batch_share:.0%})"]
    needed = t.steps * B
    N = corpus_instances(config)
    if N is None:
        lines.append(f"data: the run reads {needed:,} instances ({needed * L:,} tokens); the corpus must give at least that "
                     f"(epoch {FIRST_EPOCH[t.trainer]}); the build checks it after tokenizing")
    else:
        lines.append(f"data: the corpus gives {N:,} instances; the run uses {needed:,} = {needed / N:.3f} epochs"
                     + ("" if N >= needed else "  <-- more than one epoch: the build will refuse"))
    return "\n".join(lines), specs


def plot_plan(specs, steps: int, path: Path, stretch: int = 200) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stretch = min(stretch, steps)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, (a, b, title) in zip(axes, [(0, stretch, "first"), (steps - stretch, steps, "last")]):
        x = np.arange(a + 1, b + 1)
        for s in specs:
            ax.step(x, s.counts[a:b], where="mid", label=s.name)
        ax.set_title(f"{title} {stretch} steps")
        ax.set_xlabel("training step")
    axes[0].set_ylabel("examples in the batch")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
