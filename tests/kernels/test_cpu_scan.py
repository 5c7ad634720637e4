"""The fast CPU scans (`kernels/cpu.py`: chunked pure torch; `kernels/cpu_fused.py`: fused C++) against the
reference oracle, the dispatch routing, and the decode-step references (`selective_state_update_ref`,
`causal_conv1d_update_ref`) against their full-sequence references."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from moai_lib.kernels import cpu_fused, dispatch
from moai_lib.kernels.cpu import selective_scan_chunked
from moai_lib.kernels.cpu_fused import selective_scan_fused
from moai_lib.kernels.reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

# Error budget (rtol, atol) per input dtype, relative to the reference's own scale, elementwise:
# |fast - ref| <= atol * max|ref| + rtol * |ref|. fp32: both compute in fp32 and differ only in summation
# order and exp2 vs exp (observed <= 4e-7 of the scale; <= 7e-7 with the fused kernel's polynomial exp/log).
# bf16: both compute in fp32 from the same bf16 inputs, but outputs and gradients are rounded to bf16, where
# one rounding flip is up to 2**-7 = 7.8e-3 of the value (observed <= 5e-5 of the scale).
TOLERANCES = {
    torch.float32: {"out": (1e-4, 1e-5), "grad": (1e-4, 1e-5)},
    torch.bfloat16: {"out": (1e-2, 1e-3), "grad": (1e-2, 1e-3)},
}

# Option sets (D skip, z gate, delta_bias, softplus, initial state) covering each flag on and off.
OPTIONS = {
    "plain": dict(D=False, z=False, delta_bias=False, softplus=False, h0=False),
    "mamba": dict(D=True, z=True, delta_bias=True, softplus=True, h0=False),
    "all": dict(D=True, z=True, delta_bias=True, softplus=True, h0=True),
    "state_D": dict(D=True, z=False, delta_bias=False, softplus=False, h0=True),
    "gate_softplus": dict(D=False, z=True, delta_bias=False, softplus=True, h0=True),
}


def _inputs(batch, dim, dstate, length, opts, dtype=torch.float32, seed=0, delta_scale=1.0, a_min=None):
    """Scan inputs as a Mamba layer makes them: A = -exp(A_log), A_log in [0, log 16] (S4D-real range);
    delta raw (softplus applied in the scan) or already positive."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    A = -torch.exp(torch.rand(dim, dstate, generator=g) * math.log(16))
    if a_min is not None:
        A[0] = a_min  # a channel with a very fast decay
    if opts["softplus"]:
        delta = randn(1, 1, length).abs() * delta_scale + randn(batch, dim, length) - 1.0
    else:
        delta = torch.rand(batch, dim, length, generator=g) * 0.5 * delta_scale
    args = {
        "u": randn(batch, dim, length).to(dtype),
        "delta": delta.to(dtype),
        "A": A,
        "B": randn(batch, dstate, length).to(dtype),
        "C": randn(batch, dstate, length).to(dtype),
        "D": randn(dim) if opts["D"] else None,
        "z": randn(batch, dim, length).to(dtype) if opts["z"] else None,
        "delta_bias": (torch.rand(dim, generator=g) - 4.0) if opts["delta_bias"] else None,
        "initial_state": randn(batch, dim, dstate) if opts["h0"] else None,
    }
    return args, opts["softplus"]


