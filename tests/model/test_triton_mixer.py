"""The whole model with backend 'triton' (channels-last mixer: Triton conv and strided scan) against backend
'reference': logits, loss and every parameter gradient in training, with left padding (attention_mask), and a
cached prefill continued by a second multi-token chunk (conv and scan initial states); plus a check that the
Triton mixer's forward and backward copy no activation (no `.contiguous()`, transpose copy or dtype cast).

The Triton backend runs under Triton's interpreter in a fresh process (this file run as a script, printing
JSON), as in `tests/kernels/test_triton_kernels.py`. The GPU version of the model comparison is
`tests/kernels/test_triton_kernels.py::test_gpu_model_triton_backend_matches_torch_backend`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # scaled max error, fp32: the two paths differ only in summation order
# aten ops that would copy an activation (a `.contiguous()`, a transposed reshape, a dtype cast).
COPY_OPS = {"clone", "copy_", "_to_copy", "contiguous", "constant_pad_nd", "_unsafe_view_copy"}


def scaled_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def _tiny(backend: str, layers: int = 2):
    from moai_lib.config import get_mamba_config
    from moai_lib.model.mamba import MoaiMambaForCausalLM

    torch.manual_seed(0)
    model = MoaiMambaForCausalLM(get_mamba_config("tiny", kernel_backend=backend, num_hidden_layers=layers))
    with torch.no_grad():  # move the SSM parameters off their init values, so that their handling matters
        g = torch.Generator().manual_seed(1)
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(0.3 * torch.randn(layer.mixer.A_log.shape, generator=g))
            layer.mixer.D.add_(0.5 * torch.randn(layer.mixer.D.shape, generator=g))
            layer.mixer.conv1d.bias.add_(0.3 * torch.randn(layer.mixer.conv1d.bias.shape, generator=g))
    return model


def _train_outputs(backend: str, ids: torch.Tensor, mask: torch.Tensor | None) -> dict:
    model = _tiny(backend).train()
    out = model(input_ids=ids, labels=ids, attention_mask=mask, return_logits=True)
    out.loss.backward()
    logits = out.logits.detach()
    if mask is not None:
        logits = logits[mask.bool()]  # padded positions' logits are arbitrary
    return {"loss": out.loss.detach(), "logits": logits,
            **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


def _prefill_outputs(backend: str, ids: torch.Tensor) -> dict:
    model = _tiny(backend).eval()
    with torch.no_grad():
        first = model(input_ids=ids[:, :12], use_cache=True)
        second = model(input_ids=ids[:, 12:], cache=first.cache, use_cache=True)  # continues from the cache
        whole = model(input_ids=ids, use_cache=False)
    cache = second.cache
    return {"first": first.logits, "second": second.logits, "whole_tail": whole.logits[:, 12:],
            "conv_states": torch.stack(list(cache.conv_states)), "ssm_states": torch.stack(list(cache.ssm_states))}


def _mixer_ops() -> dict:
    """Aten ops outside the Triton launches of one Triton mixer forward + backward (fp32 and bf16): a histogram,
    and the copies (COPY_OPS) of E-wide activations (at least B * L * E = 2 * 13 * 128 elements). Allowed: casts
    of parameters (a bf16 dt bias to fp32: O(E)) and of dB, dC (fp32 atomics cast to bf16: O(B * L * N))."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from triton.runtime import interpreter

    ops, copies = collections.Counter(), []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            ops[name] += 1
            if name in COPY_OPS and isinstance(out, torch.Tensor) and out.numel() >= 2 * 13 * 128:
                copies.append(f"{name}{tuple(out.shape)}")
            return out

    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):  # a Triton launch: one "triton" op; its interpreter's own torch ops unrecorded
        ops["triton"] += 1
        with _disable_current_modes():
            return original(self, *args, **kwargs)

    result = {}
    interpreter.InterpretedFunction.run = run
    try:
        for dtype in (torch.float32, torch.bfloat16):
            mixer = _tiny("triton", layers=1).to(dtype).backbone.layers[0].mixer
            h = torch.randn(2, 13, 64, dtype=dtype, requires_grad=True)
            gy = torch.randn(2, 13, 64, dtype=dtype)
            ops.clear()
            copies.clear()
            with Recorder():
                mixer(h).backward(gy)
            result[str(dtype)[6:]] = {"ops": dict(ops), "activation_copies": list(copies)}
    finally:
        interpreter.InterpretedFunction.run = original
    return result


