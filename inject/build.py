"""`olmo-inject build`: Dolma shards / token files -> OLMo token files + manifest + data block.

Two stages, so that a build is resumable and its bytes do not depend on the number of workers:

1. *tokenize*: each input file becomes a token cache in the work folder (a pure function of that file),
   marked complete by a small JSON file written last, named after the input's path (not its position).
   Parallel over files; skipped when marked and the file is unchanged (`input_identity`).
2. *write*: the caches, in input order, are streamed into output files of `instances_per_file`
   instances each. Cheap (I/O only); always redone.

Everything is written under `OUT.partial/` and renamed to `OUT` when complete, so nothing that looks
finished exists before the build is. Rerunning an interrupted build reuses its finished caches.
One build at a time per output: a build holds the lock file `OUT.lock` (beside OUT) exclusively from start
to finish; the tasks of a SLURM array (`--part`) share it, so they run together and exclude a finishing build.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml
from tqdm import tqdm

from . import __version__
from . import tokenizer as tok
from . import trainers
from .config import BuildConfig
from .configtools import to_dict
from .errors import InjectError
from .lock import die_with_parent, folder_lock
from .sources import (MANIFEST, FileStats, Problem, check_token_ids, entry_path, expand_inputs, iter_texts,
                      source_kind, token_file)
from .stream import BackgroundHash, CastArray, OutputWriter, TokenFile, TokenStream

DATA_BLOCK = "olmo-data.yaml"
PROBLEMS = "problems.jsonl"
WORK = ".work"
MAX_PROBLEMS_LISTED = 1000  # per input file; all are counted


# ---------------------------------------------------------------------------- stage 1: tokenize


@dataclass(frozen=True)
class TokenizeJob:
    index: int
    key: str
    """Names the input's cache and marker: the same path (as given and real) always gets the same key."""
    path: str
    work_dir: str
    tokenizer: str
    dtype: str
    input_dtype: str
    batch_documents: int
    strict: bool
    text_field: str = "text"
    id_field: str = "id"


def _marker(work_dir: Path, key: str) -> Path:
    return work_dir / f"input-{key}.done.json"


def _cache(work_dir: Path, key: str) -> Path:
    return work_dir / f"input-{key}.tokens"


def input_key(path: Path) -> str:
    """Caches are found by input, not by position: a shard added or removed shifts positions."""
    return hashlib.sha256(f"{path}\0{os.path.realpath(path)}".encode()).hexdigest()[:24]


