"""`olmo-inject verify`: replay ai2-olmo's own training data loader over a build and check it against
the plan and the ledger.

Examples are compared as token ids: each ledger example is encoded once (ExampleTokens) and compared with the
tokens where the ledger puts it; only segments that are not such an example and could parse as one
(SegmentFilter) are decoded and parsed, so what is found and counted is what parsing every segment finds.

Checks, each reported with the step/instance/file it concerns:
  order     the batches come from the build's trainer's module (inject/trainers: `loader_batches`): ai2-olmo's
            `olmo.data.build_train_dataloader`: its IterableDataset's order and its MemMapDataset's file offsets,
            the instances read from the token files (with --replay-loader: every batch out of the DataLoader);
            for a build made for OLMo-core (training.trainer: olmo-core), from OLMo-core 3.0.0's order as
            inject/order.py computes it, read from the token files, or with --olmo-core-python from OLMo-core's
            own NumpyFSLDataLoader in that environment (each rank's rows also compared with inject/order.py's
            order); OLMo-core's repetition filter is not checked;
            every batch holds exactly the planned number of examples of each task, found in the tokens
  ledger    every ledger row of a batch points at an instance of that batch, and its tokens are the
            example it names (preceded by EOS, followed by EOS); ledger counts equal the plan
  held-out  no held-out instance occurs anywhere in the token files (every EOS-terminated segment, cut at
            instance starts as the trainer reads instances); under `split: symmetric` no injected instance has a
            held-out twin (a member of its symmetry class)
  dolma     the Dolma tokens, with the injected blocks removed, hash to what the build recorded
  placement each instance's examples form one block where its placement puts it: at the start after an
            EOS (sequence-start, sequence-start-insert), or (document-boundary) right after an EOS in the
            token stream, or at the instance start when its Dolma tokens hold no EOS at all; the blocks
            not preceded by EOS are as many as the manifest's `blocks_without_boundary`
  filter    no instance that holds examples is masked by OLMo's repetition filter
  config    with --train-config: batch size, sequence length, seed, tokenizer, vocabulary, EOS, dtype
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from . import trainers
from .build import load_manifest
from .config import TaskConfig
from .configtools import from_dict
from .errors import InjectError
from .injection import Encoder, task_space
from .ledger import read_ledger
from .place import PLAN_FILE, POOLS_FILE
from .stream import BackgroundHash, TokenFile, TokenStream
from .tasks import make_task

MAX_LISTED = 20


@dataclass
class Report:
    checked: dict = field(default_factory=dict)
    listed: list[tuple[str, str]] = field(default_factory=list)
    """(kind, message) of the first MAX_LISTED failures of each kind, in the order found."""
    counts: dict = field(default_factory=lambda: defaultdict(int))
    """Failures of each kind, listed or not."""

    def fail(self, kind: str, message: str) -> None:
        if self.counts[kind] < MAX_LISTED:
            self.listed.append((kind, message))
        self.counts[kind] += 1

    def absorb(self, later: "Report") -> None:
        """Add the failures of a report on later steps or files (a worker's), as if found here in order."""
        for kind, message in later.listed:
            self.fail(kind, message)
        for kind, n in later.counts.items():
            self.counts[kind] += n - min(n, MAX_LISTED)

    @property
    def ok(self) -> bool:
        return not self.counts

    @property
    def failures(self) -> list[str]:
        lines = []
        for kind, message in self.listed:
            lines.append(f"[{kind}] {message}")
        for kind, n in self.counts.items():
            if n > MAX_LISTED:
                lines.append(f"[{kind}] ... {n - MAX_LISTED} more failures of this kind not listed")
        return lines

    def summary(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.checked.items()]
        if self.ok:
            lines.append("verify: OK")
        else:
            lines += self.failures
            lines.append("verify: FAILED (" + ", ".join(f"{k}: {v}" for k, v in self.counts.items()) + ")")
        return "\n".join(lines)


@dataclass
class BuildView:
    """What verify needs from a build: manifest, ledger, plan, encoders and pools, grouped by rendering."""

    path: Path
    manifest: dict
    encoders: list[Encoder]
    space_of_spec: list[str]
    held_items: dict          # space -> held-out instance ids (the union over its tasks' pools), ascending
    held_classes: dict        # space -> classes (under the task's symmetry) with a held-out member, ascending (lazy)
    group_of_spec: list[int]
    group_names: list[str]
    counts: np.ndarray       # [steps, specs] planned counts

    @classmethod
    def load(cls, build_dir: Path) -> "BuildView":
        manifest = load_manifest(build_dir)
        if "injection" not in manifest:
            raise InjectError(f"{build_dir}: a build without tasks; nothing to verify against a plan")
        tokenizer = manifest["tokenizer"]["name"]
        configs = [from_dict(TaskConfig, t, f"config.tasks[{i}]") for i, t in enumerate(manifest["config"]["tasks"])]
        encoders = [Encoder(make_task(c.task, c.params, c.name), c, tokenizer, c.name) for c in configs]
        pools = np.load(Path(build_dir) / POOLS_FILE)
        tasks = manifest["injection"]["tasks"]
        spaces = [t.get("space") or task_space(e.task) for t, e in zip(tasks, encoders)]
        held_items = {}
        for i, space in enumerate(spaces):
            held_items[space] = np.union1d(held_items.get(space, np.zeros(0, np.int64)), pools[f"held_out_{i}"])
        signatures, group_of_spec, names = [], [], []
        for c in configs:
            sig = json.dumps([c.task, c.params, c.encoding, c.templates, c.number_tokens, c.token_offset], sort_keys=True)
            if sig not in signatures:
                signatures.append(sig)
                names.append(c.name)
            else:
                names[signatures.index(sig)] += "+" + c.name
            group_of_spec.append(signatures.index(sig))
        counts = np.load(Path(build_dir) / PLAN_FILE)["counts"]
        return cls(Path(build_dir), manifest, encoders, spaces, held_items, {}, group_of_spec, names, counts)

    def split_of(self, spec: int) -> str:
        """The task's split; builds from before `split` existed split by instance (`ordered`)."""
        return self.manifest["injection"]["tasks"][spec].get("split", "ordered")

    def held(self, spec: int, items) -> np.ndarray:
        """Whether each instance is held out (on the task's space)."""
        return _member(self.held_items[self.space_of_spec[spec]], items)

    def twin_held(self, spec: int, items) -> np.ndarray:
        """Whether each instance's symmetry class has a held-out member (itself or a twin)."""
        space, task = self.space_of_spec[spec], self.encoders[spec].task
        if space not in self.held_classes:
            self.held_classes[space] = np.unique(task.class_of(self.held_items[space]))
        return _member(self.held_classes[space], task.class_of(items))

    def held_twin(self, spec: int, item: int) -> int | None:
        """A held-out member of the item's class other than itself, if any."""
        task = self.encoders[spec].task
        _, members = task.class_members(task.class_of([item]))
        twins = members[(members != item) & self.held(spec, members)]
        return int(twins[0]) if len(twins) else None

    @property
    def eos(self) -> int:
        return self.manifest["tokenizer"]["eos_token_id"]

    def parse(self, ids: np.ndarray) -> tuple[int, int, int, bool] | None:
        """(spec, item, template, correct) of a segment, trying each distinct rendering once."""
        seen_groups = set()
        for spec, encoder in enumerate(self.encoders):
            group = self.group_of_spec[spec]
            if group in seen_groups:
                continue
            seen_groups.add(group)
            found = encoder.parse(ids)
            if found is not None:
                return (spec, *found)
        return None

    @cached_property
    def examples(self) -> "ExampleTokens":
        """The token ids of the examples the ledger names, encoded once each (kept for the whole run)."""
        return ExampleTokens(self)

    @cached_property
    def segments(self) -> "SegmentFilter":
        """Which segments could parse as an example at all (token-level; decoding only those)."""
        return SegmentFilter(self)

    @cached_property
    def first_spec_of_group(self) -> np.ndarray:
        """spec -> the first spec of its rendering group: the spec `parse` names for a segment of that group."""
        first = {}
        return np.array([first.setdefault(g, spec) for spec, g in enumerate(self.group_of_spec)], dtype=np.int64)

    @property
    def placement(self) -> str:
        return self.manifest["injection"]["placement"]

    def find_examples(self, row: np.ndarray, longest: int) -> list[tuple[int, int, int, int, bool]]:
        """The examples in an instance where its placement may put them: (offset, spec, item, template,
        correct) each. Start placements: the run of examples after the instance's leading EOS; document-boundary:
        every EOS-terminated segment of at most `longest` tokens that parses as an example."""
        if self.placement == "document-boundary":
            return self._find_anywhere(row, longest)
        return self.find_block(row)

    def find_block(self, row: np.ndarray) -> list[tuple[int, int, int, int, bool]]:
        """Examples at the start of an instance: (offset, spec, item, template, correct) each."""
        if len(row) == 0 or row[0] != self.eos:
            return []
        return self.walk_block(row, 1)

    def walk_block(self, row: np.ndarray, position: int) -> list[tuple[int, int, int, int, bool]]:
        """The run of examples from `position` on, one per EOS-terminated segment, up to the first that does not parse."""
        found = []
        eos_positions = np.flatnonzero(row == self.eos)
        for end in eos_positions[eos_positions >= position]:
            parsed = self.parse(row[position:end])
            if parsed is None:
                break
            found.append((position, *parsed))
            position = int(end) + 1
        return found

    def _find_anywhere(self, row: np.ndarray, longest: int) -> list[tuple[int, int, int, int, bool]]:
        ends = np.flatnonzero(row == self.eos)
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        found = []
        for start, end in zip(starts, ends):
            if 0 < end - start <= longest:
                parsed = self.parse(row[start:end])
                if parsed is not None:
                    found.append((int(start), *parsed))
        return found


def _member(sorted_values: np.ndarray, items) -> np.ndarray:
    items = np.atleast_1d(np.asarray(items, dtype=np.int64))
    where = np.minimum(np.searchsorted(sorted_values, items), max(len(sorted_values) - 1, 0))
    return (sorted_values[where] == items) if len(sorted_values) else np.zeros(len(items), dtype=bool)


class ExampleTokens:
    """The token ids (closing EOS excluded) of examples named by (spec, item, template), each distinct one encoded
    once per process, one tokenizer call per task and lookup; kept in one flat array so that whole batches of
    ledger rows are compared with the token files in a few vectorized operations."""

    def __init__(self, view: "BuildView"):
        self.view = view
        self.group = np.asarray(view.group_of_spec, dtype=np.int64)
        self.templates = max(len(e.templates) for e in view.encoders)
        self.groups = len(view.group_names)
        self.known = np.zeros(0, dtype=np.int64)       # keys (rendering group, template, item) encoded, ascending
        self.known_slot = np.zeros(0, dtype=np.int64)  # and their slots
        self.tokens = np.zeros(1 << 16, dtype=np.int32)
        self.start = np.zeros(1 << 10, dtype=np.int64)
        self.length = np.zeros(1 << 10, dtype=np.int64)
        self.slots = self.used = 0

    def _keys(self, spec: np.ndarray, item: np.ndarray, template: np.ndarray) -> np.ndarray:
        """One int64 per (rendering group, template, item): examples with the same key have the same tokens."""
        if len(item) and (item.min() < 0 or item.max() >= np.iinfo(np.int64).max // (self.templates * self.groups)
                          or template.min() < 0 or template.max() >= self.templates):
            raise InjectError(f"{self.view.path}: the ledger names items {item.min()}..{item.max()}, templates "
                              f"{template.min()}..{template.max()}: outside every task's instances and templates")
        return (item * self.templates + template) * self.groups + self.group[spec]

    def lookup(self, spec: np.ndarray, item: np.ndarray, template: np.ndarray) -> np.ndarray:
        """Slots of the examples (encoding the ones not seen before, one tokenizer call per task); their tokens are
        tokens[start[slot] : start[slot] + length[slot]]."""
        spec, item, template = (np.asarray(x, dtype=np.int64) for x in (spec, item, template))
        keys = self._keys(spec, item, template)
        where = np.minimum(np.searchsorted(self.known, keys), max(len(self.known) - 1, 0))
        slots = np.where(self.known[where] == keys, self.known_slot[where], -1) if len(self.known) else np.full(len(keys), -1)
        missing = np.flatnonzero(slots < 0)
        if len(missing):
            new_keys, first = np.unique(keys[missing], return_index=True)
            new = missing[first]  # one row for each example not seen before
            new_slots = np.empty(len(new), dtype=np.int64)
            for one in np.unique(spec[new]).tolist():
                chosen = np.flatnonzero(spec[new] == one)
                new_slots[chosen] = self._add(*self.view.encoders[one].encode_table(item[new[chosen]], template[new[chosen]]))
            self.known = np.concatenate([self.known, new_keys])
            self.known_slot = np.concatenate([self.known_slot, new_slots])
            order = np.argsort(self.known, kind="stable")
            self.known, self.known_slot = self.known[order], self.known_slot[order]
            slots[missing] = new_slots[np.searchsorted(new_keys, keys[missing])]
        return slots

    def _add(self, flat: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Keep examples given as one flat array of ids and their starts (len + 1); their slots."""
        n = len(starts) - 1
        while self.slots + n > len(self.start):
            self.start, self.length = np.resize(self.start, 2 * len(self.start)), np.resize(self.length, 2 * len(self.start))
        while self.used + len(flat) > len(self.tokens):
            self.tokens = np.resize(self.tokens, 2 * len(self.tokens))
        self.tokens[self.used : self.used + len(flat)] = flat
        self.start[self.slots : self.slots + n] = self.used + starts[:-1]
        self.length[self.slots : self.slots + n] = np.diff(starts)
        self.used += len(flat)
        self.slots += n
        return np.arange(self.slots - n, self.slots)

    def match(self, slots: np.ndarray, tokens: np.ndarray, at: np.ndarray) -> np.ndarray:
        """Whether tokens[at[k] : at[k] + n] is example slots[k] followed by EOS (n its length), for each k; `tokens`
        a flat array, `at` positions in it with room for the example and its EOS (the caller checks)."""
        n = self.length[slots]
        same = tokens[at + n] == self.view.eos
        k = np.flatnonzero(same & (n > 0))
        if len(k):
            firsts = np.cumsum(n[k]) - n[k]
            within = np.arange(int(n[k].sum())) - np.repeat(firsts, n[k])
            equal = tokens[np.repeat(at[k], n[k]) + within] == self.tokens[np.repeat(self.start[slots[k]], n[k]) + within]
            same[k] = np.logical_and.reduceat(equal, firsts)
        same[n == 0] = False
        return same


class SegmentFilter:
    """A sound, token-level test of whether an EOS-delimited segment could parse as an example of some task, so
    that only those are decoded: a `tokens` task's examples have exactly (numbers + 1) tokens; a text example's
    decoded text starts with its template's leading literal, so its first token, decoded alone, is a prefix of
    that literal or starts with it (byte-level decoding: the text of a segment starts with the text of its first
    token when that token decodes to whole characters; tokens that do not are always let through)."""

    def __init__(self, view: "BuildView"):
        self.lengths: set[int] = set()
        prefixes: set[str] = set()
        for spec, encoder in enumerate(view.encoders):
            if view.first_spec_of_group[spec] != spec:
                continue
            if encoder.config.encoding == "tokens":
                self.lengths.add(len(encoder.task.instance(0)) + 1)
            else:
                prefixes.update(_leading_literal(encoder.task, t) for t in encoder.templates)
        self.first_token_ok = None
        if prefixes:
            import re

            from . import tokenizer as tok

            base = tok.load_base(view.manifest["tokenizer"]["name"])  # what OLMo's Tokenizer.decode calls, without torch
            texts = base.decode_batch([[t] for t in range(base.get_vocab_size())], skip_special_tokens=False)
            digit = re.compile(r"\d")

            def may_start(text: str) -> bool:
                if not text or "\ufffd" in text:
                    return True
                return any(p.startswith(text) or text.startswith(p) if p else bool(digit.match(text)) for p in prefixes)

            self.first_token_ok = np.array([may_start(t) for t in texts], dtype=bool)

    @property
    def window(self) -> int:
        """Tokens past which only a text example can still end (a `tokens` example is shorter)."""
        return max(self.lengths, default=0) + 1

    def may_parse(self, first_token: np.ndarray, length: np.ndarray) -> np.ndarray:
        """For segments given by their first token and length (tokens, EOS excluded): False where none can parse."""
        length = np.asarray(length)
        out = np.isin(length, list(self.lengths)) if self.lengths else np.zeros(len(length), dtype=bool)
        if self.first_token_ok is not None:
            first = np.asarray(first_token).astype(np.int64)
            known = first < len(self.first_token_ok)
            out |= (length > 0) & (~known | self.first_token_ok[np.where(known, first, 0)])
        return out


def _leading_literal(task, template: str) -> str:
    """The fixed text a rendered template starts with: its literal text up to the first number or answer field."""
    import string

    out = ""
    for literal, name, _, _ in string.Formatter().parse(template):
        out += literal
        if name is None:
            continue
        if name != "p":
            break
        out += str(getattr(task, "modulus", ""))
    return out


def check_train_config(manifest: dict, path: Path, report: Report) -> None:
    """Compare a run config of the build's trainer with the build, naming every field that differs. A run config
    for the other trainer fails at once: that trainer would not read the build's order."""
    given, built_for = trainers.config_trainer(path), trainers.name_of(manifest)
    if given != built_for:
        report.fail("config", f"{path}: a run config for {given} (its `trainer`), the build was made for {built_for}")
        report.checked["train config"] = str(path)
        return
    trainers.get(built_for).check_train_config(manifest, path, report)


def check_batches_and_held_out(view: BuildView, ledger: np.ndarray, report: Report, sample: int | None, seed: int,
                               workers: int = 1, own_loader=None) -> None:
    """The batch checks (`order`, `ledger`, `filter`) and the held-out scan of the token files, shared by `workers`
    processes: each takes a contiguous range of the steps and of the files' chunks (so that it encodes the
    examples it meets once for both); their reports are merged in step order, then in file order: the same report
    as one process. `own_loader`: the build's trainer's own data loader, where it is run on request (an OLMo-core
    build: trainers.olmo_core.OlmoCoreLoader; ai2-olmo: trainers.ai2_olmo.FullLoader)."""
    t = view.manifest["injection"]["training"]
    if own_loader is not None:
        own_loader.check(view.path, view.manifest)
    steps = t["steps"]
    chosen = list(range(1, steps + 1)) if sample is None else sorted(
        np.random.default_rng(seed).choice(np.arange(1, steps + 1), size=min(sample, steps), replace=False).tolist())
    longest = int(ledger["length"].max()) + 8 if len(ledger) else 64  # of a segment the held-out scan parses
    chunks = [(f, start) for f in range(len(view.manifest["outputs"]))
              for start in range(0, view.manifest["outputs"][f]["tokens"], HELD_OUT_CHUNK)]
    n = max(1, workers)
    step_parts = [part.tolist() for part in np.array_split(np.array(chosen, dtype=np.int64), n)]
    chunk_parts = [part.tolist() for part in np.array_split(np.array(chunks, dtype=np.int64).reshape(-1, 2), n)]
    jobs = [(str(view.path), steps_part, chunks_part, longest, own_loader)
            for steps_part, chunks_part in zip(step_parts, chunk_parts) if steps_part or chunks_part]
    trainer = trainers.of_manifest(view.manifest)
    if len(jobs) <= 1:
        results = [_verify_part(jobs[0], view, ledger)] if jobs else []
    elif own_loader is None and hasattr(trainer, "loader_order"):  # the loader's order made once, read by every worker
        use_filter = view.manifest["injection"]["totals"]["instance_filter"] != "off"
        with tempfile.TemporaryDirectory() as folder:
            order = trainer.loader_order(view.manifest, folder, use_filter)
            results = _in_processes(_verify_part, [(*job[:-1], order) for job in jobs])
    else:
        results = _in_processes(_verify_part, jobs)
    for batches, _ in results:
        report.absorb(batches)
    source = trainer.loader_source(own_loader)
    report.checked["batches checked"] = f"{len(chosen)} of {steps} ({source})"
    parsed = held = 0
    for _, (part, n_parsed, n_held) in results:
        report.absorb(part)
        parsed, held = parsed + n_parsed, held + n_held
    report.checked["task examples found in the token files"] = f"{parsed:,} (ledger: {len(ledger):,}); held-out among them: {held}"


def _verify_part(job: tuple, view: BuildView | None = None, ledger: np.ndarray | None = None) -> tuple:
    """One process's share: (report of its steps, (report, segments parsed, held-out found) of its chunks)."""
    build_dir, steps, chunks, longest, own_loader = job
    if view is None:
        view = BuildView.load(Path(build_dir))
        view.manifest["_dir"] = Path(build_dir).resolve()
    ledger = np.asarray(read_ledger(build_dir) if ledger is None else ledger)  # a plain array over the mapping
    batches = _check_steps(view, ledger, steps, own_loader) if steps else Report()
    return batches, _held_out_in((build_dir, chunks, longest), view, ledger)


def _in_processes(function, jobs: list) -> list:
    """function(job) for each job, one spawned process each, results in job order."""
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(len(jobs))
    try:
        results = pool.map(function, jobs)
    except BaseException:
        pool.terminate()
        raise
    pool.close()  # the workers exit by themselves and release what they hold (no leaked semaphores)
    pool.join()
    return results


def _check_steps(view: BuildView, ledger: np.ndarray, chosen: list[int], own_loader=None) -> Report:
    """Replay the target trainer's loader over the given steps (ascending); consecutive steps are read in one pass."""
    manifest, report = view.manifest, Report()
    ledger = np.asarray(ledger)  # a plain array over the mapping (a memmap's fields cost more to take)
    t = manifest["injection"]["training"]
    steps = t["steps"]
    use_filter = manifest["injection"]["totals"]["instance_filter"] != "off"
    rows_of_step = np.searchsorted(ledger["step"], np.arange(1, steps + 2))
    longest = int(ledger["length"].max()) if len(ledger) else 0  # no example is longer (closing EOS included)
    planned = np.zeros((steps, len(view.group_names)), dtype=np.int64)
    for spec, group in enumerate(view.group_of_spec):
        planned[:, group] += view.counts[:, spec]
    batches = trainers.of_manifest(manifest).loader_batches(manifest, chosen, use_filter, report, own_loader)
    encoded_until = 0  # the examples of chosen[:encoded_until] are encoded
    for i, (step, batch) in enumerate(batches):
        if i >= encoded_until:  # encode the next steps' examples together: the tokenizer is faster on long lists
            encoded_until = _encode_ahead(view, ledger, rows_of_step, chosen, i)
        _check_batch(view, ledger[rows_of_step[step - 1] : rows_of_step[step]], batch, step, planned[step - 1], report,
                     use_filter, longest)
    return report


ENCODE_AHEAD = 1 << 16
"""Ledger rows whose examples are encoded in one go."""


def _encode_ahead(view: BuildView, ledger: np.ndarray, rows_of_step: np.ndarray, chosen: list[int], i: int) -> int:
    """Encode the examples of chosen[i:j] (about ENCODE_AHEAD ledger rows); returns j."""
    j, total, parts = i, 0, []
    while j < len(chosen) and (j == i or total < ENCODE_AHEAD):
        a, b = rows_of_step[chosen[j] - 1], rows_of_step[chosen[j]]
        parts.append(np.arange(a, b))
        total += b - a
        j += 1
    rows = ledger[np.concatenate(parts)]
    view.examples.lookup(rows["spec"], rows["item"], rows["template"])
    return j


def _check_batch(view, rows, batch, step, planned, report, use_filter, longest) -> None:
    """The checks of one batch (`order`, `filter`, `ledger`, held-out ledger rows), vectorized: the ledger's examples
    are compared with the batch's tokens as token ids; only segments that are not a ledger example and could
    parse as one (SegmentFilter) are decoded, as `find_examples` would decode them."""
    ids = np.asarray(batch["input_ids"])
    index = np.asarray(batch["index"]).astype(np.int64)
    L = ids.shape[1]
    flat = ids.reshape(-1)
    batch_row, present = _rows_in_batch(index, rows["instance"].astype(np.int64))
    offset = rows["offset"].astype(np.int64)
    slots = view.examples.lookup(rows["spec"], rows["item"], rows["template"])
    n = view.examples.length[slots]
    at = batch_row * L + offset
    fits = present & (rows["length"].astype(np.int64) == n + 1) & (offset + n < L)
    fits &= (offset == 0) | (flat[np.where(fits & (offset > 0), at - 1, 0)] == view.eos)
    matched = fits.copy()
    matched[fits] = view.examples.match(slots[fits], flat, at[fits])
    if len(np.unique(index)) == len(index):
        found, holding, parsed = _found_examples(view, ids, rows, matched, batch_row, longest)
    else:  # an instance twice in one batch: each copy is searched on its own, as find_examples does
        found, holding, parsed = _found_examples_slowly(view, ids, longest)
    events = [(r, o, "order", f"step {step}: instance {index[r]} offset {o}: example with a wrong answer")
              for r, o, spec, item, template, correct in parsed if not correct]
    if use_filter and holding.any():
        held_rows = np.flatnonzero(holding)
        if "instance_mask" in batch:
            masked = ~np.asarray(batch["instance_mask"]).astype(bool)[held_rows]
        else:
            masked = batch["instance_filter"](ids[held_rows]) if "instance_filter" in batch else np.zeros(len(held_rows), bool)
        events += [(int(r), L, "filter", f"step {step}: instance {index[r]} holds examples and OLMo's repetition filter masks it")
                   for r in held_rows[masked]]
    for _, _, kind, message in sorted(events, key=lambda e: (e[0], e[1])):
        report.fail(kind, message)
    for g, name in enumerate(view.group_names):
        if found[g] != planned[g]:
            report.fail("order", f"step {step} (batch {step - 1}): {name}: found {found[g]} examples in the batch, the plan says {planned[g]}")
    held = np.zeros(len(rows), dtype=bool)
    for spec in np.unique(rows["spec"]):
        where = np.flatnonzero(rows["spec"] == spec)
        held[where] = view.held(int(spec), rows["item"][where])
    for k in np.flatnonzero(~present | ~matched | held).tolist():
        row = rows[k]
        instance = int(row["instance"])
        if not present[k]:
            report.fail("ledger", f"step {step}: ledger row for instance {instance} but that instance is not in the batch")
            continue
        if not matched[k]:
            report.fail("ledger", f"step {step}: instance {instance} offset {int(row['offset'])}: tokens are not the example the "
                                  f"ledger names ({view.manifest['injection']['tasks'][int(row['spec'])]['name']} item {int(row['item'])})")
        if held[k]:
            report.fail("held-out", f"step {step}: ledger row injects held-out item {int(row['item'])}")


def _rows_in_batch(index: np.ndarray, instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of the batch holding each instance, the last one if twice; whether it is in the batch)."""
    order = np.argsort(index, kind="stable")
    ordered = index[order]
    where = np.maximum(np.searchsorted(ordered, instances, side="right") - 1, 0)
    present = (ordered[where] == instances) if len(index) else np.zeros(len(instances), dtype=bool)
    return order[where] if len(index) else np.zeros(len(instances), np.int64), present


def _found_examples(view, ids, rows, matched, batch_row, longest):
    """(examples found per rendering group, whether each batch row holds any, the examples that had to be parsed as
    (row, offset, spec, item, template, correct)): what `find_examples` finds in every row of the batch. A ledger
    example matched token for token is what parsing its segment would find; every other segment that
    `find_examples` would parse, and that could parse at all, is parsed."""
    B, L = ids.shape
    flat, eos = ids.reshape(-1), view.eos
    group = np.asarray(view.group_of_spec, dtype=np.int64)
    found = np.zeros(len(view.group_names), dtype=np.int64)
    holding = np.zeros(B, dtype=bool)
    parsed = []
    if view.placement == "document-boundary":
        ends = np.flatnonzero(flat == eos)
        known = np.flatnonzero(matched)
        np.add.at(found, group[rows["spec"][known].astype(np.int64)], 1)
        holding[batch_row[known]] = True
        previous = np.concatenate([[-1], ends[:-1]])
        starts = np.where((previous >= 0) & (previous // L == ends // L), previous + 1, ends // L * L)
        lengths = ends - starts
        keep = (lengths > 0) & (lengths <= longest) & ~np.isin(starts, batch_row[known] * L + rows["offset"][known])
        keep[keep] = view.segments.may_parse(flat[starts[keep]], lengths[keep])
        for start, end in zip(starts[keep].tolist(), ends[keep].tolist()):
            result = view.parse(flat[start:end])
            if result is not None:
                parsed.append((start // L, start % L, *result))
    else:
        chain = _leading_chain(rows, matched, batch_row)
        np.add.at(found, group[rows["spec"][chain].astype(np.int64)], 1)
        holding[batch_row[chain]] = True
        position = np.ones(B, dtype=np.int64)  # where the walk of each row goes on after the ledger's examples
        np.add.at(position, batch_row[chain], rows["length"][chain].astype(np.int64))
        walked = np.flatnonzero(ids[:, 0] == eos)
        walked = walked[position[walked] < L]
        start = position[walked]
        # the next segment's length, looked for only as far as a `tokens` example reaches (longer: only a text one
        # can parse, which its first token decides)
        columns = start[:, None] + np.arange(view.segments.window)
        is_end = (ids[walked[:, None], np.minimum(columns, L - 1)] == eos) & (columns < L)
        length = np.where(is_end.any(axis=1), is_end.argmax(axis=1), view.segments.window)
        walk = view.segments.may_parse(ids[walked, start], length)
        for r, p in zip(walked[walk].tolist(), start[walk].tolist()):
            for offset, *result in view.walk_block(ids[r], p):
                parsed.append((r, offset, *result))
    for r, offset, spec, item, template, correct in parsed:
        found[view.group_of_spec[spec]] += 1
        holding[r] = True
    return found, holding, sorted(parsed, key=lambda p: (p[0], p[1]))


def _leading_chain(rows, matched, batch_row) -> np.ndarray:
    """The ledger rows (indices) that `find_block`'s walk meets one after another from offset 1 of their instance:
    matched token for token, the first at offset 1, each next one right after the previous one's EOS."""
    k = np.flatnonzero(matched)
    offset, length, r = rows["offset"][k].astype(np.int64), rows["length"][k].astype(np.int64), batch_row[k]
    order = np.lexsort((offset, r))
    k, offset, length, r = k[order], offset[order], length[order], r[order]
    first = np.concatenate([[True], r[1:] != r[:-1]]) if len(k) else np.zeros(0, dtype=bool)
    follows = np.where(first, offset == 1, offset == np.concatenate([[0], offset[:-1] + length[:-1]]))
    breaks = (~follows).astype(np.int64)
    broken = np.cumsum(breaks)
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(k)), 0))
    return k[broken - (broken[group_start] - breaks[group_start]) == 0]


