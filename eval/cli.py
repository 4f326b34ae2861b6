"""eval's verbs of `olmo-inject` (added through the `olmo_inject.verbs` entry point): demo, eval, eval-set,
report, analyze, toy. The demo lives here because it runs every stage, evaluation and the report included."""

from __future__ import annotations

import resource
import shutil
import sys
import textwrap
import time
from pathlib import Path

from inject.cli import EXAMPLES_DIR, add_verb, print_build_summary
from inject.errors import InjectError


def register(sub) -> None:
    """Add eval's verbs to `olmo-inject`'s parser."""
    p = add_verb(sub, "demo", "sample corpus -> injected build -> verify -> tiny OLMo training -> eval -> report, end to end, in one folder",
                 "olmo-inject demo --workdir /tmp/olmo-inject-demo")
    p.add_argument("--workdir", type=Path, default=Path("olmo-inject-demo"), help="folder for everything the demo writes (default: ./olmo-inject-demo)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--train-steps", type=int, default=10, help="steps of tiny-model training at the end (default: 10)")

    p = add_verb(sub, "eval", "score a run's checkpoints on the build's seen, pending and held-out instances (skips finished steps)",
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

    p = add_verb(sub, "eval-set", "the eval sets as Hugging Face datasets and lm-evaluation-harness tasks",
                 "olmo-inject eval-set export build/ --out eval-sets/ --step 5000\n"
                 "  lm_eval --model hf --model_args pretrained=runs/20M-hf --include_path eval-sets/lm_eval --tasks olmo_inject")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = add_verb(actions, "export", "write each task's seen, pending and held-out instances at a step (eval's own draw) as "
                 "Parquet files, a datasets.save_to_disk folder per task and lm-eval multiple-choice tasks",
                 "olmo-inject eval-set export build/ --out eval-sets/ --step 5000 --seen 200 --pending 200 --held-out 200")
    q.add_argument("build_dir", type=Path)
    q.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    q.add_argument("--step", type=int, help="the checkpoint step the splits are drawn for (default: the plan's last)")
    q.add_argument("--seen", type=int, default=200, help="seen instances per task (default: 200)")
    q.add_argument("--pending", type=int, default=200, help="pending instances per task (default: 200)")
    q.add_argument("--held-out", type=int, default=200, help="held-out instances per task (default: 200)")
    q.add_argument("--seed", type=int, default=0, help="seed of the draw, as eval's --seed (default: 0)")

    p = add_verb(sub, "report", "plots (PNG) and a one-page summary (Markdown, HTML) from eval results of one or more runs",
                 "olmo-inject report runs/20M runs/60M runs/150M --out report/")
    p.add_argument("results", type=Path, nargs="+", help="run folders (with eval/) or eval results folders")
    p.add_argument("--out", type=Path, required=True, help="folder for results.csv, the PNGs and summary.md/.html")

    p = add_verb(sub, "analyze", "mechanism analyses of a run's checkpoints: linear probes of task features, gradient interference",
                 "olmo-inject analyze probe runs/tiny --data olmo-inject-demo/build\n"
                 "  olmo-inject analyze interference runs/tiny --data olmo-inject-demo/build")
    analyses = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    q = add_verb(analyses, "probe", "linear probes on hidden states at the answer position, per layer: decode each task's "
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

    q = add_verb(analyses, "interference", "gradient interference per checkpoint: gradients of each task's examples, plain "
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

    p = add_verb(sub, "toy", "the synthetic capacity experiment (CPU, minutes): a power-law mixture of sparse-parity tasks "
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
    for name, handler in COMMANDS.items():
        sub.choices[name].set_defaults(handler=handler)


def _analysis_arguments(p, name: str) -> None:
    p.add_argument("run", type=Path, help="a run folder (every stepN checkpoint in it) or one checkpoint folder: ai2-olmo "
                   "unsharded or sharded, OLMo-core (stepN/), or a Hugging Face model folder")
    p.add_argument("--data", type=Path, required=True, help="the build the run trained on")
    p.add_argument("--out", type=Path, help=f"results folder (default: RUN/{name})")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing instances, batches and probes (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--plot-with", type=Path, nargs="*", default=[], metavar="DIR",
                   help=f"other runs' {name} results folders to draw in the same plots (other model sizes)")


def cmd_eval(args) -> int:
    from .analysis import default_out, run_folder
    from .run import evaluate, log_to_wandb, wandb_run_id

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
    from .export import export_eval_sets

    summary = export_eval_sets(args.build_dir, args.out, args.step, args.seen, args.pending, args.held_out, args.seed)
    for task, splits in summary["rows"].items():
        print(f"  {task:24s} " + "  ".join(f"{split} {n}" for split, n in splits.items()))
    print(f"wrote {args.out}/ at step {summary['step']}: data/ (Parquet), hf/ (save_to_disk), lm_eval/ "
          f"({len(summary['lm_eval_tasks'])} tasks, group olmo_inject), export.json")
    return 0


def cmd_report(args) -> int:
    from .report import make_report

    for path in make_report(args.results, args.out):
        print(f"wrote {path}")
    return 0


def cmd_analyze(args) -> int:
    if args.analysis == "probe":
        from .probe import analyze_probes

        report = analyze_probes(args.run, args.data, out_dir=args.out, seen=args.seen, held_out=args.held_out,
                                seed=args.seed, device=args.device, batch_size=args.batch_size, alpha=args.alpha,
                                C=args.C, plot_with=args.plot_with)
    else:
        from .interference import analyze_interference

        report = analyze_interference(args.run, args.data, out_dir=args.out, n_task=args.n_task, n_dolma=args.n_dolma,
                                      batch_instances=args.batch_instances, top_neurons=args.top_neurons,
                                      seed=args.seed, device=args.device, micro_batch=args.micro_batch,
                                      plot_with=args.plot_with)
    print(f"analyzed steps {report.analyzed or '-'}; already done {report.skipped or '-'}; results in {report.out_dir}")
    for failure in report.failed:
        print(f"failed: {failure}", file=sys.stderr)
    return 2 if report.refused else 1 if report.failed else 0  # 2: a checkpoint unsafe to load


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
    import olmo_configs
    from inject import trainers
    from inject.build import run_build
    from inject.config import load_build_config
    from inject.plan import describe_plan, plot_plan
    from inject.sample import write_demo_corpus
    from inject.verify import run_verify

    from .report import make_report
    from .run import evaluate

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
    print_build_summary(work / "build", manifest)
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

    print(f"[5/6] evaluating every checkpoint of {run} on seen (trained on by then), pending and held-out instances")
    import torch

    # One thread: the tiny model's operations are too small to share, and with other jobs on the cores a second
    # thread mostly spins (benchmarks/eval_scoring.py at load ~4: 1.6 s per checkpoint on one thread, 4.6 on two).
    torch.set_num_threads(1)
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
    from .toy import ToyConfig, describe, run_toy

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
    "eval": cmd_eval,
    "eval-set": cmd_eval_set,
    "report": cmd_report,
    "analyze": cmd_analyze,
    "toy": cmd_toy,
}
