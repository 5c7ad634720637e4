"""Parameter counting and memory estimates (`moai_lib.model.info`), checked against the meta-built model and
against the closed form of the layer shapes."""

from __future__ import annotations

import math

import pytest

from moai_lib.config import PRESET_TARGET_PARAMS, get_mamba_config, preset_names
from moai_lib.model.info import (
    LAYER_COMPONENTS,
    build_meta_model,
    count_parameters,
    estimate_memory,
    format_model_info,
    format_size_summary,
)


def closed_form_layer(config) -> dict[str, int]:
    """Per-layer counts written out from the shapes in the Mamba paper / state-spaces/mamba."""
    d, E, N, R, W, I = (config.hidden_size, config.d_inner, config.state_size, config.time_step_rank,
                        config.conv_kernel_size, config.intermediate_size)
    bias = int(config.use_bias)
    return {
        "in_proj": d * 2 * E + bias * 2 * E,
        "conv1d": E * W + int(config.use_conv_bias) * E,
        "x_proj": E * (R + 2 * N),
        "dt_proj": R * E + E,
        "A_log+D": E * N + E,
        "out_proj": E * d + bias * d,
        "norms": 2 * d if I else d,
        "mlp": 3 * d * I,
    }


@pytest.mark.parametrize("name", preset_names())
def test_count_equals_meta_model_numel(name):
    config = get_mamba_config(name)
    counts = count_parameters(config)
    model = build_meta_model(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    assert counts["tied"] == config.tie_word_embeddings
    embedding = config.padded_vocab_size * config.hidden_size
    assert counts["embedding"] == embedding
    assert counts["lm_head"] == (0 if config.tie_word_embeddings else embedding)
    assert len(counts["layers"]) == config.num_hidden_layers
    for layer in counts["layers"]:
        assert {c: layer[c] for c in LAYER_COMPONENTS} == closed_form_layer(config)
        assert layer["total"] == sum(closed_form_layer(config).values())
    assert counts["total"] == (counts["embedding"] + counts["lm_head"] + counts["norm_f"]
                               + config.num_hidden_layers * sum(closed_form_layer(config).values()))


@pytest.mark.parametrize("overrides", [dict(intermediate_size=0), dict(use_bias=True, tie_word_embeddings=False),
                                       dict(vocab_size=500, dt_rank=7)])
def test_count_variants_match_closed_form(overrides):
    config = get_mamba_config("tiny", **overrides)
    counts = count_parameters(config)
    assert counts["layers"][0]["total"] == sum(closed_form_layer(config).values())
    assert counts["total"] == sum(p.numel() for p in build_meta_model(config).parameters())


@pytest.mark.parametrize("name", ["2b", "8b", "16b"])
def test_large_presets_within_5_percent_of_target(name):
    total = count_parameters(get_mamba_config(name))["total"]
    assert abs(total - PRESET_TARGET_PARAMS[name]) / PRESET_TARGET_PARAMS[name] < 0.05


def test_memory_bf16_and_int4_by_hand():
    config = get_mamba_config("tiny")  # d=64, E=128, N=16, R=4, I=128, 2 layers, tied vocab 512
    counts, memory = count_parameters(config), estimate_memory(config)
    fp32 = counts["layer_components"]["A_log+D"]
    assert memory["bf16_bytes"] == 2 * (counts["total"] - fp32) + 4 * fp32
    # 4-bit weights: in_proj (256, 64), x_proj (36, 128), out_proj (64, 128), fc1 (256, 64), fc2 (64, 128)
    shapes = [(256, 64), (36, 128), (64, 128), (256, 64), (64, 128)]
    quantized = 2 * sum(o * i for o, i in shapes)
    scales = 2 * sum(o * math.ceil(i / 128) for o, i in shapes)
    assert memory["int4_quantized_params"] == quantized
    assert memory["int4_scales"] == scales
    assert memory["int4_bytes"] == memory["bf16_bytes"] - 2 * quantized + quantized // 2 + 2 * scales


def test_int4_saves_most_on_large_models():
    memory = estimate_memory(get_mamba_config("16b"))
    assert 0.25 < memory["int4_bytes"] / memory["bf16_bytes"] < 0.4  # embeddings stay bf16


def test_format_model_info_states_components_memory_and_assumption():
    text = format_model_info(get_mamba_config("2b"), name="2b", verbose=True)
    for word in ("embedding", "lm_head", "mixer.in_proj", "mixer.conv1d", "mixer.x_proj", "mixer.dt_proj",
                 "mixer.A_log+D", "mixer.out_proj", "norms", "mlp", "norm_f", "memory bf16", "memory int4",
                 "assumption", "group of 128", "2,064,910,336", "advertised"):
        assert word in text
    assert "tied" in format_model_info(get_mamba_config("tiny"), name="tiny")


def test_size_summary_has_every_preset_with_deviation():
    lines = format_size_summary().splitlines()
    for name in preset_names():
        (line,) = [line for line in lines if line.split()[0] == name]
        if name in PRESET_TARGET_PARAMS:
            assert "%" in line
