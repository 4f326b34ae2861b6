"""Eval sets from a build: seen instances (with their exposure history from the ledger) and held-out ones,
rendered exactly as in training (same encoder, template, preceding EOS)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inject.ledger import read_ledger
from inject.verify import BuildView


@dataclass
class EvalItem:
    spec: int
    task: str
    split: str                 # "seen" or "held_out"
    item: int                  # instance index in the task's space
    template: int
    context: list[int]         # EOS + prompt tokens
    candidates: list[list[int]]
    correct: int               # index into candidates
    exposure_steps: np.ndarray  # training steps at which this instance was injected (seen only)


def candidates_for(encoder, item: int, template: int) -> tuple[list[int], list[list[int]], int]:
    """(prompt ids, candidate answer ids, index of the right one), tokenized as in training."""
    from inject import tokenizer as tok
    from inject.tasks import render_text

    task = encoder.task
    instance = task.instance(item)
    if encoder.config.encoding == "tokens":
        prompt = [encoder.number_ids[v] for v in instance]
        labels = range(len(task.label_names)) if task.label_names else task.numbers()
        return prompt, [[encoder.label_ids[v]] for v in labels], list(labels).index(task.label(instance))
    prompt_text, _ = render_text(task, instance, encoder.templates[template])
    tokenizer = tok.load(encoder.tokenizer)
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    answers = [" " + c for c in task.candidates(instance)]
    return prompt, [tokenizer.encode(a, add_special_tokens=False) for a in answers], task.answer(instance)


def build_eval_set(build_dir: Path, seen: int = 200, held_out: int = 200, seed: int = 0) -> list[EvalItem]:
    view = BuildView.load(build_dir)
    pools = np.load(Path(build_dir) / "pools.npz")
    ledger = read_ledger(build_dir)
    items = []
    for spec, encoder in enumerate(view.encoders):
        name = view.manifest["injection"]["tasks"][spec]["name"]
        rng = np.random.default_rng([seed, spec])
        rows = ledger[ledger["spec"] == spec]
        injected = np.unique(rows["item"])  # seen instances that were actually injected
        for split, pool, k in (("seen", injected, seen), ("held_out", pools[f"held_out_{spec}"], held_out)):
            chosen = rng.choice(pool, size=min(k, len(pool)), replace=False) if len(pool) else []
            for item in chosen:
                template = int(rng.integers(len(encoder.templates)))
                prompt, candidates, correct = candidates_for(encoder, int(item), template)
                steps = np.sort(rows["step"][rows["item"] == item]) if split == "seen" else np.zeros(0, np.int64)
                items.append(EvalItem(spec, name, split, int(item), template, [view.eos, *prompt], candidates,
                                      correct, steps))
    return items
