"""The training-memory estimate: its per-parameter and per-token terms, and `moai model-info --memory`."""

from __future__ import annotations

import pytest

from moai_lib import cli, get_mamba_config
from moai_lib.model.info import count_parameters
from moai_lib.train.memory import activation_bytes_per_token_layer, format_memory_table, training_memory


@pytest.fixture(scope="module")
def two_b():
    config = get_mamba_config("2b")
    return config, count_parameters(config)


def test_static_memory_per_parameter(two_b):
    config, counts = two_b
    P = counts["total"]
    ddp = training_memory(config, "ddp", 8, 2048, counts=counts)
    assert ddp.weights + ddp.gradients + ddp.optimizer == 22 * P  # fp32 w + bf16 copy, grads + buckets, AdamW
    fsdp = training_memory(config, "fsdp2", 8, 2048, counts=counts)
    assert fsdp.weights + fsdp.gradients + fsdp.optimizer == pytest.approx(16 * P / 8)
    assert fsdp.total < ddp.total / 3


def test_activations_scale_with_tokens_and_checkpointing(two_b):
    config, counts = two_b
    assert activation_bytes_per_token_layer(config) == 48 * 2048 + 8 * 6144  # 144 KiB per token per layer
    short = training_memory(config, "fsdp2", 8, 2048, checkpointing=False, counts=counts)
    long = training_memory(config, "fsdp2", 8, 8192, checkpointing=False, counts=counts)
    assert long.activations == pytest.approx(4 * short.activations)
    ckpt = training_memory(config, "fsdp2", 8, 8192, checkpointing=True, counts=counts)
    assert ckpt.activations < long.activations / 8
    with pytest.raises(ValueError, match="strategy must be 'ddp' or 'fsdp2'"):
        training_memory(config, "zero3", counts=counts)


def test_model_info_memory_prints_the_table(capsys):
    assert cli.main(["model-info", "--memory", "--config", "2b", "--world_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2 over 4 GPUs" in out and out.count("| 2b |") == 4
    assert format_memory_table(("2b",), seq_lens=(2048,)).count("\n| 2b |") == 2
