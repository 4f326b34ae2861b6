"""The injection engine: every batch that ai2-olmo's loader yields holds exactly the planned examples."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import docs, make_texts, run_cli, write_shard
from test_build import digest
from inject.ledger import read_ledger

TOKEN_MOD = {"name": "mod97-tok", "task": "modular_addition", "params": {"modulus": 97}, "encoding": "tokens",
             "schedule": {"kind": "even", "rate": 0.1}}
TEXT_CMP = {"name": "cmp2-text", "task": "comparison", "params": {"digits": 2}, "schedule": {"kind": "even", "rate": 3}}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    texts = make_texts(3000, seed=1)
    write_shard(folder / "a.jsonl.gz", docs(texts[:1500], "a"))
    write_shard(folder / "b.jsonl.zst", docs(texts[1500:], "b"))
    return folder


def build(tmp_path: Path, corpus_dir: Path, name: str = "out", *extra, **config) -> tuple[int, Path]:
    config = {"inputs": [str(corpus_dir)], "sequence_length": 32, **config}
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return run_cli("build", cfg, "--out", tmp_path / name, *extra), tmp_path / name


def verify(build_dir: Path, capsys, *extra) -> tuple[int, str]:
    code = run_cli("verify", build_dir, *extra)
    return code, capsys.readouterr().out


COMBINATIONS = {
    "seqstart-even-both-encodings": dict(
        sequence_length=32, training={"global_batch_size": 8, "steps": 100, "seed": 1},
        tasks=[TEXT_CMP, TOKEN_MOD]),
    "docboundary-burst-poisson-window": dict(
        sequence_length=64, placement="document-boundary", training={"global_batch_size": 16, "steps": 60, "seed": 7},
        tasks=[{**TEXT_CMP, "schedule": {"kind": "poisson", "rate": 2.5}},
               {**TOKEN_MOD, "schedule": {"kind": "burst", "burst_size": 5, "burst_every": 7}},
               {"name": "add3", "task": "modular_addition", "params": {"modulus": 11, "operands": 3},
                "schedule": {"kind": "window", "rate": 1.5, "start": 10, "stop": 30}}]),
    "piecewise-bernoulli-droplast-uniform": dict(
        sequence_length=48, training={"global_batch_size": 4, "steps": 200, "seed": 0, "drop_last": True},
        tasks=[{"name": "pw", "task": "modular_addition", "params": {"modulus": 13, "operands": 3},
                "pool": {"held_out": 100, "seen": 500, "draw": "uniform", "seed": 3},
                "schedule": {"kind": "piecewise", "pieces": [{"until": 50, "rate": 2}, {"until": 150, "rate": 0.3}]}},
               {**TOKEN_MOD, "schedule": {"kind": "bernoulli", "rate": 0.4}}]),
    "many-per-instance-offset-tokens": dict(
        sequence_length=32, placement="document-boundary", max_batch_share=0.9,
        training={"global_batch_size": 8, "steps": 40, "seed": 12345},
        tasks=[{**TOKEN_MOD, "number_tokens": "offset", "token_offset": 1000, "schedule": {"kind": "even", "rate": 20}}]),
    "templates-fractional": dict(
        sequence_length=128, training={"global_batch_size": 10, "steps": 80, "seed": 3},
        tasks=[{**TEXT_CMP, "templates": ["Which is larger, {a} or {b}? {answer}", "max({a}, {b}) = {answer}"],
                "schedule": {"kind": "even", "rate": 12}},
               {"name": "cmp1-tok", "task": "comparison", "params": {"digits": 1}, "encoding": "tokens",
                "schedule": {"kind": "even", "rate": 0.25}}]),
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_verify_passes_on_builds(tmp_path, corpus_dir, capsys, name):
    code, out_dir = build(tmp_path, corpus_dir, **COMBINATIONS[name])
    assert code == 0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    counts = np.load(out_dir / "plan.npz")["counts"]
    assert manifest["injection"]["totals"]["examples"] == counts.sum() == len(read_ledger(out_dir)) > 0
    code, out = verify(out_dir, capsys)
    assert code == 0, out
    assert "verify: OK" in out
    steps = manifest["injection"]["training"]["steps"]
    assert f"batches checked: {steps} of {steps}" in out
    # verify decodes only the segments its token-level pre-check lets through: every segment that parses is one.
    from inject.verify import BuildView

    view = BuildView.load(out_dir)
    tokens = np.concatenate([np.fromfile(out_dir / f["path"], dtype=np.uint16) for f in manifest["outputs"]])
    ends = np.flatnonzero(tokens == view.eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    short = ends - starts <= 64
    starts, ends = starts[short], ends[short]
    parses = np.array([view.parse(tokens[a:b]) is not None for a, b in zip(starts, ends)])
    may = view.segments.may_parse(tokens[np.minimum(starts, len(tokens) - 1)], ends - starts)
    assert parses.any() and not (parses & ~may).any()
    assert may.sum() < len(may)


def test_a_segment_decodes_to_text_that_starts_with_its_first_tokens_text():
    """What SegmentFilter relies on (byte-level decoding), over random token sequences."""
    from inject import tokenizer as tok

    tokenizer = tok.load("allenai/gpt-neox-olmo-dolma-v1_5")
    rng = np.random.default_rng(0)
    for ids in rng.integers(0, 50280, (3000, 6)).tolist():
        first = tokenizer.decode(ids[:1], skip_special_tokens=False)
        if "\ufffd" not in first:
            assert tokenizer.decode(ids, skip_special_tokens=False).startswith(first), ids


def test_sequence_start_insert_keeps_every_dolma_token_in_order(tmp_path, corpus_dir):
    code, base = build(tmp_path, corpus_dir, "base", sequence_length=64)
    code, out_dir = build(tmp_path, corpus_dir, **{**COMBINATIONS["docboundary-burst-poisson-window"],
                                                   "placement": "sequence-start-insert"})
    assert code == 0
    read = lambda d: np.concatenate([np.fromfile(p, dtype=np.uint16) for p in sorted((d / "data").glob("*.npy"))])
    stream, plain = read(out_dir), read(base)
    ledger = read_ledger(out_dir)
    keep = np.ones(len(stream), dtype=bool)
    for instance in np.unique(ledger["instance"]):
        rows = ledger[ledger["instance"] == instance]
        keep[instance * 64 : instance * 64 + 1 + int(rows["length"].sum())] = False
    assert np.array_equal(stream[keep], plain)


def olmo_batches(out_dir: Path, save_folder: Path):
    """Batches exactly as ai2-olmo's trainer gets them: a TrainConfig and build_train_dataloader."""
    from olmo.config import DataConfig, ModelConfig, TrainConfig
    from olmo.data import build_train_dataloader

    manifest = json.loads((out_dir / "manifest.json").read_text())
    t = manifest["injection"]["training"]
    block = yaml.safe_load((out_dir / "olmo-data.yaml").read_text())
    cfg = TrainConfig(seed=t["seed"], global_train_batch_size=t["global_batch_size"],
                      device_train_batch_size=t["global_batch_size"], save_folder=str(save_folder),
                      model=ModelConfig(**block["model"]), data=DataConfig(**block["data"]))
    loader = build_train_dataloader(cfg)
    return [b["input_ids"].numpy() for _, b in zip(range(t["steps"]), loader)]


