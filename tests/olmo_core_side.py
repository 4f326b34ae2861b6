"""Run by the OLMo-core 3.0.0 virtual environment's python (tests/install-olmo-core.sh), never imported by the
main suite: OLMo-core's own NumpyFSLDataset + NumpyFSLDataLoader over token files, reporting what they read.

    python olmo_core_side.py order JOB.json OUT.npz
        JOB: {paths, dtype, sequence_length, batch_instances, seeds, max_target_sequence_length, world_sizes}
        OUT: per seed, the global order (`_build_global_indices`, cut to total_size) and, per world size and
        rank, the sha256 of the rank's instance indices (`_get_local_instance_indices`), as uint32
    python olmo_core_side.py batches JOB.json OUT.npz
        JOB: {runs: [{paths, dtype, sequence_length, batch_instances, seed, max_target_sequence_length,
        world_size, steps, pad_token_id, eos_token_id, vocab_size}, ...]}
        OUT: per run, rank and step 1..steps, the batch the rank's loader yields: `index` and `input_ids`
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile

import numpy as np
from olmo_core.data import DataCollator, NumpyDataLoaderBase, NumpyFSLDataset


def make_loader(job: dict, seed: int, world_size: int, rank: int, work_dir: str):
    L = job["sequence_length"]
    dataset = NumpyFSLDataset(*job["paths"], sequence_length=L, pad_token_id=job.get("pad_token_id", 0),
                              eos_token_id=job.get("eos_token_id", 0), vocab_size=job.get("vocab_size", 65536),
                              dtype=getattr(np, job["dtype"]), max_target_sequence_length=job["max_target_sequence_length"])
    dataset.work_dir = work_dir
    dataset.prepare()
    loader = NumpyDataLoaderBase.wrap_numpy_dataset(
        dataset, global_batch_size=job["batch_instances"] * L, collator=DataCollator(pad_token_id=job.get("pad_token_id", 0)),
        work_dir=work_dir, seed=seed, dp_world_size=world_size, dp_rank=rank, fs_local_rank=0)
    loader.reshuffle()  # a fresh run: OLMo-core picks its first epoch
    return dataset, loader


def order(job: dict, out: str) -> None:
    arrays = {}
    with tempfile.TemporaryDirectory() as work_dir:
        for seed in job["seeds"]:
            dataset, loader = make_loader(job, seed, 1, 0, work_dir)
            arrays["num_instances"] = np.array(len(dataset))
            arrays[f"epoch_{seed}"] = np.array(loader.epoch)
            arrays[f"global_{seed}"] = np.asarray(loader.get_global_indices()[: loader.total_size], dtype=np.uint32)
            for world_size in job["world_sizes"]:
                for rank in range(world_size):
                    _, ranked = make_loader(job, seed, world_size, rank, work_dir)
                    local = np.asarray(ranked._get_local_instance_indices(ranked.get_global_indices()), dtype=np.uint32)
                    arrays[f"local_{seed}_{world_size}_{rank}"] = np.array(hashlib.sha256(local.tobytes()).hexdigest())
    np.savez(out, **arrays)


def batches(job: dict, out: str) -> None:
    arrays = {}
    for run, spec in enumerate(job["runs"]):
        with tempfile.TemporaryDirectory() as work_dir:
            for rank in range(spec["world_size"]):
                _, loader = make_loader(spec, spec["seed"], spec["world_size"], rank, work_dir)
                for step, batch in enumerate(loader, start=1):
                    if step > spec["steps"]:
                        break
                    arrays[f"index_{run}_{rank}_{step}"] = batch["index"].numpy()
                    arrays[f"input_ids_{run}_{rank}_{step}"] = batch["input_ids"].numpy()
                loader.reset()
    np.savez(out, **arrays)


if __name__ == "__main__":
    command, job_path, out_path = sys.argv[1:]
    {"order": order, "batches": batches}[command](json.loads(open(job_path).read()), out_path)
