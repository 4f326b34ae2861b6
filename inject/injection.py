"""The injection plan: which examples go into which training batch, instance and offset.

Everything here is decided before a token is written, from the config and the number of instances N:

  specs      task + encoding + seen/held-out pools + per-step counts (the schedule)
  examples   one row per injected example, ordered by (step, task): the seen instance drawn, template
  slots      example j of a batch goes to the batch's instance j mod B (round robin), so that examples
             spread over the batch; the instance is OLMo's order[b*B + slot]
  blocks     an instance that holds examples starts with EOS, then each example followed by EOS

OLMo's order comes from ai2-olmo's own `IterableDataset._build_global_indices` (PCG64(seed + epoch)).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from . import tokenizer as tok
from .config import BuildConfig, PoolConfig, ScheduleConfig, TaskConfig
from .errors import ConfigError, InjectError
from .tasks import Task, check_template, make_task, parse_text, render_text, template_regex, templates_for

MAX_NUMBER_TOKENS = 1 << 20


# ---------------------------------------------------------------------------- encodings


class Encoder:
    """Turns (instance, template) into example token ids (without the closing EOS) and back."""

    def __init__(self, task: Task, config: TaskConfig, tokenizer: str, where: str):
        self.task, self.config, self.tokenizer = task, config, tokenizer
        self.templates = templates_for(task, config.templates)
        spec = tok.get_spec(tokenizer)
        self.eos = spec.eos_token_id
        if config.encoding == "text":
            for i, template in enumerate(self.templates):
                check_template(task, template, f"{where}.templates[{i}]")
            self.patterns = [template_regex(task, t) for t in self.templates]
        else:
            self.templates = ["tokens"]
            self._build_token_maps(where, spec)

    def _build_token_maps(self, where: str, spec) -> None:
        numbers = self.task.numbers()
        if len(numbers) > MAX_NUMBER_TOKENS:
            raise ConfigError(f"{where}.encoding: tokens encoding needs one token per number; {len(numbers):,} numbers is too many")
        vocab = tok.vocab_size(self.tokenizer)
        if self.config.number_tokens == "offset":
            ids = {v: self.config.token_offset + v for v in numbers}
            top = self.config.token_offset + numbers[-1] + 1
            labels = {i: top + i for i in range(len(self.task.label_names or []))}
        else:
            ids = {v: self._single_token(f" {v}", where) for v in numbers}
            labels = {i: self._single_token(f" {name}", where) for i, name in enumerate(self.task.label_names or [])}
        self.number_ids = ids
        self.label_ids = labels if self.task.label_names else ids
        used = list(ids.values()) + (list(labels.values()) if self.task.label_names else [])
        bad = [i for i in used if not 0 <= i < vocab or i in (spec.eos_token_id, spec.pad_token_id)]
        if bad or len(set(used)) != len(used):
            raise ConfigError(
                f"{where}.number_tokens: the number/label token ids must be distinct, inside the vocabulary "
                f"(size {vocab}) and not EOS/pad; offending ids: {bad[:5] or 'duplicates'}"
            )
        self.number_of = {i: v for v, i in ids.items()}
        self.label_of = {i: v for v, i in self.label_ids.items()}

    def _single_token(self, text: str, where: str) -> int:
        ids = tok.load(self.tokenizer).encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(
                f"{where}.number_tokens: {text!r} is {len(ids)} tokens {ids} in {self.tokenizer}, not one; "
                f"use fewer digits or `number_tokens: offset`"
            )
        return ids[0]

    def encode_many(self, items: np.ndarray, templates: np.ndarray) -> list[np.ndarray]:
        instances = [self.task.instance(int(i)) for i in items]
        if self.config.encoding == "tokens":
            return [np.array([self.number_ids[v] for v in inst] + [self.label_ids[self.task.label(inst)]], dtype=np.int64)
                    for inst in instances]
        pairs = [render_text(self.task, inst, self.templates[int(t)]) for inst, t in zip(instances, templates)]
        tokenizer = tok.load(self.tokenizer)
        prompts = tokenizer.encode_batch([p for p, _ in pairs], add_special_tokens=False)
        answers = tokenizer.encode_batch([a for _, a in pairs], add_special_tokens=False)
        return [np.array(p + a, dtype=np.int64) for p, a in zip(prompts, answers)]

    def parse(self, ids: np.ndarray) -> tuple[int, int, bool] | None:
        """(item, template, answer correct) of an example's ids (without EOS), or None."""
        if self.config.encoding == "tokens":
            n = len(self.task.instance(0))
            if len(ids) != n + 1:
                return None
            try:
                instance = tuple(self.number_of[int(i)] for i in ids[:n])
                label = self.label_of[int(ids[n])]
            except KeyError:
                return None
            item = self.task.index(instance)
            return None if item is None else (item, 0, label == self.task.label(instance))
        text = tok.load(self.tokenizer).decode(ids.tolist(), skip_special_tokens=False)
        found = parse_text(self.task, text, self.patterns)
        if found is None:
            return None
        instance, template, correct = found
        return self.task.index(instance), template, correct


