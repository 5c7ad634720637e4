"""compressed-tensors export, checked with the compressed-tensors package itself: its config parser reads our
quantization_config, its compressors decompress our tensors to exactly our dequantized weights, and its own
compressor packs our weights into the same bytes."""

import dataclasses
import json

import pytest
import torch
from quant_helpers import tiny_model
from safetensors.torch import load_file

from moai_lib.quant import (
    AWQConfig,
    Float8Config,
    FP4Config,
    GPTQConfig,
    IntWeightOnlyConfig,
    QuantizationError,
    layer_filter,
    quantize_,
    quantized_modules,
)
from moai_lib.quant.compressed_tensors import dequantize_compressed, export_compressed_tensors

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

KEPT = ["backbone.layers.0.mixer.dt_proj", "backbone.layers.1.mixer.dt_proj", "lm_head"]


def read_export(path):
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    return qc, QuantizationConfig.model_validate(qc), load_file(path / "model.safetensors")


def scheme_of(parsed, fqn):
    groups = list(parsed.config_groups.values())
    if len(groups) == 1:
        assert groups[0].targets == ["Linear"]
        return groups[0]
    (scheme,) = [g for g in groups if fqn in g.targets]
    return scheme


def local_state(tensors, fqn):
    return {k[len(fqn) + 1:]: v for k, v in tensors.items() if k.startswith(fqn + ".")}


def check_decompresses_to_our_weights(model, path, fmt):
    qc, parsed, tensors = read_export(path)
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert parsed.format == fmt and parsed.ignore == KEPT
    for fqn, layer in quantized_modules(model).items():
        scheme = scheme_of(parsed, fqn)
        if scheme.format == "pack-quantized":
            assert f"{fqn}.weight" not in tensors and tensors[f"{fqn}.weight_packed"].dtype == torch.int32
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        weight = compressor.decompress(local_state(tensors, fqn), scheme)["weight"]
        assert weight.dtype == layer.weight.dtype and torch.equal(weight, layer.weight), fqn
        # Our spec decoder (the pipeline export's self-check) agrees with the package's.
        group = next(g for g in qc["config_groups"].values() if g["targets"] in (["Linear"], scheme.targets))
        assert torch.equal(dequantize_compressed(local_state(tensors, fqn), group), weight), fqn
    return qc, parsed, tensors


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 64, True), (8, -1, False),
                                                       (8, 32, True)])
