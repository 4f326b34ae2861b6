"""The trainer seam: everything specific to one trainer lives in one module here, behind one small interface.

    ai2_olmo.py    ai2-olmo 0.6.0 (the legacy OLMo trainer; installed in the main environment)
    olmo_core.py   OLMo-core 3.0.0 (OLMo 2/3's trainer; its own virtual environment, see `olmo_core.python()`)

Build, verify, train, eval and slurm reach a trainer only through `get(name)` / `of_manifest(manifest)`, never
by importing `olmo` or `olmo_core` themselves (tests/test_trainer_seam.py checks the imports). Each trainer module
provides (module-level functions; a module is the implementation, no classes to subclass):

    NAME                                  the name used in configs and manifests (`training.trainer`)
    order(num_instances, training, L)     the global instance order of a fresh run's first epoch (numpy only:
                                          a build needs neither trainer's package; inject/order.py)
    usable_instances(num_instances, training, L) / file_instances(per_file, training, L)
                                          the instances the trainer's dataset finds in a build / in each token file
    order_fields(L, training)             the trainer's config fields (dotted) that decide which instances a
                                          step reads, with the values the build needs (olmo-data.yaml, verify,
                                          train refuse others)
    loader_batches(manifest, steps, use_filter, report, own_loader=None) / loader_source(own_loader=None)
                                          (step, batch with `input_ids` and `index`) as the trainer's OWN data loader
                                          yields them: verify's independent replay (the order from the loader's own
                                          code, the tokens possibly read straight from the files; `own_loader`: the
                                          whole loader run); and what verify reports it read. Optional:
                                          loader_order(manifest, folder, use_filter), the order computed once by the
                                          loader's code and handed to verify's worker processes as `own_loader`
    check_train_config(manifest, path, report)
                                          verify --train-config: the run config's order fields against the build
    resolve_train_config(config, build, run, overrides) / render(cfg)
                                          the trainer's run config checked against the build (ConfigError naming the
                                          field) and completed with the build's paths; its YAML (train --dry-run)
    train / launch, completed_step        train under the run folder's lock (resumes a stopped run; trains nothing on
                                          a complete one), starting the worker processes (torchrun.py); arguments
                                          differ (ai2-olmo: train(cfg, build, run, nproc, nnodes, rendezvous);
                                          OLMo-core: launch(cfg, run, nproc, nnodes, rendezvous, python));
                                          inject/cli.py cmd_train calls the config's trainer
    run_size(config, overrides, with_params) / final_checkpoint_markers(steps)
                                          slurm's view of a run: (steps, non-embedding parameters, tokens, batch in
                                          instances) of a run config; the files that mark its last checkpoint done
    load_model(folder, ...)               eval's reading of the trainer's own checkpoint format (never running
                                          pickled code: safe_load.py; arguments differ); eval/checkpoints.py finds
                                          the folders (OLMo-core's by its `is_checkpoint`) and calls it

Which of these a module implements so far is stated in its docstring. Shared by the trainer modules: torchrun.py
(starting the worker processes, passing SLURM's signals on), safe_load.py (reading checkpoint pickles without
running code) and `check_vocabulary` below.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("ai2-olmo", "olmo-core")
"""Trainers a build can target; ai2-olmo is the default (builds made before the choice existed are ai2-olmo's)."""


def get(name: str) -> ModuleType:
    """The module of trainer `name` (one of NAMES)."""
    if name not in NAMES:
        raise ValueError(f"unknown trainer {name!r}: expected one of {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")


def name_of(manifest: dict) -> str:
    """The trainer a build's order was made for (builds without injection or made before the choice: ai2-olmo)."""
    return (manifest.get("injection") or {}).get("training", {}).get("trainer", "ai2-olmo")


def config_trainer(path) -> str:
    """The trainer a run config is for: its top-level `trainer` (an ai2-olmo TrainConfig has none)."""
    from ..configtools import load_yaml
    from ..errors import ConfigError

    name = str(load_yaml(path).get("trainer", "ai2-olmo"))
    if name not in NAMES:
        raise ConfigError(f"{path}: trainer: {name!r} is not one of {', '.join(NAMES)}")
    return name


def of_manifest(manifest: dict) -> ModuleType:
    """The module of the trainer a build was made for."""
    return get(name_of(manifest))


def check_vocabulary(folder, vocab: int, eos: int | None, manifest: dict) -> None:
    """A checkpoint's vocabulary size and EOS fit the build's tokenizer (shared by eval and the trainers' readers)."""
    from ..errors import InjectError

    want_vocab, want_eos = manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["eos_token_id"]
    if vocab < want_vocab or (eos is not None and eos != want_eos):
        raise InjectError(f"{folder}: vocabulary {vocab} / EOS {eos} do not fit the build's tokenizer "
                          f"{manifest['tokenizer']['name']} ({want_vocab} tokens, EOS {want_eos})")


RESOLVED = "config.yaml"
"""The resolved run config every trainer writes into its run folder."""


def write_run_config(run_dir, text: str, parse) -> "Path":
    """Write RUN/config.yaml (`text`); a run folder that holds another run's config is refused, naming the first
    field that differs (`parse`: text -> nested dicts). Written through a per-process temporary file: one
    launcher per node may write it at once."""
    import os
    from pathlib import Path

    from ..errors import ConfigError

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESOLVED
    if path.exists() and path.read_text() != text:
        difference = _first_difference(parse(path.read_text()), parse(text))
        raise ConfigError(f"{run_dir}: holds a run with another config (first difference: {difference}); "
                          f"use a new run folder")
    tmp = path.with_name(f"{RESOLVED}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"
