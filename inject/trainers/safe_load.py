"""Loading checkpoints without running code from them.

A `.pt` file is a pickle, and unpickling can call any function the file names. Every checkpoint load of
the toolkit goes through torch's `weights_only` unpickler (tensors and plain containers only) plus an
explicit allowlist of the few other classes that ai2-olmo 0.6.0's checkpoints hold, found by loading real
ones:

- `model.pt`, `optim.pt`: nothing beyond tensors and containers;
- `train.pt`, and the trainer state inside sharded rank files: `pathlib.PosixPath` (earlier checkpoints'
  folders) and numpy's RNG state (an ndarray of uint32: `ndarray`, `dtype`, `UInt32DType`, `_reconstruct`);
- `torch_legacy` rank files of a run on several ranks: torch's `ShardedTensor` with its metadata classes,
  and `getattr` for exactly `ShardedTensor.ProcessGroupState` (how pickle protocol 2 names a nested class);
- torch distributed checkpoints (`model_and_optim/.metadata`, plain pickle; ai2-olmo's `torch_new` and
  OLMo-core's): torch's checkpoint-metadata classes (OLMo-core's storage record read as torch's), read with
  a restricted `pickle.Unpickler` (torch's own reader would un-pickle anything; OLMo-core's reader also loads
  the tensors with weights_only=False).

A file that needs anything else is refused (`CheckpointRefused`, naming the file and the global) before
the global is called. The allowlist is a context around the loads, never process-wide, and ai2-olmo's
own `load_state_dict` is replaced by ours only inside that context.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InjectError

UNSAFE_SWITCH = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class CheckpointRefused(InjectError):
    """A checkpoint file that would need a global outside the allowlist to load."""


def _numpy_globals() -> list:
    """numpy's array and dtype classes, under the module names numpy 1 and numpy 2 pickle them with."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 1.26
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct")]


def _sharded_tensor_globals(sharded_tensor: type) -> list:
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import (MEM_FORMAT_ENCODING, ShardedTensorMetadata,
                                                                  TensorProperties)
    from torch.distributed._shard.sharded_tensor.shard import Shard
    from torch.distributed._shard.sharding_spec.chunk_sharding_spec import ChunkShardingSpec
    from torch.distributed.remote_device import _remote_device

    def nested_class(owner, name):
        """Pickle protocol 2 names `ShardedTensor.ProcessGroupState` as getattr(ShardedTensor, name): only that."""
        if owner is sharded_tensor and name == "ProcessGroupState":
            return ShardedTensor.ProcessGroupState
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {getattr(owner, '__module__', '?')}."
                                     f"{getattr(owner, '__qualname__', owner)}.{name} was not allowed")

    return [(sharded_tensor, "torch.distributed._shard.sharded_tensor.api.ShardedTensor"),
            ShardedTensor.ProcessGroupState, (nested_class, "builtins.getattr"), Shard, ShardMetadata,
            ShardedTensorMetadata, TensorProperties, MEM_FORMAT_ENCODING, ChunkShardingSpec, _remote_device]


def allowed_globals(sharded_tensor: type | None = None) -> list:
    """Everything besides tensors and containers that ai2-olmo 0.6.0's checkpoints need.

    `sharded_tensor`: the class rank files' ShardedTensors are built as. The real one needs the process
    group they were saved from (a resuming trainer); reading them in one process takes `detached_sharded_tensor()`."""
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    return [pathlib.PosixPath, *_numpy_globals(), *_sharded_tensor_globals(sharded_tensor or ShardedTensor)]


def detached_sharded_tensor() -> type:
    """A ShardedTensor class whose unpickling needs no process group, to be unsharded in one process (what
    ai2-olmo's `_patch_sharded_tensor_load` does by patching torch; here the allowlist names the class)."""
    global _DETACHED
    if _DETACHED is None:
        from torch.distributed._shard.sharded_tensor.api import ShardedTensor

        class DetachedShardedTensor(ShardedTensor):
            def __setstate__(self, state):
                self._local_shards, self._metadata, _, self._sharding_spec, self._init_rrefs = state

        _DETACHED = DetachedShardedTensor
    return _DETACHED


_DETACHED: type | None = None


def refusal(path: Path | str, error: Exception) -> CheckpointRefused | None:
    """The error for a file that an allowlisting unpickler refused, naming the global it asked for; None
    when `error` is not such a refusal (a damaged file, reported as such by the caller)."""
    text = str(error)
    found = (re.search(r"GLOBAL (\S+?) (?:was not|whose)", text)
             or re.search(r"but got <class '([^']+)'>", text)
             or re.search(r"unrecognized function (.+?)(?: which|$)", text, re.M))
    if found is None:
        return None
    what = found.group(1)
    return CheckpointRefused(f"{path}: refused: loading it needs {what}, which is none of the classes ai2-olmo "
                             f"checkpoints hold (unpickling it could run code from the file)")


def check_environment() -> None:
    """torch's switch that turns weights_only off for loads that do not pass it (as ai2-olmo's) must be off."""
    if os.environ.get(UNSAFE_SWITCH, "0").lower() in ("1", "y", "yes", "true"):
        raise InjectError(f"{UNSAFE_SWITCH} is set: it would let a checkpoint run code when loaded; unset it")


