"""The segmented Triton scan (parallel over L) and its sparse checkpoints against the reference: outputs, final
state and every gradient, under Triton's interpreter on tiny shapes.

`test_triton_kernels.py` covers the unsegmented scan with a checkpoint per backward chunk; here `n_segments` and
`save_every` force the other paths: several segments with a last partial one, L shorter than one segment, B=1
and B=2, ragged D and N, fp32/bf16/fp16, no optional input, and the mixer's strided (channel-last) views. As
there, the comparisons run in a fresh process with TRITON_INTERPRET=1 (this file run as a script prints JSON).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_triton_kernels import (  # noqa: E402
    ROOT,
    TOL,
    _import_kernels_only,
    _interpreter_problem,
    _vectorize_interpreter_scan,
    make_scan_inputs,
    run_scan,
    scaled_error,
)

CHUNKED_TOL = {**TOL, "float16": 2 ** -8}

# (B, D, N, L, fwd (block_d, block_l), bwd (block_d, block_l, num_warps, d_regs), dtype, options, n_segments,
# save_every) -> the segments that result are in the comment.
CASES = {
    # B=1, segments of 16, 16 and a last partial 5; the backward recomputes 2 chunks per checkpoint.
    "B1_seg3_partial": (1, 8, 4, 37, (8, 4), (8, 4, 1, 2), "float32", {}, 3, 8),
    # L=5, shorter than one segment (and than one checkpoint interval).
    "B1_L_lt_segment": (1, 8, 4, 5, (8, 4), (8, 2, 1, 1), "float32", {}, 4, 8),
    # B=2, ragged D and N, no initial state: segments of 4 (6 of them, the last 1 step), chunks of 2 backward.
    "B2_ragged_seg6": (2, 5, 3, 21, (8, 4), (8, 2, 1, 2), "float32", dict(h0=False), 6, 4),
    # No D, z, bias or softplus; forward chunks of 8 > checkpoint interval 4 (saves inside a chunk).
    "plain_seg2": (1, 4, 4, 19, (4, 8), (4, 4, 1, 1), "float32",
                   dict(z=False, D=False, bias=False, softplus=False), 2, 4),
    "bf16_seg3": (1, 8, 16, 24, (8, 4), (8, 4, 1, 2), "bfloat16", {}, 3, 8),
    "fp16_seg2": (1, 8, 4, 16, (8, 4), (8, 4, 1, 2), "float16", {}, 2, 8),
}


def _case_errors(case: str) -> dict:
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import ScanConfig, selective_scan_triton

    batch, dim, dstate, length, fwd, bwd, dtype, options, n_seg, save_every = CASES[case]
    inputs, grads, softplus = make_scan_inputs(batch, dim, dstate, length, getattr(torch, dtype), options)
    ref = run_scan(selective_scan_ref, inputs, grads, softplus)
    ours = run_scan(selective_scan_triton, inputs, grads, softplus, fwd_config=ScanConfig(*fwd),
                    bwd_config=ScanConfig(*bwd), n_segments=n_seg, save_every=save_every)
    return {k: scaled_error(ours[k], ref[k]) for k in ref}


def _strided_errors() -> dict:
    """The mixer's layout: u, delta, z, B, C are transposed views of (B, L, *) activations (channel stride 1),
    x and z two halves of one tensor; y comes back laid out like delta. Segmented, B=1."""
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import ScanConfig, selective_scan_triton

    g = torch.Generator().manual_seed(3)
    batch, dim, dstate, length = 1, 8, 4, 29
    xz = torch.randn(batch, length, 2 * dim, generator=g).requires_grad_()
    dt = (0.5 * torch.randn(batch, length, dim, generator=g)).requires_grad_()
    bc = torch.randn(batch, length, 3 + 2 * dstate, generator=g).requires_grad_()  # [dt_rank=3; B; C]
    A = -(0.2 + 2 * torch.rand(dim, dstate, generator=g))
    D, bias = torch.randn(dim, generator=g), 0.5 * torch.randn(dim, generator=g)
    h0 = torch.randn(batch, dim, dstate, generator=g)
    gy, glast = torch.randn(batch, dim, length, generator=g), torch.randn(batch, dim, dstate, generator=g)
    results = {}
    for name, fn, kw in (("ref", selective_scan_ref, {}),
                         ("ours", selective_scan_triton, dict(fwd_config=ScanConfig(8, 4), n_segments=3,
                                                             bwd_config=ScanConfig(8, 4, 1, 2), save_every=8))):
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (B, D, L), strides (L*2D, 1, 2D)
        B = bc[..., 3:3 + dstate].transpose(1, 2)  # (B, N, L), strides (L*(3+2N), 1, 3+2N)
        C = bc[..., 3 + dstate:].transpose(1, 2)
        y, last = fn(x, dt.transpose(1, 2), A, B, C, D, z, bias, True, True, h0, **kw)
        loss = (y.float() * gy).sum() + (last * glast).sum()
        results[name] = {"y": y, "last": last, **dict(zip(("dxz", "ddt", "dbc"),
                                                          torch.autograd.grad(loss, [xz, dt, bc]), strict=True))}
    ours = results["ours"]
    errors = {k: scaled_error(ours[k], results["ref"][k]) for k in ours}
    errors["y_channel_last"] = float(ours["y"].stride(1) == 1)
    return errors


def _mixer_errors() -> dict:
    """The model's mixer (full-sequence path) on backend 'triton' vs 'reference': output, input and parameter
    gradients, fp32, B=1, with segments and sparse checkpoints forced through the environment."""
    from moai_lib.config import MoaiMambaConfig
    from moai_lib.model.mamba import MambaMixer

    os.environ.update(MOAI_SCAN_SEGMENTS="3", MOAI_SCAN_SAVE_EVERY="16")  # N=4: backward chunks of 16
    torch.manual_seed(0)
    config = MoaiMambaConfig(vocab_size=64, hidden_size=8, state_size=4, num_hidden_layers=1, intermediate_size=0)
    mixer = MambaMixer(config, 0)
    with torch.no_grad():
        mixer.A_log.copy_(torch.log(torch.arange(1, 5.0)).repeat(mixer.d_inner, 1))
        mixer.D.normal_()
        mixer.dt_proj.bias.normal_(-3.0, 1.0)  # Mamba-like step sizes
    x = torch.randn(1, 40, 8)  # 40 steps: segments of 16, 16 and 8
    dy = torch.randn(1, 40, 8)
    results = {}
    for backend in ("reference", "triton"):
        config.kernel_backend = backend
        xi = x.clone().requires_grad_()
        y = mixer(xi)
        params = dict(mixer.named_parameters())
        grads = torch.autograd.grad(y, [xi, *params.values()], dy)
        results[backend] = {"y": y, "dx": grads[0], **{f"d{k}": g for k, g in zip(params, grads[1:], strict=True)}}
    return {k: scaled_error(results["triton"][k], results["reference"][k]) for k in results["reference"]}


# ------------------------------------------------------------------------------------------------------------
# The heuristic and the settings' errors, in this process (no kernel runs).


def test_default_segments_fill_the_gpu_only_when_the_grid_is_short():
    pytest.importorskip("triton")
    from moai_lib.kernels.triton_scan import default_configs, default_segments

    fwd_b1, _ = default_configs(1, 4096, 16)
    fwd_b8, _ = default_configs(8, 4096, 16)
    assert default_segments(8, 4096, 32768, fwd_b8, 132) == 1  # 1024 programs: the unsegmented scan
    n = default_segments(1, 4096, 32768, fwd_b1, 132)  # 512 programs
    assert n > 1 and n * 4096 // fwd_b1.block_d >= 8 * 132
    assert default_segments(1, 4096, 300, fwd_b1, 132) == 1  # segments of >= 256 steps
    assert default_segments(1, 4096, 1024, fwd_b1, 132) == 1024 // 256  # capped by that length


def test_bad_segment_settings_name_the_fix(monkeypatch):
    pytest.importorskip("triton")
    from moai_lib.errors import MoaiError
    from moai_lib.kernels.triton_scan import ScanConfig, _plan, selective_scan_triton

    fwd, bwd = ScanConfig(8, 4), ScanConfig(8, 4)
    assert _plan(37, 3, 8, fwd, bwd) == (3, 16, 8)
    assert _plan(5, 4, 8, fwd, bwd) == (1, 8, 8)
    with pytest.raises(MoaiError, match="save_every must be a power of two >= the backward's block_l"):
        _plan(37, 3, 2, fwd, bwd)
    with pytest.raises(MoaiError, match="n_segments must be >= 1"):
        _plan(37, 0, 8, fwd, bwd)
    monkeypatch.setenv("MOAI_SCAN_SEGMENTS", "many")
    x = torch.zeros(1, 4, 8)
    with pytest.raises(MoaiError, match="MOAI_SCAN_SEGMENTS='many' is not an integer"):
        selective_scan_triton(x, x, torch.zeros(4, 2), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))


# ------------------------------------------------------------------------------------------------------------
# Interpreted comparisons.


def _interpreted(group: str) -> dict:
    pytest.importorskip("triton")
    problem = _interpreter_problem()
    if problem:
        pytest.skip(problem)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, group], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted_results():
    return _interpreted("scan")


@pytest.mark.parametrize("case", list(CASES))
def test_segmented_scan_matches_reference(interpreted_results, case):
    errors = interpreted_results[case]
    tol = CHUNKED_TOL[CASES[case][6]]
    expected = {"y", "last", "du", "ddelta", "dA", "dB", "dC"}
    options = CASES[case][7]
    expected |= {f"d{k}" for k, on in (("D", "D"), ("z", "z"), ("delta_bias", "bias"), ("initial_state", "h0"))
                 if options.get(on, True)}
    assert set(errors) == expected
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{case}: {bad} (tolerance {tol})"


def test_strided_mixer_layout_matches_reference(interpreted_results):
    errors = dict(interpreted_results["strided"])
    assert errors.pop("y_channel_last") == 1.0
    assert set(errors) == {"y", "last", "dxz", "ddt", "dbc"}
    assert max(errors.values()) <= TOL["float32"], errors


def test_mixer_full_sequence_on_triton_matches_reference():
    errors = _interpreted("mixer")
    assert {"y", "dx", "dA_log", "dD", "din_proj.weight", "dx_proj.weight", "ddt_proj.bias"} <= set(errors)
    assert max(errors.values()) <= 1e-4, errors  # fp32; the reference sums the scan in another order


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    if sys.argv[1] == "scan":
        _import_kernels_only()
        _vectorize_interpreter_scan()
        out = {case: _case_errors(case) for case in CASES}
        out["strided"] = _strided_errors()
    else:
        _vectorize_interpreter_scan()
        out = _mixer_errors()
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------------------
# GPU: the compiled kernels at a realistic width, segments forced. Skipped without CUDA.


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the compiled Triton kernels (CPU runs use the interpreter)")
@pytest.mark.parametrize("n_segments,save_every", [(1, 64), (3, 64), (8, 128), (1, 4)])
def test_gpu_segmented_scan_matches_reference(n_segments, save_every):
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import selective_scan_triton

    inputs, grads, softplus = make_scan_inputs(1, 512, 16, 1000, torch.float32, {}, device="cuda")
    ref = run_scan(selective_scan_ref, inputs, grads, softplus)
    ours = run_scan(selective_scan_triton, inputs, grads, softplus, n_segments=n_segments, save_every=save_every)
    errors = {k: scaled_error(ours[k], ref[k]) for k in ref}
    assert max(errors.values()) <= 1e-4, errors
