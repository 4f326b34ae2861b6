"""Eval sets from a build: seen instances (with their exposure history from the ledger) and held-out ones,
rendered exactly as in training (same encoder, template, preceding EOS).

With `unseen_templates`, text-encoded tasks are also asked in phrasings that training never used
(`Task.unseen_templates`): a model that learned the rule answers those too, one that learned the
format does not. Those items carry `format="unseen_template"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inject.errors import InjectError
from inject.ledger import read_ledger
from inject.verify import BuildView


@dataclass
class EvalItem:
    spec: int
    task: str
    split: str                 # "seen" or "held_out"
    item: int                  # instance index in the task's space
    template: int              # index into the templates of `format`
    context: list[int]         # EOS + prompt tokens
    candidates: list[list[int]]
    correct: int               # index into candidates
    exposure_steps: np.ndarray  # training steps at which this instance was injected (seen only)
    format: str = "training"   # "training" (a training template) or "unseen_template"


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


def build_eval_set(build_dir: Path, seen: int = 200, held_out: int = 200, seed: int = 0,
                   unseen_templates: bool = False) -> list[EvalItem]:
    view = BuildView.load(build_dir)
    pools = np.load(Path(build_dir) / "pools.npz")
    ledger = read_ledger(build_dir)
    items = []
    for spec, encoder in enumerate(view.encoders):
        name = view.manifest["injection"]["tasks"][spec]["name"]
        rng = np.random.default_rng([seed, spec])
        phrasing_rng = np.random.default_rng([seed, spec, 1])  # the training-format items do not depend on it
        rows = ledger[ledger["spec"] == spec]
        injected = np.unique(rows["item"])  # seen instances that were actually injected
        extra = _unseen_templates(encoder) if unseen_templates else []
        for split, pool, k in (("seen", injected, seen), ("held_out", pools[f"held_out_{spec}"], held_out)):
            chosen = rng.choice(pool, size=min(k, len(pool)), replace=False) if len(pool) else []
            for item in chosen:
                steps = np.sort(rows["step"][rows["item"] == item]) if split == "seen" else np.zeros(0, np.int64)
                template = int(rng.integers(len(encoder.templates)))
                prompt, candidates, correct = candidates_for(encoder, int(item), template)
                items.append(EvalItem(spec, name, split, int(item), template, [view.eos, *prompt], candidates,
                                      correct, steps))
                if extra:
                    index = int(phrasing_rng.integers(len(extra)))
                    prompt, candidates, correct = candidates_for(encoder, int(item), extra[index])
                    items.append(EvalItem(spec, name, split, int(item), index, [view.eos, *prompt], candidates,
                                          correct, steps, "unseen_template"))
    return items


def _unseen_templates(encoder) -> list[str]:
    """The task's evaluation phrasings minus any that the build trained on (none for `tokens`)."""
    if encoder.config.encoding != "text":
        return []
    return [t for t in encoder.task.unseen_templates() if t not in encoder.templates]
