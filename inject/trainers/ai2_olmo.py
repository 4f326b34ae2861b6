"""ai2-olmo 0.6.0 (PyPI `ai2-olmo`), the legacy OLMo trainer and olmo-inject's default, installed in the main
environment. This module imports `olmo` (lazily, inside the functions that need it); outside inject/trainers/ only
the training processes its `launch` starts (olmo_configs/worker.py, compat.py), the ladder's config generator
(olmo_configs/generate.py) and inject/tokenizer.py (tokenizing text) import it (tests/test_trainer_seam.py).

Implements so far: NAME, order, usable_instances, file_instances, order_fields, loader_batches, loader_source,
check_train_config (verify --train-config), instance_filter_masks (the build's repetition-filter check),
train_config_for (the minimal TrainConfig whose data loader verify replays); resolve_train_config, render, train,
launch, completed_step, final_step, final_checkpoint_markers (`olmo-inject train`, slurm); load_model, load_hf_olmo, input_embedding, model_blocks
(eval's ai2-olmo checkpoints and models); count_params and run_size (the ladder's and slurm's model sizes).
"""

from __future__ import annotations

import functools
import mmap
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..build import load_manifest
from ..errors import ConfigError, InjectError
from ..identity import bind_run
from ..lock import folder_lock
from ..order import FIRST_EPOCH, ai2_olmo_order
from . import check_vocabulary, write_run_config
from .torchrun import run_workers

NAME = "ai2-olmo"


# ---------------------------------------------------------------------------------------------- order, verify


def order(num_instances: int, training, sequence_length: int) -> np.ndarray:
    """ai2-olmo 0.6.0's global instance order of epoch 0 (one rank), as its IterableDataset builds it."""
    return ai2_olmo_order(num_instances, training.seed, training.drop_last, epoch=FIRST_EPOCH[NAME])


def usable_instances(num_instances: int, training, sequence_length: int) -> int:
    """Instances ai2-olmo's dataset finds in a build of `num_instances` instances: all of them."""
    return num_instances


def file_instances(file_instances: list[int], training, sequence_length: int) -> list[int]:
    """Instances ai2-olmo's dataset finds in each token file holding `file_instances[i]` whole instances: all."""
    return list(file_instances)


def order_fields(sequence_length: int, training: dict | None) -> dict[str, Any]:
    """Every ai2-olmo TrainConfig field (dotted path) that decides which instances a training step reads, with the
    value a build needs (`training`: a TrainingConfig as a dict; None for a build without injection).

    The one list of them: `olmo-data.yaml` carries them, `train` and `verify --train-config` refuse a config
    whose values differ (`epoch` also when unset, `fast_forward_batches` also when 0: the same order)."""
    fields: dict[str, Any] = {"model.max_sequence_length": sequence_length}
    if training is not None:
        fields.update({
            "global_train_batch_size": training["global_batch_size"],
            "data.seed": training["seed"],
            "data.drop_last": training["drop_last"],
            "epoch": 0,                   # the plan is laid out in epoch 0's order
            "fast_forward_batches": None,  # skipping batches skips their planned examples
            "restore_dataloader": True,    # else a resumed run reads the order again from batch 1
        })
    return fields


def train_config_for(manifest: dict, save_folder: str, instance_filter: bool):
    """A minimal ai2-olmo TrainConfig whose data loader is the one training would use on this build."""
    from olmo.config import DataConfig, InstanceFilterConfig, ModelConfig, TokenizerConfig, TrainConfig

    t = manifest["injection"]["training"]
    tok = manifest["tokenizer"]
    return TrainConfig(
        seed=t["seed"], global_train_batch_size=t["global_batch_size"], device_train_batch_size=t["global_batch_size"],
        save_folder=save_folder, save_overwrite=True, max_duration=str(t["steps"]),
        model=ModelConfig(max_sequence_length=manifest["sequence_length"], vocab_size=tok["vocab_size"],
                          eos_token_id=tok["eos_token_id"], pad_token_id=tok["pad_token_id"]),
        tokenizer=TokenizerConfig(identifier=tok["olmo_identifier"]),
        data=DataConfig(paths=[str(manifest["_dir"] / f["path"]) for f in manifest["outputs"]],
                        memmap_dtype=manifest["dtype"], drop_last=t["drop_last"], num_workers=0,
                        instance_filter=InstanceFilterConfig() if instance_filter else None),
    )


