"""The block's fused Triton kernels against their torch specs: add+RMSNorm (values and every gradient),
SiLU·mul, and the decode step's fused dt projection + state update (`ssm_step_triton` vs `ssm_step_ref`).

On the CPU they run under Triton's interpreter in a fresh process (this file run as a script, printing the
errors as JSON), as in `test_triton_kernels.py`. Shapes are small and ragged (70 channels: masked columns; 37
rows: a partial backward row block). The GPU tests at the end use the model's real widths and skip without CUDA.
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

from test_triton_kernels import TOL, _import_kernels_only, scaled_error  # noqa: E402

# (x dtype or None for no add, residual dtype, weight dtype)
NORM_CASES = {
    "add_fp32": ("float32", "float32", "float32"),
    "add_bf16_into_fp32_residual": ("bfloat16", "float32", "bfloat16"),  # the model under residual_in_fp32
    "add_bf16": ("bfloat16", "bfloat16", "bfloat16"),
    "norm_only_fp32": (None, "float32", "float32"),
    "norm_only_fp32_residual_bf16_weight": (None, "float32", "bfloat16"),
}


def norm_errors(add_rms_norm, rms_norm_ref, case: str, device="cpu", rows=(2, 37), cols=70) -> dict:
    """Scaled errors of (out, residual_out, dx, dresidual, dweight) of the fused kernel vs the spec, both
    differentiated through the same loss (which uses both outputs)."""
    x_dtype, res_dtype, w_dtype = NORM_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*rows, cols, generator=g).to(device, getattr(torch, x_dtype)) if x_dtype else None
    res = (3 * torch.randn(*rows, cols, generator=g)).to(device, getattr(torch, res_dtype))
    w = (1 + 0.3 * torch.randn(cols, generator=g)).to(device, getattr(torch, w_dtype))
    dout = torch.randn(*rows, cols, generator=g).to(device)
    dres = torch.randn(*rows, cols, generator=g).to(device)
    results = []
    for fn in (rms_norm_ref, add_rms_norm):
        ins = [t.clone().requires_grad_(True) for t in (x, res, w) if t is not None]
        out, res_out = fn(ins[0] if x is not None else None, ins[-2], ins[-1], 1e-5)
        loss = (out.float() * dout).sum() + ((res_out.float() * dres).sum() if x is not None else 0)
        results.append([out, res_out, *torch.autograd.grad(loss, ins)])
    names = ["out", "residual_out"] + (["dx"] if x is not None else []) + ["dresidual", "dweight"]
    return {n: scaled_error(o, r) for n, o, r in zip(names, results[1], results[0], strict=True)}


def ssm_step_errors(ssm_step, ssm_step_ref, dtype, device="cpu", batch=2, dim=70, dstate=5, rank=6) -> dict:
    g = torch.Generator().manual_seed(1)
    xz = torch.randn(batch, 2 * dim, generator=g).to(device, dtype)  # x and z are column slices, as in the model
    x, z = xz[:, :dim], xz[:, dim:]
    x_dbl = torch.randn(batch, rank + 2 * dstate, generator=g).to(device, dtype)
    w = (rank ** -0.5 * torch.randn(dim, rank, generator=g)).to(device, dtype)
    bias = torch.randn(dim, generator=g).to(device, dtype)
    A = -(0.2 + 2 * torch.rand(dim, dstate, generator=g)).to(device)
    D = torch.randn(dim, generator=g).to(device)
    state = torch.randn(batch, dim, dstate, generator=g).to(device)
    s_ref, s_ours = state.clone(), state.clone()
    y_ref = ssm_step_ref(s_ref, x, x_dbl, w, bias, A, D, z)
    y_ours = ssm_step(s_ours, x, x_dbl, w, bias, A, D, z)
    return {"y": scaled_error(y_ours, y_ref), "state": scaled_error(s_ours, s_ref)}


def _subprocess_main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    _import_kernels_only()
    from moai_lib.kernels.triton_decode import ssm_step_ref, ssm_step_triton
    from moai_lib.kernels.triton_norm import add_rms_norm_triton, rms_norm_ref, silu_mul_ref, silu_mul_triton

    result = {"norm": {case: norm_errors(add_rms_norm_triton, rms_norm_ref, case) for case in NORM_CASES}}
    g = torch.Generator().manual_seed(2)
    result["silu_mul"] = {}
    for dtype in ("float32", "bfloat16"):
        h = (3 * torch.randn(3, 5, 2 * 70, generator=g)).to(getattr(torch, dtype))
        result["silu_mul"][dtype] = scaled_error(silu_mul_triton(h), silu_mul_ref(h))
    result["ssm_step"] = {dtype: ssm_step_errors(ssm_step_triton, ssm_step_ref, getattr(torch, dtype))
                          for dtype in ("float32", "bfloat16")}
    with torch.no_grad():  # the inference path launches the kernel without autograd
        out, res_out = add_rms_norm_triton(torch.ones(2, 8), torch.ones(2, 8), torch.ones(8), 1e-5)
    result["no_grad_path"] = {"out": out.tolist(), "residual_out": res_out.tolist()}
    print(json.dumps(result))


@pytest.fixture(scope="module")
def interpreted(run_interpreted) -> dict:
    return run_interpreted(__file__)


def _tol(*dtypes) -> float:
    return TOL["bfloat16" if "bfloat16" in dtypes else "float32"]


def test_interpreted_add_rms_norm_values_and_gradients(interpreted):
    assert set(interpreted["norm"]) == set(NORM_CASES)
    for case, errors in interpreted["norm"].items():
        tol = _tol(*NORM_CASES[case])
        assert max(errors.values()) <= tol, (case, errors, tol)
        assert {"out", "dresidual", "dweight"} <= set(errors)
    assert interpreted["norm"]["add_fp32"]["residual_out"] == 0.0  # the sum itself is exact in fp32


def test_interpreted_no_grad_path(interpreted):
    # residual_out = 1 + 1; the norm of a constant row is 1 (up to eps).
    assert interpreted["no_grad_path"]["residual_out"] == [[2.0] * 8] * 2
    assert all(abs(v - 1) < 1e-5 for row in interpreted["no_grad_path"]["out"] for v in row)


def test_interpreted_silu_mul(interpreted):
    # fp32: the same expression. bf16: Triton's interpreter truncates fp32→bf16 casts (round-to-nearest on the
    # GPU), so one bf16 ulp; the GPU test below asserts identical bits.
    assert interpreted["silu_mul"]["float32"] <= 1e-6
    assert interpreted["silu_mul"]["bfloat16"] <= TOL["bfloat16"]


def test_interpreted_ssm_step_matches_unfused(interpreted):
    for dtype, errors in interpreted["ssm_step"].items():
        assert max(errors.values()) <= TOL[dtype], (dtype, errors)


# ------------------------------------------------------------------------------------------------------------
# On the GPU: the compiled kernels at the 2b model's widths.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine)")


@cuda
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_gpu_add_rms_norm_real_width(case):
    from moai_lib.kernels.triton_norm import add_rms_norm_triton, rms_norm_ref

    errors = norm_errors(add_rms_norm_triton, rms_norm_ref, case, device="cuda", rows=(4, 513), cols=2048)
    assert max(errors.values()) <= _tol(*NORM_CASES[case]), errors


@cuda
def test_gpu_silu_mul_same_bits_as_torch():
    from moai_lib.kernels.triton_norm import silu_mul_ref, silu_mul_triton

    h = torch.randn(64, 2 * 6144, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(silu_mul_triton(h), silu_mul_ref(h))


@cuda
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_ssm_step_real_width(batch):
    from moai_lib.kernels.triton_decode import ssm_step_ref, ssm_step_triton

    errors = ssm_step_errors(ssm_step_triton, ssm_step_ref, torch.bfloat16, device="cuda", batch=batch, dim=4096,
                             dstate=16, rank=128)
    assert max(errors.values()) <= TOL["bfloat16"], errors


if __name__ == "__main__":
    _subprocess_main()
