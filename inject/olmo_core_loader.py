"""OLMo-core 3.0.0's own data loader over a build, run as a script by the python of an OLMo-core environment
(tests/install-olmo-core.sh makes one). Never imported by the inject package: ai2-olmo's environment holds
another `olmo_core` (0.1.0). `verify --olmo-core-python` runs it and reads its output.

    PYTHON olmo_core_loader.py JOB.json
        JOB: {paths, dtype, sequence_length, global_batch_size_tokens, seed, max_target_sequence_length,
              world_size, steps (ascending, 1-based), pad_token_id, eos_token_id, vocab_size}

It builds a NumpyFSLDataset over the token files and one NumpyFSLDataLoader per rank (dp_world_size W,
dp_rank r, the first epoch, as a fresh training run does), starts them at a step as a resumed run does
(`batches_processed`), and writes to stdout, for each step: int64 [step, B, W], then the B instance indices
(rank 0's rows, then rank 1's, ...) as int64, then their B * L tokens in the build's dtype.
"""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np


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


if __name__ == "__main__":
    stream(json.loads(open(sys.argv[1]).read()), sys.stdout.buffer)
