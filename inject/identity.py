"""What binds a run (and a results folder) to the build it trained on (was scored on).

A build's identity is its manifest's sha256: the manifest records the config, the inputs' and outputs'
hashes and the whole injection plan, so two builds with the same manifest hold the same tokens and the
same examples at the same steps. `olmo-inject train` writes it to RUN/build.json before the first step;
a resume refuses a build with another manifest (one rebuilt with `--overwrite`, say), and `eval`,
`analyze` and `report` refuse a build that is not the run's. The path is kept for messages only: a build
moved or copied elsewhere is still the same build.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from .errors import InjectError

RECORD = "build.json"


def build_identity(build_dir: Path) -> dict:
    """The build's path, manifest sha256, config echo and a hash of each other manifest section."""
    from .build import MANIFEST, load_manifest

    manifest = load_manifest(build_dir)
    data = (Path(build_dir) / MANIFEST).read_bytes()
    return {"path": str(Path(build_dir).resolve()), "manifest_sha256": hashlib.sha256(data).hexdigest(),
            "config": manifest.get("config"),
            "sections_sha256": {key: _hash(value) for key, value in sorted(manifest.items()) if key != "config"}}


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InjectError(f"{path}: not a build record ({e}); it names the build this folder was made with") from None


def write_record(folder: Path, identity: dict) -> None:
    path = Path(folder) / RECORD
    tmp = path.with_name(f"{RECORD}.{os.getpid()}.tmp")  # the launchers of a multi-node run write it at once
    tmp.write_text(json.dumps(identity, indent=2) + "\n")
    tmp.replace(path)


def difference(recorded: dict, current: dict) -> str:
    """What differs between two identities, in words: both hashes and the first differing field."""
    hashes = f"manifest sha256 {recorded['manifest_sha256'][:12]} vs {current['manifest_sha256'][:12]}"
    if recorded.get("config") != current.get("config"):
        return f"{hashes}; config.{_first_difference(recorded.get('config'), current.get('config'))}"
    old, new = recorded.get("sections_sha256", {}), current.get("sections_sha256", {})
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"{hashes}; differing manifest sections: {', '.join(changed) or 'none recorded'}"


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _first_difference(a, b, f"{prefix}{i}.")
    return f"{prefix.rstrip('.')}: {_short(old)} -> {_short(new)}"


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def same_build(recorded: dict, current: dict) -> bool:
    return recorded["manifest_sha256"] == current["manifest_sha256"]


def bind_run(run_dir: Path, build_dir: Path) -> None:
    """Record the build in a new run; refuse to resume a run on another build than the one it started on."""
    current = build_identity(build_dir)
    recorded = read_record(run_dir)
    if recorded is None:
        if any(Path(run_dir).glob("step*")):
            warn(f"{run_dir} has checkpoints but no {RECORD} (trained before runs recorded their build): "
                 f"recording {build_dir} now; that it is the build of the earlier steps cannot be checked")
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_record(run_dir, current)
    elif not same_build(recorded, current):
        raise InjectError(f"{run_dir}: this run started on the build {recorded['path']}, and {build_dir} is another "
                          f"one ({difference(recorded, current)}); resuming on it would mix two datasets. "
                          f"Train into a new run folder, or restore the run's build")


def check_run_build(run_dir: Path, build_dir: Path) -> dict:
    """The identity of `build_dir` after checking that the run in `run_dir` trained on it: refuses another
    build; a run without a record (older runs, checkpoints from elsewhere) is accepted with a warning."""
    current = build_identity(build_dir)
    recorded = read_record(run_dir)
    if recorded is None:
        warn(f"{run_dir} has no {RECORD} (a run from before runs recorded their build, or checkpoints from "
             f"elsewhere): cannot check that {build_dir} is the build it trained on")
    elif not same_build(recorded, current):
        raise InjectError(f"{run_dir} trained on the build {recorded['path']}, not on {build_dir} "
                          f"({difference(recorded, current)}); pass --data {recorded['path']}")
    return current


def warn(message: str) -> None:
    print(f"olmo-inject: warning: {message}", file=sys.stderr)
