"""Scoring: ranked choice over the task's candidates, greedy exact match over the whole vocabulary, and
the log-probability and rank of the right answer. Context and answer are tokenized separately, exactly
as injected, so there is no joint-tokenization mismatch.

Every instance's prompt goes through the model once, and the model's output projection (d_model x the
whole vocabulary: most of a small model's cost) runs only at the positions whose next-token distribution
a score reads (`_run`). Instances whose candidates are all one token are scored from the prompt's last
position alone (one batched forward pass for many instances). For multi-token candidates the prompts are
run once with a key/value cache, the cache is repeated for each candidate, and only the candidates' tokens
are run on top of it. Prompts are batched by length, so no padding ever enters a prompt: ai2-olmo takes no
position ids, so left padding would shift its rotary positions, and right padding, though causal attention
hides it, changes the attention's rounding, so scores would move (by ~1e-6) with a batch's other prompts.
Candidates are right-padded and the padding's positions never read.

Calibrated ranked choice: raw log-probabilities favour some answers whatever the question (a frequent number,
a short one). Each candidate's score is its log-probability after the item's prompt minus its log-probability
after the content-free prompt (`EvalItem.null_context`: EOS and the template's text with every operand
written as "N/A"; EOS alone for the tokens encoding), and the calibrated answer is the top calibrated score.
`calibrated_correct` is true when the right answer alone has the top calibrated score.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _final_norm(model) -> torch.nn.Module | None:
    """The module whose output the output projection reads: the final layer norm of ai2-olmo's OLMo (and
    GPT-2) or of a transformers decoder (OLMo, OLMo-2, Llama...); None for a layout not known here."""
    inner = getattr(model, "transformer", None)
    if inner is None:
        inner = getattr(model, getattr(model, "base_model_prefix", ""), None)
    for name in ("ln_f", "norm", "final_layer_norm"):
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            return getattr(inner, name)
    return None


def _run(model, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, cache=None, want_cache: bool = False):
    """(log-probabilities [len(rows), vocab] on the CPU of the token after position cols[i] of row rows[i], the
    key/value cache or None).

    The output projection (d_model x the whole vocabulary, most of a small model's cost) runs only at those
    positions: a forward hook narrows the final norm's output to them before the model projects it. A model
    whose final norm is not found gets every position's logits, then indexed (the same numbers to rounding, slower)."""
    device = _device(model)
    rows, cols = rows.to(device), cols.to(device)
    norm = _final_norm(model)
    handle = norm.register_forward_hook(lambda module, args, out: out[rows, cols].unsqueeze(0)) if norm else None
    try:
        with torch.no_grad():
            out = model(ids.to(device), past_key_values=cache, use_cache=want_cache)
    finally:
        if handle:
            handle.remove()
    logits = out.logits[0] if norm else out.logits[rows, cols]
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    if not want_cache:
        return logp, None
    return logp, getattr(out, "attn_key_values", None) or out.past_key_values


def _repeat_cache(cache, repeats: int):
    """The prompt cache repeated `repeats` times along the batch (one copy per candidate)."""
    if hasattr(cache, "batch_repeat_interleave"):  # a transformers Cache object
        cache.batch_repeat_interleave(repeats)
        return cache
    return [(k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)) for k, v in cache]


class Query(NamedTuple):
    context: list[int]
    candidates: list[list[int]]
    correct: int


def score_items(model, items, pad: int, batch_size: int = 64, calibrate: bool = True) -> list[dict]:
    """One result dict per item, in order (see `_result`); with `calibrate`, also the calibrated score."""
    raw = candidate_scores(model, items, pad, batch_size)
    results = [_result(it, scores, greedy) for it, (scores, greedy) in zip(items, raw)]
    with_null = [i for i, it in enumerate(items) if calibrate and getattr(it, "null_context", None)]
    nulls = null_scores(model, [items[i] for i in with_null], pad, batch_size)
    for i, null in zip(with_null, nulls):
        results[i].update(_calibrated(items[i], raw[i][0] - null))
    return results


def null_scores(model, items, pad: int, batch_size: int = 64) -> list[np.ndarray]:
    """Each item's candidates scored after its content-free prompt. Single-token candidates are read off one
    forward pass per distinct content-free prompt; multi-token ones once per distinct (prompt, candidates)."""
    def key(it):
        if _single_token(it):
            return (tuple(it.null_context), None)
        return (tuple(it.null_context), tuple(map(tuple, it.candidates)))

    keys = [key(it) for it in items]
    tokens: dict[tuple, set] = {}
    for it, k in zip(items, keys):
        if k[1] is None:
            tokens.setdefault(k, set()).update(c[0] for c in it.candidates)
    unique = list(dict.fromkeys(keys))
    queries = [Query(list(k[0]), [[t] for t in sorted(tokens[k])] if k[1] is None else [list(c) for c in k[1]], 0)
               for k in unique]
    scored = {k: (q, s) for k, q, (s, _) in zip(unique, queries, candidate_scores(model, queries, pad, batch_size))}
    positions = {k: {c[0]: i for i, c in enumerate(q.candidates)} for k, (q, _) in scored.items() if k[1] is None}
    out = []
    for it, k in zip(items, keys):
        scores = scored[k][1]
        out.append(np.array([scores[positions[k][c[0]]] for c in it.candidates]) if k[1] is None else scores)
    return out


