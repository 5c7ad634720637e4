"""GPTQ v1 and AWQ GEMM packed exports: hand-computed words, decode round trips, files and configs."""

import dataclasses
import json

import pytest
import torch
from quant_helpers import tiny_model
from safetensors.torch import load_file
from torch import nn

from moai_lib.quant import (
    GPTQConfig,
    IntWeightOnlyConfig,
    QuantizationError,
    QuantizedLinear,
    export_awq,
    export_gptq,
    pack_awq,
    pack_gptq,
    quantize_,
    quantize_awq,
    quantized_modules,
    unpack_awq,
    unpack_gptq,
)
from moai_lib.quant import primitives as P


def known_layer() -> QuantizedLinear:
    """8 → 8 INT4 layer, one group per row, with q[o, j] = (o + j) % 16, z[o] = o + 1, s[o] = (o + 1) / 8."""
    o, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    q = ((o + j) % 16).to(torch.uint8)
    qp = P.QParams(scale=(torch.arange(8.0) + 1)[:, None] / 8, zero=(torch.arange(8) + 1)[:, None].to(torch.uint8),
                   bits=4, group_size=-1)
    return QuantizedLinear.from_integers(nn.Linear(8, 8, bias=False), q, qp, symmetric=False)


def as_int32(word: int) -> int:
    return word - 2 ** 32 if word >= 2 ** 31 else word


def test_gptq_v1_words_by_hand():
    t = pack_gptq(known_layer())
    assert t["qweight"].shape == (1, 8) and t["qweight"].dtype == torch.int32
    # Column o holds q[o, 0..7] at bits 4j: o = 0 → 0x76543210, o = 1 → 0x87654321, o = 7 → 0xEDCBA987.
    assert t["qweight"][0, 0].item() == 0x76543210
    assert t["qweight"][0, 1].item() == as_int32(0x87654321)
    assert t["qweight"][0, 7].item() == as_int32(0xEDCBA987)
    # v1 stores z − 1 = o at bits 4o of the single word.
    assert t["qzeros"].shape == (1, 1) and t["qzeros"].item() == 0x76543210
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (1, 8)
    assert t["scales"][0].tolist() == [(o + 1) / 8 for o in range(8)]
    assert t["g_idx"].tolist() == [0] * 8
    # gptq_v2 stores z itself.
    assert pack_gptq(known_layer(), "gptq_v2")["qzeros"].item() == as_int32(0x87654321)


