"""Synthetic tasks: each a small class over an enumerable instance space.

A task maps an instance index (0 .. space_size-1) to an instance (a tuple of ints), knows the answer and
the answer candidates (for ranked-choice evaluation), and renders an instance in two encodings:

- `text`: a natural-language template; prompt and answer are tokenized separately with the run's
  tokenizer and concatenated, so that evaluation scores the answer with exactly the training split;
- `tokens`: the reference experiment's compact form, one token per number then the label token
  (`TOK1 TOK2 LABEL`), through a declared mapping from numbers to single token ids that is checked.

Adding a task: subclass `Task`, implement the five methods, decorate with `@register("name")`.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import ClassVar

from .errors import ConfigError

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
    try:
        return TASKS[kind](**params)
    except TypeError as e:
        raise ConfigError(f"{where}.params: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}.params: {e}") from None


class Task:
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

    def answer(self, instance: tuple[int, ...]) -> int:
        """The answer, as an index into `candidates(instance)`."""
        raise NotImplementedError

    def candidates(self, instance: tuple[int, ...]) -> list[str]:
        """Answer strings for ranked choice (text encoding), in a fixed order."""
        raise NotImplementedError

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
        if not 1 <= self.digits <= 9:
            raise ValueError(f"digits: expected 1..9, got {self.digits}")

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

    def index(self, instance):
        if len(instance) != 2:
            return None
        i, j = instance[0] - self.low, instance[1] - self.low
        if not (0 <= i < self.count and 0 <= j < self.count) or i == j:
            return None
        return i * (self.count - 1) + j - (j > i)

    def answer(self, instance) -> int:
        return 0 if instance[0] > instance[1] else 1

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
        if self.modulus < 2:
            raise ValueError(f"modulus: expected at least 2, got {self.modulus}")
        if not 2 <= self.operands <= 8:
            raise ValueError(f"operands: expected 2..8, got {self.operands}")

    def space_size(self) -> int:
        return self.modulus**self.operands

    def instance(self, index: int) -> tuple[int, ...]:
        digits = []
        index = int(index)
        for _ in range(self.operands):
            index, d = divmod(index, self.modulus)
            digits.append(d)
        return tuple(reversed(digits))

    def index(self, instance):
        if len(instance) != self.operands or not all(0 <= x < self.modulus for x in instance):
            return None
        value = 0
        for x in instance:
            value = value * self.modulus + x
        return value

    def answer(self, instance) -> int:
        return sum(instance) % self.modulus

    def candidates(self, instance) -> list[str]:
        return [str(r) for r in range(self.modulus)]

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
    answer = task.candidates(instance)[task.answer(instance)]
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
            correct = m.group("answer") == task.candidates(instance)[task.answer(instance)]
            return instance, t, correct
    return None
