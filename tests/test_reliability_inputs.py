"""Inputs and outputs that would corrupt a build are refused before anything is touched; a resumed build
equals a clean one whatever changed in between; environment failures (disk full, a killed parent) give
one clear message and no traceback. Every refusal leaves the inputs byte-identical and nothing that looks
finished."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inject.build import MANIFEST, partial_dir
from conftest import docs, make_texts, run_cli, write_config, write_shard


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file and the target of every link under `folder` (what 'inputs untouched' compares)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_refused(code: int, err: str, out: Path, *fragments: str) -> None:
    assert code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (out / MANIFEST).exists()


def build_cmd(cfg: Path, out: Path, *extra, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "inject.cli", "build", str(cfg), "--out", str(out), *map(str, extra)]
    return subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True)


def outputs(build: Path) -> dict[str, bytes]:
    """Every file of a finished build but the data block (it names the build's own absolute paths)."""
    return {str(p.relative_to(build)): p.read_bytes() for p in sorted(build.rglob("*"))
            if p.is_file() and p.name != "olmo-data.yaml"}


# ---------------------------------------------------------------------------- 1, 2: output vs inputs


@pytest.mark.parametrize("where", ["is", "inside", "holds"])
def test_an_output_folder_that_is_inside_or_holds_an_input_is_refused(tmp_path, corpus, capsys, where):
    folder, _ = corpus
    out = {"is": folder, "inside": folder / "build", "holds": tmp_path}[where]
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], sequence_length=32)
    before = snapshot(tmp_path)
    code = run_cli("build", cfg, "--out", out, "--overwrite")
    assert_refused(code, capsys.readouterr().err, out, str(folder.resolve()), str(out.resolve()))
    assert snapshot(tmp_path) == before  # nothing deleted, nothing written
    assert not partial_dir(out).exists()


def test_an_output_that_is_an_input_file_or_holds_one_by_a_glob_is_refused(tmp_path, corpus, capsys):
    folder, _ = corpus
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder / "*.jsonl")], sequence_length=32)
    before = snapshot(tmp_path)
    code = run_cli("build", cfg, "--out", folder, "--overwrite")
    assert_refused(code, capsys.readouterr().err, folder, str(folder / "c.jsonl"), str(folder))
    code = run_cli("build", cfg, "--out", folder / "c.jsonl", "--overwrite")
    assert_refused(code, capsys.readouterr().err, folder, str(folder / "c.jsonl"))
    assert snapshot(tmp_path) == before


def test_a_previous_build_inside_an_input_folder_is_never_read_as_input(tmp_path, corpus, capsys):
    folder, _ = corpus
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], sequence_length=32)
    assert run_cli("build", cfg, "--out", tmp_path / "first") == 0
    (tmp_path / "first").rename(folder / "old-build")  # e.g. a build moved or made into the corpus folder
    before = snapshot(tmp_path)
    code = run_cli("build", cfg, "--out", tmp_path / "second")
    assert_refused(code, capsys.readouterr().err, tmp_path / "second", str(folder / "old-build"), MANIFEST)
    assert snapshot(tmp_path) == before and not (tmp_path / "second").exists()
    # Its token files, named explicitly, are a legitimate pre-tokenized source.
    cfg = write_config(tmp_path / "t.yaml", inputs=[str(folder / "old-build" / "data" / "*.npy")], sequence_length=32)
    assert run_cli("build", cfg, "--out", tmp_path / "again") == 0


# ---------------------------------------------------------------------------- 3: resume after inputs changed


def test_a_killed_build_resumed_after_its_inputs_changed_equals_a_clean_build(tmp_path, corpus):
    folder, _ = corpus
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], sequence_length=32, instances_per_file=16)
    killed = build_cmd(cfg, tmp_path / "out", "--workers", 2, env={"OLMO_INJECT_CRASH_AFTER_INPUTS": "2"})
    assert killed.returncode == -9 and not (tmp_path / "out").exists()
    # Its two workers, busy with the other two inputs, exit quietly (issue 14); the pipe reaches EOF only
    # when every process that held it, the orphaned workers too, has exited.
    assert "Traceback" not in killed.stderr and "BrokenPipe" not in killed.stderr, killed.stderr
    # While it was down: a new shard that sorts first, and an edit of a shard it had finished.
    finished = [json.loads(m.read_text())["path"] for m in (partial_dir(tmp_path / "out") / ".work").glob("*.done.json")]
    assert len(finished) == 2
    write_shard(folder / "0-new.jsonl", docs(make_texts(30, seed=7), "n"))
    write_shard(Path(finished[0]), docs(make_texts(80, seed=8), "x"))
    resumed = build_cmd(cfg, tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr
    assert run_cli("build", cfg, "--out", tmp_path / "clean") == 0
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["0-new.jsonl", "a.json.gz", "b.jsonl.zst", "c.jsonl", "d.json.zst"]


def test_array_parts_then_the_finishing_build_equal_a_clean_build(tmp_path, corpus):
    folder, _ = corpus
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], sequence_length=32, instances_per_file=16)
    for part in ("1/3", "0/3", "2/3"):
        assert run_cli("build", cfg, "--out", tmp_path / "out", "--part", part) == 0
    work = partial_dir(tmp_path / "out") / ".work"
    assert len(list(work.glob("*.done.json"))) == 4
    assert run_cli("build", cfg, "--out", tmp_path / "out") == 0
    assert run_cli("build", cfg, "--out", tmp_path / "clean") == 0
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")


