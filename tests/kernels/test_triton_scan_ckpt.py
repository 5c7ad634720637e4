"""Sparse checkpoints of the Triton scan (`ScanConfig.checkpoint_every`) against the sequential reference: outputs,
final states and every gradient with groups of 2 and 4 backward chunks, L not a multiple of the group (a shorter
last group and a partial last chunk), with and without an initial state, gate, D and bias, on channels-last views,
through the unsplit and the segmented path; the saved checkpoints really shrink by checkpoint_every / block_l; the
dispatch keyword reaches the kernel; and the validation of both settings. Also the in-place gradients
(`grad_in_place`, the mixer's setting): same gradients, the memory really reused, a second backward refused.

The kernels run under Triton's interpreter in a fresh process (as test_triton_scan_seg.py); the GPU tests at the end
compare checkpoint_every=256 with the default at a realistic shape, and a model with `scan_checkpoint_every` with
one without (same values and gradients, fewer bytes saved for the backward).
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
from test_triton_scan_seg import _channels_last  # noqa: E402

# (B, D, N, L, checkpoint_every, segment_len, options, channels_last); block_l 4 in both directions, so
# checkpoint_every 8 / 16 is a group of 2 / 4 backward chunks.
CKPT_CASES = {
    # 37 = 2 groups of 16 + a group of 1 partial chunk; every option on.
    "tail_L37_every16": (2, 8, 4, 37, 16, 0, {}, False),
    # 29 = 3 groups of 8 + a group of 2 chunks, the last partial; channels-last views.
    "channels_last_L29_every8": (2, 8, 4, 29, 8, 0, {}, True),
    # No initial state, gate, D, bias or softplus; L=23: 2 groups of 8 steps and a 7-step group (a partial chunk).
    "plain_L23_every8": (1, 4, 3, 23, 8, 0, dict(h0=False, z=False, D=False, bias=False, softplus=False), False),
    # Segmented: 2 segments of 24 steps + a 13-step tail segment, each with its own groups (SEG_CARRY, ADJOINT_ONLY).
    "segmented_L61_seg24_every16": (1, 8, 4, 61, 16, 24, {}, True),
    "segmented_L40_seg16_every8_no_h0": (1, 8, 4, 40, 8, 16, dict(h0=False), False),
}


def _states(y: torch.Tensor) -> list[torch.Size]:
    """Shapes of the checkpoint tensors the autograd Function saved: its trailing saved tensors (the unsplit Function
    saves one (B, D, n, N) tensor last, the segmented one a (B, S, D, n, N) tensor per group of segments)."""
    saved = y.grad_fn.saved_tensors
    if type(y.grad_fn).__name__.startswith("_SegmentedScanFn"):
        return [t.shape for t in saved[10:]]
    return [saved[-1].shape]


def _case(case: str) -> dict:
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import ScanConfig, selective_scan_triton

    batch, dim, dstate, length, every, seg_len, options, cl = CKPT_CASES[case]
    inputs, grads, softplus = make_scan_inputs(batch, dim, dstate, length, torch.float32, options)
    ref = run_scan(selective_scan_ref, inputs, grads, softplus)
    if cl:
        inputs = _channels_last(inputs)
    ours = run_scan(selective_scan_triton, inputs, grads, softplus, fwd_config=ScanConfig(4, 4),
                    bwd_config=ScanConfig(4, 4, d_regs=2, checkpoint_every=every), segment_len=seg_len)
    return {k: scaled_error(ours[k], ref[k]) for k in ref}


def _saved_sizes() -> dict:
    """Checkpoint shapes saved with checkpoint_every 0 / 16 (block_l 4), unsplit (L=64) and segmented (L=64 as
    segments of 32), the override keyword of `selective_scan_triton`, and the dispatch keyword the mixer uses."""
    from moai_lib.kernels import dispatch
    from moai_lib.kernels.triton_scan import ScanConfig, selective_scan_triton

    inputs, _, softplus = make_scan_inputs(1, 4, 4, 64, torch.float32, {})
    out = {}
    for seg_len in (0, 32):
        for every in (0, 16):
            y = selective_scan_triton(**inputs, delta_softplus=softplus, fwd_config=ScanConfig(4, 4),
                                      bwd_config=ScanConfig(4, 4, checkpoint_every=every), segment_len=seg_len)
            out[f"seg{seg_len}_every{every}"] = [list(s) for s in _states(y)]
    # The keyword overrides the backward config's interval (here the default configs': block_l 16 at N=4).
    y = selective_scan_triton(**inputs, delta_softplus=softplus, segment_len=0, checkpoint_every=32)
    out["keyword_every32"] = [list(s) for s in _states(y)]
    y = dispatch.selective_scan(**inputs, delta_softplus=softplus, backend="triton", checkpoint_every=64)
    out["dispatch_every64"] = [list(s) for s in _states(y)]
    return out


# grad_in_place cases: (segment_len, checkpoint_every, channels_last) at B=1, D=8, N=4, L=40, block_l 4.
IN_PLACE_CASES = {"unsplit_channels_last": (0, 0, True), "segmented_every8_channels_last": (16, 8, True),
                  "unsplit_every16": (0, 16, False)}


def run_in_place(inputs: dict, grads: dict, softplus: bool, **kwargs) -> dict:
    """`run_scan` with grad_in_place=True, as the mixer calls it: delta is a tensor the scan owns (a product of
    the leaf, as dt_proj's output) and y's gradient a fresh one. Also returns whether the backward really wrote
    d(delta) over delta and du over y's gradient, and what a second backward through the graph does."""
    from moai_lib.kernels.triton_scan import selective_scan_triton

    leaf = inputs["delta"]
    delta = leaf * 1.0
    y, last = selective_scan_triton(**{**inputs, "delta": delta}, delta_softplus=softplus, return_last_state=True,
                                    grad_in_place=True, **kwargs)
    seen = {}
    y.register_hook(lambda g: seen.setdefault("dout", g))
    names = [k for k, v in inputs.items() if v is not None]
    loss = (y * grads["y"]).sum() + (last * grads["last"]).sum()
    dx = dict(zip(names, torch.autograd.grad(loss, [inputs[k] for k in names], retain_graph=True), strict=True))
    try:
        torch.autograd.grad(loss, [inputs["u"]])
        second = "ran"
    except RuntimeError as exc:
        second = str(exc)
    return {"grads": {"y": y, "last": last, **{f"d{k}": v for k, v in dx.items()}},
            "delta_holds_ddelta": bool(torch.equal(delta.detach(), dx["delta"])),
            "dout_holds_du": bool(torch.equal(seen["dout"], dx["u"])), "second_backward": second}


def _in_place_case(case: str) -> dict:
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import ScanConfig

    seg_len, every, cl = IN_PLACE_CASES[case]
    inputs, grads, softplus = make_scan_inputs(1, 8, 4, 40, torch.float32, {})
    ref = run_scan(selective_scan_ref, inputs, grads, softplus)
    if cl:
        inputs = _channels_last(inputs)
    r = run_in_place(inputs, grads, softplus, fwd_config=ScanConfig(4, 4),
                     bwd_config=ScanConfig(4, 4, d_regs=2, checkpoint_every=every), segment_len=seg_len)
    ours = r.pop("grads")
    r["errors"] = {k: scaled_error(ours[k], ref[k]) for k in ref}
    return r


def _subprocess_main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    _import_kernels_only()
    _vectorize_interpreter_scan()
    print(json.dumps({"errors": {case: _case(case) for case in CKPT_CASES}, "saved": _saved_sizes(),
                      "in_place": {case: _in_place_case(case) for case in IN_PLACE_CASES}}))


@pytest.fixture(scope="module")
def interpreted(run_interpreted):
    return run_interpreted(__file__)


def test_interpreted_sparse_checkpoints_match_reference(interpreted):
    results = interpreted["errors"]
    assert set(results) == set(CKPT_CASES)
    for case, errors in results.items():
        bad = {k: v for k, v in errors.items() if not v <= TOL["float32"]}
        assert not bad, f"{case}: {bad} (tolerance {TOL['float32']})"
        assert {"y", "last", "du", "ddelta", "dA", "dB", "dC"} <= set(errors)
        if CKPT_CASES[case][6].get("h0", True):
            assert "dinitial_state" in errors


def test_interpreted_checkpoints_shrink(interpreted):
    saved = interpreted["saved"]
    # (B, D, n, N): 16 chunk states of 4 steps, or 4 checkpoints of 16 steps.
    assert saved["seg0_every0"] == [[1, 4, 16, 4]]
    assert saved["seg0_every16"] == [[1, 4, 4, 4]]
    # (B, S, D, n, N) per group of equal segments: 2 segments of 32 steps, 8 or 2 states each.
    assert saved["seg32_every0"] == [[1, 2, 4, 8, 4]]
    assert saved["seg32_every16"] == [[1, 2, 4, 2, 4]]
    assert saved["keyword_every32"] == [[1, 4, 2, 4]]
    assert saved["dispatch_every64"] == [[1, 4, 1, 4]]


def test_interpreted_gradients_in_place(interpreted):
    """grad_in_place (the mixer's setting): the same values and gradients as the reference, d(delta) really lands
    in delta's memory and du in the output gradient's, and a second backward is refused by torch's version check."""
    results = interpreted["in_place"]
    assert set(results) == set(IN_PLACE_CASES)
    for case, r in results.items():
        bad = {k: v for k, v in r["errors"].items() if not v <= TOL["float32"]}
        assert not bad, f"{case}: {bad}"
        assert r["delta_holds_ddelta"] and r["dout_holds_du"], (case, r)
        assert "modified by an inplace operation" in r["second_backward"], (case, r["second_backward"])


def test_checkpoint_every_validation():
    pytest.importorskip("triton")
    from moai_lib.config import ConfigError, MoaiMambaConfig
    from moai_lib.errors import MoaiError
    from moai_lib.kernels.triton_scan import ScanConfig, ScanConfigError

    assert ScanConfig(8, 4).ckpt_group == 1 and ScanConfig(8, 4).n_checkpoints(9) == 3
    cfg = ScanConfig(8, 4, checkpoint_every=256)
    assert cfg.ckpt_group == 64 and cfg.n_checkpoints(257) == 2
    for bad in (2, 12, -4, True, 64.0):  # below block_l, not a power of two, negative, not an int
        with pytest.raises(ScanConfigError, match="checkpoint_every"):
            ScanConfig(8, 4, checkpoint_every=bad)
    assert issubclass(ScanConfigError, MoaiError)

    assert MoaiMambaConfig().scan_checkpoint_every == 0
    assert MoaiMambaConfig(scan_checkpoint_every=256).scan_checkpoint_every == 256
    for bad in (32, 100, -64, True, "256"):
        with pytest.raises(ConfigError, match=r"scan_checkpoint_every .*power of two ≥ 64"):
            MoaiMambaConfig(scan_checkpoint_every=bad)
    # A config saved before the field existed loads with the default.
    old = MoaiMambaConfig(hidden_size=64).to_dict()
    old.pop("scan_checkpoint_every")
    assert MoaiMambaConfig.from_dict(old).scan_checkpoint_every == 0


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the compiled Triton kernels (CPU runs use the interpreter)")


@requires_cuda
@pytest.mark.parametrize("segment_len", [0, None])
def test_gpu_sparse_checkpoints_match_default(segment_len):
    """B=1, D=512, N=16, L=4096, fp32, default launch shapes: checkpoint_every=256 against the default (unsplit and
    split over L), on values, final state and every gradient; both against the reference."""
    from moai_lib.kernels.reference import selective_scan_ref
    from moai_lib.kernels.triton_scan import selective_scan_triton

    inputs, grads, softplus = make_scan_inputs(1, 512, 16, 4096, torch.float32, {}, device="cuda")
    ref = run_scan(selective_scan_ref, inputs, grads, softplus)
    dense = run_scan(selective_scan_triton, inputs, grads, softplus, segment_len=segment_len)
    sparse = run_scan(selective_scan_triton, inputs, grads, softplus, segment_len=segment_len,
                      checkpoint_every=256)
    vs_dense = {k: scaled_error(sparse[k], dense[k]) for k in ref}
    vs_ref = {k: scaled_error(sparse[k], ref[k]) for k in ref}
    assert max(vs_dense.values()) <= 1e-5, vs_dense
    assert max(vs_ref.values()) <= 1e-4, vs_ref


@requires_cuda
@pytest.mark.parametrize("segment_len,every", [(0, 0), (None, 256)])
def test_gpu_gradients_in_place(segment_len, every):
    """grad_in_place on the GPU, where programs and warps really run concurrently: B=1, D=4096, N=16, L=4096 bf16 on
    channels-last views (the mixer's shapes and layout; split over L and sparse checkpoints in the second case):
    bit for bit the gradients of the out-of-place backward (the same kernels, only the output addresses differ)."""
    from moai_lib.kernels.triton_scan import selective_scan_triton

    inputs, grads, softplus = make_scan_inputs(1, 4096, 16, 4096, torch.bfloat16, {}, device="cuda")
    inputs = _channels_last(inputs)
    kwargs = dict(segment_len=segment_len, checkpoint_every=every)
    out_of_place = run_scan(selective_scan_triton, inputs, grads, softplus, **kwargs)
    r = run_in_place(inputs, grads, softplus, **kwargs)
    assert r["delta_holds_ddelta"] and r["dout_holds_du"]
    for k, v in out_of_place.items():
        if k in ("y", "last", "du", "ddelta", "dz", "dinitial_state"):
            assert torch.equal(r["grads"][k], v), k
        else:  # dA, dB, dC, dD, d(delta_bias): fp32 atomics, not bitwise deterministic; dB, dC are then rounded
            # to B's and C's bf16, where a different summation order can flip an element by one ulp (2^-8)
            assert scaled_error(r["grads"][k], v) <= 1e-2, (k, scaled_error(r["grads"][k], v))


@requires_cuda
def test_gpu_model_scan_checkpoint_every():
    """The model-level switch: a 2-layer model with scan_checkpoint_every=64 against the same weights without, on
    logits and every parameter gradient, and the bytes autograd saves for the backward shrink by the checkpoints."""
    from moai_lib.config import MoaiMambaConfig
    from moai_lib.model.mamba import MoaiMambaForCausalLM

    batch, length = 1, 1024
    models, saved, outs = {}, {}, {}
    for every in (0, 64):
        config = MoaiMambaConfig(vocab_size=256, hidden_size=64, intermediate_size=0, num_hidden_layers=2,
                                 kernel_backend="triton", scan_checkpoint_every=every)
        torch.manual_seed(0)
        models[every] = MoaiMambaForCausalLM(config).cuda()
    ids = torch.randint(0, 256, (batch, length), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for every, model in models.items():
        nbytes = []

        def pack(t, nbytes=nbytes):
            nbytes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(ids).logits
        logits.float().square().mean().backward()
        saved[every] = sum(nbytes)
        outs[every] = [logits.detach()] + [p.grad for p in model.parameters()]
    for a, b in zip(outs[64], outs[0], strict=True):
        assert scaled_error(a, b) <= 1e-4
    config = models[0].config
    per_layer = batch * config.d_inner * config.state_size * 4 * (length // 4 - length // 64)  # fp32 states
    assert saved[0] - saved[64] >= 0.99 * config.num_hidden_layers * per_layer, (saved, per_layer)


if __name__ == "__main__":
    _subprocess_main()
