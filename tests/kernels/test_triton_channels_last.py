"""The channels-last Triton kernels against the reference: the selective scan on strided inputs (`triton_scan`,
u/delta/z/B/C as views of (B, L, ·) memory, as the mixer passes them) and the causal conv1d (`triton_conv`),
on outputs, final states, every gradient, and the memory layout of the outputs and gradients.

As in `test_triton_kernels.py`, the kernels run under Triton's interpreter in a fresh process (this file run as
a script, printing JSON). Shapes are tiny, with odd L, ragged channel counts and chunks/tiles shorter than L, so
that states and conv halos cross chunk and tile boundaries. The GPU tests at the end run the compiled kernels
at real widths (`pytest -k cuda`) and skip without CUDA.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_triton_kernels import (  # noqa: E402
    TOL,
    _import_kernels_only,
    _vectorize_interpreter_scan,
    make_scan_inputs,
    run_scan,
    scaled_error,
)

# Layout of each (B, X, L) scan input: "contig" (B, X, L) contiguous; "cl" a dense (B, L, X) tensor viewed
# transposed; "slice" columns of a wider (B, L, X + 5) buffer viewed transposed (z in in_proj's output, B and C
# in x_proj's output: time stride > X).
MODEL_LAYOUT = dict(u="cl", delta="cl", z="slice", B="slice", C="slice")
# (B, D, N, L, fwd (block_d, block_l, num_warps, d_regs), bwd, dtype, options, layouts)
SCAN_CASES = {
    "model_L33_save_inside": (2, 8, 4, 33, (4, 8, 1, 1), (4, 4, 1, 2), "float32", {}, MODEL_LAYOUT),
    "model_L33_save_every_2": (2, 8, 4, 33, (8, 4, 1, 1), (8, 8, 1, 2), "float32", {}, MODEL_LAYOUT),
    "model_ragged_N3_D5_L5": (1, 5, 3, 5, (4, 2, 1, 1), (4, 2, 1, 2), "float32", {}, MODEL_LAYOUT),
    "model_plain_L7": (1, 4, 4, 7, (4, 4, 1, 1), (4, 2, 1, 1), "float32",
                       dict(z=False, D=False, bias=False, h0=False, softplus=False), MODEL_LAYOUT),
    "mixed_layouts_L9": (2, 8, 4, 9, (4, 4, 1, 1), (8, 4, 1, 2), "float32", dict(h0=False),
                         dict(u="contig", delta="slice", z="cl", B="contig", C="cl")),
    "model_bf16_L33": (2, 8, 16, 33, (8, 8, 1, 1), (8, 4, 1, 2), "bfloat16", {}, MODEL_LAYOUT),
    # The wide regime's channels-last shapes (`default_configs`): chunks of 8 steps forward and backward.
    "model_L33_T8_both": (2, 16, 16, 33, (16, 8, 1, 1), (16, 8, 1, 2), "float32", {}, MODEL_LAYOUT),
}

# (B, D, L, W, bias, initial_states, activation, dtype, layout of x). Here the conv's tiles are 128 channels (64 in
# the backward) by 32 steps, a backward program walks 2 tiles: L = 70 and D = 130 span several tiles and programs
# (conv halos across tiles and programs: tiles overlap by W-1 steps; dweight/dbias partial sums from several
# programs, a partial tile).
CONV_CASES = {
    "W4_silu_bias_init_L70_D130": (2, 130, 70, 4, True, True, "silu", "float32", "slice"),
    "W4_silu_bias_L37": (2, 6, 37, 4, True, False, "silu", "float32", "slice"),
    "W3_nobias_init_L37": (1, 5, 37, 3, False, True, None, "float32", "slice"),
    "W2_silu_L37_contig": (2, 7, 37, 2, True, False, "silu", "float32", "contig"),
    "W1_silu_L5": (1, 4, 5, 1, True, False, "silu", "float32", "slice"),
    "W4_init_L2_shorter_than_state": (2, 4, 2, 4, True, True, "silu", "float32", "cl"),
    "W4_bf16_silu_bias_init_L70": (2, 9, 70, 4, True, True, "silu", "bfloat16", "slice"),
}


def in_layout(t: torch.Tensor, layout: str, seed: int = 0) -> torch.Tensor:
    """t's values (B, X, L) in `layout` (see MODEL_LAYOUT), as a new tensor requiring grad."""
    batch, dim, length = t.shape
    t = t.detach()
    if layout == "contig":
        out = t.contiguous()
    elif layout == "cl":
        out = t.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        g = torch.Generator().manual_seed(seed)
        buf = torch.randn(batch, length, dim + 5, generator=g).to(device=t.device, dtype=t.dtype)
        buf[..., 2:2 + dim] = t.transpose(1, 2)
        out = buf[..., 2:2 + dim].transpose(1, 2)
    assert torch.equal(out, t)
    return out.requires_grad_()