def order_settings(cfg, manifest: dict) -> list[tuple[str, object, object]]:
    """(field, TrainConfig value, build value) of the settings that fix OLMo's data order (`order_fields`).
    An ai2-olmo TrainConfig never reads the order of a build made for another trainer."""
    training = manifest["injection"]["training"] if "injection" in manifest else None
    if training is not None and training.get("trainer", "ai2-olmo") != "ai2-olmo":
        return [("training.trainer", "ai2-olmo", training["trainer"])]
    return [(ORDER_LABELS.get(name, name), _order_value(cfg, name), want)
            for name, want in order_fields(manifest["sequence_length"], training).items()]


ORDER_LABELS = {"data.seed": "data.seed (or seed)"}


def _order_value(cfg, name: str):
    """A TrainConfig's value of an order field, as OLMo uses it (unset data.seed: seed; unset epoch: 0; 0 batches
    fast-forwarded: none)."""
    if name == "data.seed":
        return cfg.data.seed if cfg.data.seed is not None else cfg.seed
    if name == "epoch":
        return cfg.epoch or 0
    if name == "fast_forward_batches":
        return cfg.fast_forward_batches or None
    value = cfg
    for part in name.split("."):
        value = getattr(value, part)
    return value


def check_train_config(manifest: dict, path: Path, report) -> None:
    """Compare an OLMo TrainConfig YAML with the build, naming every field that differs (verify's Report)."""
    from olmo.config import TrainConfig

    cfg = TrainConfig.load(path)
    t, tok = manifest["injection"]["training"], manifest["tokenizer"]
    pairs = order_settings(cfg, manifest) + [
        ("tokenizer.identifier", Path(cfg.tokenizer.identifier).name, Path(tok["olmo_identifier"]).name),
        ("model.eos_token_id", cfg.model.eos_token_id, tok["eos_token_id"]),
        ("model.pad_token_id", cfg.model.pad_token_id, tok["pad_token_id"]),
        ("data.memmap_dtype", cfg.data.memmap_dtype, manifest["dtype"]),
    ]
    for name, got, want in pairs:
        if got != want:
            report.fail("config", f"{path}: {name} is {got!r}, the build was made for {want!r}")
    if (cfg.model.embedding_size or cfg.model.vocab_size) < tok["vocab_size"]:
        report.fail("config", f"{path}: model.vocab_size/embedding_size {cfg.model.embedding_size or cfg.model.vocab_size} "
                              f"is smaller than the tokenizer's vocabulary {tok['vocab_size']}")
    if cfg.max_duration and str(cfg.max_duration).isdigit() and int(cfg.max_duration) > t["steps"]:
        report.fail("config", f"{path}: max_duration {cfg.max_duration} steps exceeds the {t['steps']} steps the plan covers")
    report.checked["train config"] = str(path)


class FullLoader:
    """verify --replay-loader: read the batches through ai2-olmo's whole training DataLoader (its dataset's
    __getitem__, the collator, the repetition filter on every instance), as training does."""

    def check(self, build: Path, manifest: dict) -> None:
        """Refuse a build made for another trainer's order (InjectError naming the option)."""
        from . import name_of

        if name_of(manifest) != NAME:
            raise InjectError(f"--replay-loader: {build} was built for {name_of(manifest)}'s order; ai2-olmo's loader "
                              f"would not read it as planned (OLMo-core's own loader: --olmo-core-python)")


def loader_source(own_loader=None) -> str:
    """What verify's batches came from (its report line; the same with or without a LoaderOrder)."""
    if isinstance(own_loader, FullLoader):
        return "ai2-olmo build_train_dataloader, replayed in full"
    return "ai2-olmo build_train_dataloader's instance order, instances read from the token files"


