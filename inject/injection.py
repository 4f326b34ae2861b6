"""The injection plan: which examples go into which training batch, instance and offset.

Everything here is decided before a token is written, from the config and the number of instances N:

  specs      task + encoding + seen/held-out pools + per-step counts (the schedule)
  draws      per task, its examples in order: the seen instance drawn, template, token ids (each distinct
             (instance, template) encoded once); cycle draws keep only the cycle, not a row per example
  examples   one row per injected example, ordered by (step, task), made a block of steps at a time
             (`Plan.rows`, `Plan.blocks`): memory per block, not per run
  slots      example j of a batch goes to the batch's instance j mod B (round robin), so that examples
             spread over the batch; the instance is OLMo's order[b*B + slot]
  blocks     an instance that holds examples starts with EOS, then each example followed by EOS

The order is the target trainer's (ai2-olmo 0.6.0 or OLMo-core 3.0.0), computed by inject/order.py without
importing either trainer (tests compare it with both trainers' own code).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import string
import zlib
from dataclasses import dataclass, fields, is_dataclass
from fractions import Fraction

import numpy as np

from . import tokenizer as tok
from .config import BuildConfig, PoolConfig, ScheduleConfig, TaskConfig, TrainingConfig
from .errors import ConfigError, InjectError
from . import trainers
from .order import FIRST_EPOCH, ai2_olmo_order
from .tasks import FIELDS, EachInstanceItsOwnClass, Singletons, Task, check_template, make_task, parse_text, template_regex, templates_for

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
        ids = tok.encode_texts(self.tokenizer, [text])[0]
        if len(ids) != 1:
            raise ConfigError(
                f"{where}.number_tokens: {text!r} is {len(ids)} tokens {ids} in {self.tokenizer}, not one; "
                f"use fewer digits or `number_tokens: offset`"
            )
        return ids[0]

    def encode_many(self, items: np.ndarray, templates: np.ndarray) -> list[np.ndarray]:
        flat, starts = self.encode_table(items, templates)
        return [flat[a:b] for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]

    def encode_table(self, items: np.ndarray, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of each (item, template) pair, without the closing EOS: one flat int64 array and the start
        of each pair's ids in it (len(items) + 1 offsets). Text: the prompts are tokenized in one batch, each
        distinct answer string once (the same string always gives the same ids)."""
        instances = self.task.instances(np.asarray(items, dtype=np.int64))
        if self.config.encoding == "tokens":
            ids = [[self.number_ids[v] for v in inst] + [self.label_ids[self.task.label(inst)]] for inst in instances]
            return _flatten(ids, ids)
        prompts, answers = [], []
        formats = [_positional(t) for t in self.templates]
        modulus = getattr(self.task, "modulus", "")
        for inst, t in zip(instances, np.asarray(templates).tolist()):
            prompt, answer = formats[t].format(*inst, p=modulus), self.task.answer_text(inst)
            if prompt.endswith(" "):  # as render_text: the space goes with the answer
                prompt, answer = prompt[:-1], " " + answer
            prompts.append(prompt)
            answers.append(answer)
        distinct = list(dict.fromkeys(answers))
        answer_ids = dict(zip(distinct, tok.encode_texts(self.tokenizer, distinct)))
        prompt_ids = tok.encode_digit_variants(self.tokenizer, prompts)  # the same ids, per shape of prompt
        return _flatten(prompt_ids, [answer_ids[a] for a in answers])

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
        text = tok.load_base(self.tokenizer).decode(ids.tolist(), skip_special_tokens=False)  # OLMo's decode, no torch
        found = parse_text(self.task, text, self.patterns)
        if found is None:
            return None
        instance, template, correct = found
        return self.task.index(instance), template, correct