def layout_of(t: torch.Tensor) -> str:
    return "cl" if t.stride(1) < t.stride(2) else "contig"


def _scan_errors(case: str) -> dict:
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import ScanConfig, selective_scan_triton

    batch, dim, dstate, length, fwd, bwd, dtype, options, layouts = SCAN_CASES[case]
    inputs, grads, softplus = make_scan_inputs(batch, dim, dstate, length, getattr(torch, dtype), options)
    ref = run_scan(selective_scan_ref, inputs, grads, softplus)
    strided = dict(inputs)
    for i, (name, layout) in enumerate(layouts.items()):
        if inputs[name] is not None:
            strided[name] = in_layout(inputs[name], layout, seed=i)
    ours = run_scan(selective_scan_triton, strided, grads, softplus,
                    fwd_config=ScanConfig(*fwd), bwd_config=ScanConfig(*bwd))
    dense = {k: ours[k].is_contiguous() or ours[k].transpose(1, 2).is_contiguous()
             for k in ("y", "du", "ddelta", "dz", "dB") if k in ours}
    # Expected layouts: y follows u; each gradient follows its input's order ("slice" inputs are channels-last).
    want = {"y": layouts["u"], **{f"d{k}": layouts[k] for k in ("u", "delta", "z", "B", "C") if f"d{k}" in ours}}
    got = {k: layout_of(ours[k]) for k in want}
    if "dC" in want:
        want["dC"] = got["dC"] = "any"  # dC shares dB's (B's) layout in the kernel
    want = {k: "cl" if v == "slice" else v for k, v in want.items()}
    return {"errors": {k: scaled_error(ours[k], ref[k]) for k in ref}, "dense": dense,
            "layouts_ok": got == want, "layouts": got}


def _conv_errors(case: str) -> dict:
    from moai_lib.kernels.reference import causal_conv1d_ref
    from moai_lib.kernels.triton_conv import causal_conv1d_triton

    batch, dim, length, width, has_bias, has_init, act, dtype, layout = CONV_CASES[case]
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, dim, length, generator=g).to(dtype)
    weight = torch.randn(dim, width, generator=g)
    bias = torch.randn(dim, generator=g) if has_bias else None
    init = torch.randn(batch, dim, width - 1, generator=g).to(dtype) if has_init else None
    gy = torch.randn(batch, dim, length, generator=g)
    gf = torch.randn(batch, dim, width - 1, generator=g)
    results = {}
    for name, fn, layout_ in (("ref", causal_conv1d_ref, "contig"), ("ours", causal_conv1d_triton, layout)):
        xi = in_layout(x, layout_)
        params = {k: v.clone().requires_grad_() for k, v in (("weight", weight), ("bias", bias), ("init", init))
                  if v is not None}
        out, final = fn(xi, params["weight"], params.get("bias"), params.get("init"), return_final_states=True,
                        activation=act)
        loss = (out.float() * gy).sum() + (final.float() * gf).sum()
        dx, *dp = torch.autograd.grad(loss, [xi, *params.values()])
        results[name] = {"out": out, "final": final, "dx": dx, **dict(zip([f"d{k}" for k in params], dp, strict=True))}
        if name == "ours":  # the layouts the kernels return (the final states' slice adds a contiguous dx)
            xi = in_layout(x, layout_)
            out = fn(xi, params["weight"], params.get("bias"), params.get("init"), activation=act)
            layouts = {"out": layout_of(out), "dx": layout_of(torch.autograd.grad((out.float() * gy).sum(), xi)[0])}
    errors = {k: scaled_error(results["ours"][k], v) if v.numel() else 0.0 for k, v in results["ref"].items()}
    return {"errors": errors, "layouts": layouts, "want_dx": "contig" if layout == "contig" else "cl"}


