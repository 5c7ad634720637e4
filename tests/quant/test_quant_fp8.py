"""FP8 E4M3: per-row weights × per-token activations, the emulated path, backend errors, save/load, training."""

import pytest
import torch
from quant_helpers import tiny_model
from torch import nn

from moai_lib.quant import (
    Float8Config,
    Float8Linear,
    QuantizationError,
    enable_fp8_training,
    load_quantized,
    quantize_,
    quantize_fp8,
    quantized_modules,
)
from moai_lib.quant import primitives as P
from moai_lib.quant.fp8 import E4M3, fp8_gpu_problem, quantize_rows_fp8, resolve_fp8_backend

# SQNR floors (dB) on a seeded Gaussian 256 × 512 weight and Gaussian inputs (measured: 31.6 and 28.6). E4M3 has
# 3 mantissa bits: relative rounding error ≤ 2^-4, ~31 dB for values spread over many binades.
FP8_WEIGHT_SQNR_DB = 30.5
FP8_OUTPUT_SQNR_DB = 27.5


def test_rowwise_quantization():
    x = torch.tensor([[1.0, -2.0, 448.0 / 4], [0.0, 0.0, 0.0]])
    xq, scale = quantize_rows_fp8(x)
    assert xq.dtype == E4M3 and scale.tolist() == [[0.25], [1.0]]  # amax / 448; all-zero row → 1
    assert (xq.float() * scale).tolist() == x.tolist()  # these values are exact in E4M3


def test_float8_linear_matches_its_formula_and_sqnr():
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=True)
    linear.weight.data = torch.randn(256, 512)
    layer = Float8Linear.from_float(linear, backend="emulated")
    assert layer.qweight.dtype == torch.uint8 and layer.weight_scale.shape == (256, 1)
    x = torch.randn(3, 7, 512)
    xq, xs = quantize_rows_fp8(x.reshape(-1, 512))
    expected = (xq.float() @ layer.weight_fp8().float().T) * xs * layer.weight_scale.T + linear.bias
    assert torch.equal(layer(x), expected.reshape(3, 7, 256))
    assert P.sqnr(linear.weight, layer.weight) >= FP8_WEIGHT_SQNR_DB
    assert P.sqnr(linear(x), layer(x)) >= FP8_OUTPUT_SQNR_DB


def test_backend_choice_and_errors():
    assert resolve_fp8_backend("auto", "cpu") == "emulated"
    with pytest.raises(QuantizationError, match="fp8: backend 'scaled_mm' cannot run here: FP8 GEMMs need a CUDA "
                                                "GPU; use backend='emulated'"):
        resolve_fp8_backend("scaled_mm", "cpu")
    with pytest.raises(QuantizationError, match="fp8: backend 'scaled_mm' cannot run here"):
        quantize_(tiny_model(), Float8Config(backend="scaled_mm"))
    with pytest.raises(QuantizationError, match="fp8: unknown backend 'cutlass'"):
        Float8Config(backend="cutlass")
    assert "NVIDIA A100 (sm_80) has no FP8 tensor cores" in fp8_gpu_problem("NVIDIA A100", (8, 0))
    assert fp8_gpu_problem("NVIDIA H200", (9, 0)) is None and fp8_gpu_problem("NVIDIA L4", (8, 9)) is None


def test_quantize_fp8_save_load_and_dtype_moves(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 12))
    reference = model(ids, use_cache=False).logits
    quantize_fp8(model)
    assert len(quantized_modules(model)) == 10
    logits = model(ids, use_cache=False).logits
    assert P.sqnr(reference, logits) >= 15.0  # measured 19.5 through two blocks and the tied head
    model.save_pretrained(tmp_path)
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.backbone.layers[0].mlp.fc1, Float8Linear)
    assert torch.equal(loaded(ids, use_cache=False).logits, logits)
    # The E4M3 bytes are uint8 buffers: a dtype move leaves them alone.
    before = loaded.backbone.layers[0].mlp.fc1.qweight.clone()
    loaded.to(torch.bfloat16)
    assert torch.equal(loaded.backbone.layers[0].mlp.fc1.qweight, before)
    assert loaded(ids, use_cache=False).logits.isfinite().all()


def test_fp8_training_recipe_trains_on_cpu():
    model = tiny_model().train()
    enable_fp8_training(model)
    names = {type(m).__name__ for m in model.backbone.layers[0].modules()}
    assert "Float8Linear" in names
    assert type(model.backbone.layers[0].mixer.x_proj) is nn.Linear  # 40 outputs: not a multiple of 16
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
