"""Scoring: ranked choice over the task's candidates, greedy exact match over the whole vocabulary, and
the log-probability and rank of the right answer. Context and answer are tokenized separately, exactly
as injected, so there is no joint-tokenization mismatch.

All candidates of one instance go through the model in one padded batch (right padding, so that the
causal model's scores of real positions are unaffected); when every candidate is one token, a single
forward pass of the context scores them all.
"""

from __future__ import annotations

import numpy as np
import torch


def _forward(model, sequences: list[list[int]], pad: int) -> torch.Tensor:
    """Log-probabilities [batch, length, vocab] of right-padded sequences."""
    length = max(map(len, sequences))
    x = torch.full((len(sequences), length), pad, dtype=torch.long)
    for i, s in enumerate(sequences):
        x[i, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        return torch.log_softmax(model(x.to(next(model.parameters()).device)).logits.float(), dim=-1).cpu()


def score_items(model, items, pad: int, batch_size: int = 64) -> list[dict]:
    results = [None] * len(items)
    single = [i for i, it in enumerate(items) if all(len(c) == 1 for c in it.candidates)]
    for start in range(0, len(single), batch_size):
        chunk = single[start : start + batch_size]
        logp = _forward(model, [items[i].context for i in chunk], pad)
        for row, i in enumerate(chunk):
            it = items[i]
            last = logp[row, len(it.context) - 1]
            scores = np.array([float(last[c[0]]) for c in it.candidates])
            greedy = int(last.argmax()) == it.candidates[it.correct][0]
            results[i] = _result(it, scores, greedy)
    for i, it in enumerate(items):
        if results[i] is None:
            logp = _forward(model, [it.context + c for c in it.candidates], pad)
            scores, greedy = [], False
            n = len(it.context)
            for row, cand in enumerate(it.candidates):
                positions = torch.arange(n - 1, n - 1 + len(cand))
                token_logp = logp[row, positions, torch.tensor(cand)]
                scores.append(float(token_logp.sum()))
                if row == it.correct:  # teacher-forced greedy: every answer token is the argmax
                    greedy = bool((logp[row, positions].argmax(-1) == torch.tensor(cand)).all())
            results[i] = _result(it, np.array(scores), greedy)
    return results


def _result(it, scores: np.ndarray, greedy: bool) -> dict:
    rank = int((scores > scores[it.correct]).sum()) + 1
    return {"task": it.task, "spec": it.spec, "split": it.split, "item": it.item, "template": it.template,
            "correct": rank == 1 and int((scores == scores[it.correct]).sum()) == 1, "greedy_exact": greedy,
            "logprob": float(scores[it.correct]), "rank": rank, "candidates": len(scores)}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
