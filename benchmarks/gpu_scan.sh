#!/usr/bin/env bash
# One GPU call for the Triton selective scan (segments over L, sparse checkpoints) and the block it serves:
#   1. validation at real shapes: B=1, D=4096, N=16, L=2048 and L=1000, fp32, y + final state + every gradient
#      vs the sequential reference (the default launch and 8 forced segments), then the small-shape validation
#      of every timed variant (fp32 and bf16);
#   2. scan timings, bf16, D=4096, N=16, B in {1, 8}, L in {2K, 8K, 32K}, fwd and fwd+bwd: ours (segmented where
#      `default_segments` says so) vs the scan before segments ("triton old") vs pure torch (B=1, L=2K) vs
#      mamba-ssm when `import selective_scan_cuda` works (else no mamba-ssm rows); then n_segments x block_d at
#      B=1, L=8K;
#   3. one Mamba block vs one attention block (SDPA, measured in the same run), B=1, L in {512, 2K, 8K, 32K}:
#      fwd+bwd ms and peak memory, our block on the new and on the old scan;
#   4. if time is left, the GPU pytest of the scan (tests/kernels: realistic shapes, segments forced, tiny model).
# Run from the repo root:  OUT=/tmp/out PYTHONPATH=$PWD bash benchmarks/gpu_scan.sh
# Writes $OUT/scan_gpu.json (after each phase), $OUT/block_vs_attention.json and $OUT/gpu_scan.log. At most
# ~210 s (time-outs: scan 130 s, block 70 s; the pytest step only runs if 45 s are left).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
START=$(date +%s); LIMIT=${LIMIT:-210}
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
exec > >(tee -a "$OUT/gpu_scan.log") 2>&1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if python3 -c "import torch, selective_scan_cuda" 2>/dev/null; then echo "mamba-ssm: available"
else echo "mamba-ssm: not importable here (no mamba-ssm rows)"; fi

echo "== $(date +%T) scan: validation, timings"
timeout 130 python3 benchmarks/bench_scan_gpu.py --batch 1,8 --lengths 2048,8192,32768 --compare-old \
    --validate-real 1x4096x2048,1x4096x1000 --seg-sweep --budget-ms 300 --out "$OUT/scan_gpu.json"
echo "-- scan rc=$? at $(( $(date +%s) - START )) s"

echo "== $(date +%T) block vs attention"
timeout 70 python3 benchmarks/bench_block_vs_attention.py --old-scan --budget-ms 400 \
    --out "$OUT/block_vs_attention.json"
echo "-- block rc=$? at $(( $(date +%s) - START )) s"

if [ "$(left)" -gt 45 ]; then
  echo "== $(date +%T) GPU pytest of the scan"
  timeout $(( $(left) - 5 )) python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_triton_scan_chunked.py \
      tests/kernels/test_triton_kernels.py -k "gpu_segmented or gpu_scan or gpu_model"
  echo "-- pytest rc=$?"
fi
echo "total $(( $(date +%s) - START )) s"
