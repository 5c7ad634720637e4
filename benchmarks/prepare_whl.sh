#!/usr/bin/env bash
# Build the git-ignored .whl/ folder that the GPU benchmark calls carry to the GPU machine (it has no network and
# lacks transformers 5.24 and friends): Python 3.12 wheels of what the benchmarks import beyond torch/triton, and in
# .whl/sdist/ the PyPI sdists of the mamba-ssm anchor (built there by benchmarks/gpu_all.sh). Run here, in the repo
# root, on a machine with access to PyPI:
#   bash benchmarks/prepare_whl.sh
# then, through the device tool with carry [".whl"]: OUT=... bash benchmarks/gpu_all.sh   (~33 MB; the limit is 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
"$SHARED/device/wheels.sh" transformers==5.24.0 huggingface_hub==2.4.0 tokenizers==0.23.3 hf_xet==1.8.0 \
  httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5 click==8.5.1 \
  typing_extensions==4.16.0 einops==0.8.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  bitsandbytes==0.50.2 torchao==0.18.0
# bitsandbytes ships one library per CUDA/ROCm/XPU release (43 MB): keep the CPU one and CUDA 13.x (the GPU machine
# has torch+cu130), dropping the others from the wheel and its RECORD, so that .whl/ fits the 64 MiB carry (33 MB).
python3 - <<'PY'
import glob, os, re, zipfile

keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")


def drop(name):
    return "libbitsandbytes_" in name and name.endswith(".so") and not keep.search(name)


for path in glob.glob(".whl/bitsandbytes-*.whl"):
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(x for x in data.decode().splitlines(True) if not drop(x.split(",")[0])).encode()
            dst.writestr(item, data)
    os.replace(path + ".tmp", path)
PY
mkdir -p .whl/sdist
# pip prepares an sdist's metadata by running its setup.py, which imports torch: use the project's venv, skip CUDA.
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE .venv/bin/python -m pip download -q --no-deps \
  --no-binary :all: --no-build-isolation -d .whl/sdist mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
du -sh .whl