def test_awq_gemm_words_by_hand():
    t = pack_awq(known_layer())
    assert t["qweight"].shape == (8, 1) and t["qweight"].dtype == torch.int32
    # Row j holds q[o, j] for o in AWQ order (0, 2, 4, 6, 1, 3, 5, 7) at bits 4i.
    assert t["qweight"][0, 0].item() == 0x75316420  # q[o, 0] = o
    assert t["qweight"][1, 0].item() == as_int32(0x86427531)  # q[o, 1] = o + 1
    assert t["qzeros"].item() == as_int32(0x86427531)  # z[o] = o + 1, no − 1
    assert "input_scale" not in t


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 64, True), (8, 32, False)])
def test_gptq_pack_decodes_to_the_same_integers(bits, group_size, symmetric):
    torch.manual_seed(0)
    layer = QuantizedLinear.from_float(nn.Linear(128, 64), bits, group_size, symmetric)
    fmt = "gptq" if symmetric else "gptq_v2"  # asymmetric zero points may be 0, which v1 cannot store
    t = pack_gptq(layer, fmt)
    assert t["qweight"].shape == (128 * bits // 32, 64) and t["qzeros"].shape == (128 // group_size, 64 * bits // 32)
    q, z, scales, g_idx = unpack_gptq(t, bits, fmt)
    assert torch.equal(q, layer.integers().int()) and torch.equal(z, layer.zeros.int())
    assert torch.equal(scales, layer.scales.half()) and torch.equal(g_idx, torch.arange(128) // group_size)


def test_awq_pack_decodes_to_the_same_integers():
    torch.manual_seed(0)
    layer = QuantizedLinear.from_float(nn.Linear(128, 64), 4, 32, False, input_scale=torch.rand(128) + 0.5)
    t = pack_awq(layer)
    assert t["qweight"].shape == (128, 8) and t["qzeros"].shape == (4, 8) and t["scales"].shape == (4, 64)
    q, z, scales = unpack_awq(t)
    assert torch.equal(q, layer.integers().int()) and torch.equal(z, layer.zeros.int())
    assert torch.equal(scales, layer.scales.half()) and torch.equal(t["input_scale"], layer.input_scale.half())


def test_gptq_v1_refuses_a_zero_point_of_zero():
    layer = known_layer()
    layer.zeros[3] = 0
    with pytest.raises(QuantizationError, match="gptq export: a zero point is 0.*checkpoint_format='gptq_v2'"):
        pack_gptq(layer)


def test_export_gptq_files(tmp_path):
    model = tiny_model()
    quantize_(model, IntWeightOnlyConfig(bits=4, group_size=32, symmetric=True))
    export_gptq(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] is True
    assert qc["checkpoint_format"] == "gptq"
    assert qc["modules_in_block_to_quantize"] == [["mixer.in_proj"], ["mixer.x_proj"], ["mixer.out_proj"],
                                                  ["mlp.fc1"], ["mlp.fc2"]]
    assert qc["modules_to_not_convert"] == ["backbone.layers.0.mixer.dt_proj", "backbone.layers.1.mixer.dt_proj",
                                            "lm_head"]
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied to the embedding
    assert tensors["backbone.layers.0.mixer.dt_proj.weight"].dtype == torch.float32
    for fqn, layer in quantized_modules(model).items():
        t = {k: tensors[f"{fqn}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        q, z, _, _ = unpack_gptq(t, 4)
        assert torch.equal(q, layer.integers().int()) and torch.equal(z, layer.zeros.int()), fqn


def test_export_awq_files(tmp_path, trained_tiny):
    model = quantize_awq(trained_tiny.fresh(), trained_tiny.calib[:8], w_bit=4, group_size=32)
    export_awq(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["zero_point"] is True
    assert qc["input_scale_modules"] == sorted(f"backbone.layers.{i}.{s}" for i in range(2)
                                               for s in ("mixer.x_proj", "mixer.out_proj", "mlp.fc2"))
    tensors = load_file(tmp_path / "model.safetensors")
    # The folded norms are written as ordinary (changed) weights.
    assert torch.equal(tensors["backbone.layers.0.norm.weight"], model.backbone.layers[0].norm.weight)
    q, z, _ = unpack_awq({k: tensors[f"backbone.layers.1.mlp.fc1.{k}"] for k in ("qweight", "qzeros", "scales")})
    assert torch.equal(q, model.backbone.layers[1].mlp.fc1.integers().int())


def test_export_errors_name_the_fix(tmp_path):
    with pytest.raises(QuantizationError, match="gptq export: the model has no quantized layers; quantize_ it first"):
        export_gptq(tiny_model(), tmp_path)
    model = tiny_model()
    quantize_(model, IntWeightOnlyConfig(bits=8, group_size=32))
    with pytest.raises(QuantizationError, match="awq export: the AWQ GEMM format is 4-bit.*export_gptq"):
        export_awq(model, tmp_path)
    odd = tiny_model(dt_rank=4)  # x_proj: 4 + 2·16 = 36 outputs
    quantize_(odd, IntWeightOnlyConfig(bits=4, group_size=32, symmetric=True))
    with pytest.raises(QuantizationError, match=r"gptq export: backbone\.layers\.0\.mixer\.x_proj has 36 outputs, "
                                                "not a multiple of 8"):
        export_gptq(odd, tmp_path)


def reference_gptq_v1_dequantize(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Ŵ (out, in) fp32 from GPTQ v1 tensors, written from the published layout (AutoGPTQ's QuantLinear
    dequantization), independently of moai_lib's unpacker: qweight int32 (in·b/32, out) holds input row j at
    bits b·(j mod 32/b) of word j // (32/b); qzeros int32 (groups, out·b/32) holds zero − 1 of output o at bits
    b·(o mod 32/b); w[o, j] = (q[o, j] − (qzeros[g_idx[j], o] + 1)) · scales[g_idx[j], o]."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    qweight = t["qweight"].to(torch.int64) & 0xFFFFFFFF
    qzeros = t["qzeros"].to(torch.int64) & 0xFFFFFFFF
    n_in, n_out = qweight.shape[0] * per_word, qweight.shape[1]
    rows = torch.arange(n_in)
    q = (qweight[rows // per_word] >> (bits * (rows % per_word))[:, None]) & mask  # (in, out)
    cols = torch.arange(n_out)
    z = ((qzeros[:, cols // per_word] >> (bits * (cols % per_word))[None, :]) & mask) + 1  # (groups, out)
    g_idx = t["g_idx"].long()
    w = (q - z[g_idx]).double() * t["scales"].double()[g_idx]  # (in, out)
    return w.T.float()


def test_gptq_act_order_export_decodes_to_our_weights(tmp_path, trained_tiny):
    config = GPTQConfig(group_size=32, symmetric=True, act_order=True)  # symmetric: z = 8, storable in v1
    model = trained_tiny.fresh()
    quantize_(model, config)
    for batch in trained_tiny.calib.split(8):
        model(batch, use_cache=False)
    quantize_(model, dataclasses.replace(config, step="convert"))
    model.half()  # the format stores fp16 scales: compare with the weights this fp16 model computes with
    export_gptq(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["static_groups"] is False and qc["checkpoint_format"] == "gptq"
    tensors = load_file(tmp_path / "model.safetensors")
    for fqn, layer in quantized_modules(model).items():
        t = {k: tensors[f"{fqn}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(t["g_idx"], layer.g_idx), fqn
        assert not torch.equal(t["g_idx"].long(), torch.arange(layer.in_features) // 32), fqn  # permuted
        assert torch.equal(reference_gptq_v1_dequantize(t, 4), layer.dequantize_weight(torch.float32)), fqn


def test_awq_export_refuses_a_permuted_g_idx(tmp_path):
    model = tiny_model()
    quantize_(model, IntWeightOnlyConfig(bits=4, group_size=32))
    fc1 = model.backbone.layers[0].mlp.fc1
    permuted = QuantizedLinear.from_integers(nn.Linear(fc1.in_features, fc1.out_features, bias=False),
                                             fc1.integers(), dataclasses.replace(
                                                 fc1.qparams(), g_idx=torch.arange(fc1.in_features).flip(0)
                                                 .div(32, rounding_mode="floor").int()), symmetric=False)
    model.backbone.layers[0].mlp.fc1 = permuted
    with pytest.raises(QuantizationError, match=r"awq export: backbone\.layers\.0\.mlp\.fc1 is GPTQ act-order "
                                                "with a permuted g_idx.*use export_gptq"):
        export_awq(model, tmp_path)
