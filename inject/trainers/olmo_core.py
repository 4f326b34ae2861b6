"""OLMo-core 3.0.0 (PyPI `ai2-olmo-core`), the trainer of OLMo 2 and OLMo 3, as olmo-inject's second trainer.

OLMo-core cannot live in the main environment: ai2-olmo 0.6.0 pins `ai2-olmo-core==0.1.0` and both install
the import package `olmo_core`. So this module never imports it: whatever needs OLMo-core's own code (its
data loader for verify, its Trainer for train, its checkpoint converter) runs as `olmo_core_env/child.py` in the
python of an OLMo-core environment (`python()`), and talks to this module through files and pipes.

The order (`order`, numpy only) is in inject/order.py and tested against OLMo-core's own loader.

Implements so far: NAME, python, order, usable_instances, file_instances, order_fields, loader_batches (OLMo-core's
order over the token files, or with an `OlmoCoreLoader` its own data loader through child.py `loader`),
loader_source, check_train_config; checkpoints: is_checkpoint, vocabulary, load_model (eval, in this process),
convert_checkpoint (OLMo-core's Hugging Face converter, in its environment), run_child.
"""

from __future__ import annotations

import json
import os
import re
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
# eval's view of OLMo-core checkpoints: `is_checkpoint(folder)` (eval/checkpoints.py's format "olmo-core"),
# `vocabulary(folder)`, `load_model(folder, device, vocab_size)` (in this process, into transformers' Olmo2ForCausalLM;
# OLMo-core's own code is not needed), `convert_checkpoint(...)` (OLMo-core's Hugging Face converter, in its env).

CHECKPOINT_DONE = ".metadata.json"
"""OLMo-core's Checkpointer writes it into stepN/ last: a step folder without it is a half-written save."""

RUN_CONFIG = "config.yaml"
"""RUN/config.yaml: the resolved OLMo-core run config (`trainer: olmo-core`, its `model` block)."""

# The constants of child.model_config's OLMo-2 architecture that the weights do not show.
ROPE_THETA, LAYER_NORM_EPS = 500_000, 1e-6

