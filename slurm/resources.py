"""The memory a job asks for when its profile does not say (`mem`, `eval.mem`, `build.mem` left out).

Measured, not guessed: the summed RSS of the job's processes, which is what SLURM's `jobacct_gather/linux`
compares with `--mem` (and kills the job over, with `JobAcctGatherParams=OverMemoryKill`), on the demo corpus
and the tiny model, one CPU process. Larger models add their parameters' bytes to the tiny model's figure; that
term is arithmetic, not measured. Every estimate asks for 1.5x the figure (other inputs are larger than the
demo's) and is written, with this arithmetic, in the job script's header.
"""

from __future__ import annotations

import math

GIB = 2**30
MARGIN = 1.5
TINY_PARAMS = 1_642_656
"""olmo_configs/tiny.yaml's parameters as the node arithmetic counts them (`run_size`: without the input
embedding, whose 1.6 M parameters the measured peaks include): the measured model."""
MEASURED_GIB = {"train": 4.40, "eval": 0.73, "tokenize": 0.09, "finish": 0.45}
"""Peak summed RSS, GiB, 2026-11-30. Training: the MaxRSS SLURM itself reported (`sstat`) for the `srun` step of
tiny training, 10 steps, on the test cluster (our launcher and the trainer; flat from step 2 on; a 4G request was
killed at 4.10 GiB); benchmarks/slurm_memory.py measures 3.75-4.12 GiB for the same command outside SLURM. The
rest: benchmarks/slurm_memory.py, the sum of each process's peak RSS. Evaluation of its checkpoints (10 + 10
instances per task): 0.61-0.73. A tokenizing array task's main process: 0.09; the finishing job: its largest
process, verify's (0.45; the build itself 0.14)."""
PER_WORKER_GIB = {"tokenize": 0.07, "finish": 0.45}
"""Each further process of `--workers W` (W > 1): a tokenizer process, measured (0.22 GiB for the main process and
two workers); verify's workers are not measured, and are counted as large as its main process."""
BYTES_PER_PARAM = {"train": 16, "eval": 8}
"""Beyond the tiny model, per parameter: training keeps fp32 weights, gradients and AdamW's two moments (16 B);
evaluation holds the loaded checkpoint and the model (2 x 4 B)."""


def estimate(kind: str, params: int = 0, workers: int = 1) -> tuple[str, str]:
    """The `--mem` for one job of `kind` (train, eval, tokenize: a build array task, finish: the finishing build
    and verify) and how it was reached, for the script header. `params`: the model's parameters (train, eval);
    `workers`: a build job's `--workers` (more than 1: a pool of that many processes beside the main one)."""
    base = MEASURED_GIB[kind]
    if kind in PER_WORKER_GIB:
        pool = workers if workers > 1 else 0
        figure = base + PER_WORKER_GIB[kind] * pool
        how = f"{base} GiB measured for the main process" + (
            f" + {pool} workers x {PER_WORKER_GIB[kind]} GiB" if pool else "")
    else:
        extra = max(params - TINY_PARAMS, 0) * BYTES_PER_PARAM[kind] / GIB
        figure = base + extra
        how = f"{base} GiB measured for the tiny model" + (
            f" + {BYTES_PER_PARAM[kind]} B x {params - TINY_PARAMS:,d} more parameters ({extra:.1f} GiB, arithmetic)"
            if extra else "")
    mem = max(1, math.ceil(figure * MARGIN))
    return f"{mem}G", f"memory {mem}G: {how}, x {MARGIN} margin (slurm/resources.py, benchmarks/slurm_memory.py)"
