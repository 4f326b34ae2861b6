"""OLMo-core 3.0.0 (PyPI `ai2-olmo-core`), the trainer of OLMo 2 and OLMo 3, as olmo-inject's second trainer.

OLMo-core cannot live in the main environment: ai2-olmo 0.6.0 pins `ai2-olmo-core==0.1.0` and both install
the import package `olmo_core`. So this module never imports it: whatever needs OLMo-core's own code (its
data loader for verify, its Trainer for train, its checkpoint converter) runs as `olmo_core_env/child.py` in the
python of an OLMo-core environment (`python()`), and talks to this module through files and pipes.

The order (`order`, numpy only) is in inject/order.py and tested against OLMo-core's own loader.

Implements so far: NAME, python, order, usable_instances, file_instances, order_fields, loader_batches (OLMo-core's
order over the token files, or with an `OlmoCoreLoader` its own data loader through child.py `loader`),
loader_source, check_train_config.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..config import TrainingConfig
from ..configtools import from_dict
from ..errors import ConfigError, InjectError
from ..injection import training_order
from ..order import FIRST_EPOCH, olmo_core_num_instances, olmo_core_order

NAME = "olmo-core"
CHILD = Path(__file__).with_name("olmo_core_env") / "child.py"
"""The script that runs inside the OLMo-core environment (imports olmo_core; never imported here)."""

PYTHON_ENV = "OLMO_INJECT_OLMO_CORE_PYTHON"
"""Environment variable naming the python of an OLMo-core 3 environment."""


def python(given: str | None = None) -> str:
    """The python of the OLMo-core environment: `given` (a --olmo-core-python option), else $OLMO_INJECT_OLMO_CORE_PYTHON,
    else .venv-olmo-core/bin/python at the repository root or the current folder (`bash tests/install-olmo-core.sh`
    makes it)."""
    if given or os.environ.get(PYTHON_ENV):
        return str(given or os.environ[PYTHON_ENV])
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root / ".venv-olmo-core" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    raise ConfigError(f"no OLMo-core environment: run `bash tests/install-olmo-core.sh` (makes .venv-olmo-core), or "
                      f"name its python with --olmo-core-python or ${PYTHON_ENV}")


# ---------------------------------------------------------------------------------------------- order, verify


def order(num_instances: int, training: TrainingConfig, sequence_length: int) -> np.ndarray:
    """OLMo-core 3.0.0's global order of its first epoch over a build of `num_instances` instances."""
    count = usable_instances(num_instances, training, sequence_length)
    return olmo_core_order(count, training.global_batch_size, training.seed, training.instance_group(sequence_length),
                           epoch=FIRST_EPOCH[NAME])


def usable_instances(num_instances: int, training: TrainingConfig, sequence_length: int) -> int:
    """Instances OLMo-core's dataset finds in a build of `num_instances` instances (files of `instances_per_file`
    whole instances, checked to be whole groups by BuildConfig.validate): with max_target_sequence_length = c * L
    it drops the last file's instances past a multiple of c."""
    return olmo_core_num_instances([num_instances], training.instance_group(sequence_length))


def file_instances(file_instances: list[int], training: TrainingConfig, sequence_length: int) -> list[int]:
    """Instances OLMo-core's dataset finds in each token file holding `file_instances[i]` whole instances: each file
    chunked on its own, into whole instance groups."""
    return [olmo_core_num_instances([n], training.instance_group(sequence_length)) for n in file_instances]


def order_fields(sequence_length: int, training: dict) -> dict[str, Any]:
    """Every OLMo-core 3.0.0 config field (dotted: NumpyFSLDatasetConfig, NumpyDataLoaderConfig) that decides which
    instances a training step reads, with the value a build needs (`training`: a TrainingConfig as a dict).
    `olmo-data.yaml` carries them."""
    return {"dataset.sequence_length": sequence_length,
            "dataset.max_target_sequence_length": training["max_target_sequence_length"],
            "data_loader.global_batch_size": training["global_batch_size_tokens"],
            "data_loader.seed": training["seed"]}


