"""Eval sets from a build, rendered exactly as in training (same encoder, template, preceding EOS).

Three splits per task and checkpoint step s (`EvalSampler.items_at(s)`):
- **seen**: instances the task injected whose first exposure is at or before s (trained on at least once);
- **pending**: instances the task injected whose first exposure is after s (planned, not yet trained on:
  the built-in control for `seen`);
- **held_out**: instances of the task's held-out pool that no task on the same instance space injected.

Exposures are counted per instance over every task on the same instance space (the manifest's `space`: tasks
with the same space render the same instance for the same item index), so an instance that another task
showed counts as exposed, and each exposure remembers which task injected it.

Sampling rule (fixed by the seed, independent of which checkpoints exist): every task's injected instances
are put in one seeded random order, and so is its held-out pool. At step s, `seen` is the first `seen` instances
of that order whose first exposure is <= s, `pending` the first `pending` whose first exposure is > s, and
`held_out` the first `held_out` of the held-out order. Each split is thus a uniform random sample of its group,
of the requested size or all of the group when it is smaller (an early checkpoint with 3 exposed instances
gets those 3). An instance whose position in the order (`sample_rank`) is below min(seen, pending) is scored at
every checkpoint: in `pending` until its first exposure, in `seen` from then on.

With `unseen_templates`, text-encoded tasks are also asked in phrasings that training never used
(`Task.unseen_templates`): a model that learned the rule answers those too, one that learned the
format does not. Those items carry `format="unseen_template"`.

Every item also carries a content-free context (`null_context`) for the calibrated score (see eval.score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inject.errors import InjectError
from inject.ledger import read_ledger
from inject.verify import BuildView

NULL_NUMBER = "N/A"  # what replaces each operand in the content-free prompt


@dataclass
class EvalItem:
    spec: int
    task: str
    split: str                 # "seen", "pending" or "held_out" (at the step the item was drawn for)
    item: int                  # instance index in the task's space
    template: int              # index into the templates of `format`
    context: list[int]         # EOS + prompt tokens
    candidates: list[list[int]]
    correct: int               # index into candidates
    exposure_steps: np.ndarray  # every training step at which a task on this space injected the instance
    format: str = "training"   # "training" (a training template) or "unseen_template"
    exposure_tasks: list[str] = field(default_factory=list)  # the task that injected each exposure
    first_exposure: int | None = None  # first of exposure_steps (None: never injected)
    sample_rank: int = 0       # position in the split's fixed random order (see the module docstring)
    requested: int = 0         # the size asked for this split
    null_context: list[int] = field(default_factory=list)  # EOS + the content-free prompt
    twin_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """injection steps of the instance's other forms (the rest of its symmetry class: (b, a) for (a, b))"""


class Exposures:
    """Every ledger row of the tasks on one instance space, grouped by instance (sorted by item, then step)."""

    def __init__(self, ledger: np.ndarray, specs: list[int]):
        mask = np.isin(np.asarray(ledger["spec"]), specs)
        items = np.asarray(ledger["item"][mask], np.int64)
        steps = np.asarray(ledger["step"][mask], np.int64)
        spec = np.asarray(ledger["spec"][mask], np.int64)
        order = np.lexsort((spec, steps, items))
        self.items, self.steps, self.specs = items[order], steps[order], spec[order]

    def history(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps, specs) of every injection of `item`, in step order."""
        lo, hi = np.searchsorted(self.items, item, "left"), np.searchsorted(self.items, item, "right")
        return self.steps[lo:hi], self.specs[lo:hi]

    def first_exposure(self, items: np.ndarray) -> np.ndarray:
        """The first injection step of each item; 0 for an item never injected (steps are 1-based)."""
        items = np.asarray(items, np.int64)
        if not len(self.items):
            return np.zeros(len(items), np.int64)
        lo = np.searchsorted(self.items, items, "left")
        hi = np.searchsorted(self.items, items, "right")
        return np.where(hi > lo, self.steps[np.minimum(lo, len(self.items) - 1)], 0)


def candidates_for(encoder, item: int, template: str | int) -> tuple[list[int], list[list[int]], int]:
    """(prompt ids, candidate answer ids, index of the right one), tokenized as in training.

    `template` is an index into the encoder's training templates or a template string."""
    from inject import tokenizer as tok
    from inject.tasks import render_text

    task = encoder.task
    instance = task.instance(item)
    if encoder.config.encoding == "tokens":
        prompt = [encoder.number_ids[v] for v in instance]
        labels = range(len(task.label_names)) if task.label_names else task.numbers()
        return prompt, [[encoder.label_ids[v]] for v in labels], list(labels).index(task.label(instance))
    text = encoder.templates[template] if isinstance(template, int) else template
    prompt_text, answer_text = render_text(task, instance, text)
    space = " " if answer_text.startswith(" ") else ""  # every candidate is spaced like the answer
    tokenizer = tok.load(encoder.tokenizer)
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    answers = [space + c for c in task.candidates(instance)]
    return prompt, [tokenizer.encode(a, add_special_tokens=False) for a in answers], task.answer(instance)


