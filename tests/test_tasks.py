"""Tasks, pools, schedules: small exact properties, and a third task added as one class + a config entry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import numpy as np
import pytest
import yaml

from conftest import docs, make_texts, run_cli, write_shard
from inject.config import PoolConfig, ScheduleConfig
from inject.injection import even_counts, schedule_counts, split_pool
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


@pytest.mark.parametrize("pool", [PoolConfig(held_out=0.2), PoolConfig(held_out=30, seen=100, seed=5)])
def test_pools_are_disjoint_deterministic_and_sized(pool):
    task = ModularAddition(23)
    seen, held = split_pool(task, {"modulus": 23}, pool, "t")
    again = split_pool(task, {"modulus": 23}, pool, "t")
    assert np.array_equal(seen, again[0]) and np.array_equal(held, again[1])
    assert not set(seen) & set(held)
    assert len(held) == (round(0.2 * 529) if isinstance(pool.held_out, float) else 30)
    assert len(seen) == (529 - len(held) if pool.seen is None else 100)


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
    assert "verify: OK" in out and "batches checked: 600 of 600" in out
    assert (tmp_path / "demo" / "plan.png").exists() and (tmp_path / "demo" / "build" / "ledger.npy").exists()
    assert (tmp_path / "demo" / "run-tiny" / "step20-unsharded" / "model.pt").exists()


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
    from inject.place import instance_filter_masks, may_be_filtered

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
