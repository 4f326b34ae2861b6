"""The OLMo-core side: run by the python of an OLMo-core 3.0.0 environment, never imported by the inject
package (ai2-olmo's environment holds another `olmo_core`, 0.1.0). Standard library, numpy, torch and
olmo_core only, so that it runs where olmo-inject is not installed.

    PYTHON inject/trainers/olmo_core_env/child.py COMMAND JOB.json

It lives in its own folder because a script's folder comes first on sys.path: beside inject/trainers/olmo_core.py
it would shadow the olmo_core package.

Commands are added by the parts that need OLMo-core's own code (the data loader for verify, the Trainer for
train, the checkpoint converter for eval).
"""

from __future__ import annotations

import json
import sys


def model_config(spec: dict, vocab_size: int):
    """An OLMo-2-architecture TransformerConfig from olmo-inject's model block (OLMo-core's `olmo2_*` presets
    made explicit: llama-like, reordered norm (norm after attention and MLP), QK norm, RoPE theta 500,000,
    layer-norm eps 1e-6). `spec`: d_model, n_layers, n_heads, and optionally head_dim, n_kv_heads,
    hidden_size_multiplier, hidden_size_multiple_of."""
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

    optional = {k: spec[k] for k in ("head_dim", "n_kv_heads", "hidden_size_multiplier", "hidden_size_multiple_of")
                if spec.get(k) is not None}
    return TransformerConfig.llama_like(d_model=spec["d_model"], n_layers=spec["n_layers"], n_heads=spec["n_heads"],
                                        vocab_size=vocab_size, block_name=TransformerBlockType.reordered_norm,
                                        qk_norm=True, rope_theta=500_000, layer_norm_eps=1e-6, **optional)


COMMANDS: dict = {}
"""COMMAND -> function(job: dict) -> int (exit code)."""


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in COMMANDS:
        print(f"usage: {argv[0]} {{{','.join(sorted(COMMANDS))}}} JOB.json", file=sys.stderr)
        return 2
    with open(argv[2]) as f:
        return COMMANDS[argv[1]](json.load(f))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
