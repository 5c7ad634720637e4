"""The Triton kernels (`triton_scan`, `triton_decode`, dispatch backend "triton") against the reference kernels:
outputs, final states and every gradient.

On the CPU the kernels run under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before
triton is first imported; `import moai_lib` already imports triton through transformers' optional dependencies,
so each group of comparisons runs in a fresh Python process: this file run as a script, which prints the
errors as JSON for the tests to check. Shapes are tiny, with chunks shorter than L so that states are carried
between chunks. The GPU tests at the end run the compiled kernels at realistic shapes and skip without CUDA.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# Max error, scaled by the largest reference magnitude of that tensor, per input dtype. fp32: both sides
# compute in fp32 and differ only in summation order. bf16: both round inputs, outputs and gradients to bf16
# (2^-8 relative), so a few bf16 ulps of the largest value.
TOL = {"float32": 1e-5, "bfloat16": 2 ** -6}

# (B, D, N, L, fwd (block_d, block_l, num_warps, d_regs), bwd, dtype, options). Chunks are shorter than L
# (but in the single-step case), so states are carried from chunk to chunk in both directions.
SCAN_CASES = {
    # Backward chunks shorter than the forward's: the forward saves states from inside its chunks.
    "full_L33_save_inside": (2, 8, 4, 33, (4, 8, 1, 1), (4, 4, 1, 2), "float32", {}),
    # Backward chunks longer than the forward's: the forward saves every other chunk start.
    "full_L33_save_every_2": (2, 8, 4, 33, (8, 4, 1, 1), (8, 8, 1, 2), "float32", {}),
    # N and D that are not multiples of the blocks (masked states and channels), L=5.
    "ragged_N3_D5_L5": (1, 5, 3, 5, (4, 2, 1, 1), (4, 2, 1, 2), "float32", {}),
    # No optional input, no softplus, a single step.
    "plain_L1": (1, 4, 4, 1, (4, 4, 1, 1), (4, 4, 1, 1), "float32",
                 dict(z=False, D=False, bias=False, h0=False, softplus=False)),
    # delta_bias without softplus; no initial state (zero state, no dh0).
    "bias_no_softplus_L5": (2, 4, 4, 5, (4, 2, 1, 1), (4, 4, 1, 1), "float32", dict(h0=False, softplus=False)),
    # One-step chunks (what the default launch shapes use for N=64).
    "chunks_of_1_L3": (1, 4, 4, 3, (4, 1, 1, 1), (4, 1, 1, 2), "float32", {}),
    "bf16_L33": (2, 8, 16, 33, (8, 8, 1, 1), (8, 4, 1, 2), "bfloat16", {}),
}


def scaled_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def make_scan_inputs(batch, dim, dstate, length, dtype, options, device="cpu", seed=0):
    """Inputs of `selective_scan_ref` as a dict (those switched off by `options` are None), requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    opt = dict(dict(z=True, D=True, bias=True, h0=True, softplus=True), **options)
    inputs = dict(
        u=randn(batch, dim, length).to(dtype),
        delta=randn(batch, dim, length, scale=0.5).to(dtype),
        A=-(0.2 + 2 * torch.rand(dim, dstate, generator=g)).to(device),
        B=randn(batch, dstate, length).to(dtype),
        C=randn(batch, dstate, length).to(dtype),
        D=randn(dim) if opt["D"] else None,
        z=randn(batch, dim, length).to(dtype) if opt["z"] else None,
        delta_bias=randn(dim, scale=0.5) if opt["bias"] else None,
        initial_state=randn(batch, dim, dstate) if opt["h0"] else None,
    )
    for t in inputs.values():
        if t is not None:
            t.requires_grad_()
    grads = dict(y=randn(batch, dim, length), last=randn(batch, dim, dstate))
    return inputs, grads, opt["softplus"]