def _subprocess_main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    sys.path.insert(0, str(ROOT / "tests" / "kernels"))
    from test_triton_kernels import _vectorize_interpreter_scan

    _vectorize_interpreter_scan()
    # Wide scan programs: the interpreter's cost is per program and op, not per element (launch shapes only trade
    # speed; the kernel tests cover narrow ones). Two programs per row of E = 128 channels.
    from moai_lib.kernels import triton_scan

    wide = (triton_scan.ScanConfig(64, 4), triton_scan.ScanConfig(64, 4, 1, 2))
    triton_scan.default_configs = lambda *shape, **layout: wide
    ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    result = {}
    for name, m in (("train", None), ("train_left_padded", mask)):
        ref, ours = _train_outputs("reference", ids, m), _train_outputs("triton", ids, m)
        result[name] = {k: scaled_error(ours[k], v) for k, v in ref.items()}
    ref, ours = _prefill_outputs("reference", ids), _prefill_outputs("triton", ids)
    result["prefill"] = {k: scaled_error(ours[k], v) for k, v in ref.items()}
    result["prefill_vs_whole"] = scaled_error(ours["second"], ours["whole_tail"])
    result["mixer_ops"] = _mixer_ops()
    result["n_params"] = sum(1 for _ in _tiny("reference").parameters())
    print(json.dumps(result))


@pytest.fixture(scope="module")
def interpreted(run_interpreted) -> dict:
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", ["train", "train_left_padded"])
def test_triton_model_training_matches_reference(interpreted, case):
    errors = interpreted[case]
    assert len(errors) == 2 + interpreted["n_params"], sorted(errors)  # loss, logits and every parameter's gradient
    assert {"backbone.layers.0.mixer.conv1d.weight", "backbone.layers.1.mixer.conv1d.bias",
            "backbone.layers.0.mixer.A_log", "backbone.layers.1.mixer.x_proj.weight"} <= set(errors)
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, bad


def test_triton_prefill_continued_from_cache_matches_reference(interpreted):
    errors = interpreted["prefill"]
    assert set(errors) == {"first", "second", "whole_tail", "conv_states", "ssm_states"}
    assert max(errors.values()) <= TOL, errors
    assert interpreted["prefill_vs_whole"] <= TOL  # two chunks through the cache == one pass


def test_triton_mixer_copies_no_activation(interpreted):
    for dtype, res in interpreted["mixer_ops"].items():
        ops = res["ops"]
        assert ops.get("triton") == 4, (dtype, ops)  # conv and scan, forward and backward
        assert res["activation_copies"] == [], (dtype, res)
        assert ops.get("cat") == 2, (dtype, ops)  # the gradients of in_proj's [x; z] and x_proj's [dt; B; C]


# ------------------------------------------------------------------------------------------------------------
# GPU: the compiled kernels in the model at the 370m width, under bf16 autocast (`pytest -k cuda`).

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled Triton kernels (the CPU runs interpret)")


def _cuda_grads(backend: str, autocast: bool, ids: torch.Tensor) -> dict:
    from moai_lib.config import get_mamba_config
    from moai_lib.model.mamba import MoaiMambaForCausalLM

    torch.manual_seed(0)
    config = get_mamba_config("370m", num_hidden_layers=2, vocab_size=4096, kernel_backend=backend)
    model = MoaiMambaForCausalLM(config).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


@requires_cuda
def test_cuda_model_channels_last_autocast_matches_fp32():
    """Two layers at the 370m width (d = 1024, E = 2048), B = 2, L = 1000, fp32 master weights + bf16 autocast (the
    training recipe): the loss and every gradient of backend 'triton' against an fp32 run without autocast must be
    within twice the error of backend 'torch' under the same autocast, plus 2^-7 (bf16 activations either way)."""
    ids = torch.randint(0, 4096, (2, 1000), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref = _cuda_grads("torch", False, ids)
    base, ours = _cuda_grads("torch", True, ids), _cuda_grads("triton", True, ids)
    assert set(ours) == set(ref) and len(ref) > 20
    for name, r in ref.items():
        ours_err, base_err = scaled_error(ours[name], r), scaled_error(base[name], r)
        assert ours_err <= 2 * base_err + 2 ** -7, (name, ours_err, base_err)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _subprocess_main()
