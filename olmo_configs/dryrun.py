"""`olmo-inject ladder dry-run [--trainer ai2-olmo|olmo-core]`: the arithmetic of a ladder before anything runs."""

from __future__ import annotations

from .ladder import PRESETS, SEQUENCE_LENGTH, SIZES, checkpoint_steps, measure_params, run_plan


def dry_run(preset: str = "reference", sizes: list[str] | None = None, gpus: int = 8, mfu: float = 0.4,
            gpu_tflops: float = 989.0, tokens: float | None = None, trainer: str = "ai2-olmo") -> str:
    if trainer == "olmo-core":
        return olmo_core_dry_run(preset, sizes, gpus, mfu, gpu_tflops, tokens)
    if trainer != "ai2-olmo":
        raise KeyError(f"--trainer: unknown trainer {trainer!r}; expected ai2-olmo or olmo-core")
    chosen = _chosen(preset, sizes)
    lines = [f"preset {preset}: {PRESETS[preset].description}",
             f"{gpus} GPUs, {gpu_tflops:g} TFLOP/s peak (bf16) each, {mfu:.0%} model FLOPs utilization", "",
             f"{'size':>5s} {'params':>14s} {'batch':>6s} {'micro':>5s} {'accum':>5s} {'strategy':>8s} {'steps':>8s} "
             f"{'tokens':>10s} {'FLOPs (6ND)':>12s} {'GPU-hours':>10s} {'lr':>8s} {'warmup':>6s} {'data: instances':>16s}"]
    total_flops = total_hours = 0.0
    for name in chosen:
        size = SIZES[name]
        plan = run_plan(size, PRESETS[preset], tokens)
        _, params = measure_params(size)
        per_gpu = plan["batch"] // gpus if plan["batch"] % gpus == 0 else None
        micro = min(plan["microbatch"], per_gpu or plan["microbatch"])
        accum = f"{per_gpu // micro}" if per_gpu and per_gpu % micro == 0 else "n/a"
        flops = 6.0 * params * plan["tokens"]
        hours = flops / (gpu_tflops * 1e12 * mfu) / 3600
        total_flops += flops
        total_hours += hours
        lines.append(f"{name:>5s} {params:>14,d} {plan['batch']:>6d} {micro:>5d} {accum:>5s} {size.strategy:>8s} "
                     f"{plan['steps']:>8,d} {plan['tokens'] / 1e9:>9.2f}B {flops:>12.3e} {hours:>10,.1f} {plan['lr']:>8.5f} "
                     f"{plan['warmup_steps']:>6d} {plan['steps'] * plan['batch']:>16,d}")
    lines += ["", f"total: {total_flops:.3e} FLOPs, {total_hours:,.1f} GPU-hours "
                  f"({total_hours / gpus:,.1f} hours on {gpus} GPUs)",
              "accum = global batch / GPUs / micro-batch (n/a: the batch does not split evenly over the GPUs);",
              "data: the build for a size needs training.global_batch_size = batch and training.steps >= steps"]
    return "\n".join(lines)


def _chosen(preset: str, sizes: list[str] | None) -> list[str]:
    if preset not in PRESETS:
        raise KeyError(f"--preset: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    chosen = sizes or PRESETS[preset].sizes
    unknown = [s for s in chosen if s not in SIZES]
    if unknown:
        raise KeyError(f"--size: unknown size {unknown[0]!r}; expected one of {list(SIZES)}")
    return chosen


def olmo_core_dry_run(preset: str = "reference", sizes: list[str] | None = None, gpus: int = 8, mfu: float = 0.4,
                      gpu_tflops: float = 989.0, tokens: float | None = None) -> str:
    """The same ladder as OLMo-core run configs (olmo_configs/olmo_core/): batch and micro-batch in tokens, the
    data-parallel mode, checkpoints; parameters as measured with OLMo-core 3.0.0 (olmo_configs/olmo_core/sizes.yaml)."""
    from .generate_olmo_core import measured_sizes, run_config

    chosen = _chosen(preset, sizes)
    measured = measured_sizes()
    lines = [f"preset {preset} (OLMo-core 3.0.0, OLMo-2 architecture): {PRESETS[preset].description}",
             f"{gpus} GPUs, {gpu_tflops:g} TFLOP/s peak (bf16) each, {mfu:.0%} model FLOPs utilization", "",
             f"{'size':>5s} {'params':>14s} {'ai2-olmo':>14s} {'batch tokens':>12s} {'micro/rank':>10s} {'accum':>5s} "
             f"{'parallel':>8s} {'steps':>8s} {'tokens':>10s} {'FLOPs (6ND)':>12s} {'GPU-hours':>10s} {'lr':>8s} "
             f"{'warmup':>6s} {'ckpts':>5s}"]
    total_flops = total_hours = 0.0
    for name in chosen:
        config = run_config(SIZES[name], PRESETS[preset], tokens)
        train, data = config["train"], config["data"]
        params = measured[name]["olmo_core_params_without_input_embedding"]
        steps, batch, micro = train["max_steps"], data["global_batch_size_tokens"], train["rank_microbatch_tokens"]
        accum = f"{batch // (gpus * micro)}" if batch % (gpus * micro) == 0 else "n/a"
        flops = 6.0 * params * steps * batch
        hours = flops / (gpu_tflops * 1e12 * mfu) / 3600
        total_flops += flops
        total_hours += hours
        lines.append(f"{name:>5s} {params:>14,d} {measured[name]['ai2_olmo_params_without_input_embedding']:>14,d} "
                     f"{batch:>12,d} {micro:>10,d} {accum:>5s} {train['data_parallel']:>8s} {steps:>8,d} "
                     f"{steps * batch / 1e9:>9.2f}B {flops:>12.3e} {hours:>10,.1f} {config['optim']['lr']:>8.5f} "
                     f"{config['optim']['warmup_steps']:>6d} {len(checkpoint_steps(steps, train['save_interval'])):>5d}")
    lines += ["", f"total: {total_flops:.3e} FLOPs, {total_hours:,.1f} GPU-hours "
                  f"({total_hours / gpus:,.1f} hours on {gpus} GPUs)",
              "params: without the input embedding, measured with OLMo-core 3.0.0 (olmo_configs/olmo_core/sizes.yaml); "
              "ai2-olmo: the same shape in ai2-olmo 0.6.0;",
              "micro/rank = train.rank_microbatch_tokens; accum = batch tokens / GPUs / micro (n/a: OLMo-core refuses a "
              "batch that does not split evenly);",
              "ckpts: save steps (every train.save_interval, the powers of two below it, the last step);",
              f"data: the build for a size needs training.trainer olmo-core, sequence_length {SEQUENCE_LENGTH}, "
              "global_batch_size_tokens = batch tokens and steps >= steps"]
    return "\n".join(lines)