# ---------------------------------------------------------------------------- pools


def _stable_seed(*parts) -> int:
    return zlib.crc32(json.dumps(parts, sort_keys=True, default=str).encode())


def _size(value, space: int, where: str) -> int:
    n = int(round(value * space)) if isinstance(value, float) else int(value)
    if n < 1:
        raise ConfigError(f"{where}: {value} of a space of {space:,} instances is less than one instance")
    return n


def split_pool(task: Task, params: dict, pool: PoolConfig, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(seen, held_out) instance indices: disjoint by construction, a pure function of task, params, pool."""
    space = task.space_size()
    held = _size(pool.held_out, space, f"{where}.pool.held_out")
    seen = _size(pool.seen, space, f"{where}.pool.seen") if pool.seen is not None else space - held
    if held + seen > space or seen < 1:
        raise ConfigError(f"{where}.pool: seen {seen:,} + held-out {held:,} exceed the {space:,} instances of {task.describe()}")
    rng = np.random.default_rng([pool.seed, _stable_seed(task.kind, params)])
    if space <= 1 << 25:
        chosen = rng.permutation(space)[: held + seen]
    else:
        chosen = rng.choice(space, size=held + seen, replace=False)
    return chosen[held:].astype(np.int64), chosen[:held].astype(np.int64)


# ---------------------------------------------------------------------------- schedules


def even_counts(rate: float, n: int, carry: Fraction = Fraction(0)) -> tuple[np.ndarray, Fraction]:
    """Integer counts whose running sum is floor(carry + rate * t): the fraction is carried exactly.

    Returns the counts and the new carry (its fractional part)."""
    r = Fraction(rate).limit_denominator(10**6)
    cum = _even_cum(r, carry, n)
    counts = np.diff(np.concatenate([[carry.numerator // carry.denominator], cum]))
    end = carry + r * n
    return counts.astype(np.int64), end - (end.numerator // end.denominator)


def _even_cum(r: Fraction, carry: Fraction, n: int) -> np.ndarray:
    # floor((c_num*r_den + r_num*c_den*t) / (c_den*r_den)), in int64 when it fits, else Python ints.
    a, b, d = carry.numerator * r.denominator, r.numerator * carry.denominator, carry.denominator * r.denominator
    if (abs(a) + abs(b) * n) < 2**62:
        t = np.arange(1, n + 1, dtype=np.int64)
        return (a + b * t) // d
    return np.array([(a + b * t) // d for t in range(1, n + 1)], dtype=np.int64)


def schedule_counts(s: ScheduleConfig, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Examples per step (index 0 = step 1)."""
    counts = np.zeros(steps, dtype=np.int64)
    a = s.start - 1
    b = min(s.stop if s.stop is not None else steps, steps)
    n = max(b - a, 0)
    if s.kind in ("even", "window"):
        counts[a:b] = even_counts(s.rate, n)[0]
    elif s.kind == "poisson":
        counts[a:b] = rng.poisson(s.rate, n)
    elif s.kind == "bernoulli":
        counts[a:b] = rng.random(n) < s.rate
    elif s.kind == "burst":
        counts[a:b] = np.where(np.arange(n) % s.burst_every == 0, s.burst_size, 0)
    elif s.kind == "piecewise":
        carry, first = Fraction(0), a
        for piece in s.pieces:
            last = min(piece.until, b)
            if last > first:
                counts[first:last], carry = even_counts(piece.rate, last - first, carry)
                first = last
    return counts


# ---------------------------------------------------------------------------- specs and plan


@dataclass
class Spec:
    index: int
    config: TaskConfig
    task: Task
    encoder: Encoder
    seen: np.ndarray
    held_out: np.ndarray
    counts: np.ndarray

    @property
    def name(self) -> str:
        return self.config.name


def make_specs(config: BuildConfig) -> list[Spec]:
    steps = config.training.steps
    specs, splits = [], {}
    for i, tc in enumerate(config.tasks):
        where = f"tasks[{i}]"
        task = make_task(tc.task, tc.params, where)
        key = json.dumps([tc.task, tc.params], sort_keys=True)
        pool_key = json.dumps(tc.pool.__dict__, sort_keys=True, default=str)
        if key in splits and splits[key][0] != pool_key:
            raise ConfigError(f"{where}.pool: {tc.task} {tc.params} is also used by {splits[key][1]} with another pool; "
                              f"tasks on the same instance space must share one seen/held-out split")
        splits.setdefault(key, (pool_key, tc.name))
        seen, held = split_pool(task, tc.params, tc.pool, where)
        rng = np.random.default_rng([config.seed, _stable_seed("counts", tc.name)])
        counts = schedule_counts(tc.schedule, steps, rng)
        if tc.pool.draw == "no-repeat" and counts.sum() > len(seen):
            raise ConfigError(f"{where}.pool: draw 'no-repeat' needs {int(counts.sum()):,} seen instances, "
                              f"the seen pool has {len(seen):,}")
        specs.append(Spec(i, tc, task, Encoder(task, tc, config.tokenizer, where), seen, held, counts))
    return specs


@dataclass
class Plan:
    """Every injected example, in (step, task) order, and where it goes."""

    specs: list[Spec]
    batch_size: int
    sequence_length: int
    step: np.ndarray        # 1-based training step
    spec: np.ndarray        # index into specs
    item: np.ndarray        # instance index in the task's space (a seen instance)
    template: np.ndarray
    slot: np.ndarray        # position within the batch: the instance is order[(step-1)*B + slot]
    offset: np.ndarray      # token offset of the example inside its instance
    length: np.ndarray      # tokens of the example, closing EOS included
    token_table: list[tuple[np.ndarray, np.ndarray]]  # per spec: flat ids, start offsets
    token_ref: np.ndarray   # per example: row in its spec's token table

    @property
    def examples(self) -> int:
        return len(self.step)

    def tokens_of(self, row: int) -> np.ndarray:
        flat, starts = self.token_table[self.spec[row]]
        r = self.token_ref[row]
        return flat[starts[r] : starts[r + 1]]

    def batch_positions(self) -> np.ndarray:
        """Each example's position in OLMo's order: (step - 1) * B + slot."""
        return (self.step.astype(np.int64) - 1) * self.batch_size + self.slot

    def instances(self, order: np.ndarray) -> np.ndarray:
        """The OLMo instance that holds each example, under the given global order."""
        return order[self.batch_positions()].astype(np.int64)

    def layout(self) -> None:
        """Offsets from slots: each instance's block starts with EOS; its examples follow in plan order."""
        if not self.examples:
            return
        rows = np.lexsort((np.arange(self.examples), self.slot, self.step))
        key = self.batch_positions()[rows]
        length = self.length[rows]
        ends = np.cumsum(length)
        group_start = np.concatenate([[True], key[1:] != key[:-1]])
        base = np.maximum.accumulate(np.where(group_start, ends - length, 0))
        self.offset[rows] = 1 + ends - length - base

    def block_lengths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(step, slot, block length) of every instance that holds examples, sorted by (step, slot)."""
        key = self.batch_positions()
        unique, inverse = np.unique(key, return_inverse=True)
        totals = np.bincount(inverse, weights=self.length, minlength=len(unique)).astype(np.int64) + 1
        return (unique // self.batch_size + 1), unique % self.batch_size, totals


def make_plan(config: BuildConfig, specs: list[Spec]) -> Plan:
    steps, B, L = config.training.steps, config.training.global_batch_size, config.sequence_length
    counts = np.stack([s.counts for s in specs], axis=1) if specs else np.zeros((steps, 0), np.int64)
    flat = counts.ravel()
    step = np.repeat(np.repeat(np.arange(1, steps + 1), len(specs)), flat).astype(np.int32)
    spec = np.repeat(np.tile(np.arange(len(specs)), steps), flat).astype(np.int16)
    item = np.zeros(len(step), dtype=np.int64)
    template = np.zeros(len(step), dtype=np.int16)
    length = np.zeros(len(step), dtype=np.int32)
    token_ref = np.zeros(len(step), dtype=np.int64)
    token_table = []
    for s in specs:
        mask = spec == s.index
        n = int(mask.sum())
        rng = np.random.default_rng([config.seed, _stable_seed("draws", s.name)])
        k = np.arange(n)
        draw = s.config.pool.draw
        picks = k % len(s.seen) if draw == "cycle" else rng.integers(0, len(s.seen), n) if draw == "uniform" else k
        item[mask] = s.seen[picks]
        template[mask] = rng.integers(0, len(s.encoder.templates), n)
        keys = item[mask] * len(s.encoder.templates) + template[mask]
        unique, inverse = np.unique(keys, return_inverse=True)
        ids = s.encoder.encode_many(unique // len(s.encoder.templates), unique % len(s.encoder.templates))
        lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
        if len(lengths) and lengths.max() > L - 1:
            raise ConfigError(f"tasks[{s.index}]: an example of {int(lengths.max())} tokens (with EOS) does not fit "
                              f"an instance of sequence_length {L} after its leading EOS")
        starts = np.concatenate([[0], np.cumsum(lengths - 1)])
        table = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        token_table.append((table, starts))
        token_ref[mask] = inverse
        length[mask] = lengths[inverse]
    # Round robin over the batch's instances: example j of a step goes to slot j mod B.
    per_step = counts.sum(axis=1)
    first = np.repeat(np.concatenate([[0], np.cumsum(per_step)[:-1]]), per_step)
    j = np.arange(len(step)) - first
    slot = (j % B).astype(np.int64)
    plan = Plan(specs, B, L, step, spec, item, template, slot, np.zeros(len(step), np.int64), length, token_table, token_ref)
    plan.layout()
    _check_capacity(config, plan, counts)
    return plan


def _check_capacity(config: BuildConfig, plan: Plan, counts: np.ndarray) -> None:
    B, L = plan.batch_size, plan.sequence_length
    if not plan.examples:
        return
    steps, _, blocks = plan.block_lengths()
    if blocks.max() > L:
        raise ConfigError(f"tasks: step {int(steps[blocks.argmax()])} needs {int(blocks.max())} tokens in one instance "
                          f"(sequence_length {L}); lower the rates")
    per_step = np.bincount(steps - 1, weights=blocks, minlength=config.training.steps)
    share = per_step / (B * L)
    worst = int(share.argmax())
    if share[worst] > config.max_batch_share:
        names = ", ".join(f"{s.name}={int(counts[worst, s.index])}" for s in plan.specs if counts[worst, s.index])
        raise ConfigError(f"max_batch_share: step {worst + 1} holds {int(per_step[worst]):,} injected tokens ({names}), "
                          f"{share[worst]:.1%} of the batch's {B * L:,} tokens; the limit is {config.max_batch_share:.0%}")


def olmo_order(num_instances: int, batch_size: int, seed: int, drop_last: bool) -> np.ndarray:
    """The global instance order of epoch 0, computed by ai2-olmo's own IterableDataset code."""
    from olmo.data.iterable_dataset import IterableDataset

    dataset = IterableDataset(range(num_instances), batch_size, seed=seed, epoch=0, shuffle=True,
                              drop_last=drop_last, world_size=1, rank=0, fs_local_rank=0)
    return dataset._build_global_indices()


def check_epoch(config: BuildConfig, num_instances: int) -> None:
    t = config.training
    needed = t.steps * t.global_batch_size
    if num_instances < needed:
        L = config.sequence_length
        raise InjectError(
            f"training.steps: {t.steps:,} steps x {t.global_batch_size} instances = {needed:,} instances, but the "
            f"corpus gives {num_instances:,} ({num_instances * L:,} tokens at sequence_length {L}); the run would "
            f"leave epoch 0. Add about {(needed - num_instances) * L:,} tokens of input or lower steps."
        )


def order_digest(order: np.ndarray, count: int) -> str:
    return hashlib.sha256(np.ascontiguousarray(order[:count], dtype=np.uint32).tobytes()).hexdigest()
