#!/usr/bin/env bash
# One GPU call for the decode path: validate first, then time. Run from the repository root:
#   OUT=/tmp/out bash benchmarks/gpu_decode.sh          (JSON and logs go to $OUT, default /tmp/out)
# Needs: a CUDA GPU, torch + triton, transformers (the machine's image). Optional: bitsandbytes (NF4 row) from a
# carried wheel folder .whl/ (../shared/device/wheels.sh), mamba-ssm (its comparison rows; skipped when
# `import mamba_ssm` or its CUDA kernels fail). Budget: ~150 s of GPU time expected; timeouts 120 + 150 + 200 s.
#   1. GPU tests: fused add+RMSNorm / SiLU·mul / SSM step vs the torch spec at real widths; INT4 single copy
#      (exact read-back, save/load); CUDA-graph tokens == eager tokens; the existing Triton decode GPU tests and
#      the tiny model's triton-vs-torch backend test (the scan's GPU tests are left out: not this change's).
#   2. bench_generate_gpu.py (370m bf16): validation (graph == eager tokens), kernels per token, batch 1 and 64
#      ms/token, TTFT, 1K vs 32K context.
#   3. bench_quant_inference.py (2b): bf16 vs INT4 (tinygemm) vs INT4 + LM head vs FP8 vs NF4: SQNR, model GiB,
#      ms/token, kernels per token.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_decode.log") 2>&1
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

if ! $PY -c "import bitsandbytes" 2>/dev/null && ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/bitsandbytes-*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
$PY - <<'EOF'
import importlib, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "gpu", torch.cuda.get_device_name(0))
for name in ("mamba_ssm", "bitsandbytes"):
    try:
        importlib.import_module(name)
        print(name, "imports")
    except Exception as exc:
        print(name, "unavailable:", type(exc).__name__, str(exc)[:120], "(its rows are skipped)")
EOF

echo "== $(elapsed) s: 1. GPU validation tests"
timeout 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" -rfEs \
  tests/kernels/test_triton_norm.py tests/quant/test_int4_single_copy.py tests/model/test_greedy_decode.py \
  tests/model/test_mamba.py tests/kernels/test_triton_kernels.py -k "(gpu or cuda) and not scan" \
  --junitxml="$OUT/validate_junit.xml" 2>&1 | tail -25
VALID=${PIPESTATUS[0]}
echo "validation pytest exit status: $VALID (0 = all passed)"

echo "== $(elapsed) s: 2. bench_generate_gpu.py (370m)"
timeout 150 $PY benchmarks/bench_generate_gpu.py --out "$OUT/generate_gpu.json"
GEN=$?

echo "== $(elapsed) s: 3. bench_quant_inference.py (2b)"
timeout 200 $PY benchmarks/bench_quant_inference.py --out "$OUT/quant_inference.json"
QUANT=$?

echo "== $(elapsed) s: done; exit statuses: validation $VALID, generate $GEN, quant $QUANT"
printf '{"validation_pytest": %d, "bench_generate_gpu": %d, "bench_quant_inference": %d, "seconds": %d}\n' \
  "$VALID" "$GEN" "$QUANT" "$(elapsed)" > "$OUT/gpu_decode_status.json"
[ "$VALID" -eq 0 ] && [ "$GEN" -eq 0 ] && [ "$QUANT" -eq 0 ]
