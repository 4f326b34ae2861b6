"""Placement: lay the token stream and the planned examples out so that OLMo's order delivers every
example in its planned batch.

Instances are written in index order 0..N-1. Instance i holds, when the plan puts examples in it, a
block (EOS, then each example and its EOS) followed by Dolma tokens in their original order:

- `sequence-start`: instance i is the base build's instance i with its first tokens overwritten by
  the block (N does not change; the overwritten Dolma tokens are counted);
- `document-boundary`: the block is inserted before the Dolma tokens, which continue where the
  previous instance stopped (no Dolma token lost; N grows by the injected tokens / L).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .build import OutputWriter, TokenStream
from .config import BuildConfig
from .configtools import to_dict
from .errors import InjectError
from .injection import Plan, check_epoch, make_plan, make_specs, olmo_order, order_digest
from .ledger import LEDGER, write_ledger

PLAN_FILE = "plan.npz"
POOLS_FILE = "pools.npz"


@dataclass
class Injection:
    plan: Plan
    block_steps: np.ndarray
    block_slots: np.ndarray
    block_lengths: np.ndarray


def prepare_injection(config: BuildConfig) -> Injection:
    """Everything about the injection that does not depend on the corpus (all config errors surface here)."""
    plan = make_plan(config, make_specs(config))
    steps, slots, lengths = plan.block_lengths() if plan.examples else (np.zeros(0, np.int64),) * 3
    return Injection(plan, steps, slots, lengths)


def num_instances(config: BuildConfig, injection: Injection, stream_tokens: int) -> int:
    L = config.sequence_length
    if config.placement == "sequence-start":
        return stream_tokens // L
    return (stream_tokens + int(injection.block_lengths.sum())) // L


def instance_filter_masks(tokens: np.ndarray) -> bool:
    """True when ai2-olmo's repetition filter (InstanceFilterConfig defaults) would mask this instance."""
    from olmo.config import InstanceFilterConfig
    from olmo.data.util import find_periodic_sequences

    f = InstanceFilterConfig()
    return any(m.times >= f.repetition_max_count for m in find_periodic_sequences(
        tokens.astype(np.int64), max_period=f.repetition_max_period, min_period=f.repetition_min_period))


def write_injected(config: BuildConfig, injection: Injection, stream: TokenStream, out_dir: Path) -> tuple[list[dict], dict]:
    plan, L, t = injection.plan, config.sequence_length, config.training
    B = t.global_batch_size
    N = num_instances(config, injection, stream.total)
    check_epoch(config, N)
    order = olmo_order(N, B, t.seed, t.drop_last)
    example_instance = order[(plan.step.astype(np.int64) - 1) * B + plan.slot].astype(np.int64)
    block_instance = order[(injection.block_steps - 1) * B + injection.block_slots].astype(np.int64)
    by_instance = np.lexsort((plan.offset, example_instance))  # examples in writing order
    instances_with = np.sort(block_instance)

    writer = OutputWriter(out_dir, config.instances_per_file * L, L)
    dolma_sha, kept = hashlib.sha256(), 0
    overwritten = masked = 0
    masked_examples: list[int] = []
    position = cursor = 0
    dtype = np.dtype(config.token_dtype)
    eos = plan.specs[0].encoder.eos

    def copy_plain(n_tokens: int) -> None:
        nonlocal kept
        while n_tokens > 0:
            chunk = stream.take(min(n_tokens, 1 << 22))
            writer.write(chunk)
            dolma_sha.update(chunk.tobytes())
            kept += len(chunk)
            n_tokens -= len(chunk)

    bar = tqdm(total=N, desc="write", unit="inst", unit_scale=True, disable=None)
    for instance in instances_with:
        copy_plain(int(instance - position) * L)
        block = [np.array([eos], dtype=dtype)]
        while cursor < len(by_instance) and example_instance[by_instance[cursor]] == instance:
            row = by_instance[cursor]
            block += [plan.tokens_of(row).astype(dtype), np.array([eos], dtype=dtype)]
            cursor += 1
        block = np.concatenate(block)
        if config.placement == "sequence-start":
            dolma = stream.take(L)
            overwritten += len(block)
            dolma = dolma[len(block):]
        else:
            dolma = stream.take(L - len(block))
        dolma_sha.update(dolma.tobytes())
        kept += len(dolma)
        tokens = np.concatenate([block, dolma])
        if config.instance_filter != "off" and instance_filter_masks(tokens):
            masked += 1
            masked_examples.append(int(instance))
        writer.write(tokens)
        bar.update(int(instance - position) + 1)
        position = int(instance) + 1
    copy_plain((N - position) * L)
    bar.update(N - position)
    bar.close()
    copy_plain(stream.total - stream.consumed)  # the tail: in the last file, in no instance
    if masked and config.instance_filter == "refuse":
        raise InjectError(
            f"instance_filter: OLMo's repetition filter would mask {masked} instance(s) holding examples "
            f"(first: instance {masked_examples[0]}); lower the rates or set instance_filter: warn"
        )
    outputs = writer.finish()

    write_ledger(out_dir / LEDGER, plan, example_instance)
    np.savez(out_dir / PLAN_FILE, counts=np.stack([s.counts for s in plan.specs], axis=1))
    np.savez(out_dir / POOLS_FILE, **{f"seen_{s.index}": s.seen for s in plan.specs},
             **{f"held_out_{s.index}": s.held_out for s in plan.specs})
    extra = {"injection": injection_summary(config, injection, N, order, overwritten, masked, kept, dolma_sha.hexdigest())}
    return outputs, extra


def injection_summary(config, injection: Injection, N: int, order, overwritten: int, masked: int,
                      kept: int, kept_sha: str) -> dict:
    plan, t = injection.plan, config.training
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
            "space_size": s.task.space_size(), "seen_size": len(s.seen), "held_out_size": len(s.held_out),
            "examples": examples, "tokens": int(plan.length[mask].sum()),
            "mean_per_batch": examples / t.steps,
            "exposures_per_seen_instance": examples / len(s.seen),
            "distinct_seen_instances_injected": int(len(np.unique(plan.item[mask]))),
        })
    injected = int(injection.block_lengths.sum())
    return {
        "training": to_dict(t), "placement": config.placement, "num_instances": N,
        "epochs_used": t.steps * B / N,
        "order_sha256": order_digest(order, t.steps * B),
        "tasks": tasks,
        "totals": {
            "examples": plan.examples, "injected_tokens": injected,
            "instances_with_examples": len(injection.block_lengths),
            "max_batch_share": float(np.bincount(injection.block_steps - 1, weights=injection.block_lengths,
                                                 minlength=t.steps).max() / (B * L)) if plan.examples else 0.0,
            "overwritten_dolma_tokens": overwritten,
            "instances_masked_by_olmo_filter": masked,
            "instance_filter": config.instance_filter,
        },
        "dolma": {"kept_tokens": kept, "kept_sha256": kept_sha},
        "files": {"ledger": LEDGER, "plan": PLAN_FILE, "pools": POOLS_FILE},
    }
