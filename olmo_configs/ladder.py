"""The OLMo size ladder, from one table: shapes, batch, learning rate, warmup, strategy, checkpoints.

DataDecide conventions (allenai): d_model/heads/layers per size, mlp_ratio 8 (SwiGLU), RMSNorm, rope,
no biases, untied embeddings, sequence length 2048; batch round(160 * (N/108e6)^(2/3) / 32) * 32 sequences
and learning rate 0.0047 * (N/108e6)^(-1/3) with N the nominal size; cosine schedule with N tokens of
warmup. Where DataDecide published a batch size that the formula does not reproduce (90M: 160) the
published value wins. Parameter counts are never typed in: `measure_params` instantiates the model on
the meta device (`non_embedding` excludes the input embedding, as DataDecide's published counts do).

Above 1B there is no official shape. We keep depth 16 and head size near DataDecide's, and widen:
3B is OLMo's 3B ladder shape (d_model 3328, 16 heads, 16 layers); 4B is d_model 3840, 16 heads,
16 layers, about 3.97B parameters without the input embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SEQUENCE_LENGTH = 2048
VOCAB_SIZE = 50280         # allenai/gpt-neox-olmo-dolma-v1_5
EMBEDDING_SIZE = 50304     # padded to a multiple of 128, as in OLMo's configs
EOS, PAD = 50279, 1


@dataclass(frozen=True)
class Size:
    name: str
    d_model: int
    n_heads: int
    n_layers: int
    nominal: float
    """Nominal parameter count that the batch and learning-rate formulas use."""
    published_batch: int | None = None
    published_params: int | None = None
    """DataDecide's published non-embedding parameter count, for the test that checks our shapes."""

    @property
    def batch(self) -> int:
        if self.published_batch:
            return self.published_batch
        return max(32, round(160 * (self.nominal / 108e6) ** (2 / 3) / 32) * 32)

    @property
    def learning_rate(self) -> float:
        return 0.0047 * (self.nominal / 108e6) ** (-1 / 3)

    @property
    def strategy(self) -> str:
        return "ddp" if self.nominal <= 1.2e9 else "fsdp"

    @property
    def microbatch(self) -> int:
        """Sequences per GPU per forward pass at 2048 tokens on an 80 GB GPU (bf16)."""
        for limit, mb in ((160e6, 16), (350e6, 8), (1.2e9, 4)):
            if self.nominal <= limit:
                return mb
        return 2


SIZES: dict[str, Size] = {s.name: s for s in [
    Size("4M", 64, 8, 8, 4e6, 32, 3_744_832),
    Size("6M", 96, 8, 8, 6e6),
    Size("8M", 128, 8, 8, 8e6),
    Size("10M", 144, 8, 8, 10e6),
    Size("14M", 192, 8, 8, 14e6),
    Size("16M", 208, 8, 8, 16e6),
    Size("20M", 192, 8, 16, 20e6, 64, 19_101_888),
    Size("60M", 384, 12, 16, 60e6, 96, 57_078_144),
    Size("90M", 528, 12, 16, 90e6, 160, 97_946_640),
    Size("150M", 768, 12, 12, 150e6, 192, 151_898_880),
    Size("300M", 1024, 16, 16, 300e6, 320, 319_980_544),
    Size("530M", 1344, 16, 16, 530e6, 448, 530_074_944),
    Size("750M", 1536, 16, 16, 750e6, 576, 681_297_408),
    Size("1B", 2048, 16, 16, 1e9, 704, 1_176_832_000),
    Size("3B", 3328, 16, 16, 3e9),
    Size("4B", 3840, 16, 16, 4e9),
]}
DATADECIDE = ["4M", "6M", "8M", "10M", "14M", "16M", "20M", "60M", "90M", "150M", "300M", "530M", "750M", "1B"]

# A CPU-sized model for tests and the demo: same architecture, tiny shape, short sequences.
TINY = Size("tiny", 32, 2, 2, 2e6)


