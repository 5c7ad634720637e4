"""The segmented (split over L) Triton scan (`triton_scan_seg`) against the sequential reference: outputs, final
states and every gradient, with equal segments and a shorter tail, with and without an initial state, gate, D and
bias, on channels-last views; and the rule that picks the segment length.

The kernels run under Triton's interpreter in a fresh process (see test_triton_kernels.py, whose helpers this
reuses); the GPU test at the end compares split and unsplit scans at realistic shapes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_triton_kernels import (  # noqa: E402
    TOL,
    _import_kernels_only,
    _vectorize_interpreter_scan,
    make_scan_inputs,
    run_scan,
    scaled_error,
)

# (B, D, N, L, segment_len, dtype, options, channels_last)
SEG_CASES = {
    "tail_L37_seg8": (2, 8, 4, 37, 8, "float32", {}, False),
    "even_L24_seg8_plain": (1, 4, 3, 24, 8, "float32", dict(h0=False, z=False, D=False, softplus=False), False),
    "channels_last_L29_seg8": (2, 8, 4, 29, 8, "float32", {}, True),
    "bf16_L40_seg16": (1, 8, 16, 40, 16, "bfloat16", {}, True),
}


def _channels_last(inputs: dict) -> dict:
    """The same values with (B, X, L) tensors stored as (B, L, X) and viewed transposed, as the model passes them."""
    out = {}
    for k, v in inputs.items():
        if v is not None and v.dim() == 3 and k != "initial_state":
            v = v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        out[k] = v
    return out


def _seg_errors(case: str) -> dict:
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import ScanConfig, selective_scan_triton

    batch, dim, dstate, length, seg_len, dtype, options, cl = SEG_CASES[case]
    inputs, grads, softplus = make_scan_inputs(batch, dim, dstate, length, getattr(torch, dtype), options)
    ref = run_scan(selective_scan_ref, inputs, grads, softplus)
    if cl:
        inputs = _channels_last(inputs)
    ours = run_scan(selective_scan_triton, inputs, grads, softplus, fwd_config=ScanConfig(4, 4),
                    bwd_config=ScanConfig(4, 4, d_regs=2), segment_len=seg_len)
    return {k: scaled_error(ours[k], ref[k]) for k in ref}


def _subprocess_main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    _import_kernels_only()
    _vectorize_interpreter_scan()
    print(json.dumps({case: _seg_errors(case) for case in SEG_CASES}))


def test_interpreted_segmented_scan_matches_reference(run_interpreted):
    results = run_interpreted(__file__)
    assert set(results) == set(SEG_CASES)
    for case, errors in results.items():
        tol = TOL[SEG_CASES[case][5]]
        bad = {k: v for k, v in errors.items() if not v <= tol}
        assert not bad, f"{case}: {bad} (tolerance {tol})"
        assert {"y", "last", "du", "ddelta", "dA", "dB", "dC"} <= set(errors)


def test_segment_length_rule():
    pytest.importorskip("triton")
    from moai_lib.kernels.triton_scan_seg import segment_len_for

    assert segment_len_for(1, 4096, 32768) == 4096  # 8 segments: 8 x 4096 channels, like a batch of 8
    assert segment_len_for(1, 4096, 5000) == 640  # 8 segments of >= 512 steps, rounded up to 64 steps
    assert segment_len_for(1, 2048, 32768) == 2048  # narrower model: 16 segments
    assert segment_len_for(1, 4096, 4096) == 512  # 8 segments of the shortest length
    assert segment_len_for(1, 4096, 4095) == 0  # short: the extra launches cost more host time than they save
    assert segment_len_for(8, 4096, 32768) == 0  # wide enough already: never split
    assert segment_len_for(8, 2048, 2048) == 0  # the 370m training shape: 1024 programs unsplit
    assert segment_len_for(2, 4096, 4096) == 1024  # 4 segments


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the compiled Triton kernels (CPU runs use the interpreter)")


@requires_cuda
@pytest.mark.parametrize("length", [1000, 4096])
def test_gpu_segmented_matches_unsplit(length):
    """B=1, D=512, N=16, fp32: split (auto and 256-step segments) vs unsplit vs the reference."""
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import selective_scan_triton

    inputs, grads, softplus = make_scan_inputs(1, 512, 16, length, torch.float32, {}, device="cuda")
    ref = run_scan(selective_scan_ref, inputs, grads, softplus)
    for seg_len in (None, 256):
        ours = run_scan(selective_scan_triton, inputs, grads, softplus, segment_len=seg_len)
        errors = {k: scaled_error(ours[k], ref[k]) for k in ref}
        assert max(errors.values()) <= 1e-4, (seg_len, errors)


if __name__ == "__main__":
    _subprocess_main()
