"""`moai_lib.model.convert` on bad and edge-case inputs: every refusal names the field or tensors at fault.

Agreement of converted models with HF Mamba and mamba-ssm is in test_conformance.py.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moai_lib import MoaiMambaConfig, MoaiMambaForCausalLM
from moai_lib.model.convert import (
    ConversionError,
    config_from_hf_mamba,
    config_from_mamba_ssm,
    config_to_hf_mamba,
    config_to_mamba_ssm,
    export_to_hf_mamba,
    load_external_checkpoint,
    save_mamba_ssm_checkpoint,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: intra-op threads only add synchronisation (very costly on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed=0, **overrides) -> MoaiMambaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=0)
    return MoaiMambaForCausalLM(MoaiMambaConfig(**{**fields, **overrides})).eval()


def mamba_ssm_config(**overrides) -> dict:
    cfg = dict(d_model=32, d_intermediate=0, n_layer=2, vocab_size=64, ssm_cfg={"layer": "Mamba1"},
               attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
               pad_vocab_size_multiple=8, tie_embeddings=True)
    cfg.update(overrides)
    return cfg


def write_dir(path, config: dict, state_dict: dict | None = None, *, pickle: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if state_dict is not None:
        if pickle:
            torch.save(state_dict, path / "pytorch_model.bin")
        else:
            save_file({k: v.contiguous() for k, v in state_dict.items()}, path / "model.safetensors")
    return path


def model_state(model) -> dict:
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        del sd["lm_head.weight"]
    return sd


# Configs that cannot be represented ---------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(ssm_cfg={"layer": "Mamba2", "headdim": 16}), r"ssm_cfg\.layer is 'Mamba2'.*only 'Mamba1'"),
    (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 4}), r"attn_layer_idx=\[1\].*no attention layers"),
    (dict(rms_norm=False), r"rms_norm=False means LayerNorm"),
    (dict(ssm_cfg={"layer": "Mamba1", "headdim": 16}), r"ssm_cfg has unsupported key\(s\) headdim"),
    (dict(norm_epsilon=1e-6), r"unknown key\(s\) norm_epsilon"),
    (dict(d_intermediate=-1), r"d_intermediate must be an integer ≥ 0"),
    (dict(ssm_cfg={"expand": 1.5}), r"expand_factor must be an integer"),
])
def test_mamba_ssm_config_refusals(overrides, message):
    with pytest.raises(ConversionError, match=message):
        config_from_mamba_ssm(mamba_ssm_config(**overrides))


@pytest.mark.parametrize("overrides, message", [
    (dict(model_type="mamba2"), r"model_type 'mamba2' is not supported: it is a Mamba-2"),
    (dict(model_type="falcon_mamba"), r"model_type 'falcon_mamba'.*RMS norms on B, C"),
    (dict(model_type="llama"), r"model_type 'llama' is not supported"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
    (dict(intermediate_size=100), r"intermediate_size=100 is not expand·hidden_size=64"),
])
def test_hf_config_refusals(overrides, message):
    cfg = {**dict(model_type="mamba", vocab_size=64, hidden_size=32, num_hidden_layers=2), **overrides}
    with pytest.raises(ConversionError, match=message):
        config_from_hf_mamba(cfg)


def test_refusal_from_a_directory_names_the_file(tmp_path):
    write_dir(tmp_path, mamba_ssm_config(ssm_cfg={"layer": "Mamba2"}))
    with pytest.raises(ConversionError, match=r"config\.json: mamba-ssm config: ssm_cfg\.layer is 'Mamba2'"):
        load_external_checkpoint(tmp_path)
    write_dir(tmp_path / "hf", dict(model_type="mamba2", hidden_size=32))
    with pytest.raises(ConversionError, match=r"model_type 'mamba2'"):
        load_external_checkpoint(tmp_path / "hf")


def test_unrecognised_or_missing_config(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        load_external_checkpoint(tmp_path)
    write_dir(tmp_path, {"hidden": 3})
    with pytest.raises(ConversionError, match="not a recognised Mamba config"):
        load_external_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="not valid JSON"):
        load_external_checkpoint(tmp_path)


# Config translation ------------------------------------------------------------------------------------------
def test_mamba_ssm_config_translation():
    cfg = config_from_mamba_ssm(mamba_ssm_config(d_intermediate=100, vocab_size=50277, tie_embeddings=False,
                                                 ssm_cfg={"d_state": 8, "d_conv": 3, "bias": True}))
    assert cfg.intermediate_size == 128  # mamba-ssm's GatedMLP rounds up to a multiple of 128
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (50277, 50280)
    assert (cfg.state_size, cfg.conv_kernel_size, cfg.use_bias, cfg.tie_word_embeddings) == (8, 3, True, False)
    # Old checkpoints (mamba-130m) have no d_intermediate / tie_embeddings / ssm_cfg.layer: the defaults apply.
    old = config_from_mamba_ssm(dict(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={}, rms_norm=True,
                                     residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8))
    assert old.intermediate_size == 0 and old.tie_word_embeddings
    back = config_to_mamba_ssm(cfg)
    assert back["d_intermediate"] == 128 and back["ssm_cfg"]["layer"] == "Mamba1" and back["ssm_cfg"]["bias"]
    assert config_from_mamba_ssm(back).to_dict() == cfg.to_dict()


def test_hf_config_translation():
    cfg = config_from_hf_mamba(dict(model_type="mamba", vocab_size=50277, hidden_size=32, num_hidden_layers=2,
                                    time_step_rank="auto", intermediate_size=64, layer_norm_epsilon=1e-6,
                                    use_mambapy=True, some_future_key=1))
    # HF's vocab_size is the embedding size itself: no padding on top of it.
    assert cfg.padded_vocab_size == 50277 and cfg.time_step_rank == 2 and cfg.rms_norm_eps == 1e-6
    assert cfg.tie_word_embeddings and cfg.intermediate_size == 0
    ours = MoaiMambaConfig(vocab_size=250, hidden_size=32, num_hidden_layers=2)
    hf = config_to_hf_mamba(ours)
    assert hf["vocab_size"] == 256 and hf["time_step_rank"] == 2 and hf["rescale_prenorm_residual"] is False
    assert config_from_hf_mamba(hf).padded_vocab_size == 256


# Weights that do not match ------------------------------------------------------------------------------------
def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = model_state(small_model())
    del sd["backbone.layers.1.mixer.D"]
    sd["backbone.layers.0.mixer.rotary.weight"] = torch.zeros(3)
    write_dir(tmp_path, mamba_ssm_config(), sd)
    with pytest.raises(ConversionError) as info:
        load_external_checkpoint(tmp_path)
    msg = str(info.value)
    assert "missing key(s): backbone.layers.1.mixer.D" in msg
    assert "unexpected key(s): backbone.layers.0.mixer.rotary.weight" in msg


@pytest.mark.parametrize("config_overrides, hint", [
    (dict(ssm_cfg={"layer": "Mamba1", "bias": True}), "projection biases disagree with use_bias=True"),
    (dict(ssm_cfg={"layer": "Mamba1", "conv_bias": False}), "conv biases disagree with use_conv_bias=False"),
    (dict(d_intermediate=128), "MLP weights disagree with intermediate_size=128"),
    (dict(tie_embeddings=False), "tie_word_embeddings=False but there is no lm_head.weight"),
    (dict(n_layer=1), "the weights have layer 1 but num_hidden_layers=1"),
])
def test_config_weight_mismatch_hints(tmp_path, config_overrides, hint):
    write_dir(tmp_path, mamba_ssm_config(**config_overrides), model_state(small_model()))
    with pytest.raises(ConversionError, match="the weights do not match the config") as info:
        load_external_checkpoint(tmp_path)
    assert hint in str(info.value)


def test_wrong_shapes_are_listed(tmp_path):
    sd = model_state(small_model())
    write_dir(tmp_path, mamba_ssm_config(ssm_cfg={"layer": "Mamba1", "d_state": 8}), sd)
    with pytest.raises(ConversionError, match="tensor shapes do not match") as info:
        load_external_checkpoint(tmp_path)
    assert "backbone.layers.0.mixer.A_log: checkpoint (64, 16) vs model (64, 8)" in str(info.value)


def test_tied_config_with_a_different_lm_head_is_refused(tmp_path):
    sd = dict(small_model(tie_word_embeddings=False).state_dict())
    write_dir(tmp_path, mamba_ssm_config(tie_embeddings=True), sd)
    with pytest.raises(ConversionError, match="lm_head.weight differs from the embedding"):
        load_external_checkpoint(tmp_path)


def test_no_weights(tmp_path):
    write_dir(tmp_path, mamba_ssm_config())
    with pytest.raises(ConversionError, match="no weights found"):
        load_external_checkpoint(tmp_path)


# Pickle files ---------------------------------------------------------------------------------------------------
class NotATensor:
    pass


def test_pickle_is_opt_in_and_weights_only(tmp_path):
    model = small_model()
    write_dir(tmp_path / "ok", mamba_ssm_config(), dict(model.state_dict()), pickle=True)
    with pytest.raises(ConversionError, match=r"a pickle file.*Pass allow_pickle=True if you trust it"):
        load_external_checkpoint(tmp_path / "ok")
    loaded = load_external_checkpoint(tmp_path / "ok", allow_pickle=True)
    assert torch.equal(loaded.backbone.layers[1].mixer.A_log, model.backbone.layers[1].mixer.A_log)
    # Even with allow_pickle, arbitrary objects are refused (torch.load(weights_only=True)).
    write_dir(tmp_path / "bad", mamba_ssm_config(), {"x": NotATensor()}, pickle=True)
    with pytest.raises(ConversionError, match=r"refused by torch\.load\(weights_only=True\)"):
        load_external_checkpoint(tmp_path / "bad", allow_pickle=True)
    write_dir(tmp_path / "odd", mamba_ssm_config(), {"step": 3}, pickle=True)
    with pytest.raises(ConversionError, match="non-tensor entries: step"):
        load_external_checkpoint(tmp_path / "odd", allow_pickle=True)


def test_safetensors_preferred_over_pickle(tmp_path):
    model = small_model()
    save_mamba_ssm_checkpoint(model, tmp_path, write_pytorch_bin=True)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "pytorch_model.bin"}
    load_external_checkpoint(tmp_path)  # no allow_pickle needed: model.safetensors is read


# Loading options and formats -------------------------------------------------------------------------------------
def test_dtype_keeps_a_log_and_d_fp32(tmp_path):
    model = small_model()
    export_to_hf_mamba(model, tmp_path)
    loaded = load_external_checkpoint(tmp_path, dtype="bfloat16")
    mixer = loaded.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.bfloat16 and loaded.lm_head.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    assert torch.equal(mixer.A_log, model.backbone.layers[0].mixer.A_log)
    assert mixer.A_log._no_weight_decay  # optimizer conventions survive loading
    assert not loaded.training
    with pytest.raises(ConversionError, match="dtype 'float99' is not a torch dtype"):
        load_external_checkpoint(tmp_path, dtype="float99")


def test_own_format_and_sharded_safetensors(tmp_path):
    model = small_model(intermediate_size=48, tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "ours")
    loaded = load_external_checkpoint(tmp_path / "ours")
    assert loaded.config.intermediate_size == 48
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    # The same weights split over two shards with an index.
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((tmp_path / "ours" / "config.json").read_text())
    sd = load_file(tmp_path / "ours" / "model.safetensors")
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, shard_dir / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    resharded = load_external_checkpoint(shard_dir)
    assert torch.equal(resharded.lm_head.weight, model.lm_head.weight)


# Writing what the target cannot represent -------------------------------------------------------------------------
def test_export_with_mlp_to_hf_is_refused(tmp_path):
    with pytest.raises(ConversionError, match=r"intermediate_size=48: HF MambaForCausalLM has no MLP"):
        export_to_hf_mamba(small_model(intermediate_size=48), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(intermediate_size=100), r"intermediate_size=100 cannot be represented.*multiple of 128"),
    (dict(rms_norm_eps=1e-6), r"rms_norm_eps=1e-06 cannot be represented"),
])
def test_save_mamba_ssm_refusals(tmp_path, overrides, message):
    with pytest.raises(ConversionError, match=message):
        save_mamba_ssm_checkpoint(small_model(**overrides), tmp_path)


def test_export_of_a_modified_model_is_refused(tmp_path):
    model = small_model()
    model.backbone.layers[0].mixer.register_buffer("qscale", torch.ones(1))  # e.g. a quantized layer
    with pytest.raises(ConversionError, match=r"not those of a plain MoaiMambaForCausalLM.*mixer\.qscale"):
        export_to_hf_mamba(model, tmp_path)
