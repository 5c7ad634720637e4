#!/usr/bin/env bash
# The README's main command: the whole pipeline on the embedded sample corpus, from a fresh clone.
#   1. scripts/setup.sh       .venv with the pinned CPU requirements (skipped when already up to date)
#   2. dvc pull data.dvc      the sample corpus from the in-repo DVC remote (.dvc-remote/, offline)
#   3. dvc repro              tokenize → pretrain → qat → quantize@<method> → evaluate → report → export
#   4. moai promote           register the exports in MLflow (sqlite:///mlruns.db unless MLFLOW_TRACKING_URI)
#                             and set the `champion` alias
#   5. print reports/comparison.md
# Params: params.yaml (copy a profile from params/ over it to change the scale). Run it again: DVC skips
# every stage whose inputs did not change, and promote registers nothing twice.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$SECONDS
dvc pull -q data.dvc
dvc repro
moai promote --params params.yaml
echo
cat reports/comparison.md
echo "pipeline: $((SECONDS - start)) s"