def _found_examples_slowly(view, ids, longest):
    """_found_examples' result, parsing every candidate segment of every row (`find_examples`)."""
    found = np.zeros(len(view.group_names), dtype=np.int64)
    holding = np.zeros(len(ids), dtype=bool)
    parsed = []
    for r in range(len(ids)):
        for offset, spec, item, template, correct in view.find_examples(ids[r], longest):
            found[view.group_of_spec[spec]] += 1
            holding[r] = True
            parsed.append((r, offset, spec, item, template, correct))
    return found, holding, parsed


def check_ledger_against_plan(view: BuildView, ledger: np.ndarray, report: Report) -> None:
    steps, specs = view.counts.shape
    counted = np.zeros_like(view.counts)
    np.add.at(counted, (ledger["step"].astype(np.int64) - 1, ledger["spec"].astype(np.int64)), 1)
    bad = np.argwhere(counted != view.counts)
    for step, spec in bad[:MAX_LISTED]:
        report.fail("ledger", f"step {step + 1}: ledger has {counted[step, spec]} rows of "
                              f"{view.manifest['injection']['tasks'][spec]['name']}, the plan says {view.counts[step, spec]}")
    report.checked["ledger rows"] = f"{len(ledger):,}"


def _open_outputs(view: BuildView) -> list[TokenFile]:
    """The token files, read by slices into fresh arrays (not mapped: a whole pass costs a chunk of memory)."""
    return [TokenFile(view.path / f["path"], view.manifest["dtype"], 0, f["tokens"]) for f in view.manifest["outputs"]]