def test_examples_counted_in_trainer_batches_match_the_plan(tmp_path, corpus_dir):
    from inject import tokenizer as tok

    code, out_dir = build(tmp_path, corpus_dir, **COMBINATIONS["templates-fractional"])
    assert code == 0
    counts = np.load(out_dir / "plan.npz")["counts"]
    tokenizer = tok.load("allenai/gpt-neox-olmo-dolma-v1_5")
    eos = 50279
    digit_ids = {tokenizer.encode(f" {d}", add_special_tokens=False)[0] for d in range(10)}
    labels = {2239, 654}  # " >" and " <"
    pattern = re.compile(r"(?:Which is larger, (\d\d) or (\d\d)\? (\d\d)|max\((\d\d), (\d\d)\) = (\d\d))")
    for step, ids in enumerate(olmo_batches(out_dir, tmp_path / "run"), start=1):
        text_found = tok_found = 0
        for row in ids:
            for m in pattern.finditer(tokenizer.decode(row.tolist())):
                a, b, answer = [int(x) for x in m.groups() if x is not None]
                assert answer == max(a, b)
                text_found += 1
            windows = np.lib.stride_tricks.sliding_window_view(row, 5)
            tok_found += int(np.sum((windows[:, 0] == eos) & np.isin(windows[:, 1], list(digit_ids))
                                    & np.isin(windows[:, 2], list(digit_ids)) & np.isin(windows[:, 3], list(labels))
                                    & (windows[:, 4] == eos)))
        assert (text_found, tok_found) == (counts[step - 1, 0], counts[step - 1, 1]), f"step {step}"
    assert counts[:, 1].sum() == 20 and set(np.flatnonzero(counts[:, 1]) + 1) == set(range(4, 81, 4))


def test_same_config_same_bytes_with_one_or_two_workers(tmp_path, corpus_dir):
    config = COMBINATIONS["docboundary-burst-poisson-window"]
    assert build(tmp_path, corpus_dir, "w1", "--workers", 1, **config)[0] == 0
    assert build(tmp_path, corpus_dir, "w2", "--workers", 2, **config)[0] == 0
    assert digest(tmp_path / "w1") == digest(tmp_path / "w2")


