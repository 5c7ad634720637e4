"""Config validation, presets (sizes from the meta device) and JSON loading."""

import json

import pytest
import torch

from moai_lib import ConfigError, MoaiMambaConfig, MoaiMambaForCausalLM, get_mamba_config, load_mamba_config
from moai_lib.config import PRESET_TARGET_PARAMS, preset_names


def meta_param_count(cfg) -> int:
    with torch.device("meta"):
        model = MoaiMambaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter: counted once


@pytest.mark.parametrize("name", sorted(PRESET_TARGET_PARAMS))
def test_preset_sizes_match_their_names(name):
    cfg = get_mamba_config(name)
    count = meta_param_count(cfg)
    target = PRESET_TARGET_PARAMS[name]
    assert abs(count - target) / target <= 0.05, f"{name}: {count / 1e9:.3f}B vs {target / 1e9:.3f}B"


def test_big_presets_have_the_advertised_shape():
    for name, hidden, layers in (("2b", 2048, 24), ("8b", 4096, 40), ("16b", 5120, 48)):
        cfg = get_mamba_config(name)
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.state_size, cfg.conv_kernel_size, cfg.expand_factor) == (
            hidden, layers, 16, 4, 2)
        assert cfg.vocab_size == 128000 and cfg.padded_vocab_size == 128000
        assert cfg.time_step_rank == -(-hidden // 16)


def test_all_presets_build_and_tiny_runs():
    assert set(preset_names()) >= {"tiny", "130m", "370m", "1b", "2b", "8b", "16b"}
    model = MoaiMambaForCausalLM(get_mamba_config("tiny"))
    assert model(torch.randint(0, 512, (1, 4))).logits.shape == (1, 4, 512)


@pytest.mark.parametrize("name", ["2b", "8b", "16b"])
def test_config_json_files_load(name):
    cfg = load_mamba_config(f"configs/mamba_config_{name}.json")
    assert cfg.to_diff_dict() == get_mamba_config(name).to_diff_dict()


def test_config_round_trips_through_save_pretrained(tmp_path):
    cfg = get_mamba_config("tiny", intermediate_size=0, dt_rank=8)
    cfg.save_pretrained(tmp_path)
    again = load_mamba_config(tmp_path)
    assert again.intermediate_size == 0 and again.time_step_rank == 8
    assert MoaiMambaConfig.from_pretrained(tmp_path).to_dict() == again.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=0), "hidden_size must be an integer > 0, got 0"),
        (dict(hidden_size=-8), "hidden_size must be an integer > 0"),
        (dict(num_hidden_layers=2.5), "num_hidden_layers must be an integer"),
        (dict(intermediate_size=-1), "intermediate_size must be an integer ≥ 0"),
        (dict(conv_kernel_size=1), "conv_kernel_size must be ≥ 2"),
        (dict(dt_rank=0), "dt_rank must be 'auto' or a positive integer"),
        (dict(dt_min=0.2, dt_max=0.1), "dt_min ≤ dt_max"),
        (dict(kernel_backend="cuda"), "kernel_backend must be one of"),
        (dict(quantization_bits=3), "quantization_bits must be 4 or 8"),
        (dict(eos_token_id=600), "eos_token_id=600 is outside the vocabulary"),
        (dict(rms_norm_eps=0), "rms_norm_eps must be in"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        get_mamba_config("tiny", **overrides)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset '3b'.*tiny, 130m, 370m, 1b, 2b, 8b, 16b"):
        get_mamba_config("3b")


def test_bad_json_configs(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"hidden_size": 64,, }')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON \(line 1"):
        load_mamba_config(broken)
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"hidden_size": 64, "num_layers": 2}))
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) num_layers"):
        load_mamba_config(typo)
    wrong_type = tmp_path / "hf.json"
    wrong_type.write_text(json.dumps({"model_type": "mamba", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="model_type is 'mamba'"):
        load_mamba_config(wrong_type)
    bad_value = tmp_path / "bad.json"
    bad_value.write_text(json.dumps({"hidden_size": 64, "state_size": 0}))
    with pytest.raises(ConfigError, match="bad.json: state_size must be an integer > 0"):
        load_mamba_config(bad_value)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_mamba_config(listing)
    with pytest.raises(ConfigError, match="neither a file nor a preset name"):
        load_mamba_config(tmp_path / "missing.json")
