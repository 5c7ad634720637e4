"""`pretrain.sh` end to end: torchrun with 2 CPU processes (gloo), FSDP2 + QAT, and a refused launch.

Marked slow: each case starts fresh interpreters (~10–40 s of imports on a busy machine). Run with -m slow.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port),
            "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([str(ROOT / "pretrain.sh"), *args], env=full, capture_output=True, text=True,
                          timeout=600)


def test_pretrain_sh_runs_fsdp2_qat_on_two_processes(tmp_path, sample_shards):
    env = {"DATA_DIR": str(sample_shards), "OUTPUT_DIR": str(tmp_path / "run"), "NPROC_PER_NODE": "2",
           "GLOBAL_BATCH_SIZE": "8", "BATCH_SIZE": "2", "MAX_LENGTH": "32", "DISTRIBUTED": "fsdp2",
           "USE_QUANTIZATION": "true", "QUANT_BITS": "4", "QUANT_GROUP_SIZE": "32"}
    done = _run(env, "tiny", "--max_steps", "4", "--save_every", "2", "--eval_batches", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "global batch 8 = 2 × 2 micro-batches × 2" in done.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["distributed"] == "fsdp2" and metrics["completed"]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["quantization_config"]["methods"][0]["method"] == "qat"


def test_pretrain_sh_refuses_a_world_size_that_does_not_divide_the_batch(tmp_path, sample_shards):
    env = {"DATA_DIR": str(sample_shards), "OUTPUT_DIR": str(tmp_path / "run"), "NPROC_PER_NODE": "3",
           "GLOBAL_BATCH_SIZE": "8", "BATCH_SIZE": "4", "MAX_LENGTH": "32", "TORCHRUN": "false"}
    done = _run(env, "tiny")
    assert done.returncode == 2
    assert "global_batch_size 8 is not divisible by batch_size 4 × world size 3" in done.stderr
    assert not (tmp_path / "run").exists()
