"""Placement: lay the token stream and the planned examples out so that OLMo's order delivers every
example in its planned batch.

Instances are written in index order 0..N-1. Instance i holds, when the plan puts examples in it, a
block (its examples, each followed by EOS) and Dolma tokens in their original order. `placement`:

- `sequence-start`: instance i is the base build's instance i with its first tokens overwritten by
  EOS + the block (N does not change; the overwritten Dolma tokens are counted);
- `sequence-start-insert`: EOS + the block is inserted at the instance's start, before the Dolma tokens,
  which continue where the previous instance stopped (no Dolma token lost; N grows by the injected
  tokens / L). The document running at that point is split in two by the block;
- `document-boundary`: the Dolma tokens flow on as with `sequence-start-insert`, and the block is
  inserted at the instance's first document boundary: its start when the token before it in the stream
  is EOS (or there is none), else right after the first EOS among its Dolma tokens. The EOS that ends
  that document opens the block, so no document is split. An instance whose Dolma tokens hold no EOS
  (one long document runs through it) has no boundary: the block goes to its start, splitting that
  document, and is counted in the manifest (`blocks_without_boundary`).

Every placement counts `blocks_without_boundary`: blocks whose preceding token in the token stream is
not EOS (the document running there is cut); the ledger's `offset` is each example's real position.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from . import trainers
from .config import BuildConfig
from .configtools import to_dict
from .errors import InjectError
from .injection import (BlockStats, Plan, PlanRows, block_stats, check_epoch, make_plan, make_specs, order_digest, pool_arrays,
                        pool_record, training_order)
from .ledger import LEDGER, write_ledger
from .stream import OutputWriter, TokenStream

PLAN_FILE = "plan.npz"
POOLS_FILE = "pools.npz"


@dataclass
class Injection:
    plan: Plan
    blocks: BlockStats  # the instances that hold examples, summed (lengths count a leading EOS)


def prepare_injection(config: BuildConfig) -> Injection:
    """Everything about the injection that does not depend on the corpus (all config errors surface here)."""
    plan = make_plan(config, make_specs(config))
    return Injection(plan, plan.stats)


def opens_with_eos(placement: str) -> bool:
    """Start placements open the block with an EOS of its own; at a document boundary the Dolma EOS does."""
    return placement != "document-boundary"


def injected_tokens(config: BuildConfig, injection: Injection, per_step: bool = False):
    """Tokens of the blocks as written (BlockStats count a leading EOS, which a document boundary's EOS replaces):
    in all, or per step (index 0 = step 1)."""
    blocks, lead = injection.blocks, 1 - opens_with_eos(config.placement)
    return blocks.step_tokens - lead * blocks.step_blocks if per_step else blocks.tokens - lead * blocks.count


def num_instances(config: BuildConfig, injection: Injection, stream_tokens: int) -> int:
    L = config.sequence_length
    if config.placement == "sequence-start":
        return stream_tokens // L
    return (stream_tokens + injected_tokens(config, injection)) // L


def arrange(placement: str, block: np.ndarray, dolma: np.ndarray, after_eos: bool, eos: int) -> tuple[np.ndarray, int, bool]:
    """(tokens, block offset, at a boundary) of an instance holding `block` and the Dolma tokens `dolma`.

    `after_eos`: the token before the instance in the token stream is EOS, or there is none."""
    if opens_with_eos(placement):
        return np.concatenate([block, dolma]), 0, after_eos
    if after_eos:
        position, boundary = 0, True
    else:
        ends = np.flatnonzero(dolma == eos)
        position, boundary = (int(ends[0]) + 1, True) if len(ends) else (0, False)
    return np.concatenate([dolma[:position], block, dolma[position:]]), position, boundary


def may_be_filtered(rows: np.ndarray, max_period: int = 13, repeats: int = 32) -> np.ndarray:
    """Vectorized pre-check over instances [M, L]: False where OLMo's filter certainly keeps the instance.

    k repeats of a period-p pattern make x[j] == x[j+p] hold over a run of at least (k-1)*p positions; an
    instance with no such run for any p cannot be masked. The rest go through OLMo's own check. The runs are
    measured only in rows that pass a cheaper test first: a run of R = (repeats-3)*p positions holds at least
    R // s consecutive multiples of a stride s, so x[j] == x[j+p] is compared only there (s = p * (repeats-3) // 4:
    about a sixth of the comparisons over all periods)."""
    rows = np.asarray(rows)
    possible = np.zeros(len(rows), dtype=bool)
    if repeats - 3 < 1:
        return ~possible
    L = rows.shape[1]
    for p in range(1, max_period + 1):
        run = (repeats - 3) * p
        stride = max(1, run // 4)
        need = run // stride  # consecutive sampled positions inside any run of `run`
        equal = rows[:, : L - p : stride] == rows[:, p::stride][:, : len(range(0, L - p, stride))]
        if equal.shape[1] < need:
            continue
        together = equal[:, : equal.shape[1] - need + 1].copy()
        for k in range(1, need):
            together &= equal[:, k : equal.shape[1] - need + 1 + k]
        possible |= together.any(axis=1)
    candidates = np.flatnonzero(possible)
    if len(candidates):
        possible[candidates] = _has_periodic_run(rows[candidates], max_period, repeats)
    return possible


def _has_periodic_run(rows: np.ndarray, max_period: int, repeats: int) -> np.ndarray:
    possible = np.zeros(len(rows), dtype=bool)
    positions = np.arange(rows.shape[1])
    for p in range(1, max_period + 1):
        equal = rows[:, p:] == rows[:, :-p]
        last_break = np.maximum.accumulate(np.where(equal, -1, positions[: equal.shape[1]]), axis=1)
        longest = (positions[: equal.shape[1]] - last_break).max(axis=1)
        possible |= longest >= (repeats - 3) * p  # 2 periods of slack for partial rows at either end
    return possible


def filtered_instances(contents) -> set[int]:
    """Instances (from (instance, tokens) pairs) that OLMo's repetition filter would mask, in chunks."""
    masked, chunk = set(), []
    masks = trainers.get("ai2-olmo").instance_filter_masks  # ai2-olmo's filter, checked for either trainer's build

    def flush():
        rows = np.stack([t for _, t in chunk]).astype(np.int64)
        for (instance, tokens), possible in zip(chunk, may_be_filtered(rows)):
            if possible and masks(tokens):
                masked.add(instance)
        chunk.clear()

    for item in contents:
        chunk.append(item)
        if len(chunk) == 4096:
            flush()
    if chunk:
        flush()
    return masked