def _rewrite(out_dir: Path, edit) -> None:
    """Apply `edit(tokens)` to the concatenated token files in place."""
    files = sorted((out_dir / "data").glob("*.npy"))
    arrays = [np.fromfile(p, dtype=np.uint16) for p in files]
    sizes = np.cumsum([0] + [len(a) for a in arrays])
    tokens = np.concatenate(arrays)
    edit(tokens)
    for p, a, b in zip(files, sizes[:-1], sizes[1:]):
        tokens[a:b].tofile(p)


def test_verify_names_the_batch_of_a_dropped_or_moved_example(tmp_path, corpus_dir, capsys):
    code, out_dir = build(tmp_path, corpus_dir, **COMBINATIONS["seqstart-even-both-encodings"])
    ledger = read_ledger(out_dir)
    L = 32
    # Drop: the one example of the instance is overwritten by ordinary text tokens.
    single = [r for r in ledger if (ledger["instance"] == r["instance"]).sum() == 1]
    dropped = single[0]
    def drop(tokens):
        start = int(dropped["instance"]) * L + int(dropped["offset"])
        tokens[start : start + int(dropped["length"])] = 1000
    shutil.copytree(out_dir, tmp_path / "dropped")
    _rewrite(tmp_path / "dropped", drop)
    code, out = verify(tmp_path / "dropped", capsys)
    assert code == 1
    assert f"step {dropped['step']} (batch {dropped['step'] - 1}): cmp2-text: found 2 examples in the batch, the plan says 3" in out
    assert (f"step {dropped['step']}: instance {dropped['instance']} offset {dropped['offset']}: "
            "tokens are not the example the ledger names") in out
    # Move: swap an instance holding an example with one from another batch that holds none.
    from inject.injection import olmo_order

    order = olmo_order(int(json.loads((out_dir / "manifest.json").read_text())["injection"]["num_instances"]), 8, 1, False)
    moved = single[1]
    target_step = int(moved["step"]) % 100 + 1
    target = next(i for i in order[(target_step - 1) * 8 : target_step * 8] if i not in set(ledger["instance"]))
    def move(tokens):
        a, b = int(moved["instance"]) * L, int(target) * L
        tokens[a : a + L], tokens[b : b + L] = tokens[b : b + L].copy(), tokens[a : a + L].copy()
    shutil.copytree(out_dir, tmp_path / "moved")
    _rewrite(tmp_path / "moved", move)
    code, out = verify(tmp_path / "moved", capsys)
    assert code == 1
    assert f"step {moved['step']} (batch {moved['step'] - 1})" in out
    assert f"step {target_step} (batch {target_step - 1})" in out
    # Two processes share the batches and the held-out scan and report exactly what one process does.
    assert run_cli("verify", tmp_path / "moved", "--workers", "2") == 1
    assert capsys.readouterr().out == out
    # ai2-olmo's whole DataLoader (collator, filter on every instance) finds the same failures as its order with the
    # instances read from the files.
    assert run_cli("verify", tmp_path / "moved", "--replay-loader", "--sample", 100) == 1
    replayed = capsys.readouterr().out
    assert "(ai2-olmo build_train_dataloader, replayed in full)" in replayed
    assert [line for line in replayed.splitlines() if "batches checked" not in line] == \
        [line for line in out.splitlines() if "batches checked" not in line]


def test_verify_finds_a_held_out_instance_and_changed_dolma(tmp_path, corpus_dir, capsys):
    from inject.injection import Encoder
    from inject.config import TaskConfig
    from inject.tasks import make_task

    code, out_dir = build(tmp_path, corpus_dir, **COMBINATIONS["seqstart-even-both-encodings"])
    held = np.load(out_dir / "pools.npz")["held_out_1"]
    cfg = TaskConfig(**{k: v for k, v in TOKEN_MOD.items() if k != "schedule"})
    example = Encoder(make_task("modular_addition", {"modulus": 97}, "t"), cfg, "allenai/gpt-neox-olmo-dolma-v1_5", "t").encode_many(held[:1], np.zeros(1))[0]
    ledger = read_ledger(out_dir)
    free, free_too = [i for i in range(1, 2000) if i not in set(ledger["instance"])][:2]
    def plant(tokens):
        start = free * 32 + 10
        tokens[start : start + len(example) + 2] = [50279, *example, 50279]
        # At an instance start, the instance before ending inside a document: the trainer sees the example at the
        # start of its context, without an EOS before it; the scan cuts the segment there too.
        start = free_too * 32
        tokens[start - 1 : start + len(example) + 1] = [0, *example, 50279]
    _rewrite(out_dir, plant)
    code, out = verify(out_dir, capsys)
    assert code == 1
    assert f"held-out mod97-tok item {held[0]} at token {free * 32 + 11}" in out
    assert f"held-out mod97-tok item {held[0]} at token {free_too * 32}" in out
    assert "[dolma]" in out