def check_train_config(manifest: dict, path: Path, report) -> None:
    """verify --train-config on an OLMo-core build: a TrainConfig given is ai2-olmo's (the only run config checked
    so far), which never reads this build's order."""
    report.fail("config", f"{path}: training.trainer is 'ai2-olmo', the build was made for {NAME!r}")
    report.checked["train config"] = str(path)


@dataclass(frozen=True)
class OlmoCoreLoader:
    """Read an OLMo-core build's batches with OLMo-core's own data loader, in the environment of `python`
    (child.py's `loader` command runs there), as `ranks` data-parallel ranks read them."""

    python: str
    ranks: int = 1

    def check(self, build: Path, manifest: dict) -> None:
        """Refuse a build this loader cannot read as planned (InjectError naming the option)."""
        from . import name_of

        t = manifest["injection"]["training"]
        if name_of(manifest) != NAME:
            raise InjectError(f"--olmo-core-python: {build} was built for {name_of(manifest)}'s order, not OLMo-core's")
        if self.ranks < 1 or t["global_batch_size"] % self.ranks:
            raise InjectError(f"--ranks: {self.ranks} ranks do not split a batch of {t['global_batch_size']} instances "
                              f"(OLMo-core needs whole instances per rank)")


def loader_source(own_loader: OlmoCoreLoader | None = None) -> str:
    """What verify's batches came from (its report line)."""
    if own_loader is not None:
        return f"OLMo-core's own NumpyFSLDataLoader, {own_loader.ranks} rank(s), in {own_loader.python}"
    return "OLMo-core 3.0.0's order (inject/order.py) over the token files"


def loader_batches(manifest: dict, chosen: list[int], use_filter: bool, report, own_loader: OlmoCoreLoader | None = None):
    """(step, batch) as OLMo-core reads the build: with `own_loader`, from OLMo-core's own data loader in its
    environment; else its order (inject/order.py) over the token files. OLMo-core's repetition filter is not
    replayed (`use_filter` is ai2-olmo's)."""
    if own_loader is not None:
        return _olmo_core_loader_batches(manifest, chosen, own_loader, report)
    return _olmo_core_batches(manifest, chosen)