class RandomAccess:
    """Token ranges at any position of the concatenated input streams (for the pre-pass)."""

    def __init__(self, arrays: list):
        self.arrays = [a for a in arrays if len(a)]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def read(self, position: int, n: int) -> np.ndarray:
        parts = []
        k = int(np.searchsorted(self.starts, position, side="right")) - 1
        while n > 0 and k < len(self.arrays):
            local = position - self.starts[k]
            part = np.asarray(self.arrays[k][local : local + n])
            parts.append(part)
            n -= len(part)
            position += len(part)
            k += 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def instance_blocks(plan: PlanRows, example_instance: np.ndarray, eos: int, dtype,
                    lead: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """(instance, block) for every instance holding examples, ascending: each example and its EOS, after
    a leading EOS when `lead`. Made one at a time (a list of them would cost a Python object per block)."""
    by_instance = np.lexsort((plan.offset, example_instance))
    current, parts = None, []
    opening = [np.array([eos], dtype=dtype)] if lead else []
    closing = np.array([eos], dtype=dtype)
    for first in range(0, len(by_instance), 1 << 16):
        rows = by_instance[first : first + (1 << 16)]
        for row, instance in zip(rows.tolist(), example_instance[rows].tolist()):
            if instance != current:
                if current is not None:
                    yield current, np.concatenate(parts)
                current, parts = instance, list(opening)
            parts += [plan.tokens_of(row).astype(dtype), closing]
    if current is not None:
        yield current, np.concatenate(parts)


def instance_contents(config: BuildConfig, blocks, source: RandomAccess, eos: int):
    """The final tokens of each instance holding examples, without writing anything."""
    L, shift = config.sequence_length, 0
    for instance, block in blocks:
        if config.placement == "sequence-start":
            start = instance * L
            dolma = source.read(start + len(block), L - len(block))
        else:
            start = instance * L - shift
            dolma = source.read(start, L - len(block))
            shift += len(block)
        after_eos = start == 0 or int(source.read(start - 1, 1)[0]) == eos
        yield instance, arrange(config.placement, block, dolma.astype(block.dtype), after_eos, eos)[0]


def avoid_filtered_instances(config: BuildConfig, injection: Injection, order: np.ndarray, source: RandomAccess,
                             eos: int, dtype) -> set[int]:
    """Move examples out of instances that OLMo's repetition filter would mask (their text may repeat) into
    a free instance of the same batch. Returns the instances still masked (none, unless no room is left)."""
    plan, B = injection.plan.all_rows(), config.training.global_batch_size
    avoided: set[tuple[int, int]] = set()
    masked: set[int] = set()
    for _ in range(B + 1):  # each round rules out at least one slot of a batch
        example_instance = plan.instances(order)
        blocks = instance_blocks(plan, example_instance, eos, dtype, opens_with_eos(config.placement))
        masked = filtered_instances(instance_contents(config, blocks, source, eos))
        if not masked:
            return masked
        moved = False
        for row in np.flatnonzero(np.isin(example_instance, list(masked))):
            step, slot = int(plan.step[row]), int(plan.slot[row])
            avoided.add((step, slot))
        for step, slot in sorted(avoided):
            rows = np.flatnonzero((plan.step == step) & (plan.slot == slot))
            if not len(rows):
                continue
            target = _clean_slot(plan, step, rows, avoided, config.sequence_length)
            if target is not None:
                plan.slot[rows] = target
                moved = True
        if not moved:
            break
        plan.layout()
        injection.blocks = block_stats(plan, config.training.steps)
    return masked


def _clean_slot(plan: PlanRows, step: int, rows: np.ndarray, avoided: set, L: int) -> int | None:
    """A slot of the batch not known to be masked: a free one first, else one whose block has room."""
    in_step = plan.step == step
    used = plan.slot[in_step]
    ruled_out = {s for st, s in avoided if st == step}
    free = next((s for s in range(plan.batch_size) if s not in set(used.tolist()) | ruled_out), None)
    if free is not None:
        return free
    need = int(plan.length[rows].sum())
    blocks = np.bincount(used, weights=plan.length[in_step], minlength=plan.batch_size) + 1
    for s in np.argsort(blocks, kind="stable"):
        if int(s) not in ruled_out and blocks[s] + need <= L:
            return int(s)
    return None


def write_injected(config: BuildConfig, injection: Injection, stream: TokenStream, out_dir: Path) -> tuple[list[dict], dict]:
    plan, L, t = injection.plan.all_rows(), config.sequence_length, config.training
    N = num_instances(config, injection, stream.total)
    check_epoch(config, N)
    order = training_order(t, N, L)
    dtype = np.dtype(config.token_dtype)
    eos = plan.specs[0].encoder.eos
    masked: set[int] = set()
    if config.instance_filter != "off":
        masked = avoid_filtered_instances(config, injection, order, RandomAccess(stream.arrays), eos, dtype)
        if masked and config.instance_filter == "refuse":
            raise InjectError(
                f"instance_filter: OLMo's repetition filter would mask {len(masked)} instance(s) holding examples "
                f"(first: instance {min(masked)}) and the batch has no free instance left; lower the rates or set "
                "instance_filter: warn"
            )
        if num_instances(config, injection, stream.total) != N:  # moved examples opened new blocks (one EOS each)
            raise InjectError(
                "instance_filter: moving examples out of instances OLMo's repetition filter would mask changes the "
                "number of instances (and so OLMo's order); use placement: document-boundary or sequence-start, or "
                "instance_filter: warn")
    example_instance = plan.instances(order)

    writer = OutputWriter(out_dir, config.instances_per_file * L, L)
    dolma_sha, kept, overwritten, position = hashlib.sha256(), 0, 0, 0
    last_token = None  # the last token written: is the next instance's start a document boundary?

    def write_plain(chunk: np.ndarray) -> None:
        nonlocal kept, last_token
        writer.write(chunk)
        dolma_sha.update(chunk)  # a contiguous array: hashed without a copy
        kept += len(chunk)
        if len(chunk):
            last_token = int(chunk[-1])

    def copy_plain(n_tokens: int) -> None:
        while n_tokens > 0:
            chunk = stream.take(min(n_tokens, 1 << 22))
            write_plain(chunk)
            n_tokens -= len(chunk)

    block_instance, block_offset, without_boundary = [], [], 0
    bar = tqdm(total=N, desc="write", unit="inst", unit_scale=True, disable=None)
    for instance, block in instance_blocks(plan, example_instance, eos, dtype, opens_with_eos(config.placement)):
        copy_plain((instance - position) * L)
        if config.placement == "sequence-start":
            dolma = stream.take(L)[len(block):]
            overwritten += len(block)
        else:
            dolma = stream.take(L - len(block))
        after_eos = last_token is None or last_token == eos
        tokens, offset, boundary = arrange(config.placement, block, dolma, after_eos, eos)
        without_boundary += not boundary
        block_instance.append(instance)
        block_offset.append(offset)
        dolma_sha.update(dolma)
        kept += len(dolma)
        writer.write(tokens)
        last_token = int(tokens[-1])
        bar.update(instance - position + 1)
        position = instance + 1
    copy_plain((N - position) * L)
    bar.update(N - position)
    bar.close()
    copy_plain(stream.total - stream.consumed)  # the tail: in the last file, in no instance
    outputs = writer.finish()

    # plan.offset counts from a leading EOS at the instance start; shift each block to where it was put
    shift = np.array(block_offset, np.int64) - (0 if opens_with_eos(config.placement) else 1)
    plan.offset = plan.offset + shift[np.searchsorted(np.array(block_instance, np.int64), example_instance)]
    write_ledger(out_dir / LEDGER, plan, example_instance)
    np.savez(out_dir / PLAN_FILE, counts=np.stack([s.counts for s in plan.specs], axis=1))
    np.savez(out_dir / POOLS_FILE, **pool_arrays(plan.specs))
    extra = {"injection": injection_summary(config, injection, N, order, overwritten, len(masked), kept,
                                            dolma_sha.hexdigest(), without_boundary)}
    return outputs, extra


def injection_summary(config, injection: Injection, N: int, order, overwritten: int, masked: int,
                      kept: int, kept_sha: str, without_boundary: int) -> dict:
    plan, t = injection.plan.all_rows(), config.training
    B, L = t.global_batch_size, config.sequence_length
    tasks = []
    for s in plan.specs:
        mask = plan.spec == s.index
        examples = int(mask.sum())
        tasks.append({
            "name": s.name, "task": s.config.task, "params": s.config.params, "description": s.task.describe(),
            "encoding": s.config.encoding, "templates": s.encoder.templates,
            "number_tokens": s.config.number_tokens if s.config.encoding == "tokens" else None,
            "token_offset": s.config.token_offset, "schedule": to_dict(s.config.schedule), "pool": to_dict(s.config.pool),
            "space_size": s.task.space_size(), "seen_size": s.seen_size, "held_out_size": len(s.held_out), **pool_record(s),
            "examples": examples, "tokens": int(plan.length[mask].sum()),
            "mean_per_batch": examples / t.steps,
            "exposures_per_seen_instance": examples / s.seen_size,
            "distinct_seen_instances_injected": int(len(np.unique(plan.item[mask]))),
        })
    return {
        "training": to_dict(t), "placement": config.placement, "num_instances": N,
        "epochs_used": t.steps * B / N,
        "order_sha256": order_digest(order, t.steps * B),
        "tasks": tasks,
        "totals": {
            "examples": plan.examples, "injected_tokens": int(injected_tokens(config, injection)),
            "instances_with_examples": injection.blocks.count,
            "blocks_without_boundary": without_boundary,
            "max_batch_share": float(injected_tokens(config, injection, per_step=True).max() / (B * L)) if plan.examples else 0.0,
            "overwritten_dolma_tokens": overwritten,
            "instances_masked_by_olmo_filter": masked,
            "instance_filter": config.instance_filter,
        },
        "dolma": {"kept_tokens": kept, "kept_sha256": kept_sha},
        "files": {"ledger": LEDGER, "plan": PLAN_FILE, "pools": POOLS_FILE},
    }
