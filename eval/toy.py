"""`olmo-inject toy`: the synthetic capacity experiment, no GPU needed.

A mixture of sparse-parity tasks (the "multitask sparse parity" setup of Michaud et al., *The
Quantization Model of Neural Scaling*) is learned by one-hidden-layer MLPs of several widths:

- the input is a one-hot task id followed by `bits` random bits; task k's label is the parity of a
  fixed random subset of `complexity[k]` of those bits (more bits: a harder task, needing more
  hidden units and more examples to find);
- task k is drawn with probability p_k proportional to k^-alpha (k = 1 ... tasks): a power law,
  from one common task to rare ones;
- every width is trained with Adam on the *same* stream of fresh samples (one seeded generator) and
  evaluated on the same held-out samples of every task during training.

All widths train side by side as one block-structured network (one matrix product for every
hidden unit of every model, a block-diagonal read-out, a summed loss). The models share no
parameter, and Adam works element by element, so each model's training is exactly what it would be
on its own; it just costs one forward/backward pass per step instead of one per width.

The spacing experiment takes one rare task (by default the rarest) out of the random mixture and
delivers it on a schedule instead: the same number of examples per step on average, as `rate`
examples every step, or `rate * gap` examples every `gap` steps. The rest of each batch is the same
stream of the other tasks under every schedule. Its held-out loss and accuracy are measured every
step, for a narrow and a wide model, so that what happens between bursts is visible. The narrow
model gets more initializations (it is cheap, and its effects are small against its seed-to-seed
spread); every table gives the spread over initializations, and the gaps are compared per
initialization (the same initial weights and data under every gap: a paired comparison).

The control: the narrow widths are also trained on the rarest task *alone* (its examples from the
same stream, at the same steps, the other tasks left out). A width that learns it alone but not in
the mixture drops it for lack of capacity shared with the other tasks (competition), not because it
cannot represent or find it.

Outputs (`run_toy`): config.json, results.csv, alone.csv, spacing.csv, toy.png and summary.md, written
to a temporary folder that is renamed to the output folder when complete. Same config: same CSV bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inject.errors import ConfigError, InjectError

RESULT_FIELDS = ["width", "repeat", "params", "task", "frequency", "complexity", "step", "examples_seen", "accuracy", "loss"]
ALONE_FIELDS = ["width", "repeat", "task", "step", "examples_seen", "accuracy", "loss"]
SPACING_FIELDS = ["gap", "burst", "width", "repeat", "step", "examples_seen", "steps_since_burst", "accuracy", "loss"]


@dataclass
class ToyConfig:
    """Settings of the toy experiment; the defaults take a few minutes on 2 CPU cores."""

    tasks: int = 8
    """Number of sparse-parity tasks in the mixture (task 1 is the most frequent)."""
    bits: int = 20
    """Random input bits per example, besides the one-hot task id."""
    complexity: tuple[int, ...] = (3, 2, 4, 3, 2, 4, 3, 3)
    """Relevant bits (parity arity) of each task, one per task: complexity crossed with frequency."""
    alpha: float = 1.5
    """Power-law exponent of the task frequencies: p_k proportional to k^-alpha."""
    widths: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
    """Hidden-layer widths of the models (one model per width)."""
    steps: int = 6000
    """Training steps of the capacity experiment."""
    batch_size: int = 256
    """Examples per step."""
    lr: float = 3e-3
    """Adam learning rate (every model)."""
    eval_every: int = 250
    """Evaluate every model on every task every this many steps (and at the last step)."""
    eval_samples: int = 1000
    """Held-out samples per task for evaluation."""
    repeats: int = 3
    """Models per width, each with its own initial weights (same data); tables give mean ± std over them."""
    seed: int = 0
    """Seed of the task subsets, the initial weights, the training stream and the held-out samples."""
    threads: int = 1
    """torch CPU threads while the experiment runs (results are reproducible for a fixed value)."""
    spacing_widths: tuple[int, ...] = (16, 512)
    """Widths (narrow, wide) trained in the spacing experiment; empty: skip it."""
    spacing_repeats: tuple[int, ...] = (12, 2)
    """Initializations per spacing width, one value per width (empty: `repeats` each): many of the narrow
    model, whose effects are small against its seed-to-seed spread and which costs little; two of the wide
    one, which saturates (accuracy 1.0 under every schedule) and costs most of the run."""
    spacing_gaps: tuple[int, ...] = (1, 10, 50)
    """Steps between deliveries of the spacing task: 1 is every step; each gap is one training run."""
    spacing_task: int = 0
    """Task (1-based) delivered on the spacing schedule; 0: the rarest of the least complex tasks (one
    that a narrow model can learn, so that there is a signal to keep or lose between deliveries)."""
    spacing_rate: float = 4.0
    """Mean examples per step of the spacing task (about 1.6% of a 256-example batch); 0: its mixture
    rate, p_k * batch_size."""
    spacing_steps: int = 6000
    """Training steps of each spacing run."""
    spacing_eval_samples: int = 512
    """Held-out samples of the spacing task, evaluated every step."""
    alone_widths: tuple[int, ...] = (8, 16, 32, 64)
    """Widths also trained on the rarest task alone (its examples from the capacity run's stream, the other
    tasks left out; the same initial weights): the control that tells competition from inability. Empty: skip."""

    def validate(self) -> ToyConfig:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"toy config: {name}: {message} (got {getattr(self, name)!r})")

        for name in ("tasks", "bits", "repeats", "steps", "batch_size", "eval_every", "eval_samples", "threads",
                     "spacing_steps", "spacing_eval_samples"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "must be a positive integer")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "must be a non-negative integer")
        need(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0, "alpha",
             "must be a finite number >= 0")
        need(isinstance(self.lr, (int, float)) and 0 < self.lr < 10, "lr", "must be a number in (0, 10)")
        need(len(self.complexity) == self.tasks, "complexity", f"needs one value per task ({self.tasks})")
        need(all(isinstance(c, int) and 1 <= c <= self.bits for c in self.complexity), "complexity",
             f"every value must be an integer from 1 to bits ({self.bits})")
        need(len(self.widths) >= 1 and all(isinstance(w, int) and w >= 1 for w in self.widths), "widths",
             "must be one or more positive integers")
        need(len(set(self.widths)) == len(self.widths), "widths", "must not repeat")
        need(all(isinstance(w, int) and w >= 1 for w in self.spacing_widths), "spacing_widths",
             "must be positive integers")
        need(len(set(self.spacing_widths)) == len(self.spacing_widths), "spacing_widths", "must not repeat")
        need(all(isinstance(r, int) and r >= 1 for r in self.spacing_repeats), "spacing_repeats", "must be positive integers")
        need(not self.spacing_widths or not self.spacing_repeats or len(self.spacing_repeats) == len(self.spacing_widths),
             "spacing_repeats",
             f"needs one value per spacing width ({len(self.spacing_widths)}), or none")
        need(all(isinstance(w, int) and w >= 1 for w in self.alone_widths), "alone_widths", "must be positive integers")
        need(len(set(self.alone_widths)) == len(self.alone_widths), "alone_widths", "must not repeat")
        need(all(isinstance(g, int) and g >= 1 for g in self.spacing_gaps), "spacing_gaps", "must be positive integers")
        need(len(set(self.spacing_gaps)) == len(self.spacing_gaps), "spacing_gaps", "must not repeat")
        need(isinstance(self.spacing_task, int) and 0 <= self.spacing_task <= self.tasks, "spacing_task",
             f"must be 0 (the rarest) or a task from 1 to {self.tasks}")
        need(isinstance(self.spacing_rate, (int, float)) and math.isfinite(self.spacing_rate) and self.spacing_rate >= 0,
             "spacing_rate", "must be a number >= 0")
        if self.spacing_widths and self.spacing_gaps:
            if self.tasks < 2:
                raise ConfigError("toy config: tasks: the spacing experiment needs at least 2 tasks "
                                  "(or set spacing_widths to empty)")
            for gap in self.spacing_gaps:
                if self.spacing_burst(gap) > self.batch_size:
                    raise ConfigError(f"toy config: spacing_gaps: gap {gap} delivers {self.spacing_burst(gap)} examples "
                                      f"at once, more than batch_size ({self.batch_size}); use smaller gaps or a lower spacing_rate")
                if self.spacing_burst(gap) < 1:
                    raise ConfigError(f"toy config: spacing_rate: gap {gap} delivers no example at all "
                                      f"(rate {self.spacing_mean_rate():.3g} per step)")
        return self

    # -- derived quantities ------------------------------------------------------------------------

    def frequencies(self) -> np.ndarray:
        """p_k for k = 1 ... tasks (sums to 1)."""
        p = np.arange(1, self.tasks + 1, dtype=np.float64) ** -float(self.alpha)
        return p / p.sum()

    def spacing_index(self) -> int:
        """0-based index of the spacing task."""
        if self.spacing_task:
            return self.spacing_task - 1
        simplest = min(self.complexity)
        return max(k for k, c in enumerate(self.complexity) if c == simplest)

    def spacing_mean_rate(self) -> float:
        return float(self.spacing_rate) or float(self.frequencies()[self.spacing_index()] * self.batch_size)

    def spacing_members(self) -> list[tuple[int, int]]:
        """(width, initialization) of every model of the spacing experiment."""
        repeats = self.spacing_repeats or (self.repeats,) * len(self.spacing_widths)
        return [(w, r) for w, n in zip(self.spacing_widths, repeats) for r in range(n)]

    def spacing_burst(self, gap: int) -> int:
        """Examples of the spacing task delivered every `gap` steps."""
        return int(round(self.spacing_mean_rate() * gap))

    @classmethod
    def quick(cls, **overrides) -> ToyConfig:
        """A reduced setting (well under a minute on 2 cores) that still shows the effect."""
        settings = dict(tasks=4, bits=12, complexity=(3, 2, 3, 3), widths=(8, 128), steps=2000, eval_every=250,
                        eval_samples=500, spacing_widths=(8, 128), spacing_repeats=(4, 2), spacing_gaps=(1, 25), spacing_task=4,
                        spacing_steps=1000, alone_widths=(8,))
        if "spacing_widths" in overrides:  # the reduced repeats are one per reduced spacing width
            settings["spacing_repeats"] = ()
        settings.update(overrides)
        return cls(**settings)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def field_docs() -> dict[str, str]:
    """Each ToyConfig field's docstring, read from the source (for --help and summary.md)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ToyConfig))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def parameter_count(width: int, config: ToyConfig) -> int:
    """Weights and biases of a one-hidden-layer MLP: (tasks + bits) -> width -> 2."""
    d = config.tasks + config.bits
    return d * width + width + width * 2 + 2


