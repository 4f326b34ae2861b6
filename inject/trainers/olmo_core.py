"""OLMo-core 3.0.0 (PyPI `ai2-olmo-core`), the trainer of OLMo 2 and OLMo 3, as olmo-inject's second trainer.

OLMo-core cannot live in the main environment: ai2-olmo 0.6.0 pins `ai2-olmo-core==0.1.0` and both install
the import package `olmo_core`. So this module never imports it: whatever needs OLMo-core's own code (its
data loader for verify, its Trainer for train, its checkpoint converter) runs as `olmo_core_env/child.py` in the
python of an OLMo-core environment (`python()`), and talks to this module through files and pipes.

The order (`order`, numpy only) is in inject/order.py and tested against OLMo-core's own loader.

Implements so far: NAME, python, order, usable_instances, file_instances, order_fields, loader_batches (OLMo-core's
order over the token files, or with an `OlmoCoreLoader` its own data loader through child.py `loader`),
loader_source, check_train_config; training: RunConfig (the run config), load_run_config,
resolve_train_config, render, launch (child.py `train`: OLMo-core's own Trainer), completed_step, checkpoint_steps;
run_size (slurm's node choice); checkpoints: is_checkpoint, vocabulary, load_model / read_model (eval, in this process),
convert_checkpoint (OLMo-core's Hugging Face converter, in its environment), run_child.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..config import TrainingConfig
from ..configtools import from_dict
from ..errors import ConfigError, InjectError
from ..injection import training_order
from ..order import FIRST_EPOCH, olmo_core_num_instances, olmo_core_order
from . import RESOLVED, write_run_config

NAME = "olmo-core"
CHILD = Path(__file__).with_name("olmo_core_env") / "child.py"
"""The script that runs inside the OLMo-core environment (imports olmo_core; never imported here)."""

PYTHON_ENV = "OLMO_INJECT_OLMO_CORE_PYTHON"
"""Environment variable naming the python of an OLMo-core 3 environment."""


def python(given: str | None = None) -> str:
    """The python of the OLMo-core environment: `given` (a --olmo-core-python option), else $OLMO_INJECT_OLMO_CORE_PYTHON,
    else .venv-olmo-core/bin/python at the repository root or the current folder (`bash tests/install-olmo-core.sh`
    makes it)."""
    if given or os.environ.get(PYTHON_ENV):
        return str(given or os.environ[PYTHON_ENV])
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root / ".venv-olmo-core" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    raise ConfigError(f"no OLMo-core environment: run `bash tests/install-olmo-core.sh` (makes .venv-olmo-core), or "
                      f"name its python with --olmo-core-python or ${PYTHON_ENV}")


# ---------------------------------------------------------------------------------------------- order, verify


def order(num_instances: int, training: TrainingConfig, sequence_length: int) -> np.ndarray:
    """OLMo-core 3.0.0's global order of its first epoch over a build of `num_instances` instances."""
    count = usable_instances(num_instances, training, sequence_length)
    return olmo_core_order(count, training.global_batch_size, training.seed, training.instance_group(sequence_length),
                           epoch=FIRST_EPOCH[NAME])


def usable_instances(num_instances: int, training: TrainingConfig, sequence_length: int) -> int:
    """Instances OLMo-core's dataset finds in a build of `num_instances` instances (files of `instances_per_file`
    whole instances, checked to be whole groups by BuildConfig.validate): with max_target_sequence_length = c * L
    it drops the last file's instances past a multiple of c."""
    return olmo_core_num_instances([num_instances], training.instance_group(sequence_length))


def file_instances(file_instances: list[int], training: TrainingConfig, sequence_length: int) -> list[int]:
    """Instances OLMo-core's dataset finds in each token file holding `file_instances[i]` whole instances: each file
    chunked on its own, into whole instance groups."""
    return [olmo_core_num_instances([n], training.instance_group(sequence_length)) for n in file_instances]


def order_fields(sequence_length: int, training: dict) -> dict[str, Any]:
    """Every OLMo-core 3.0.0 config field (dotted: NumpyFSLDatasetConfig, NumpyDataLoaderConfig) that decides which
    instances a training step reads, with the value a build needs (`training`: a TrainingConfig as a dict).
    `olmo-data.yaml` carries them."""
    return {"dataset.sequence_length": sequence_length,
            "dataset.max_target_sequence_length": training["max_target_sequence_length"],
            "data_loader.global_batch_size": training["global_batch_size_tokens"],
            "data_loader.seed": training["seed"]}