# ---------------------------------------------------------------------------- 8: links and duplicate paths


def test_the_same_file_reached_twice_is_refused_naming_both_paths(tmp_path, corpus, capsys):
    folder, _ = corpus
    (folder / "z-link.json.gz").symlink_to(folder / "a.json.gz")
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], sequence_length=32)
    before = snapshot(folder)
    code = run_cli("build", cfg, "--out", tmp_path / "out")
    assert_refused(code, capsys.readouterr().err, tmp_path / "out", str(folder / "a.json.gz"), str(folder / "z-link.json.gz"))
    (folder / "z-link.json.gz").unlink()
    cfg = write_config(tmp_path / "b.yaml", inputs=["corpus/c.jsonl", "corpus/../corpus/c.jsonl"], sequence_length=32)
    code = run_cli("build", cfg, "--out", tmp_path / "out")
    assert_refused(code, capsys.readouterr().err, tmp_path / "out", "corpus/c.jsonl", "corpus/../corpus/c.jsonl")
    assert snapshot(folder) == {k: v for k, v in before.items() if "z-link" not in k}
    assert not (tmp_path / "out").exists()


def test_a_dangling_link_in_an_input_folder_is_a_counted_problem_or_fatal_with_strict(tmp_path, corpus, capsys):
    folder, _ = corpus
    (folder / "gone.jsonl").symlink_to(tmp_path / "moved-away.jsonl")
    cfg = write_config(tmp_path / "b.yaml", inputs=[str(folder)], sequence_length=32)
    before = snapshot(tmp_path)
    code = run_cli("build", cfg, "--out", tmp_path / "out", "--strict")
    assert_refused(code, capsys.readouterr().err, tmp_path / "out", str(folder / "gone.jsonl"), "moved-away.jsonl", "--strict")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    assert run_cli("build", cfg, "--out", tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["counts"]["problems_by_kind"] == {"dangling_link": 1}
    listed = [json.loads(l) for l in (tmp_path / "out" / "problems.jsonl").read_text().splitlines()]
    assert [(p["file"], p["kind"]) for p in listed] == [(str(folder / "gone.jsonl"), "dangling_link")]


# ---------------------------------------------------------------------------- 10, 13: config values and YAML


def task_config(tmp_path: Path, schedule: dict | None = None, params: dict | None = None) -> dict:
    write_shard(tmp_path / "in.jsonl", docs(make_texts(20)))
    return {"inputs": ["in.jsonl"], "sequence_length": 32, "training": {"global_batch_size": 4, "steps": 10},
            "tasks": [{"name": "cmp", "task": "comparison", "params": params or {"digits": 2},
                       "schedule": schedule or {"kind": "even", "rate": 1.0}}]}


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), -1.0])
def test_a_rate_that_is_not_a_finite_non_negative_number_is_refused_naming_the_field(tmp_path, capsys, rate):
    cfg = write_config(tmp_path / "b.yaml", **task_config(tmp_path, schedule={"kind": "even", "rate": rate}))
    before = snapshot(tmp_path)
    code = run_cli("build", cfg, "--out", tmp_path / "out")
    assert_refused(code, capsys.readouterr().err, tmp_path / "out", "tasks[0].schedule.rate")
    cfg = write_config(tmp_path / "p.yaml", **task_config(
        tmp_path, schedule={"kind": "piecewise", "pieces": [{"until": 5, "rate": 1.0}, {"until": 10, "rate": rate}]}))
    code = run_cli("build", cfg, "--out", tmp_path / "out")
    assert_refused(code, capsys.readouterr().err, tmp_path / "out", "tasks[0].schedule.pieces[1].rate")
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.endswith("p.yaml")} == before
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_a_task_parameter_of_the_wrong_type_is_refused_naming_it(tmp_path, capsys):
    cfg = write_config(tmp_path / "b.yaml", **task_config(tmp_path, params={"digits": "3"}))
    before = snapshot(tmp_path)
    code = run_cli("build", cfg, "--out", tmp_path / "out")
    assert_refused(code, capsys.readouterr().err, tmp_path / "out", "tasks[0].params.digits", "expected int", "'3'")
    cfg = write_config(tmp_path / "b.yaml", **task_config(tmp_path, params={"digit": 3}))
    code = run_cli("build", cfg, "--out", tmp_path / "out")
    assert_refused(code, capsys.readouterr().err, tmp_path / "out", "tasks[0].params.digit", "unknown key", "digits")
    assert snapshot(tmp_path).keys() == before.keys() and not (tmp_path / "out").exists()


