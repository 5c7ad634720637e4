"""moai_lib.quant.primitives: qparams, RTN round trips, int4 / int32 packing, SQNR."""

import math

import pytest
import torch

from moai_lib.quant import primitives as P

# SQNR floors (dB) of group-wise RTN on a seeded Gaussian weight (256 × 512), measured values in comments.
# Each extra bit is worth ~6 dB; smaller groups fit the range tighter; symmetric wastes part of a level.
RTN_SQNR_DB = {
    # (bits, group_size, symmetric): floor        measured
    (4, 32, False): 21.0,                          # 21.8
    (4, 64, False): 20.0,                          # 20.8
    (4, 128, False): 19.0,                         # 19.9
    (4, 128, True): 18.5,                          # 19.1
    (4, -1, False): 17.5,                          # 18.6
    (8, 128, False): 43.5,                         # 44.5
    (8, 128, True): 43.0,                          # 43.7
    (8, -1, False): 42.0,                          # 43.2
}


@pytest.fixture(scope="module")
def gaussian():
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("key", list(RTN_SQNR_DB))
def test_rtn_sqnr_on_gaussian_weights(gaussian, key):
    bits, group_size, symmetric = key
    assert P.sqnr(gaussian, P.fake_quantize(gaussian, bits, group_size, symmetric)) >= RTN_SQNR_DB[key]


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 128, True), (8, -1, False)])
def test_quantize_dequantize_round_trip(gaussian, bits, group_size, symmetric):
    qp = P.compute_qparams(gaussian, bits, group_size, symmetric)
    q = P.quantize_rtn(gaussian, qp)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2 ** bits - 1
    deq = P.dequantize(q, qp)
    # Dequantized values lie on the grid: quantizing them again gives the same integers.
    assert torch.equal(P.quantize_rtn(deq, qp), q)
    # Every weight is within half a step of its grid point: the ranges cover the group (symmetric: +max|w|
    # sits 7.5 steps up and is clamped to the top level 7, also half a step away).
    step = qp.scale.repeat_interleave(P.resolve_group_size(512, group_size), dim=1)
    assert bool(((gaussian - deq).abs() <= 0.5 * step * (1 + 1e-5)).all())


def test_asymmetric_qparams_by_hand():
    # One group [-1, 0, 1, 2]: lo=-1, hi=2, 4 bits → s = 3/15 = 0.2, z = round(1/0.2) = 5.
    w = torch.tensor([[-1.0, 0.0, 1.0, 2.0]])
    qp = P.compute_qparams(w, 4, -1, symmetric=False)
    assert math.isclose(float(qp.scale), 0.2, rel_tol=1e-6) and int(qp.zero) == 5
    assert P.quantize_rtn(w, qp).tolist() == [[0, 5, 10, 15]]
    # Symmetric: s = 2·2/15, z = 8; −1/s = −3.75 → −4 → 4; 2/s = 7.5 → 8 (half to even) → 16 → clamped 15.
    qs = P.compute_qparams(w, 4, -1, symmetric=True)
    assert int(qs.zero) == 8 and P.quantize_rtn(w, qs).tolist() == [[4, 8, 12, 15]]


def test_zero_group_and_scale_dtype():
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    qp = P.compute_qparams(w.bfloat16(), 4, 32, symmetric=False)
    assert qp.scale.dtype == torch.bfloat16 and bool((qp.scale > 0).all())
    deq = P.dequantize(P.quantize_rtn(w, qp), qp)
    assert torch.equal(deq[0], torch.zeros(64))  # an all-zero group stays exactly zero


def test_int4_packing_layout_and_round_trip():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]], dtype=torch.uint8)
    packed = P.pack_int4(q)
    # byte j = q[2j] | q[2j+1] << 4
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0x87]]
    assert torch.equal(P.unpack_int4(packed), q)
    rand = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    assert P.pack_int4(rand).shape == (7, 32) and torch.equal(P.unpack_int4(P.pack_int4(rand)), rand)
    with pytest.raises(ValueError, match="even"):
        P.pack_int4(torch.zeros(3, 5, dtype=torch.uint8))


def test_int32_packing_sequential_and_awq_order():
    vals = torch.arange(8).reshape(8, 1)  # 8 values along dim 0
    assert P.pack_int32(vals, 4, dim=0).item() == 0x76543210
    # Values 8..15: 0xFEDCBA98 ≥ 2^31 reads back as the negative int32 it is.
    assert P.pack_int32(vals + 8, 4, dim=0).item() == 0xFEDCBA98 - 2 ** 32
    # AWQ: nibble i holds element AWQ_PACK_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7).
    assert P.pack_int32(torch.arange(8).reshape(1, 8), 4, dim=1, order=P.AWQ_PACK_ORDER).item() == 0x75316420
    # 8 bits: 4 per word.
    assert P.pack_int32(torch.tensor([[1, 2, 3, 4]]), 8, dim=1).item() == 0x04030201
    rand = torch.randint(0, 16, (16, 24))
    for order in (None, P.AWQ_PACK_ORDER):
        for dim in (0, 1):
            words = P.pack_int32(rand, 4, dim=dim, order=order)
            assert words.dtype == torch.int32
            assert torch.equal(P.unpack_int32(words, 4, dim=dim, order=order), rand.int())


def test_sqnr():
    x = torch.ones(100)
    assert P.sqnr(x, x) == math.inf
    assert math.isclose(P.sqnr(x, x * 1.1), 20.0, rel_tol=1e-5)  # error 0.1 → 10·log10(1/0.01)