def check_train_config(manifest: dict, path: Path, report) -> None:
    """verify --train-config on an OLMo-core build: a run config (`trainer: olmo-core`; a template such as
    olmo_configs/olmo_core/tiny.yaml, or a run's completed RUN/config.yaml) against the build, naming every field
    that differs. Fields left out are the build's (the launcher fills them in)."""
    from ..configtools import load_yaml

    cfg = from_dict(RunConfig, load_yaml(path), str(path))
    t, tok = manifest["injection"]["training"], manifest["tokenizer"]
    files = [str((Path(manifest["_dir"]) / f["path"]).resolve()) for f in manifest["outputs"]]
    pairs = [("data.sequence_length", cfg.data.sequence_length, manifest["sequence_length"]),
             ("data.global_batch_size_tokens", cfg.data.global_batch_size_tokens, t["global_batch_size_tokens"]),
             ("data.seed", cfg.data.seed, t["seed"]),
             ("data.max_target_sequence_length", cfg.data.max_target_sequence_length, t["max_target_sequence_length"]),
             ("data.dtype", cfg.data.dtype, manifest["dtype"])]
    if cfg.tokenizer is not None:
        pairs += [(f"tokenizer.{name}", getattr(cfg.tokenizer, name), tok[name])
                  for name in ("name", "vocab_size", "eos_token_id", "pad_token_id")]
    for name, got, want in pairs:
        if got is not None and got != want:
            report.fail("config", f"{path}: {name} is {got!r}, the build was made for {want!r}")
    if cfg.data.paths is not None and [str(Path(p).resolve()) for p in cfg.data.paths] != files:
        report.fail("config", f"{path}: data.paths are not the build's {len(files)} token files in their order")
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tok["vocab_size"]:
        report.fail("config", f"{path}: model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary {tok['vocab_size']}")
    if cfg.train.max_steps > t["steps"]:
        report.fail("config", f"{path}: train.max_steps {cfg.train.max_steps} exceeds the {t['steps']} steps the plan covers")
    if t["global_batch_size_tokens"] % cfg.train.rank_microbatch_tokens:
        report.fail("config", f"{path}: train.rank_microbatch_tokens {cfg.train.rank_microbatch_tokens} does not divide "
                              f"the build's global batch of {t['global_batch_size_tokens']} tokens")
    report.checked["train config"] = str(path)


@dataclass(frozen=True)
class OlmoCoreLoader:
    """Read an OLMo-core build's batches with OLMo-core's own data loader, in the environment of `python`
    (child.py's `loader` command runs there), as `ranks` data-parallel ranks read them."""

    python: str
    ranks: int = 1

    def check(self, build: Path, manifest: dict) -> None:
        """Refuse a build this loader cannot read as planned (InjectError naming the option)."""
        from . import name_of

        t = manifest["injection"]["training"]
        if name_of(manifest) != NAME:
            raise InjectError(f"--olmo-core-python: {build} was built for {name_of(manifest)}'s order, not OLMo-core's")
        if self.ranks < 1 or t["global_batch_size"] % self.ranks:
            raise InjectError(f"--ranks: {self.ranks} ranks do not split a batch of {t['global_batch_size']} instances "
                              f"(OLMo-core needs whole instances per rank)")


def loader_source(own_loader: OlmoCoreLoader | None = None) -> str:
    """What verify's batches came from (its report line)."""
    if own_loader is not None:
        return f"OLMo-core's own NumpyFSLDataLoader, {own_loader.ranks} rank(s), in {own_loader.python}"
    return "OLMo-core 3.0.0's order (inject/order.py) over the token files"


def loader_batches(manifest: dict, chosen: list[int], use_filter: bool, report, own_loader: OlmoCoreLoader | None = None):
    """(step, batch) as OLMo-core reads the build: with `own_loader`, from OLMo-core's own data loader in its
    environment; else its order (inject/order.py) over the token files. OLMo-core's repetition filter is not
    replayed (`use_filter` is ai2-olmo's)."""
    if own_loader is not None:
        return _olmo_core_loader_batches(manifest, chosen, own_loader, report)
    return _olmo_core_batches(manifest, chosen)