def _run(fn, args, softplus, seed=1, **kwargs):
    """Output, final state and the gradients of a random projection of both w.r.t. every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if v is not None}
    out, last = fn(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
        D=leaves.get("D"), z=leaves.get("z"), delta_bias=leaves.get("delta_bias"),
        delta_softplus=softplus, return_last_state=True, initial_state=leaves.get("initial_state"), **kwargs,
    )
    g = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=g).to(out.dtype)
    g_last = torch.randn(last.shape, generator=g)
    grads = torch.autograd.grad((out.float() * g_out.float()).sum() + (last * g_last).sum(), list(leaves.values()),
                                allow_unused=True)  # the reference leaves some inputs unused when L = 0
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves.values(), grads, strict=True)]
    return out.detach(), last.detach(), dict(zip(leaves, grads, strict=True))


def _assert_close(actual, expected, tol, what):
    rtol, atol = tol
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(expected).all(), f"{what}: the reference itself is not finite"
    allowed = atol * expected.abs().max() + rtol * expected.abs()
    err = (actual - expected).abs()
    worst = (err - allowed).argmax()
    assert (err <= allowed).all(), (
        f"{what}: max error {err.max().item():.3g} at {worst.item()} exceeds the budget "
        f"(scale {expected.abs().max().item():.3g}, rtol {rtol}, atol {atol})"
    )


def _compare(args, softplus, dtype, fn=selective_scan_chunked, **kwargs):
    fast = _run(fn, args, softplus, **kwargs)
    ref = _run(selective_scan_ref, args, softplus)
    tol = TOLERANCES[dtype]
    _assert_close(fast[0], ref[0], tol["out"], "output")
    _assert_close(fast[1], ref[1], tol["out"], "final state")
    assert fast[2].keys() == ref[2].keys()
    for name in ref[2]:
        _assert_close(fast[2][name], ref[2][name], tol["grad"], f"grad {name}")


@pytest.mark.parametrize("length,chunk_size", [(1, None), (7, 3), (64, None), (130, 32), (257, 64)])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_chunked_matches_reference_fp32(length, chunk_size, options):
    args, softplus = _inputs(2, 5, 4, length, OPTIONS[options])
    _compare(args, softplus, torch.float32, chunk_size=chunk_size)


@pytest.mark.parametrize("length,chunk_size", [(7, None), (130, 16), (257, 100)])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_chunked_matches_reference_bf16(length, chunk_size, options):
    args, softplus = _inputs(2, 6, 8, length, OPTIONS[options], dtype=torch.bfloat16)
    _compare(args, softplus, torch.bfloat16, chunk_size=chunk_size)


def test_batch_one_with_wide_channels_and_strided_inputs():
    """B = 1 takes the 2-D transpose paths; the inputs are non-contiguous views, as a model's splits are."""
    args, softplus = _inputs(1, 40, 16, 60, OPTIONS["all"])
    for name in ("u", "delta", "z", "B"):
        args[name] = args[name].transpose(1, 2).contiguous().transpose(1, 2)  # stride 1 on D (or N), not L
        assert not args[name].is_contiguous()
    _compare(args, softplus, torch.float32, chunk_size=24)


def test_extreme_decays_stay_finite_and_match():
    """softplus(delta) up to ~20 with A down to -16, and a channel with A = -1e3: every decay underflows to
    exactly 0 instead of overflowing, and the values and gradients still match the reference."""
    args, softplus = _inputs(2, 4, 6, 40, OPTIONS["all"], delta_scale=20.0, a_min=-1e3)
    assert F.softplus(args["delta"] + args["delta_bias"][:, None]).max() > 15
    out, last, grads = _run(selective_scan_chunked, args, softplus, chunk_size=16)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    _compare(args, softplus, torch.float32, chunk_size=16)


def test_chunk_size_does_not_change_the_result():
    args, softplus = _inputs(2, 3, 5, 50, OPTIONS["all"])
    results = [_run(selective_scan_chunked, args, softplus, chunk_size=c) for c in (1, 7, 50, None)]
    for other in results[1:]:
        torch.testing.assert_close(other[0], results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other[1], results[0][1], rtol=1e-5, atol=1e-6)
        for name in results[0][2]:
            torch.testing.assert_close(other[2][name], results[0][2][name], rtol=1e-5, atol=1e-6)


def test_empty_sequence_returns_the_initial_state():
    args, softplus = _inputs(2, 3, 4, 0, OPTIONS["all"])
    out, last, grads = _run(selective_scan_chunked, args, softplus)
    ref_out, ref_last, _ = _run(selective_scan_ref, args, softplus)
    assert out.shape == ref_out.shape == (2, 3, 0)
    torch.testing.assert_close(last, ref_last)
    torch.testing.assert_close(last, args["initial_state"])
    assert grads["u"].shape == (2, 3, 0)


def test_rejects_bad_shapes_and_chunk_size():
    args, _ = _inputs(1, 3, 4, 5, OPTIONS["plain"])
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(args["u"], args["delta"], args["A"], args["B"], args["C"], chunk_size=0)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan_chunked(args["u"], args["delta"], args["A"], args["B"][:, :, :4], args["C"])
    with pytest.raises(ValueError, match="A must be real"):
        selective_scan_chunked(args["u"], args["delta"], args["A"][:2], args["B"], args["C"])


# ---- fused C++ scan (backend "cpu") ---------------------------------------------------------------------

needs_fused = pytest.mark.skipif(isinstance(cpu_fused.load_library(), str),
                                 reason=f"fused CPU scan unavailable: {cpu_fused.load_library()}")


@pytest.fixture(params=["best", "base"])
def isa(request, monkeypatch):
    """Run the fused kernel with the best instruction set here and with the portable baseline copy."""
    monkeypatch.setitem(cpu_fused._ISA, "value", -1 if request.param == "best" else 0)
    return request.param


@needs_fused
@pytest.mark.parametrize("length", [1, 7, 64, 65, 130])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_fused_matches_reference_fp32(length, options, isa):
    args, softplus = _inputs(2, 5, 4, length, OPTIONS[options])
    _compare(args, softplus, torch.float32, fn=selective_scan_fused)