@dataclass(frozen=True)
class LoaderOrder:
    """ai2-olmo's order and instance files as its own loader code computes them (`loader_order`), so that the
    processes of `verify --workers` read instances without building the loader (or importing OLMo) again."""

    indices: str
    """global_indices.npy (uint32), as the loader's IterableDataset wrote it."""
    first: int
    stop: int
    step: int
    """The IterableDataset.__iter__ slice of it for rank 0 of 1."""
    files: tuple
    """(path, first instance, end instance) of each token file: MemMapDataset.offsets."""
    sequence_length: int
    dtype: str
    instance_filter: tuple | None
    """The dataset's InstanceFilterConfig (max_period, min_period, max_count); None: no filter."""


def loader_order(manifest: dict, folder: str, use_filter: bool) -> LoaderOrder:
    """Build ai2-olmo's training data loader over the build (its files in `folder`, kept while the order is read)."""
    from olmo.data import build_train_dataloader

    loader = build_train_dataloader(train_config_for(manifest, folder, use_filter), world_size=1, rank=0, fs_local_rank=0)
    iterable, dataset = loader.dataset, loader.dataset.dataset
    config = dataset.instance_filter_config
    return LoaderOrder(
        str(iterable.global_indices_file), iterable.rank, iterable.total_size, iterable.world_size,
        tuple((str(path), start, end) for path, (start, end) in zip(dataset._memmap_paths, dataset.offsets)),
        dataset._chunk_size, np.dtype(dataset.dtype).name,
        (config.repetition_max_period, config.repetition_min_period, config.repetition_max_count) if config else None)


def loader_batches(manifest: dict, chosen: list[int], use_filter: bool, report, own_loader=None):
    """(step, batch) of ai2-olmo's own training data loader over the build, one rank.

    By default (or with a LoaderOrder made by `loader_order`) the order is the loader's own IterableDataset's
    (`global_indices.npy`, sliced for rank 0 of 1 as its `__iter__` slices it) and each instance's file is its
    MemMapDataset's (`offsets`); the instances' tokens are then read from the memory-mapped token files (what
    MemMapDataset.__getitem__ reads, without the per-instance tensors and collator), and the batch carries
    `instance_filter`, the dataset's repetition filter, to apply to the instances that need it. With
    `own_loader=FullLoader()` every batch comes out of the DataLoader itself (with `instance_mask` when
    `use_filter`)."""
    if isinstance(own_loader, FullLoader):
        yield from _replayed_batches(manifest, chosen, use_filter)
    elif isinstance(own_loader, LoaderOrder):
        yield from _batches_in_order(own_loader, manifest, chosen)
    else:
        with tempfile.TemporaryDirectory() as folder:
            yield from _batches_in_order(loader_order(manifest, folder, use_filter), manifest, chosen)


def _batches_in_order(order: LoaderOrder, manifest: dict, chosen: list[int]):
    B = manifest["injection"]["training"]["global_batch_size"]
    indices = np.memmap(order.indices, dtype=np.uint32, mode="r")[order.first : order.stop : order.step]
    files, mappings = _instance_files(order)
    read, touched = 0, set()
    for step in tqdm(chosen, desc="verify batches", unit="batch", disable=None):
        index = np.asarray(indices[(step - 1) * B : step * B]).astype(np.int64)
        batch = {"input_ids": _read_instances(files, index, touched), "index": index}
        read += batch["input_ids"].nbytes
        if read >= RELEASE_EVERY:  # pages read through a mapping stay resident (and count as the job's memory)
            for f in touched:  # read-only and shared: they are read again from the page cache when needed
                mappings[f].madvise(mmap.MADV_DONTNEED)
            read, touched = 0, set()
        if order.instance_filter is not None:
            batch["instance_filter"] = functools.partial(_masked, order.instance_filter)
        yield step, batch


RELEASE_EVERY = 1 << 25
"""Bytes of instances read between two releases of the token files' mapped pages: verify's memory stays flat
in the size of the build (SLURM's memory accounting counts mapped file pages)."""


