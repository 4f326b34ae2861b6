"""The OLMo-core side: run by the python of an OLMo-core 3.0.0 environment, never imported by the inject
package (ai2-olmo's environment holds another `olmo_core`, 0.1.0). Standard library, numpy, torch and
olmo_core only, so that it runs where olmo-inject is not installed.

    PYTHON inject/trainers/olmo_core_env/child.py COMMAND JOB.json

It lives in its own folder because a script's folder comes first on sys.path: beside inject/trainers/olmo_core.py
it would shadow the olmo_core package.

Commands are added by the parts that need OLMo-core's own code (the data loader for verify: `loader`; the
Trainer for train, the checkpoint converter for eval).
"""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np


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


# -------------------------------------------------------------------------------------------------- loader
# verify --olmo-core-python: OLMo-core 3.0.0's own data loader over a build.
#
#     PYTHON child.py loader JOB.json
#         JOB: {paths, dtype, sequence_length, global_batch_size_tokens, seed, max_target_sequence_length,
#               world_size, steps (ascending, 1-based), pad_token_id, eos_token_id, vocab_size}
#
# It builds a NumpyFSLDataset over the token files and one NumpyFSLDataLoader per rank (dp_world_size W,
# dp_rank r, the first epoch, as a fresh training run does), starts them at a step as a resumed run does
# (`batches_processed`), and writes to stdout, for each step: int64 [step, B, W], then the B instance indices
# (rank 0's rows, then rank 1's, ...) as int64, then their B * L tokens in the build's dtype.


def loaders(job: dict, work_dir: str) -> list:
    from olmo_core.data import DataCollator, NumpyDataLoaderBase, NumpyFSLDataset

    dataset = NumpyFSLDataset(*job["paths"], sequence_length=job["sequence_length"], pad_token_id=job["pad_token_id"],
                              eos_token_id=job["eos_token_id"], vocab_size=job["vocab_size"], dtype=getattr(np, job["dtype"]),
                              max_target_sequence_length=job["max_target_sequence_length"])
    dataset.work_dir = work_dir
    dataset.prepare()
    out = []
    for rank in range(job["world_size"]):
        loader = NumpyDataLoaderBase.wrap_numpy_dataset(
            dataset, global_batch_size=job["global_batch_size_tokens"], collator=DataCollator(pad_token_id=job["pad_token_id"]),
            work_dir=work_dir, seed=job["seed"], dp_world_size=job["world_size"], dp_rank=rank, fs_local_rank=0)
        loader.reshuffle()  # no epoch given: OLMo-core's first
        out.append(loader)
    return out


def stream(job: dict, out) -> None:
    dtype = np.dtype(job["dtype"])
    with tempfile.TemporaryDirectory() as work_dir:
        ranks = loaders(job, work_dir)
        iterators, previous = None, None
        for step in job["steps"]:
            if previous is None or step != previous + 1:  # not the next batch: start every rank at this one
                for loader in ranks:
                    loader.reset()
                    loader.batches_processed = step - 1
                iterators = [iter(loader) for loader in ranks]
            previous = step
            batches = [next(it) for it in iterators]
            index = np.concatenate([b["index"].numpy() for b in batches]).astype(np.int64)
            ids = np.concatenate([b["input_ids"].numpy() for b in batches]).astype(dtype)
            out.write(np.array([step, len(index), len(ranks)], dtype=np.int64).tobytes())
            out.write(index.tobytes())
            out.write(ids.tobytes())
        out.flush()


def loader(job: dict) -> int:
    stream(job, sys.stdout.buffer)
    return 0


COMMANDS: dict = {"loader": loader}
"""COMMAND -> function(job: dict) -> int (exit code)."""


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in COMMANDS:
        print(f"usage: {argv[0]} {{{','.join(sorted(COMMANDS))}}} JOB.json", file=sys.stderr)
        return 2
    with open(argv[2]) as f:
        return COMMANDS[argv[1]](json.load(f))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