@needs_fused
@pytest.mark.parametrize("dstate", [1, 8, 16, 17, 32])
def test_fused_state_sizes(dstate, isa):
    """N is padded to whole 8-float vectors inside the kernel: 1..32 in one, two, three or four of them."""
    args, softplus = _inputs(2, 3, dstate, 70, OPTIONS["all"])
    _compare(args, softplus, torch.float32, fn=selective_scan_fused)


@needs_fused
@pytest.mark.parametrize("length", [7, 130])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_fused_matches_reference_bf16(length, options):
    args, softplus = _inputs(2, 6, 16, length, OPTIONS[options], dtype=torch.bfloat16)
    _compare(args, softplus, torch.bfloat16, fn=selective_scan_fused)


@needs_fused
def test_fused_strided_inputs_and_threads(monkeypatch):
    """Non-contiguous (B, L, D)-major inputs, as the model's splits are, read in place through their strides;
    several threads (rows handed out in blocks, B/C gradients reduced over channel slots) give the same result."""
    args, softplus = _inputs(2, 40, 16, 90, OPTIONS["all"])
    for name in ("u", "delta", "z", "B"):
        args[name] = args[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not args[name].is_contiguous()
    _compare(args, softplus, torch.float32, fn=selective_scan_fused)
    one = _run(selective_scan_fused, args, softplus)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        three = _run(selective_scan_fused, args, softplus)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(three[0], one[0], rtol=0, atol=0)  # rows are independent: bitwise equal
    torch.testing.assert_close(three[1], one[1], rtol=0, atol=0)
    for name in one[2]:
        torch.testing.assert_close(three[2][name], one[2][name], rtol=1e-6, atol=1e-6)  # B, C: summation order


@needs_fused
def test_fused_backward_is_bitwise_reproducible_under_load():
    """The B/C gradients are summed over fixed slots of channels, not over whichever thread ran which channels:
    the same inputs give bitwise the same gradients however the threads are scheduled (here: 4 threads on this
    machine's cores, with a busy process beside them), which bitwise-exact training resumes rely on."""
    import subprocess
    import sys

    args, softplus = _inputs(2, 64, 16, 256, OPTIONS["all"])
    threads = torch.get_num_threads()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    torch.set_num_threads(4)
    try:
        runs = [_run(selective_scan_fused, args, softplus)[2] for _ in range(12)]
    finally:
        torch.set_num_threads(threads)
        busy.kill()
        busy.wait()
    for run in runs[1:]:
        for name in runs[0]:
            assert torch.equal(run[name], runs[0][name]), name


@needs_fused
def test_fused_extreme_decays_stay_finite_and_match(isa):
    args, softplus = _inputs(2, 4, 6, 40, OPTIONS["all"], delta_scale=20.0, a_min=-1e3)
    assert F.softplus(args["delta"] + args["delta_bias"][:, None]).max() > 15
    out, last, grads = _run(selective_scan_fused, args, softplus)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    _compare(args, softplus, torch.float32, fn=selective_scan_fused)


@needs_fused
def test_fused_empty_sequence_and_large_state():
    args, softplus = _inputs(2, 3, 4, 0, OPTIONS["all"])
    out, last, grads = _run(selective_scan_fused, args, softplus)
    assert out.shape == (2, 3, 0) and grads["u"].shape == (2, 3, 0)
    torch.testing.assert_close(last, args["initial_state"])
    args, softplus = _inputs(1, 2, 40, 9, OPTIONS["all"])  # N > 32: handed to the chunked scan
    _compare(args, softplus, torch.float32, fn=selective_scan_fused)


@needs_fused
def test_fused_partial_requires_grad_and_no_grad():
    """Only some inputs need gradients (a frozen layer), or none (inference: no checkpoints are kept)."""
    args, softplus = _inputs(1, 4, 16, 33, OPTIONS["mamba"])
    u = args["u"].clone().requires_grad_()
    out = selective_scan_fused(u, args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"],
                               args["delta_bias"], softplus)
    ref = selective_scan_ref(u, args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"],
                             args["delta_bias"], softplus)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(torch.autograd.grad(out, u, g)[0], torch.autograd.grad(ref, u, g)[0],
                               rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(selective_scan_fused(u, args["delta"], args["A"], args["B"], args["C"],
                                                        args["D"], args["z"], args["delta_bias"], softplus),
                                   ref.detach(), rtol=1e-4, atol=1e-5)


def test_fused_build_failure_is_reported(tmp_path, monkeypatch):
    """A compiler error surfaces as an exception with the compiler's message (load_library turns it into the
    reason string that dispatch reports)."""
    monkeypatch.setenv("MOAI_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_fused, "SOURCE", tmp_path / "broken.cpp")
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    with pytest.raises(RuntimeError, match="failed"):
        cpu_fused._build("g++" if shutil.which("g++") else "c++")
    assert not list(tmp_path.glob("*.so"))


# ---- dispatch --------------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name, calls):
    """Replace module.name by a wrapper that records its name in `calls` and then calls the original."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("backend,expected", [
    ("torch", "selective_scan_chunked"),
    pytest.param("auto", "selective_scan_fused", marks=needs_fused),
    pytest.param("cpu", "selective_scan_fused", marks=needs_fused),
    ("reference", "selective_scan_ref"),
])
def test_dispatch_routes_selective_scan(monkeypatch, backend, expected):
    from moai_lib.kernels import cpu, reference

    calls = []
    _spy(monkeypatch, cpu, "selective_scan_chunked", calls)
    _spy(monkeypatch, cpu_fused, "selective_scan_fused", calls)
    _spy(monkeypatch, reference, "selective_scan_ref", calls)
    args, softplus = _inputs(1, 3, 4, 9, OPTIONS["all"])
    out, last = dispatch.selective_scan(
        args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"], args["delta_bias"],
        softplus, True, args["initial_state"], backend=backend,
    )
    assert calls == [expected]
    ref_out, ref_last = selective_scan_ref(
        args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"], args["delta_bias"],
        softplus, True, args["initial_state"],
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-5)


def test_dispatch_without_fused_library_falls_back_with_a_warning(monkeypatch):
    """'auto' on the CPU takes the chunked torch scan (warning once) when the C++ kernel cannot be built; an
    explicit 'cpu' raises with the reason."""
    monkeypatch.setattr(cpu_fused, "load_library", lambda: "no C++ compiler (test)")
    dispatch._warn_once.cache_clear()
    assert "cpu" not in dispatch.available_backends("cpu")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler \\(test\\).*falling back"):
        assert dispatch.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(dispatch.BackendUnavailableError, match="backend 'cpu' is unavailable: no C"):
        dispatch.resolve_backend("cpu", "cpu")
    dispatch._warn_once.cache_clear()


def test_dispatch_rejects_unknown_backend():
    args, _ = _inputs(1, 2, 3, 4, OPTIONS["plain"])
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"], backend="cuda_fast")


def test_dispatch_mamba_ssm_on_cpu_is_unavailable():
    args, _ = _inputs(1, 2, 3, 4, OPTIONS["plain"])
    with pytest.raises(dispatch.BackendUnavailableError, match="mamba_ssm"):
        dispatch.selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"], backend="mamba_ssm")


# ---- decode-step references -----------------------------------------------------------------------------


@pytest.mark.parametrize("options", ["plain", "all", "gate_softplus"])
def test_state_update_steps_reproduce_the_scan(options):
    args, softplus = _inputs(2, 5, 4, 23, OPTIONS[options])
    ref_out, ref_last = selective_scan_ref(
        args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"], args["delta_bias"],
        softplus, True, args["initial_state"],
    )
    state = args["initial_state"].clone() if args["initial_state"] is not None else torch.zeros(2, 5, 4)
    steps = []
    for t in range(args["u"].shape[-1]):
        steps.append(selective_state_update_ref(
            state, args["u"][:, :, t], args["delta"][:, :, t], args["A"], args["B"][:, :, t], args["C"][:, :, t],
            D=args["D"], z=args["z"][:, :, t] if args["z"] is not None else None, dt_bias=args["delta_bias"],
            dt_softplus=softplus,
        ))
    torch.testing.assert_close(torch.stack(steps, dim=-1), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, ref_last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("length", [1, 3, 11])
def test_conv_update_steps_reproduce_the_conv(width, with_initial, length):
    g = torch.Generator().manual_seed(width * 100 + length)
    batch, dim = 2, 6
    x = torch.randn(batch, dim, length, generator=g)
    weight = torch.randn(dim, width, generator=g)
    bias = torch.randn(dim, generator=g)
    initial = torch.randn(batch, dim, width - 1, generator=g) if with_initial else None
    ref_out, ref_final = causal_conv1d_ref(x, weight, bias, initial_states=initial, return_final_states=True,
                                           activation="silu")
    conv_state = initial.clone() if with_initial else torch.zeros(batch, dim, width - 1)
    steps = [causal_conv1d_update_ref(x[:, :, t], conv_state, weight, bias, activation="silu")
             for t in range(length)]
    torch.testing.assert_close(torch.stack(steps, dim=-1), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv_state, ref_final)
    assert ref_final.shape == (batch, dim, width - 1)
