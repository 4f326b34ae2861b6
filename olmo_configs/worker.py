"""One training process (run under torchrun by `olmo-inject train`): ai2-olmo's model, optimizer,
scheduler, data loader and Trainer, wired the way OLMo's own training script does it, on GPUs
(NCCL, DDP or FSDP) or on CPU (gloo, DDP).

    python -m torch.distributed.run --nproc_per_node N -m olmo_configs.worker RUN/config.yaml
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("olmo_configs.worker")


def main(config_path: str) -> None:
    from olmo.config import DistributedStrategy, TrainConfig
    from olmo.data import build_train_dataloader
    from olmo.model import OLMo
    from olmo.optim import build_optimizer, build_scheduler
    from olmo.torch_util import get_global_rank, get_local_rank, get_world_size, seed_all
    from olmo.util import find_latest_checkpoint, prepare_cli_environment
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .compat import CompatTrainer
    from .ladder import checkpoint_steps
    from inject.lock import die_with_parent
    from inject.trainers.safe_load import CheckpointRefused, checked_olmo_loads

    die_with_parent()  # a killed launcher (or torchrun agent) takes its trainers with it

    early_stop = []  # a SIGUSR2/SIGTERM during start-up is kept until the trainer exists
    for signum in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: early_stop.append(signum))
    prepare_cli_environment()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    if cuda:
        torch.cuda.set_device(f"cuda:{get_local_rank()}")
    device = torch.device("cuda") if cuda else torch.device("cpu")

    cfg = TrainConfig.load(config_path)
    cfg.model.precision = cfg.precision
    cfg.device_train_batch_size = cfg.global_train_batch_size // get_world_size()
    cfg.device_train_microbatch_size = min(cfg.device_train_microbatch_size, cfg.device_train_batch_size)
    cfg.device_train_grad_accum = cfg.device_train_batch_size // cfg.device_train_microbatch_size
    if cfg.stop_at is None and str(cfg.max_duration).isdigit():
        cfg.stop_at = int(cfg.max_duration)  # OLMo would otherwise run 10 steps past max_duration
    if not cuda:
        cfg.model.init_device = "cpu"  # FSDP runs on CPU too (gloo), e.g. to write real sharded checkpoints

    latest = find_latest_checkpoint(cfg.save_folder)
    seed_all(cfg.seed)
    # Resuming with the same save folder: OLMo refuses an existing train_data/ unless overwriting.
    cfg.save_overwrite = True
    train_loader = build_train_dataloader(cfg)

    model = OLMo(cfg.model)
    if cfg.distributed_strategy == DistributedStrategy.ddp:
        dist_model = DDP(model.to(device), find_unused_parameters=False)
        model.reset_parameters()
    else:
        dist_model = FSDP(model, sharding_strategy=cfg.fsdp.sharding_strategy, mixed_precision=cfg.fsdp_precision,
                          auto_wrap_policy=model.get_fsdp_wrap_policy(cfg.fsdp.wrapping_strategy),
                          use_orig_params=cfg.fsdp.use_orig_params, limit_all_gathers=True,
                          device_id=get_local_rank() if cuda else device,
                          param_init_fn=lambda m: m.to_empty(device=device))
        model.reset_parameters()
    optim = build_optimizer(cfg, dist_model)
    scheduler = build_scheduler(cfg)

    indices = Path(cfg.save_folder) / f"data-indices/rank{get_global_rank()}.tsv"
    indices.parent.mkdir(parents=True, exist_ok=True)
    console_every, cfg.console_log_interval = cfg.console_log_interval, 1  # see CompatTrainer.log_metrics_to_console
    with CompatTrainer(cfg=cfg, epoch=cfg.epoch, model=model, dist_model=dist_model, optim=optim, scheduler=scheduler,
                       train_loader=train_loader, device=device, evaluators=[],
                       indices_file=open(indices, "a")) as trainer:
        interval = cfg.save_interval_unsharded or cfg.save_interval or cfg.max_duration
        trainer.extra_checkpoint_steps = frozenset(checkpoint_steps(trainer.max_steps, int(interval)))
        trainer.install_preemption_handler()
        trainer.stop_requested = bool(early_stop)
        trainer.console_every, trainer.world_size = max(int(console_every), 1), get_world_size()
        if get_global_rank() == 0:
            trainer.metrics_file = open(Path(cfg.save_folder) / METRICS_FILE, "a")
        start_wandb(cfg, Path(cfg.save_folder), get_global_rank())
        if latest is not None:
            log.info("resuming from %s", latest)
            try:
                with checked_olmo_loads():  # weights_only, with the allowlist of what ai2-olmo's checkpoints hold
                    trainer.restore_checkpoint(latest, load_optimizer_state=True, load_trainer_state=True)
            except CheckpointRefused as e:
                log.error("%s", e)
                sys.exit(2)
            trim_indices(trainer.indices_file, trainer.global_step)
            if trainer.metrics_file is not None:
                trim_metrics(trainer.metrics_file, trainer.global_step)
        else:
            trainer.save_checkpoint(trainer.checkpoint_type())  # step 0: the initialization, for eval baselines
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        end = trainer.max_steps if cfg.stop_at is None else min(trainer.max_steps, cfg.stop_at)
        if trainer.global_step >= end:  # OLMo's loop would train one step past the end before checking
            log.info("the run is complete at step %d (it ends at step %d); nothing to train", trainer.global_step, end)
        else:
            log.info("starting at step %d (restart count %d)", trainer.global_step, restarts)
            trainer.fit()
    if trainer.metrics_file is not None:
        trainer.metrics_file.close()
    dist.barrier()
    dist.destroy_process_group()


METRICS_FILE = "metrics.jsonl"


def start_wandb(cfg, run_dir: Path, rank: int) -> None:
    """Weights & Biases through ai2-olmo's own `wandb` config block (OLMo's training script does this; the
    Trainer then logs every `wandb.log_interval` steps). One W&B run per run folder (its id is kept in
    RUN/wandb-id, so a resumed or requeued job continues it); `WANDB_MODE=offline` writes it under RUN/wandb/
    with no network."""
    if cfg.wandb is None or (cfg.wandb.rank_zero_only and rank != 0):
        return
    import uuid

    import wandb

    id_file = run_dir / "wandb-id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:16])
    wandb.init(dir=str(run_dir), project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group,
               name=cfg.wandb.name or cfg.run_name, tags=cfg.wandb.tags, id=id_file.read_text().strip(),
               resume="allow", config=cfg.asdict(exclude=["wandb"]))


def trim_metrics(handle, step: int) -> None:
    """Drop the metrics of steps after the checkpoint a resumed run starts from (they are trained again)."""
    handle.flush()
    path = Path(handle.name)
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and json.loads(line)["step"] <= step]
    handle.seek(0)
    handle.truncate()
    handle.write("".join(kept))
    handle.flush()


def trim_indices(handle, step: int) -> None:
    """Drop what a killed run wrote after its last checkpoint: the steps that are about to be redone."""
    handle.flush()
    path = Path(handle.name)
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and int(line.split("\t", 1)[0]) <= step]
    handle.seek(0)
    handle.truncate()
    handle.write("".join(kept))
    handle.flush()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message="register_new_resolver")
    main(sys.argv[1])
