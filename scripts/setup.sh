#!/usr/bin/env bash
# Create .venv and install disco-dist into it. Idempotent: a finished set-up is detected and skipped.
# torch==2.13.0 goes in first where torch is missing, so nothing later resolves an unpinned (CUDA) torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.disco-setup-done
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install --quiet --upgrade pip setuptools wheel
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $pip install --quiet "torch==2.13.0"
fi
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  # No prebuilt ops: they JIT-compile on first use where needed; the build must see the installed torch.
  DS_BUILD_OPS=0 $pip install --quiet --no-build-isolation deepspeed
fi
$pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, deepspeed, transformers; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")'))"