def _olmo_core_batches(manifest: dict, chosen: list[int]):
    """(step, batch) as OLMo-core 3.0.0's NumpyFSLDataLoader reads the build (one rank): its order
    (inject/order.py) over instances of sequence_length tokens, each file chunked on its own."""
    t = from_dict(TrainingConfig, manifest["injection"]["training"], "manifest.injection.training")
    L = manifest["sequence_length"]
    group = t.instance_group(L)
    files = [np.memmap(manifest["_dir"] / f["path"], dtype=manifest["dtype"], mode="r") for f in manifest["outputs"]]
    per_file = [olmo_core_num_instances([len(f) // L], group) for f in files]
    starts = np.concatenate([[0], np.cumsum(per_file)])
    order = training_order(t, manifest["injection"]["num_instances"], L)
    if starts[-1] != olmo_core_num_instances([manifest["injection"]["num_instances"]], group):
        raise InjectError(f"{manifest['_dir']}: the token files hold {starts[-1]:,} OLMo-core instances, the manifest "
                          f"says {manifest['injection']['num_instances']:,}")
    B = t.global_batch_size
    for step in tqdm(chosen, desc="verify batches", unit="batch", disable=None):
        index = order[(step - 1) * B : step * B].astype(np.int64)
        where = np.searchsorted(starts, index, side="right") - 1
        ids = np.stack([files[f][(i - starts[f]) * L : (i - starts[f] + 1) * L] for f, i in zip(where, index)])
        yield step, {"input_ids": ids.astype(np.int64), "index": index}


def _olmo_core_loader_batches(manifest: dict, chosen: list[int], olmo_core: OlmoCoreLoader, report):
    """(step, batch) as OLMo-core's own NumpyFSLDataLoader yields it to `olmo_core.ranks` ranks (their rows
    concatenated), read from child.py's `loader` command run by `olmo_core.python`. Each rank's rows are also
    compared with inject/order.py's order (an `order` failure names the rank)."""
    t = from_dict(TrainingConfig, manifest["injection"]["training"], "manifest.injection.training")
    L, B, W = manifest["sequence_length"], t.global_batch_size, olmo_core.ranks
    order = training_order(t, manifest["injection"]["num_instances"], L)
    tok = manifest["tokenizer"]
    job = {"paths": [str(manifest["_dir"] / f["path"]) for f in manifest["outputs"]], "dtype": manifest["dtype"],
           "sequence_length": L, "global_batch_size_tokens": t.global_batch_size_tokens, "seed": t.seed,
           "max_target_sequence_length": t.max_target_sequence_length, "world_size": W, "steps": chosen,
           "pad_token_id": tok["pad_token_id"], "eos_token_id": tok["eos_token_id"], "vocab_size": tok["vocab_size"]}
    dtype = np.dtype(manifest["dtype"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # that environment's own
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        with open(Path(tmp) / "stderr", "w+b") as errors:
            try:
                child = subprocess.Popen([olmo_core.python, str(CHILD), "loader", str(Path(tmp) / "job.json")],
                                         stdout=subprocess.PIPE, stderr=errors, env=env)
            except OSError as e:
                raise InjectError(f"--olmo-core-python: cannot run {olmo_core.python}: {e.strerror}") from None
            try:
                for step in tqdm(chosen, desc="verify batches", unit="batch", disable=None):
                    header = _read_exact(child, 3 * 8, errors, olmo_core.python)
                    got_step, count, ranks = np.frombuffer(header, np.int64).tolist()
                    index = np.frombuffer(_read_exact(child, count * 8, errors, olmo_core.python), np.int64)
                    ids = np.frombuffer(_read_exact(child, count * L * dtype.itemsize, errors, olmo_core.python), dtype)
                    if (got_step, count, ranks) != (step, B, W):
                        raise InjectError(f"--olmo-core-python: OLMo-core's loader answered step {got_step} with {count} "
                                          f"instances over {ranks} ranks; expected step {step}, {B} instances, {W} ranks")
                    planned = order[(step - 1) * B : step * B]
                    for rank, rows in enumerate(index.reshape(W, -1)):
                        if not np.array_equal(rows, planned[rank::W]):
                            report.fail("order", f"step {step}: OLMo-core's loader gives rank {rank} of {W} instances "
                                                 f"{rows[:8].tolist()}..., the build's order {planned[rank::W][:8].tolist()}...")
                    yield step, {"input_ids": ids.reshape(count, L).astype(np.int64), "index": index}
                if child.wait() != 0:
                    _read_exact(child, 1, errors, olmo_core.python)  # raises, naming the exit code and stderr
            finally:
                if child.poll() is None:  # stopped early (an error here): the loader is not needed any more
                    child.kill()
                    child.wait()


def _read_exact(child, size: int, errors, python: str) -> bytes:
    data = child.stdout.read(size)
    if len(data) != size:
        child.wait()
        errors.seek(0)
        tail = errors.read().decode(errors="replace")[-2000:]
        raise InjectError(f"--olmo-core-python: OLMo-core's data loader in {python} stopped (exit {child.returncode}):\n{tail}")
    return data


# ---------------------------------------------------------------------------------------------------- training
# `olmo-inject train CONFIG --data BUILD --run RUN` for an OLMo-core build: the run config (RunConfig, a YAML file
# such as olmo_configs/olmo_core/tiny.yaml) is checked against the build and completed with it, written to
# RUN/config.yaml, and run by child.py `train` (OLMo-core's own Trainer) under `python -m torch.distributed.run` of
# the OLMo-core environment. Same guarantees as ai2-olmo's launcher (ai2_olmo.py): RUN/.lock, RUN/build.json,
# a rerun resumes from the latest checkpoint with the same batches, a complete run trains nothing, SIGUSR2 and
# SIGTERM save after the current step and stop.

LOCK = ".lock"


@dataclass
class ModelBlock:
    """The model: OLMo-2 architecture (child.model_config: OLMo-core's `olmo2_*` presets made explicit)."""

    d_model: int
    """Hidden size."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Attention heads."""
    head_dim: int | None = None
    """Size of one head; absent: d_model // n_heads."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); absent: n_heads."""
    hidden_size_multiplier: float | None = None
    """MLP hidden size multiplier (OLMo-core's llama_like); absent: OLMo-core's default."""
    hidden_size_multiple_of: int | None = None
    """MLP hidden size rounded up to a multiple of this; absent: OLMo-core's default."""
    vocab_size: int | None = None
    """Embedding rows. Absent: the build tokenizer's vocabulary rounded up to a multiple of 128 (filled in by the
    launcher); a value given must be at least the tokenizer's vocabulary."""


@dataclass
class OptimBlock:
    """AdamW with a learning-rate schedule (OLMo-core's AdamWConfig and schedulers)."""

    lr: float
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (two numbers)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    scheduler: str = "cosine"
    """After warmup: `cosine` or `linear` decay to final_lr_fraction * lr at train.max_steps, or `constant`."""
    final_lr_fraction: float = 0.1
    """The learning rate at the end of a cosine or linear schedule, as a fraction of lr."""

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: two numbers in [0, 1), got {self.betas}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"optim.scheduler: {self.scheduler!r} is not one of {list(SCHEDULERS)}")
        for name in ("lr", "eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"optim.{name}: must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")


SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class TrainBlock:
    """How long and how to train."""

    max_steps: int
    """Training steps; at most the build's planned steps."""
    save_interval: int
    """Save a checkpoint every this many steps (and at step 0, at the end, and where the run is stopped)."""
    rank_microbatch_tokens: int
    """Tokens one rank runs forward/backward at once (a multiple of data.sequence_length); the rank's share of the
    global batch is accumulated over micro-batches of this size."""
    checkpoint_steps: list[int] | None = None
    """More steps to save a checkpoint at. Absent: the powers of two below save_interval (1, 2, 4, ...), where
    memorization happens (the ladder's dense early checkpoints)."""
    init_seed: int = 0
    """Seed of the model's initialization."""
    dtype: str = "float32"
    """`float32`, or `bfloat16` (mixed precision: FSDP keeps bf16 parameters, DDP autocasts; reductions in fp32)."""
    data_parallel: str = "ddp"
    """`ddp` (replicated parameters) or `fsdp` (sharded: the large sizes)."""
    log_interval: int = 10
    """Log metrics every this many steps."""
    save_folder: str | None = None
    """Filled in by the launcher: the run folder (checkpoints RUN/stepN/, data indices RUN/data-indices/)."""

    def validate(self, sequence_length: int) -> None:
        for name in ("max_steps", "save_interval", "rank_microbatch_tokens", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        if self.rank_microbatch_tokens % sequence_length:
            raise ConfigError(f"train.rank_microbatch_tokens: {self.rank_microbatch_tokens} is not a multiple of "
                              f"data.sequence_length {sequence_length}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.dtype: {self.dtype!r} is not one of ['float32', 'bfloat16']")
        if self.data_parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.data_parallel: {self.data_parallel!r} is not one of ['ddp', 'fsdp']")


@dataclass
class DataBlock:
    """What the model reads: the build's token files in OLMo-core's order. The first four fields decide which
    instances each step reads: absent or null, they are the build's; a value given must be the build's."""

    sequence_length: int | None = None
    """Tokens per instance (OLMo-core's dataset.sequence_length)."""
    global_batch_size_tokens: int | None = None
    """Tokens per global batch (OLMo-core's data_loader.global_batch_size)."""
    seed: int | None = None
    """The shuffle seed (OLMo-core's data_loader.seed)."""
    max_target_sequence_length: int | None = None
    """OLMo-core's dataset.max_target_sequence_length."""
    build: str | None = None
    """Filled in by the launcher: the build folder."""
    paths: list[str] | None = None
    """Filled in by the launcher: the build's token files."""
    dtype: str | None = None
    """Filled in by the launcher: the token files' dtype (uint16 or uint32)."""


@dataclass
class TokenizerBlock:
    """Filled in by the launcher from the build's manifest."""

    name: str
    """The build's tokenizer."""
    vocab_size: int
    """Its vocabulary."""
    eos_token_id: int
    """End of document (after every document; no BOS)."""
    pad_token_id: int
    """Padding."""


@dataclass
class RunConfig:
    """An OLMo-core training run on an olmo-inject build (e.g. olmo_configs/olmo_core/tiny.yaml)."""

    trainer: str
    """`olmo-core` (what tells `olmo-inject train` this is not an ai2-olmo TrainConfig)."""
    model: ModelBlock
    """The model."""
    optim: OptimBlock
    """The optimizer and learning-rate schedule."""
    train: TrainBlock
    """Steps, checkpoints, precision, parallelism."""
    data: DataBlock = field(default_factory=DataBlock)
    """The build's order settings (filled in from the build when absent) and, once resolved, its files."""
    tokenizer: TokenizerBlock | None = None
    """Filled in by the launcher from the build."""

    def validate(self) -> None:
        if self.trainer != NAME:
            raise ConfigError(f"trainer: {self.trainer!r}; an OLMo-core run config says `trainer: {NAME}`")
        self.optim.validate()
        self.train.validate(self.data.sequence_length or 1)


def load_run_config(path: Path, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from YAML, with `key.sub=value` overrides (YAML values) applied; errors name the key."""
    import yaml

    from ..configtools import load_yaml

    data = load_yaml(path)
    for override in overrides:
        key, _, value = override.partition("=")
        where = data
        *parents, last = key.split(".")
        for part in parents:
            where = where.setdefault(part, {})
            if not isinstance(where, dict):
                raise ConfigError(f"{path}: override {override!r}: {part} is not a mapping")
        where[last] = yaml.safe_load(value)
    cfg = from_dict(RunConfig, data)
    for name in ("build", "paths", "dtype"):
        if getattr(cfg.data, name) is not None:
            raise ConfigError(f"{path}: data.{name}: filled in from --data by the launcher; leave it out")
    if cfg.tokenizer is not None or cfg.train.save_folder is not None:
        raise ConfigError(f"{path}: {'tokenizer' if cfg.tokenizer is not None else 'train.save_folder'}: filled in "
                          f"by the launcher (from --data, --run); leave it out")
    return cfg


def resolve_train_config(config_path: Path, build_dir: Path, run_dir: Path, overrides: list[str] = ()) -> RunConfig:
    """The run config checked against the build (ConfigError naming the field, the file and the build's value)
    and completed with the build's order settings, files, tokenizer and the run folder."""
    from ..build import load_manifest
    from . import name_of

    manifest = load_manifest(build_dir)
    if "injection" not in manifest:
        raise ConfigError(f"trainer is {NAME!r} in {config_path}, but the build {build_dir} has no injection plan, so "
                          f"no training order (no training block); build with training.trainer: {NAME}")
    if name_of(manifest) != NAME:
        raise ConfigError(f"trainer is {NAME!r} in {config_path}, but the build {build_dir} was made for "
                          f"{name_of(manifest)!r} (its training.trainer): its order is that trainer's; train it with "
                          f"an {name_of(manifest)} config, or build with training.trainer: {NAME}")
    cfg = load_run_config(config_path, overrides)
    t, tok = manifest["injection"]["training"], manifest["tokenizer"]
    build_values = {"sequence_length": manifest["sequence_length"], "global_batch_size_tokens": t["global_batch_size_tokens"],
                    "seed": t["seed"], "max_target_sequence_length": t["max_target_sequence_length"]}
    problems = [f"data.{name} is {getattr(cfg.data, name)!r} in {config_path}, the build {build_dir} needs {want!r}"
                for name, want in build_values.items() if getattr(cfg.data, name) not in (None, want)]
    if problems:
        raise ConfigError("; ".join(problems) + " (these decide which instances each step reads; the build's plan "
                          "holds only for the values it was made for, as in its olmo-data.yaml)")
    for name, value in build_values.items():
        setattr(cfg.data, name, value)
    if cfg.train.max_steps > t["steps"]:
        raise ConfigError(f"train.max_steps is {cfg.train.max_steps} in {config_path}, the build {build_dir} plans "
                          f"at most {t['steps']} steps")
    cfg.validate()
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = -(-tok["vocab_size"] // 128) * 128
    elif cfg.model.vocab_size < tok["vocab_size"]:
        raise ConfigError(f"model.vocab_size is {cfg.model.vocab_size} in {config_path}, below the build's tokenizer "
                          f"vocabulary {tok['vocab_size']}")
    B = t["global_batch_size_tokens"]
    if B % cfg.train.rank_microbatch_tokens:
        raise ConfigError(f"train.rank_microbatch_tokens is {cfg.train.rank_microbatch_tokens} in {config_path}: "
                          f"it must divide the global batch of {B} tokens")
    if cfg.train.checkpoint_steps is None:
        cfg.train.checkpoint_steps = [2**k for k in range(cfg.train.save_interval.bit_length()) if 2**k < cfg.train.save_interval]
    cfg.train.checkpoint_steps = sorted(s for s in set(cfg.train.checkpoint_steps) if 0 < s <= cfg.train.max_steps)
    cfg.train.save_folder = str(Path(run_dir).resolve())
    cfg.data.build = str(Path(build_dir).resolve())
    cfg.data.paths = [str((Path(build_dir) / f["path"]).resolve()) for f in manifest["outputs"]]
    cfg.data.dtype = manifest["dtype"]
    cfg.tokenizer = TokenizerBlock(name=tok["name"], vocab_size=tok["vocab_size"], eos_token_id=tok["eos_token_id"],
                                   pad_token_id=tok["pad_token_id"])
    return cfg


def render(cfg: RunConfig) -> str:
    import yaml

    from ..configtools import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_resolved(cfg: RunConfig, run_dir: Path) -> Path:
    """Write RUN/config.yaml; a run folder that holds another run's config is refused (resume, not a new run)."""
    import yaml

    return write_run_config(run_dir, render(cfg), yaml.safe_load)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete OLMo-core checkpoints in a run folder: RUN/stepN/ holding the files OLMo-core's
    Checkpointer.dir_is_checkpoint asks for (the trainer state, the model and optimizer's metadata, and the
    checkpoint's own metadata, written last)."""
    steps = []
    for folder in Path(run_dir).glob("step*"):
        if folder.name[4:].isdigit() and all((folder / f).is_file() for f in
                                              ("train/rank0.pt", "model_and_optim/.metadata", ".metadata.json")):
            steps.append(int(folder.name[4:]))
    return sorted(steps)


def completed_step(run_dir: Path, max_steps: int | None = None) -> int | None:
    """The latest checkpoint's step when it is at or past the run's end (the run is complete), else None.
    `max_steps`: the run's end; default: train.max_steps of RUN/config.yaml."""
    if max_steps is None:
        import yaml

        path = Path(run_dir) / RESOLVED
        if not path.exists():
            return None
        max_steps = yaml.safe_load(path.read_text())["train"]["max_steps"]
    steps = checkpoint_steps(run_dir) if Path(run_dir).is_dir() else []
    return steps[-1] if steps and steps[-1] >= max_steps else None


def launch(cfg: RunConfig, run_dir: Path, nproc: int | None = None, nnodes: int = 1, rendezvous: str | None = None,
           olmo_core_python: str | None = None) -> int:
    """Train the resolved `cfg` into `run_dir` under the run's lock; returns the trainers' exit code (0 without
    starting them when the run is complete). A rerun resumes from the latest checkpoint (OLMo-core's Trainer loads
    it from its save folder), with the data loader's position, RNG and optimizer state."""
    from ..identity import bind_run
    from ..lock import folder_lock

    run_dir = Path(run_dir)
    py = python(olmo_core_python)
    with folder_lock(run_dir / LOCK, f"the run folder {run_dir}", shared=nnodes > 1) as lock_fd:
        path = write_resolved(cfg, run_dir)
        bind_run(run_dir, Path(cfg.data.build))
        done = completed_step(run_dir, cfg.train.max_steps)
        if done is not None:
            print(f"olmo-inject train: {run_dir} is complete (its latest checkpoint is step {done}, the run's end); "
                  f"nothing to train")
            return 0
        _check_resume_checkpoint(run_dir)
        return _start(py, path, nproc, nnodes, rendezvous, lock_fd)


def _check_resume_checkpoint(run_dir: Path) -> None:
    """OLMo-core's Trainer un-pickles the checkpoint it resumes from (train/rank{r}.pt with weights_only=False, the
    distributed checkpoint's .metadata with plain pickle): both are first read here with weights_only and the
    allowlist (safe_load.py), and one that needs any other class is refused, naming the file, before any
    trainer starts."""
    from .safe_load import check_checkpoint

    steps = checkpoint_steps(run_dir)
    if steps:
        check_checkpoint(Path(run_dir) / f"step{steps[-1]}")


def _start(py: str, config_path: Path, nproc: int | None, nnodes: int, rendezvous: str | None,
           keep_open: int | None) -> int:
    """child.py `train` in the OLMo-core environment (torchrun.run_workers: alone as rank 0 of 1, else under
    `python -m torch.distributed.run`). SIGUSR2 and SIGTERM to this launcher are passed on to every trainer,
    which saves after its current step and stops."""
    from .torchrun import run_workers

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # that environment's own
    env["OLMO_SHARED_FS"] = "1"  # the run folder is one folder for every rank (a shared file system across nodes)
    return run_workers(py, [str(CHILD), "train", str(config_path)], nproc or _gpus(py), nnodes, rendezvous,
                       keep_open, env)


def _gpus(py: str) -> int:
    """GPUs the OLMo-core environment's torch sees (1 process on CPU)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([py, "-c", "import torch; print(torch.cuda.device_count())"], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"the OLMo-core environment's python {py} does not run torch: {result.stderr.strip()[-500:]}")
    return max(int(result.stdout.strip() or 0), 1)


def final_checkpoint_markers(steps: int) -> list[str]:
    """Paths in a run folder, any one of which means the run's checkpoint of step `steps` is complete (slurm's job
    scripts test them): OLMo-core's Checkpointer writes .metadata.json into stepN/ last (moved from slurm/jobs.py)."""
    return [f"step{steps}/.metadata.json"]


def run_size(config: Path, overrides: list[str], with_params: bool = True) -> tuple[int, int, int, int]:
    """(steps, non-embedding parameters, tokens, global batch in instances) of an OLMo-core run config (slurm's node
    choice; moved here from slurm/submit.py). The build may not exist yet, so the batch comes from the config's data
    block; the parameters (`with_params`; else 0) are counted by OLMo-core itself, in its environment (child.py
    `params`)."""
    from ..configtools import to_dict

    cfg = load_run_config(config, overrides)
    cfg.validate()
    L, tokens_per_batch = cfg.data.sequence_length, cfg.data.global_batch_size_tokens
    if L is None or tokens_per_batch is None:
        missing = "data.sequence_length" if L is None else "data.global_batch_size_tokens"
        raise ConfigError(f"{config}: {missing}: needed to size the job (the build may not exist when it is submitted)")
    params = 0
    if with_params:
        vocab = cfg.model.vocab_size or 50304  # the embedding of the GPT-NeoX tokenizers (dolma2's is larger)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "params.json"
            run_child("params", {"models": {"run": to_dict(cfg.model)}, "vocab_size": vocab, "out": str(out)})
            params = json.loads(out.read_text())["run"]["num_non_embedding_params"]
    return cfg.train.max_steps, params, cfg.train.max_steps * tokens_per_batch, tokens_per_batch // L


# ------------------------------------------------------------------------------------------------- checkpoints
# eval's view of OLMo-core checkpoints: `is_checkpoint(folder)` (eval/checkpoints.py's format "olmo-core"),
# `vocabulary(folder)`, `load_model(folder, fmt, manifest, device)` / `read_model(folder, device, vocab_size)` (in this
# process, into transformers' Olmo2ForCausalLM; OLMo-core's own code is not needed), `convert_checkpoint(...)` (OLMo-core's Hugging Face converter, in its env).

CHECKPOINT_DONE = ".metadata.json"
"""OLMo-core's Checkpointer writes it into stepN/ last: a step folder without it is a half-written save."""

RUN_CONFIG = "config.yaml"
"""RUN/config.yaml: the resolved OLMo-core run config (`trainer: olmo-core`, its `model` block)."""

# The constants of child.model_config's OLMo-2 architecture that the weights do not show.
ROPE_THETA, LAYER_NORM_EPS = 500_000, 1e-6

HF_NAMES = [  # OLMo-core parameter name -> transformers Olmo2ForCausalLM's (the one-to-one map of OLMo-core's converter)
    (r"embeddings\.weight", "model.embed_tokens.weight"),
    (r"lm_head\.norm\.weight", "model.norm.weight"),
    (r"lm_head\.w_out\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.attention\.w_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blocks\.(\d+)\.attention\.w_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blocks\.(\d+)\.attention\.w_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blocks\.(\d+)\.attention\.w_out\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blocks\.(\d+)\.attention\.q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"blocks\.(\d+)\.attention\.k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"blocks\.(\d+)\.attention_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),  # reordered norm:
    (r"blocks\.(\d+)\.feed_forward_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),  # after
    (r"blocks\.(\d+)\.feed_forward\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blocks\.(\d+)\.feed_forward\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"blocks\.(\d+)\.feed_forward\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
]


def hf_name(name: str) -> str | None:
    """transformers' Olmo2 name of an OLMo-core parameter (without the checkpoint's `model.` prefix); None if
    the parameter is not one of the OLMo-2 architecture's."""
    for pattern, replacement in HF_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def _run_config_of(folder: Path, strict: bool = False) -> dict | None:
    """The OLMo-core run config of a run folder (None when `folder` holds none, or another trainer's; an unreadable
    one is None too, unless `strict`: then InjectError names it)."""
    import yaml

    path = folder / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        if strict:
            raise InjectError(f"{path}: not a readable YAML file: {e}") from None
        return None
    return config if isinstance(config, dict) and config.get("trainer") == NAME else None


def _step_of(folder: Path) -> int | None:
    found = re.fullmatch(r"step(\d+)", folder.name)
    return int(found.group(1)) if found else None


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` is an OLMo-core checkpoint (`stepN/` with `model_and_optim/` and OLMo-core's
    `.metadata.json`; ai2-olmo's sharded checkpoints hold a config.yaml instead), or a `stepN/` folder of an
    OLMo-core run (complete or not: loading a half-written one says what is missing)."""
    folder = Path(folder)
    if (folder / "model_and_optim").is_dir() and (folder / CHECKPOINT_DONE).is_file():
        return True
    return _step_of(folder) is not None and folder.is_dir() and _run_config_of(folder.parent) is not None


def vocabulary(folder: Path) -> tuple[int, int | None]:
    """(embedding rows, EOS id of the run config's tokenizer) of an OLMo-core checkpoint, for eval's tokenizer check."""
    config, metadata = _read_checkpoint(Path(folder))
    return _shapes(folder, metadata)["embeddings.weight"][0], _tokenizer_of(config).get("eos_token_id")


def _tokenizer_of(run_config: dict) -> dict:
    """The run config's `tokenizer` block (name, vocab_size, eos_token_id, pad_token_id; filled in by the launcher)."""
    tokenizer = run_config.get("tokenizer")
    return tokenizer if isinstance(tokenizer, dict) else {}


def _read_checkpoint(folder: Path):
    """(run config, torch distributed checkpoint metadata) of a checkpoint, the metadata read by the restricted
    unpickler (never plain pickle)."""
    from .safe_load import read_dcp_metadata

    config = _run_config_of(folder.parent, strict=True)
    if config is None:
        raise InjectError(f"{folder.parent / RUN_CONFIG}: missing, or not an OLMo-core run config "
                          f"(`trainer: {NAME}` and a `model` block)")
    if not isinstance(config.get("model"), dict):
        raise InjectError(f"{folder.parent / RUN_CONFIG}: model: expected the model block (d_model, n_layers, n_heads)")
    for need in ("model_and_optim/.metadata", CHECKPOINT_DONE):
        if not (folder / need).is_file():
            raise InjectError(f"{folder}: no {need} (a half-written checkpoint?)")
    return config, read_dcp_metadata(folder / "model_and_optim" / ".metadata")


def _shapes(folder: Path, metadata) -> dict[str, tuple[int, ...]]:
    """The model's parameter shapes recorded in the checkpoint (OLMo-core names, `model.` prefix removed)."""
    shapes = {key.removeprefix("model."): tuple(value.size) for key, value in metadata.state_dict_metadata.items()
              if key.startswith("model.")}
    if "embeddings.weight" not in shapes:
        raise InjectError(f"{folder}/model_and_optim: no model.embeddings.weight (not an OLMo-core model checkpoint)")
    return shapes


def hf_config(spec: dict, shapes: dict[str, tuple[int, ...]], run_config: dict, where: str):
    """transformers' Olmo2Config of the model block `spec` (child.model_config's architecture), with the sizes
    the weights show (vocabulary, MLP width) and checked against them."""
    from transformers import Olmo2Config

    for key in ("d_model", "n_layers", "n_heads"):
        if not isinstance(spec.get(key), int) or spec[key] < 1:
            raise InjectError(f"{where}: model.{key}: expected a positive integer, got {spec.get(key)!r}")
    d_model, n_heads = spec["d_model"], spec["n_heads"]
    head_dim = int(spec.get("head_dim") or d_model // n_heads)
    n_kv_heads = int(spec.get("n_kv_heads") or n_heads)
    if head_dim * n_heads != d_model:
        raise InjectError(f"{where}: model.head_dim {head_dim} x n_heads {n_heads} != d_model {d_model}: "
                          f"transformers' Olmo2 has no separate head size")
    vocab = shapes["embeddings.weight"][0]
    expected = {"embeddings.weight": (vocab, d_model), "blocks.0.attention.w_k.weight": (n_kv_heads * head_dim, d_model)}
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise InjectError(f"{where}: the checkpoint's {name} is {shapes.get(name)}, the model block gives {shape}")
    layers = {int(name.split(".")[1]) for name in shapes if name.startswith("blocks.")}
    if layers != set(range(int(spec["n_layers"]))):
        raise InjectError(f"{where}: the checkpoint has {len(layers)} blocks, model.n_layers is {spec['n_layers']}")
    config = Olmo2Config(vocab_size=vocab, hidden_size=d_model, intermediate_size=shapes["blocks.0.feed_forward.w1.weight"][0],
                         num_hidden_layers=int(spec["n_layers"]), num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                         max_position_embeddings=int((run_config.get("data") or {}).get("sequence_length") or 4096),
                         rope_parameters={"rope_type": "default", "rope_theta": float(ROPE_THETA)},
                         rms_norm_eps=LAYER_NORM_EPS, attention_bias=False, tie_word_embeddings=False,
                         pad_token_id=_tokenizer_of(run_config).get("pad_token_id"),
                         eos_token_id=_tokenizer_of(run_config).get("eos_token_id"),
                         bos_token_id=None)
    if (getattr(config, "rope_parameters", None) or {}).get("rope_theta") != ROPE_THETA:  # transformers < 5 ignores it
        raise InjectError(f"{where}: this transformers does not take Olmo2's rope_parameters; install transformers >= 5.4")
    return config


def _no_init():
    """transformers' context that skips weight initialization (a plain context where it does not exist)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from contextlib import nullcontext as no_init_weights
    return no_init_weights()


def load_model(folder: Path, fmt: str, manifest: dict, device: str = "cpu"):
    """(transformers Olmo2ForCausalLM, run name) of an OLMo-core checkpoint folder (eval's format "olmo-core") for
    scoring on a build: its vocabulary and EOS checked against the build's tokenizer, `read_model` with the
    tokenizer's rows."""
    from . import check_vocabulary

    check_vocabulary(folder, *vocabulary(folder), manifest)
    return read_model(folder, device, manifest["tokenizer"]["vocab_size"])


def read_model(folder: Path, device: str = "cpu", vocab_size: int | None = None):
    """(transformers Olmo2ForCausalLM, run name) of an OLMo-core checkpoint, read in this process: the model
    block from RUN/config.yaml, the weights of stepN/model_and_optim (torch distributed checkpoint: metadata by
    the restricted unpickler, tensors weights_only; the optimizer state is not read), renamed to transformers'
    names. InjectError names the folder and what is wrong.

    `vocab_size` (the tokenizer's): keep only the embedding and output rows of real tokens, as OLMo-core's
    Hugging Face converter does, so that a checkpoint and its converted folder give the same probabilities (the
    padding rows up to the embedding size are never a target but take a little probability mass)."""
    import torch
    from transformers import Olmo2ForCausalLM

    from .safe_load import load_dcp_tensors

    folder = Path(folder)
    config, metadata = _read_checkpoint(folder)
    shapes = _shapes(folder, metadata)
    unknown = [name for name in shapes if hf_name(name) is None]
    if unknown:
        raise InjectError(f"{folder}/model_and_optim: parameter model.{unknown[0]} is not one of the OLMo-2 "
                          f"architecture's (an MoE or other OLMo-core model?)")
    hf = hf_config(config["model"], shapes, config, str(folder.parent / RUN_CONFIG))
    with _no_init():  # every weight is read from the checkpoint (checked below): no random init of billions
        model = Olmo2ForCausalLM(hf)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - {hf_name(name) for name in shapes})
    if missing:
        raise InjectError(f"{folder}/model_and_optim: no weights for {missing[0]}")
    state = {"model": {name: params[hf_name(name)].detach() for name in shapes}}  # read in place into the model
    try:
        with torch.no_grad():
            load_dcp_tensors(folder / "model_and_optim", state)
    except InjectError:
        raise
    except Exception as e:  # torch raises many types for a damaged file
        raise InjectError(f"{folder}/model_and_optim: cannot read the model weights: {e}") from None
    if vocab_size is not None and vocab_size < model.config.vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model.to(device).eval(), str(config.get("run_name") or folder.parent.name)


def run_child(command: str, job: dict, python_path: str | None = None, timeout: float | None = None) -> None:
    """child.py COMMAND in the OLMo-core environment (its own python; this process's PYTHONPATH and VIRTUAL_ENV
    left out, so that it imports its own packages); InjectError with the end of its output if it fails."""
    import subprocess
    import tempfile

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with tempfile.TemporaryDirectory(prefix=f"olmo-core-{command}-") as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        result = subprocess.run([python(python_path), str(CHILD), command, str(job_path)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        raise InjectError(f"OLMo-core's {command} failed (exit {result.returncode}):\n{result.stdout[-3000:]}")


def convert_checkpoint(folder: Path, out: Path, tokenizer_name: str | None = None, python_path: str | None = None) -> Path:
    """A Hugging Face Olmo2ForCausalLM folder `out` from the OLMo-core checkpoint `folder`, written by OLMo-core's
    own converter in its environment (which also checks the converted model's logits against OLMo-core's forward
    pass). The tokenizer (one shipped with ai2-olmo; by name, else the run config's) goes into the folder; the
    converter keeps the embedding rows of its vocabulary only. Written to OUT.partial, renamed when done; an existing `out` is refused."""
    import shutil

    from ..tokenizer import get_spec, vocab_size

    folder, out = Path(folder), Path(out)
    config, metadata = _read_checkpoint(folder)
    if out.exists():
        raise InjectError(f"{out}: exists; remove it or name another output folder")
    tokenizer_name = tokenizer_name or _tokenizer_of(config).get("name")
    if not tokenizer_name:
        raise InjectError(f"{folder.parent / RUN_CONFIG}: tokenizer.name: missing; name the build the run trained on")
    spec = get_spec(tokenizer_name)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer_dir = partial.with_name(out.name + ".tokenizer")
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    tokenizer_dir.mkdir(parents=True)
    try:
        shutil.copyfile(spec.path, tokenizer_dir / "tokenizer.json")
        run_child("convert", {"checkpoint": str(folder), "out": str(partial), "model": config["model"],
                              "vocab_size": _shapes(folder, metadata)["embeddings.weight"][0],
                              "max_sequence_length": (config.get("data") or {}).get("sequence_length"),
                              "tokenizer": {"identifier": str(tokenizer_dir), "vocab_size": vocab_size(tokenizer_name),
                                            "eos_token_id": spec.eos_token_id, "pad_token_id": spec.pad_token_id}},
                  python_path)
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
    step = _step_of(folder)
    if step is not None:  # eval reads a lone folder's step from its config.json
        hf_config_path = partial / "config.json"
        hf_config_path.write_text(json.dumps({**json.loads(hf_config_path.read_text()), "step": step}, indent=2) + "\n")
    partial.rename(out)
    return out
