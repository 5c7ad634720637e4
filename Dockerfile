# Image for remote Metaflow steps and for the `moai` CLI on a GPU machine.
#
#   docker build -t <registry>/moai:<tag> .                      (from the repository root)
#   docker push <registry>/moai:<tag>
#   python flows/moai_flow.py --no-pylint --with kubernetes:image=<registry>/moai:<tag> run
#   python flows/moai_flow.py --no-pylint --with batch:image=<registry>/moai:<tag> run
#
# torch comes from the PyTorch CUDA index (the lock's torch==2.13.0 is the CPU wheel used for CI); everything
# else is pinned by requirements/test.txt. The project is installed as well, so the image also works without
# Metaflow's code package; when the flow ships moai_lib with @package_sources, the shipped copy (in the task's
# working directory, first on sys.path) is the one imported, so remote steps run the code of the launch.
# The GPU driver comes from the host (NVIDIA container toolkit on the node).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# The CUDA build of torch: pick the index that matches the nodes' driver (cu126, cu128, cu130, ...).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=8

# g++: the fused CPU scan is compiled on first use; git: MLflow runs are tagged with the commit when there is one.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/moai
COPY requirements/ requirements/
# torch (CUDA) first; the lock without torch and triton (the CUDA wheel pins the triton it was built with).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && grep -v -E '^(torch|triton)==' requirements/test.txt > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && python -c "import torch, metaflow, mlflow; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

COPY pyproject.toml README.md ./
COPY moai_lib/ moai_lib/
RUN pip install --no-deps . && python -c "import moai_lib; print('moai', moai_lib.__version__)"