def run_scan(fn, inputs, grads, softplus, **kwargs):
    """Output, final state and the gradients of <y, gy> + <last, glast> w.r.t. every input, by name."""
    y, last = fn(**inputs, delta_softplus=softplus, return_last_state=True, **kwargs)
    names = [k for k, v in inputs.items() if v is not None]
    loss = (y.float() * grads["y"]).sum() + (last * grads["last"]).sum()
    dx = torch.autograd.grad(loss, [inputs[k] for k in names])
    return {"y": y, "last": last, **{f"d{k}": v for k, v in zip(names, dx, strict=True)}}


# ------------------------------------------------------------------------------------------------------------
# The subprocess side: `python test_triton_kernels.py GROUP` with TRITON_INTERPRET=1.


def _import_kernels_only() -> None:
    """Make `moai_lib` importable without running its __init__ (it imports transformers, ~8 s here); the
    kernels need only torch and triton."""
    package = types.ModuleType("moai_lib")
    package.__path__ = [str(ROOT / "moai_lib")]
    sys.modules["moai_lib"] = package


def _vectorize_interpreter_scan() -> None:
    """Triton's interpreter evaluates a custom-combine `tl.associative_scan` one element at a time in Python
    (most of this file's runtime). Same sequential combine(acc, x_t) along the axis, one call per step."""
    import numpy as np
    from triton.runtime import interpreter

    def generic_scan(self, input):
        data = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in input]
        out = [np.empty_like(d) for d in data]
        acc = [self.to_tensor(np.ascontiguousarray(d[0]), arg.dtype) for d, arg in zip(data, input, strict=True)]
        for o, a in zip(out, acc, strict=True):
            o[0] = a.handle.data.reshape(o[0].shape)
        for i in range(1, data[0].shape[0]):
            cur = [self.to_tensor(np.ascontiguousarray(d[i]), arg.dtype) for d, arg in zip(data, input, strict=True)]
            ret = self.combine_fn.fn(*acc, *cur)
            acc = list(ret) if isinstance(ret, tuple) else [ret]
            for o, a in zip(out, acc, strict=True):
                o[i] = a.handle.data.reshape(o[i].shape)
        return [self.to_tensor(np.ascontiguousarray(np.moveaxis(o, 0, self.axis)), arg.dtype)
                for o, arg in zip(out, input, strict=True)]

    if hasattr(interpreter, "ScanOps") and hasattr(interpreter.ScanOps, "generic_scan"):
        interpreter.ScanOps.generic_scan = generic_scan


def _scan_errors(case: str) -> dict:
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import ScanConfig, selective_scan_triton

    batch, dim, dstate, length, fwd, bwd, dtype, options = SCAN_CASES[case]
    inputs, grads, softplus = make_scan_inputs(batch, dim, dstate, length, getattr(torch, dtype), options)
    ref = run_scan(selective_scan_ref, inputs, grads, softplus)
    ours = run_scan(selective_scan_triton, inputs, grads, softplus,
                    fwd_config=ScanConfig(*fwd), bwd_config=ScanConfig(*bwd))
    return {k: scaled_error(ours[k], ref[k]) for k in ref}


