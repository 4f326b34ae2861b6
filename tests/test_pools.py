"""Seen/held-out pools: whole symmetry classes, disjoint parts for tasks on one space, huge spaces in small memory."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pytest
import yaml

from conftest import docs, make_texts, run_cli, write_shard
from inject.config import BuildConfig
from inject.configtools import from_dict
from inject.errors import ConfigError
from inject.injection import make_plan, make_specs
from inject.ledger import read_ledger
from inject.tasks import Comparison


def config_of(tasks: list[dict], steps: int = 200) -> BuildConfig:
    return from_dict(BuildConfig, {"inputs": ["unused.jsonl"], "sequence_length": 256, "max_batch_share": 1.0,
                                   "training": {"global_batch_size": 16, "steps": steps}, "tasks": tasks}).validate()


def injected(plan, spec) -> np.ndarray:
    return plan.item[plan.spec == spec.index]


MOD23 = {"task": "modular_addition", "params": {"modulus": 23}, "encoding": "tokens"}


def test_tasks_on_one_space_draw_disjoint_classes_unless_they_share():
    tasks = [{**MOD23, "name": "a", "schedule": {"kind": "even", "rate": 3}},
             {**MOD23, "name": "b", "encoding": "text", "params": {"modulus": 23, "operands": 2},  # same space, spelled out
              "schedule": {"kind": "burst", "burst_size": 5, "burst_every": 10}},
             {**MOD23, "name": "c", "pool": {"share": "g"}, "schedule": {"kind": "even", "rate": 1}},
             {**MOD23, "name": "d", "pool": {"share": "g", "draw": "uniform"}, "schedule": {"kind": "even", "rate": 1}},
             {"name": "other", "task": "comparison", "params": {"digits": 1}, "schedule": {"kind": "even", "rate": 1}}]
    specs = make_specs(config_of(tasks))
    plan = make_plan(config_of(tasks), specs)
    a, b, c, d, other = specs
    task = a.task
    assert {s.space for s in (a, b, c, d)} == {"modular_addition(modulus=23, operands=2)"} != other.space
    assert all(np.array_equal(s.held_out, a.held_out) for s in (b, c, d))  # one held-out pool per space
    assert [a.pool.parts[s.part] for s in (a, b, c, d)] == ["task:a", "task:b", "share:g", "share:g"]
    assert a.seen_size + b.seen_size + c.seen_size + len(a.held_out) == task.space_size()
    classes = {s.name: set(task.class_of(injected(plan, s)).tolist()) for s in specs[:4]}
    held_classes = set(task.class_of(a.held_out).tolist())
    # Disjoint draws: no class (so no instance, nor its twin) is injected by two tasks that do not share.
    assert not classes["a"] & classes["b"] and not (classes["a"] | classes["b"]) & (classes["c"] | classes["d"])
    assert classes["c"] & classes["d"]  # sharing was asked for: the same instances
    # Each draws only inside its part; no held-out class member is injected by any of them.
    for s in (a, b, c, d):
        assert set(injected(plan, s).tolist()) <= set(s.first_seen(s.seen_size).tolist())
        assert not classes[s.name] & held_classes
    # cycle: a part smaller than the examples is covered whole, each instance as often as any other (+-1).
    counts = np.unique(injected(plan, a), return_counts=True)[1]
    assert len(counts) == a.seen_size and counts.max() - counts.min() <= 1


def test_an_ordered_split_splits_instances_and_twins_fall_on_both_sides():
    tasks = [{**MOD23, "name": "a", "pool": {"split": "ordered"}, "schedule": {"kind": "even", "rate": 3}}]
    (a,) = make_specs(config_of(tasks))
    held, seen = a.held_out, a.first_seen(a.seen_size)
    assert len(held) == round(0.1 * 529) and len(seen) == 529 - len(held) and not set(held) & set(seen)
    assert set(a.task.class_of(held).tolist()) & set(a.task.class_of(seen).tolist())  # twins on both sides


def test_tasks_on_one_space_must_agree_on_its_split():
    tasks = [{**MOD23, "name": "a", "schedule": {"kind": "even", "rate": 1}},
             {**MOD23, "name": "b", "pool": {"split": "ordered"}, "schedule": {"kind": "even", "rate": 1}}]
    with pytest.raises(ConfigError, match=r"tasks\[1\].pool.split: b and a are both on modular_addition\(modulus=23"):
        make_specs(config_of(tasks))


CMP1 = {"task": "comparison", "params": {"digits": 1}, "pool": {"held_out": 10}}


@pytest.fixture(scope="module")
def shared_build(tmp_path_factory):
    """Two comparison tasks on one 90-instance space (45 unordered pairs), each example injected once."""
    folder = tmp_path_factory.mktemp("pools")
    write_shard(folder / "c.jsonl", docs(make_texts(1500)))
    config = {"inputs": ["c.jsonl"], "sequence_length": 32, "training": {"global_batch_size": 8, "steps": 50},
              "tasks": [{**CMP1, "name": "cmp-a", "schedule": {"kind": "even", "rate": 0.6}},
                        {**CMP1, "name": "cmp-b", "encoding": "tokens", "schedule": {"kind": "even", "rate": 0.6}}]}
    (folder / "b.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", folder / "b.yaml", "--out", folder / "build") == 0
    config["tasks"] = [{**t, "pool": {**t["pool"], "split": "ordered"}} for t in config["tasks"]]
    (folder / "o.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("build", folder / "o.yaml", "--out", folder / "ordered") == 0
    return folder


def test_a_shared_space_build_records_its_space_and_verifies(shared_build, capsys):
    build = shared_build / "build"
    tasks = json.loads((build / "manifest.json").read_text())["injection"]["tasks"]
    assert [t["space"] for t in tasks] == ["comparison(digits=1)"] * 2
    assert [t["split"] for t in tasks] == ["symmetric"] * 2 and [t["seen_part"] for t in tasks] == ["task:cmp-a", "task:cmp-b"]
    assert tasks[0]["seen_size"] + tasks[1]["seen_size"] + tasks[0]["held_out_size"] == 90 and tasks[0]["held_out_size"] == 10
    pools, ledger, task = np.load(build / "pools.npz"), read_ledger(build), Comparison(1)
    assert np.array_equal(pools["held_out_0"], pools["held_out_1"])
    by_task = [set(task.class_of(ledger["item"][ledger["spec"] == s]).tolist()) for s in (0, 1)]
    assert by_task[0] and by_task[1] and not by_task[0] & by_task[1]
    assert not (by_task[0] | by_task[1]) & set(task.class_of(pools["held_out_0"]).tolist())
    assert run_cli("verify", build) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out and "injected instances with a held-out twin: 0 under split: symmetric" in out


def test_verify_fails_naming_an_injected_instance_whose_twin_is_held_out(shared_build, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(shared_build / "build", tampered)
    ledger, task = read_ledger(tampered), Comparison(1)
    row = ledger[ledger["spec"] == 0][0]
    item = int(row["item"])
    _, members = task.class_members(task.class_of([item]))
    twin = int(members[members != item][0])
    pools = dict(np.load(tampered / "pools.npz"))
    for key in ("held_out_0", "held_out_1"):  # the twin moves from the seen pool to the held-out pool
        pools[key] = np.sort(np.append(pools[key], twin))
    pools["seen_0"] = pools["seen_0"][pools["seen_0"] != twin]
    np.savez(tampered / "pools.npz", **pools)
    assert run_cli("verify", tampered) == 1
    out = capsys.readouterr().out
    a, b = task.instance(item)
    assert f"cmp-a: injected ({a}, {b}) at step {int(row['step'])}, whose twin ({b}, {a}) is held out" in out
    # the scan of the token files finds it too (a ledger example, matched token for token where the ledger puts it)
    assert f"cmp-a item {item} ({a}, {b}) at token " in out and f", whose twin ({b}, {a}) is held out" in out
    assert "verify: FAILED" in out


def test_an_ordered_build_reports_held_out_twins_as_allowed(shared_build, capsys):
    build = shared_build / "ordered"
    tasks = json.loads((build / "manifest.json").read_text())["injection"]["tasks"]
    assert [t["split"] for t in tasks] == ["ordered"] * 2
    pools, ledger, task = np.load(build / "pools.npz"), read_ledger(build), Comparison(1)
    twins = set(task.class_of(ledger["item"]).tolist()) & set(task.class_of(pools["held_out_0"]).tolist())
    assert twins  # by design: (b, a) injected while (a, b) is held out
    assert run_cli("verify", build) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out and "under split: ordered (allowed by design)" in out


# ---------------------------------------------------------------------------- huge spaces


def peak_memory(function) -> int:
    """Peak bytes allocated (numpy included) while running `function`."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_spaces_are_split_and_drawn_without_materializing_them():
    tasks = [{"name": "c5-a", "task": "comparison", "params": {"digits": 5}, "pool": {"held_out": 1000},
              "schedule": {"kind": "even", "rate": 2}},
             {"name": "c5-b", "task": "comparison", "params": {"digits": 5}, "pool": {"held_out": 1000, "draw": "uniform"},
              "schedule": {"kind": "even", "rate": 2}},
             {"name": "m70k", "task": "modular_addition", "params": {"modulus": 70000}, "pool": {"held_out": 5000},
              "schedule": {"kind": "even", "rate": 1}},
             {"name": "m70k-b", "task": "modular_addition", "params": {"modulus": 70000}, "pool": {"held_out": 5000},
              "schedule": {"kind": "even", "rate": 1}},
             {"name": "c9", "task": "comparison", "params": {"digits": 9}, "pool": {"held_out": 100, "seen": 0.5},
              "schedule": {"kind": "even", "rate": 1}}]
    config, result = config_of(tasks, steps=100), {}
    peak = peak_memory(lambda: result.update(plan=make_plan(config, make_specs(config))))
    assert peak < 64 << 20  # the spaces hold 8.1e9, 4.9e9 and 8.1e17 instances
    a, b, m, m2, c9 = result["plan"].specs
    assert a.seen_size + b.seen_size == 90000 * 89999 - 1000 and len(a.held_out) == 1000
    assert m.seen_size + m2.seen_size + len(m.held_out) == 70000**2 and len(m.held_out) == 5000
    assert c9.seen_size == round(0.5 * c9.task.space_size())  # comparison classes are pairs: an even count
    for x, y in ((a, b), (m, m2)):
        drawn = [set(x.task.class_of(injected(result["plan"], s)).tolist()) for s in (x, y)]
        assert not drawn[0] & drawn[1] and not (drawn[0] | drawn[1]) & set(x.task.class_of(x.held_out).tolist())