HF_NAMES = [  # OLMo-core parameter name -> transformers Olmo2ForCausalLM's (the one-to-one map of OLMo-core's converter)
    (r"embeddings\.weight", "model.embed_tokens.weight"),
    (r"lm_head\.norm\.weight", "model.norm.weight"),
    (r"lm_head\.w_out\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.attention\.w_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blocks\.(\d+)\.attention\.w_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blocks\.(\d+)\.attention\.w_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blocks\.(\d+)\.attention\.w_out\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blocks\.(\d+)\.attention\.q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"blocks\.(\d+)\.attention\.k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"blocks\.(\d+)\.attention_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),  # reordered norm:
    (r"blocks\.(\d+)\.feed_forward_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),  # after
    (r"blocks\.(\d+)\.feed_forward\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blocks\.(\d+)\.feed_forward\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"blocks\.(\d+)\.feed_forward\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
]


def hf_name(name: str) -> str | None:
    """transformers' Olmo2 name of an OLMo-core parameter (without the checkpoint's `model.` prefix); None if
    the parameter is not one of the OLMo-2 architecture's."""
    for pattern, replacement in HF_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def _run_config_of(folder: Path) -> dict | None:
    """The OLMo-core run config of a run folder (None when `folder` holds none, or another trainer's)."""
    import yaml

    path = folder / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InjectError(f"{path}: not a readable YAML file: {e}") from None
    return config if isinstance(config, dict) and config.get("trainer") == NAME else None


def _step_of(folder: Path) -> int | None:
    found = re.fullmatch(r"step(\d+)", folder.name)
    return int(found.group(1)) if found else None


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` is an OLMo-core checkpoint (`stepN/` with `model_and_optim/` and OLMo-core's
    `.metadata.json`; ai2-olmo's sharded checkpoints hold a config.yaml instead), or a `stepN/` folder of an
    OLMo-core run (complete or not: loading a half-written one says what is missing)."""
    folder = Path(folder)
    if (folder / "model_and_optim").is_dir() and (folder / CHECKPOINT_DONE).is_file():
        return True
    return _step_of(folder) is not None and folder.is_dir() and _run_config_of(folder.parent) is not None


def vocabulary(folder: Path) -> tuple[int, int | None]:
    """(embedding rows, EOS id of the run config's tokenizer) of an OLMo-core checkpoint, for eval's tokenizer check."""
    config, metadata = _read_checkpoint(Path(folder))
    return _shapes(folder, metadata)["embeddings.weight"][0], _tokenizer_of(config).get("eos_token_id")


def _tokenizer_of(run_config: dict) -> dict:
    """The run config's `tokenizer` block (name, vocab_size, eos_token_id, pad_token_id; filled in by the launcher)."""
    tokenizer = run_config.get("tokenizer")
    return tokenizer if isinstance(tokenizer, dict) else {}


def _read_checkpoint(folder: Path):
    """(run config, torch distributed checkpoint metadata) of a checkpoint, the metadata read by the restricted
    unpickler (never plain pickle)."""
    from olmo_configs.safe_load import read_dcp_metadata

    config = _run_config_of(folder.parent)
    if config is None:
        raise InjectError(f"{folder.parent / RUN_CONFIG}: missing, or not an OLMo-core run config "
                          f"(`trainer: {NAME}` and a `model` block)")
    if not isinstance(config.get("model"), dict):
        raise InjectError(f"{folder.parent / RUN_CONFIG}: model: expected the model block (d_model, n_layers, n_heads)")
    for need in ("model_and_optim/.metadata", CHECKPOINT_DONE):
        if not (folder / need).is_file():
            raise InjectError(f"{folder}: no {need} (a half-written checkpoint?)")
    return config, read_dcp_metadata(folder / "model_and_optim" / ".metadata")


def _shapes(folder: Path, metadata) -> dict[str, tuple[int, ...]]:
    """The model's parameter shapes recorded in the checkpoint (OLMo-core names, `model.` prefix removed)."""
    shapes = {key.removeprefix("model."): tuple(value.size) for key, value in metadata.state_dict_metadata.items()
              if key.startswith("model.")}
    if "embeddings.weight" not in shapes:
        raise InjectError(f"{folder}/model_and_optim: no model.embeddings.weight (not an OLMo-core model checkpoint)")
    return shapes


def hf_config(spec: dict, shapes: dict[str, tuple[int, ...]], run_config: dict, where: str):
    """transformers' Olmo2Config of the model block `spec` (child.model_config's architecture), with the sizes
    the weights show (vocabulary, MLP width) and checked against them."""
    from transformers import Olmo2Config

    d_model, n_heads = int(spec["d_model"]), int(spec["n_heads"])
    head_dim = int(spec.get("head_dim") or d_model // n_heads)
    n_kv_heads = int(spec.get("n_kv_heads") or n_heads)
    if head_dim * n_heads != d_model:
        raise InjectError(f"{where}: model.head_dim {head_dim} x n_heads {n_heads} != d_model {d_model}: "
                          f"transformers' Olmo2 has no separate head size")
    vocab, width = shapes["embeddings.weight"]
    expected = {"embeddings.weight": (vocab, d_model), "blocks.0.attention.w_k.weight": (n_kv_heads * head_dim, d_model)}
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise InjectError(f"{where}: the checkpoint's {name} is {shapes.get(name)}, the model block gives {shape}")
    layers = {int(name.split(".")[1]) for name in shapes if name.startswith("blocks.")}
    if layers != set(range(int(spec["n_layers"]))):
        raise InjectError(f"{where}: the checkpoint has {len(layers)} blocks, model.n_layers is {spec['n_layers']}")
    return Olmo2Config(vocab_size=vocab, hidden_size=d_model, intermediate_size=shapes["blocks.0.feed_forward.w1.weight"][0],
                       num_hidden_layers=int(spec["n_layers"]), num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                       max_position_embeddings=int((run_config.get("data") or {}).get("sequence_length") or 4096),
                       rope_parameters={"rope_type": "default", "rope_theta": float(ROPE_THETA)},
                       rms_norm_eps=LAYER_NORM_EPS, attention_bias=False, tie_word_embeddings=False,
                       pad_token_id=_tokenizer_of(run_config).get("pad_token_id"),
                       eos_token_id=_tokenizer_of(run_config).get("eos_token_id"),
                       bos_token_id=None)


def load_model(folder: Path, device: str = "cpu", vocab_size: int | None = None):
    """(transformers Olmo2ForCausalLM, run name) of an OLMo-core checkpoint, read in this process: the model
    block from RUN/config.yaml, the weights of stepN/model_and_optim (torch distributed checkpoint: metadata by
    the restricted unpickler, tensors weights_only; the optimizer state is not read), renamed to transformers'
    names. InjectError names the folder and what is wrong.

    `vocab_size` (the tokenizer's): keep only the embedding and output rows of real tokens, as OLMo-core's
    Hugging Face converter does, so that a checkpoint and its converted folder give the same probabilities (the
    padding rows up to the embedding size are never a target but take a little probability mass)."""
    import torch
    from transformers import Olmo2ForCausalLM

    from olmo_configs.safe_load import load_dcp_tensors

    folder = Path(folder)
    config, metadata = _read_checkpoint(folder)
    shapes = _shapes(folder, metadata)
    unknown = [name for name in shapes if hf_name(name) is None]
    if unknown:
        raise InjectError(f"{folder}/model_and_optim: parameter model.{unknown[0]} is not one of the OLMo-2 "
                          f"architecture's (an MoE or other OLMo-core model?)")
    try:
        model = Olmo2ForCausalLM(hf_config(config["model"], shapes, config, str(folder.parent / RUN_CONFIG)))
    except (KeyError, TypeError, ValueError) as e:
        raise InjectError(f"{folder.parent / RUN_CONFIG}: model: not a valid model block ({e!r})") from None
    params = dict(model.named_parameters())
    missing = sorted(set(params) - {hf_name(name) for name in shapes})
    if missing:
        raise InjectError(f"{folder}/model_and_optim: no weights for {missing[0]}")
    state = {"model": {name: params[hf_name(name)].detach() for name in shapes}}  # read in place into the model
    try:
        with torch.no_grad():
            load_dcp_tensors(folder / "model_and_optim", state)
    except InjectError:
        raise
    except Exception as e:  # torch raises many types for a damaged file
        raise InjectError(f"{folder}/model_and_optim: cannot read the model weights: {e}") from None
    if vocab_size is not None and vocab_size < model.config.vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model.to(device).eval(), str(config.get("run_name") or folder.parent.name)


def run_child(command: str, job: dict, python_path: str | None = None, timeout: float | None = None) -> None:
    """child.py COMMAND in the OLMo-core environment (its own python; this process's PYTHONPATH and VIRTUAL_ENV
    left out, so that it imports its own packages); InjectError with the end of its output if it fails."""
    import subprocess
    import tempfile

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with tempfile.TemporaryDirectory(prefix=f"olmo-core-{command}-") as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        result = subprocess.run([python(python_path), str(CHILD), command, str(job_path)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        raise InjectError(f"OLMo-core's {command} failed (exit {result.returncode}):\n{result.stdout[-3000:]}")


def convert_checkpoint(folder: Path, out: Path, tokenizer_name: str | None = None, python_path: str | None = None) -> Path:
    """A Hugging Face Olmo2ForCausalLM folder `out` from the OLMo-core checkpoint `folder`, written by OLMo-core's
    own converter in its environment (which also checks the converted model's logits against OLMo-core's forward
    pass). The tokenizer (one shipped with ai2-olmo; by name, else the run config's) goes into the folder; the
    converter keeps the embedding rows of its vocabulary only. Written to OUT.partial, renamed when done; an existing `out` is refused."""
    import shutil

    from ..tokenizer import get_spec, vocab_size

    folder, out = Path(folder), Path(out)
    config, metadata = _read_checkpoint(folder)
    if out.exists():
        raise InjectError(f"{out}: exists; remove it or name another output folder")
    tokenizer_name = tokenizer_name or _tokenizer_of(config).get("name")
    if not tokenizer_name:
        raise InjectError(f"{folder.parent / RUN_CONFIG}: tokenizer.name: missing; name the build the run trained on")
    spec = get_spec(tokenizer_name)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer_dir = partial.with_name(out.name + ".tokenizer")
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    tokenizer_dir.mkdir(parents=True)
    try:
        shutil.copyfile(spec.path, tokenizer_dir / "tokenizer.json")
        run_child("convert", {"checkpoint": str(folder), "out": str(partial), "model": config["model"],
                              "vocab_size": _shapes(folder, metadata)["embeddings.weight"][0],
                              "max_sequence_length": (config.get("data") or {}).get("sequence_length"),
                              "tokenizer": {"identifier": str(tokenizer_dir), "vocab_size": vocab_size(tokenizer_name),
                                            "eos_token_id": spec.eos_token_id, "pad_token_id": spec.pad_token_id}},
                  python_path)
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
    step = _step_of(folder)
    if step is not None:  # eval reads a lone folder's step from its config.json
        hf_config_path = partial / "config.json"
        hf_config_path.write_text(json.dumps({**json.loads(hf_config_path.read_text()), "step": step}, indent=2) + "\n")
    partial.rename(out)
    return out
