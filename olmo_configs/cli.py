"""olmo_configs' verb of `olmo-inject` (added through the `olmo_inject.verbs` entry point): ladder."""

from __future__ import annotations

from inject.cli import add_verb
from inject.errors import InjectError


def register(sub) -> None:
    """Add `ladder` to `olmo-inject`'s parser."""
    p = add_verb(sub, "ladder", "the OLMo size ladder: per-size parameters, batch, steps, tokens, FLOPs and GPU-hours",
                 "olmo-inject ladder dry-run --preset reference --gpus 64\n  olmo-inject ladder dry-run --preset datadecide --size 4M --size 1B\n"
                 "  olmo-inject ladder dry-run --trainer olmo-core --preset reference")
    p.add_argument("action", choices=["dry-run"], help="dry-run: print the arithmetic, run nothing")
    p.add_argument("--preset", default="reference", help="reference (4M-4B, fixed batch and steps) or datadecide (default: reference)")
    p.add_argument("--size", action="append", help="only these sizes (repeatable)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs for the micro-batch/accumulation split (default: 8)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for GPU-hours (default: 0.4)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="peak bf16 TFLOP/s per GPU (default: 989, H100 SXM)")
    p.add_argument("--tokens", type=float, help="token budget per size instead of the preset's")
    p.add_argument("--trainer", default="ai2-olmo", choices=["ai2-olmo", "olmo-core"],
                   help="whose configs: ai2-olmo's (olmo_configs/<preset>/) or OLMo-core's (olmo_configs/olmo_core/<preset>/; "
                   "parameters measured with OLMo-core) (default: ai2-olmo)")
    p.set_defaults(handler=cmd_ladder)


def cmd_ladder(args) -> int:
    from olmo_configs.dryrun import dry_run

    try:
        print(dry_run(args.preset, args.size, args.gpus, args.mfu, args.gpu_tflops, args.tokens, args.trainer))
    except KeyError as e:
        raise InjectError(e.args[0]) from None