def _instance_files(order: LoaderOrder) -> tuple[tuple[np.ndarray, list[np.ndarray]], list[mmap.mmap]]:
    """((first instance of each token file, its tokens as [instances, L]), the files' mappings), as MemMapDataset
    maps instances to files."""
    L, firsts, files, mappings = order.sequence_length, [], [], []
    for path, start, end in order.files:
        mapped = np.memmap(path, dtype=order.dtype, mode="r")
        tokens = np.asarray(mapped)  # a plain array over the mapping
        firsts.append(start)
        files.append(tokens[: (end - start) * L].reshape(end - start, L))
        mappings.append(mapped._mmap)
    return (np.array(firsts, dtype=np.int64), files), mappings


def _read_instances(files, index: np.ndarray, touched: set | None = None) -> np.ndarray:
    """The tokens of the given instances, [len(index), L], in the order given; adds the files read to `touched`."""
    firsts, arrays = files
    which = np.searchsorted(firsts, index, side="right") - 1
    out = np.empty((len(index), arrays[0].shape[1]), dtype=arrays[0].dtype)
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(len(arrays) + 1))
    read_files = np.unique(which).tolist()
    if touched is not None:
        touched.update(read_files)
    for f in read_files:
        rows = order[bounds[f] : bounds[f + 1]]
        out[rows] = arrays[f][index[rows] - firsts[f]]
    return out


def _masked(instance_filter: tuple, rows: np.ndarray) -> np.ndarray:
    """Whether ai2-olmo's repetition filter masks each row [n, L]: MemMapDataset._validate_instance's test (OLMo's
    find_periodic_sequences with the dataset's InstanceFilterConfig), run where place.may_be_filtered allows it."""
    from ..place import may_be_filtered

    max_period, min_period, max_count = instance_filter
    out = np.zeros(len(rows), dtype=bool)
    candidates = np.flatnonzero(may_be_filtered(rows, max_period, max_count))
    if len(candidates):
        from olmo.data.util import find_periodic_sequences

        for r in candidates.tolist():
            out[r] = any(m.times >= max_count for m in find_periodic_sequences(
                rows[r].astype(np.int64), max_period=max_period, min_period=min_period))
    return out


def _replayed_batches(manifest: dict, chosen: list[int], use_filter: bool):
    """(step, batch) straight out of ai2-olmo's training DataLoader (collated, with `instance_mask` when filtering)."""
    from olmo.data import build_train_dataloader

    B = manifest["injection"]["training"]["global_batch_size"]
    with tempfile.TemporaryDirectory() as save_folder:
        loader = build_train_dataloader(train_config_for(manifest, save_folder, use_filter), world_size=1, rank=0, fs_local_rank=0)
        iterator, previous = None, None
        for step in tqdm(chosen, desc="verify batches", unit="batch", disable=None):
            if previous is None or step != previous + 1:  # not the next batch: start the loader at this one
                loader.dataset.start_index = (step - 1) * B
                iterator = iter(loader)
            batch = next(iterator)
            previous = step
            yield step, {k: np.asarray(v) for k, v in batch.items() if k in ("input_ids", "index", "instance_mask")}


def instance_filter_masks(tokens: np.ndarray) -> bool:
    """True when ai2-olmo's repetition filter (InstanceFilterConfig defaults) would mask this instance."""
    from olmo.config import InstanceFilterConfig
    from olmo.data.util import find_periodic_sequences

    f = InstanceFilterConfig()
    return any(m.times >= f.repetition_max_count for m in find_periodic_sequences(
        tokens.astype(np.int64), max_period=f.repetition_max_period, min_period=f.repetition_min_period))


