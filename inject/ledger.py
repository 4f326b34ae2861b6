"""The ledger: one row per injected example, binary and columnar-friendly (a NumPy structured array).

Read it with `read_ledger(build_dir)` (memory-mapped, so 10^8 rows cost nothing until touched); the
`spec` column indexes `manifest["injection"]["tasks"]`, which names the task, complexity and encoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LEDGER = "ledger.npy"
LEDGER_DTYPE = np.dtype([
    ("step", "<u4"),       # 1-based training step (batch index + 1)
    ("instance", "<u4"),   # OLMo instance index (MemMapDataset index) that holds the example
    ("offset", "<u4"),     # token offset of the example's first token inside the instance
    ("length", "<u2"),     # tokens, closing EOS included
    ("spec", "<u2"),       # index into manifest["injection"]["tasks"]
    ("template", "<u2"),   # template index (text encoding), 0 for tokens encoding
    ("seen", "?"),         # always True for injected rows: held-out instances are never injected
    ("item", "<i8"),       # instance index in the task's space (its pool id)
])


def write_ledger(path: Path, plan, instances: np.ndarray) -> None:
    """Rows in (step, task) order; `instances[i]` is the OLMo instance of example i."""
    ledger = np.lib.format.open_memmap(path, mode="w+", dtype=LEDGER_DTYPE, shape=(plan.examples,))
    ledger["step"] = plan.step
    ledger["instance"] = instances
    ledger["offset"] = plan.offset
    ledger["length"] = plan.length
    ledger["spec"] = plan.spec
    ledger["template"] = plan.template
    ledger["seen"] = True
    ledger["item"] = plan.item
    ledger.flush()
    del ledger


def read_ledger(build_dir: Path) -> np.ndarray:
    path = Path(build_dir) / LEDGER
    if not path.exists():
        from .errors import InjectError

        raise InjectError(f"{build_dir}: no {LEDGER}; was this build made without tasks?")
    return np.load(path, mmap_mode="r")
