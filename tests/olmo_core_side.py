"""Run by the OLMo-core 3.0.0 virtual environment's python (tests/install-olmo-core.sh), never imported by the
main suite: OLMo-core's own NumpyFSLDataset + NumpyFSLDataLoader over token files (made as verify makes them,
inject/trainers/olmo_core_env/child.py `loader`), reporting what they read.

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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "inject" / "trainers" / "olmo_core_env"))
from child import loaders  # noqa: E402  (by path: the inject package needs the main environment)


def rank_loaders(job: dict, seed: int, world_size: int, work_dir: str) -> tuple:
    """(dataset, one loader per rank) as child.py `loader` makes them for verify."""
    spec = {"pad_token_id": 0, "eos_token_id": 0, "vocab_size": 65536, **job, "seed": seed, "world_size": world_size,
            "global_batch_size_tokens": job["batch_instances"] * job["sequence_length"]}
    ranks = loaders(spec, work_dir)
    return ranks[0].dataset, ranks


def order(job: dict, out: str) -> None:
    arrays = {}
    with tempfile.TemporaryDirectory() as work_dir:
        for seed in job["seeds"]:
            dataset, (loader,) = rank_loaders(job, seed, 1, work_dir)
            arrays["num_instances"] = np.array(len(dataset))
            arrays[f"epoch_{seed}"] = np.array(loader.epoch)
            arrays[f"global_{seed}"] = np.asarray(loader.get_global_indices()[: loader.total_size], dtype=np.uint32)
            for world_size in job["world_sizes"]:
                for rank, ranked in enumerate(rank_loaders(job, seed, world_size, work_dir)[1]):
                    local = np.asarray(ranked._get_local_instance_indices(ranked.get_global_indices()), dtype=np.uint32)
                    arrays[f"local_{seed}_{world_size}_{rank}"] = np.array(hashlib.sha256(local.tobytes()).hexdigest())
    np.savez(out, **arrays)


def batches(job: dict, out: str) -> None:
    arrays = {}
    for run, spec in enumerate(job["runs"]):
        with tempfile.TemporaryDirectory() as work_dir:
            for rank, loader in enumerate(rank_loaders(spec, spec["seed"], spec["world_size"], work_dir)[1]):
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