# ---------------------------------------------------------------------------------------------------- training
# `olmo-inject train CONFIG --data BUILD --run RUN` (moved here from olmo_configs/train.py).
#
# The launcher checks the TrainConfig against the build (the data order, and so every injection rate, depends on
# batch size, sequence length and seed), fills in the build's paths, dtype, tokenizer and EOS, writes the resolved
# config into the run folder and starts `torchrun` (one process per GPU, or one on CPU) running
# olmo_configs/worker.py (+ compat.py), the only code that imports them. Running it again on the same run folder
# resumes from the latest checkpoint, with the data order continuing where it stopped (OLMo restores the loader
# position from the trainer state); on a run that is already complete it trains nothing.
#
# One trainer per run folder: the launcher holds RUN/.lock (shared by the launchers of one multi-node run) and
# hands it to the trainer, which dies with its launcher (parent-death signal), so a killed launcher leaves no
# trainer behind and a second `train` on the same folder is refused. RUN/build.json records the build's identity
# (`inject.identity`): a resume on a replaced build is refused.

LOCK = ".lock"


def resolve_train_config(config_path: Path, build_dir: Path, run_dir: Path, overrides: list[str]):
    """The TrainConfig for this run, checked against the build; raises ConfigError naming the field."""
    from olmo.config import TrainConfig

    try:
        cfg = TrainConfig.load(config_path, overrides=[o.lstrip("-") for o in overrides])
    except Exception as e:  # omegaconf raises several types for bad keys/values
        raise ConfigError(f"{config_path}: {e}") from None
    manifest = load_manifest(build_dir)
    tok = manifest["tokenizer"]
    problems = [(name, got, want) for name, got, want in order_settings(cfg, manifest) if got != want]
    if cfg.tokenizer.identifier and Path(cfg.tokenizer.identifier).name != tok["file"]:
        problems.append(("tokenizer.identifier", cfg.tokenizer.identifier, tok["olmo_identifier"]))
    inj = manifest.get("injection")
    if inj:
        t = inj["training"]
        steps = int(cfg.max_duration) if str(cfg.max_duration).isdigit() else None
        if steps is None or steps > t["steps"]:
            problems.append(("max_duration", cfg.max_duration, f"at most {t['steps']} steps (the plan's length)"))
    if problems:
        order = {name for name, _, _ in order_settings(cfg, manifest)}
        why = (" (these fields decide which instances each step reads; the build's plan holds only for the values "
               "it was made for, as in its olmo-data.yaml)") if order & {name for name, _, _ in problems} else ""
        raise ConfigError("; ".join(f"{name} is {got!r} in {config_path}, the build {build_dir} needs {want!r}"
                                    for name, got, want in problems) + why)
    cfg.data.paths = [str((Path(build_dir) / f["path"]).resolve()) for f in manifest["outputs"]]
    cfg.data.memmap_dtype = manifest["dtype"]
    cfg.data.datasets = None
    cfg.model.eos_token_id = tok["eos_token_id"]
    cfg.model.pad_token_id = tok["pad_token_id"]
    cfg.model.vocab_size = tok["vocab_size"]
    if (cfg.model.embedding_size or 0) < tok["vocab_size"]:
        cfg.model.embedding_size = -(-tok["vocab_size"] // 128) * 128
    cfg.tokenizer.identifier = tok["olmo_identifier"]
    cfg.save_folder = str(Path(run_dir).resolve())
    cfg.run_name = cfg.run_name or Path(run_dir).name
    cfg.canceled_check_interval = 1  # SIGUSR2 (preemption) is acted on after the current step
    return cfg


def render(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg), sort_keys=False)


def write_resolved(cfg, run_dir: Path) -> Path:
    """Write the run's config; an existing run folder must hold the same one (resume, not a new run)."""
    from omegaconf import OmegaConf

    return write_run_config(run_dir, render(cfg), lambda text: OmegaConf.to_container(OmegaConf.create(text)))


def train(cfg, build_dir: Path, run_dir: Path, nproc: int | None = None, nnodes: int = 1,
          rendezvous: str | None = None) -> int:
    """Train the resolved `cfg` into `run_dir` under the run's lock; returns the trainer's exit code
    (0 without starting it when the run is complete)."""
    run_dir = Path(run_dir)
    with folder_lock(run_dir / LOCK, f"the run folder {run_dir}", shared=nnodes > 1) as lock_fd:
        path = write_resolved(cfg, run_dir)
        bind_run(run_dir, build_dir)
        done = completed_step(run_dir, cfg)
        if done is not None:
            print(f"olmo-inject train: {run_dir} is complete (its latest checkpoint is step {done}, the run's end); "
                  f"nothing to train")
            return 0
        return launch(path, nproc, nnodes, rendezvous, keep_open=lock_fd)