def _decode_errors() -> dict:
    from moai_lib.kernels.reference import causal_conv1d_update_ref, selective_state_update_ref
    from moai_lib.kernels.triton_decode import causal_conv1d_update_triton, selective_state_update_triton

    g = torch.Generator().manual_seed(0)
    batch, dim, dstate = 2, 70, 5  # 70 channels: two programs of 64, the second one ragged
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for full in (True, False):
            xz = torch.randn(batch, 2 * dim, generator=g).to(dtype)  # x and z are column slices, as in the model
            x, z = xz[:, :dim], xz[:, dim:]
            dt = (0.5 * torch.randn(batch, dim, generator=g)).to(dtype)
            A = -(0.2 + 2 * torch.rand(dim, dstate, generator=g))
            BC = torch.randn(batch, 2 * dstate, generator=g).to(dtype)
            D, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
            state = torch.randn(batch, dim, dstate, generator=g)
            opts = dict(D=D, z=z, dt_bias=bias, dt_softplus=True) if full else {}
            s_ref, s_ours = state.clone(), state.clone()
            y_ref = selective_state_update_ref(s_ref, x, dt, A, BC[:, :dstate], BC[:, dstate:], **opts)
            y_ours = selective_state_update_triton(s_ours, x, dt, A, BC[:, :dstate], BC[:, dstate:], **opts)
            key = f"state_update_{'full' if full else 'plain'}_{str(dtype)[6:]}"
            results[key] = {"y": scaled_error(y_ours, y_ref), "state": scaled_error(s_ours, s_ref)}
        for width, bias_on, act in ((4, True, "silu"), (2, False, None), (1, True, "silu")):
            x = torch.randn(batch, 2 * dim, generator=g).to(dtype)[:, :dim]
            weight, bias = torch.randn(dim, width, generator=g), torch.randn(dim, generator=g)
            conv_state = torch.randn(batch, dim, width - 1, generator=g).to(dtype)
            c_ref, c_ours = conv_state.clone(), conv_state.clone()
            o_ref = causal_conv1d_update_ref(x, c_ref, weight, bias if bias_on else None, act)
            o_ours = causal_conv1d_update_triton(x, c_ours, weight, bias if bias_on else None, act)
            results[f"conv_update_W{width}_{str(dtype)[6:]}"] = {
                "y": scaled_error(o_ours, o_ref), "state": scaled_error(c_ours, c_ref) if width > 1 else 0.0}
    return results


def _dispatch_report() -> dict:
    import moai_lib.kernels as kernels

    imported_on_load = "triton" in sys.modules  # must be False: dispatch imports triton lazily
    from moai_lib.kernels import dispatch, reference

    inputs, grads, softplus = make_scan_inputs(2, 8, 4, 9, torch.float32, {})
    ref = run_scan(reference.selective_scan_ref, inputs, grads, softplus)
    ours = run_scan(kernels.selective_scan, inputs, grads, softplus, backend="triton")
    state = torch.randn(2, 8, 4)
    s_ref, s_ours = state.clone(), state.clone()
    args = (torch.randn(2, 8), torch.randn(2, 8), -torch.rand(8, 4), torch.randn(2, 4), torch.randn(2, 4))
    y_ref = reference.selective_state_update_ref(s_ref, *args, dt_softplus=True)
    y_ours = kernels.selective_state_update(s_ours, *args, dt_softplus=True, backend="triton")
    conv = torch.randn(2, 8, 3)
    c_ref, c_ours = conv.clone(), conv.clone()
    x, w = torch.randn(2, 8), torch.randn(8, 4)
    o_ref = reference.causal_conv1d_update_ref(x, c_ref, w, None, "silu")
    o_ours = kernels.causal_conv1d_update(x, c_ours, w, None, "silu", backend="triton")
    return {
        "triton_imported_by_import_moai_lib_kernels": imported_on_load,
        "available_cpu": dispatch.available_backends("cpu"),
        "auto_cpu": dispatch.resolve_backend("auto", "cpu"),
        "errors": {
            "scan": {k: scaled_error(ours[k], ref[k]) for k in ref},
            "state_update": {"y": scaled_error(y_ours, y_ref), "state": scaled_error(s_ours, s_ref)},
            "conv_update": {"y": scaled_error(o_ours, o_ref), "state": scaled_error(c_ours, c_ref)},
        },
    }


