"""The weight-only Triton GEMVs (`triton_gemv`: INT4 group-wise and FP8 E4M3) against the fp32 matmul with the
dequantized weight, and their wiring into `QuantizedLinear` / `Float8Linear` (backend "triton").

On the CPU the kernels run under Triton's interpreter in a fresh process (this file run as a script, printing
the errors as JSON), as in `test_triton_kernels.py`. Tolerance: the kernels dequantize exactly as the reference
and accumulate in fp32, so only the rounding of the output to its dtype (and fp32 summation order) separates them:
|y − ref| ≤ ulp-bound·|ref| + 1e-5·(|x|·|Ŵ|ᵀ). The interpreter truncates fp32 → bf16 (the GPU rounds to nearest),
so a whole bf16 ulp (2^-7 relative) on the CPU. The GPU tests at the end use the 2b preset's widths.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_triton_kernels import _import_kernels_only  # noqa: E402

# Output rounding bound relative to |ref|, per output dtype: one ulp (2^-(significand bits − 1)) under the CPU
# interpreter, which truncates; half of it on the GPU, which rounds to nearest.
ULP = {"bfloat16": 2 ** -7, "float16": 2 ** -10, "float32": 0.0}
SUM_ORDER = 1e-5  # fp32 summation-order slack, relative to Σ|x|·|Ŵ|

# (K, N, M, group, symmetric, bias, dtype, GemvConfig fields (block_n, block_k, split_k, num_warps[, prefetch])
# or None = default)
INT4_CASES = {
    "k64_n96_m1_g32_asym_bias_tile_past_k": (64, 96, 1, 32, False, True, "bfloat16", None),
    "k64_n96_m3_g32_sym": (64, 96, 3, 32, True, False, "bfloat16", None),
    "k256_n96_m1_g64_sym_bias_split4": (256, 96, 1, 64, True, True, "bfloat16", (16, 64, 4, 4)),
    "k256_n40_m3_g64_asym_ragged_cols_split2": (256, 40, 3, 64, False, False, "bfloat16", (64, 64, 2, 4)),
    "k256_n40_m2_g32_asym_bias_ragged_cols": (256, 40, 2, 32, False, True, "bfloat16", (64, 128, 1, 4)),
    "k256_n96_m1_g128_asym_fp16": (256, 96, 1, 128, False, True, "float16", (16, 256, 2, 4)),
    "k256_n96_m3_g64_asym_fp32_exact": (256, 96, 3, 64, False, True, "float32", (32, 128, 1, 4)),
    "k256_n96_m16_g32_sym": (256, 96, 16, 32, True, False, "bfloat16", None),
    # Groups not a multiple of the tile: masked groups in the last tile (5 groups in tiles of 2).
    "k320_n96_m3_g64_asym_bias_ragged_k_split2": (320, 96, 3, 64, False, True, "bfloat16", (32, 128, 2, 4)),
    "k256_n40_m1_g64_sym_tile_past_k": (256, 40, 1, 64, True, False, "float32", (64, 512, 1, 4)),
    # Several tiles per split: the register prefetch's hand-over, with and without it.
    "k512_n96_m1_g32_asym_bias_split4": (512, 96, 1, 32, False, True, "bfloat16", (32, 64, 4, 4)),
    "no_prefetch_k512_n96_m5_g64_asym_bias_split2": (512, 96, 5, 64, False, True, "bfloat16",
                                                     (32, 64, 2, 4, False)),
}
FP8_CASES = {
    "k64_n96_m1_bias": (64, 96, 1, True, "bfloat16", None),
    "k256_n96_m3_split3": (256, 96, 3, False, "bfloat16", (16, 64, 3, 4)),
    "k256_n40_m3_bias_ragged_rows": (256, 40, 3, True, "bfloat16", (64, 128, 1, 4)),
    "k256_n96_m3_fp32_exact": (256, 96, 3, True, "float32", (16, 64, 2, 4)),
    "k320_n40_m2_ragged_k_split2": (320, 40, 2, True, "bfloat16", (64, 128, 2, 4)),
    "no_prefetch_k256_n96_m3_split2": (256, 96, 3, True, "bfloat16", (32, 64, 2, 4, False)),
}


def excess(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, dtype: str, weight_rounded: bool = False) -> float:
    """max over elements of |y − ref| / (ulp·|ref| + SUM_ORDER·bound): ≤ 1 passes. weight_rounded: Ŵ was
    rounded to `dtype` before a dense matmul (the > 16 rows path, as backend "dequant"): + ulp·bound."""
    ulp = ULP[dtype] / (2 if y.is_cuda else 1)
    allowed = ulp * ref.abs() + (ulp if weight_rounded else SUM_ORDER) * bound + 1e-30
    return ((y.float() - ref).abs() / allowed).max().item()


def int4_case(case: str, device="cpu", shape=None) -> dict:
    from moai_lib.kernels.triton_gemv import GemvConfig, Int4Columns, int4_dequantize_t, int4_gemv, int4_gemv_ref
    from moai_lib.quant import primitives as P

    k, n, m, group, symmetric, bias_on, dtype, cfg = INT4_CASES[case] if shape is None else shape
    g = torch.Generator().manual_seed(hash(case) % 2 ** 31)
    w = torch.randn(n, k, generator=g)
    qp = P.compute_qparams(w, 4, group, symmetric, scale_dtype=torch.bfloat16)
    q = P.quantize_rtn(w, qp)
    qweight, scales, zeros = P.pack_int4(q).to(device), qp.scale.to(device), qp.zero.to(device)
    cols = Int4Columns.from_rows(qweight, scales, zeros, group)
    x = torch.randn(m, k, generator=g).to(device, getattr(torch, dtype))
    bias = torch.randn(n, generator=g).to(device, torch.bfloat16) if bias_on else None
    w_hat = P.dequantize(q, qp).to(device)  # the spec's weight (fp32)
    ref = x.float() @ w_hat.T + (bias.float() if bias_on else 0)
    config = GemvConfig(*cfg) if cfg else None
    y = int4_gemv(x, cols, bias, config)
    bound = x.float().abs() @ w_hat.abs().T
    return {"excess": excess(y, ref, bound, dtype), "dtype": str(y.dtype), "shape": list(y.shape),
            "again_equal": bool(torch.equal(int4_gemv(x, cols, bias, config), y)),  # split-K counters were reset
            "ref_matches_spec": bool(torch.equal(int4_gemv_ref(x, qweight, scales, zeros, group, bias), ref)),
            "layout_round_trip": bool(torch.equal(cols.to_rows(), qweight)),
            "dequant_exact": bool(torch.equal(int4_dequantize_t(cols, torch.float32), w_hat.T))}


def fp8_case(case: str, device="cpu", shape=None) -> dict:
    from moai_lib.kernels.triton_gemv import GemvConfig, fp8_gemv
    from moai_lib.quant.fp8 import quantize_rows_fp8

    k, n, m, bias_on, dtype, cfg = FP8_CASES[case] if shape is None else shape
    g = torch.Generator().manual_seed(hash(case) % 2 ** 31)
    wq, scale = quantize_rows_fp8(torch.randn(n, k, generator=g))
    qweight, scale = wq.view(torch.uint8).to(device), scale.to(device)
    x = torch.randn(m, k, generator=g).to(device, getattr(torch, dtype))
    bias = torch.randn(n, generator=g).to(device, torch.bfloat16) if bias_on else None
    w_hat = wq.float().to(device) * scale  # `Float8Linear.weight`
    ref = x.float() @ w_hat.T + (bias.float() if bias_on else 0)
    config = GemvConfig(*cfg) if cfg else None
    y = fp8_gemv(x, qweight, scale, bias, config)
    return {"excess": excess(y, ref, x.float().abs() @ w_hat.abs().T, dtype), "dtype": str(y.dtype),
            "again_equal": bool(torch.equal(fp8_gemv(x, qweight, scale, bias, config), y))}


def modules_report() -> dict:
    """`QuantizedLinear` / `Float8Linear` with backend "triton" (interpreted) against their dequantized weight."""
    from torch import nn

    from moai_lib.quant import Float8Linear, QuantizedLinear

    torch.manual_seed(0)
    out = {}
    linear = nn.Linear(256, 96, bias=True, dtype=torch.bfloat16)
    layer = QuantizedLinear.from_float(linear, 4, 64, symmetric=False)
    qweight = layer.qweight.clone()
    layer.backend = "triton"
    for lead in ((1,), (2, 3), (6, 3)):  # GEMV (1 row), then the dequantize + matmul path (6 and 18 rows)
        rows = lead[0] * (lead[1] if len(lead) > 1 else 1)
        x = torch.randn(*lead, 256, dtype=torch.bfloat16)
        ref = x.float() @ layer.dequantize_weight(torch.float32).T + layer.bias.float()
        y = layer(x)
        bound = x.float().abs() @ layer.dequantize_weight(torch.float32).abs().T
        out[f"int4_rows{rows}"] = {"excess": excess(y, ref, bound, "bfloat16", weight_rounded=rows > 1),
                                   "shape": list(y.shape), "dtype": str(y.dtype)}
    out["int4_keeps_uint8"] = bool(torch.equal(layer.qweight, qweight))
    # int4mm last (CPU: released explicitly, as CUDA does automatically), then triton: exact integers come back.
    layer.backend = "int4mm"
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    layer(x)
    layer._release_qweight()
    layer.backend = "triton"
    y = layer(x)
    out["int4_back_from_int4pack"] = bool(torch.equal(layer.qweight, qweight)) and layer._released is None
    strided = torch.randn(256, 2, dtype=torch.bfloat16).T  # (2, 256) with strides (1, 2), as the mixer hands
    out["int4_strided_input"] = bool(torch.equal(layer(strided), layer(strided.contiguous())))
    out["auto_on_cpu"] = layer.__class__.from_float(linear, 4, 64, False).resolve_backend(torch.device("cpu"),
                                                                                        torch.bfloat16)
    # Split-K inside a layer (K = 2048 → 4 programs along K for INT4, 8 for FP8), on the layer's own counters:
    # right, and the counters are back at zero for the next call.
    from moai_lib.kernels.triton_gemv import _counter_buffer

    wide = nn.Linear(2048, 64, bias=True, dtype=torch.bfloat16)
    x = torch.randn(1, 2048, dtype=torch.bfloat16)
    for name, mod in (("int4", QuantizedLinear.from_float(wide, 4, 128, symmetric=False)),
                      ("fp8", Float8Linear.from_float(wide, backend="triton"))):
        mod.backend = "triton"
        w = mod.dequantize_weight(torch.float32) if name == "int4" else mod.weight
        y = mod(x)
        out[f"{name}_split_own_counters"] = {
            "excess": excess(y, x.float() @ w.T + wide.bias.float(), x.float().abs() @ w.abs().T, "bfloat16"),
            "own": mod._split_k_counters is not None
            and mod._split_k_counters.data_ptr() != _counter_buffer(torch.device("cpu")).data_ptr(),
            "reset": not bool(mod._split_k_counters.any()), "again_equal": bool(torch.equal(mod(x), y))}
    fp8 = Float8Linear.from_float(nn.Linear(256, 96, bias=True, dtype=torch.bfloat16), backend="triton")
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    ref = x.float() @ fp8.weight.T + fp8.bias.float()
    out["fp8_rows2"] = {"excess": excess(fp8(x), ref, x.float().abs() @ fp8.weight.abs().T, "bfloat16")}
    big = torch.randn(17, 256, dtype=torch.bfloat16)  # more rows: the activation-quantized (emulated) path
    fp8.backend = "emulated"
    emulated = fp8(big)
    fp8.backend = "triton"
    out["fp8_rows17_is_activation_quantized"] = bool(torch.equal(fp8(big), emulated))
    return out


def _subprocess_main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    _import_kernels_only()
    result = {"int4": {c: int4_case(c) for c in INT4_CASES}, "fp8": {c: fp8_case(c) for c in FP8_CASES},
              "modules": modules_report()}
    print(json.dumps(result))


@pytest.fixture(scope="module")
def interpreted(run_interpreted) -> dict:
    return run_interpreted(__file__)


def test_interpreted_int4_gemv_matches_dequantized_matmul(interpreted):
    assert set(interpreted["int4"]) == set(INT4_CASES)
    for case, r in interpreted["int4"].items():
        k, n, m, *_, dtype, _ = INT4_CASES[case]
        assert r["excess"] <= 1.0, (case, r)
        assert r["dtype"] == f"torch.{dtype}" and r["shape"] == [m, n], (case, r)
        assert r["ref_matches_spec"] and r["dequant_exact"] and r["layout_round_trip"], (case, r)
        assert r["again_equal"], (case, r)


def test_interpreted_fp8_gemv_matches_dequantized_matmul(interpreted):
    assert set(interpreted["fp8"]) == set(FP8_CASES)
    for case, r in interpreted["fp8"].items():
        assert r["excess"] <= 1.0 and r["dtype"] == f"torch.{FP8_CASES[case][4]}" and r["again_equal"], (case, r)


def test_interpreted_modules_use_the_gemv_and_keep_one_copy(interpreted):
    mods = interpreted["modules"]
    for rows, shape in ((1, [1, 96]), (6, [2, 3, 96]), (18, [6, 3, 96])):
        r = mods[f"int4_rows{rows}"]
        assert r["excess"] <= 1.0 and r["shape"] == shape and r["dtype"] == "torch.bfloat16", (rows, r)
    assert mods["int4_keeps_uint8"] and mods["int4_back_from_int4pack"] and mods["int4_strided_input"]
    assert mods["auto_on_cpu"] == "int4mm"  # auto: tinygemm where it applies (the GEMV only when asked for)
    assert mods["fp8_rows2"]["excess"] <= 1.0
    assert mods["fp8_rows17_is_activation_quantized"]
    for name in ("int4", "fp8"):
        r = mods[f"{name}_split_own_counters"]
        assert r["excess"] <= 1.0 and r["own"] and r["reset"] and r["again_equal"], (name, r)


def test_int4_default_launch_shapes():
    """The INT4 GEMV's launch shapes at the 2b preset's layers, as swept on the H200 (BENCHMARKS.md §5, sixth
    session: each within 0-8% of the best of 60 shapes): 64 columns (32 for narrow N) × 512 inputs, ~2 programs
    per SM (132 SMs; the interpreter mirrors an H200)."""
    from moai_lib.kernels.triton_gemv import GemvConfig, default_config

    cpu = torch.device("cpu")
    expected = {(2048, 8192): GemvConfig(64, 512, 2, 4), (4096, 2048): GemvConfig(64, 512, 8, 4),
                (2048, 12288): GemvConfig(64, 512, 1, 4), (6144, 2048): GemvConfig(64, 512, 6, 4),
                (4096, 160): GemvConfig(32, 512, 8, 4)}
    for (k, n), cfg in expected.items():
        assert default_config("int4", 1, n, k, cpu) == cfg, (k, n)
    assert default_config("int4", 1, 96, 64, cpu, group_size=32).block_k == 64  # no tile wider than K needs


def test_split_k_counters_are_checked():
    """A layer's own split-K counters (what `QuantizedLinear`/`Float8Linear` pass): int32 zeros, one per column
    block at the narrowest block_n; the wrong size, dtype or device is refused with the fix."""
    from moai_lib.kernels.triton_gemv import _counters, split_k_counters

    cpu = torch.device("cpu")
    own = split_k_counters(100, cpu)
    assert own.dtype == torch.int32 and own.numel() == 13 and not own.any()
    assert _counters(cpu, 13, own) is own
    for bad in (torch.zeros(4, dtype=torch.int32), own.long()):
        with pytest.raises(ValueError, match="counters must be ≥ 13 int32 zeros on cpu"):
            _counters(cpu, 13, bad)


def test_explicit_triton_backend_that_cannot_run_is_an_error():
    from torch import nn

    from moai_lib.quant import QuantizationError, QuantizedLinear

    layer = QuantizedLinear.from_float(nn.Linear(64, 32), 8, 32, False)
    layer.backend = "triton"
    with pytest.raises(QuantizationError, match="int: backend 'triton' cannot run here: the Triton GEMV needs 4 "
                                                "bits"):
        layer(torch.randn(1, 64))
    if os.environ.get("TRITON_INTERPRET") != "1":
        int4 = QuantizedLinear.from_float(nn.Linear(64, 32), 4, 32, False)
        int4.backend = "triton"
        with pytest.raises(QuantizationError, match="int: backend 'triton' cannot run here: .*CUDA GPU"):
            int4(torch.randn(1, 64))


# ------------------------------------------------------------------------------------------------------------
# On the GPU: the compiled kernels at the 2b preset's widths (in_proj 2048→8192, fc2 6144→2048, x_proj 4096→160).
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine)")
GPU_SHAPES = {"in_proj": (2048, 8192), "fc2": (6144, 2048), "x_proj": (4096, 160)}


@cuda
@pytest.mark.parametrize("layer", list(GPU_SHAPES))
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("group,symmetric", [(128, False), (32, True)])
def test_gpu_int4_gemv_real_width(layer, m, group, symmetric):
    k, n = GPU_SHAPES[layer]
    r = int4_case(f"{layer}{m}", "cuda", (k, n, m, group, symmetric, True, "bfloat16", None))
    assert r["excess"] <= 1.0 and r["dequant_exact"], r


@cuda
@pytest.mark.parametrize("layer", list(GPU_SHAPES))
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_fp8_gemv_real_width(layer, m):
    from moai_lib.quant.fp8 import fp8_gpu_problem

    if fp8_gpu_problem(torch.cuda.get_device_name(), torch.cuda.get_device_capability()):
        pytest.skip("needs an FP8 GPU (sm_89+)")
    k, n = GPU_SHAPES[layer]
    assert fp8_case(f"{layer}{m}", "cuda", (k, n, m, True, "bfloat16", None))["excess"] <= 1.0


@cuda
@torch.no_grad()
def test_gpu_modules_gemv_keeps_one_copy():
    from torch import nn

    from moai_lib.quant import Float8Linear, QuantizedLinear
    from moai_lib.quant import primitives as P

    torch.manual_seed(0)
    linear = nn.Linear(2048, 8192, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = QuantizedLinear.from_float(linear, 4, 128, symmetric=False)
    layer.backend = "triton"  # explicit: "auto" takes tinygemm (see QuantizedLinear)
    qweight = layer.qweight.clone()
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    assert layer.resolve_backend(x.device, x.dtype) == "triton"
    before = torch.cuda.memory_allocated()
    y = layer(x)
    # The GEMV's column-major words replace the uint8 copy (released): memory grows by the transposed scales and
    # zeros only (3 B per group of 128), and the integers read back exactly.
    assert layer.qweight.numel() == 0 and layer._released == "columns" and layer._int4mm_cache is None
    assert torch.cuda.memory_allocated() - before < qweight.numel() // 16
    assert torch.equal(layer.state_dict()["qweight"], qweight)
    ref = F_linear_ref(x, layer)
    assert P.sqnr(ref, y) > 40
    layer.backend = "int4mm"  # the anchor: tinygemm's layout replaces the GEMV's, and back
    assert P.sqnr(ref, layer(x)) > 35 and layer._released == "int4pack"
    layer.backend = "triton"
    assert torch.equal(layer(x), y) and layer._released == "columns"
    assert torch.equal(layer.integers(), P.unpack_int4(qweight))
    prefill = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)  # > 16 rows: dequantize + matmul
    fast = layer(prefill)
    layer.backend = "dequant"  # the same bf16 weight (one kernel instead of torch's several) and matmul
    assert torch.equal(fast, layer(prefill))
    layer.backend = "auto"
    fp8 = Float8Linear.from_float(linear)
    assert P.sqnr(x.float() @ fp8.weight.T, fp8(x)) > 40  # weight-only: no activation rounding


def F_linear_ref(x, layer):
    return x.float() @ layer.dequantize_weight(torch.float32).T


@cuda
@torch.no_grad()
def test_gpu_gemv_captures_in_a_cuda_graph():
    from torch import nn

    from moai_lib.quant import QuantizedLinear

    layer = QuantizedLinear.from_float(nn.Linear(6144, 2048, device="cuda", dtype=torch.bfloat16), 4, 128, False)
    layer.backend = "triton"
    x = torch.randn(1, 6144, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)  # compiles; split-K at N = 2048 (partial sums added by the last program of each block)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    for _ in range(3):  # the split-K counters are reset by every launch: replays agree bit for bit
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


if __name__ == "__main__":
    _subprocess_main()


@cuda
@torch.no_grad()
def test_gpu_pdl_gemv_waits_for_the_kernel_that_writes_its_input():
    """With programmatic dependent launch the GEMV starts while the norm before it (which signals early, as in a
    decode step) still runs: its output must still be the GEMV's input. Bit for bit against ordinary launches,
    eagerly and replayed in a CUDA graph (as the decoder runs it)."""
    from moai_lib.kernels.pdl import pdl_capable
    from moai_lib.kernels.triton_gemv import Int4Columns, fp8_gemv, int4_gemv
    from moai_lib.kernels.triton_norm import add_rms_norm_triton
    from moai_lib.quant import primitives as P
    from moai_lib.quant.fp8 import quantize_rows_fp8

    if not pdl_capable(torch.device("cuda")):
        pytest.skip("needs sm_90+ and a Triton with grid dependency control")
    torch.manual_seed(0)
    k, n = 2048, 8192
    w = torch.randn(n, k, device="cuda")
    qp = P.compute_qparams(w, 4, 128, False, scale_dtype=torch.bfloat16)
    cols = Int4Columns.from_rows(P.pack_int4(P.quantize_rtn(w, qp)), qp.scale, qp.zero, 128)
    wq, scale = quantize_rows_fp8(w)
    norm_w = torch.randn(k, device="cuda", dtype=torch.bfloat16)

    def step(res, pdl):
        h, res = add_rms_norm_triton(None, res, norm_w, 1e-5)
        y = int4_gemv(h.view(1, k), cols, pdl=pdl)
        return fp8_gemv(y[:, :k].contiguous(), wq.view(torch.uint8), scale, pdl=pdl), res

    inputs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(20)]
    for res in inputs:
        assert torch.equal(step(res, True)[0], step(res, False)[0])
    static = inputs[0].clone()
    step(static, True)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = step(static, True)
    for res in inputs:
        static.copy_(res)
        graph.replay()
        assert torch.equal(out, step(res, False)[0])
