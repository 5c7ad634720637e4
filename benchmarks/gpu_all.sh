#!/usr/bin/env bash
# Issue 5's whole GPU table in one device call (~10 min on the H200): validate, then time ours and the mamba-ssm
# anchor in the same run. Run from the repository root through the device tool with carry [".whl"]:
#   OUT=/tmp/out LIMIT=590 bash benchmarks/gpu_all.sh
# .whl/ (git-ignored; `bash benchmarks/prepare_whl.sh` builds it here) holds the Python 3.12 wheels (transformers
# stack, bitsandbytes, torchao) and .whl/sdist/ the PyPI sdists of mamba-ssm 2.3.2.post1 and causal-conv1d 1.7.0.
#   0. Install the wheels; start building mamba-ssm and causal-conv1d from their sdists in the background
#      (MAMBA_FORCE_BUILD=TRUE, only sm_90 code: ~5.5 min on 16 cores; the build never touches PYTHONPATH).
#   1. GPU tests (every CUDA-only test of the kernels, model and quantization: they compare each fast path with its
#      torch spec at real widths).
#   2. While mamba-ssm compiles, the rows without an anchor: quantized decoding (2b), the loss, the prefill probe.
#   3. Once it is installed: the scan, training, generation and block-vs-attention benchmarks, each with its
#      mamba-ssm rows in the same process. A benchmark whose anchor failed to build still runs (its rows say so).
# Each benchmark writes JSON into $OUT; `gpu_all_status.json` records every step's exit status and seconds.
# CHECKPOINT_EVERY=256 adds the scan's sparse-checkpoint rows to the training, block and batch-1 scan benchmarks;
# BLOCK_GRAPHS=1 also times each block's forward+backward replayed as a CUDA graph.
set -uo pipefail
OUT=${OUT:-/tmp/out}
LIMIT=${LIMIT:-590}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_all.log") 2>&1
cd "$(dirname "$0")/.."
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( LIMIT - $(elapsed) )); }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
STATUS="{"

step() {  # step NAME MIN_SECONDS CMD...: run CMD with the time left (if at least MIN_SECONDS), record its status
  local name=$1 min=$2; shift 2
  local budget; budget=$(left)
  if [ "$budget" -lt "$min" ]; then
    echo "== skip $name: $budget s left (needs $min)"; STATUS+="\"$name\": \"skipped\", "; return
  fi
  echo "== $(elapsed) s: $name"
  local t0; t0=$(date +%s)
  timeout "$budget" "$@"
  local rc=$?
  STATUS+="\"$name\": {\"rc\": $rc, \"s\": $(( $(date +%s) - t0 ))}, "
}

# 0. wheels, then the anchor's build in the background
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  || echo "WHEEL INSTALL FAILED"
export PYTHONPATH=$PWD:/tmp/site
BUILD=/tmp/anchor_build
if [ ! -d "$BUILD" ] && ls .whl/sdist/mamba_ssm-*.tar.gz .whl/sdist/causal_conv1d-*.tar.gz >/dev/null 2>&1; then
  mkdir -p "$BUILD"
  for sd in .whl/sdist/causal_conv1d-*.tar.gz .whl/sdist/mamba_ssm-*.tar.gz; do tar xzf "$sd" -C "$BUILD"; done
  for dir in "$BUILD"/*/; do
    # sm_90 only: the sdists compile every architecture from sm_53 to sm_121 otherwise (~4x longer)
    sed -i 's/^    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI/    cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]\n&/' \
      "$dir/setup.py"
    name=$(basename "$dir")
    (cd "$dir" && setsid nohup env -u PYTHONPATH MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
       TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 nice -n 10 \
       sh -c "$PY -m pip install --no-build-isolation --no-deps . > $BUILD/$name.log 2>&1; echo \$? > $BUILD/$name.rc" \
       >/dev/null 2>&1 &)
  done
  echo "anchor builds started at $(elapsed) s"
fi
$PY - <<'EOF'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "gpu", torch.cuda.get_device_name(0))
EOF

# 1. GPU validation tests
TESTS=${TESTS:-tests/kernels tests/model tests/quant}  # ~4 min in all; a subset with TESTS="..."
step gpu_tests 60 $PY -m pytest -q -p no:cacheprovider -o addopts="" -rfEs $TESTS -k "cuda or gpu" \
  --junitxml="$OUT/gpu_tests_junit.xml"

# 2. rows without a mamba-ssm anchor, while it compiles
QUANT_VARIANTS=${QUANT_VARIANTS:-}  # default: every variant (~2 min)
step quant_inference 60 $PY benchmarks/bench_quant_inference.py ${QUANT_VARIANTS:+--variants "$QUANT_VARIANTS"} \
  --out "$OUT/quant_inference.json"
[ -n "${WITH_LOSS:-}" ] && step loss 40 $PY benchmarks/bench_loss_gpu.py --out "$OUT/loss_gpu.json"

# 3. wait for both anchor builds (at most until ANCHOR_WAIT_UNTIL seconds are left: a mamba-ssm without
#    causal-conv1d silently takes its slower unfused paths), then the compared benchmarks; each JSON records the
#    versions it imported (machine.mamba_ssm, machine.causal_conv1d)
while [ "$(ls "$BUILD"/*.rc 2>/dev/null | wc -l)" -lt 2 ]; do
  [ "$(left)" -lt "${ANCHOR_WAIT_UNTIL:-200}" ] && { echo "anchor builds not finished with $(left) s left"; break; }
  sleep 5
done
for rc in "$BUILD"/*.rc; do [ -f "$rc" ] && echo "$(basename "$rc"): exit $(cat "$rc")"; done
$PY -c "import torch, mamba_ssm, selective_scan_cuda, causal_conv1d_cuda; print('mamba-ssm anchor imports')" \
  || for log in "$BUILD"/*.log; do tail -n 5 "$log"; done
step scan 60 $PY benchmarks/bench_scan_gpu.py --lengths "${SCAN_LENGTHS:-512,2048,8192,32768}" --out "$OUT/scan_gpu.json"
step train 60 $PY benchmarks/bench_train_gpu.py --presets "${TRAIN_PRESETS:-130m,370m}" --steps 6 --warmup 2 \
  ${CHECKPOINT_EVERY:+--checkpoint-every $CHECKPOINT_EVERY} --out "$OUT/train_gpu.json"
step generate 60 $PY benchmarks/bench_generate_gpu.py --out "$OUT/generate_gpu.json"
step block 40 $PY benchmarks/bench_block_vs_attention.py ${CHECKPOINT_EVERY:+--checkpoint-every $CHECKPOINT_EVERY} \
  ${BLOCK_GRAPHS:+--graphs} --out "$OUT/block_vs_attention.json"
step scan_b1 40 $PY benchmarks/bench_scan_gpu.py --batch 1 --lengths 2048,32768 \
  ${CHECKPOINT_EVERY:+--checkpoint-every $CHECKPOINT_EVERY} --out "$OUT/scan_gpu_b1.json"
echo "${STATUS}\"seconds\": $(elapsed)}" > "$OUT/gpu_all_status.json"
cat "$OUT/gpu_all_status.json"