def _calibrated(it, scores: np.ndarray) -> dict:
    rank = int((scores > scores[it.correct]).sum()) + 1
    return {"calibrated_correct": rank == 1 and int((scores == scores[it.correct]).sum()) == 1,
            "calibrated_rank": rank}


def _single_token(it) -> bool:
    return all(len(c) == 1 for c in it.candidates)


def candidate_scores(model, items, pad: int, batch_size: int = 64) -> list[tuple[np.ndarray, bool]]:
    """(log-probability of each candidate after the item's context, teacher-forced greedy match of the right
    one) per item, in order."""
    results: list[tuple | None] = [None] * len(items)
    groups = defaultdict(list)  # equal prompt lengths batch without padding
    for i, it in enumerate(items):
        single = _single_token(it)
        groups[(single, len(it.context), 0 if single else len(it.candidates))].append(i)
    for (single, _, n_candidates), members in sorted(groups.items()):
        per_batch = batch_size if single else max(1, batch_size // n_candidates)
        for start in range(0, len(members), per_batch):
            chunk = [items[i] for i in members[start : start + per_batch]]
            scored = _score_single(model, chunk) if single else _score_multi(model, chunk, pad)
            for i, result in zip(members[start : start + per_batch], scored):
                results[i] = result
    return results


def _score_single(model, chunk) -> list[tuple[np.ndarray, bool]]:
    """Every prompt (all of one length) read at its last token."""
    logp, _ = _run(model, torch.tensor([it.context for it in chunk]), torch.arange(len(chunk)),
                   torch.full((len(chunk),), len(chunk[0].context) - 1))
    best = logp.argmax(-1)
    out = []
    for row, it in enumerate(chunk):
        scores = logp[row, [c[0] for c in it.candidates]].double().numpy()
        out.append((scores, int(best[row]) == it.candidates[it.correct][0]))
    return out


def _score_multi(model, chunk, pad: int) -> list[tuple[np.ndarray, bool]]:
    """Prompts (all of one length) once with a cache, then every candidate's tokens after the first on top of it."""
    length = len(chunk[0].context)
    first, cache = _run(model, torch.tensor([it.context for it in chunk]), torch.arange(len(chunk)),
                        torch.full((len(chunk),), length - 1), want_cache=True)  # each candidate's first token
    n = len(chunk[0].candidates)
    candidates = [c for it in chunk for c in it.candidates]
    rest = torch.full((len(candidates), max(len(c) for c in candidates) - 1), pad, dtype=torch.long)
    rows, cols = [], []  # position j of a candidate's row predicts its token j + 1; padding is never read
    for row, cand in enumerate(candidates):
        rest[row, : len(cand) - 1] = torch.tensor(cand[:-1])
        rows += [row] * (len(cand) - 1)
        cols += range(len(cand) - 1)
    later, _ = _run(model, rest, torch.tensor(rows), torch.tensor(cols), _repeat_cache(cache, n))
    offsets = np.cumsum([0] + [len(c) - 1 for c in candidates])  # each candidate's first row of `later`
    out = []
    for k, it in enumerate(chunk):
        scores, greedy = [], False
        for c, cand in enumerate(it.candidates):
            at = offsets[k * n + c]
            steps = [first[k]] + [later[at + j] for j in range(len(cand) - 1)]
            scores.append(sum(float(lp[t]) for lp, t in zip(steps, cand)))
            if c == it.correct:  # teacher-forced greedy: every answer token is the argmax
                greedy = all(int(lp.argmax()) == t for lp, t in zip(steps, cand))
        out.append((np.array(scores), greedy))
    return out


def _result(it, scores: np.ndarray, greedy: bool) -> dict:
    rank = int((scores > scores[it.correct]).sum()) + 1
    return {"task": it.task, "spec": it.spec, "split": it.split, "item": it.item, "template": it.template,
            "format": it.format, "correct": rank == 1 and int((scores == scores[it.correct]).sum()) == 1,
            "greedy_exact": greedy, "logprob": float(scores[it.correct]), "rank": rank, "candidates": len(scores)}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
