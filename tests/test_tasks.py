"""Tasks, pools, schedules: small exact properties, and a third task added as one class + a config entry."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import numpy as np
import pytest
import yaml

from conftest import docs, make_texts, run_cli, write_shard
from inject.config import PoolConfig, ScheduleConfig
from inject.injection import Shuffle, even_counts, schedule_counts, split_pool
from inject.tasks import Comparison, ModularAddition, Task, register, render_text


@pytest.mark.parametrize("task", [Comparison(1), Comparison(2), ModularAddition(7, 2), ModularAddition(5, 3)])
def test_instance_index_is_a_bijection_with_right_answers(task):
    instances = [task.instance(i) for i in range(task.space_size())]
    assert len(set(instances)) == task.space_size()
    assert all(task.index(x) == i for i, x in enumerate(instances))
    for x in instances[:200]:
        answer = task.candidates(x)[task.answer(x)]
        assert int(answer) == (max(x) if isinstance(task, Comparison) else sum(x) % task.modulus)


def test_render_splits_prompt_and_answer_at_the_space():
    assert render_text(ModularAddition(113), (12, 85), "{a} + {b} mod {p} = {answer}") == ("12 + 85 mod 113 =", " 97")
    assert render_text(Comparison(2), (31, 47), "Which is larger, {a} or {b}? {answer}") == ("Which is larger, 31 or 47?", " 47")


TASKS_WITH_SYMMETRIES = [Comparison(1), Comparison(2), ModularAddition(7, 2), ModularAddition(5, 3), ModularAddition(2, 8),
                         ModularAddition(3, 4), ModularAddition(13, 3)]


@pytest.mark.parametrize("task", TASKS_WITH_SYMMETRIES, ids=str)
def test_symmetry_classes_partition_the_space_into_twins(task):
    n, classes = task.space_size(), task.class_count()
    of = task.class_of(np.arange(n))
    assert sorted(set(of.tolist())) == list(range(classes))
    owners, members = task.class_members(np.arange(classes))
    assert sorted(members.tolist()) == list(range(n))  # every instance in exactly one class
    assert np.array_equal(of[members], owners)
    sizes = task.class_sizes(np.arange(classes))
    assert np.array_equal(np.bincount(owners, minlength=classes), sizes) and sizes.max() == task.max_class_size
    for i in range(0, n, max(1, n // 60)):  # a class is exactly the instances with the same canonical form
        x = task.instance(i)
        twins = {task.instance(int(m)) for m in members[owners == of[i]]}
        assert twins == set(itertools.permutations(x)) and {task.canonical(t) for t in twins} == {task.canonical(x)}
    listed = task.irregular_classes()
    if listed is not None:
        assert sorted(listed[0].tolist()) == np.flatnonzero(sizes < task.max_class_size).tolist()
        assert np.array_equal(sizes[listed[0]], listed[1])


def test_symmetries_of_huge_spaces_are_computed_without_listing_them():
    for task in [Comparison(9), ModularAddition(2**31 - 1, 2), ModularAddition(1_600_000, 3)]:
        items = np.array([0, task.space_size() - 1, task.space_size() // 3])
        owners, members = task.class_members(task.class_of(items))
        for k, item in enumerate(items):
            twins = {task.instance(int(m)) for m in members[owners == k]}
            assert task.instance(int(item)) in twins and len({task.canonical(t) for t in twins}) == 1
    assert Comparison(9).class_count() == 900_000_000 * 899_999_999 // 2


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_shuffle_is_a_keyed_bijection_with_its_inverse(n):
    shuffle = Shuffle(n, [0, 1])
    ranks = shuffle.rank(np.arange(n))
    assert sorted(ranks.tolist()) == list(range(n))
    assert np.array_equal(shuffle.at(ranks), np.arange(n))
    if n > 64:
        assert not np.array_equal(ranks, Shuffle(n, [0, 2]).rank(np.arange(n)))
    huge = Shuffle(1 << 61, [3])
    x = np.array([0, 1, (1 << 61) - 1, 12345678987654321])
    assert np.array_equal(huge.at(huge.rank(x)), x) and (huge.rank(x) < 1 << 61).all()


@pytest.mark.parametrize("pool", [PoolConfig(held_out=0.2), PoolConfig(held_out=30, seen=100, seed=5),
                                  PoolConfig(held_out=0.2, split="ordered"), PoolConfig(held_out=30, seen=100, seed=5, split="ordered")])
@pytest.mark.parametrize("task", [ModularAddition(23), ModularAddition(7, 3), Comparison(2)], ids=str)
def test_pools_are_disjoint_deterministic_sized_and_whole_classes(pool, task):
    seen, held = split_pool(task, {}, pool, "t")
    again = split_pool(task, {}, pool, "t")
    assert np.array_equal(seen, again[0]) and np.array_equal(held, again[1])
    space = task.space_size()
    held_target = round(0.2 * space) if isinstance(pool.held_out, float) else 30
    if pool.split == "ordered":  # single instances: exact sizes, twins may fall on both sides
        assert not set(seen) & set(held)
        assert len(held) == held_target and len(seen) == (space - held_target if pool.seen is None else 100)
        return
    # Whole classes: a pool exceeds its request by less than one class; no class has members on both sides.
    assert held_target <= len(held) < held_target + task.max_class_size
    if pool.seen is None:
        assert len(seen) + len(held) == space
    else:
        assert 100 <= len(seen) < 100 + task.max_class_size
    seen_classes, held_classes = set(task.class_of(seen).tolist()), set(task.class_of(held).tolist())
    assert not seen_classes & held_classes
    for classes, pool_items in ((held_classes, held), (seen_classes, seen)):
        _, members = task.class_members(np.array(sorted(classes)))
        assert sorted(members.tolist()) == sorted(pool_items.tolist())


@pytest.mark.parametrize("rate,steps", [(0.1, 1000), (1000, 50), (2.5, 7), (1 / 3, 300)])
def test_even_counts_are_exact(rate, steps):
    counts, _ = even_counts(rate, steps)
    r = Fraction(rate).limit_denominator(10**6)
    assert all(counts.cumsum()[t - 1] == (r * t) // 1 for t in range(1, steps + 1))
    assert counts.max() - counts.min() <= 1


def test_burst_has_the_mean_rate_of_even_with_longer_gaps():
    burst = schedule_counts(ScheduleConfig(kind="burst", burst_size=10, burst_every=100), 1000, np.random.default_rng(0))
    even = schedule_counts(ScheduleConfig(kind="even", rate=0.1), 1000, np.random.default_rng(0))
    assert burst.sum() == even.sum() == 100
    assert np.diff(np.flatnonzero(burst)).min() == 100 and np.diff(np.flatnonzero(even)).max() == 10
    window = schedule_counts(ScheduleConfig(kind="window", rate=2, start=11, stop=20), 30, np.random.default_rng(0))
    assert window.sum() == 20 and set(np.flatnonzero(window) + 1) == set(range(11, 21))


@register("parity")
@dataclass(frozen=True)
class Parity(Task):
    """A toy third task: is a number even or odd."""

    bits: int = 6
    default_templates: ClassVar[list[str]] = ["{a} is {answer}"]
    label_names: ClassVar[list[str]] = ["even", "odd"]

    def space_size(self):
        return 2**self.bits

    def instance(self, index):
        return (int(index),)

    def index(self, instance):
        return instance[0] if len(instance) == 1 and 0 <= instance[0] < 2**self.bits else None

    def answer(self, instance):
        return instance[0] % 2

    def candidates(self, instance):
        return ["even", "odd"]

    def numbers(self):
        return range(2**self.bits)


def test_a_third_task_is_one_class_and_a_config_entry(tmp_path, capsys):
    write_shard(tmp_path / "c.jsonl", docs(make_texts(1500)))
    config = {"inputs": ["c.jsonl"], "sequence_length": 32, "training": {"global_batch_size": 8, "steps": 50},
              "tasks": [{"name": "parity-text", "task": "parity", "schedule": {"kind": "even", "rate": 2}},
                        {"name": "parity-tok", "task": "parity", "encoding": "tokens", "schedule": {"kind": "even", "rate": 0.5}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", tmp_path / "p.yaml", "--out", tmp_path / "out") == 0
    assert run_cli("verify", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out and "task examples found in the token files: 125 (ledger: 125)" in out


def test_olmo_repetition_filter_is_detected(tmp_path, capsys):
    write_shard(tmp_path / "c.jsonl", docs(make_texts(1500)))
    # One seen instance, 40 copies in each of the 10 instances: "EOS a b label" repeats 40 times with period 4.
    config = {"inputs": ["c.jsonl"], "sequence_length": 256, "max_batch_share": 1.0,
              "training": {"global_batch_size": 2, "steps": 5},
              "tasks": [{"name": "rep", "task": "modular_addition", "params": {"modulus": 7}, "encoding": "tokens",
                         "pool": {"seen": 1, "held_out": 1}, "schedule": {"kind": "even", "rate": 80}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", tmp_path / "p.yaml", "--out", tmp_path / "out") == 2
    assert "OLMo's repetition filter would mask 10 instance(s)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    config["instance_filter"] = "warn"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", tmp_path / "p.yaml", "--out", tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["injection"]["totals"]["instances_masked_by_olmo_filter"] == 10
    assert run_cli("verify", tmp_path / "out") == 1
    assert "[filter]" in capsys.readouterr().out
    config["tasks"][0]["schedule"]["rate"] = 10  # 10 repeats: below OLMo's 32
    config["instance_filter"] = "refuse"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", tmp_path / "p.yaml", "--out", tmp_path / "out2") == 0


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert run_cli("demo", "--workdir", tmp_path / "demo") == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out and "batches checked: 100 of 100" in out
    assert (tmp_path / "demo" / "plan.png").exists() and (tmp_path / "demo" / "build" / "ledger.npy").exists()
    assert (tmp_path / "demo" / "run-tiny" / "step10-unsharded" / "model.pt").exists()
    rows = [json.loads(line) for line in (tmp_path / "demo" / "run-tiny" / "eval" / "step10.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"seen", "pending", "held_out"}  # seen: only instances trained on by step 10
    assert all(r["exposures"] >= 1 and r["first_exposure"] <= 10 for r in rows if r["split"] == "seen")
    assert all(r["exposures"] == 0 and r["first_exposure"] > 10 for r in rows if r["split"] == "pending")


def test_examples_move_out_of_instances_whose_own_text_the_filter_masks(tmp_path, capsys):
    from olmo.config import InstanceFilterConfig
    from olmo.data import MemMapDataset

    texts = make_texts(600)
    texts = [t if i % 3 else "la " * 60 for i, t in enumerate(texts)]  # a third of the text repeats itself
    write_shard(tmp_path / "c.jsonl", docs(texts))
    config = {"inputs": ["c.jsonl"], "sequence_length": 64, "training": {"global_batch_size": 8, "steps": 40},
              "tasks": [{"name": "m", "task": "modular_addition", "params": {"modulus": 11}, "encoding": "tokens",
                         "schedule": {"kind": "even", "rate": 3}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", tmp_path / "p.yaml", "--out", tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["injection"]["totals"]["instances_masked_by_olmo_filter"] == 0
    dataset = MemMapDataset(*[str(tmp_path / "out" / f["path"]) for f in manifest["outputs"]], chunk_size=64,
                            instance_filter_config=InstanceFilterConfig())
    masked = [i for i in range(len(dataset)) if not dataset[i]["instance_mask"]]
    assert len(masked) > len(dataset) // 5  # the corpus really trips the filter often
    from inject.ledger import read_ledger

    assert not set(read_ledger(tmp_path / "out")["instance"].tolist()) & set(masked)
    assert run_cli("verify", tmp_path / "out") == 0


def test_the_vectorized_filter_precheck_never_misses_what_olmo_masks():
    from inject.place import may_be_filtered
    from inject.trainers.ai2_olmo import instance_filter_masks

    rng = np.random.default_rng(0)
    rows = rng.integers(0, 50, (1500, 256))
    for row in rows[::2]:  # half of them with a repeated pattern of random period and count around 32
        period, times = rng.integers(1, 14), rng.integers(25, 40)
        start = rng.integers(0, max(1, 256 - period * times))
        span = row[start : start + period * times]
        span[:] = np.tile(rng.integers(0, 50, period), times)[: len(span)]
    truth = np.array([instance_filter_masks(r) for r in rows])
    possible = may_be_filtered(rows)
    assert truth.sum() > 100 and not (truth & ~possible).any()
    assert possible.sum() < 2 * truth.sum()  # and it spares most of OLMo's slower check
