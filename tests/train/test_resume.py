"""Crash-safe checkpoints: interrupted + resumed runs end bitwise equal to uninterrupted ones; torn checkpoints
are skipped with a warning; a SIGKILLed training process resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import assert_bitwise_equal, load_weights

from moai_lib.train import TornCheckpointWarning, TrainConfigError, TrainParams, pretrain, verify_checkpoint

# Small and quick: 8 steps of 2 × 4 sequences of 32 tokens.
PARAMS = dict(batch_size=4, gradient_accumulation_steps=2, max_length=32, max_steps=8, learning_rate=3e-3,
              warmup_steps=2, save_every=2, keep_checkpoints=5, eval_batches=2, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sample_shards, tiny_config):
    out = tmp_path_factory.mktemp("uninterrupted")
    metrics = pretrain(TrainParams(**PARAMS), tiny_config, sample_shards, out)
    assert metrics["completed"] and metrics["resumed_from_step"] is None
    return out, metrics


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_interrupted_and_resumed_run_is_bitwise_equal(tmp_path, sample_shards, tiny_config, uninterrupted):
    reference, ref_metrics = uninterrupted
    first = pretrain(TrainParams(**PARAMS), tiny_config, sample_shards, tmp_path, stop_after_step=3)
    assert not first["completed"] and first["step"] == 3
    assert not (tmp_path / "model").exists()  # no final model from an interrupted run
    assert checkpoints(tmp_path) == ["step-00000002", "step-00000003"]
    second = pretrain(TrainParams(**PARAMS), tiny_config, sample_shards, tmp_path)
    assert second["completed"] and second["resumed_from_step"] == 3
    assert_bitwise_equal(load_weights(tmp_path / "model"), load_weights(reference / "model"))
    assert second["val_loss"] == ref_metrics["val_loss"]
    # Running a finished run again resumes at its last step, trains nothing and re-saves the same model.
    again = pretrain(TrainParams(**PARAMS), tiny_config, sample_shards, tmp_path)
    assert again["completed"] and again["resumed_from_step"] == 8 and again["train_loss"] == second["train_loss"]
    assert_bitwise_equal(load_weights(tmp_path / "model"), load_weights(reference / "model"))
    # The checkpoints themselves match too (model, optimizer moments, scheduler).
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "checkpoints" / "step-00000008" / name).read_bytes() == \
               (reference / "checkpoints" / "step-00000008" / name).read_bytes()


def test_torn_checkpoint_is_skipped_with_a_warning(tmp_path, sample_shards, tiny_config, uninterrupted):
    reference, _ = uninterrupted
    pretrain(TrainParams(**PARAMS), tiny_config, sample_shards, tmp_path, stop_after_step=5)
    assert checkpoints(tmp_path) == ["step-00000002", "step-00000004", "step-00000005"]
    newest = tmp_path / "checkpoints" / "step-00000005"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write
    (tmp_path / "checkpoints" / "step-00000004" / "manifest.json").unlink()  # died before the manifest
    stale = tmp_path / "checkpoints" / ".step-00000006.tmp-abc"  # a temp dir left by a killed writer
    stale.mkdir()
    assert verify_checkpoint(newest).startswith(f"model.safetensors has {weights.stat().st_size} bytes")
    with pytest.warns(TornCheckpointWarning) as caught:
        metrics = pretrain(TrainParams(**PARAMS), tiny_config, sample_shards, tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("step-00000005" in m and "model.safetensors" in m for m in messages)
    assert any("step-00000004" in m and "no manifest" in m for m in messages)
    assert metrics["resumed_from_step"] == 2 and not stale.exists()
    assert_bitwise_equal(load_weights(tmp_path / "model"), load_weights(reference / "model"))


def test_resume_refuses_a_changed_run(tmp_path, sample_shards, tiny_config):
    pretrain(TrainParams(**PARAMS), tiny_config, sample_shards, tmp_path, stop_after_step=2)
    with pytest.raises(TrainConfigError, match=r"cannot resume .*\(batch_size: 4 → 2\)"):
        pretrain(TrainParams(**{**PARAMS, "batch_size": 2}), tiny_config, sample_shards, tmp_path)
    fresh = pretrain(TrainParams(**{**PARAMS, "batch_size": 2, "resume": False, "max_steps": 2}), tiny_config,
                     sample_shards, tmp_path)
    assert fresh["resumed_from_step"] is None and fresh["completed"]


def test_sigkill_mid_run_then_resume_matches(tmp_path, sample_shards, tiny_config, uninterrupted):
    """`moai train` in a subprocess, killed with SIGKILL after its second checkpoint; resumed in-process."""
    reference, _ = uninterrupted
    config_dir = tmp_path / "config"
    tiny_config.save_pretrained(config_dir)
    out = tmp_path / "run"
    flags = ["--batch_size", "4", "--gradient_accumulation_steps", "2", "--max_length", "32", "--learning_rate",
             "3e-3", "--warmup_steps", "2", "--save_every", "2", "--eval_batches", "2"]
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({"keep_checkpoints": 5, "progress": False, "max_steps": 400}))
    # 400 steps so that the process is still running when it is killed; the schedule length is part of the
    # run, so the in-process reference below is resumed with the same 400-step schedule but stopped at 8.
    proc = subprocess.Popen(
        [sys.executable, "-m", "moai_lib.cli", "train", "--config", str(config_dir), "--data_dir",
         str(sample_shards), "--output_dir", str(out), "--params", str(params_file), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    target = out / "checkpoints" / "step-00000004" / "manifest.json"
    deadline = time.monotonic() + 120
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (out / "model").exists()

    long_params = {**PARAMS, "max_steps": 400}
    ref = tmp_path / "reference"
    pretrain(TrainParams(**long_params), tiny_config, sample_shards, ref, stop_after_step=8)
    resumed = pretrain(TrainParams(**long_params), tiny_config, sample_shards, out, stop_after_step=8)
    assert 4 <= resumed["resumed_from_step"] < 8
    assert_bitwise_equal(_checkpoint_weights(out, 8), _checkpoint_weights(ref, 8))


def _checkpoint_weights(out: Path, step: int):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))