def _load(path: Path | str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise refusal(path, e) or e from None


def load_file(path: Path | str, map_location: Any = "cpu", sharded_tensor: type | None = None, mmap: bool = False) -> Any:
    """torch.load with weights_only=True under the allowlist; CheckpointRefused names the file and the global."""
    with torch.serialization.safe_globals(allowed_globals(sharded_tensor)):
        return _load(path, map_location, mmap)


def check_file(path: Path | str) -> None:
    """Refuse `path` unless it loads under the allowlist. Memory-mapped (torch's zip format, what torch has
    written since 1.6): the tensors' bytes are not read."""
    try:
        if Path(path).name == ".metadata":
            read_dcp_metadata(path)
        else:
            load_file(path, sharded_tensor=detached_sharded_tensor(), mmap=zipfile.is_zipfile(path))
    except InjectError:
        raise
    except Exception as e:  # torch raises many types for a damaged file
        raise InjectError(f"{path}: cannot be read as a checkpoint file: {e}") from None


def check_checkpoint(folder: Path | str) -> None:
    """Refuse an ai2-olmo checkpoint folder if any of its `.pt` files (model, optimizer, trainer state, rank
    files) or its distributed-checkpoint metadata needs a global outside the allowlist."""
    folder = Path(folder)
    for path in sorted([*folder.rglob("*.pt"), *folder.rglob(".metadata")]):
        check_file(path)


@contextmanager
def checked_olmo_loads(sharded_tensor: type | None = None):
    """Inside: ai2-olmo's checkpoint loads (trainer restore, unsharding) read files only with weights_only
    and the allowlist. Its `load_state_dict` (which would prefer a `.safetensors` sibling and un-pickle its
    values with plain pickle) is replaced by ours; its few direct torch.load calls get torch's weights_only
    default, which `check_environment` makes sure is not switched off."""
    import olmo.checkpoint

    check_environment()

    def load_state_dict(checkpoint_dir, fname: str, *, local_cache=None, map_location=None):
        from olmo.util import resource_path

        return _load(resource_path(str(checkpoint_dir).rstrip("/"), fname, local_cache=local_cache), map_location)

    original = olmo.checkpoint.load_state_dict
    olmo.checkpoint.load_state_dict = load_state_dict
    try:
        with torch.serialization.safe_globals(allowed_globals(sharded_tensor)):
            yield
    finally:
        olmo.checkpoint.load_state_dict = original


# ---- torch distributed checkpoints (torch_new sharded, OLMo-core) ---------------------------------------

def _dcp_globals() -> dict[tuple[str, str], Any]:
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    classes = [md.Metadata, md.TensorStorageMetadata, md.BytesStorageMetadata, md.ChunkStorageMetadata,
               md.MetadataIndex, md.StorageMeta, md.TensorProperties, md._MEM_FORMAT_ENCODING, fs._StorageInfo,
               torch.Size, torch.serialization._get_layout, pathlib.PosixPath]
    allowed = {(c.__module__, c.__qualname__): c for c in classes}
    # OLMo-core 3 writes its checkpoints with its own copy of torch's file-system writer; its per-entry storage
    # record (relative_path, offset, length) is read as torch's, whose reader then loads tensors weights_only.
    allowed[("olmo_core.distributed.checkpoint.filesystem", "_StorageInfo")] = fs._StorageInfo
    allowed.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """The pickle docs' "restricting globals": only torch's checkpoint-metadata classes can be named."""

    allowed: dict = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} was not allowed")
        return self.allowed[(module, name)]


def read_dcp_metadata(path: Path | str):
    with open(path, "rb") as f:
        unpickler = _MetadataUnpickler(f)
        unpickler.allowed = _dcp_globals()
        try:
            return unpickler.load()
        except pickle.UnpicklingError as e:
            raise refusal(path, e) or e from None


def load_dcp_tensors(folder: Path | str, state: dict[str, dict]) -> None:
    """Fill the tensors of `state` ({"model": state_dict}) from the torch distributed checkpoint `folder`, in
    one process: the metadata through the restricted unpickler, the tensors with weights_only. A wanted value
    stored as a pickled object (which torch's planner would un-pickle with weights_only=False) is refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

    folder = Path(folder)
    metadata = read_dcp_metadata(folder / ".metadata")  # before dcp.load, which would wrap our error in its own
    wanted = [f"{prefix}.{key}" for prefix, part in state.items() for key in part]
    pickled = [fqn for fqn in wanted if isinstance(metadata.state_dict_metadata.get(fqn), BytesStorageMetadata)]
    if pickled:
        raise CheckpointRefused(f"{folder}: refused: {pickled[0]} is stored as a pickled object, not a tensor "
                                f"(unpickling it could run code from the file)")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # unreachable after the check above; never un-pickle here
            raise CheckpointRefused(f"{folder}: refused: {read_item.dest_index.fqn} is a pickled object")

    dcp.load(state, storage_reader=Reader(str(folder)), planner=TensorsOnly(), no_dist=True)
