"""Synthetic tasks: each a small class over an enumerable instance space.

A task maps an instance index (0 .. space_size-1) to an instance (a tuple of ints), knows the answer and
the answer candidates (for ranked-choice evaluation), declares its symmetries (instances that are the same
question in another form: comparison (a, b) and (b, a); modular addition, any order of the operands) as
equivalence classes, and renders an instance in two encodings:

- `text`: a natural-language template; prompt and answer are tokenized separately with the run's
  tokenizer and concatenated, so that evaluation scores the answer with exactly the training split;
- `tokens`: the reference experiment's compact form, one token per number then the label token
  (`TOK1 TOK2 LABEL`), through a declared mapping from numbers to single token ids that is checked.

Adding a task: subclass `Task`, implement the five methods, decorate with `@register("name")`. A task that
declares no symmetry has every instance as its own class; one that has symmetries overrides the class methods
(`canonical`, `class_count`, `class_of`, `class_members`, `class_sizes`, `max_class_size`, `irregular_classes`),
all vectorized over numpy arrays of int64 ids so that huge spaces are never materialized.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np

from .configtools import from_dict
from .errors import ConfigError

MAX_SPACE = 1 << 62
"""Largest instance space: instance and class ids are int64."""

MAX_LISTED_IRREGULAR = 1 << 22

TASKS: dict[str, type["Task"]] = {}


def register(name: str):
    def wrap(cls):
        cls.kind = name
        TASKS[name] = cls
        return cls

    return wrap


def make_task(kind: str, params: dict, where: str) -> "Task":
    if kind not in TASKS:
        raise ConfigError(f"{where}.task: unknown task {kind!r}; expected one of {sorted(TASKS)}")
    try:  # typed like the config: a wrong type or unknown key is named (`digits: "3"`)
        return from_dict(TASKS[kind], params, f"{where}.params")
    except ValueError as e:
        raise ConfigError(f"{where}.params: {e}") from None


class EachInstanceItsOwnClass:
    """The trivial symmetry: every instance is its own class (class id = instance id)."""

    symmetry: ClassVar[str] = "none (every instance its own class)"

    def space_size(self) -> int:
        raise NotImplementedError

    def canonical(self, instance: tuple[int, ...]) -> tuple[int, ...]:
        """The representative of the instance's class (two instances are twins iff their canonicals are equal)."""
        return tuple(instance)

    def class_count(self) -> int:
        return self.space_size()

    @property
    def max_class_size(self) -> int:
        return 1

    def class_of(self, items: np.ndarray) -> np.ndarray:
        """Class id (0 .. class_count-1) of each instance id."""
        return np.atleast_1d(np.asarray(items, dtype=np.int64))

    def class_members(self, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `classes`, instance id) of every member of each class: classes in the given order,
        each one's members by ascending instance id."""
        classes = np.atleast_1d(np.asarray(classes, dtype=np.int64))
        return np.arange(len(classes)), classes

    def class_sizes(self, classes: np.ndarray) -> np.ndarray:
        return np.ones(len(classes), dtype=np.int64)

    def irregular_classes(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(class ids, sizes) of every class smaller than max_class_size, or None when they are too many to list."""
        return np.zeros(0, np.int64), np.zeros(0, np.int64)


class Singletons(EachInstanceItsOwnClass):
    """A task's space with each instance its own class: the `ordered` split, where twins may fall on both sides."""

    symmetry: ClassVar[str] = "none (split: ordered, each instance its own class)"

    def __init__(self, task: "Task"):
        self.task = task

    def space_size(self) -> int:
        return self.task.space_size()


def _pair_rank(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Rank of the pair lo < hi among all such pairs, in colex order: hi(hi-1)/2 + lo."""
    return hi * (hi - 1) // 2 + lo


def _pair_unrank(rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of _pair_rank (float estimate, then corrected exactly in integers)."""
    rank = np.atleast_1d(np.asarray(rank, dtype=np.int64))
    hi = np.floor((1 + np.sqrt(1 + 8 * rank.astype(np.float64))) / 2).astype(np.int64)
    for _ in range(2):
        hi = np.where(hi * (hi - 1) // 2 > rank, hi - 1, hi)
        hi = np.where((hi + 1) * hi // 2 <= rank, hi + 1, hi)
    return rank - hi * (hi - 1) // 2, hi


def _check_space(task: "Task") -> None:
    if task.space_size() > MAX_SPACE:
        raise ValueError(f"{task.describe()} has {task.space_size():,} instances; at most 2**62 are supported")


class Task(EachInstanceItsOwnClass):
    kind: ClassVar[str]
    default_templates: ClassVar[list[str]]
    """Templates use {a}, {b}, ... for the instance's numbers and {answer}; the answer comes last."""

    def space_size(self) -> int:
        raise NotImplementedError

    def instance(self, index: int) -> tuple[int, ...]:
        raise NotImplementedError

    def index(self, instance: tuple[int, ...]) -> int | None:
        """Inverse of `instance`, or None when the tuple is not in the space."""
        raise NotImplementedError

    def instances(self, items: np.ndarray) -> list[tuple[int, ...]]:
        """`instance` of each id (tasks override it with a vectorized version)."""
        return [self.instance(i) for i in np.asarray(items, dtype=np.int64).tolist()]

    def answer(self, instance: tuple[int, ...]) -> int:
        """The answer, as an index into `candidates(instance)`."""
        raise NotImplementedError

    def candidates(self, instance: tuple[int, ...]) -> list[str]:
        """Answer strings for ranked choice (text encoding), in a fixed order."""
        raise NotImplementedError

    def answer_text(self, instance: tuple[int, ...]) -> str:
        """The right candidate's string."""
        return self.candidates(instance)[self.answer(instance)]

    def unseen_templates(self) -> list[str]:
        """Phrasings for evaluation that no default training template uses: they separate the rule from
        the format (a model that learned the rule answers them too)."""
        raise NotImplementedError

    label_names: ClassVar[list[str] | None] = None
    """tokens encoding: the label tokens' texts; None when the label is a number (its token is the number's)."""

    def label(self, instance: tuple[int, ...]) -> int:
        """tokens encoding: the label, a number or an index into `label_names`."""
        return self.answer(instance)

    def numbers(self) -> range:
        """tokens encoding: every number an instance can contain."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


FIELDS = string.ascii_lowercase


@register("comparison")
@dataclass(frozen=True)
class Comparison(Task):
    """Two different `digits`-digit numbers; the answer is the larger one."""

    digits: int = 2
    default_templates: ClassVar[list[str]] = ["Which is larger, {a} or {b}? {answer}"]

    def __post_init__(self):
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 9:
            raise ValueError(f"digits: expected a whole number 1..9, got {self.digits!r}")

    @property
    def low(self) -> int:
        return 10 ** (self.digits - 1) if self.digits > 1 else 0

    @property
    def count(self) -> int:
        return 10**self.digits - self.low

    def space_size(self) -> int:
        return self.count * (self.count - 1)

    def instance(self, index: int) -> tuple[int, int]:
        i, j = divmod(int(index), self.count - 1)
        j += j >= i
        return self.low + i, self.low + j

    def instances(self, items):
        i, j = self._pairs(items)
        return list(zip((self.low + i).tolist(), (self.low + j).tolist()))

    def index(self, instance):
        if len(instance) != 2:
            return None
        i, j = instance[0] - self.low, instance[1] - self.low
        if not (0 <= i < self.count and 0 <= j < self.count) or i == j:
            return None
        return i * (self.count - 1) + j - (j > i)

    def answer(self, instance) -> int:
        return 0 if instance[0] > instance[1] else 1

    # Symmetry: (a, b) and (b, a) ask the same question; a class is the unordered pair {a, b}.
    symmetry: ClassVar[str] = "the unordered pair {a, b}"

    def canonical(self, instance) -> tuple[int, int]:
        return (min(instance), max(instance))

    def class_count(self) -> int:
        return self.count * (self.count - 1) // 2

    @property
    def max_class_size(self) -> int:
        return 2

    def _pairs(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i, jj = np.divmod(np.atleast_1d(np.asarray(items, dtype=np.int64)), self.count - 1)
        return i, jj + (jj >= i)

    def _index(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return i * (self.count - 1) + j - (j > i)

    def class_of(self, items):
        i, j = self._pairs(items)
        return _pair_rank(np.minimum(i, j), np.maximum(i, j))

    def class_members(self, classes):
        lo, hi = _pair_unrank(classes)
        owners = np.repeat(np.arange(len(lo)), 2)
        return owners, np.stack([self._index(lo, hi), self._index(hi, lo)], axis=1).ravel()

    def class_sizes(self, classes):
        return np.full(len(classes), 2, dtype=np.int64)

    def candidates(self, instance) -> list[str]:
        return [str(instance[0]), str(instance[1])]

    def unseen_templates(self) -> list[str]:
        return ["Of {a} and {b}, the larger number is {answer}", "max({a}, {b}) = {answer}"]

    label_names: ClassVar[list[str] | None] = [">", "<"]

    def numbers(self) -> range:
        return range(self.low, 10**self.digits)

    def describe(self) -> str:
        return f"comparison, {self.digits} digits"


@register("modular_addition")
@dataclass(frozen=True)
class ModularAddition(Task):
    """`operands` numbers in [0, modulus); the answer is their sum modulo `modulus`."""

    modulus: int = 97
    operands: int = 2
    default_templates: ClassVar[list[str]] = ["{a} + {b} mod {p} = {answer}"]

    def __post_init__(self):
        if not isinstance(self.modulus, int) or self.modulus < 2:
            raise ValueError(f"modulus: expected a whole number >= 2, got {self.modulus!r}")
        if not isinstance(self.operands, int) or not 2 <= self.operands <= 8:
            raise ValueError(f"operands: expected a whole number 2..8, got {self.operands!r}")
        _check_space(self)

    def space_size(self) -> int:
        return self.modulus**self.operands

    def instance(self, index: int) -> tuple[int, ...]:
        digits = []
        index = int(index)
        for _ in range(self.operands):
            index, d = divmod(index, self.modulus)
            digits.append(d)
        return tuple(reversed(digits))

    def instances(self, items):
        return list(map(tuple, self._digits(items).tolist()))

    def index(self, instance):
        if len(instance) != self.operands or not all(0 <= x < self.modulus for x in instance):
            return None
        value = 0
        for x in instance:
            value = value * self.modulus + x
        return value

    def answer(self, instance) -> int:
        return sum(instance) % self.modulus

    # Symmetry: addition commutes; a class is the multiset of operands (the sorted tuple), ranked in the
    # combinatorial number system (operand t of the sorted tuple becomes the distinct number x_t + t).
    symmetry: ClassVar[str] = "the multiset of operands"

    def canonical(self, instance) -> tuple[int, ...]:
        return tuple(sorted(instance))

    def class_count(self) -> int:
        return math.comb(self.modulus + self.operands - 1, self.operands)

    @property
    def max_class_size(self) -> int:
        return math.factorial(self.operands) if self.modulus >= self.operands else self._largest_class()

    def _largest_class(self) -> int:
        k, p = self.operands, self.modulus
        counts = [k // p + (r < k % p) for r in range(p)]  # the most even spread of k operands over p values
        return math.factorial(k) // math.prod(math.factorial(c) for c in counts)

    def _digits(self, items: np.ndarray) -> np.ndarray:
        """[n, operands] operands of each instance id, most significant first (as `instance`)."""
        rest = np.atleast_1d(np.asarray(items, dtype=np.int64))
        columns = []
        for _ in range(self.operands):
            rest, d = np.divmod(rest, self.modulus)
            columns.append(d)
        return np.stack(columns[::-1], axis=1)

    def class_of(self, items):
        x = np.sort(self._digits(items), axis=1)
        if self.operands == 2:
            return _pair_rank(x[:, 0], x[:, 1] + 1)
        tables = _binomial_tables(self.modulus + self.operands - 1, self.operands)
        y = x + np.arange(self.operands)
        return sum(tables[t + 1][y[:, t]] for t in range(self.operands))

    def _sorted_operands(self, classes: np.ndarray) -> np.ndarray:
        classes = np.atleast_1d(np.asarray(classes, dtype=np.int64))
        if self.operands == 2:
            lo, hi = _pair_unrank(classes)
            return np.stack([lo, hi - 1], axis=1)
        tables = _binomial_tables(self.modulus + self.operands - 1, self.operands)
        rest, columns = classes.copy(), []
        for t in range(self.operands - 1, -1, -1):
            y = np.searchsorted(tables[t + 1], rest, side="right") - 1
            rest = rest - tables[t + 1][y]
            columns.append(y - t)
        return np.stack(columns[::-1], axis=1)

    def _index_of(self, x: np.ndarray) -> np.ndarray:
        value = np.zeros(len(x), dtype=np.int64)
        for t in range(x.shape[1]):
            value = value * self.modulus + x[:, t]
        return value

    def class_members(self, classes):
        x = self._sorted_operands(classes)
        if self.operands == 2:
            a, b = self._index_of(x), self._index_of(x[:, ::-1])
            two = a != b
            owners = np.repeat(np.arange(len(x)), 1 + two)
            items = np.stack([a, b], axis=1).ravel()[np.stack([np.ones_like(two), two], axis=1).ravel()]
            return owners, items
        owners, items = [], []
        for position, row in enumerate(x.tolist()):
            members = sorted(self.index(p) for p in set(itertools.permutations(row)))
            owners += [position] * len(members)
            items += members
        return np.array(owners, dtype=np.int64), np.array(items, dtype=np.int64)

    def class_sizes(self, classes):
        x = self._sorted_operands(classes)
        run = np.ones(len(x), dtype=np.int64)
        repeats = np.ones(len(x), dtype=np.int64)  # product of the factorials of each operand's multiplicity
        for t in range(1, x.shape[1]):
            run = np.where(x[:, t] == x[:, t - 1], run + 1, 1)
            repeats *= run
        return math.factorial(self.operands) // repeats

    def irregular_classes(self):
        if self.operands != 2 or self.modulus > MAX_LISTED_IRREGULAR:
            return None
        x = np.arange(self.modulus, dtype=np.int64)  # the diagonal {x, x}: one member instead of two
        return _pair_rank(x, x + 1), np.ones(self.modulus, dtype=np.int64)

    def candidates(self, instance) -> list[str]:
        return [str(r) for r in range(self.modulus)]

    def answer_text(self, instance) -> str:
        return str(self.answer(instance))  # without listing every candidate

    def numbers(self) -> range:
        return range(self.modulus)

    @property
    def default_template(self) -> str:
        return self._sum() + " mod {p} = {answer}"

    def unseen_templates(self) -> list[str]:
        return [f"({self._sum()}) % {{p}} = {{answer}}", f"The remainder of {self._sum()} divided by {{p}} is {{answer}}"]

    def _sum(self) -> str:
        return " + ".join("{" + FIELDS[i] + "}" for i in range(self.operands))

    def describe(self) -> str:
        return f"modular addition, {self.operands} operands mod {self.modulus}"


@lru_cache(maxsize=8)
def _binomial_tables(size: int, k: int) -> dict[int, np.ndarray]:
    """tables[i][y] = C(y, i) for y in 0..size-1, i in 1..k (for operands >= 3, where size <= 2**21)."""
    tables = {1: np.arange(size, dtype=np.int64)}
    for i in range(2, k + 1):
        tables[i] = np.concatenate([[0], np.cumsum(tables[i - 1])[:-1]]).astype(np.int64)
    return tables


def templates_for(task: Task, templates: list[str] | None) -> list[str]:
    if templates:
        return templates
    if isinstance(task, ModularAddition):
        return [task.default_template]
    return list(task.default_templates)


def check_template(task: Task, template: str, where: str) -> None:
    """A template must use each of the instance's numbers once and end with {answer}."""
    n = len(task.instance(0))
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    expected = set(FIELDS[:n]) | {"answer"}
    allowed = expected | {"p"}
    if not template.endswith("{answer}") or not expected <= set(names) or not set(names) <= allowed:
        raise ConfigError(
            f"{where}: template {template!r} must use {sorted(expected - {'answer'})} and end with '{{answer}}'"
        )


def render_text(task: Task, instance: tuple[int, ...], template: str) -> tuple[str, str]:
    """(prompt, answer) strings; the answer keeps the space before it, as the tokenizer sees it."""
    values = {FIELDS[i]: v for i, v in enumerate(instance)}
    values["p"] = getattr(task, "modulus", "")
    head = template[: -len("{answer}")]
    prompt = head.format(**values)
    answer = task.answer_text(instance)
    if prompt.endswith(" "):
        prompt, answer = prompt[:-1], " " + answer
    return prompt, answer


def template_regex(task: Task, template: str) -> re.Pattern:
    """Parses a rendered example back into its numbers (for `verify`)."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if field is not None:
            if field == "p":
                out.append(re.escape(str(getattr(task, "modulus", ""))))
            else:
                out.append(rf"(?P<{field}>\S+)" if field == "answer" else rf"(?P<{field}>\d+)")
    return re.compile("".join(out) + r"\Z")


def parse_text(task: Task, text: str, patterns: list[re.Pattern]) -> tuple[tuple[int, ...], int, bool] | None:
    """(instance, template index, answer correct) of a rendered example, or None."""
    n = len(task.instance(0))
    for t, pattern in enumerate(patterns):
        m = pattern.match(text)
        if m:
            instance = tuple(int(m.group(FIELDS[i])) for i in range(n))
            if task.index(instance) is None:
                return None
            correct = m.group("answer") == task.answer_text(instance)
            return instance, t, correct
    return None