def test_plan_of_a_five_digit_comparison_with_a_held_out_count(tmp_path, capsys):
    config = {"inputs": ["c.jsonl"], "training": {"global_batch_size": 8, "steps": 10},
              "tasks": [{"name": "c5", "task": "comparison", "params": {"digits": 5}, "pool": {"held_out": 1000},
                         "schedule": {"kind": "even", "rate": 1}}]}
    write_shard(tmp_path / "c.jsonl", docs(make_texts(3)))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("plan", tmp_path / "p.yaml") == 0  # first: imports and the tokenizer load, not the plan's cost
    capsys.readouterr()
    codes = []
    assert peak_memory(lambda: codes.append(run_cli("plan", tmp_path / "p.yaml"))) < 64 << 20 and codes == [0]
    assert f"{90000 * 89999 - 1000:,}" in capsys.readouterr().out  # the seen pool: every pair not held out


@pytest.mark.parametrize("task,message", [
    ({"task": "comparison", "params": {"digits": 5}},
     "tasks[0].pool.held_out: 0.1 of comparison, 5 digits is 809,991,000 instances; a held-out pool is recorded whole"),
    ({"task": "modular_addition", "params": {"modulus": 70000}, "encoding": "tokens"},
     "tasks[0].number_tokens: ' 558' is 2 tokens"),
    ({"task": "modular_addition", "params": {"modulus": 70000}, "encoding": "tokens", "number_tokens": "offset"},
     "tasks[0].number_tokens: the number/label token ids must be distinct, inside the vocabulary"),
    ({"task": "modular_addition", "params": {"modulus": 1000, "operands": 3}, "pool": {"held_out": 100}},
     "tasks[0].pool: sizing this pool would count more than"),
    ({"task": "modular_addition", "params": {"modulus": 1 << 21, "operands": 3}},
     "tasks[0].params: modular addition, 3 operands mod 2097152 has 9,223,372,036,854,775,808 instances"),
])
def test_huge_spaces_are_refused_early_naming_the_field(tmp_path, capsys, task, message):
    second = {"name": "b", **task, "schedule": {"kind": "even", "rate": 1}}  # two tasks: the seen pool is dealt in parts
    config = {"inputs": ["c.jsonl"], "training": {"global_batch_size": 8, "steps": 10},
              "tasks": [{"name": "a", **task, "schedule": {"kind": "even", "rate": 1}}, second]}
    write_shard(tmp_path / "c.jsonl", docs(make_texts(3)))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    codes = []
    peak = peak_memory(lambda: codes.append(run_cli("plan", tmp_path / "p.yaml")))
    assert codes == [2] and peak < 64 << 20
    assert message in capsys.readouterr().err


