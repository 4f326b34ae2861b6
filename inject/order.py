"""The global instance order of each trainer, computed here (numpy only, no trainer import), so that a build
needs neither trainer's package to know which instance each training step reads.

Both trainers shuffle `arange(N, uint32)` with `numpy.random.Generator(PCG64(seed + epoch))` and read the
shuffled order batch by batch: global batch b is `order[b*B : (b+1)*B]`, rank r of W ranks takes its
`r::W` slice. They differ in the rest:

  ai2-olmo 0.6.0   `olmo.data.iterable_dataset.IterableDataset._build_global_indices`: first epoch 0;
                   B = `global_train_batch_size` instances; the order is padded with its own head (not
                   drop_last) or cut (drop_last) to a multiple of the world size.
  OLMo-core 3.0.0  `olmo_core.data.data_loader.NumpyFSLDataLoader._build_global_indices`: first epoch 1;
                   B = global batch size in tokens // sequence length; the order is cut to B * (N // B);
                   with `max_target_sequence_length` = c * L the shuffle is over groups of c consecutive
                   instances (each group stays together, in order).

tests/test_order_olmo_core.py compares both with the trainers' own code.
"""

from __future__ import annotations

import math

import numpy as np

FIRST_EPOCH = {"ai2-olmo": 0, "olmo-core": 1}
"""The epoch a fresh training run starts in (it seeds the shuffle: PCG64(seed + epoch))."""


def _shuffled(count: int, seed: int) -> np.ndarray:
    if count >= np.iinfo(np.uint32).max:
        raise ValueError(f"{count:,} instances: both trainers index instances with uint32")
    indices = np.arange(count, dtype=np.uint32)
    np.random.Generator(np.random.PCG64(seed)).shuffle(indices)
    return indices


def ai2_olmo_order(num_instances: int, seed: int, drop_last: bool = False, epoch: int = 0,
                   world_size: int = 1) -> np.ndarray:
    """ai2-olmo 0.6.0's global order (`IterableDataset._build_global_indices`, shuffle on). With one rank the
    order is the shuffle itself; with W ranks it is padded with its own head, or cut when drop_last, to the
    multiple of W that ai2-olmo computes (`total_size`)."""
    indices = _shuffled(num_instances, seed + epoch)
    if drop_last and num_instances % world_size:
        total = math.ceil((num_instances - world_size) / world_size) * world_size
    else:
        total = math.ceil(num_instances / world_size) * world_size
    if total <= num_instances:
        return indices[:total]
    repeats = math.ceil(total / num_instances)
    return np.concatenate([indices] * repeats)[:total]


def olmo_core_num_instances(file_instances: list[int], group: int = 1) -> int:
    """Instances OLMo-core's NumpyFSLDataset finds in token files that hold `file_instances[i]` whole instances
    of L tokens each: each file is chunked on its own, into whole groups of `group` instances when
    `max_target_sequence_length` = group * L."""
    return sum(n // group * group for n in file_instances)


def olmo_core_order(num_instances: int, batch_instances: int, seed: int, group: int = 1, epoch: int = 1) -> np.ndarray:
    """OLMo-core 3.0.0's global order (`NumpyFSLDataLoader._build_global_indices`, shuffle on):
    `num_instances` instances of the dataset (see olmo_core_num_instances), `batch_instances` = global batch
    size in tokens // sequence length, `group` = max_target_sequence_length // sequence_length (1 when unset).
    The order is cut to whole batches."""
    if group == 1:
        indices = _shuffled(num_instances, seed + epoch)
    else:
        starts = _shuffled(num_instances // group, seed + epoch) * np.uint32(group)  # OLMo-core: the first whole groups
        indices = (starts[:, None] + np.arange(group, dtype=np.uint32)[None, :]).reshape(-1)
    return indices[: batch_instances * (num_instances // batch_instances)]


def rank_instances(order: np.ndarray, batch_instances: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Every instance rank `rank` of `world_size` reads, batch after batch, in an order cut to whole batches:
    its `rank::W` slice of each global batch (OLMo-core's `_get_local_instance_indices`)."""
    return order.reshape(-1, batch_instances)[:, rank::world_size].reshape(-1)