def test_int_weight_only_is_pack_quantized(tmp_path, bits, group_size, symmetric):
    model = tiny_model()
    quantize_(model, IntWeightOnlyConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    export_compressed_tensors(model, tmp_path)
    qc, parsed, tensors = check_decompresses_to_our_weights(model, tmp_path, "pack-quantized")
    weights = parsed.config_groups["group_0"].weights
    assert weights.num_bits == bits and weights.type == "int" and weights.symmetric == symmetric
    assert weights.strategy == ("channel" if group_size == -1 else "group")
    assert weights.group_size == (None if group_size == -1 else group_size)
    assert parsed.config_groups["group_0"].input_activations is None  # W4A16 / W8A16
    # Byte for byte what the library's own compressor writes for these weights and qparams (it stores
    # signed integers: zero points shift by 2^(bits-1)).
    fqn = "backbone.layers.1.mixer.out_proj"
    layer = model.get_submodule(fqn)
    scheme = parsed.config_groups["group_0"]
    state = {"weight": layer.weight, "weight_scale": layer.scales,
             "weight_zero_point": layer.zeros.to(torch.int16).sub(1 << (bits - 1)).to(torch.int8)}
    theirs = BaseCompressor.get_value_from_registry("pack-quantized").compress(state, scheme)
    ours = local_state(tensors, fqn)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_gptq_and_folded_awq_are_pack_quantized(tmp_path, trained_tiny):
    model = trained_tiny.fresh()
    # AWQ on the layers whose scales fold into the norms, GPTQ (static-group act-order) on the rest: one
    # scheme, so one config group targeting "Linear".
    awq = AWQConfig(group_size=32)
    quantize_(model, awq, filter_fn=layer_filter("in_proj", "fc1"))
    model(trained_tiny.calib[:8], use_cache=False)
    quantize_(model, dataclasses.replace(awq, step="convert"))
    gptq = GPTQConfig(group_size=32, act_order=True, static_groups=True)
    quantize_(model, gptq, filter_fn=layer_filter("x_proj", "out_proj", "fc2"))
    model(trained_tiny.calib[:8], use_cache=False)
    quantize_(model, dataclasses.replace(gptq, step="convert"))
    assert all(m.input_scale is None for m in quantized_modules(model).values())
    export_compressed_tensors(model, tmp_path)
    _, parsed, _ = check_decompresses_to_our_weights(model, tmp_path, "pack-quantized")
    assert len(parsed.config_groups) == 1


def test_fp8_is_float_quantized_with_dynamic_per_token_activations(tmp_path):
    model = tiny_model()
    quantize_(model, Float8Config())
    export_compressed_tensors(model, tmp_path)
    _, parsed, tensors = check_decompresses_to_our_weights(model, tmp_path, "float-quantized")
    scheme = parsed.config_groups["group_0"]
    assert (scheme.weights.type, scheme.weights.strategy, scheme.weights.dynamic) == ("float", "channel", False)
    acts = scheme.input_activations
    assert (acts.num_bits, acts.type, acts.strategy, acts.dynamic) == (8, "float", "token", True)  # W8A8
    assert tensors["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.float8_e4m3fn


def test_mixed_schemes_target_layers_by_name(tmp_path):
    model = tiny_model()
    quantize_(model, IntWeightOnlyConfig(bits=4, group_size=32), filter_fn=layer_filter("in_proj", "fc1"))
    quantize_(model, Float8Config())
    export_compressed_tensors(model, tmp_path)
    _, parsed, _ = check_decompresses_to_our_weights(model, tmp_path, "mixed-precision")
    targets = sorted(t for g in parsed.config_groups.values() for t in g.targets)
    assert targets == sorted(quantized_modules(model))
    assert {g.format for g in parsed.config_groups.values()} == {"pack-quantized", "float-quantized"}


def test_what_the_format_cannot_express_is_refused(tmp_path, trained_tiny):
    with pytest.raises(QuantizationError, match="compressed-tensors export: the model has no quantized layers"):
        export_compressed_tensors(tiny_model(), tmp_path)
    awq = trained_tiny.fresh()
    quantize_(awq, AWQConfig(group_size=32))
    awq(trained_tiny.calib[:4], use_cache=False)
    quantize_(awq, AWQConfig(group_size=32, step="convert"))
    with pytest.raises(QuantizationError, match=r"compressed-tensors export: backbone\.layers\.0\.mixer\.x_proj is "
                                                r"an AWQ layer .*run time.*layer_filter\('in_proj', 'fc1'\)"):
        export_compressed_tensors(awq, tmp_path)
    act_order = trained_tiny.fresh()
    quantize_(act_order, GPTQConfig(group_size=32, act_order=True))
    act_order(trained_tiny.calib[:4], use_cache=False)
    quantize_(act_order, GPTQConfig(group_size=32, act_order=True, step="convert"))
    with pytest.raises(QuantizationError, match="compressed-tensors export: .* is GPTQ act-order with a permuted "
                                                r"g_idx.*static_groups=True.*export_gptq"):
        export_compressed_tensors(act_order, tmp_path)
    fp4 = tiny_model()
    quantize_(fp4, FP4Config("mxfp4"))
    with pytest.raises(QuantizationError, match="compressed-tensors export: .* is a FP4Linear.*save_pretrained"):
        export_compressed_tensors(fp4, tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("config", [IntWeightOnlyConfig(bits=4, group_size=32, symmetric=True), Float8Config()],
                         ids=["int4-sym", "fp8"])
def test_transformers_loads_the_export_with_its_compressed_tensors_quantizer(tmp_path, config):
    """End to end through transformers' own compressed-tensors loader (no moai quantizer involved): the layers
    decompress to our weights, and the INT4 model computes our logits bit for bit. (Asymmetric pack-quantized
    exports do not load this way with compressed-tensors 0.20.1 + transformers 5.24: the loader builds the
    compressed layout on the meta device without packing the zero points, then rejects the packed ones that
    the library's own compressor writes; the decompression tests above cover them.)"""
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    quantize_(model, config)
    export_compressed_tensors(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits
    for fqn, layer in quantized_modules(model).items():
        assert torch.equal(loaded.get_submodule(fqn).weight, layer.weight), fqn
    if isinstance(config, IntWeightOnlyConfig):
        assert torch.equal(theirs, ours)
    else:  # the same FP8 activation quantization, computed in another order: measured max |Δ| 3e-7
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
