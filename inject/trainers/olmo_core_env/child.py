"""The OLMo-core side: run by the python of an OLMo-core 3.0.0 environment, never imported by the inject
package (ai2-olmo's environment holds another `olmo_core`, 0.1.0). Standard library, numpy, torch and
olmo_core only, so that it runs where olmo-inject is not installed.

    PYTHON inject/trainers/olmo_core_env/child.py COMMAND JOB.json      (or JOB.yaml)

It lives in its own folder because a script's folder comes first on sys.path: beside inject/trainers/olmo_core.py
it would shadow the olmo_core package.

Commands are added by the parts that need OLMo-core's own code (the data loader for verify: `loader`; the
Trainer for train, the checkpoint converter for eval).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np


def model_config(spec: dict, vocab_size: int):
    """An OLMo-2-architecture TransformerConfig from olmo-inject's model block (OLMo-core's `olmo2_*` presets
    made explicit: llama-like, reordered norm (norm after attention and MLP), QK norm, RoPE theta 500,000,
    layer-norm eps 1e-6). `spec`: d_model, n_layers, n_heads, and optionally head_dim, n_kv_heads,
    hidden_size_multiplier, hidden_size_multiple_of."""
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

    optional = {k: spec[k] for k in ("head_dim", "n_kv_heads", "hidden_size_multiplier", "hidden_size_multiple_of")
                if spec.get(k) is not None}
    return TransformerConfig.llama_like(d_model=spec["d_model"], n_layers=spec["n_layers"], n_heads=spec["n_heads"],
                                        vocab_size=vocab_size, block_name=TransformerBlockType.reordered_norm,
                                        qk_norm=True, rope_theta=500_000, layer_norm_eps=1e-6, **optional)


# -------------------------------------------------------------------------------------------------- loader
# verify --olmo-core-python: OLMo-core 3.0.0's own data loader over a build.
#
#     PYTHON child.py loader JOB.json
#         JOB: {paths, dtype, sequence_length, global_batch_size_tokens, seed, max_target_sequence_length,
#               world_size, steps (ascending, 1-based), pad_token_id, eos_token_id, vocab_size}
#
# It builds a NumpyFSLDataset over the token files and one NumpyFSLDataLoader per rank (dp_world_size W,
# dp_rank r, the first epoch, as a fresh training run does), starts them at a step as a resumed run does
# (`batches_processed`), and writes to stdout, for each step: int64 [step, B, W], then the B instance indices
# (rank 0's rows, then rank 1's, ...) as int64, then their B * L tokens in the build's dtype.


def loaders(job: dict, work_dir: str) -> list:
    from olmo_core.data import DataCollator, NumpyDataLoaderBase, NumpyFSLDataset

    dataset = NumpyFSLDataset(*job["paths"], sequence_length=job["sequence_length"], pad_token_id=job["pad_token_id"],
                              eos_token_id=job["eos_token_id"], vocab_size=job["vocab_size"], dtype=getattr(np, job["dtype"]),
                              max_target_sequence_length=job["max_target_sequence_length"])
    dataset.work_dir = work_dir
    dataset.prepare()
    out = []
    for rank in range(job["world_size"]):
        loader = NumpyDataLoaderBase.wrap_numpy_dataset(
            dataset, global_batch_size=job["global_batch_size_tokens"], collator=DataCollator(pad_token_id=job["pad_token_id"]),
            work_dir=work_dir, seed=job["seed"], dp_world_size=job["world_size"], dp_rank=rank, fs_local_rank=0)
        loader.reshuffle()  # no epoch given: OLMo-core's first
        out.append(loader)
    return out


def stream(job: dict, out) -> None:
    dtype = np.dtype(job["dtype"])
    with tempfile.TemporaryDirectory() as work_dir:
        ranks = loaders(job, work_dir)
        iterators, previous = None, None
        for step in job["steps"]:
            if previous is None or step != previous + 1:  # not the next batch: start every rank at this one
                for loader in ranks:
                    loader.reset()
                    loader.batches_processed = step - 1
                iterators = [iter(loader) for loader in ranks]
            previous = step
            batches = [next(it) for it in iterators]
            index = np.concatenate([b["index"].numpy() for b in batches]).astype(np.int64)
            ids = np.concatenate([b["input_ids"].numpy() for b in batches]).astype(dtype)
            out.write(np.array([step, len(index), len(ranks)], dtype=np.int64).tobytes())
            out.write(index.tobytes())
            out.write(ids.tobytes())
        out.flush()


def loader(job: dict) -> int:
    stream(job, sys.stdout.buffer)
    return 0


# ------------------------------------------------------------------------------------------------- checkpoints
# (eval and the ladder: OLMo-core's own parameter counts, checkpoint saves, forward passes and HF converter)


def params(job: dict) -> int:
    """{name: counts} for every model block of job["models"] at job["vocab_size"], written to job["out"]:
    OLMo-core's own counts (TransformerConfig.num_params / num_non_embedding_params), the parameters of the
    model built on the meta device (which must agree), and the MLP hidden size the block resolves to."""
    counts = {}
    for name, spec in job["models"].items():
        config = model_config(spec, job["vocab_size"])
        model = config.build(init_device="meta")
        built = sum(p.numel() for p in model.parameters())
        if built != config.num_params:
            raise SystemExit(f"{name}: OLMo-core's count {config.num_params} != {built} parameters built")
        hidden = {m.w1.out_features for m in model.modules() if type(m).__name__ == "FeedForward"}
        counts[name] = {"num_params": config.num_params, "num_non_embedding_params": config.num_non_embedding_params,
                        "mlp_hidden_size": hidden.pop(), "head_dim": model.blocks["0"].attention.head_dim}
        del model
    _write_json(job["out"], counts)
    return 0


def save_checkpoint(job: dict) -> int:
    """Model checkpoints as OLMo-core's Trainer writes them, for tests: `job["model"]` initialized with `init_seed`
    and trained with AdamW on seeded random tokens, saved after `steps` (a list) optimizer steps by OLMo-core's
    Checkpointer to RUN/step{N}/ (model_and_optim/ with the optimizer state, train/rank0.pt, .metadata.json)."""
    import tempfile

    import torch
    import torch.distributed.checkpoint.state_dict as dist_cp_sd
    from olmo_core.train.checkpoint import Checkpointer

    config = model_config(job["model"], job["vocab_size"])
    config.init_seed = job["init_seed"]
    model = config.build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"), max_seq_len=job["sequence_length"])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.Generator().manual_seed(job["init_seed"])

    class TrainModule:  # what TransformerTrainModule.state_dict_to_save returns (its default save options)
        def state_dict_to_save(self):
            options = dist_cp_sd.StateDictOptions(flatten_optimizer_state_dict=True, cpu_offload=True)
            return {"model": dist_cp_sd.get_model_state_dict(model, options=options),
                    "optim": dist_cp_sd.get_optimizer_state_dict(model, optim, options=options)}

    done = 0
    with tempfile.TemporaryDirectory(prefix="olmo-core-work-") as work_dir:
        checkpointer = Checkpointer(work_dir=work_dir)
        for step in sorted(job["steps"]):
            for done in range(done, step):
                ids = torch.randint(0, job["vocab_size"], (2, job["sequence_length"]), generator=tokens)
                loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
                optim.step()
                optim.zero_grad()
            done = step
            checkpointer.save(f"{job['run']}/{Checkpointer.checkpoint_dirname(step)}", TrainModule(), {"global_step": step})
    return 0


def _load_model(checkpoint: str, spec: dict, vocab_size: int):
    """A checkpoint's model read by OLMo-core's own loader."""
    import torch
    from olmo_core.distributed.checkpoint import load_model_and_optim_state

    model = model_config(spec, vocab_size).build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"))
    load_model_and_optim_state(f"{checkpoint}/model_and_optim", model)
    return model.eval()


def forward(job: dict) -> int:
    """Logits of OLMo-core's own forward pass over job["tokens"] (rows of equal length) with the weights of the
    checkpoint job["checkpoint"], written to job["out"] (.npy, float32)."""
    import numpy as np
    import torch

    model = _load_model(job["checkpoint"], job["model"], job["vocab_size"])
    with torch.no_grad():
        logits = model(torch.tensor(job["tokens"], dtype=torch.long))
    np.save(job["out"], logits.float().numpy())
    return 0


def convert(job: dict) -> int:
    """OLMo-core's own converter (olmo_core.nn.hf.convert_checkpoint.convert_checkpoint_to_hf, with its validation
    against OLMo-core's forward pass): the checkpoint job["checkpoint"] to a Hugging Face Olmo2ForCausalLM folder
    job["out"]. job["tokenizer"]: vocab_size (the tokenizer's own), eos/pad/bos ids and `identifier`, a folder with
    the tokenizer.json (the converter copies it into the output)."""
    from olmo_core.nn.hf.convert_checkpoint import convert_checkpoint_to_hf

    tokenizer = job["tokenizer"]
    convert_checkpoint_to_hf(job["checkpoint"], job["out"], model_config(job["model"], job["vocab_size"]).as_config_dict(),
                             tokenizer, tokenizer_id=tokenizer["identifier"],
                             max_sequence_length=job.get("max_sequence_length"), validate=True)
    return 0


def _write_json(path: str, value) -> None:
    import os

    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


# -------------------------------------------------------------------------------------------------------- train
# `train RUN/config.yaml`, one process per rank under `python -m torch.distributed.run` (or alone as rank 0 of 1):
# OLMo-core's own Trainer, TransformerTrainModule, NumpyFSLDataset and NumpyFSLDataLoader over the build's token
# files. The config is the launcher's resolved one (inject/trainers/olmo_core.py: RunConfig), checked there.

INDICES = "data-indices"
"""RUN/data-indices/rank{r}.tsv: one line per step a rank trained, `step<TAB>index index ...` (the instance
indices of the rank's part of the global batch, in the loader's order); steps after the checkpoint a run resumes
from are cut, so each step appears once."""


def train(job: dict) -> int:
    import signal

    from olmo_core.train import prepare_training_environment, teardown_training_environment

    _die_with_parent()  # a killed launcher (or torchrun agent) takes its trainers with it
    stop = _StopRequest()
    for signum in (signal.SIGUSR2, signal.SIGTERM):  # SLURM: preemption warning, requeue, time limit
        signal.signal(signum, stop.request)
    import torch

    # GPUs: NCCL for training, gloo beside it for bookkeeping and checkpoints; CPU: gloo alone
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    prepare_training_environment(seed=job["train"]["init_seed"], backend=backend)
    _weights_only_loads()
    try:
        trainer = _build_trainer(job, stop)
        trainer.fit()
    finally:
        teardown_training_environment()
    return 0


def _weights_only_loads() -> None:
    """OLMo-core un-pickles the checkpoint it resumes from with weights_only=False (train/rank{r}.pt, and every
    tensor of model_and_optim/): in this process every torch.load is weights_only, with numpy's array classes
    allowed (the trainer state holds numpy's RNG state), as inject/trainers/safe_load.py allows them for ai2-olmo.
    The launcher has already read the checkpoint's trainer state and .metadata with that allowlist."""
    import functools

    import numpy as np
    import torch

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 1.26
        from numpy.core.multiarray import _reconstruct
    torch.serialization.add_safe_globals([np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                                          (_reconstruct, "numpy.core.multiarray._reconstruct"),
                                          (_reconstruct, "numpy._core.multiarray._reconstruct")])
    load = torch.load

    @functools.wraps(load)
    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return load(*args, **kwargs)

    torch.load = weights_only_load


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent ends (prctl PR_SET_PDEATHSIG; inject.lock.die_with_parent,
    which this environment cannot import)."""
    import ctypes
    import os
    import signal

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


class _StopRequest:
    """SIGUSR2/SIGTERM: ask the trainer to stop after the current step (OLMo-core's cancel_run, agreed across
    ranks at the next cancel check, every step here); its checkpointer then saves the step it stopped at. A
    signal that comes before the trainer exists is kept until training starts."""

    def __init__(self):
        self.trainer = None
        self.signal = None

    def request(self, signum, frame):
        import signal

        self.signal = signal.Signals(signum).name
        if self.trainer is not None:
            self.trainer.cancel_run(f"{self.signal} received: stopping after this step, saving a checkpoint")


def _build_trainer(job: dict, stop: _StopRequest):
    import torch
    from olmo_core.config import DType
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.optim import AdamWConfig, ConstantWithWarmup, CosWithWarmup, LinearWithWarmup
    from olmo_core.train import Duration, TrainerConfig
    from olmo_core.train.callbacks import CheckpointerCallback, ConsoleLoggerCallback
    from olmo_core.train.train_module import TransformerDataParallelConfig, TransformerTrainModuleConfig

    data, train, optim = job["data"], job["train"], job["optim"]
    run = train["save_folder"]
    tok = job["tokenizer"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    bf16 = train["dtype"] == "bfloat16"

    model = model_config(job["model"], job["model"]["vocab_size"])
    model.init_seed = train["init_seed"]
    model = model.build(init_device="meta")

    tokenizer = TokenizerConfig(vocab_size=tok["vocab_size"], eos_token_id=tok["eos_token_id"],
                                pad_token_id=tok["pad_token_id"])
    dataset = NumpyFSLDatasetConfig(tokenizer=tokenizer, paths=data["paths"], dtype=data["dtype"],
                                    sequence_length=data["sequence_length"],
                                    max_target_sequence_length=data["max_target_sequence_length"],
                                    include_instance_metadata=False, work_dir=f"{run}/dataset-cache").build()
    loader = NumpyDataLoaderConfig(global_batch_size=data["global_batch_size_tokens"], seed=data["seed"],
                                   work_dir=f"{run}/dataset-cache", num_workers=0)

    schedulers = {"cosine": CosWithWarmup, "linear": LinearWithWarmup, "constant": ConstantWithWarmup}
    scheduler = schedulers[optim["scheduler"]](warmup=optim["warmup_steps"],
                                               **({} if optim["scheduler"] == "constant" else {"alpha_f": optim["final_lr_fraction"]}))
    parallel = DataParallelType.fsdp if train["data_parallel"] == "fsdp" else DataParallelType.ddp
    module = TransformerTrainModuleConfig(
        rank_microbatch_size=train["rank_microbatch_tokens"], max_sequence_length=data["sequence_length"],
        optim=AdamWConfig(lr=optim["lr"], weight_decay=optim["weight_decay"], betas=tuple(optim["betas"]),
                          eps=optim["eps"]),
        max_grad_norm=optim["grad_clip"], scheduler=scheduler,
        dp_config=TransformerDataParallelConfig(name=parallel, param_dtype=DType.bfloat16 if bf16 and parallel == DataParallelType.fsdp else None,
                                                reduce_dtype=DType.float32),
        autocast_precision=DType.bfloat16 if bf16 and parallel == DataParallelType.ddp else None,
    ).build(model, device=device)
    data_loader = loader.build(dataset, dp_process_group=module.dp_process_group)

    trainer = TrainerConfig(
        save_folder=run, work_dir=f"{run}/work", max_duration=Duration.steps(train["max_steps"]),
        cancel_check_interval=1,   # a stop request (SIGUSR2/SIGTERM) is acted on after the current step
        async_bookkeeping=False,   # every rank sees the stop at the same step (an async check may differ by one)
        metrics_collect_interval=1,  # every step's metrics reach RUN/metrics.jsonl before the next step
        # Checkpoints are saved synchronously: an asynchronous save records its duration as a metric on each rank
        # when it finishes, and a stop right after one left the ranks' final metric reductions unmatched (a hang,
        # seen with 2 gloo ranks). Every checkpoint is kept: eval reads them all.
        callbacks={"console_logger": ConsoleLoggerCallback(log_interval=train["log_interval"],
                                                           metrics_log_interval=train["log_interval"]),
                   "checkpointer": CheckpointerCallback(save_interval=train["save_interval"],
                                                        fixed_steps=train["checkpoint_steps"] or None,
                                                        save_async=False, max_checkpoints=None),
                   **_callbacks(run, stop)},
    ).build(module, data_loader)
    return trainer


METRICS_FILE = "metrics.jsonl"
"""RUN/metrics.jsonl (rank 0): one row per trained step, as ai2-olmo runs have it: `loss` (cross-entropy over every
rank's tokens of the batch), `learning_rate`, `grad_norm` (before clipping), `tokens_seen` (global, after the step),
`tokens_per_second` (global: rank 0's rate x ranks; both null at step 1, where OLMo-core's speed monitor starts) and
OLMo-core's other metrics of the step under `olmo_core`. A resumed run drops the rows after its checkpoint. A step's
row is written just after its checkpoint (the metrics are reduced after the checkpointer runs): a run killed in
between has no row for that step."""

METRICS = {  # RUN/metrics.jsonl field: OLMo-core's metric
    "loss": "train/CE loss",
    "learning_rate": "optim/LR (group 0)",
    "grad_norm": "optim/total grad norm",
    "tokens_seen": "throughput/total tokens",
    "device_tokens_per_second": "throughput/device/TPS",
}


def _cut_after(path: str, step: int, step_of) -> str:
    """The lines of `path` (if it exists) of steps up to `step`: a stopped run's lines after the checkpoint it
    resumes from are about to be rewritten."""
    import os

    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return "".join(line for line in f if line.endswith("\n") and step_of(line) <= step)


def _callbacks(run: str, stop: _StopRequest) -> dict:
    """The callbacks olmo-inject adds to OLMo-core's Trainer (defined here: olmo_core is imported only in its
    environment, when training)."""
    import json
    import math
    from dataclasses import dataclass

    from olmo_core.distributed.utils import get_rank, get_world_size
    from olmo_core.train.callbacks import Callback

    indices = f"{run}/{INDICES}"

    @dataclass
    class MetricsRecorder(Callback):
        """Rank 0 writes RUN/metrics.jsonl (METRICS_FILE): a step's row as soon as OLMo-core passes on its metrics
        (every step: metrics_collect_interval 1). OLMo-core passes a step's metrics on in parts (a checkpoint
        step's loss before its throughput): a later part rewrites the step's row, the file's last line."""

        path: str = f"{run}/{METRICS_FILE}"
        file = None
        last = None  # (step, its metrics, the file offset of its row)

        def pre_train(self):
            if get_rank() != 0:
                return
            kept = _cut_after(self.path, self.step, lambda line: json.loads(line)["step"])
            self.file = open(self.path, "w")
            self.file.write(kept)
            self.file.flush()
            self.last = (self.step, None, None)

        def log_metrics(self, step, metrics):
            if self.file is None or step < self.last[0]:
                return
            if step == self.last[0]:
                if self.last[1] is None:
                    return  # a step before this run (re)started
                metrics = {**self.last[1], **metrics}
                self.file.seek(self.last[2])
                self.file.truncate()
            self.last = (step, metrics, self.file.tell())
            self.file.write(json.dumps(self._row(step, metrics)) + "\n")
            self.file.flush()

        def _row(self, step, metrics):
            row = {"step": step}
            for name, key in METRICS.items():
                value = metrics.get(key)
                row[name] = None if value is None or not math.isfinite(float(value)) else float(value)
            device = row.pop("device_tokens_per_second")
            row["tokens_per_second"] = None if device is None else device * get_world_size()
            row["olmo_core"] = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
            return row

        def close(self):
            if self.file is not None:
                self.file.close()
                self.file = None

    @dataclass
    class IndexRecorder(Callback):
        """Writes the instance indices of every step's batch on this rank (INDICES)."""

        folder: str = indices
        file = None

        def pre_train(self):
            import os

            os.makedirs(self.folder, exist_ok=True)
            path = f"{self.folder}/rank{get_rank()}.tsv"
            kept = _cut_after(path, self.step, lambda line: int(line.split("\t", 1)[0]))
            self.file = open(path, "w")
            self.file.write(kept)
            self.file.flush()

        def pre_step(self, batch):
            indices = batch["index"].tolist()
            self.file.write(f"{self.step}\t{' '.join(map(str, indices))}\n")
            self.file.flush()

        def close(self):
            if self.file is not None:
                self.file.close()

    @dataclass
    class StopOnRequest(Callback):
        """Hands the trainer to the signal handler once training starts (OLMo-core's fit() clears a cancel
        made before it), and passes on a signal that came earlier."""

        def pre_train(self):
            stop.trainer = self.trainer
            if stop.signal is not None:
                self.trainer.cancel_run(f"{stop.signal} received before training started")

    return {"data_indices": IndexRecorder(), "metrics_file": MetricsRecorder(), "stop_on_signal": StopOnRequest()}


COMMANDS: dict = {"loader": loader, "params": params, "save-checkpoint": save_checkpoint, "forward": forward,
                  "convert": convert, "train": train}
"""COMMAND -> function(job: dict) -> int (exit code)."""


WITHOUT_TEARDOWN = {"loader", "params", "save-checkpoint", "forward", "convert"}
"""Commands that leave with os._exit once their output is written and flushed: after a complete loader stream,
the interpreter's teardown (torch's) aborted about 1 run in 30 ("terminate called without an active exception",
exit -6), and the caller would report a command that failed. `train` ends normally (its atexit handlers run)."""


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in COMMANDS:
        print(f"usage: {argv[0]} {{{','.join(sorted(COMMANDS))}}} JOB.json", file=sys.stderr)
        return 2
    with open(argv[2]) as f:
        job = json.load(f) if argv[2].endswith(".json") else _yaml().safe_load(f)
    code = COMMANDS[argv[1]](job)
    if argv[1] in WITHOUT_TEARDOWN:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _yaml():
    import yaml  # OLMo-core's own dependency (omegaconf); a run's config.yaml is the train command's job

    return yaml


if __name__ == "__main__":
    sys.exit(main(sys.argv))