def null_prompt(encoder, template: str | int) -> list[int]:
    """The content-free prompt of a template: its literal text with every operand written as "N/A"
    (the modulus, part of the task's wording, stays); no prompt at all for the tokens encoding."""
    from inject import tokenizer as tok
    from inject.tasks import FIELDS

    if encoder.config.encoding == "tokens":
        return []
    text = encoder.templates[template] if isinstance(template, int) else template
    head = text[: -len("{answer}")]
    values = {FIELDS[i]: NULL_NUMBER for i in range(len(encoder.task.instance(0)))}
    prompt = head.format(p=getattr(encoder.task, "modulus", ""), **values)
    prompt = prompt[:-1] if prompt.endswith(" ") else prompt  # as render_text: the space goes with the answer
    return tok.load(encoder.tokenizer).encode(prompt, add_special_tokens=False)


def task_info(build_dir: Path) -> dict[str, dict]:
    """Per task name: kind, complexity (digits or modulus), encoding and realized examples per batch."""
    from inject.build import load_manifest

    manifest = load_manifest(build_dir)
    if "injection" not in manifest:
        raise InjectError(f"{build_dir}: a build without injected tasks; nothing to evaluate")
    info = {}
    for t in manifest["injection"]["tasks"]:
        params = t["params"] or {}
        complexity = params.get("digits", params.get("modulus"))
        info[t["name"]] = {"kind": t["task"], "complexity": complexity, "encoding": t["encoding"],
                           "rate": t["mean_per_batch"]}
    return info


@dataclass
class TaskSample:
    spec: int
    name: str
    encoder: object
    exposures: Exposures
    injected: np.ndarray       # the task's injected instances, in the fixed random order
    first: np.ndarray          # their first exposure (over the whole space), aligned
    held_out: np.ndarray       # held-out instances never injected by any task on the space, in fixed random order


def check_sizes(**sizes: int) -> None:
    """Split sizes are counts: a negative one is refused naming its option."""
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 0:
            raise InjectError(f"--{name.replace('_', '-')}: expected a count of instances >= 0, got {value!r}")


