#!/usr/bin/env bash
# Build the git-ignored .gpuin/ folder that benchmarks/pipeline_h200.sh reads on the GPU machine (which has no
# network and lacks datasets/transformers 5.24): Python 3.12 wheels, the large corpus, and the params file used for
# the run recorded in BENCHMARKS.md (benchmarks/results/pipeline_h200/params_used.yaml). Run here, in the repo root:
#   bash benchmarks/prepare_gpuin.sh
# then, through the device tool with carry [".gpuin"]: LIMIT=555 bash benchmarks/pipeline_h200.sh (and again while
# the machine is warm: stages whose metrics exist are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
grep -qx '/.gpuin/' .git/info/exclude 2>/dev/null || echo /.gpuin/ >> .git/info/exclude
mkdir -p .gpuin/whl .gpuin/corpus
( cd .gpuin && "$OLDPWD/$SHARED/device/wheels.sh" transformers==5.24.0 huggingface_hub==2.4.0 tokenizers==0.23.3 \
    hf_xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5 \
    click==8.5.1 typing_extensions==4.16.0 einops==0.8.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  && rm -rf whl && mv .whl whl )
cp "$SHARED"/corpus/large/*.jsonl.gz .gpuin/corpus/
cp "$SHARED"/corpus/SOURCES.md .gpuin/SOURCES.md
cp benchmarks/results/pipeline_h200/params_used.yaml .gpuin/params.yaml
du -sh .gpuin  # the device tool carries at most 64 MiB per call