def test_plan_rows_by_block_are_the_draws_of_each_task_in_order(monkeypatch):
    """The compact plan (counts + draws, rows laid out a block of steps at a time) gives every example what
    drawing the whole run at once gives: items by draw_items, templates by one rng.integers call after them,
    in (step, task) order, with the tokens each (item, template) encodes to."""
    import inject.injection as injection

    monkeypatch.setattr(injection, "DRAW_CHUNK", 7)  # template draws in many chunks: equal to one call
    tasks = [{"name": "c", "task": "comparison", "params": {"digits": 1},
              "templates": ["{a} or {b}? {answer}", "max {a} {b} {answer}", "{a},{b}: {answer}"],
              "schedule": {"kind": "poisson", "rate": 20}},
             {**MOD23, "name": "u", "pool": {"draw": "uniform"}, "templates": None, "schedule": {"kind": "even", "rate": 3.5}},
             {**MOD23, "name": "t", "encoding": "text", "templates": ["{a} + {b} = {answer}", "{a} plus {b} is {answer}"],
              "pool": {"draw": "uniform"}, "schedule": {"kind": "bernoulli", "rate": 0.7}}]
    config = config_of(tasks, steps=50)
    specs = make_specs(config)
    plan = make_plan(config, specs)
    rows = [r for _, r in plan.blocks(steps_per_block=3)]
    for s in specs:
        n = int(s.counts.sum())
        rng = np.random.default_rng([config.seed, injection._stable_seed("draws", s.name)])
        items = injection.draw_items(config, s, n, rng)
        templates = rng.integers(0, len(s.encoder.templates), n)
        got = [(int(r.item[i]), int(r.template[i]), r.tokens_of(i).tolist(), int(r.length[i]))
               for r in rows for i in np.flatnonzero(r.spec == s.index)]
        expected = [(int(i), int(t), e.tolist(), len(e) + 1)
                    for i, t, e in zip(items, templates, s.encoder.encode_many(items, templates))]
        assert got == expected and len(got) == n
    assert [int(r.step.min()) for r in rows if r.examples][:2] == [1, 4]


def test_vectorized_instances_are_the_tasks_instances():
    from inject.tasks import ModularAddition

    for task in (Comparison(1), Comparison(3), ModularAddition(7, 3), ModularAddition(113)):
        items = np.unique(np.r_[np.arange(min(task.space_size(), 3000)),
                                np.random.default_rng(0).integers(0, task.space_size(), 3000)])
        assert task.instances(items) == [task.instance(i) for i in items.tolist()]