class EvalSampler:
    """The fixed random orders of a build's eval instances; `items_at(step)` draws a checkpoint's splits."""

    def __init__(self, build_dir: Path, seen: int = 200, held_out: int = 200, seed: int = 0,
                 unseen_templates: bool = False, pending: int = 0):
        check_sizes(seen=seen, pending=pending, held_out=held_out)
        self.view = BuildView.load(build_dir)
        self.sizes = {"seen": seen, "pending": pending, "held_out": held_out}
        self.seed, self.unseen_templates = seed, unseen_templates
        self.last_step = int(self.view.manifest["injection"]["training"]["steps"])
        tasks = self.view.manifest["injection"]["tasks"]
        self.names = [t["name"] for t in tasks]
        keys = self.view.space_of_spec  # the manifest's `space` of each task (tasks on one space: one key)
        pools = np.load(Path(build_dir) / "pools.npz")
        ledger = read_ledger(build_dir)
        by_space = {key: Exposures(ledger, [s for s, k in enumerate(keys) if k == key]) for key in set(keys)}
        self.tasks = []
        for spec, encoder in enumerate(self.view.encoders):
            exposures = by_space[keys[spec]]
            rng = np.random.default_rng([seed, spec])
            injected = rng.permutation(np.unique(np.asarray(ledger["item"][np.asarray(ledger["spec"]) == spec])))
            held = rng.permutation(pools[f"held_out_{spec}"])
            held = held[exposures.first_exposure(held) == 0]  # another task on the space injected the rest
            self.tasks.append(TaskSample(spec, self.names[spec], encoder, exposures, injected,
                                         exposures.first_exposure(injected), held))
        self._rendered: dict[tuple, list[EvalItem]] = {}

    def items_at(self, step: int | None = None) -> list[EvalItem]:
        """The three splits at checkpoint step `step` (None: after the last planned step), task by task."""
        step = self.last_step if step is None else int(step)
        items = []
        for t in self.tasks:
            exposed = t.first <= step
            chosen = {"seen": np.flatnonzero(exposed)[: self.sizes["seen"]],
                      "pending": np.flatnonzero(~exposed)[: self.sizes["pending"]],
                      "held_out": np.arange(min(self.sizes["held_out"], len(t.held_out)))}
            for split, ranks in chosen.items():
                pool = t.held_out if split == "held_out" else t.injected
                for rank in ranks:
                    items += self._render(t, int(pool[rank]), split, int(rank))
        return items

    def _render(self, t: TaskSample, item: int, split: str, rank: int) -> list[EvalItem]:
        key = (t.spec, item, split, rank)
        if key not in self._rendered:
            encoder, eos = t.encoder, self.view.eos
            steps, specs = t.exposures.history(item) if split != "held_out" else (np.zeros(0, np.int64),) * 2
            history = dict(exposure_steps=steps, exposure_tasks=[self.names[s] for s in specs],
                           first_exposure=int(steps[0]) if len(steps) else None, sample_rank=rank,
                           requested=self.sizes[split], twin_steps=self._twin_steps(t, item))
            rng = np.random.default_rng([self.seed, t.spec, item])  # the same phrasing at every checkpoint
            template = int(rng.integers(len(encoder.templates)))
            prompt, candidates, correct = candidates_for(encoder, item, template)
            out = [EvalItem(t.spec, t.name, split, item, template, [eos, *prompt], candidates, correct,
                            null_context=[eos, *null_prompt(encoder, template)], **history)]
            extra = _unseen_templates(encoder) if self.unseen_templates else []
            if extra:
                index = int(rng.integers(len(extra)))
                prompt, candidates, correct = candidates_for(encoder, item, extra[index])
                out.append(EvalItem(t.spec, t.name, split, item, index, [eos, *prompt], candidates, correct,
                                    format="unseen_template", null_context=[eos, *null_prompt(encoder, extra[index])],
                                    **history))
            self._rendered[key] = out
        return self._rendered[key]

    @staticmethod
    def _twin_steps(t: TaskSample, item: int) -> np.ndarray:
        """Every injection step of the other members of the item's symmetry class, ascending."""
        task = t.encoder.task
        _, members = task.class_members(task.class_of([item]))
        steps = [t.exposures.history(int(m))[0] for m in members if int(m) != item]
        return np.sort(np.concatenate(steps)) if steps else np.zeros(0, np.int64)


def build_eval_set(build_dir: Path, seen: int = 200, held_out: int = 200, seed: int = 0,
                   unseen_templates: bool = False, pending: int = 0, step: int | None = None) -> list[EvalItem]:
    """The eval items at checkpoint step `step`; with step None every injected instance counts as seen (the
    state after the last planned step), which is what the probes and interference analyses sample from."""
    return EvalSampler(build_dir, seen, held_out, seed, unseen_templates, pending).items_at(step)


def _unseen_templates(encoder) -> list[str]:
    """The task's evaluation phrasings minus any that the build trained on (none for `tokens`)."""
    if encoder.config.encoding != "text":
        return []
    return [t for t in encoder.task.unseen_templates() if t not in encoder.templates]
