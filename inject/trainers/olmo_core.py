"""OLMo-core 3.0.0 (PyPI `ai2-olmo-core`), the trainer of OLMo 2 and OLMo 3, as olmo-inject's second trainer.

OLMo-core cannot live in the main environment: ai2-olmo 0.6.0 pins `ai2-olmo-core==0.1.0` and both install
the import package `olmo_core`. So this module never imports it: whatever needs OLMo-core's own code (its
data loader for verify, its Trainer for train, its checkpoint converter) runs as `olmo_core_env/child.py` in the
python of an OLMo-core environment (`python()`), and talks to this module through files and pipes.

The order (`order`, numpy only) is in inject/order.py and tested against OLMo-core's own loader.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

NAME = "olmo-core"
CHILD = Path(__file__).with_name("olmo_core_env") / "child.py"
"""The script that runs inside the OLMo-core environment (imports olmo_core; never imported here)."""

PYTHON_ENV = "OLMO_INJECT_OLMO_CORE_PYTHON"
"""Environment variable naming the python of an OLMo-core 3 environment."""


def python(given: str | None = None) -> str:
    """The python of the OLMo-core environment: `given` (a --olmo-core-python option), else $OLMO_INJECT_OLMO_CORE_PYTHON,
    else .venv-olmo-core/bin/python at the repository root or the current folder (`bash tests/install-olmo-core.sh`
    makes it)."""
    if given or os.environ.get(PYTHON_ENV):
        return str(given or os.environ[PYTHON_ENV])
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root / ".venv-olmo-core" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    raise ConfigError(f"no OLMo-core environment: run `bash tests/install-olmo-core.sh` (makes .venv-olmo-core), or "
                      f"name its python with --olmo-core-python or ${PYTHON_ENV}")


# ---------------------------------------------------------------------------------------------- order, verify
# (moved here from inject/verify.py and inject/config.py by the seam refactor)


# ---------------------------------------------------------------------------------------------------- training
# (train: config checks against the build, launch through torchrun of the OLMo-core environment, resume)


# ------------------------------------------------------------------------------------------------- checkpoints
# (eval: find and read OLMo-core checkpoints, distributed and converted Hugging Face folders)
