"""The quantize_ verb: default policy, filters, steps, metadata and the errors for bad requests."""

import dataclasses

import pytest
import torch
from quant_helpers import tiny_model
from torch import nn

from moai_lib.quant import (
    DEFAULT_QUANTIZED_LAYERS,
    AWQConfig,
    FP4Config,
    GPTQConfig,
    IntWeightOnlyConfig,
    QATConfig,
    QuantizationError,
    QuantizedLinear,
    layer_filter,
    quantize_,
    quantize_model,
    quantized_modules,
)


def test_default_filter_quantizes_the_mamba_projections_and_leaves_everything_else_untouched():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_(model, IntWeightOnlyConfig(bits=4, group_size=32))
    names = set(quantized_modules(model))
    expected = {f"backbone.layers.{i}.{sub}" for i in range(2)
                for sub in ("mixer.in_proj", "mixer.x_proj", "mixer.out_proj", "mlp.fc1", "mlp.fc2")}
    assert names == expected
    after = model.state_dict()
    untouched = [k for k in before if not any(k.startswith(n + ".") for n in expected)]
    # dt_proj, conv1d, A_log, D, norms, embedding, lm_head: bit-identical and still in their modules.
    assert any(".dt_proj." in k for k in untouched) and any("A_log" in k for k in untouched)
    for key in untouched:
        assert torch.equal(after[key], before[key]), key
    for layer in model.backbone.layers:
        assert type(layer.mixer.dt_proj) is nn.Linear and type(layer.mixer.conv1d) is nn.Conv1d
    assert type(model.lm_head) is nn.Linear


def test_policy_is_recorded_and_overridable():
    model = tiny_model(tie_word_embeddings=False)
    quantize_(model, IntWeightOnlyConfig(bits=8, group_size=32),
              filter_fn=layer_filter(*DEFAULT_QUANTIZED_LAYERS, "lm_head"))
    assert isinstance(model.lm_head, QuantizedLinear)
    qc = model.config.quantization_config.to_dict()
    assert qc["quant_method"] == "moai"
    assert qc["policy"]["layer_names"] == sorted([*DEFAULT_QUANTIZED_LAYERS, "lm_head"])
    assert qc["policy"]["kept_high_precision"] == ["backbone.layers.0.mixer.dt_proj",
                                                    "backbone.layers.1.mixer.dt_proj"]
    assert qc["modules"]["lm_head"] == {"kind": "int", "bits": 8, "group_size": 32, "symmetric": False,
                                        "input_scale": False}
    assert qc["methods"][0]["method"] == "rtn" and "lm_head" in qc["methods"][0]["modules"]


def test_second_call_quantizes_what_the_first_left():
    model = tiny_model()
    quantize_(model, IntWeightOnlyConfig(bits=8, group_size=32), filter_fn=layer_filter("in_proj"))
    quantize_(model, IntWeightOnlyConfig(bits=4, group_size=32))
    bits = {fqn.rsplit(".", 1)[-1]: m.bits for fqn, m in quantized_modules(model).items()}
    assert bits == {"in_proj": 8, "x_proj": 4, "out_proj": 4, "fc1": 4, "fc2": 4}
    assert len(model.config.quantization_config.methods) == 2


def test_tied_lm_head_is_refused():
    model = tiny_model()  # tiny ties lm_head to the embedding
    with pytest.raises(QuantizationError, match="rtn: lm_head shares its weight with backbone.embedding.*"
                                                "tie_word_embeddings=False"):
        quantize_(model, IntWeightOnlyConfig(group_size=32), filter_fn=layer_filter("lm_head"))


def test_group_size_that_does_not_divide_names_the_layer_and_a_valid_size():
    model = tiny_model()
    with pytest.raises(QuantizationError, match=r"rtn: layer backbone\.layers\.0\.mixer\.in_proj has input width "
                                                r"64, not divisible by group_size=128; use group_size=64"):
        quantize_model(model, bits=4, group_size=128)
    assert not quantized_modules(model)  # checked before anything changed
    with pytest.raises(QuantizationError, match="fp4: layer .*dt_proj has input width 8"):
        quantize_(model, FP4Config("nvfp4"), filter_fn=layer_filter("dt_proj"))


