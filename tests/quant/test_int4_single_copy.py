"""INT4 on CUDA keeps one copy of each weight: after the first forward builds tinygemm's int4pack layout the uint8
`qweight` is released, and the integers read back from the layout are exact (save, load, device moves).

The release is automatic on CUDA only (the CPU keeps its uint8 buffer); the CPU test releases explicitly to check
the same read-back, save, load and move logic against the CPU int4 kernel's layout."""

import pytest
import torch
from torch import nn

from moai_lib.quant import QuantizedLinear
from moai_lib.quant import primitives as P

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="tinygemm's int4pack layout needs a CUDA GPU")


@torch.no_grad()
def test_cpu_release_reads_back_exact_integers_and_round_trips():
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=True, dtype=torch.bfloat16)
    layer = QuantizedLinear.from_float(linear, bits=4, group_size=64, symmetric=False)
    qweight, q = layer.qweight.clone(), layer.integers().clone()
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    y = layer(x)  # builds the CPU int4mm layout; the CPU keeps its uint8 copy
    assert layer.qweight.numel() == qweight.numel()
    layer._release_qweight()
    assert layer.qweight.numel() == 0
    assert torch.equal(layer.integers(), q)
    assert torch.equal(layer.state_dict()["qweight"], qweight)
    assert torch.equal(layer(x), y)
    fresh = QuantizedLinear.from_float(nn.Linear(256, 64, bias=True, dtype=torch.bfloat16), 4, 64, False)
    fresh(x)
    fresh._release_qweight()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.qweight, qweight) and torch.equal(fresh(x), y)
    layer.to(torch.device("cpu"))  # any move brings the uint8 buffer back
    assert torch.equal(layer.qweight, qweight)


def _layer(in_features=5120, out_features=1536):  # in > 4096: the read-back runs in two blocks
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=True, device="cuda", dtype=torch.bfloat16)
    layer = QuantizedLinear.from_float(linear, bits=4, group_size=128, symmetric=False)
    layer.backend = "int4mm"  # explicit (also auto's choice on CUDA); the Triton GEMV keeps the uint8 copy instead
    return layer


@cuda
@torch.no_grad()
def test_cuda_int4_releases_uint8_copy_and_reads_back_exactly():
    layer = _layer()
    qweight, q = layer.qweight.clone(), layer.integers().clone()
    x = torch.randn(3, layer.in_features, device="cuda", dtype=torch.bfloat16)
    before = torch.cuda.memory_allocated()
    y = layer(x)
    torch.cuda.synchronize()
    assert layer.qweight.numel() == 0  # released
    # The int4pack layout replaces the uint8 copy: allocated memory grows by less than the uint8 buffer's size.
    assert torch.cuda.memory_allocated() - before < qweight.numel()
    assert torch.equal(layer.integers(), q)
    assert torch.equal(layer.state_dict()["qweight"], qweight)
    assert torch.equal(layer(x), y)  # the cached layout is used as before

    fresh = _layer()
    fresh(x)  # also released: loading must still fill it
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.qweight, qweight) and torch.equal(fresh(x), y)

    moved = layer.cpu()
    assert torch.equal(moved.qweight, qweight.cpu())


@cuda
@torch.no_grad()
def test_cuda_int4_scales_change_is_seen_after_release():
    layer = _layer(1024, 256)
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    layer.scales.mul_(2)  # in place: the version counter changes; the packed integers stay
    ref = torch.nn.functional.linear(x, P.dequantize(layer.integers(), layer.qparams(), dtype=torch.bfloat16),
                                     layer.bias)
    assert not torch.equal(layer(x), y)
    assert P.sqnr(ref, layer(x)) > 30