def _dispatch_report() -> dict:
    from moai_lib.kernels import dispatch, reference

    x = torch.randn(2, 6, 9)
    report = {}
    for width in (4, 5):  # 5 > triton_conv.MAX_WIDTH: torch's conv (with a warning)
        w = torch.randn(6, width)
        out = dispatch.causal_conv1d(x, w, None, activation="silu", backend="triton")
        ref = reference.causal_conv1d_ref(x, w, None, activation="silu")
        report[f"W{width}"] = {"error": scaled_error(out, ref), "layout": layout_of(out)}
    return report


def _subprocess_main(group: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    _import_kernels_only()
    _vectorize_interpreter_scan()
    if group == "scan":
        result = {case: _scan_errors(case) for case in SCAN_CASES}
    else:
        # Larger conv tiles than on the GPU (the interpreter's cost is per program and op, not per element):
        # forward 32 steps, backward programs of 2 tiles of 64 channels by 32 steps. The GPU tests run the real ones.
        from moai_lib.kernels import triton_conv

        triton_conv._FWD_BLOCK_L, triton_conv._BWD_BLOCK_L, triton_conv._BWD_TILES = 32, 32, 2
        triton_conv._BWD_BLOCK_D = 64
        result = {"conv": {case: _conv_errors(case) for case in CONV_CASES}, "dispatch": _dispatch_report()}
    print(json.dumps(result))


@pytest.fixture(scope="module")
def interpreted(run_interpreted):
    """Runs a group of comparisons of this file in a fresh process under TRITON_INTERPRET=1; returns its JSON."""
    return lambda group: run_interpreted(__file__, group)


def test_interpreted_strided_scan_matches_reference(interpreted):
    results = interpreted("scan")
    assert set(results) == set(SCAN_CASES)
    for case, res in results.items():
        tol = TOL[SCAN_CASES[case][6]]
        bad = {k: v for k, v in res["errors"].items() if not v <= tol}
        assert not bad, f"{case}: {bad} (tolerance {tol})"
        assert {"y", "last", "du", "ddelta", "dA", "dB", "dC"} <= set(res["errors"])
        assert res["layouts_ok"], (case, res["layouts"])
        assert all(res["dense"].values()), (case, res["dense"])


def test_interpreted_conv_matches_reference(interpreted):
    results = interpreted("conv_dispatch")
    assert set(results["conv"]) == set(CONV_CASES)
    for case, res in results["conv"].items():
        tol = TOL[CONV_CASES[case][7]]
        bad = {k: v for k, v in res["errors"].items() if not v <= tol}
        assert not bad, f"{case}: {bad} (tolerance {tol})"
        assert {"out", "final", "dx", "dweight"} <= set(res["errors"])
        assert res["layouts"] == {"out": "cl", "dx": res["want_dx"]}, (case, res["layouts"])
    report = results["dispatch"]
    assert report["W4"]["layout"] == "cl" and report["W4"]["error"] <= TOL["float32"]  # the Triton conv
    assert report["W5"]["layout"] == "contig" and report["W5"]["error"] == 0.0  # torch's conv


def test_conv_rejects_bad_arguments():
    pytest.importorskip("triton")
    from moai_lib.kernels.triton_conv import causal_conv1d_triton

    x = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="widths 1..4, got W=5; use backend=.torch."):
        causal_conv1d_triton(x, torch.randn(4, 5))
    with pytest.raises(ValueError, match="activation must be"):
        causal_conv1d_triton(x, torch.randn(4, 3), activation="relu")
    with pytest.raises(ValueError, match=r"initial_states must have shape \(B, D, W-1\)"):
        causal_conv1d_triton(x, torch.randn(4, 3), initial_states=torch.randn(1, 4, 3))


