"""INT4/INT8 RTN: QuantizedLinear storage and matmul, and save → load that stays quantized."""

import json

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import tiny_model
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from moai_lib.quant import (
    IntWeightOnlyConfig,
    QuantizationError,
    QuantizedLinear,
    load_quantized,
    quantize_,
    quantize_model,
    quantized_modules,
)
from moai_lib.quant import primitives as P


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, -1, True), (8, 64, False)])
def test_quantized_linear_storage_and_matmul(bits, group_size, symmetric):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48, bias=True)
    q = QuantizedLinear.from_float(linear, bits, group_size, symmetric)
    n_groups = 1 if group_size == -1 else 128 // group_size
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (48, 128 * bits // 8)
    assert q.scales.shape == q.zeros.shape == (48, n_groups) and q.zeros.dtype == torch.uint8
    assert not any(p.requires_grad for p in q.parameters())
    # The stored integers are the RTN integers.
    qp = P.compute_qparams(linear.weight, bits, group_size, symmetric)
    assert torch.equal(q.integers(), P.quantize_rtn(linear.weight, qp))
    assert torch.equal(q.dequantize_weight(), P.fake_quantize(linear.weight.detach(), bits, group_size, symmetric))
    x = torch.randn(3, 5, 128)
    assert torch.equal(q(x), F.linear(x, q.dequantize_weight(), linear.bias))
    floor = 20.0 if bits == 4 else 40.0
    assert P.sqnr(linear(x), q(x)) >= floor


def test_int4_storage_is_half_a_byte_per_weight():
    model = tiny_model()
    quantize_model(model, bits=4, group_size=32)
    for fqn, m in quantized_modules(model).items():
        assert m.qweight.numel() == m.in_features * m.out_features // 2, fqn


@pytest.mark.parametrize("bits,dtype", [(4, torch.float32), (8, torch.float32), (4, torch.bfloat16)])
def test_save_load_stays_quantized_with_identical_logits(tmp_path, bits, dtype):
    model = tiny_model().to(dtype)
    quantize_(model, IntWeightOnlyConfig(bits=bits, group_size=32))
    ids = torch.randint(0, 512, (2, 12))
    logits = model(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "moai" and len(qc["modules"]) == 10
    assert qc["policy"]["filter"] == "default"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("backbone.layers.0.mixer.in_proj.qweight").get_dtype() == "U8"
    assert "backbone.layers.0.mixer.in_proj.weight" not in keys
    assert "backbone.layers.0.mixer.dt_proj.weight" in keys

    loaded = load_quantized(tmp_path, dtype=dtype)
    assert set(quantized_modules(loaded)) == set(quantized_modules(model))
    layer = loaded.backbone.layers[1].mlp.fc2
    assert isinstance(layer, QuantizedLinear) and layer.bits == bits and layer.scales.dtype == dtype
    assert torch.equal(loaded(ids, use_cache=False).logits, logits)
    # Plain from_pretrained works too once moai_lib.quant is imported (the quantizer is registered).
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    assert torch.equal(again(ids, use_cache=False).logits, logits)


def test_load_quantized_refuses_a_float_checkpoint(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(QuantizationError, match="load_quantized: .* has no moai quantization_config"):
        load_quantized(tmp_path)


def test_generate_runs_on_a_quantized_model():
    model = tiny_model()
    quantize_model(model, bits=4, group_size=64)
    ids = torch.randint(0, 512, (1, 5))
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    # Greedy decoding with the recurrent cache agrees with full forward passes.
    full = model(out[:, :-1], use_cache=False).logits[:, 4:].argmax(-1)
    assert torch.equal(full, out[:, 5:])


def test_int4mm_kernel_on_cpu_matches_the_dequantized_matmul():
    torch.manual_seed(0)
    layer = QuantizedLinear.from_float(nn.Linear(256, 64, bias=True), 4, 64, symmetric=False)
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16)
    cpu = torch.device("cpu")
    assert layer.resolve_backend(cpu, torch.bfloat16) == "int4mm"
    assert layer.resolve_backend(cpu, torch.float32) == "dequant"  # auto never lowers activation precision
    fast = layer(x)
    exact = F.linear(x.float(), layer.dequantize_weight(), layer.bias)
    # Only the bf16 rounding of s, (8 − z)·s and the output separate the two (measured ≈ 47 dB).
    assert fast.dtype == torch.bfloat16 and P.sqnr(exact, fast) >= 40.0
    layer.backend = "dequant"
    assert P.sqnr(exact, layer(x)) >= 40.0 and not torch.equal(layer(x), fast)


def test_int4mm_takes_strided_inputs_and_inference_mode_weights():
    # The mixer feeds x_proj/out_proj transposed views; a model quantized under inference_mode has inference
    # tensors, which have no version counter for the packed-weight cache.
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = QuantizedLinear.from_float(nn.Linear(128, 32), 4, 32, symmetric=False)
        x = torch.randn(2, 128, 5, dtype=torch.bfloat16).transpose(1, 2)  # (2, 5, 128), not contiguous
        assert not x.is_contiguous()
        y = layer(x)
        assert torch.equal(y, layer(x.contiguous()))
    assert P.sqnr(F.linear(x.float(), layer.dequantize_weight(), layer.bias), y) >= 40.0


def test_explicit_backend_that_cannot_run_is_an_error():
    layer = QuantizedLinear.from_float(nn.Linear(64, 40), 4, 32, False)  # 40 outputs: not a multiple of 16
    layer.backend = "int4mm"
    with pytest.raises(QuantizationError, match="int: backend 'int4mm' cannot run here: int4mm on CPU needs "
                                                "out_features % 16 == 0, got 40; use backend='dequant'"):
        layer(torch.randn(2, 64))
    int8 = QuantizedLinear.from_float(nn.Linear(64, 16), 8, 32, False)
    assert "int4mm needs 4 bits" in int8.int4mm_problem(torch.device("cuda"))
    with pytest.raises(QuantizationError, match="int: unknown backend 'marlin'"):
        QuantizedLinear(64, 16, 4, 32, False, backend="marlin")