def _positional(template: str) -> str:
    """A template's prompt part (as `render_text` formats it) with the instance's numbers by position ({0},
    {1}, ...; {p} stays by name): one format call per example, no dict."""
    out = []
    for literal, field, spec, conversion in string.Formatter().parse(template[: -len("{answer}")]):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            name = field if field == "p" else str(FIELDS.index(field))
            out.append("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
    return "".join(out)


def _flatten(first: list[list[int]], second: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """first[i] + second[i] for every i, as one flat array and start offsets (second may be `first`: then once)."""
    parts = first if second is first else [x for pair in zip(first, second) for x in pair]
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    flat = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=int(lengths.sum()))
    if second is not first:
        lengths = lengths.reshape(-1, 2).sum(axis=1)
    return flat, np.concatenate([[0], np.cumsum(lengths)])


# ---------------------------------------------------------------------------- pools
#
# The split is made over classes (`split: symmetric`: the task's symmetry classes, so that no twin of a held-out
# instance is ever injected; `split: ordered`: single instances). A space's classes are put in a keyed
# pseudorandom order without materializing them (`Shuffle`); held-out classes come first, then the seen pool,
# dealt round robin to the space's parts (one per task, or one per `share` group).

MAX_RECORDED_POOL = 1 << 24
"""Largest held-out pool, in instances: it is written whole to pools.npz and read whole by verify and eval.
A seen pool above it is not written (its size and definition are in the manifest)."""

MAX_COUNTED_CLASSES = 1 << 25
"""Most classes sized one by one (only where a task cannot list its smaller-than-usual classes)."""

CHUNK = 1 << 18


def _stable_seed(*parts) -> int:
    return zlib.crc32(json.dumps(parts, sort_keys=True, default=str).encode())


class Shuffle:
    """A keyed pseudorandom bijection of [0, n): a Feistel network on the smallest even number of bits that
    covers n, cycle-walking back into range (fewer than 4 passes on average). `rank` and `at` are inverses."""

    ROUNDS = 6
    M1, M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)

    def __init__(self, n: int, key: list[int]):
        self.n = n
        self.half = np.uint64(max(1, ((n - 1).bit_length() + 1) // 2))
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.default_rng(key).integers(0, 1 << 62, self.ROUNDS, dtype=np.int64).astype(np.uint64)

    def _f(self, x: np.ndarray, k: np.uint64) -> np.ndarray:
        z = (x ^ k) * self.M1
        z ^= z >> np.uint64(31)
        z *= self.M2
        z ^= z >> np.uint64(29)
        return z & self.mask

    def _forward(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ self._f(right, k)
        return (left << self.half) | right

    def _backward(self, y: np.ndarray) -> np.ndarray:
        left, right = y >> self.half, y & self.mask
        for k in self.keys[::-1]:
            left, right = right ^ self._f(left, k), left
        return (left << self.half) | right

    def _walk(self, values, step) -> np.ndarray:
        x = step(np.asarray(values, dtype=np.int64).astype(np.uint64))
        out = x >= np.uint64(self.n)
        while out.any():
            x[out] = step(x[out])
            out[out] = x[out] >= np.uint64(self.n)
        return x.astype(np.int64)

    def rank(self, classes) -> np.ndarray:
        """Position of each class in the shuffled order."""
        return self._walk(classes, self._forward)

    def at(self, ranks) -> np.ndarray:
        """The class at each position of the shuffled order."""
        return self._walk(ranks, self._backward)


def _target(value, space: int, where: str) -> int:
    n = int(round(value * space)) if isinstance(value, float) else int(value)
    if n < 1:
        raise ConfigError(f"{where}: {value} of a space of {space:,} instances is less than one instance")
    return n


def task_space(task: Task) -> str:
    """A short stable name of a task's instance space: tasks with equal names render the same instances."""
    params = ", ".join(f"{f.name}={getattr(task, f.name)}" for f in fields(task)) if is_dataclass(task) else ""
    return f"{task.kind}({params})"


@dataclass
class SpacePool:
    """The seen/held-out split of one instance space, common to every task on it.

    Classes in shuffled order: ranks [0, held_classes) are held out; ranks [held_classes, held_classes +
    seen_classes) are the seen pool, rank held_classes + t going to part t mod len(parts)."""

    space: str
    split: str
    classes: EachInstanceItsOwnClass   # the task (symmetric split) or Singletons(task) (ordered split)
    shuffle: Shuffle
    held_classes: int
    seen_classes: int
    held_size: int
    parts: list[str]
    part_sizes: list[int]
    _held_items: np.ndarray | None = None

    def part_ranks(self, part: int, t: np.ndarray) -> np.ndarray:
        return self.held_classes + part + len(self.parts) * np.asarray(t, dtype=np.int64)

    def part_classes(self, part: int) -> int:
        return max(0, -(-(self.seen_classes - part) // len(self.parts)))

    def held_out_items(self) -> np.ndarray:
        """Every held-out instance id, ascending."""
        if self._held_items is None:
            parts = [self.classes.class_members(self.shuffle.at(np.arange(x, min(x + CHUNK, self.held_classes))))[1]
                     for x in range(0, self.held_classes, CHUNK)]
            self._held_items = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return self._held_items

    def part_items(self, part: int, n: int) -> np.ndarray:
        """The first n instances of a part: its classes in rank order, each class's members in id order."""
        out, got, t = [], 0, 0
        n = min(n, self.part_sizes[part])
        while got < n:
            chunk = np.arange(t, min(t + min(CHUNK, n - got), self.part_classes(part)))  # a class has >= 1 member
            _, items = self.classes.class_members(self.shuffle.at(self.part_ranks(part, chunk)))
            out.append(items[: n - got])
            got += len(out[-1])
            t += len(chunk)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def uniform_items(self, part: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """n instances of a part, uniformly with replacement: a class by rank, kept with probability size /
        max_class_size (rejection), then one of its members."""
        out, got, largest = [], 0, self.classes.max_class_size
        while got < n:
            want = min(n - got, 1 << 22)
            classes = self.shuffle.at(self.part_ranks(part, rng.integers(0, self.part_classes(part), want)))
            sizes = self.classes.class_sizes(classes)
            keep = rng.random(want) * largest < sizes
            classes, sizes = classes[keep], sizes[keep]
            owners, items = self.classes.class_members(classes)
            first = np.searchsorted(owners, np.arange(len(classes)))
            out.append(items[first + (rng.random(len(classes)) * sizes).astype(np.int64)])
            got += len(classes)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def record(self, part: int, seen_recorded: bool) -> dict:
        """What the manifest says about a task's pools."""
        return {"space": self.space, "split": self.split, "symmetry": self.classes.symmetry, "held_out_classes": self.held_classes,
                "seen_part": self.parts[part], "seen_parts": list(self.parts), "seen_recorded": seen_recorded}


class _ClassSizes:
    """Instances in ranges of shuffled ranks: exact, from the task's list of smaller-than-usual classes, or by
    counting the classes one by one (at most MAX_COUNTED_CLASSES) where the task cannot list them."""

    def __init__(self, classes, shuffle: Shuffle, where: str):
        self.classes, self.shuffle, self.where = classes, shuffle, where
        self.largest = classes.max_class_size
        irregular = classes.irregular_classes()
        self.listed = irregular is not None
        if self.listed:
            ranks = shuffle.rank(irregular[0])
            order = np.argsort(ranks)
            self.ranks = ranks[order]
            self.deficit = np.concatenate([[0], np.cumsum(self.largest - irregular[1][order])])

    def _prefix(self, x: int) -> int:
        return self.largest * x - int(self.deficit[np.searchsorted(self.ranks, x)])

    def _sizes(self, ranks: np.ndarray) -> np.ndarray:
        return self.classes.class_sizes(self.shuffle.at(ranks))

    def reach(self, start: int, target: int) -> tuple[int, int] | None:
        """(classes, instances): the fewest classes from rank `start` on that hold at least `target`
        instances, and how many they hold; None if the space runs out first."""
        n = self.classes.class_count()
        if self.listed:
            if self._prefix(n) - self._prefix(start) < target:
                return None
            lo, hi = start, n  # the smallest x with prefix(x) - prefix(start) >= target
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (mid + 1, hi) if self._prefix(mid) - self._prefix(start) < target else (lo, mid)
            return lo - start, self._prefix(lo) - self._prefix(start)
        got, x = 0, start
        while got < target and x < n:
            self._count(x - start)
            sizes = self._sizes(np.arange(x, min(x + CHUNK, n)))
            total = np.cumsum(sizes)
            if got + total[-1] >= target:
                k = int(np.searchsorted(total, target - got))
                return x + k + 1 - start, got + int(total[k])
            got, x = got + int(total[-1]), x + len(sizes)
        return None if got < target else (x - start, got)

    def parts(self, start: int, count: int, parts: int) -> list[int]:
        """Instances of each part: ranks start + t, t < count, dealt to part t mod parts."""
        t_counts = [max(0, -(-(count - q) // parts)) for q in range(parts)]
        if self.listed:
            inside = self.ranks[(self.ranks >= start) & (self.ranks < start + count)]
            deficit = np.zeros(parts, dtype=np.int64)
            np.add.at(deficit, (inside - start) % parts, self.largest - self.classes.class_sizes(self.shuffle.at(inside)))
            return [self.largest * t_counts[q] - int(deficit[q]) for q in range(parts)]
        totals = np.zeros(parts, dtype=np.int64)
        self._count(count)
        for x in range(start, start + count, CHUNK):
            ranks = np.arange(x, min(x + CHUNK, start + count))
            totals += np.bincount((ranks - start) % parts, weights=self._sizes(ranks), minlength=parts).astype(np.int64)
        return totals.tolist()

    def _count(self, counted: int) -> None:
        if counted > MAX_COUNTED_CLASSES:
            raise ConfigError(f"{self.where}: sizing this pool would count more than {MAX_COUNTED_CLASSES:,} classes of "
                              f"{self.classes.class_count():,} one by one; give `seen` as a smaller count, let the tasks share one part (`share`), or use split: ordered")


def make_space_pool(task: Task, pool: PoolConfig, parts: list[str], where: str) -> SpacePool:
    """The split of one space: a pure function of task, params and pool settings (and the parts' order)."""
    space, name = task.space_size(), task_space(task)
    held_target = _target(pool.held_out, space, f"{where}.pool.held_out")
    if held_target > MAX_RECORDED_POOL:
        raise ConfigError(f"{where}.pool.held_out: {pool.held_out} of {task.describe()} is {held_target:,} instances; a "
                          f"held-out pool is recorded whole in pools.npz (at most {MAX_RECORDED_POOL:,} instances); "
                          f"give a count, e.g. held_out: 10000")
    seen_target = _target(pool.seen, space, f"{where}.pool.seen") if pool.seen is not None else None
    if held_target + (seen_target or 1) > space:
        raise ConfigError(f"{where}.pool: seen {seen_target or 1:,} + held-out {held_target:,} exceed the {space:,} "
                          f"instances of {task.describe()}")
    classes = task if pool.split == "symmetric" else Singletons(task)
    shuffle = Shuffle(classes.class_count(), [pool.seed, _stable_seed(name, pool.split)])
    sizes = _ClassSizes(classes, shuffle, f"{where}.pool")
    held_classes, held_size = sizes.reach(0, held_target)
    if seen_target is None:  # every class not held out
        seen_classes, seen_size = classes.class_count() - held_classes, space - held_size
    else:
        seen_classes, seen_size = sizes.reach(held_classes, seen_target) or (0, 0)
    part_sizes = [seen_size] if len(parts) == 1 else sizes.parts(held_classes, seen_classes, len(parts))
    if seen_classes < len(parts) or min(part_sizes) < 1:
        raise ConfigError(f"{where}.pool: after {held_size:,} held-out instances ({held_classes:,} whole classes: "
                          f"{classes.symmetry}), the {space:,} instances of {task.describe()} leave no seen pool of "
                          f"{seen_target or 1:,} instances for each of its {len(parts)} part(s) {parts}")
    return SpacePool(name, pool.split, classes, shuffle, held_classes, seen_classes, held_size, list(parts), part_sizes)


def split_pool(task: Task, params: dict, pool: PoolConfig, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(seen, held_out) instance ids of a task alone on its space (small spaces: the seen pool is listed whole)."""
    sp = make_space_pool(task, pool, ["task"], where)
    return sp.part_items(0, sp.part_sizes[0]), sp.held_out_items()


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
    pool: SpacePool     # the split of the task's instance space, common to every task on it
    part: int           # the task's part of the space's seen pool
    counts: np.ndarray

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def space(self) -> str:
        return self.pool.space

    @property
    def seen_size(self) -> int:
        """Instances the task draws from: its part of the space's seen pool."""
        return self.pool.part_sizes[self.part]

    @property
    def held_out(self) -> np.ndarray:
        """The space's held-out instance ids, ascending."""
        return self.pool.held_out_items()

    def first_seen(self, n: int) -> np.ndarray:
        """The first n instances of the task's seen part, in pool order."""
        return self.pool.part_items(self.part, n)


SPLIT_FIELDS = ("held_out", "seen", "seed", "split")
"""The pool settings that define a space's split: equal for every task on the space."""


def make_pools(configs: list[TaskConfig], tasks: list[Task]) -> list[tuple[SpacePool, int]]:
    """(space pool, part) per task. Tasks on one space share its split; each draws from its own part of the seen
    pool, except tasks that name one `share` group, which draw from a common part. Parts in config order."""
    spaces: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        spaces.setdefault(task_space(task), []).append(i)
    out: list = [None] * len(tasks)
    for space, members in spaces.items():
        first = configs[members[0]]
        for i in members[1:]:
            for key in SPLIT_FIELDS:
                if getattr(configs[i].pool, key) != getattr(first.pool, key):
                    raise ConfigError(f"tasks[{i}].pool.{key}: {configs[i].name} and {first.name} are both on {space}, "
                                      f"whose tasks share one seen/held-out split; got {getattr(configs[i].pool, key)!r} "
                                      f"and {getattr(first.pool, key)!r}")
        labels = [f"share:{configs[i].pool.share}" if configs[i].pool.share else f"task:{configs[i].name}" for i in members]
        parts = list(dict.fromkeys(labels))
        pool = make_space_pool(tasks[members[0]], first.pool, parts, f"tasks[{members[0]}]")
        for i, label in zip(members, labels):
            out[i] = (pool, parts.index(label))
    return out


def make_specs(config: BuildConfig) -> list[Spec]:
    steps = config.training.steps
    tasks = [make_task(tc.task, tc.params, f"tasks[{i}]") for i, tc in enumerate(config.tasks)]
    # Encodings first: a vocabulary or template error names its field before any pool work.
    encoders = [Encoder(task, tc, config.tokenizer, f"tasks[{i}]") for i, (task, tc) in enumerate(zip(tasks, config.tasks))]
    specs = []
    for i, (tc, task, encoder, (pool, part)) in enumerate(zip(config.tasks, tasks, encoders, make_pools(config.tasks, tasks))):
        rng = np.random.default_rng([config.seed, _stable_seed("counts", tc.name)])
        counts = schedule_counts(tc.schedule, steps, rng)
        spec = Spec(i, tc, task, encoder, pool, part, counts)
        if tc.pool.draw == "no-repeat" and counts.sum() > spec.seen_size:
            raise ConfigError(f"tasks[{i}].pool: draw 'no-repeat' needs {int(counts.sum()):,} seen instances, "
                              f"its part of the seen pool ({pool.parts[part]}) has {spec.seen_size:,}")
        specs.append(spec)
    return specs


def draw_cycle(config: BuildConfig, spec: Spec, n: int) -> np.ndarray:
    """cycle / no-repeat: the first min(n, part size) instances of the task's part, in an order shuffled once
    (the same order for tasks of one share group); example k draws cycle[k % len(cycle)]."""
    base = spec.first_seen(n)
    if not len(base):
        return base
    label = spec.pool.parts[spec.part]
    return base[np.random.default_rng([config.seed, _stable_seed("cycle", spec.space, label)]).permutation(len(base))]


def draw_items(config: BuildConfig, spec: Spec, n: int, rng: np.random.Generator) -> np.ndarray:
    """The seen instances of a task's n examples, in order (cycle / no-repeat: `draw_cycle` repeated; uniform:
    with replacement over the part)."""
    if spec.config.pool.draw == "uniform":
        return spec.pool.uniform_items(spec.part, n, rng)
    cycle = draw_cycle(config, spec, n)
    return cycle[np.arange(n) % len(cycle)] if len(cycle) else cycle


DRAW_CHUNK = 1 << 22


@dataclass
class Draws:
    """One task's examples, by their index k in the task's own order (step order): the seen instance drawn, the
    template, and the row of the example's token ids in `flat`/`starts`. Kept compact: cycle draws keep only the
    cycle (at most the task's part); templates per example only when the task has several (int16); uniform draws
    keep each example's instance and token row."""

    count: int
    templates_per_item: int
    cycle: np.ndarray | None      # cycle / no-repeat: example k is cycle[k % len(cycle)]
    items: np.ndarray | None      # uniform: every example's instance
    templates: np.ndarray | None  # every example's template; None: the task has one template
    row_of_key: np.ndarray | None  # cycle with several templates: token row of (k % len(cycle)) * T + template
    rows: np.ndarray | None       # uniform: every example's token row
    flat: np.ndarray              # token ids of every distinct (instance, template), without EOS
    starts: np.ndarray
    lengths: np.ndarray           # per token row: its tokens and the closing EOS

    def item(self, k: np.ndarray) -> np.ndarray:
        return self.items[k] if self.items is not None else self.cycle[k % len(self.cycle)]

    def template(self, k: np.ndarray) -> np.ndarray:
        return self.templates[k] if self.templates is not None else np.zeros(len(k), np.int16)

    def row(self, k: np.ndarray) -> np.ndarray:
        if self.rows is not None:
            return self.rows[k]
        position = k % len(self.cycle)
        if self.templates is None:
            return position
        return self.row_of_key[position * self.templates_per_item + self.templates[k]]


def make_draws(config: BuildConfig, spec: Spec, n: int) -> Draws:
    """A task's n examples: instances drawn, templates drawn (with the same generator, after the instances), and
    each distinct (instance, template) encoded once."""
    rng = np.random.default_rng([config.seed, _stable_seed("draws", spec.name)])
    T = len(spec.encoder.templates)
    uniform = spec.config.pool.draw == "uniform"
    items = spec.pool.uniform_items(spec.part, n, rng) if uniform else None
    cycle = None if uniform else draw_cycle(config, spec, n)
    # Drawn in chunks: PCG64 keeps its spare 32 bits between calls, so the values are those of one call.
    templates = None if T == 1 else np.concatenate(
        [np.zeros(0, np.int16)] + [rng.integers(0, T, min(DRAW_CHUNK, n - x)).astype(np.int16) for x in range(0, n, DRAW_CHUNK)])
    row_of_key = rows = None
    if uniform:
        keys = items * T + (templates if templates is not None else 0)
        unique, inverse = np.unique(keys, return_inverse=True)
        rows = inverse.astype(np.int64)
    elif templates is None:
        unique = np.arange(len(cycle), dtype=np.int64)  # every position of the cycle is drawn (len(cycle) <= n)
    else:
        used = np.zeros(len(cycle) * T, dtype=bool)
        for x in range(0, n, DRAW_CHUNK):
            k = np.arange(x, min(x + DRAW_CHUNK, n))
            used[(k % len(cycle)) * T + templates[k]] = True
        unique = np.flatnonzero(used)
        row_of_key = np.full(len(used), -1, dtype=np.int64)
        row_of_key[unique] = np.arange(len(unique))
    pool_items = items if uniform else cycle
    encoded_items = unique // T if uniform else pool_items[unique // T]
    flat, starts = spec.encoder.encode_table(encoded_items, unique % T)
    lengths = np.diff(starts) + 1
    L = config.sequence_length
    if len(lengths) and lengths.max() > L - 1:
        raise ConfigError(f"tasks[{spec.index}]: an example of {int(lengths.max())} tokens (with EOS) does not fit "
                          f"an instance of sequence_length {L} after its leading EOS")
    return Draws(n, T, cycle, items, templates, row_of_key, rows, flat, starts, lengths)


def pool_arrays(specs: list[Spec]) -> dict[str, np.ndarray]:
    """pools.npz: held_out_<i> (the space's held-out ids, ascending) and seen_<i> (the task's part, in pool
    order) for each task; seen_<i> is left out when the part holds more than MAX_RECORDED_POOL instances."""
    arrays = {}
    for s in specs:
        if s.seen_size <= MAX_RECORDED_POOL:
            arrays[f"seen_{s.index}"] = s.first_seen(s.seen_size)
        arrays[f"held_out_{s.index}"] = s.held_out
    return arrays


def pool_record(spec: Spec) -> dict:
    """The manifest's account of a task's pools (beside seen_size / held_out_size)."""
    return spec.pool.record(spec.part, spec.seen_size <= MAX_RECORDED_POOL)


@dataclass
class PlanRows:
    """Injected examples of a range of steps, one row each in (step, task) order, and where each goes."""

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

    def _dense_key(self) -> tuple[np.ndarray, int, int] | None:
        """(batch position - low, low, span) when the positions span little more than the rows: then counting
        sorts (bincount) replace sorting."""
        key = self.batch_positions()
        low, span = int(key.min()), int(key.max() - key.min()) + 1
        return (key - low, low, span) if span <= 4 * len(key) + (1 << 22) else None

    def layout(self) -> None:
        """Offsets from slots: each instance's block starts with EOS; its examples follow in plan order."""
        if not self.examples:
            return
        dense = self._dense_key()
        if dense is not None and np.bincount(dense[0], minlength=dense[2]).max() == 1:
            self.offset[:] = 1  # one example per instance (the common case): no sort
            return
        key = self.batch_positions()
        rows = np.lexsort((np.arange(self.examples), self.slot, self.step))
        key = key[rows]
        length = self.length[rows]
        ends = np.cumsum(length)
        group_start = np.concatenate([[True], key[1:] != key[:-1]])
        base = np.maximum.accumulate(np.where(group_start, ends - length, 0))
        self.offset[rows] = 1 + ends - length - base

    def block_lengths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(step, slot, block length) of every instance that holds examples, sorted by (step, slot)."""
        dense = self._dense_key()
        if dense is not None:
            key, low, span = dense
            occupied = np.bincount(key, minlength=span) > 0
            totals = np.bincount(key, weights=self.length, minlength=span)[occupied].astype(np.int64) + 1
            unique = np.flatnonzero(occupied) + low
            return (unique // self.batch_size + 1), unique % self.batch_size, totals
        key = self.batch_positions()
        unique, inverse = np.unique(key, return_inverse=True)
        totals = np.bincount(inverse, weights=self.length, minlength=len(unique)).astype(np.int64) + 1
        return (unique // self.batch_size + 1), unique % self.batch_size, totals


@dataclass
class BlockStats:
    """The blocks (instances holding examples) of a plan, summed: what the capacity check, the instance count and
    the manifest need, without a row per block. Lengths count the block's leading EOS."""

    count: int
    tokens: int
    step_tokens: np.ndarray   # per step (index 0 = step 1): its blocks' tokens
    step_blocks: np.ndarray   # per step: its blocks
    longest: int
    longest_step: int         # the first step holding a block of `longest` tokens

    @classmethod
    def of(cls, parts: list["BlockStats"]) -> "BlockStats":
        step_tokens = np.sum([p.step_tokens for p in parts], axis=0)
        step_blocks = np.sum([p.step_blocks for p in parts], axis=0)
        best = max(parts, key=lambda p: p.longest)  # max keeps the first of equals: the earliest step
        return cls(sum(p.count for p in parts), sum(p.tokens for p in parts), step_tokens, step_blocks, best.longest,
                   best.longest_step)


def block_stats(rows: PlanRows, steps: int) -> BlockStats:
    """BlockStats of the rows (any range of steps; step_* arrays cover all `steps`)."""
    step_tokens, step_blocks = np.zeros(steps, np.float64), np.zeros(steps, np.float64)
    if not rows.examples:
        return BlockStats(0, 0, step_tokens, step_blocks, 0, 0)
    step, _, lengths = rows.block_lengths()
    step_tokens += np.bincount(step - 1, weights=lengths, minlength=steps)
    step_blocks += np.bincount(step - 1, minlength=steps)
    top = int(lengths.argmax())
    return BlockStats(len(lengths), int(lengths.sum()), step_tokens, step_blocks, int(lengths[top]), int(step[top]))


PLAN_STEPS_PER_BLOCK = 1 << 10


@dataclass
class Plan:
    """Every injected example, in (step, task) order, kept compact: per-step counts and each task's draws.
    `rows(first, stop)` lays out the examples of a range of steps; `blocks()` streams the whole plan that way."""

    specs: list[Spec]
    batch_size: int
    sequence_length: int
    counts: np.ndarray       # [steps, specs] examples per step and task
    draws: list[Draws]
    stats: BlockStats | None = None  # the blocks summed (set by make_plan, which checks capacity with it)

    def __post_init__(self):
        self.task_first = np.concatenate([np.zeros((1, len(self.specs)), np.int64), np.cumsum(self.counts, axis=0)])
        self.step_first = np.concatenate([[0], np.cumsum(self.counts.sum(axis=1))]).astype(np.int64)
        self._all: PlanRows | None = None

    @property
    def steps(self) -> int:
        return len(self.counts)

    @property
    def examples(self) -> int:
        return int(self.step_first[-1])

    def rows(self, first: int, stop: int) -> PlanRows:
        """The examples of steps first+1 .. stop, laid out (slots round robin, offsets)."""
        counts, S, B = self.counts[first:stop], len(self.specs), self.batch_size
        flat = counts.ravel()
        step = np.repeat(np.repeat(np.arange(first + 1, stop + 1, dtype=np.int32), S), flat)
        spec = np.repeat(np.tile(np.arange(S, dtype=np.int16), stop - first), flat)
        n = len(step)
        item, template = np.zeros(n, np.int64), np.zeros(n, np.int16)
        token_ref, length = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for s, draws in enumerate(self.draws):
            k = np.arange(self.task_first[first, s], self.task_first[stop, s])
            if not len(k):
                continue
            where = slice(None) if len(k) == n else spec == s
            item[where], template[where] = draws.item(k), draws.template(k)
            token_ref[where] = ref = draws.row(k)
            length[where] = draws.lengths[ref]
        # Round robin over the batch's instances: example j of a step goes to slot j mod B.
        per_step = counts.sum(axis=1)
        j = np.arange(n) - np.repeat(self.step_first[first:stop] - self.step_first[first], per_step)
        rows = PlanRows(self.specs, B, self.sequence_length, step, spec, item, template, (j % B).astype(np.int32),
                        np.zeros(n, np.int32), length, [(d.flat, d.starts) for d in self.draws], token_ref)
        rows.layout()
        return rows

    def blocks(self, steps_per_block: int = PLAN_STEPS_PER_BLOCK):
        """(first step index, rows) for consecutive ranges of steps: the whole plan, a bounded part at a time."""
        for first in range(0, self.steps, steps_per_block):
            yield first, self.rows(first, min(first + steps_per_block, self.steps))

    def all_rows(self) -> PlanRows:
        """Every example's row at once (memory per example: the build's placement still needs them together),
        filled block by block into arrays allocated once."""
        if self._all is None:
            names = ("step", "spec", "item", "template", "slot", "offset", "length", "token_ref")
            columns, table = None, [(d.flat, d.starts) for d in self.draws]
            for first, rows in self.blocks():
                if columns is None:
                    columns = {name: np.empty(self.examples, getattr(rows, name).dtype) for name in names}
                start = int(self.step_first[first])
                for name in names:
                    columns[name][start : start + rows.examples] = getattr(rows, name)
            if columns is None:
                columns = {name: getattr(self.rows(0, 0), name) for name in names}
            token_ref = columns.pop("token_ref")
            self._all = PlanRows(self.specs, self.batch_size, self.sequence_length, **columns, token_table=table,
                                 token_ref=token_ref)
        return self._all

    # Columns of every example (tests and small plans).
    step = property(lambda self: self.all_rows().step)
    spec = property(lambda self: self.all_rows().spec)
    item = property(lambda self: self.all_rows().item)
    template = property(lambda self: self.all_rows().template)
    slot = property(lambda self: self.all_rows().slot)
    offset = property(lambda self: self.all_rows().offset)
    length = property(lambda self: self.all_rows().length)


def make_plan(config: BuildConfig, specs: list[Spec]) -> Plan:
    steps, B, L = config.training.steps, config.training.global_batch_size, config.sequence_length
    counts = np.stack([s.counts for s in specs], axis=1) if specs else np.zeros((steps, 0), np.int64)
    draws = [make_draws(config, s, int(counts[:, s.index].sum())) for s in specs]
    plan = Plan(specs, B, L, counts, draws)
    plan.stats = BlockStats.of([block_stats(rows, steps) for _, rows in plan.blocks()]) if steps else None
    _check_capacity(config, plan, counts)
    return plan


def _check_capacity(config: BuildConfig, plan: Plan, counts: np.ndarray) -> None:
    B, L = plan.batch_size, plan.sequence_length
    if not plan.examples:
        return
    stats = plan.stats
    if stats.longest > L:
        raise ConfigError(f"tasks: step {stats.longest_step} needs {stats.longest} tokens in one instance "
                          f"(sequence_length {L}); lower the rates")
    share = stats.step_tokens / (B * L)
    worst = int(share.argmax())
    if share[worst] > config.max_batch_share:
        names = ", ".join(f"{s.name}={int(counts[worst, s.index])}" for s in plan.specs if counts[worst, s.index])
        raise ConfigError(f"max_batch_share: step {worst + 1} holds {int(stats.step_tokens[worst]):,} injected tokens ({names}), "
                          f"{share[worst]:.1%} of the batch's {B * L:,} tokens; the limit is {config.max_batch_share:.0%}")


def olmo_order(num_instances: int, batch_size: int, seed: int, drop_last: bool) -> np.ndarray:
    """ai2-olmo 0.6.0's global instance order of epoch 0 (one rank), as its IterableDataset builds it."""
    return ai2_olmo_order(num_instances, seed, drop_last, epoch=FIRST_EPOCH["ai2-olmo"])


def trainer_instances(training: TrainingConfig, num_instances: int, sequence_length: int) -> int:
    """Instances the target trainer's dataset finds in a build of `num_instances` instances (its `usable_instances`)."""
    return trainers.get(training.trainer).usable_instances(num_instances, training, sequence_length)


def training_order(training: TrainingConfig, num_instances: int, sequence_length: int) -> np.ndarray:
    """The global order the target trainer reads a build of `num_instances` instances in, from its first epoch:
    position (step - 1) * B + slot holds the instance of that step's batch slot (its `order`)."""
    return trainers.get(training.trainer).order(num_instances, training, sequence_length)


def check_epoch(config: BuildConfig, num_instances: int) -> None:
    t = config.training
    usable = trainer_instances(t, num_instances, config.sequence_length)
    needed = t.steps * t.global_batch_size
    # OLMo-core cuts its order to whole batches; ai2-olmo's first `steps` batches need as many instances
    if usable // t.global_batch_size < t.steps:
        L = config.sequence_length
        epoch = FIRST_EPOCH[t.trainer]
        lost = f" ({num_instances - usable:,} of them past whole groups of max_target_sequence_length)" if usable < num_instances else ""
        raise InjectError(
            f"training.steps: {t.steps:,} steps x {t.global_batch_size} instances = {needed:,} instances, but the "
            f"corpus gives {num_instances:,} ({num_instances * L:,} tokens at sequence_length {L}){lost}; the run would "
            f"leave epoch {epoch}. Add about {(needed - usable) * L:,} tokens of input or lower steps."
        )


def order_digest(order: np.ndarray, count: int) -> str:
    return hashlib.sha256(np.ascontiguousarray(order[:count], dtype=np.uint32).tobytes()).hexdigest()