def _subprocess_main(group: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    _import_kernels_only()
    if group == "scan":
        _vectorize_interpreter_scan()
        result = {case: _scan_errors(case) for case in SCAN_CASES}
    else:
        result = {"dispatch": _dispatch_report()}  # first: it checks what importing moai_lib.kernels imports
        _vectorize_interpreter_scan()
        result["decode"] = _decode_errors()
    print(json.dumps(result))


@pytest.fixture(scope="module")
def interpreted(run_interpreted):
    """Runs a group of comparisons of this file in a fresh process under TRITON_INTERPRET=1; returns its JSON."""
    return lambda group: run_interpreted(__file__, group)


def test_interpreted_scan_matches_reference(interpreted):
    results = interpreted("scan")
    assert set(results) == set(SCAN_CASES)
    for case, errors in results.items():
        tol = TOL[SCAN_CASES[case][6]]
        bad = {k: v for k, v in errors.items() if not v <= tol}
        assert not bad, f"{case}: {bad} (tolerance {tol})"
        assert {"y", "last", "du", "ddelta", "dA", "dB", "dC"} <= set(errors)


def test_interpreted_decode_and_dispatch(interpreted):
    results = interpreted("decode_dispatch")
    assert len(results["decode"]) == 10
    for case, errors in results["decode"].items():
        tol = TOL["bfloat16" if case.endswith("bfloat16") else "float32"]
        assert max(errors.values()) <= tol, (case, errors)
    report = results["dispatch"]
    assert report["triton_imported_by_import_moai_lib_kernels"] is False
    assert "triton" in report["available_cpu"]
    # the interpreter is for tests, never chosen automatically: the fused C++ scan, or the torch one without it
    assert report["auto_cpu"] == ("cpu" if "cpu" in report["available_cpu"] else "torch")
    for name, errors in report["errors"].items():
        assert max(errors.values()) <= TOL["float32"], (name, errors)


# ------------------------------------------------------------------------------------------------------------
# Dispatch rules, in this process (nothing here runs a Triton kernel).


def test_triton_is_a_valid_backend_and_config_value():
    from moai_lib import get_mamba_config
    from moai_lib.kernels import BACKENDS

    assert "triton" in BACKENDS
    assert get_mamba_config("tiny", kernel_backend="triton").kernel_backend == "triton"


def test_default_launch_shapes():
    """The launch shapes `selective_scan_triton` picks (`default_configs`), as measured on the H200 (BENCHMARKS.md
    section 1): wide and narrow regimes, and chunks of 8 steps for channels-last inputs in the wide regime."""
    pytest.importorskip("triton")
    from moai_lib.kernels.triton_scan import ScanConfig, default_configs

    assert default_configs(8, 4096) == (ScanConfig(32, 4), ScanConfig(16, 4, d_regs=2))
    assert default_configs(8, 2048) == (ScanConfig(16, 4), ScanConfig(16, 4, d_regs=2))
    assert default_configs(1, 4096) == (ScanConfig(8, 4), ScanConfig(8, 4))
    for batch, dim, block_d in ((8, 4096, 32), (8, 2048, 16)):
        assert default_configs(batch, dim, channels_last=True) == (ScanConfig(block_d, 8), ScanConfig(16, 8, d_regs=2))
    assert default_configs(1, 4096, channels_last=True) == (ScanConfig(8, 4), ScanConfig(8, 4))  # not measured
    assert default_configs(8, 2048, dstate=32, channels_last=True)[0].block_l == 4  # N > 16: unchanged


def test_explicit_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    from moai_lib.kernels import BackendUnavailableError, dispatch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in dispatch.available_backends("cpu")
    with pytest.raises(BackendUnavailableError, match="backend 'triton' is unavailable: .*CUDA GPU"):
        dispatch.resolve_backend("triton", "cpu")


def test_auto_on_cuda_prefers_triton(monkeypatch):
    from moai_lib.kernels import BackendUnavailableError, dispatch

    pytest.importorskip("triton")
    assert dispatch.resolve_backend("auto", torch.device("cuda")) == "triton"  # resolving touches no GPU
    reason = "triton is not importable (ImportError: test)"
    monkeypatch.setattr(dispatch, "_triton_import_error", lambda: reason)
    assert dispatch.resolve_backend("auto", torch.device("cuda")) in ("mamba_ssm", "torch")
    with pytest.raises(BackendUnavailableError, match=r"triton is not importable \(ImportError: test\)"):
        dispatch.resolve_backend("triton", torch.device("cuda"))


# ------------------------------------------------------------------------------------------------------------
# GPU: the compiled kernels at realistic shapes (B=2, D=256, N=16). Skipped without CUDA.

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the compiled Triton kernels (CPU runs use the interpreter)")


@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("length", [512, 1000, 2048])
def test_gpu_scan_matches_reference(dtype, length):
    """fp32: ours vs the sequential reference. bf16: the error of ours against the fp32 reference (computed on
    the same bf16-valued inputs) must stay within twice that of the pure-torch chunked path, plus 2^-9."""
    from moai_lib.kernels.cpu import selective_scan_chunked
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import selective_scan_triton

    inputs, grads, softplus = make_scan_inputs(2, 256, 16, length, getattr(torch, dtype), {}, device="cuda")
    ours = run_scan(selective_scan_triton, inputs, grads, softplus)
    if dtype == "float32":
        ref = run_scan(selective_scan_ref, inputs, grads, softplus)
        errors = {k: scaled_error(ours[k], ref[k]) for k in ref}
        assert max(errors.values()) <= 1e-4, errors
        return
    inputs32 = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref = run_scan(selective_scan_ref, inputs32, grads, softplus)
    base = run_scan(selective_scan_chunked, inputs, grads, softplus)
    for k in ref:
        ours_err, base_err = scaled_error(ours[k], ref[k]), scaled_error(base[k], ref[k])
        assert ours_err <= 2 * base_err + 2 ** -9, (k, ours_err, base_err)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_matches_reference(dtype):
    from moai_lib.kernels.reference import causal_conv1d_update_ref, selective_state_update_ref
    from moai_lib.kernels.triton_decode import causal_conv1d_update_triton, selective_state_update_triton

    torch.manual_seed(0)
    batch, dim, dstate, width = 16, 2050, 16, 4
    xz = torch.randn(batch, 2 * dim, device="cuda").to(dtype)
    x, z = xz[:, :dim], xz[:, dim:]
    dt = (0.5 * torch.randn(batch, dim, device="cuda")).to(dtype)
    A = -torch.rand(dim, dstate, device="cuda") * 4
    B, C = torch.randn(batch, dstate, device="cuda").to(dtype), torch.randn(batch, dstate, device="cuda").to(dtype)
    D, bias = torch.randn(dim, device="cuda"), torch.randn(dim, device="cuda")
    state = torch.randn(batch, dim, dstate, device="cuda")
    s_ref, s_ours = state.clone(), state.clone()
    y_ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, bias, True)
    y_ours = selective_state_update_triton(s_ours, x, dt, A, B, C, D, z, bias, True)
    tol = TOL[str(dtype)[6:]]
    assert scaled_error(y_ours, y_ref) <= tol and scaled_error(s_ours, s_ref) <= 1e-5
    weight, cbias = torch.randn(dim, width, device="cuda"), torch.randn(dim, device="cuda")
    conv = torch.randn(batch, dim, width - 1, device="cuda").to(dtype)
    c_ref, c_ours = conv.clone(), conv.clone()
    o_ref = causal_conv1d_update_ref(x, c_ref, weight, cbias, "silu")
    o_ours = causal_conv1d_update_triton(x, c_ours, weight, cbias, "silu")
    assert scaled_error(o_ours, o_ref) <= tol and torch.equal(c_ours, c_ref)


@requires_cuda
def test_gpu_model_triton_backend_matches_torch_backend():
    """The tiny model on the GPU: logits, parameter gradients, and cached decoding with backend 'triton'."""
    from moai_lib import MoaiMambaForCausalLM, get_mamba_config

    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 37), device="cuda")
    outs = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = MoaiMambaForCausalLM(get_mamba_config("tiny", kernel_backend=backend)).cuda()
        logits = model(ids, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            out = model(ids[:, :20], use_cache=True)
            steps = [out.logits[:, -1]]
            for t in range(20, 36):
                out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
                steps.append(out.logits[:, -1])
        outs[backend] = (logits.detach(), grads, torch.stack(steps, 1))
    (l_t, g_t, _), (l_o, g_o, s_o) = outs["torch"], outs["triton"]
    assert scaled_error(l_o, l_t) <= 1e-4
    assert max(scaled_error(g_o[n], g_t[n]) for n in g_t) <= 1e-3
    assert scaled_error(s_o, l_t[:, 19:36]) <= 1e-4  # decoding with the Triton step kernels


if __name__ == "__main__":
    _subprocess_main(sys.argv[1])
