"""The trainer seam holds: trainer packages are imported only by the trainer modules (inject/trainers/), and the
inject package imports none of eval/, slurm/, olmo_configs/. Read from the sources with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("inject", "eval", "slurm", "olmo_configs")

TRAINER_PACKAGES = ("olmo", "olmo_core", "hf_olmo")
OUTSIDE_THE_SEAM = {
    "inject/tokenizer.py": "olmo.tokenizer tokenizes text; no training",
    "olmo_configs/worker.py": "the training process ai2_olmo.launch starts",
    "olmo_configs/compat.py": "the worker's Trainer adaptations",
    "olmo_configs/generate.py": "writes the ladder's ai2-olmo TrainConfig YAMLs (python -m olmo_configs.generate)",
}
"""Files outside inject/trainers/ allowed to import a trainer package, and why."""


def imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in a file (relative imports resolved); `top_level_only`: those run when the
    module is imported (not inside a function)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found: list[tuple[int, str]] = []

    class Visitor(ast.NodeVisitor):
        def visit_FunctionDef(self, node):
            if not top_level_only:
                self.generic_visit(node)

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Import(self, node):
            found.extend((node.lineno, alias.name) for alias in node.names)

        def visit_ImportFrom(self, node):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            if node.module:
                found.append((node.lineno, ".".join([*base, node.module])))
            else:
                found.extend((node.lineno, ".".join([*base, alias.name])) for alias in node.names)

    Visitor().visit(ast.parse(path.read_text(), str(path)))
    return found


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def test_only_the_trainer_modules_import_a_trainer_package():
    offenders = []
    for path in sources(*PACKAGES):
        name = path.relative_to(ROOT).as_posix()
        if name.startswith("inject/trainers/") or name in OUTSIDE_THE_SEAM:
            continue
        offenders += [f"{name}:{line} imports {module}" for line, module in imports(path)
                      if module.split(".")[0] in TRAINER_PACKAGES]
    assert not offenders, "reach the trainer through inject.trainers.get(...) instead:\n" + "\n".join(offenders)


def test_nothing_outside_the_ai2_olmo_module_imports_its_training_processes():
    allowed = {"olmo_configs/worker.py", "olmo_configs/compat.py"}
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in sources(*PACKAGES)
                 if p.relative_to(ROOT).as_posix() not in allowed
                 for line, module in imports(p) if module in ("olmo_configs.worker", "olmo_configs.compat")]
    assert not offenders, offenders


def test_the_inject_package_imports_no_eval_slurm_or_olmo_configs():
    """Not even inside a function: each package adds its own verbs to the CLI (the `olmo_inject.verbs` entry points)."""
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in sources("inject")
                 for line, module in imports(p) if module.split(".")[0] in ("eval", "slurm", "olmo_configs")]
    assert not offenders, offenders


@pytest.mark.parametrize("name", ["ai2-olmo", "olmo-core"])
def test_every_trainer_module_implements_the_order_and_verify_part_of_the_interface(name):
    from inject import trainers

    module = trainers.get(name)
    assert module.NAME == name
    for function in ("order", "usable_instances", "file_instances", "order_fields", "loader_batches", "loader_source",
                     "check_train_config"):
        assert callable(getattr(module, function, None)), f"{module.__name__} lacks {function}"


def test_the_build_path_imports_no_trainer_package_and_no_torch():
    """Planning and placing for either trainer needs only numpy: the trainer modules import their packages (and torch)
    inside the functions that need them."""
    import subprocess
    import sys

    code = ("import sys; from inject import trainers; import inject.build, inject.place, inject.verify, inject.cli; "
            "[trainers.get(n) for n in trainers.NAMES]; "
            "print(sorted(m for m in ('olmo', 'olmo_core', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