@pytest.mark.parametrize("make,match", [
    (lambda: IntWeightOnlyConfig(bits=3), r"rtn: bits=3 is not supported; use bits in \(4, 8\)"),
    (lambda: IntWeightOnlyConfig(group_size=100), "rtn: group_size=100 is not supported; use one of 32, 64, 128, -1"),
    (lambda: AWQConfig(bits=8), r"awq: bits=8 is not supported; use bits in \(4,\)"),
    (lambda: AWQConfig(group_size=-1), "awq: group_size=-1 is not supported; use one of 32, 64, 128"),
    (lambda: GPTQConfig(damp_percent=0), "gptq: damp_percent=0"),
    (lambda: QATConfig(step="train"), "qat: step must be 'prepare' or 'convert'"),
])
def test_bad_settings_name_the_method_and_the_fix(make, match):
    with pytest.raises(QuantizationError, match=match):
        make()


def test_convert_without_prepare_names_the_missing_step():
    model = tiny_model()
    with pytest.raises(QuantizationError, match="gptq: convert called, but the model was never prepared; the "
                                                "missing step is 'prepare'"):
        quantize_(model, GPTQConfig(group_size=32, step="convert"))
    with pytest.raises(QuantizationError, match="qat: .*missing step is 'prepare'.* then train"):
        quantize_(model, QATConfig(group_size=32, step="convert"))


def test_convert_checks_it_matches_prepare():
    model = tiny_model()
    cfg = QATConfig(bits=4, group_size=32)
    quantize_(model, cfg)
    with pytest.raises(QuantizationError, match="qat: convert settings differ from prepare .*group_size: "
                                                "prepared 32, convert 64"):
        quantize_(model, QATConfig(bits=4, group_size=64, step="convert"))
    with pytest.raises(QuantizationError, match="prepared for qat, not gptq"):
        quantize_(model, GPTQConfig(group_size=32, step="convert"))
    with pytest.raises(QuantizationError, match="waits for its convert step"):
        quantize_(model, IntWeightOnlyConfig(group_size=32))
    quantize_(model, dataclasses.replace(cfg, step="convert"))
    assert len(quantized_modules(model)) == 10


def test_non_linear_selection_and_empty_selection_are_errors():
    model = tiny_model()
    with pytest.raises(QuantizationError, match=r"rtn: filter_fn selected backbone\.layers\.0\.mixer\.conv1d "
                                                r"\(Conv1d\); only nn.Linear"):
        quantize_(model, IntWeightOnlyConfig(group_size=32), filter_fn=lambda m, fqn: fqn.endswith("conv1d"))
    quantize_(model, IntWeightOnlyConfig(group_size=32))
    with pytest.raises(QuantizationError, match="selected no nn.Linear layer"):
        quantize_(model, IntWeightOnlyConfig(group_size=32))


def test_calibrated_methods_refuse_layers_outside_the_blocks():
    model = tiny_model(tie_word_embeddings=False)
    with pytest.raises(QuantizationError, match="gptq: calibrates layers inside backbone.layers only.*lm_head"):
        quantize_(model, GPTQConfig(group_size=32), filter_fn=layer_filter("fc1", "lm_head"))


@pytest.mark.parametrize("make,bits_per_weight", [
    # INT4 g32 with fp32 scales: 4 + (32 + 8) / 32 = 5.25; with bf16 scales: 4 + (16 + 8) / 32 = 4.75.
    (lambda m: quantize_(m, IntWeightOnlyConfig(bits=4, group_size=32)), 5.25),
    (lambda m: quantize_(m.to(torch.bfloat16), IntWeightOnlyConfig(bits=4, group_size=32)), 4.75),
    # INT8 g64 fp32 scales: 8 + 40 / 64 = 8.625.
    (lambda m: quantize_(m, IntWeightOnlyConfig(bits=8, group_size=64)), 8.625),
])
def test_storage_summary(make, bits_per_weight):
    from moai_lib.quant import storage_summary

    model = tiny_model()
    float_bytes = storage_summary_float(model)
    make(model)
    summary = storage_summary(model)
    # Ten layers: in_proj, fc1 64→256; x_proj 128→40; out_proj, fc2 128→64 (per block, two blocks).
    assert summary["quantized_weights"] == 2 * (2 * 64 * 256 + 128 * 40 + 2 * 128 * 64)
    assert summary["bits_per_weight"] == pytest.approx(bits_per_weight)
    assert summary["model_bytes"] < float_bytes


def storage_summary_float(model):
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