def final_step(cfg) -> int | None:
    """The step a run stops at (stop_at, else max_duration in steps); None when given in tokens or epochs."""
    steps = int(cfg.max_duration) if str(cfg.max_duration).isdigit() else None
    if cfg.stop_at is not None:
        steps = min(cfg.stop_at, steps) if steps is not None else cfg.stop_at
    return steps


def completed_step(run_dir: Path, cfg) -> int | None:
    """The latest checkpoint's step when it is at or past the run's end (the run is complete), else None.
    The same test as the trainer's after it restores that checkpoint (olmo_configs/worker.py)."""
    from olmo.util import find_latest_checkpoint

    end = final_step(cfg)
    latest = find_latest_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    if end is None or latest is None:
        return None
    step = int(Path(latest).name.replace("step", "").replace("-unsharded", ""))
    return step if step >= end else None


def final_checkpoint_markers(steps: int) -> list[str]:
    """Paths in a run folder, any one of which means the run's checkpoint of step `steps` is complete (slurm's job
    scripts test them): ai2-olmo's unsharded or sharded checkpoint folder (moved here from slurm/jobs.py)."""
    return [f"step{steps}-unsharded", f"step{steps}"]


def launch(config_path: Path, nproc: int | None = None, nnodes: int = 1, rendezvous: str | None = None,
           keep_open: int | None = None) -> int:
    """torchrun with one process per GPU (or one on CPU), on this node of `nnodes`; returns its exit code.

    Several nodes (one launcher per node, e.g. under `srun`) meet at `rendezvous` (HOST:PORT of the first node).
    `keep_open`: a file descriptor (the run's lock) the trainer keeps open for as long as it runs.
    """
    import torch

    nproc = nproc or max(torch.cuda.device_count(), 1)
    _check_resume_checkpoint(Path(config_path).parent)
    return run_workers(sys.executable, ["-m", "olmo_configs.worker", str(config_path)], nproc, nnodes, rendezvous,
                       keep_open)


def _check_resume_checkpoint(run_dir: Path) -> None:
    """The checkpoint a rerun resumes from is read with weights_only and an allowlist (inject/trainers/safe_load.py):
    one that needs any other class is refused here, naming the file, before any trainer starts."""
    from olmo.util import find_latest_checkpoint

    from .safe_load import check_checkpoint, check_environment

    check_environment()
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:
        check_checkpoint(latest)


# ------------------------------------------------------------------------------------------------- checkpoints
# (moved here from eval/checkpoints.py, which finds checkpoint folders and reads Hugging Face ones itself)

MODEL_KIND = "olmo"
"""eval's LoadedModel.kind of ai2-olmo's own OLMo class."""


def load_model(folder: Path, fmt: str, manifest: dict, device: str = "cpu"):
    """(model, run name) of an ai2-olmo checkpoint folder of format `fmt` (eval's "unsharded" or "sharded");
    InjectError names the folder and what is wrong with it."""
    from olmo.config import TrainConfig
    from olmo.model import OLMo

    from .safe_load import load_file

    need = ["config.yaml", "model.pt" if fmt == "unsharded" else "model_and_optim/ or rank0.pt"]
    for name in need:
        if not any((folder / n).exists() for n in name.split("/ or ")):
            raise InjectError(f"{folder}: no {name} (a half-written checkpoint?)")
    try:
        train_config = TrainConfig.load(folder / "config.yaml")
        config, run_name = train_config.model, train_config.run_name or folder.parent.name
    except Exception as e:  # omegaconf raises its own types for a broken YAML
        raise InjectError(f"{folder}/config.yaml: not an ai2-olmo config: {e}") from None
    check_vocabulary(folder, config.vocab_size, config.eos_token_id, manifest)
    try:
        config.init_device = "cpu"
        model = OLMo(config, init_params=False)  # every parameter is read below (strict): no random init to pay
        if fmt == "unsharded":  # what OLMo.from_checkpoint does, with a weights_only load
            model.load_state_dict(model._make_state_dict_compatible(load_file(folder / "model.pt"))[0])
        else:
            _load_sharded_model_state(folder, model)
        return model.to(device), run_name
    except InjectError:
        raise
    except Exception as e:  # torch raises many types for a damaged file
        raise InjectError(f"{folder}: cannot load the {fmt} weights: {e}") from None