# -- data ------------------------------------------------------------------------------------------


@dataclass
class Mixture:
    """The tasks: frequency, complexity and relevant-bit subset of each."""

    config: ToyConfig
    subsets: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def build(cls, config: ToyConfig) -> Mixture:
        rng = np.random.default_rng([config.seed, 1])
        subsets = [torch.tensor(np.sort(rng.choice(config.bits, c, replace=False))) for c in config.complexity]
        return cls(config, subsets)

    def labels(self, task: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(len(task), dtype=torch.long)
        for k, subset in enumerate(self.subsets):
            chosen = task == k
            if chosen.any():
                y[chosen] = bits[chosen][:, subset].sum(1) % 2
        return y

    def inputs(self, task: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.one_hot(task, self.config.tasks).float(), bits.float()], 1)

    def sample(self, n: int, gen: torch.Generator, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        task = torch.multinomial(probs, n, replacement=True, generator=gen)
        bits = torch.randint(0, 2, (n, self.config.bits), generator=gen)
        return self.inputs(task, bits), self.labels(task, bits), task

    def sample_task(self, k: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        task = torch.full((n,), k, dtype=torch.long)
        bits = torch.randint(0, 2, (n, self.config.bits), generator=gen)
        return self.inputs(task, bits), self.labels(task, bits)


# -- models ----------------------------------------------------------------------------------------


class StackedMLPs:
    """Several one-hidden-layer ReLU MLPs (one per width) on the same input, trained side by side.

    Hidden units of all models form one layer; the read-out is masked to a block-diagonal so that
    model m's logits only see model m's units. Initialization follows torch.nn.Linear (uniform in
    +-1/sqrt(fan_in)) per model. The summed loss gives each model exactly its own gradient."""

    def __init__(self, widths: list[int], d_in: int, seeds: list[int], lr: float):
        self.widths = list(widths)
        m = len(widths)
        w1, b1, w2, b2 = [], [], [], []
        for width, seed in zip(widths, seeds):  # each model's weights depend only on its own seed
            gen = torch.Generator().manual_seed(seed)
            bound = 1.0 / math.sqrt(d_in)
            w1.append((torch.rand(width, d_in, generator=gen) * 2 - 1) * bound)
            b1.append((torch.rand(width, generator=gen) * 2 - 1) * bound)
            bound = 1.0 / math.sqrt(width)
            w2.append((torch.rand(width, 2, generator=gen) * 2 - 1) * bound)
            b2.append((torch.rand(2, generator=gen) * 2 - 1) * bound)
        segment = torch.repeat_interleave(torch.arange(m), torch.tensor(widths))
        self.mask = (segment[:, None] == torch.arange(m)[None, :]).float().repeat_interleave(2, dim=1)  # units x 2m
        self.w1, self.b1 = torch.cat(w1), torch.cat(b1)
        self.w2 = torch.cat(w2).repeat(1, m) * self.mask
        self.b2 = torch.cat(b2)
        self.params = [self.w1, self.b1, self.w2, self.b2]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params, lr=lr)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, models, 2)"""
        h = torch.relu(x @ self.w1.T + self.b1)
        return (h @ (self.w2 * self.mask) + self.b2).view(len(x), len(self.widths), 2)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        out = self.logits(x)
        m = len(self.widths)
        loss = F.cross_entropy(out.reshape(-1, 2), y.repeat_interleave(m), reduction="sum") / len(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-model, per-example (correct, loss): two (n, models) tensors."""
        out = self.logits(x)
        m = len(self.widths)
        loss = F.cross_entropy(out.reshape(-1, 2), y.repeat_interleave(m), reduction="none").view(len(x), m)
        return (out.argmax(-1) == y[:, None]).float(), loss


