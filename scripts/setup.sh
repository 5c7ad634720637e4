#!/usr/bin/env bash
# Create (or update) the project virtual environment in .venv with the pinned CPU requirements.
# Idempotent: re-running it only installs what changed. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.moai-setup
want=$(cat requirements/*.txt pyproject.toml scripts/setup.sh moai_lib/kernels/csrc/*.cpp | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements/test.txt
  # mamba-ssm is the independent numerical reference in the conformance tests. Its sdist downloads a CUDA wheel
  # or compiles CUDA; these flags give the pure-Python package, whose torch reference path the tests drive.
  MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE .venv/bin/python -m pip install -q --disable-pip-version-check \
    --no-build-isolation --no-deps mamba-ssm==2.3.2.post1
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  # Build the fused C++ CPU scan into its cache now (~10-30 s with g++) rather than in the first test that needs
  # it; it builds on first use anyway (and the torch scan takes over, with a warning, if it cannot).
  .venv/bin/python -c "from moai_lib.kernels.cpu_fused import load_library as l; r = l(); print('fused CPU scan:', r)"
  echo "$want" > "$stamp"
fi
