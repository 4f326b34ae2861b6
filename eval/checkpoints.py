"""Finding and loading checkpoints in the three formats a run or a model hub leaves behind.

- ai2-olmo unsharded: `stepN-unsharded/` with `config.yaml` and `model.pt`;
- ai2-olmo sharded, as its FSDP trainer saves them: `stepN/` with `config.yaml` and either
  `rank*.pt` (the `torch_legacy` sharded checkpointer, ai2-olmo's default), unsharded in one process by
  ai2-olmo's own `TorchLegacyShardedCheckpointer.unshard_checkpoint`, or `model_and_optim/` (the
  `torch_new` checkpointer: a torch distributed checkpoint), read the way ai2-olmo's
  `load_model_state` does but with torch's own FileSystemReader, because ai2-olmo 0.6.0's
  RemoteFileSystemReader misses methods that torch >= 2.4 requires and cannot be instantiated;
- OLMo-core: `stepN/` with `model_and_optim/` (a torch distributed checkpoint) of a run folder whose
  `config.yaml` says `trainer: olmo-core`, read in this process into transformers' `Olmo2ForCausalLM` by
  `inject.trainers.olmo_core` (the weights renamed; OLMo-core's own code is not needed);
- Hugging Face: a folder with `config.json` and weights, loaded with transformers' Auto classes (its OLMo
  and OLMo-2 classes, or any causal LM); folders written by ai2-olmo's `hf_olmo` converter
  (`model_type: hf_olmo`) are read into ai2-olmo's own OLMo class, since `hf_olmo`'s wrapper class
  does not load under transformers 5 (it lacks `all_tied_weights_keys`).

Every loaded model goes through the same scorer: `model(input_ids).logits`, with a key/value cache.

This module finds checkpoint folders and reads Hugging Face ones; a trainer's own formats are read by its module
(inject/trainers: ai2-olmo's unsharded and sharded checkpoints and `hf_olmo` folders by ai2_olmo.load_model and
load_hf_olmo).

Nothing in a checkpoint is run: every pickle is read by torch's weights_only unpickler with the allowlist
of `inject/trainers/safe_load.py` (a file that needs more is refused, naming the file and the class), Hugging
Face weights from safetensors when the folder has them, and no custom code of a Hugging Face config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from inject import trainers
from inject.errors import InjectError
from inject.trainers import check_vocabulary
from inject.trainers.safe_load import CheckpointRefused, check_file  # noqa: F401 (re-exported)

STEP = re.compile(r"step(\d+)")
FORMATS = ("unsharded", "sharded", "hf", "olmo-core")
PREFERENCE = {"unsharded": 0, "hf": 1, "olmo-core": 2, "sharded": 3}  # when one step is saved twice, the cheapest to read


@dataclass
class Checkpoint:
    step: int
    folder: Path
    format: str  # one of FORMATS


@dataclass
class LoadedModel:
    model: torch.nn.Module
    kind: str          # "olmo" (ai2-olmo's OLMo class) or "hf" (a transformers model)
    name: str          # the run name of an ai2-olmo config, else the folder name
    params: int        # all parameters, embeddings included
    non_embedding_params: int


def checkpoint_format(folder: Path) -> str | None:
    if trainers.get("olmo-core").is_checkpoint(folder):
        return "olmo-core"
    if (folder / "model.pt").exists():
        return "unsharded"
    if (folder / "model_and_optim").is_dir() or (folder / "rank0.pt").exists():
        return "sharded"
    if (folder / "config.json").exists():
        return "hf"
    return None


def _step_of(folder: Path) -> int | None:
    found = STEP.search(folder.name)
    return int(found.group(1)) if found else None


def find_checkpoints(path: Path) -> list[Checkpoint]:
    """The checkpoint `path` itself, or every `step*` checkpoint of the run folder `path`, one per step.

    A folder that is named like a checkpoint but holds none of the formats' files (a half-written save)
    is still listed, as "unsharded", so that loading it reports what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise InjectError(f"{path}: no such run or checkpoint folder")
    own = checkpoint_format(path)
    if own is not None or (path.name.startswith("step") and _step_of(path) is not None):
        step = _step_of(path)
        if step is None:
            step = _step_from_config(path)
        return [Checkpoint(step, path, own or "unsharded")]
    best: dict[int, Checkpoint] = {}
    for folder in sorted(path.glob("step*")):
        step = _step_of(folder)
        if not folder.is_dir() or step is None or folder.name == "latest":
            continue
        found = Checkpoint(step, folder, checkpoint_format(folder) or "unsharded")
        if step not in best or PREFERENCE[found.format] < PREFERENCE[best[step].format]:
            best[step] = found
    if not best:
        raise InjectError(f"{path}: no checkpoint folders (stepN-unsharded/, stepN/ sharded, OLMo-core stepN/, or Hugging Face)")
    return [best[s] for s in sorted(best)]


def _step_from_config(folder: Path) -> int:
    """A lone Hugging Face folder without a step in its name: the step it records, else 0."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(config.get("step", 0) or 0)


def load_model(checkpoint: Checkpoint, manifest: dict, device: str = "cpu") -> LoadedModel:
    """Load one checkpoint for scoring; InjectError names the folder and what is wrong with it."""
    folder = checkpoint.folder
    ai2_olmo = trainers.get("ai2-olmo")
    if checkpoint.format == "hf":
        model, name = _load_hf(folder, manifest, device), folder.name
        kind = "hf" if not hasattr(model, "transformer") else ai2_olmo.MODEL_KIND
    elif checkpoint.format == "olmo-core":  # read into transformers' Olmo2ForCausalLM
        model, name = trainers.get("olmo-core").load_model(folder, checkpoint.format, manifest, device)
        kind = "hf"
    else:  # unsharded, sharded: ai2-olmo's own formats
        model, name = ai2_olmo.load_model(folder, checkpoint.format, manifest, device)
        kind = ai2_olmo.MODEL_KIND
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings() if kind == "hf" else ai2_olmo.input_embedding(model)
    return LoadedModel(model.eval(), kind, name, params, params - embedding.weight.numel())


def load_checkpoint(folder: Path, manifest: dict, device: str = "cpu") -> torch.nn.Module:
    """The model of one checkpoint folder, whatever its format."""
    folder = Path(folder)
    return load_model(Checkpoint(_step_of(folder) or 0, folder, checkpoint_format(folder) or "unsharded"),
                      manifest, device).model


def _load_hf(folder: Path, manifest: dict, device: str):
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise InjectError(f"{folder}/config.json: not JSON: {e}") from None
    check_vocabulary(folder, int(config.get("vocab_size", 0)), config.get("eos_token_id"), manifest)
    if not any(folder.glob("*.safetensors")):  # transformers then reads the pickled .bin files (weights_only)
        for weights in sorted(folder.glob("*.bin")):
            check_file(weights)
    try:
        if config.get("model_type") == "hf_olmo":
            model = trainers.get("ai2-olmo").load_hf_olmo(folder, config)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, trust_remote_code=False)
    except InjectError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a broken folder
        raise InjectError(f"{folder}: cannot load as a Hugging Face model: {e}") from None
    return model.to(device)
