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


# ------------------------------------------------------------------------------------------------- checkpoints
# (eval and the ladder: OLMo-core's own parameter counts, checkpoint saves, forward passes and HF converter)


def params(job: dict) -> int:
    """{name: counts} for every model block of job["models"] at job["vocab_size"], written to job["out"]:
    OLMo-core's own counts (TransformerConfig.num_params / num_non_embedding_params), the parameters of the
    model built on the meta device (which must agree), and the MLP hidden size the block resolves to."""
    counts = {}
    for name, spec in job["models"].items():
        config = model_config(spec, job["vocab_size"])
        model = config.build(init_device="meta")
        built = sum(p.numel() for p in model.parameters())
        if built != config.num_params:
            raise SystemExit(f"{name}: OLMo-core's count {config.num_params} != {built} parameters built")
        hidden = {m.w1.out_features for m in model.modules() if type(m).__name__ == "FeedForward"}
        counts[name] = {"num_params": config.num_params, "num_non_embedding_params": config.num_non_embedding_params,
                        "mlp_hidden_size": hidden.pop(), "head_dim": model.blocks["0"].attention.head_dim}
        del model
    _write_json(job["out"], counts)
    return 0


def save_checkpoint(job: dict) -> int:
    """Model checkpoints as OLMo-core's Trainer writes them, for tests: `job["model"]` initialized with `init_seed`
    and trained with AdamW on seeded random tokens, saved after `steps` (a list) optimizer steps by OLMo-core's
    Checkpointer to RUN/step{N}/ (model_and_optim/ with the optimizer state, train/rank0.pt, .metadata.json)."""
    import tempfile

    import torch
    import torch.distributed.checkpoint.state_dict as dist_cp_sd
    from olmo_core.train.checkpoint import Checkpointer

    config = model_config(job["model"], job["vocab_size"])
    config.init_seed = job["init_seed"]
    model = config.build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"), max_seq_len=job["sequence_length"])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.Generator().manual_seed(job["init_seed"])

    class TrainModule:  # what TransformerTrainModule.state_dict_to_save returns (its default save options)
        def state_dict_to_save(self):
            options = dist_cp_sd.StateDictOptions(flatten_optimizer_state_dict=True, cpu_offload=True)
            return {"model": dist_cp_sd.get_model_state_dict(model, options=options),
                    "optim": dist_cp_sd.get_optimizer_state_dict(model, optim, options=options)}

    done = 0
    with tempfile.TemporaryDirectory(prefix="olmo-core-work-") as work_dir:
        checkpointer = Checkpointer(work_dir=work_dir)
        for step in sorted(job["steps"]):
            for done in range(done, step):
                ids = torch.randint(0, job["vocab_size"], (2, job["sequence_length"]), generator=tokens)
                loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
                optim.step()
                optim.zero_grad()
            done = step
            checkpointer.save(f"{job['run']}/{Checkpointer.checkpoint_dirname(step)}", TrainModule(), {"global_step": step})
    return 0


def _load_model(checkpoint: str, spec: dict, vocab_size: int):
    """A checkpoint's model read by OLMo-core's own loader."""
    import torch
    from olmo_core.distributed.checkpoint import load_model_and_optim_state

    model = model_config(spec, vocab_size).build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"))
    load_model_and_optim_state(f"{checkpoint}/model_and_optim", model)
    return model.eval()


def forward(job: dict) -> int:
    """Logits of OLMo-core's own forward pass over job["tokens"] (rows of equal length) with the weights of the
    checkpoint job["checkpoint"], written to job["out"] (.npy, float32)."""
    import numpy as np
    import torch

    model = _load_model(job["checkpoint"], job["model"], job["vocab_size"])
    with torch.no_grad():
        logits = model(torch.tensor(job["tokens"], dtype=torch.long))
    np.save(job["out"], logits.float().numpy())
    return 0


def convert(job: dict) -> int:
    """OLMo-core's own converter (olmo_core.nn.hf.convert_checkpoint.convert_checkpoint_to_hf, with its validation
    against OLMo-core's forward pass): the checkpoint job["checkpoint"] to a Hugging Face Olmo2ForCausalLM folder
    job["out"]. job["tokenizer"]: vocab_size (the tokenizer's own), eos/pad/bos ids and `identifier`, a folder with
    the tokenizer.json (the converter copies it into the output)."""
    from olmo_core.nn.hf.convert_checkpoint import convert_checkpoint_to_hf

    tokenizer = job["tokenizer"]
    convert_checkpoint_to_hf(job["checkpoint"], job["out"], model_config(job["model"], job["vocab_size"]).as_config_dict(),
                             tokenizer, tokenizer_id=tokenizer["identifier"],
                             max_sequence_length=job.get("max_sequence_length"), validate=True)
    return 0


def _write_json(path: str, value) -> None:
    import os

    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


COMMANDS: dict = {"loader": loader, "params": params, "save-checkpoint": save_checkpoint, "forward": forward,
                  "convert": convert}
"""COMMAND -> function(job: dict) -> int (exit code)."""


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in COMMANDS:
        print(f"usage: {argv[0]} {{{','.join(sorted(COMMANDS))}}} JOB.json", file=sys.stderr)
        return 2
    with open(argv[2]) as f:
        return COMMANDS[argv[1]](json.load(f))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
