"""The `olmo-inject slurm` verb: its arguments and what each action does."""

from __future__ import annotations

import argparse
from pathlib import Path

from inject.errors import ConfigError

ACTIONS = ("render", "submit", "status", "cancel")
EXAMPLE = """\
  olmo-inject slurm submit --profile example-8gpu --preset reference --data build/ --runs runs/ --dry-run
  olmo-inject slurm submit --profile my-cluster.yaml --preset reference --data build/ --build my-build.yaml --runs runs/
  olmo-inject slurm status --runs runs/
  olmo-inject slurm cancel --runs runs/"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=ACTIONS, help="render: write the sbatch scripts (print them with --dry-run); "
                   "submit: render and sbatch what is neither done nor queued; status: per job and run; cancel: scancel all")
    p.add_argument("--runs", type=Path, required=True, help="runs folder: RUNS/<size>/ per training run, RUNS/slurm/ for "
                   "scripts, logs and job ids")
    p.add_argument("--profile", help="cluster profile: a shipped one (example-8gpu, local-cpu) or a YAML file")
    p.add_argument("--data", type=Path, help="the build the runs train on (built first when --build is given)")
    p.add_argument("--build", type=Path, metavar="BUILD_CONFIG", help="build --data from this config first: a job array "
                   "over the inputs (chunked to the profile's max_array_size) and a finishing job; training waits for it")
    p.add_argument("--preset", help="train the sizes of a ladder preset: reference or datadecide (olmo_configs/<preset>/, "
                   "or olmo_configs/olmo_core/<preset>/ with --trainer olmo-core)")
    p.add_argument("--trainer", choices=["ai2-olmo", "olmo-core"], default="ai2-olmo",
                   help="whose configs --preset takes (default: ai2-olmo; the build must be made for the same trainer)")
    p.add_argument("--size", action="append", help="only these sizes of the preset (repeatable)")
    p.add_argument("--config", type=Path, action="append", help="train this run config, an ai2-olmo TrainConfig or an "
                   "OLMo-core run config (repeatable; "
                   "the run is named after the file)")
    p.add_argument("--nodes", action="append", metavar="NAME=N", help="node count for one run instead of the "
                   "arithmetic (repeatable)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="config override for every "
                   "run, e.g. --set max_duration=1000 (ai2-olmo) or --set train.max_steps=1000 (OLMo-core; repeatable)")
    p.add_argument("--no-eval", action="store_true", help="no evaluation jobs after training")
    p.add_argument("--eval-seen", type=int, default=200, help="seen instances per task in evaluation (default: 200)")
    p.add_argument("--eval-held-out", type=int, default=200, help="held-out instances per task (default: 200)")
    p.add_argument("--analyze", action="append", choices=["probe", "interference"], default=[],
                   help="also run `olmo-inject analyze` in each evaluation job, after scoring (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the scripts and their dependencies; write and submit nothing")


def run(args) -> int:
    from . import submit as slurm

    if args.action == "status":
        _print_status(slurm.status(args.runs))
        return 0
    if args.action == "cancel":
        cancelled = slurm.cancel(args.runs)
        print(f"cancelled {len(cancelled)} job(s): {' '.join(cancelled) or '-'}")
        return 0
    sub = submission(args)
    if args.dry_run:
        for job in sub.jobs():
            after = f"  (afterok: {', '.join(job.after)})" if job.after else ""
            print(f"==> {sub.folder / (job.key + '.sbatch')}{after}\n{job.script}")
        return 0
    if args.action == "render":
        for key, path in slurm.write_scripts(sub).items():
            print(f"{key:24s} {path}")
        return 0
    note = slurm.environment_note()
    if note and not sub.profile.setup:
        print(f"warning: {note}")
    slurm.submit(sub)
    print(f"watch with: olmo-inject slurm status --runs {args.runs}")
    return 0


def submission(args):
    from olmo_configs.ladder import PRESETS

    from .jobs import Submission
    from .profile import load_profile
    from .submit import count_inputs, training_for

    for name in ("profile", "data"):
        if getattr(args, name) is None:
            raise ConfigError(f"--{name}: required for `slurm {args.action}`")
    profile = load_profile(args.profile)
    configs = list(args.config or [])
    if args.preset:
        if args.preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {args.preset!r}; expected one of {sorted(PRESETS)}")
        sizes = args.size or PRESETS[args.preset].sizes
        configs_dir = Path(__file__).resolve().parent.parent / "olmo_configs"
        folder = (configs_dir / "olmo_core" if args.trainer == "olmo-core" else configs_dir) / args.preset
        missing = [s for s in sizes if not (folder / f"{s}.yaml").exists()]
        if missing:
            raise ConfigError(f"--size: no {folder / (missing[0] + '.yaml')}; sizes of {args.preset}: {PRESETS[args.preset].sizes}")
        configs += [folder / f"{s}.yaml" for s in sizes]
    if not configs:
        raise ConfigError("nothing to train: give --preset (and --size) or --config")
    nodes = _nodes(args.nodes or [])
    overrides = [s.lstrip("-") for s in args.set]
    trainings = [training_for(c, overrides, profile, nodes.pop(c.stem, None)) for c in configs]
    if nodes:
        raise ConfigError(f"--nodes: no run named {sorted(nodes)[0]!r}; runs: {[t.name for t in trainings]}")
    names = [t.name for t in trainings]
    if len(set(names)) != len(names):
        raise ConfigError(f"--config: two runs would share a name (the file's stem): {names}")
    inputs = count_inputs(args.build) if args.build else 0
    eval_args = None if args.no_eval else ["--seen", str(args.eval_seen), "--held-out", str(args.eval_held_out)]
    if args.no_eval and args.analyze:
        raise ConfigError("--analyze: the analyses run in the evaluation jobs, which --no-eval turns off")
    return Submission(runs=args.runs.resolve(), data=args.data.resolve(), profile=profile, trainings=trainings,
                      build_config=args.build.resolve() if args.build else None, build_inputs=inputs,
                      eval_args=eval_args, analyses=sorted(set(args.analyze)))


def _nodes(items: list[str]) -> dict[str, int]:
    nodes = {}
    for item in items:
        name, _, count = item.partition("=")
        if not count.isdigit():
            raise ConfigError(f"--nodes: {item!r} is not NAME=N (e.g. 1B=4)")
        nodes[name] = int(count)
    return nodes


def _print_status(rows: list[dict]) -> None:
    print(f"{'job':24s} {'id':>10s} {'state':22s} {'step':>8s} {'last ckpt':>9s} {'evaluated':>9s}")
    for r in rows:
        extra = [str(r.get(k)) if r.get(k) is not None else "-" for k in ("step", "last_checkpoint", "evaluated")] \
            if "step" in r else ["", "", ""]
        print(f"{r['job']:24s} {r['id']:>10s} {r['state']:22s} {extra[0]:>8s} {extra[1]:>9s} {extra[2]:>9s}")
        if r.get("why"):
            print(f"  {r['job']} did not complete: {r['why']}")


def register(sub) -> None:
    """Add `slurm` to `olmo-inject`'s parser (the `olmo_inject.verbs` entry point)."""
    from inject.cli import add_verb

    p = add_verb(sub, "slurm", "the ladder on a SLURM cluster: builds as job arrays, one training job per size "
                 "(preemption-safe, requeued), evaluation after each", EXAMPLE.strip())
    add_arguments(p)
    p.set_defaults(handler=run)
