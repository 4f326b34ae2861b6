"""ai2-olmo 0.6.0 (PyPI `ai2-olmo`), the legacy OLMo trainer and olmo-inject's default, installed in the main
environment: this module imports `olmo` (lazily, inside the functions that need it), and nothing outside
inject/trainers/ does.

Implements so far: NAME, order, usable_instances, file_instances, order_fields, loader_batches, loader_source,
check_train_config (verify --train-config), instance_filter_masks (the build's repetition-filter check), and
train_config_for (the minimal TrainConfig whose data loader verify replays).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..order import FIRST_EPOCH, ai2_olmo_order

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


def loader_source(own_loader=None) -> str:
    """What verify's batches came from (its report line)."""
    return "ai2-olmo build_train_dataloader"


def loader_batches(manifest: dict, chosen: list[int], use_filter: bool, report, own_loader=None):
    """(step, batch) of ai2-olmo's own training data loader over the build, one rank (`own_loader`: none here)."""
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
            yield step, batch


def instance_filter_masks(tokens: np.ndarray) -> bool:
    """True when ai2-olmo's repetition filter (InstanceFilterConfig defaults) would mask this instance."""
    from olmo.config import InstanceFilterConfig
    from olmo.data.util import find_periodic_sequences

    f = InstanceFilterConfig()
    return any(m.times >= f.repetition_max_count for m in find_periodic_sequences(
        tokens.astype(np.int64), max_period=f.repetition_max_period, min_period=f.repetition_min_period))