# -- experiments -----------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled or None, mininterval=0.5)


def _init_seed(config: ToyConfig, width: int, repeat: int) -> int:
    """The seed of one model's initial weights: the same model whatever else is trained beside it
    (the capacity and spacing experiments start a width's repeat r from the same weights)."""
    return int(np.random.SeedSequence([config.seed, width, repeat]).generate_state(1)[0])


def run_capacity(config: ToyConfig, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Train every width on the mixture, and the `alone_widths` on the rarest task's examples of the same
    stream alone; rows of held-out accuracy and loss over training (per task; the rarest task alone)."""
    mixture = Mixture.build(config)
    probs = torch.tensor(config.frequencies())
    data_gen = torch.Generator().manual_seed(config.seed * 1000 + 12)
    eval_gen = torch.Generator().manual_seed(config.seed * 1000 + 13)
    members = [(w, r) for w in config.widths for r in range(config.repeats)]
    models = StackedMLPs([w for w, _ in members], config.tasks + config.bits,
                         [_init_seed(config, w, r) for w, r in members], config.lr)
    held = [mixture.sample_task(k, config.eval_samples, eval_gen) for k in range(config.tasks)]
    rare = config.tasks - 1
    alone_members = [(w, r) for w in config.alone_widths for r in range(config.repeats)]
    alone = StackedMLPs([w for w, _ in alone_members], config.tasks + config.bits,
                        [_init_seed(config, w, r) for w, r in alone_members], config.lr) if alone_members else None
    freq = config.frequencies()
    rows, alone_rows, seen = [], [], np.zeros(config.tasks, dtype=np.int64)
    eval_steps = set(range(0, config.steps + 1, config.eval_every)) | {config.steps}

    def record(step: int) -> None:
        for k, (x, y) in enumerate(held):
            correct, loss = models.evaluate(x, y)
            for i, (width, repeat) in enumerate(members):
                rows.append(dict(width=width, repeat=repeat, params=parameter_count(width, config), task=k + 1,
                                 frequency=float(freq[k]), complexity=config.complexity[k], step=step,
                                 examples_seen=int(seen[k]), accuracy=float(correct[:, i].mean()),
                                 loss=float(loss[:, i].mean())))
        if alone is not None:
            correct, loss = alone.evaluate(*held[rare])
            for i, (width, repeat) in enumerate(alone_members):
                alone_rows.append(dict(width=width, repeat=repeat, task=rare + 1, step=step, examples_seen=int(seen[rare]),
                                       accuracy=float(correct[:, i].mean()), loss=float(loss[:, i].mean())))

    record(0)
    with _progress(config.steps, "toy: capacity", progress) as bar:
        for step in range(1, config.steps + 1):
            x, y, task = mixture.sample(config.batch_size, data_gen, probs)
            seen += np.bincount(task.numpy(), minlength=config.tasks)
            models.step(x, y)
            only = task == rare
            if alone is not None and bool(only.any()):
                alone.step(x[only], y[only])
            if step in eval_steps:
                record(step)
            bar.update(1)
    return rows, alone_rows


def run_spacing(config: ToyConfig, progress: bool = True) -> list[dict]:
    """For each gap: train the spacing widths with the spacing task delivered in bursts every `gap`
    steps (the same mean rate), the other tasks in their mixture proportions; record the spacing
    task's held-out accuracy and loss every step."""
    if not config.spacing_widths or not config.spacing_gaps:
        return []
    mixture = Mixture.build(config)
    target = config.spacing_index()
    freq = config.frequencies().copy()
    freq[target] = 0.0
    probs = torch.tensor(freq / freq.sum())
    eval_gen = torch.Generator().manual_seed(config.seed * 1000 + 23)
    held_x, held_y = mixture.sample_task(target, config.spacing_eval_samples, eval_gen)
    members = config.spacing_members()
    rows = []
    with _progress(config.spacing_steps * len(config.spacing_gaps), "toy: spacing", progress) as bar:
        for gap in config.spacing_gaps:
            burst = config.spacing_burst(gap)
            # the same initial weights, the same stream of other tasks and of spacing-task examples
            # under every gap: only the delivery schedule differs
            data_gen = torch.Generator().manual_seed(config.seed * 1000 + 22)
            task_gen = torch.Generator().manual_seed(config.seed * 1000 + 24)
            models = StackedMLPs([w for w, _ in members], config.tasks + config.bits,
                                 [_init_seed(config, w, r) for w, r in members], config.lr)
            seen, last = 0, None
            for step in range(1, config.spacing_steps + 1):
                x, y, _ = mixture.sample(config.batch_size, data_gen, probs)
                if (step - 1) % gap == 0:
                    rx, ry = mixture.sample_task(target, burst, task_gen)
                    x, y = torch.cat([rx, x[burst:]]), torch.cat([ry, y[burst:]])
                    seen += burst
                    last = step
                models.step(x, y)
                correct, loss = models.evaluate(held_x, held_y)
                since = step - last if last is not None else ""
                for (width, repeat), accuracy, mean_loss in zip(members, correct.mean(0).tolist(), loss.mean(0).tolist()):
                    rows.append(dict(gap=gap, burst=burst, width=width, repeat=repeat, step=step, examples_seen=seen,
                                     steps_since_burst=since, accuracy=accuracy, loss=mean_loss))
                bar.update(1)
    return rows


# -- outputs ---------------------------------------------------------------------------------------


def _csv_text(rows: list[dict], fields: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _spread(values) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value) over initializations."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def mean_over_repeats(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Rows grouped by `keys` (in first-seen order): accuracy mean, standard deviation, min and max over the
    group (the initializations), mean loss."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        acc = [r["accuracy"] for r in members]
        mean, std = _spread(acc)
        out.append(dict(zip(keys, key), accuracy=mean, accuracy_std=std, accuracy_min=min(acc), accuracy_max=max(acc),
                        loss=float(np.mean([r["loss"] for r in members])), repeats=len(members)))
    return out


def final_table(config: ToyConfig, rows: list[dict]) -> list[dict]:
    """Per width and task: accuracy (mean, std, min, max over repeats) and mean loss at the last step."""
    return mean_over_repeats([r for r in rows if r["step"] == config.steps], ("width", "task"))


def alone_table(config: ToyConfig, rows: list[dict], alone: list[dict]) -> list[dict]:
    """Per alone width: the rarest task's final accuracy in the mixture and trained alone (same initial weights,
    same examples), each mean ± std over initializations, and how many initializations reach 0.9 alone."""
    rare = config.tasks
    mixed = {r["width"]: r for r in final_table(config, [r for r in rows if r["task"] == rare])}
    last = [r for r in alone if r["step"] == config.steps]
    out = []
    for r in mean_over_repeats(last, ("width",)):
        m = mixed.get(r["width"])
        out.append(dict(width=r["width"], task=rare, initializations=r["repeats"],
                        alone=r["accuracy"], alone_std=r["accuracy_std"], alone_min=r["accuracy_min"],
                        alone_learned=sum(x["accuracy"] >= 0.9 for x in last if x["width"] == r["width"]),
                        mixture=m["accuracy"] if m else float("nan"), mixture_std=m["accuracy_std"] if m else float("nan")))
    return out


SPACING_STATS = ("final_accuracy", "final_loss", "tail_accuracy", "tail_loss", "accuracy_after_delivery",
                 "accuracy_before_next", "decay", "loss_rise")


def _tail_stats(series: list[dict], gap: int) -> dict:
    """One model's spacing-task numbers: at the last step, and over the last fifth of the run (see spacing_table)."""
    last = max(r["step"] for r in series)
    tail = [r for r in series if r["step"] > last - max(gap, last // 5)]
    after = [r["accuracy"] for r in tail if r["steps_since_burst"] == 0]
    before = [r["accuracy"] for r in tail if r["steps_since_burst"] == gap - 1]
    loss_after = [r["loss"] for r in tail if r["steps_since_burst"] == 0]
    loss_before = [r["loss"] for r in tail if r["steps_since_burst"] == gap - 1]
    nan = float("nan")
    final = next(r for r in series if r["step"] == last)
    return dict(final_accuracy=final["accuracy"], final_loss=final["loss"],
                tail_accuracy=float(np.mean([r["accuracy"] for r in tail])),
                tail_loss=float(np.mean([r["loss"] for r in tail])),
                accuracy_after_delivery=float(np.mean(after)) if after else nan,
                accuracy_before_next=float(np.mean(before)) if before else nan,
                decay=float(np.mean(after) - np.mean(before)) if after and before else nan,
                loss_rise=float(np.mean(loss_before) - np.mean(loss_after)) if after and before else nan)


def spacing_table(config: ToyConfig, rows: list[dict]) -> list[dict]:
    """Per gap and width, over the last fifth of the run: accuracy and loss of the spacing task; its accuracy
    on the step of a delivery (just after the update on the burst) and on the step before the next one;
    `decay` is the first minus the second (what is lost between observations), and `loss_rise` the same for
    the loss (the step before the next delivery minus the delivery step). Each is the mean over the width's
    initializations; `tail_accuracy_std`, `decay_std`, `loss_rise_std` their spread, `per_init` the
    tail accuracy of each initialization (in initialization order, for paired comparisons)."""
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["gap"], r["width"], r["repeat"]), []).append(r)
    out = []
    for gap in config.spacing_gaps:
        for width in config.spacing_widths:
            models = [_tail_stats(rs, gap) for (g, w, _), rs in series.items() if g == gap and w == width]
            entry = dict(gap=gap, burst=config.spacing_burst(gap), width=width, initializations=len(models))
            for key in SPACING_STATS:
                values = [m[key] for m in models]
                entry[key] = float(np.mean(values))
            for key in ("tail_accuracy", "decay", "loss_rise"):
                entry[f"{key}_std"] = _spread([m[key] for m in models])[1]
            entry["per_init"] = [m["tail_accuracy"] for m in models]
            out.append(entry)
    return out


def spacing_pairs(config: ToyConfig, table: list[dict]) -> list[dict]:
    """Per width and gap other than the first: the tail accuracy minus the first gap's, initialization by
    initialization (same weights, same data: only the schedule differs), mean ± std, and how many
    initializations do better under the first gap."""
    out = []
    for width in config.spacing_widths:
        mine = [r for r in table if r["width"] == width]
        reference = np.array(mine[0]["per_init"])
        for r in mine[1:]:
            difference = np.array(r["per_init"]) - reference
            mean, std = _spread(difference)
            out.append(dict(width=width, gap=r["gap"], reference_gap=mine[0]["gap"], difference=mean, difference_std=std,
                            reference_better=int((difference < 0).sum()), initializations=len(difference)))
    return out


def plot_toy(config: ToyConfig, rows: list[dict], spacing: list[dict], target: Path, alone: list[dict] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    widths = list(config.widths)
    color = {w: cmap(i / max(1, len(widths) - 1) * 0.9) for i, w in enumerate(widths)}
    freq = config.frequencies()
    rows_n = 2 if spacing else 1
    fig, axes = plt.subplots(rows_n, 2, figsize=(12, 4.4 * rows_n + 0.3), squeeze=False)

    # (a) final accuracy per task vs width
    ax = axes[0][0]
    final = final_table(config, rows)
    tcmap = plt.get_cmap("plasma")
    for k in range(config.tasks):
        acc = [next(r["accuracy"] for r in final if r["width"] == w and r["task"] == k + 1) for w in widths]
        ax.plot(widths, acc, "-o", ms=4, color=tcmap(k / max(1, config.tasks - 1) * 0.85),
                label=f"task {k + 1}: p={freq[k]:.3f}, {config.complexity[k]} bits")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set(title=f"(a) Final accuracy per task (step {config.steps})", xlabel="hidden width (log scale)",
           ylabel="held-out accuracy (dotted: chance)", ylim=(0.4, 1.02))
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)

    # (b) rarest task over training, per width
    ax = axes[0][1]
    rare = config.tasks
    for w in widths:
        series = [(r["step"], r["accuracy"]) for r in mean_over_repeats(
            [r for r in rows if r["width"] == w and r["task"] == rare], ("step",))]
        ax.plot(*zip(*series), "-", color=color[w], label=f"width {w}")
    for w in config.alone_widths:
        series = [(r["step"], r["accuracy"]) for r in mean_over_repeats([r for r in alone if r["width"] == w], ("step",))]
        if series:
            ax.plot(*zip(*series), "--", color=color.get(w, "black"), linewidth=1, label=f"width {w}, task alone")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set(title=f"(b) Rarest task over training (task {rare}: p={freq[-1]:.3f}, {config.complexity[-1]} bits)",
           xlabel="training step", ylabel="held-out accuracy", ylim=(0.4, 1.02))
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)

    if spacing:
        k = config.spacing_index()
        gcmap = plt.get_cmap("tab10")
        styles = ["--", "-", "-.", ":"]
        window = max(config.spacing_gaps)
        # (c) accuracy over steps, moving average over the largest gap
        ax = axes[1][0]
        for gi, gap in enumerate(config.spacing_gaps):
            for wi, w in enumerate(config.spacing_widths):
                series = mean_over_repeats([r for r in spacing if r["gap"] == gap and r["width"] == w],
                                           ("step", "burst"))
                steps = np.array([r["step"] for r in series])
                acc = np.array([r["accuracy"] for r in series])
                if len(acc) >= window:
                    acc = np.convolve(acc, np.ones(window) / window, mode="valid")
                    steps = steps[window - 1:]
                ax.plot(steps, acc, styles[wi % len(styles)], linewidth=1.1, color=gcmap(gi),
                        label=f"width {w}: {series[0]['burst']} every {gap} step{'s' if gap > 1 else ''}")
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"(c) Spacing: task {k + 1}, {config.spacing_mean_rate():.3g} examples/step on average",
               xlabel="training step", ylabel=f"held-out accuracy ({window}-step mean)", ylim=(0.4, 1.02))
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
        # (d) last fifth: accuracy per gap, every initialization and mean ± std
        ax = axes[1][1]
        table = spacing_table(config, spacing)
        gaps = list(config.spacing_gaps)
        for wi, w in enumerate(config.spacing_widths):
            mine = [r for r in table if r["width"] == w]
            c = cmap(wi / max(1, len(config.spacing_widths) - 1) * 0.9)
            for per_init in zip(*[r["per_init"] for r in mine]):
                ax.plot(gaps, per_init, "-", color=c, alpha=0.2, linewidth=0.8)
            ax.errorbar(gaps, [r["tail_accuracy"] for r in mine], yerr=[r["tail_accuracy_std"] for r in mine], fmt="-o",
                        color=c, capsize=4, label=f"width {w}: mean ± std of {mine[0]['initializations']} initializations")
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xticks(gaps, [str(g) for g in gaps])
        ax.set(title="(d) Spacing: accuracy over the last fifth of training, per initialization",
               xlabel="steps between deliveries (log scale)", ylabel="held-out accuracy", ylim=(0.4, 1.02))
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)

    fig.suptitle("Toy capacity experiment: sparse-parity mixture, one-hidden-layer MLPs of several widths")
    fig.tight_layout()
    tmp = target.with_name(target.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(target)
    return target


def describe(config: ToyConfig) -> str:
    """The task mixture and the model sizes, for --dry-run and summary.md."""
    freq = config.frequencies()
    lines = [f"task mixture: {config.tasks} sparse-parity tasks on {config.bits} random bits, p_k ~ k^-{config.alpha:g}, "
             f"{config.steps} steps x {config.batch_size} examples", "",
             "| task | frequency | complexity (bits) | examples per step | expected examples |",
             "|---:|---:|---:|---:|---:|"]
    for k in range(config.tasks):
        lines.append(f"| {k + 1} | {freq[k]:.4f} | {config.complexity[k]} | {freq[k] * config.batch_size:.2f} | "
                     f"{freq[k] * config.batch_size * config.steps:,.0f} |")
    lines += ["", f"| width | parameters | models ({config.repeats} initializations each) |", "|---:|---:|---:|"]
    lines += [f"| {w} | {parameter_count(w, config):,} | {config.repeats} |" for w in config.widths]
    if config.alone_widths:
        lines += ["", f"control: widths {', '.join(map(str, config.alone_widths))} also trained on task {config.tasks} alone "
                  f"(its examples of the same stream, {config.repeats} initializations each)"]
    if config.spacing_widths and config.spacing_gaps:
        k = config.spacing_index()
        counts = {}
        for w, _ in config.spacing_members():
            counts[w] = counts.get(w, 0) + 1
        lines += ["", f"spacing: task {k + 1} ({config.complexity[k]} bits) at {config.spacing_mean_rate():.3g} examples "
                  f"per step on average, {config.spacing_steps} steps, widths "
                  f"{', '.join(f'{w} ({n} initializations)' for w, n in counts.items())}; "
                  "schedules: " + "; ".join(f"{config.spacing_burst(g)} every {g} step{'s' if g > 1 else ''}"
                                           for g in config.spacing_gaps)]
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def write_summary(config: ToyConfig, rows: list[dict], spacing: list[dict], seconds: float, alone: list[dict] = ()) -> str:
    final = final_table(config, rows)
    lines = ["# Toy capacity experiment", "", describe(config), "",
             f"## Final held-out accuracy (step {config.steps}), mean ± std over {config.repeats} initializations", "",
             "| width | params | " + " | ".join(f"task {k + 1}" for k in range(config.tasks)) + " |",
             "|---:|---:|" + "---:|" * config.tasks]
    for w in config.widths:
        cells = [next(r for r in final if r["width"] == w and r["task"] == k + 1) for k in range(config.tasks)]
        lines.append(f"| {w} | {parameter_count(w, config):,} | " + " | ".join(_pm(r["accuracy"], r["accuracy_std"]) for r in cells) + " |")
    if alone:
        lines += ["", f"## Control: task {config.tasks} (the rarest) alone", "",
                  f"The same initial weights trained on task {config.tasks}'s examples of the same stream alone, the other "
                  f"tasks left out. Learned alone but not in the mixture: the width drops it for competition, not inability.", "",
                  "| width | in the mixture | alone | alone: initializations at >= 0.9 |", "|---:|---:|---:|---:|"]
        for r in alone_table(config, rows, alone):
            lines.append(f"| {r['width']} | {_pm(r['mixture'], r['mixture_std'])} | {_pm(r['alone'], r['alone_std'])} | "
                         f"{r['alone_learned']} of {r['initializations']} |")
    if spacing:
        k = config.spacing_index()
        table = spacing_table(config, spacing)
        lines += ["", f"## Spacing (task {k + 1}, same mean rate, delivered every `gap` steps)", "",
                  "Over the last fifth of each run, mean ± std over initializations (n): held-out accuracy and loss; "
                  "accuracy on the step of a delivery and on the step before the next one; decay = the first minus the "
                  "second; loss rise: the loss before the next delivery minus the loss on the delivery step (forgetting "
                  "between observations).", "",
                  "| gap | burst | width | n | accuracy | loss | after delivery | before next | decay | loss rise |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in table:
            lines.append(f"| {r['gap']} | {r['burst']} | {r['width']} | {r['initializations']} | "
                         f"{_pm(r['tail_accuracy'], r['tail_accuracy_std'])} | {r['tail_loss']:.3f} | "
                         f"{r['accuracy_after_delivery']:.3f} | {r['accuracy_before_next']:.3f} | "
                         f"{r['decay']:+.3f} ± {r['decay_std']:.3f} | {r['loss_rise']:+.3f} ± {r['loss_rise_std']:.3f} |")
        pairs = spacing_pairs(config, table)
        if pairs:
            lines += ["", "Paired by initialization (same weights, same data, only the schedule differs): accuracy under "
                      "each gap minus under the first.", "",
                      "| width | gap | minus gap " + str(pairs[0]["reference_gap"]) + " (mean ± std) | initializations better at gap "
                      + str(pairs[0]["reference_gap"]) + " |", "|---:|---:|---:|---:|"]
            for p in pairs:
                lines.append(f"| {p['width']} | {p['gap']} | {p['difference']:+.3f} ± {p['difference_std']:.3f} | "
                             f"{p['reference_better']} of {p['initializations']} |")
    lines += ["", f"Runtime: {seconds:.0f} s with {config.threads} torch thread(s).", ""]
    return "\n".join(lines)


def run_toy(config: ToyConfig, out: Path, progress: bool = True, overwrite: bool = True) -> dict:
    """Run both experiments and write config.json, results.csv, alone.csv, spacing.csv, toy.png, summary.md into
    `out` (built in a temporary sibling folder, renamed into place when complete)."""
    config.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise InjectError(f"{out}: exists")
    if out.exists() and not (out / "config.json").exists():
        raise InjectError(f"{out}: exists and is not a toy output folder (no config.json); choose another --out")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    start = time.time()
    try:
        rows, alone = run_capacity(config, progress)
        spacing = run_spacing(config, progress)
    finally:
        torch.set_num_threads(threads)
    seconds = time.time() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
    (tmp / "results.csv").write_text(_csv_text(rows, RESULT_FIELDS))
    (tmp / "alone.csv").write_text(_csv_text(alone, ALONE_FIELDS))
    (tmp / "spacing.csv").write_text(_csv_text(spacing, SPACING_FIELDS))
    summary = write_summary(config, rows, spacing, seconds, alone)
    (tmp / "summary.md").write_text(summary)
    plot_toy(config, rows, spacing, tmp / "toy.png", alone)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    table = spacing_table(config, spacing) if spacing else []
    return dict(rows=rows, alone=alone, spacing=spacing, seconds=seconds, summary=summary, final=final_table(config, rows),
                alone_table=alone_table(config, rows, alone) if alone else [], spacing_table=table,
                spacing_pairs=spacing_pairs(config, table) if table else [])