def _olmo_core_batches(manifest: dict, chosen: list[int]):
    """(step, batch) as OLMo-core 3.0.0's NumpyFSLDataLoader reads the build (one rank): its order
    (inject/order.py) over instances of sequence_length tokens, each file chunked on its own."""
    t = from_dict(TrainingConfig, manifest["injection"]["training"], "manifest.injection.training")
    L = manifest["sequence_length"]
    group = t.instance_group(L)
    files = [np.memmap(manifest["_dir"] / f["path"], dtype=manifest["dtype"], mode="r") for f in manifest["outputs"]]
    per_file = [olmo_core_num_instances([len(f) // L], group) for f in files]
    starts = np.concatenate([[0], np.cumsum(per_file)])
    order = training_order(t, manifest["injection"]["num_instances"], L)
    if starts[-1] != olmo_core_num_instances([manifest["injection"]["num_instances"]], group):
        raise InjectError(f"{manifest['_dir']}: the token files hold {starts[-1]:,} OLMo-core instances, the manifest "
                          f"says {manifest['injection']['num_instances']:,}")
    B = t.global_batch_size
    for step in tqdm(chosen, desc="verify batches", unit="batch", disable=None):
        index = order[(step - 1) * B : step * B].astype(np.int64)
        where = np.searchsorted(starts, index, side="right") - 1
        ids = np.stack([files[f][(i - starts[f]) * L : (i - starts[f] + 1) * L] for f, i in zip(where, index)])
        yield step, {"input_ids": ids.astype(np.int64), "index": index}


def _olmo_core_loader_batches(manifest: dict, chosen: list[int], olmo_core: OlmoCoreLoader, report):
    """(step, batch) as OLMo-core's own NumpyFSLDataLoader yields it to `olmo_core.ranks` ranks (their rows
    concatenated), read from child.py's `loader` command run by `olmo_core.python`. Each rank's rows are also
    compared with inject/order.py's order (an `order` failure names the rank)."""
    t = from_dict(TrainingConfig, manifest["injection"]["training"], "manifest.injection.training")
    L, B, W = manifest["sequence_length"], t.global_batch_size, olmo_core.ranks
    order = training_order(t, manifest["injection"]["num_instances"], L)
    tok = manifest["tokenizer"]
    job = {"paths": [str(manifest["_dir"] / f["path"]) for f in manifest["outputs"]], "dtype": manifest["dtype"],
           "sequence_length": L, "global_batch_size_tokens": t.global_batch_size_tokens, "seed": t.seed,
           "max_target_sequence_length": t.max_target_sequence_length, "world_size": W, "steps": chosen,
           "pad_token_id": tok["pad_token_id"], "eos_token_id": tok["eos_token_id"], "vocab_size": tok["vocab_size"]}
    dtype = np.dtype(manifest["dtype"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # that environment's own
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        with open(Path(tmp) / "stderr", "w+b") as errors:
            try:
                child = subprocess.Popen([olmo_core.python, str(CHILD), "loader", str(Path(tmp) / "job.json")],
                                         stdout=subprocess.PIPE, stderr=errors, env=env)
            except OSError as e:
                raise InjectError(f"--olmo-core-python: cannot run {olmo_core.python}: {e.strerror}") from None
            try:
                for step in tqdm(chosen, desc="verify batches", unit="batch", disable=None):
                    header = _read_exact(child, 3 * 8, errors, olmo_core.python)
                    got_step, count, ranks = np.frombuffer(header, np.int64).tolist()
                    index = np.frombuffer(_read_exact(child, count * 8, errors, olmo_core.python), np.int64)
                    ids = np.frombuffer(_read_exact(child, count * L * dtype.itemsize, errors, olmo_core.python), dtype)
                    if (got_step, count, ranks) != (step, B, W):
                        raise InjectError(f"--olmo-core-python: OLMo-core's loader answered step {got_step} with {count} "
                                          f"instances over {ranks} ranks; expected step {step}, {B} instances, {W} ranks")
                    planned = order[(step - 1) * B : step * B]
                    for rank, rows in enumerate(index.reshape(W, -1)):
                        if not np.array_equal(rows, planned[rank::W]):
                            report.fail("order", f"step {step}: OLMo-core's loader gives rank {rank} of {W} instances "
                                                 f"{rows[:8].tolist()}..., the build's order {planned[rank::W][:8].tolist()}...")
                    yield step, {"input_ids": ids.reshape(count, L).astype(np.int64), "index": index}
                if child.wait() != 0:
                    _read_exact(child, 1, errors, olmo_core.python)  # raises, naming the exit code and stderr
            finally:
                if child.poll() is None:  # stopped early (an error here): the loader is not needed any more
                    child.kill()
                    child.wait()


def _read_exact(child, size: int, errors, python: str) -> bytes:
    data = child.stdout.read(size)
    if len(data) != size:
        child.wait()
        errors.seek(0)
        tail = errors.read().decode(errors="replace")[-2000:]
        raise InjectError(f"--olmo-core-python: OLMo-core's data loader in {python} stopped (exit {child.returncode}):\n{tail}")
    return data


# ---------------------------------------------------------------------------------------------------- training
# (train: config checks against the build, launch through torchrun of the OLMo-core environment, resume)


# ------------------------------------------------------------------------------------------------- checkpoints
# (eval: find and read OLMo-core checkpoints, distributed and converted Hugging Face folders)
