"""The few places where ai2-olmo 0.6.0's Trainer assumes CUDA or lacks a hook, adapted in one subclass.

- RNG state: `trainer_state_dict` saves and `restore_rng_state` restores `torch.cuda` RNG state
  unconditionally; on a CPU-only machine both raise. We save/restore it only when CUDA is there.
- Dense early checkpoints: OLMo saves every `save_interval(_unsharded)` steps; the ladder also wants
  log-spaced checkpoints early in training (1, 2, 4, ...), where memorization happens.
- Preemption: on SIGUSR2 (SLURM's `--signal=B:USR2@...`) or SIGTERM (`scontrol requeue`, preemption
  without a signal, the time limit; KillWait seconds before SIGKILL) the trainer saves a checkpoint after
  the current step and stops, so that the requeued job resumes from it.
- W&B: OLMo 0.6.0 finishes its run with an argument newer wandb releases lack; finished here instead.
- Metrics: OLMo reduces and collects its metrics only on logging steps and prints them to the console;
  every step is made a logging step and rank 0 appends one row per step to RUN/metrics.jsonl (the console
  keeps the config's `console_log_interval`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
from typing import Any

import numpy as np
import torch

from olmo.config import CheckpointType, DistributedStrategy
from olmo.train import Trainer

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
"""Save after the current step and stop (SLURM's preemption warning; requeue, preemption, time limit)."""


METRICS = {  # RUN/metrics.jsonl field: OLMo's metric
    "loss": "train/CrossEntropyLoss",
    "learning_rate": "optim/learning_rate_group0",
    "grad_norm": "optim/total_grad_norm",
    "tokens_seen": "throughput/total_tokens",
    "device_tokens_per_second": "throughput/device/tokens_per_second",
}


class CompatTrainer(Trainer):
    extra_checkpoint_steps: frozenset = frozenset()
    stop_requested: bool = False
    metrics_file = None  # rank 0: RUN/metrics.jsonl, opened for appending
    console_every: int = 1  # the config's console_log_interval (console_log_interval itself is set to 1)
    world_size: int = 1

    def close(self, exit_code: int = 0) -> None:
        # OLMo 0.6.0 calls wandb.finish(quiet=True); wandb 0.19+ has no `quiet`. Finish the run here first.
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
        super().close(exit_code)

    def should_log_this_step(self) -> bool:
        return True  # metrics (a loss reduced over ranks, speed, learning rate) on every step

    def log_metrics_to_console(self, prefix: str, metrics: dict[str, float]) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(metrics_row(self.global_step, metrics, self.world_size)) + "\n")
            self.metrics_file.flush()
        if self.global_step % self.console_every == 0:
            super().log_metrics_to_console(prefix, metrics)

    def trainer_state_dict(self) -> dict[str, Any]:
        if torch.cuda.is_available():
            return super().trainer_state_dict()
        real = torch.cuda.get_rng_state
        torch.cuda.get_rng_state = lambda *a, **k: None  # the one CUDA call in the parent method
        try:
            return super().trainer_state_dict()
        finally:
            torch.cuda.get_rng_state = real

    def restore_rng_state(self, rng_state: dict[str, Any]) -> None:
        random.setstate(rng_state["python"])
        np.random.set_state(rng_state["numpy"])
        torch.set_rng_state(rng_state["torch"])
        if torch.cuda.is_available() and rng_state.get("cuda") is not None:
            torch.cuda.set_rng_state(rng_state["cuda"])

    def checkpoint_type(self) -> CheckpointType:
        return CheckpointType.unsharded if self.cfg.distributed_strategy == DistributedStrategy.ddp else CheckpointType.sharded

    def save_extra_checkpoint(self) -> None:
        """The dense early checkpoints (1, 2, 4, ...) that OLMo's own intervals do not give."""
        interval = self.cfg.save_interval_unsharded if self.checkpoint_type() == CheckpointType.unsharded else self.cfg.save_interval
        regular = interval is not None and self.global_step % interval == 0
        if self.global_step in self.extra_checkpoint_steps and not regular:
            self.save_checkpoint(self.checkpoint_type())

    def check_if_cancelled(self) -> tuple[bool, int]:
        """OLMo's cancellation check, plus SIGUSR2/SIGTERM: the fit loop then stops and saves its final checkpoint.
        Run after every step (the launcher sets canceled_check_interval: 1) on every rank, after the step's metrics
        row is written: where the extra checkpoints are saved, so that a kill right after one loses no row."""
        from olmo.torch_util import synchronize_flag

        cancelled, extra_steps = super().check_if_cancelled()
        if not cancelled and synchronize_flag(self.stop_requested, self.device):
            log.warning("SIGUSR2/SIGTERM: stopping at step %d; the final checkpoint follows", self.global_step)
            return True, 0
        if not cancelled:
            self.save_extra_checkpoint()
        return cancelled, extra_steps

    def install_preemption_handler(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True

        for signum in STOP_SIGNALS:
            signal.signal(signum, request_stop)


def metrics_row(step: int, metrics: dict[str, float], world_size: int) -> dict:
    """One RUN/metrics.jsonl row: the named metrics (null where OLMo has none yet: speed from step 2), the global
    tokens per second (per device x ranks), and OLMo's other metrics under `olmo` (not its per-parameter ones)."""
    row: dict = {"step": step}
    for name, key in METRICS.items():
        value = metrics.get(key)
        row[name] = None if value is None or not math.isfinite(float(value)) else float(value)
    device = row["device_tokens_per_second"]
    row["tokens_per_second"] = None if device is None else device * world_size
    row["olmo"] = {k: float(v) for k, v in metrics.items()
                   if math.isfinite(float(v)) and not k.startswith(PER_PARAMETER)}
    return row


PER_PARAMETER = ("optim/grad/", "optim/param/")
"""OLMo's per-parameter statistics (on W&B logging steps): W&B's, not a row's."""
