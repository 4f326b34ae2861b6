#!/usr/bin/env bash
# The OLMo-core 3.0.0 environment: its own virtual environment, .venv-olmo-core at the repository root,
# because ai2-olmo 0.6.0 (the main environment) pins ai2-olmo-core==0.1.0 and both install the import
# package `olmo_core`. The tests that compare olmo-inject's order with OLMo-core's own data loader run
# their OLMo-core side in it (as a subprocess). Quick when it is already there.
# OLMO_CORE_VENV overrides the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${OLMO_CORE_VENV:-.venv-olmo-core}"
want="3.0.0"
if [ -x "$venv/bin/python" ] &&
   "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('ai2-olmo-core') != '$want')" 2>/dev/null &&
   "$venv/bin/python" -c "import transformers" 2>/dev/null; then
  exit 0
fi
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# CPU torch first (a wheel of 2.13.0 lies on this kind of machine's disk; elsewhere pip fetches it):
# OLMo-core 3.0.0 needs torch>=2.10,<2.14, and a bare resolve would pull a multi-GB CUDA build.
"$venv/bin/python" -m pip install -q "torch==2.13.0"
# The `transformers` extra: OLMo-core's Hugging Face converter (eval's `convert` of OLMo-core checkpoints).
"$venv/bin/python" -m pip install -q "ai2-olmo-core[transformers]==$want"
echo "install-olmo-core: $("$venv/bin/python" -c "import importlib.metadata as m; print('ai2-olmo-core', m.version('ai2-olmo-core'), 'numpy', m.version('numpy'), 'torch', m.version('torch'))") in $venv"