def input_identity(path: Path) -> dict:
    """What a finished cache must match to be reused: the real file, its size and mtime, and a hash of its first
    and last 64 KiB (cheap; a rewrite that keeps size and mtime and changes only the middle goes unseen)."""
    stat = os.stat(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        sha.update(f.read(1 << 16))
        if stat.st_size > 1 << 17:
            f.seek(-(1 << 16), os.SEEK_END)
        sha.update(f.read(1 << 16))
    return {"real_path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "head_tail_sha256": sha.hexdigest()}


def tokenize_input(job: TokenizeJob) -> dict:
    """Tokenize one input into its cache; returns (and writes, last) its completion record."""
    path, work_dir = Path(job.path), Path(job.work_dir)
    identity = input_identity(path)
    if source_kind(path) == "tokens":
        record = _check_token_file(job, path)
    else:
        record = _tokenize_dolma(job, path, work_dir)
    if input_identity(path) != identity:
        raise InjectError(f"{path}: changed while it was read; rerun when the inputs are no longer written to")
    record["identity"] = identity
    record["text_field"] = job.text_field
    marker = _marker(work_dir, job.key)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(marker)
    return record


def _tokenize_dolma(job: TokenizeJob, path: Path, work_dir: Path) -> dict:
    problems: list[Problem] = []
    counts: Counter = Counter()

    def on_problem(problem: Problem) -> None:
        if job.strict:
            raise InjectError(f"{problem.file}:{problem.line}: {problem.message} (--strict)")
        counts[problem.kind] += 1
        if len(problems) < MAX_PROBLEMS_LISTED:
            problems.append(problem)

    stats = FileStats()
    cache = _cache(work_dir, job.key)
    documents = tokens = eos_in_text = 0
    eos = tok.get_spec(job.tokenizer).eos_token_id
    with open(cache.with_suffix(".tmp"), "wb") as out:
        batch: list[str] = []
        for text in _with_flush(iter_texts(path, on_problem, stats, job.text_field, job.id_field), job.batch_documents):
            if text is not None:
                batch.append(text)
                continue
            ids = tok.encode_documents(job.tokenizer, batch)
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=job.dtype, count=sum(map(len, ids)))
            # A document whose text spells the EOS token gets an EOS inside it: count it, it splits the document.
            eos_in_text += int(np.count_nonzero(flat == eos)) - len(ids)
            out.write(flat.tobytes())
            documents += len(ids)
            tokens += len(flat)
            batch = []
        out.flush()
        os.fsync(out.fileno())
    cache.with_suffix(".tmp").replace(cache)
    if documents == 0:
        counts["empty_file"] += 1
        problems.append(Problem(str(path), 0, "empty_file", "file holds no usable document"))
    if eos_in_text:
        counts["eos_in_text"] += eos_in_text
    return {
        "index": job.index, "path": str(path), "kind": source_kind(path), "compression": stats.compression,
        "size_bytes": stats.size_bytes, "sha256": stats.sha256, "documents": documents, "tokens": tokens,
        "cache": cache.name, "problem_counts": dict(counts), "problems": [p.__dict__ for p in problems],
    }


def _with_flush(texts: Iterator[str], batch_size: int) -> Iterator[str | None]:
    """Texts with a None after every `batch_size` of them and at the end: the points to tokenize a batch."""
    n = 0
    for text in texts:
        yield text
        n += 1
        if n % batch_size == 0:
            yield None
    yield None


CHECK_CHUNK = 1 << 22
"""Tokens of a pre-tokenized input checked at a time (the hash thread may hold a few such chunks)."""


def _check_token_file(job: TokenizeJob, path: Path) -> dict:
    """One pass over a pre-tokenized input, in large sequential reads: ids inside the vocabulary (and the output
    dtype), documents (EOS count), the file's sha256 (in the hash thread, overlapped with the reads and checks)."""
    tokens = token_file(path, job.input_dtype)
    vocab, eos = tok.vocab_size(job.tokenizer), tok.get_spec(job.tokenizer).eos_token_id
    narrower = np.dtype(job.input_dtype) != np.dtype(job.dtype)
    size = path.stat().st_size
    sha = BackgroundHash()
    with open(path, "rb") as f:
        sha.update(f.read(tokens.offset))  # a .npy header
        documents, top, last = 0, -1, None
        for start in range(0, len(tokens), CHECK_CHUNK):
            part = tokens[start : start + CHECK_CHUNK]
            sha.update(part)
            check_token_ids(path, part, vocab, start)
            top = max(top, int(part.max()))
            documents += int(np.count_nonzero(part == eos))
            last = int(part[-1])
        f.seek(tokens.offset + len(tokens) * tokens.dtype.itemsize)
        sha.update(f.read())  # bytes after a .npy array, if any
    if narrower and top > np.iinfo(job.dtype).max:
        raise InjectError(f"{path}: token ids up to {top} do not fit the output dtype {job.dtype}")
    problems = []
    if last is not None and last != eos:
        problems.append(Problem(str(path), 0, "no_final_eos", "token file does not end with EOS; the next file's first document continues it").__dict__)
    return {
        "index": job.index, "path": str(path), "kind": "tokens", "compression": "none",
        "size_bytes": size, "sha256": sha.hexdigest(), "documents": documents,
        "tokens": len(tokens), "cache": None, "problem_counts": {p["kind"]: 1 for p in problems}, "problems": problems,
    }


def tokenize_all(config: BuildConfig, files: list[Path], work_dir: Path, part: tuple[int, int] | None = None) -> list[dict]:
    """Stage 1 over every input (or, with `part=(k, n)`, the inputs i with i % n == k), reusing completed
    caches; records in input order."""
    jobs = [
        TokenizeJob(i, input_key(p), str(p), str(work_dir), config.tokenizer, config.token_dtype,
                    config.input_dtype or config.token_dtype, config.batch_documents, config.strict, config.text_field,
                    config.id_field)
        for i, p in enumerate(files) if part is None or i % part[1] == part[0]
    ]
    records: dict[int, dict] = {}
    for job in jobs:
        record = _finished_record(job, work_dir)
        if record is not None:
            records[job.index] = record
    todo = [j for j in jobs if j.index not in records]
    crash_after = int(os.environ.get("OLMO_INJECT_CRASH_AFTER_INPUTS", "-1"))  # test hook: simulate a kill
    bar = tqdm(total=len(jobs), initial=len(records), desc="tokenize", unit="file", disable=None)
    if config.workers > 1 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")  # no fork after the tokenizer's threads started
        with context.Pool(min(config.workers, len(todo)), initializer=_one_thread_per_worker,
                          initargs=(os.getpid(),)) as pool:
            results = pool.imap_unordered(tokenize_input, todo)
            for record in results:
                records[record["index"]] = record
                bar.update()
                _maybe_crash(crash_after, len(records))
    else:
        for job in todo:
            records[job.index] = tokenize_input(job)
            bar.update()
            _maybe_crash(crash_after, len(records))
    bar.close()
    return [records[job.index] for job in jobs]


def _finished_record(job: TokenizeJob, work_dir: Path) -> dict | None:
    """The record of an input tokenized by an earlier (interrupted) run, if the input is still what it read."""
    marker = _marker(work_dir, job.key)
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    if record.get("identity") != input_identity(Path(job.path)):
        print(f"{job.path}: changed since the interrupted build read it; tokenizing it again", file=sys.stderr)
        marker.unlink()
        return None
    if record.get("text_field", "text") != job.text_field and record["kind"] != "tokens":
        marker.unlink()  # the interrupted build read another field
        return None
    return {**record, "index": job.index}


def _one_thread_per_worker(parent: int) -> None:
    # Each worker process is one unit of parallelism; the tokenizer's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # A worker whose parent is killed dies with it, instead of failing to send its result (BrokenPipe traces);
    # Ctrl-C is the parent's to handle (it stops the pool), not every worker's to print.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)


def _maybe_crash(crash_after: int, done: int) -> None:
    if crash_after >= 0 and done >= crash_after:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------- stage 2: write


def open_caches(config: BuildConfig, records: list[dict], work_dir: Path) -> list[TokenFile | CastArray]:
    """Every input's tokens, in input order, read by slices (file reads, not memory maps: flat memory)."""
    arrays = []
    for record in records:
        if record["kind"] == "tokens":
            array = token_file(Path(record["path"]), config.input_dtype or config.token_dtype)
            arrays.append(array if array.dtype == np.dtype(config.token_dtype) else CastArray(array, config.token_dtype))
        elif record["tokens"]:
            arrays.append(TokenFile(work_dir / record["cache"], config.token_dtype, 0, record["tokens"]))
    return arrays


def write_base(config: BuildConfig, stream: TokenStream, out_dir: Path) -> list[dict]:
    """Stage 2 without injection: the token stream, in order, cut into files of whole instances."""
    writer = OutputWriter(out_dir, config.instances_per_file * config.sequence_length, config.sequence_length)
    chunk = max(config.sequence_length, 1 << 22)
    with tqdm(total=stream.total, desc="write", unit="tok", unit_scale=True, disable=None) as bar:
        while stream.consumed < stream.total:
            tokens = stream.take(chunk)
            writer.write(tokens)
            bar.update(len(tokens))
    return writer.finish()


# ---------------------------------------------------------------------------- the build


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def output_lock(out_dir: Path, shared: bool = False):
    """The lock of a build's output (and its partial folder), held for the whole build: exclusive for a
    build, shared among the parts of an array build."""
    return folder_lock(out_dir.with_name(out_dir.name + ".lock"), f"the build output {out_dir}", shared=shared)


def prepare_output(config: BuildConfig, out_dir: Path, overwrite: bool, shared: bool = False) -> Path:
    """The partial folder to build in; reused when it holds an interrupted build of the same config.

    `shared`: several processes (the tasks of a SLURM job array) may prepare it at once; none deletes.
    """
    if out_dir.exists() and not overwrite:
        raise InjectError(f"{out_dir}: output folder already exists; pass --overwrite to replace it")
    partial = partial_dir(out_dir)
    fingerprint = hashlib.sha256(json.dumps(config.echo(), sort_keys=True).encode()).hexdigest()
    stamp = partial / WORK / "config.sha256"
    stale = stamp.read_text() != fingerprint if stamp.exists() else partial.exists() and not shared
    if stale and shared:
        raise InjectError(f"{partial}: holds an unfinished build of another config; finish it or delete the folder")
    if stale:
        shutil.rmtree(partial)
    (partial / WORK).mkdir(parents=True, exist_ok=True)
    _write_once(stamp, fingerprint)
    if stamp.read_text() != fingerprint:
        raise InjectError(f"{partial}: another build of a different config started in it at the same time")
    return partial


def _write_once(path: Path, text: str) -> None:
    """Create `path` holding `text` unless it exists; atomic, so concurrent writers never see half a file."""
    if path.exists():
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def finalize(partial: Path, out_dir: Path) -> None:
    """Drop the work folder and move the finished build into place (the rename is the commit)."""
    shutil.rmtree(partial / WORK, ignore_errors=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.replace(out_dir)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0], "olmo-inject": __version__}
    for name in ("ai2-olmo", "torch", "numpy", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def summarize_inputs(records: list[dict], input_problems: list[Problem] = ()) -> tuple[dict, list[dict]]:
    """Problem counts by kind and the problems listed, of the input list (`input_problems`) and of every input."""
    counts = Counter(p.kind for p in input_problems)
    problems = [p.__dict__ for p in input_problems]
    for r in records:
        counts.update(r["problem_counts"])
        problems.extend(r["problems"])
    documents = sum(r["documents"] for r in records)
    if documents == 0:
        raise InjectError("inputs: no usable document in any input file " + ", ".join(r["path"] for r in records[:5]))
    return dict(sorted(counts.items())), problems


def data_block(config: BuildConfig, out_dir: Path, outputs: list[dict]) -> dict:
    """The OLMo TrainConfig fragment that trains on this build: data, tokenizer, and every field that fixes
    which instances a step reads (the build's trainer's `order_fields`), so that a TrainConfig merged with it reads
    the planned order."""
    spec = tok.get_spec(config.tokenizer)
    block = {
        "data": {"paths": [str((out_dir / f["path"]).resolve()) for f in outputs], "memmap_dtype": config.token_dtype},
        "model": {"eos_token_id": spec.eos_token_id,
                  "pad_token_id": spec.pad_token_id, "vocab_size": tok.vocab_size(config.tokenizer)},
        "tokenizer": {"identifier": spec.olmo_identifier},
    }
    training = to_dict(config.training) if config.tasks else None
    trainer = trainers.get(config.training.trainer if training is not None else trainers.NAMES[0])
    for name, value in trainer.order_fields(config.sequence_length, training).items():
        *parents, key = name.split(".")
        node = block
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return block


def write_manifest(partial: Path, out_dir: Path, config: BuildConfig, records: list[dict], outputs: list[dict],
                   extra: dict | None = None, input_problems: list[Problem] = ()) -> dict:
    spec = tok.get_spec(config.tokenizer)
    problem_counts, problems = summarize_inputs(records, input_problems)
    tokens = sum(f["tokens"] for f in outputs)
    instances = sum(f["instances"] for f in outputs)
    manifest = {
        "format": "olmo-inject/1",
        "versions": versions(),
        "config": config.echo(),
        "tokenizer": {"name": spec.name, "file": spec.file, "sha256": tok.file_sha256(config.tokenizer),
                      "eos_token_id": spec.eos_token_id, "pad_token_id": spec.pad_token_id,
                      "vocab_size": tok.vocab_size(config.tokenizer), "olmo_identifier": spec.olmo_identifier},
        "dtype": config.token_dtype,
        "sequence_length": config.sequence_length,
        "inputs": [{k: v for k, v in r.items() if k not in ("problems", "cache", "index", "identity")} for r in records],
        "outputs": outputs,
        "counts": {
            "input_files": len(records),
            "documents": sum(r["documents"] for r in records),
            "input_tokens": sum(r["tokens"] for r in records),
            "tokens": tokens,
            "instances": instances,
            "tail_tokens": tokens - instances * config.sequence_length,
            "problems": sum(problem_counts.values()),
            "problems_by_kind": problem_counts,
        },
        "problems_file": PROBLEMS,
    }
    manifest.update(extra or {})
    with open(partial / PROBLEMS, "w") as f:
        for p in problems:
            f.write(json.dumps(p) + "\n")
    (partial / DATA_BLOCK).write_text(yaml.safe_dump(data_block(config, out_dir, outputs), sort_keys=False))
    (partial / "config.yaml").write_text(yaml.safe_dump(config.echo(), sort_keys=False))
    # The manifest is written last: its presence means every other file is complete.
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def list_inputs(config: BuildConfig, out_dir: Path) -> tuple[list[Path], list[Problem]]:
    """The input files of a build into `out_dir`, and the problems of the list itself (links that lead nowhere;
    fatal with `strict`). Refused before anything is read or written: an output folder among the inputs."""
    named = [entry_path(e, config.base_dir) for e in config.inputs]
    check_output_apart(out_dir, [p for p in named if os.path.lexists(p)])  # before walking into it
    problems: list[Problem] = []
    files = expand_inputs(config.inputs, config.base_dir, problems)
    check_output_apart(out_dir, files)
    if problems and config.strict:
        raise InjectError(f"{problems[0].file}: {problems[0].message} (--strict)")
    return files, problems


def check_output_apart(out_dir: Path, inputs: list[Path]) -> None:
    """Refuse an output folder (or its OUT.partial) that is, holds or lies inside an input, by real path:
    `--overwrite` would delete the input, and a rebuild would read its own output as input."""
    for target in (out_dir, partial_dir(out_dir)):
        real_target = Path(os.path.realpath(target))
        for path in inputs:
            real = Path(os.path.realpath(path))
            if real_target == real:
                how = "is"
            elif real in real_target.parents:
                how = "lies inside"
            elif real_target in real.parents:
                how = "holds"
            else:
                continue
            shown = str(path) if str(real) == str(path) else f"{path} ({real})"
            raise InjectError(f"--out: {real_target} {how} the input {shown}; an output folder must be apart from "
                              "every input (--overwrite would delete the input, a rebuild would read its own output)")


def estimate_space(config: BuildConfig, files: list[Path]) -> int:
    """Rough bytes a build writes: its token files and, until it is done, a token cache per Dolma input. A Dolma
    input's tokens are estimated as 1 per 4 bytes of text, compressed text as 4 times its size."""
    itemsize = np.dtype(config.token_dtype).itemsize
    input_itemsize = np.dtype(config.input_dtype or config.token_dtype).itemsize
    total = 0
    for path in files:
        size = path.stat().st_size
        if source_kind(path) == "tokens":
            total += size // input_itemsize * itemsize
        else:
            text = size * (4 if str(path).lower().endswith((".gz", ".zst")) else 1)
            total += 2 * (text // 4) * itemsize
    return total


def disk_full_error(error: OSError, config: BuildConfig, out_dir: Path) -> InjectError | None:
    """A clear error for a full disk or quota while building into `out_dir` (None for any other error)."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    partial = partial_dir(out_dir.resolve())
    files = expand_inputs(config.inputs, config.base_dir)
    existing = next(p for p in (partial, *partial.parents) if p.exists())
    written = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()) if partial.exists() else 0
    return InjectError(
        f"{partial}: {error.strerror} while writing the build; it needs about {_megabytes(estimate_space(config, files))} "
        f"(estimated from the input sizes), {_megabytes(written)} written so far, "
        f"{_megabytes(shutil.disk_usage(existing).free)} free there now. Free space or choose another --out, then "
        "rerun the same command: the inputs already tokenized are kept")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.1f} GB"


def run_build(config: BuildConfig, out_dir: Path, overwrite: bool = False) -> dict:
    """Build `config` into `out_dir`; returns the manifest. Inputs already tokenized by `tokenize_part` are reused."""
    from .place import prepare_injection, write_injected

    out_dir = out_dir.resolve()
    files, input_problems = list_inputs(config, out_dir)
    injection = prepare_injection(config) if config.tasks else None  # config errors before any work
    with output_lock(out_dir):
        partial = prepare_output(config, out_dir, overwrite)
        work_dir = partial / WORK
        records = tokenize_all(config, files, work_dir)
        summarize_inputs(records)  # fail before writing when there is nothing to write
        stream = TokenStream(open_caches(config, records, work_dir))
        if injection is None:
            outputs, extra = write_base(config, stream, partial), None
        else:
            outputs, extra = write_injected(config, injection, stream, partial)
        manifest = write_manifest(partial, out_dir, config, records, outputs, extra, input_problems)
        finalize(partial, out_dir)
        return manifest


def tokenize_part(config: BuildConfig, out_dir: Path, part: int, parts: int) -> list[dict]:
    """Stage 1 for inputs i with i % parts == part only (one task of a SLURM job array), into the build's
    partial folder; `run_build` on the same config and folder then finishes the build."""
    if not 0 <= part < parts:
        raise InjectError(f"--part: {part}/{parts} is not a part of {parts} (expected K/N with 0 <= K < N)")
    files, _ = list_inputs(config, out_dir.resolve())  # the finishing run lists the input problems
    with output_lock(out_dir.resolve(), shared=True):
        partial = prepare_output(config, out_dir.resolve(), overwrite=False, shared=True)
        return tokenize_all(config, files, partial / WORK, part=(part, parts))


def load_manifest(build_dir: Path) -> dict:
    path = Path(build_dir) / MANIFEST
    if not path.exists():
        hint = " (an unfinished build: rerun it to resume)" if partial_dir(Path(build_dir)).exists() else ""
        raise InjectError(f"{build_dir}: no {MANIFEST}; not a finished olmo-inject build{hint}")
    return json.loads(path.read_text())