# ------------------------------------------------------------------------------------------------------------
# GPU: the compiled kernels at real widths, in the mixer's layouts. Skipped without CUDA (`pytest -k cuda`).

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the compiled Triton kernels (CPU runs use the interpreter)")


@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [2, 8])
def test_cuda_channels_last_scan_matches_reference(dtype, batch):
    """E=2048-wide channels-last views (the 370m mixer's layout) at L=300 with the default launch shapes (B=2: the
    narrow regime; B=8: the wide one, chunks of 8 steps): ours vs the sequential reference on the same inputs, in
    fp32 (fp32: 1e-4 scaled error; bf16: the reference on the bf16-valued inputs in fp32, 2^-6 scaled error:
    gradients rounded to bf16)."""
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import selective_scan_triton

    inputs, grads, softplus = make_scan_inputs(batch, 2048, 16, 300, getattr(torch, dtype), {}, device="cuda")
    strided = dict(inputs)
    for i, (name, layout) in enumerate(MODEL_LAYOUT.items()):
        strided[name] = in_layout(inputs[name], layout, seed=i)
    ours = run_scan(selective_scan_triton, strided, grads, softplus)
    inputs32 = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref = run_scan(selective_scan_ref, inputs32, grads, softplus)
    tol = 1e-4 if dtype == "float32" else 2 ** -6
    errors = {k: scaled_error(ours[k], ref[k]) for k in ref}
    assert max(errors.values()) <= tol, errors
    assert layout_of(ours["y"]) == layout_of(ours["dz"]) == layout_of(ours["dB"]) == "cl"


@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("width", [2, 3, 4])
def test_cuda_conv_matches_reference(dtype, width, monkeypatch):
    """x as the first E columns of a (B, L, 2E) tensor (in_proj's output), E = 2048, L = 1000 (not a multiple of
    the tile), with an initial state: values and all gradients vs the reference computed in fp32."""
    from moai_lib.kernels.reference import causal_conv1d_ref
    from moai_lib.kernels.triton_conv import causal_conv1d_triton

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the reference's conv in true fp32

    torch.manual_seed(0)
    batch, dim, length = 2, 2048, 1000
    xz = torch.randn(batch, length, 2 * dim, device="cuda").to(getattr(torch, dtype))
    weight = torch.randn(dim, width, device="cuda") / width
    bias = torch.randn(dim, device="cuda")
    init = torch.randn(batch, dim, width - 1, device="cuda").to(xz.dtype)
    gy = torch.randn(batch, dim, length, device="cuda")
    outs = {}
    for name, fn, x in (("ours", causal_conv1d_triton, xz[..., :dim].transpose(1, 2)),
                        ("ref", causal_conv1d_ref, xz[..., :dim].transpose(1, 2).float().contiguous())):
        x = x.detach().requires_grad_()
        ps = [t.detach().float().clone().requires_grad_() if name == "ref" else t.detach().clone().requires_grad_()
              for t in (weight, bias, init)]
        out = fn(x, *ps, activation="silu")
        grads = torch.autograd.grad((out.float() * gy).sum(), [x, *ps])
        outs[name] = [out, *grads]
    tol = 1e-5 if dtype == "float32" else 2 ** -6
    errors = [scaled_error(a, b) for a, b in zip(outs["ours"], outs["ref"], strict=True)]
    assert max(errors) <= tol, errors
    assert layout_of(outs["ours"][0]) == layout_of(outs["ours"][1]) == "cl"


if __name__ == "__main__":
    _subprocess_main(sys.argv[1])