def test_a_key_given_twice_in_yaml_is_refused_naming_it_and_both_lines(tmp_path, capsys):
    write_shard(tmp_path / "in.jsonl", docs(make_texts(20)))
    (tmp_path / "b.yaml").write_text("inputs: [in.jsonl]\nsequence_length: 32\nseed: 1\nsequence_length: 64\n")
    (tmp_path / "t.yaml").write_text("inputs: [in.jsonl]\ntraining:\n  steps: 10\n  global_batch_size: 4\n  steps: 20\n")
    before = snapshot(tmp_path)
    code = run_cli("build", tmp_path / "b.yaml", "--out", tmp_path / "out")
    assert_refused(code, capsys.readouterr().err, tmp_path / "out", "b.yaml", "'sequence_length'", "line 4", "line 2")
    code = run_cli("build", tmp_path / "t.yaml", "--out", tmp_path / "out")
    assert_refused(code, capsys.readouterr().err, tmp_path / "out", "t.yaml", "'steps'", "line 5", "line 3")
    # YAML merge keys stay allowed: a key of the mapping overrides the merged one, as YAML says.
    from inject.configtools import load_yaml

    (tmp_path / "m.yaml").write_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")
    assert load_yaml(tmp_path / "m.yaml")["b"] == {"x": 3, "y": 2}
    assert snapshot(tmp_path).keys() - before.keys() == {str(tmp_path / "m.yaml")}
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- 12: disk full


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB filesystem (tmpfs), so that writing a build really fails with ENOSPC. Needs root (the
    tests run as root in CI): a mount that is refused fails the test with the reason, it is not skipped.
    RLIMIT_FSIZE would give EFBIG, not a full disk; /dev/full would not be a folder."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"this test mounts a 256 KiB tmpfs and needs root with CAP_SYS_ADMIN: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_names_the_folder_and_the_space_needed(tmp_path, small_disk, capsys):
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 50000, size=300_000).astype(np.uint16)  # 600 KB: more than the disk holds
    tokens[::100] = 50279  # EOS: documents of 100 tokens
    tokens[-1] = 50279
    tokens.tofile(tmp_path / "tokens.npy")
    cfg = write_config(tmp_path / "b.yaml", inputs=["tokens.npy"], sequence_length=32, instances_per_file=64)
    before = snapshot(tmp_path)
    out = small_disk / "out"
    code = run_cli("build", cfg, "--out", out)
    err = capsys.readouterr().err
    assert_refused(code, err, out, str(partial_dir(out)), "No space left on device", "needs about 0.6 MB")
    assert not out.exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if "small-disk" not in k} == before
    # Any other error writing the build names the file too (root ignores permissions: a read-only mount).
    # The first file a build creates is its lock beside OUT, so that is the file named.
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code = run_cli("build", cfg, "--out", out)
    err = capsys.readouterr().err
    assert_refused(code, err, out, f"{out}.lock: cannot create", f"the build output {out}", "Read-only file system")
    assert not out.exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if "small-disk" not in k} == before


# ---------------------------------------------------------------------------- 15: damaged gzip after good lines


def test_a_damaged_gzip_names_the_last_good_line(tmp_path, capsys):
    good = b"".join((json.dumps(d) + "\n").encode() for d in docs(make_texts(300)))
    damaged = bytearray(gzip.compress(b"".join((json.dumps(d) + "\n").encode() for d in docs(make_texts(50, seed=1))), mtime=0))
    damaged[40:60] = b"\xff" * 20
    # Two gzip members (as concatenated shards, pigz or bgzip write): 300 good lines, then damage.
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(good, mtime=0) + bytes(damaged))
    cfg = write_config(tmp_path / "b.yaml", inputs=["in.jsonl.gz"], sequence_length=32)
    before = snapshot(tmp_path)
    code = run_cli("build", cfg, "--out", tmp_path / "out")
    assert_refused(code, capsys.readouterr().err, tmp_path / "out", "in.jsonl.gz", "corrupt or truncated gzip stream after line 300:")
    # One member damaged near its end: the lines decoded before the damage are counted, not 0.
    single = bytearray(gzip.compress(good, mtime=0))
    single[-300:-280] = b"\xff" * 20
    (tmp_path / "in.jsonl.gz").write_bytes(bytes(single))
    before = snapshot(tmp_path)
    code = run_cli("build", cfg, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert_refused(code, err, tmp_path / "out", "in.jsonl.gz", "corrupt or truncated gzip")
    assert 0 < int(re.search(r"after line (\d+)", err).group(1)) < 300, err
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
