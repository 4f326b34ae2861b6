"""The few places where ai2-olmo 0.6.0's Trainer assumes CUDA or lacks a hook, adapted in one subclass.

- RNG state: `trainer_state_dict` saves and `restore_rng_state` restores `torch.cuda` RNG state
  unconditionally; on a CPU-only machine both raise. We save/restore it only when CUDA is there.
- Dense early checkpoints: OLMo saves every `save_interval(_unsharded)` steps; the ladder also wants
  log-spaced checkpoints early in training (1, 2, 4, ...), where memorization happens.
- Preemption: on SIGUSR2 (SLURM's `--signal=B:USR2@...`) the trainer saves a checkpoint after the
  current step and stops, so that the requeued job resumes from it.
"""

from __future__ import annotations

import logging
import random
import signal
from typing import Any

import numpy as np
import torch

from olmo.config import CheckpointType, DistributedStrategy
from olmo.train import Trainer

log = logging.getLogger(__name__)


class CompatTrainer(Trainer):
    extra_checkpoint_steps: frozenset = frozenset()
    stop_requested: bool = False

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

    def train_step(self, batch: dict[str, Any], reduce_global_loss: bool = True) -> dict[str, float]:
        metrics = super().train_step(batch, reduce_global_loss=reduce_global_loss)
        interval = self.cfg.save_interval_unsharded if self.checkpoint_type() == CheckpointType.unsharded else self.cfg.save_interval
        regular = interval is not None and self.global_step % interval == 0
        if self.global_step in self.extra_checkpoint_steps and not regular:
            self.save_checkpoint(self.checkpoint_type())
        return metrics

    def check_if_cancelled(self) -> tuple[bool, int]:
        """OLMo's cancellation check, plus SIGUSR2: the fit loop then stops and saves its final checkpoint."""
        from olmo.torch_util import synchronize_flag

        cancelled, extra_steps = super().check_if_cancelled()
        if not cancelled and synchronize_flag(self.stop_requested, self.device):
            log.warning("SIGUSR2: stopping at step %d; the final checkpoint follows", self.global_step)
            return True, 0
        return cancelled, extra_steps

    def install_preemption_handler(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGUSR2, request_stop)