def _load_sharded_model_state(folder: Path, model) -> None:
    from .safe_load import check_file, checked_olmo_loads, detached_sharded_tensor, load_dcp_tensors

    if (folder / "rank0.pt").exists():
        from olmo.checkpoint import TorchLegacyShardedCheckpointer
        from olmo.config import TrainConfig

        for rank_file in sorted(folder.glob("rank*.pt")):
            check_file(rank_file)  # refused here, the file named, rather than inside ai2-olmo's thread pool
        checkpointer = TorchLegacyShardedCheckpointer(TrainConfig.load(folder / "config.yaml"))
        with checked_olmo_loads(detached_sharded_tensor()):  # ShardedTensors, without a process group
            state, _, _ = checkpointer.unshard_checkpoint(folder, load_optimizer_state=False, load_trainer_state=False)
        model.load_state_dict(state)
        return
    state = {"model": model.state_dict()}
    load_dcp_tensors(folder / "model_and_optim", state)
    model.load_state_dict(state["model"])


def load_hf_olmo(folder: Path, config: dict):
    """An `hf_olmo` folder (config.json holds ai2-olmo's ModelConfig fields; weights are prefixed `model.`)."""
    from dataclasses import fields

    from olmo.config import ModelConfig
    from olmo.model import OLMo

    from .safe_load import load_file

    known = {f.name for f in fields(ModelConfig)}
    model_config = ModelConfig(**{k: v for k, v in config.items() if k in known})
    model_config.init_device = "cpu"
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file as load_safetensors

        state = load_safetensors(folder / "model.safetensors")
    else:
        state = load_file(folder / "pytorch_model.bin")
    model = OLMo(model_config)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model


def input_embedding(model):
    """The input embedding of an OLMo model (its parameters are not counted as non-embedding)."""
    return model.transformer.wte


def model_blocks(model) -> list:
    """The transformer blocks of an OLMo model, in order."""
    if model.config.block_group_size != 1:
        return [b for group in model.transformer.block_groups for b in group]
    return list(model.transformer.blocks)


# ------------------------------------------------------------------------------------------------------ sizes
# (moved here from olmo_configs/ladder.py and slurm/submit.py)


def count_params(model_fields: dict) -> tuple[int, int]:
    """(total, without the input embedding) parameters of an ai2-olmo model with these ModelConfig fields, counted
    on a model built on the meta device."""
    import torch
    from olmo.config import ModelConfig
    from olmo.model import OLMo

    config = ModelConfig(**{**model_fields, "init_device": "meta"})
    with torch.device("meta"):
        model = OLMo(config, init_params=False)
    return model.num_params(), model.num_params(include_embedding=False)


def run_size(config: Path, overrides: list[str], with_params: bool = True) -> tuple[int, int, int, int]:
    """(steps, parameters without the input embedding, tokens, global batch in instances) of a TrainConfig YAML with
    overrides (slurm's node choice; the parameters are counted on the meta device, whatever `with_params`);
    ConfigError names the file and field."""
    from dataclasses import asdict

    from olmo.config import TrainConfig

    try:
        cfg = TrainConfig.load(config, overrides=overrides)
    except Exception as e:  # omegaconf raises several types for bad keys/values
        raise ConfigError(f"{config}: {e}") from None
    if not str(cfg.max_duration).isdigit():
        raise ConfigError(f"{config}: max_duration: expected a number of steps, got {cfg.max_duration!r}")
    steps = int(cfg.max_duration)
    tokens = steps * cfg.global_train_batch_size * cfg.model.max_sequence_length
    return steps, count_params(asdict(cfg.model))[1], tokens, cfg.global_train_batch_size
