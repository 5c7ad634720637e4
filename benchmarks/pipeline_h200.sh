#!/usr/bin/env bash
# One H200 call: the pipeline stages on the large corpus through the stage CLI, resumable across calls while the
# machine stays warm (a stage whose metrics file exists in /tmp/run is skipped). Reads .gpuin/ (wheels, corpus,
# params): build it first with benchmarks/prepare_gpuin.sh. Run on the GPU machine: LIMIT=555 bash benchmarks/pipeline_h200.sh
# Results (metrics, reports, per-variant evaluation) come back as $OUT/results.tgz, the log as $OUT/run.log.
START=$(date +%s); LIMIT=${LIMIT:-500}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
exec > >(tee -a $OUT/run.log) 2>&1
pack() { cd /tmp/run && tar czf $OUT/results.tgz metrics reports outputs/eval 2>/dev/null; }
trap pack EXIT
if [ ! -d /tmp/site/transformers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuin/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import pyarrow, datasets, torch; print('pyarrow', pyarrow.__version__, 'torch', torch.__version__)"
mkdir -p /tmp/run; cp .gpuin/params.yaml .gpuin/SOURCES.md /tmp/run/; ln -sfn $PWD/.gpuin/corpus /tmp/run/corpus
P="--params /tmp/run/params.yaml"
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
stage() {  # stage NAME [--method M|--variant V] ; skipped when its metrics file exists
  local tag=$1; [ -n "$3" ] && tag="$1_$3"
  [ -f /tmp/run/metrics/$tag.json ] && { echo "-- $tag done before"; return 0; }
  [ $(left) -lt ${NEED:-60} ] && { echo "-- out of time before $tag"; exit 3; }
  echo "== $(date +%T) stage $*"
  local t=$(date +%s)
  python3 -m moai_lib.cli stage "$@" $P > /tmp/run/log_$tag.txt 2>&1; local rc=$?
  tail -4 /tmp/run/log_$tag.txt; echo "-- $tag rc=$rc $(( $(date +%s) - t )) s"
  [ $rc -eq 0 ] || { tail -30 /tmp/run/log_$tag.txt; exit 4; }
}
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
NEED=60 stage tokenize
NEED=200 stage pretrain
NEED=60 stage qat
for m in int4 int8 gptq awq fp8; do NEED=40 stage quantize --method $m; done
NEED=40 stage evaluate --variant bf16
NEED=40 stage evaluate --variant qat
for m in int4 int8 gptq awq fp8; do NEED=30 stage evaluate --variant $m; done
NEED=20 stage report
cat /tmp/run/reports/comparison.md
NEED=60 stage export
if [ $(left) -gt 100 ] && [ ! -f /tmp/run/fsdp_done ]; then
  echo "== $(date +%T) FSDP2 1b throughput (torchrun, 1 GPU)"
  timeout $(( $(left) - 10 )) torchrun --standalone --nproc_per_node 1 -m moai_lib.cli train --config 1b --test \
    --distributed fsdp2 --max_steps 30 --batch_size 8 --max_length 2048 --no_resume --output_dir /tmp/fsdp1b 2>&1 | tail -15 && touch /tmp/run/fsdp_done
fi
echo "== finished $(date +%T), $(( $(date +%s) - START )) s"
