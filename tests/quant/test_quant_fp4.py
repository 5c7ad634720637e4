"""FP4 E2M1 (MXFP4, NVFP4): the code table, rounding, scales, SQNR, storage and save/load."""

import pytest
import torch
from quant_helpers import tiny_model
from torch import nn

from moai_lib.quant import FP4Config, FP4Linear, QuantizationError, layer_filter, load_quantized, quantize_
from moai_lib.quant import primitives as P
from moai_lib.quant.fp4 import E2M1_VALUES, decode_e2m1, encode_e2m1, quantize_fp4

# SQNR floors (dB) on a seeded Gaussian 256 × 512 weight (measured: MXFP4 18.8, NVFP4 20.4). NVFP4's smaller
# groups and finer (E4M3) scales beat MXFP4's power-of-two scales by ~1.5 dB.
FP4_SQNR_DB = {"mxfp4": 18.0, "nvfp4": 19.5}


def test_code_table_round_trips():
    codes = torch.tensor([c for c in range(16) if c != 8], dtype=torch.uint8)  # 8 would be −0
    values = decode_e2m1(codes)
    assert values[:8].tolist() == list(E2M1_VALUES)
    assert values[8:].tolist() == [-v for v in E2M1_VALUES[1:]]
    assert torch.equal(encode_e2m1(values), codes)


def test_rounding_is_to_nearest_ties_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 5.1, 7.0, 1e9, -0.74, -0.1])
    assert decode_e2m1(encode_e2m1(x)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 6.0, 6.0, 6.0, -0.5,
                                                    0.0]


def test_group_scales():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    _, mx_bytes, mx_tensor = quantize_fp4(w, "mxfp4")
    amax = w.abs().reshape(4, 2, 32).amax(-1)
    assert mx_bytes.shape == (4, 2) and mx_tensor.item() == 1.0
    # E8M0: 2^(floor(log2 amax) − 2), so amax / scale ∈ [4, 8): the top values saturate to 6 (OCP MX rule).
    ratio = amax / torch.exp2(mx_bytes.float() - 127)
    assert bool(((ratio >= 4) & (ratio < 8)).all())
    codes, nv_bytes, nv_tensor = quantize_fp4(w, "nvfp4")
    assert nv_bytes.shape == (4, 4) and nv_tensor.item() == pytest.approx(w.abs().max().item() / (448 * 6))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_linear_sqnr_and_storage(fmt):
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=False)
    linear.weight.data = torch.randn(256, 512)
    layer = FP4Linear.from_float(linear, fmt)
    assert P.sqnr(linear.weight, layer.weight) >= FP4_SQNR_DB[fmt]
    bits_per_weight = 8 * (layer.qweight.numel() + layer.scales.numel()) / linear.weight.numel()
    assert bits_per_weight == {"mxfp4": 4.25, "nvfp4": 4.5}[fmt]
    x = torch.randn(5, 512)
    assert torch.equal(layer(x), x @ layer.dequantize_weight().T)


def test_fp4_save_load(tmp_path):
    model = tiny_model()
    quantize_(model, FP4Config("mxfp4"))
    ids = torch.randint(0, 512, (2, 10))
    logits = model(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.backbone.layers[1].mixer.out_proj, FP4Linear)
    assert loaded.backbone.layers[1].mixer.out_proj.fmt == "mxfp4"
    assert torch.equal(loaded(ids, use_cache=False).logits, logits)


def test_fp4_errors():
    with pytest.raises(QuantizationError, match="fp4: unknown format 'fp4'; choose one of mxfp4, nvfp4"):
        FP4Config("fp4")
    model = tiny_model(dt_rank=16)  # dt_proj input width 16: NVFP4 groups fit, MXFP4's 32 do not
    with pytest.raises(QuantizationError, match="fp4: layer .*dt_proj has input width 16, not a multiple of "
                                                "mxfp4's group size 32; use format='nvfp4'"):
        quantize_(model, FP4Config("mxfp4"), filter_fn=layer_filter("dt_proj"))