@dataclass(frozen=True)
class Preset:
    name: str
    sizes: list[str]
    global_batch: int | None
    """Fixed global batch for every size (so that 'examples per batch' means the same); None: per-size formula."""
    steps: int | None
    """Fixed steps for every size; None: from the token budget."""
    tokens_per_param: float = 20.0
    description: str = ""


PRESETS = {
    "datadecide": Preset("datadecide", DATADECIDE + ["3B", "4B"], None, None, 20.0,
                         "DataDecide shapes, batches and learning rates; 20 tokens per parameter"),
    "reference": Preset("reference", ["4M", "20M", "300M", "1B", "4B"], 2048, 50_000, 0.0,
                        "the reference experiment: one global batch (2048 x 2048 tokens) and 50,000 steps for "
                        "every size, ~210B tokens"),
}


def model_fields(size: Size, sequence_length: int = SEQUENCE_LENGTH) -> dict:
    """ai2-olmo ModelConfig fields for a size."""
    return dict(
        d_model=size.d_model, n_heads=size.n_heads, n_layers=size.n_layers, mlp_ratio=8,
        activation_type="swiglu", block_type="sequential", rope=True, rope_full_precision=True,
        flash_attention=False, attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0,
        layer_norm_type="rms", layer_norm_with_affine=True, layer_norm_eps=1e-6, include_bias=False,
        bias_for_layer_norm=False, attention_layer_norm=False, weight_tying=False,
        max_sequence_length=sequence_length, vocab_size=VOCAB_SIZE, embedding_size=EMBEDDING_SIZE,
        eos_token_id=EOS, pad_token_id=PAD, init_device="meta" if size.strategy == "fsdp" else "cpu",
        init_fn="normal", init_std=0.02, init_cutoff_factor=3.0,
    )


def olmo_core_model(size: Size) -> dict:
    """The OLMo-core model block of a size (OLMo-2 architecture: inject/trainers/olmo_core_env/child.py's
    model_config) with ai2-olmo's shape: the same d_model, n_layers and n_heads, and the same SwiGLU width,
    4 * d_model (ai2-olmo's mlp_ratio 8 covers both halves). OLMo-core's llama_like makes the width
    int(1.5 * int(8 * d_model / 3)) rounded up to a multiple of `hidden_size_multiple_of`: that is 4 * d_model
    when the multiple is the largest power of two (at most 256) dividing 4 * d_model (the generator checks the
    width OLMo-core builds). What differs from ai2-olmo: OLMo-2's norms after attention and MLP, QK norm (2 *
    d_model more parameters per layer) and RoPE theta 500,000."""
    width = 4 * size.d_model
    return {"d_model": size.d_model, "n_layers": size.n_layers, "n_heads": size.n_heads, "hidden_size_multiplier": 1.5,
            "hidden_size_multiple_of": min(256, width & -width)}


def measure_params(size: Size) -> tuple[int, int]:
    """(total, without the input embedding), counted on an ai2-olmo model built on the meta device."""
    from inject import trainers

    return trainers.get("ai2-olmo").count_params(model_fields(size))


def checkpoint_steps(total_steps: int, interval: int) -> list[int]:
    """Dense early (powers of two), then every `interval` steps: memorization comes before generalization."""
    early = [2**k for k in range(int(math.log2(max(interval, 1))) + 1) if 2**k < interval]
    return sorted(set(early) | set(range(interval, total_steps + 1, interval)) | {total_steps})


def run_plan(size: Size, preset: Preset, tokens: float | None = None, sequence_length: int = SEQUENCE_LENGTH) -> dict:
    """Batch, steps, tokens, warmup and checkpoint interval of one ladder run."""
    batch = preset.global_batch or size.batch
    per_step = batch * sequence_length
    if preset.steps is not None and tokens is None:
        steps = preset.steps
    else:
        budget = tokens if tokens is not None else preset.tokens_per_param * size.nominal
        steps = max(1, math.ceil(budget / per_step))
    warmup = max(1, round(size.nominal / per_step))
    interval = max(steps // 50, 1)
    return {"batch": batch, "steps": steps, "tokens": steps * per_step, "warmup_steps": min(warmup, steps),
            "checkpoint_interval": interval, "lr": size.learning_rate, "microbatch": min(size.microbatch, batch)}