HELD_OUT_CHUNK = 1 << 22  # 8 MB of uint16 tokens: small enough that memory does not follow the build


def _held_out_in(job: tuple, view: BuildView | None = None, ledger: np.ndarray | None = None) -> tuple[Report, int, int]:
    """The held-out check over some (file, chunk start) pieces: (failures, segments parsed, held-out found). A segment
    that is the ledger's example at its place, token for token, is that example; the others that could parse as one
    (SegmentFilter) are parsed."""
    build_dir, pieces, longest = job
    view = view or BuildView.load(Path(build_dir))
    ledger = np.asarray(read_ledger(build_dir) if ledger is None else ledger)
    report, parsed, held = Report(), 0, 0
    outputs = _open_outputs(view)
    positions = _ledger_positions(view, ledger)
    L = view.manifest["sequence_length"]
    first_instance = np.concatenate([[0], np.cumsum([f["tokens"] // L for f in view.manifest["outputs"]])])
    for f, start in pieces:
        tokens, name = outputs[f], view.manifest["outputs"][f]["path"]
        base = max(start - longest, 0)
        chunk = np.asarray(tokens[base : start + HELD_OUT_CHUNK])
        ends = np.flatnonzero(chunk == view.eos)
        starts = _segment_starts(ends, base, L, known_start=base == 0 or tokens[base - 1 : base][0] == view.eos)
        lengths = ends - starts
        keep = (starts >= 0) & (lengths >= 2) & (lengths <= longest) & (base + ends >= start)
        starts, ends = starts[keep], ends[keep]
        row_of = positions.at(first_instance[f] * L + base + starts)
        matched = np.zeros(len(starts), dtype=bool)
        where = np.flatnonzero(row_of >= 0)
        where = where[ledger["length"][row_of[where]].astype(np.int64) - 1 == ends[where] - starts[where]]
        if len(where):
            rows = row_of[where]
            slots = view.examples.lookup(ledger["spec"][rows], ledger["item"][rows], ledger["template"][rows])
            same_length = view.examples.length[slots] == ends[where] - starts[where]
            matched[where[same_length]] = view.examples.match(slots[same_length], chunk, starts[where[same_length]])
        rows = row_of[matched]
        found_at = [starts[matched]]
        found_spec = [view.first_spec_of_group[ledger["spec"][rows].astype(np.int64)]]
        found_item = [ledger["item"][rows]]
        candidates = np.flatnonzero(~matched)
        candidates = candidates[view.segments.may_parse(chunk[starts[candidates]], ends[candidates] - starts[candidates])]
        for c in candidates.tolist():
            found = view.parse(chunk[starts[c] : ends[c]])
            if found is not None:
                found_at.append(np.array([starts[c]]))
                found_spec.append(np.array([found[0]]))
                found_item.append(np.array([found[1]]))
        at, spec, item = (np.concatenate(x).astype(np.int64) for x in (found_at, found_spec, found_item))
        order = np.argsort(at, kind="stable")
        at, spec, item = at[order], spec[order], item[order]
        parsed += len(at)
        is_held, twin = np.zeros(len(at), dtype=bool), np.zeros(len(at), dtype=bool)
        for one in np.unique(spec).tolist():
            where = np.flatnonzero(spec == one)
            is_held[where] = view.held(one, item[where])
            if view.split_of(one) == "symmetric":
                twin[where] = ~is_held[where] & view.twin_held(one, item[where])
        for k in np.flatnonzero(is_held | twin).tolist():
            s, one, it = int(at[k]), int(spec[k]), int(item[k])
            task_name = view.manifest["injection"]["tasks"][one]["name"]
            held += 1
            if is_held[k]:
                report.fail("held-out", f"{name}: held-out {task_name} item {it} at token {base + s}")
            else:
                twin_instance = view.encoders[one].task.instance(view.held_twin(one, it))
                report.fail("held-out", f"{name}: {task_name} item {it} {view.encoders[one].task.instance(it)} at "
                                        f"token {base + s}, whose twin {twin_instance} is held out")
    return report, parsed, held


def _segment_starts(ends: np.ndarray, base: int, L: int, known_start: bool) -> np.ndarray:
    """Where the segment ending at each EOS (`ends`, positions in a chunk that starts at token `base` of its file)
    begins: after the previous EOS, or at the start of the instance holding its EOS if that comes later, since
    the trainer sees each instance on its own (the batch checks cut segments the same way). Negative where the
    segment began before the chunk (`known_start`: the chunk starts a segment)."""
    previous = np.concatenate([[-1 if known_start else -(1 << 62)], ends[:-1]])
    return np.maximum(previous + 1, (base + ends) // L * L - base)


class _LedgerPositions:
    """The ledger's rows by where their example starts (instance * L + offset), for lookups by token position."""

    def __init__(self, ledger: np.ndarray, L: int):
        keys = ledger["instance"].astype(np.int64) * L + ledger["offset"].astype(np.int64)
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]

    def at(self, keys: np.ndarray) -> np.ndarray:
        """The ledger row of an example starting at each position, -1 where none does."""
        where = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        if not len(self.keys):
            return np.full(len(keys), -1, dtype=np.int64)
        return np.where(self.keys[where] == keys, self.order[where], -1)


def _ledger_positions(view: BuildView, ledger: np.ndarray) -> _LedgerPositions:
    if "_ledger_positions" not in view.__dict__:
        view.__dict__["_ledger_positions"] = _LedgerPositions(ledger, view.manifest["sequence_length"])
    return view.__dict__["_ledger_positions"]


def check_held_out_twins(view: BuildView, ledger: np.ndarray, report: Report) -> None:
    """Under `split: symmetric`, no injected instance may have a held-out twin; under `ordered` they are
    allowed by design and counted."""
    allowed = failed = 0
    for spec, encoder in enumerate(view.encoders):
        rows = ledger[ledger["spec"] == spec]
        items, first = np.unique(rows["item"], return_index=True)
        bad = np.flatnonzero(view.twin_held(spec, items) & ~view.held(spec, items))  # held items themselves: above
        if view.split_of(spec) != "symmetric":
            allowed += len(bad)
            continue
        failed += len(bad)
        name, task = view.manifest["injection"]["tasks"][spec]["name"], encoder.task
        for k in bad[np.argsort(rows["step"][first[bad]], kind="stable")]:
            item = int(items[k])
            report.fail("held-out", f"{name}: injected {task.instance(item)} at step {int(rows['step'][first[k]])}, "
                                    f"whose twin {task.instance(view.held_twin(spec, item))} is held out")
    splits = {view.split_of(spec) for spec in range(len(view.encoders))}
    parts = [f"{failed} under split: symmetric"] if "symmetric" in splits else []
    parts += [f"{allowed} under split: ordered (allowed by design)"] if "ordered" in splits else []
    report.checked["injected instances with a held-out twin"] = ", ".join(parts)


def _blocks(ledger: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per instance holding examples, ascending: (instance, first example's offset, end of the last example,
    whether its examples lie back to back)."""
    if not len(ledger):
        return (np.zeros(0, np.int64),) * 3 + (np.zeros(0, bool),)
    instance = ledger["instance"].astype(np.int64)
    offset, length = ledger["offset"].astype(np.int64), ledger["length"].astype(np.int64)
    rows = np.lexsort((offset, instance))
    instance, offset, length = instance[rows], offset[rows], length[rows]
    first = np.concatenate([[True], instance[1:] != instance[:-1]])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(rows)) - 1
    gaps = np.concatenate([[0], offset[1:] - (offset[:-1] + length[:-1])])
    gaps[starts] = 0
    contiguous = np.logical_and.reduceat(gaps == 0, starts)
    return instance[starts], offset[starts], offset[ends] + length[ends], contiguous


def check_dolma(view: BuildView, ledger: np.ndarray, report: Report) -> None:
    """Remove each instance's injected block; what remains must be the Dolma tokens the build kept. On the
    way, check that each block sits where its placement promises (see `placement` in the module docstring).
    The token files are read once, in chunks; the blocks' positions are computed for all of them at once."""
    inj = view.manifest["injection"]
    L, eos, placement = view.manifest["sequence_length"], view.eos, view.placement
    lead = 0 if placement == "document-boundary" else 1
    outputs = _open_outputs(view)
    stream = TokenStream(outputs)
    instance, first, end, contiguous = _blocks(ledger)
    start = first - lead                                   # where the block starts in its instance
    cut_from = instance * L + np.maximum(start, 0)         # the stream's tokens [cut_from, cut_to) are the block
    cut_to = np.maximum(instance * L + np.minimum(end, L), cut_from)
    before_at = cut_from - 1                               # the token before the block in the stream (-1: none)
    sha, kept = BackgroundHash(), 0  # hashing overlaps reading the next chunk
    before = np.full(len(instance), -1, dtype=np.int64)
    first_token = np.full(len(instance), -1, dtype=np.int64)
    position = 0
    while position < stream.total:
        chunk = stream.take(DOLMA_CHUNK)
        stop = position + len(chunk)
        for wanted, out in ((before_at, before), (instance * L, first_token)):
            a, b = np.searchsorted(wanted, [position, stop])
            out[a:b] = chunk[wanted[a:b] - position]
        a, b = np.searchsorted(cut_to, position, side="right"), np.searchsorted(cut_from, stop)
        # the pieces between the blocks that reach into this chunk (blocks are disjoint and in stream order)
        piece_starts = np.concatenate([[0], np.clip(cut_to[a:b] - position, 0, len(chunk))]).tolist()
        piece_ends = np.concatenate([np.clip(cut_from[a:b] - position, 0, len(chunk)), [len(chunk)]]).tolist()
        part = np.concatenate([chunk[i:j] for i, j in zip(piece_starts, piece_ends) if j > i] or [chunk[:0]])
        # (a new array: it stays as it is while hashed)
        sha.update(part)
        kept += len(part)
        position = stop
    at_boundary = (before_at < 0) | (before == eos)
    without_boundary = int((~at_boundary).sum())
    suspect = ~contiguous | (start != 0) | ~at_boundary | ((first_token != eos) if lead else False)
    for k in np.flatnonzero(suspect).tolist():
        where = f"instance {instance[k]}: block at offset {start[k]}"
        if not contiguous[k]:
            report.fail("placement", f"instance {instance[k]}: its examples are not one block (ledger offsets leave gaps)")
        if lead and (start[k] != 0 or first_token[k] != eos):
            report.fail("placement", f"{where}, not an EOS at the instance start ({placement})")
        elif not lead and not at_boundary[k] and (start[k] != 0 or _eos_outside(view, outputs, int(instance[k]), int(end[k]))):
            report.fail("placement", f"{where} follows token {before[k]}, not EOS: it splits a document "
                                     f"(a block without a boundary must be at the start of an instance without any)")
    want = inj["dolma"]
    if sha.hexdigest() != want["kept_sha256"] or kept != want["kept_tokens"]:
        report.fail("dolma", f"the Dolma tokens outside the injected blocks ({kept:,}) do not hash to the build's record "
                             f"({want['kept_tokens']:,} tokens); tokens were changed, lost or reordered")
    recorded = inj["totals"].get("blocks_without_boundary")
    if recorded is not None and recorded != without_boundary:
        report.fail("placement", f"{without_boundary} block(s) are not preceded by EOS (split a document), the manifest "
                                 f"records {recorded}")
    report.checked["dolma tokens intact"] = f"{kept:,} kept, {inj['totals']['overwritten_dolma_tokens']:,} overwritten by design"
    report.checked["placement"] = f"{placement}: {len(instance):,} blocks, {without_boundary:,} not after EOS"


DOLMA_CHUNK = 1 << 22


def _eos_outside(view: BuildView, outputs: list[TokenFile], instance: int, end: int) -> bool:
    """Whether an instance whose block starts at offset 0 holds an EOS after its block (asked only of blocks
    without a boundary)."""
    L = view.manifest["sequence_length"]
    ends = np.cumsum([len(f) for f in outputs])
    f = int(np.searchsorted(ends, instance * L, side="right"))
    local = instance * L - (ends[f] - len(outputs[f]))
    tokens = np.asarray(outputs[f][local : local + L])
    if len(tokens) < L and f + 1 < len(outputs):  # an instance across two files
        tokens = np.concatenate([tokens, np.asarray(outputs[f + 1][: L - len(tokens)])])
    return bool(np.any(tokens[end:] == view.eos))


def run_verify(build_dir: Path, train_config: Path | None = None, sample: int | None = None, seed: int = 0,
               workers: int = 1, own_loader=None) -> Report:
    """Every check; `workers` processes share the batch replay and the held-out scan while this one runs the Dolma
    check (same report as one process). `own_loader`:
    the batches come from the build's trainer's own data loader run that way (an OLMo-core build:
    trainers.olmo_core.OlmoCoreLoader, OLMo-core's loader in its environment)."""
    view = BuildView.load(build_dir)
    view.manifest["_dir"] = Path(build_dir).resolve()
    ledger = read_ledger(build_dir)
    report = Report()
    report.checked["build"] = str(build_dir)
    if train_config is not None:
        check_train_config(view.manifest, train_config, report)
    check_ledger_against_plan(view, ledger, report)
    dolma = Report()
    if workers > 1:  # this process hashes the Dolma tokens (one sha256 stream) while the workers check the rest
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            hashing = thread.submit(check_dolma, view, ledger, dolma)
            check_batches_and_held_out(view, ledger, report, sample, seed, workers, own_loader)
            hashing.result()
    else:
        check_batches_and_held_out(view, ledger, report, sample, seed, workers, own_loader)
    check_held_out_twins(view, ledger, report)
    if workers <= 1:
        check_dolma(view, ledger, dolma)
    report.absorb(dolma)  # in the order one process reports it: after the others
    report.checked.update(dolma.checked)
    return report
