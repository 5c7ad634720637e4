#!/usr/bin/env bash
# Set up the environment and run the whole test suite (the README's test command; .ci/run calls it).
# Extra arguments go to pytest, e.g. scripts/test.sh tests/model -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The sample corpus is DVC-tracked (data.dvc); a fresh clone fetches it from the in-repo remote, offline.
.venv/bin/dvc pull -q data.dvc
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# pytest exits 5 when no test was collected: that is a failure here too (set -e).
exec .venv/bin/python -m pytest -n "${MOAI_TEST_WORKERS:-2}" "$@"
