"""`olmo-inject ladder dry-run`: the arithmetic of a ladder before anything runs."""

from __future__ import annotations

from .ladder import PRESETS, SIZES, measure_params, run_plan


def dry_run(preset: str = "reference", sizes: list[str] | None = None, gpus: int = 8, mfu: float = 0.4,
            gpu_tflops: float = 989.0, tokens: float | None = None) -> str:
    if preset not in PRESETS:
        raise KeyError(f"--preset: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    chosen = sizes or PRESETS[preset].sizes
    unknown = [s for s in chosen if s not in SIZES]
    if unknown:
        raise KeyError(f"--size: unknown size {unknown[0]!r}; expected one of {list(SIZES)}")
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
