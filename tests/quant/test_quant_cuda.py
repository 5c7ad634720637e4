"""The GPU kernels against the dequantizing / emulated paths (skipped without CUDA): torch's INT4 tinygemm
kernel (`QuantizedLinear` backend "int4mm") and row-wise FP8 `torch._scaled_mm` (compute capability ≥ 8.9)."""

import pytest
import torch
from quant_helpers import tiny_model
from torch import nn

from moai_lib.quant import Float8Linear, IntWeightOnlyConfig, QuantizedLinear, quantize_, quantized_modules
from moai_lib.quant import primitives as P
from moai_lib.quant.fp8 import fp8_gpu_problem, resolve_fp8_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, True), (128, False), (256, False)])
def test_int4mm_cuda_matches_the_dequantized_matmul(group_size, symmetric):
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=True)
    layer = QuantizedLinear.from_float(linear, 4, group_size, symmetric).cuda()
    x = torch.randn(3, 5, 512, device="cuda", dtype=torch.bfloat16)
    assert layer.resolve_backend(x.device, x.dtype) == "int4mm"  # auto on CUDA with bf16 activations: tinygemm
    fast = layer(x)
    layer.backend = "dequant"
    exact = torch.nn.functional.linear(x.float(), layer.dequantize_weight().cuda(), layer.bias.float())
    # Only the bf16 rounding of s, (8 − z)·s, x and the output separate the two (measured ≈ 46 dB).
    assert fast.dtype == torch.bfloat16 and P.sqnr(exact, fast) >= 38.0


def test_int4mm_cuda_model_logits():
    model = tiny_model().cuda().to(torch.bfloat16)
    quantize_(model, IntWeightOnlyConfig(bits=4, group_size=32))
    for layer in quantized_modules(model).values():
        layer.backend = "int4mm"
    ids = torch.randint(0, 512, (2, 16), device="cuda")
    fast = model(ids, use_cache=False).logits
    for layer in quantized_modules(model).values():
        layer.backend = "dequant"
    slow = model(ids, use_cache=False).logits
    assert P.sqnr(slow, fast) >= 25.0


@pytest.mark.skipif(torch.cuda.is_available() and fp8_gpu_problem(torch.cuda.get_device_name(),
                                                                  torch.cuda.get_device_capability()) is not None,
                    reason="needs FP8 tensor cores")
def test_scaled_mm_matches_the_emulated_fp8_matmul():
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=False)
    layer = Float8Linear.from_float(linear, backend="scaled_mm").cuda()
    assert resolve_fp8_backend("auto", "cuda") == "scaled_mm"
    x = torch.randn(4, 7, 512, device="cuda", dtype=torch.bfloat16)
    fast = layer(x)
    layer.backend = "emulated"
    emulated = layer(x.float())
    # Same E4M3 operands and scales; the kernel accumulates in fp32 and writes bf16 (measured ≈ 50 dB).
    assert P.sqnr(emulated, fast) >= 40.0