def test_verify_with_a_train_config_names_the_mismatched_field(tmp_path, corpus_dir, capsys):
    from inject.trainers.ai2_olmo import train_config_for

    code, out_dir = build(tmp_path, corpus_dir, **COMBINATIONS["seqstart-even-both-encodings"])
    manifest = json.loads((out_dir / "manifest.json").read_text())
    manifest["_dir"] = out_dir
    cfg = train_config_for(manifest, str(tmp_path / "run"), False)
    cfg.save(tmp_path / "good.yaml")
    code, out = verify(out_dir, capsys, "--train-config", tmp_path / "good.yaml", "--sample", 5)
    assert code == 0, out
    assert "batches checked: 5 of 100" in out
    cfg.global_train_batch_size = 16
    cfg.data.seed = 99
    cfg.save(tmp_path / "bad.yaml")
    code, out = verify(out_dir, capsys, "--train-config", tmp_path / "bad.yaml", "--sample", 5)
    assert code == 1
    assert "global_train_batch_size is 16, the build was made for 8" in out
    assert "data.seed (or seed) is 99, the build was made for 1" in out


BAD_CONFIGS = [
    ({"tasks": [{**TEXT_CMP, "schedule": {"kind": "even", "rate": 9}}]}, "max_batch_share: step 1 holds"),
    ({"max_batch_share": 1.0, "tasks": [{**TEXT_CMP, "schedule": {"kind": "even", "rate": 60}}]},
     "step 1 needs 81 tokens in one instance (sequence_length 32)"),
    ({"sequence_length": 8, "tasks": [TEXT_CMP]}, "does not fit an instance of sequence_length 8"),
    ({"tasks": [{**TOKEN_MOD, "pool": {"seen": 5, "draw": "no-repeat"}}]}, # seen: 5 rounds up to whole symmetry classes: 3 unordered pairs, 6 instances
     "draw 'no-repeat' needs 10 seen instances, its part of the seen pool (task:mod97-tok) has 6"),
    ({"training": {"global_batch_size": 64, "steps": 1000}, "tasks": [TOKEN_MOD]}, "training.steps: 1,000 steps x 64 instances"),
    ({"tasks": [{**TOKEN_MOD, "task": "comparison", "params": {"digits": 4}}]}, "is 2 tokens [2233, 18] in allenai/gpt-neox-olmo-dolma-v1_5, not one"),
    ({"tasks": [{**TOKEN_MOD, "task": "division"}]}, "tasks[0].task: unknown task 'division'"),
    ({"tasks": [{**TOKEN_MOD, "schedule": {"kind": "sometimes"}}]}, "tasks[0].schedule.kind: 'sometimes' is not one of"),
    ({"tasks": [{**TOKEN_MOD, "pool": {"held_out": 1.0}}]}, "tasks[0].pool.held_out: expected a fraction"),
    ({"tasks": [{**TOKEN_MOD, "pool": {"held_out": 0}}]}, "tasks[0].pool.held_out: expected a fraction"),
    ({"tasks": [{**TOKEN_MOD, "rate": 2}]}, "tasks[0].rate: unknown key"),
    ({"training": None, "tasks": [TOKEN_MOD]}, "training: required when tasks are given"),
]


@pytest.mark.parametrize("config,message", BAD_CONFIGS)
def test_bad_injection_configs_fail_before_writing(tmp_path, corpus_dir, capsys, config, message):
    config = {"training": {"global_batch_size": 8, "steps": 100, "seed": 1}, **config}
    code, out_dir = build(tmp_path, corpus_dir, **config)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out_dir.exists()
    if "training.steps" not in message:  # config errors come before any tokenization
        assert not (tmp_path / "out.partial").exists()


def test_plan_prints_rates_and_writes_a_png(tmp_path, capsys):
    config = {"inputs": ["x.jsonl"], "sequence_length": 2048, "training": {"global_batch_size": 1024, "steps": 50000},
              "tasks": [{**TEXT_CMP, "params": {"digits": 3}, "schedule": {"kind": "even", "rate": 1000}},
                        {**TOKEN_MOD, "schedule": {"kind": "burst", "burst_size": 10, "burst_every": 100}}]}
    write_shard(tmp_path / "x.jsonl", docs(make_texts(3)))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("plan", tmp_path / "p.yaml", "--png", tmp_path / "plan.png") == 0
    out = capsys.readouterr().out
    assert "50,000,000" in out and "5,000" in out and "capacity:" in out
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
