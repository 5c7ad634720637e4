"""The fused LM head + cross-entropy (`kernels/triton_ce.py`) against F.cross_entropy on full fp32 logits: the
loss and the gradients of the hidden states and of the weight, and `chunked_causal_lm_loss(fused=True)` against
its checkpointed torch path.

On the CPU the kernel runs under Triton's interpreter in a fresh process (this file run as a script, printing
errors as JSON), as in `test_triton_kernels.py`. Shapes are tiny and ragged: N = 57 token rows in chunks of 10
(the last one partial; the second one wholly ignored), V = 1000 in blocks of 256 (the online log-sum-exp crosses
blocks, the last one masked), d = 32. The GPU test at the end runs at a realistic width and skips without CUDA.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_triton_kernels import TOL, scaled_error  # noqa: E402

N, D, V, CHUNK, BLOCK = 57, 32, 1000, 10, 256

# name -> (input dtype, autocast to bf16, hidden requires grad, weight requires grad, logit scale)
CASES = {
    "fp32": ("float32", False, True, True, 1.0),
    "fp32_peaky": ("float32", False, True, True, 30.0),  # logits spanning ~±100: the max subtraction matters
    "bf16": ("bfloat16", False, True, True, 1.0),
    "autocast_fp32_weight": ("float32", True, True, True, 1.0),  # the training setup: fp32 master weights
    "frozen_weight": ("float32", False, True, False, 1.0),
    "frozen_hidden": ("float32", False, False, True, 1.0),
}


def make_inputs(dtype: torch.dtype, scale: float, device="cpu", n=N, d=D, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(n, d, generator=g)).to(device, dtype)
    weight = (d ** -0.5 * torch.randn(v, d, generator=g)).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[CHUNK:2 * CHUNK] = -100  # a chunk with nothing counted
    targets[[3, 25, 56]] = -100  # scattered ignored rows, one in the last (partial) chunk
    return hidden, weight, targets.to(device)


def case_errors(fused_fn, ref_fn, case: str, device="cpu", **kwargs) -> dict:
    """Scaled errors of (loss, dh, dW) of the fused loss vs the fp32 reference, both divided by 7 (a stand-in
    for the mean's denominator: the backward scales by the incoming gradient), plus checks of the grads' dtypes."""
    dtype, autocast, h_grad, w_grad, scale = CASES[case]
    hidden, weight, targets = make_inputs(getattr(torch, dtype), scale, device)
    h_ref = hidden.float().clone().requires_grad_(h_grad)
    w_ref = weight.float().clone().requires_grad_(w_grad)
    ref = ref_fn(h_ref, w_ref, targets, -100) / 7
    ref.backward()
    h, w = hidden.clone().requires_grad_(h_grad), weight.clone().requires_grad_(w_grad)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        loss = fused_fn(h, w, targets, -100, **kwargs) / 7
    loss.backward()
    errors = {"loss": scaled_error(loss, ref)}
    if h_grad:
        errors["dh"] = scaled_error(h.grad, h_ref.grad)
        assert h.grad.dtype == hidden.dtype
    else:
        assert h.grad is None
    if w_grad:
        errors["dw"] = scaled_error(w.grad, w_ref.grad)
        assert w.grad.dtype == weight.dtype
    else:
        assert w.grad is None
    return errors


def _import_loss_only() -> None:
    """`moai_lib` and `moai_lib.model` as bare packages: the loss and the kernels need only torch and triton
    (the packages' __init__ import transformers, ~8 s here)."""
    for name in ("moai_lib", "moai_lib.model"):
        package = types.ModuleType(name)
        package.__path__ = [str(ROOT / name.replace(".", "/"))]
        sys.modules[name] = package


def _api_errors(chunked_causal_lm_loss, lm_head_outputs) -> dict:
    """`chunked_causal_lm_loss` fused vs its torch path (fp32): attention mask, ignored labels, chunk sizes that do
    not divide the tokens, int and tensor `num_items_in_batch`; and `lm_head_outputs` with a padded vocabulary."""
    g = torch.Generator().manual_seed(3)
    B, L = 3, 20  # 57 shifted tokens; fused chunks of 2 * 5 = 10 rows in fp32
    hidden = torch.randn(B, L, D, generator=g)
    weight = D ** -0.5 * torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 5:9] = -100
    mask = torch.ones(B, L, dtype=torch.long)
    mask[2, :6] = 0  # left padding
    out = {}
    for name, denom in (("mean", None), ("items_int", 40), ("items_tensor", torch.tensor(40))):
        res = []
        for fused in (False, True):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = chunked_causal_lm_loss(h, w, labels, mask, chunk_size=5, num_items_in_batch=denom, fused=fused)
            loss.backward()
            res.append((loss, h.grad, w.grad))
        out[name] = {k: scaled_error(a, b) for k, a, b in zip(("loss", "dh", "dw"), res[1], res[0], strict=True)}
    # A padded vocabulary: the head has 1008 rows, 1000 are real; the padding rows get no gradient.
    head = torch.nn.Linear(D, V + 8, bias=False)
    res = []
    for fused in (False, True):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        loss, _ = lm_head_outputs(h, head, V, labels, mask, chunk_size=5, fused_loss=fused)
        loss.backward()
        res.append((loss, h.grad, head.weight.grad.clone()))
    out["padded_vocab"] = {k: scaled_error(a, b) for k, a, b in zip(("loss", "dh", "dw"), res[1], res[0],
                                                                   strict=True)}
    out["padded_vocab"]["padding_rows_grad"] = res[1][2][V:].abs().max().item()
    return out


def _subprocess_main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    _import_loss_only()
    from moai_lib.kernels.triton_ce import fused_linear_cross_entropy, linear_cross_entropy_ref
    from moai_lib.model.loss import chunked_causal_lm_loss, lm_head_outputs

    kw = dict(chunk_rows=CHUNK, block=BLOCK)
    result = {"cases": {case: case_errors(fused_linear_cross_entropy, linear_cross_entropy_ref, case, **kw)
                        for case in CASES}}
    # One chunk, one block (the default block covers V).
    result["one_chunk_one_block"] = case_errors(fused_linear_cross_entropy, linear_cross_entropy_ref, "fp32")
    hidden, weight, targets = make_inputs(torch.float32, 1.0)
    with torch.no_grad():  # the loss alone, no gradient buffers
        result["no_grad"] = scaled_error(fused_linear_cross_entropy(hidden, weight, targets, **kw),
                                         linear_cross_entropy_ref(hidden, weight, targets))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, torch.full_like(targets, -100), **kw)
    loss.backward()
    result["all_ignored"] = [loss.item(), h.grad.abs().max().item(), w.grad.abs().max().item()]
    loss = fused_linear_cross_entropy(hidden[:0].requires_grad_(), weight, targets[:0], **kw)
    result["no_rows"] = loss.item()
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets, **kw)
    loss.backward(retain_graph=True)
    try:  # the backward scales the stored gradients in place: a second one must fail, not scale twice
        loss.backward()
        result["second_backward"] = "ran"
    except RuntimeError as exc:
        result["second_backward"] = "raised" if "inplace" in str(exc) else str(exc)
    result["api"] = _api_errors(chunked_causal_lm_loss, lm_head_outputs)
    print(json.dumps(result))


@pytest.fixture(scope="module")
def interpreted(run_interpreted) -> dict:
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_fused_loss_and_gradients_match_full_cross_entropy(interpreted, case):
    errors = interpreted["cases"][case]
    dtype, autocast = CASES[case][:2]
    tol = TOL["bfloat16" if dtype == "bfloat16" or autocast else "float32"]
    assert max(errors.values()) <= tol, (errors, tol)
    assert {"loss"} < set(errors)  # at least one gradient was compared


def test_interpreted_edge_cases(interpreted):
    assert max(interpreted["one_chunk_one_block"].values()) <= TOL["float32"]
    assert interpreted["no_grad"] <= TOL["float32"]
    assert interpreted["all_ignored"] == [0.0, 0.0, 0.0]
    assert interpreted["no_rows"] == 0.0
    assert interpreted["second_backward"] == "raised"


def test_interpreted_chunked_causal_lm_loss_fused_matches_torch_path(interpreted):
    api = interpreted["api"]
    assert set(api) == {"mean", "items_int", "items_tensor", "padded_vocab"}
    for name, errors in api.items():
        assert max(errors.values()) <= TOL["float32"], (name, errors)
    assert api["padded_vocab"]["padding_rows_grad"] == 0.0


def test_fused_switch_resolution(monkeypatch):
    from moai_lib.kernels.dispatch import BackendUnavailableError
    from moai_lib.model.loss import chunked_causal_lm_loss, use_fused_loss

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert use_fused_loss(None, torch.device("cpu")) is False  # the default on the CPU: the torch path
    assert use_fused_loss(False, torch.device("cpu")) is False
    hidden, labels = torch.randn(1, 4, D), torch.randint(0, V, (1, 4))
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        chunked_causal_lm_loss(hidden, torch.randn(V, D), labels, fused=True)


# ------------------------------------------------------------------------------------------------------------
# On the GPU: the compiled kernel at a realistic width, under autocast with fp32 master weights.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine)")


@cuda
def test_gpu_fused_loss_matches_torch_path_under_autocast():
    from moai_lib.model.loss import chunked_causal_lm_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 1025, 512, generator=g).cuda()
    weight = (512 ** -0.5 * torch.randn(32000, 512, generator=g)).cuda()
    labels = torch.randint(0, 32000, (2, 1025), generator=g).cuda()
    labels[0, 100:700] = -100
    res = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = chunked_causal_lm_loss(h, w, labels, chunk_size=128, fused=fused)
        loss.backward()
        res.append((loss, h.grad, w.grad))
    errors = {k: scaled_error(a, b) for k, a, b in zip(("loss", "dh", "dw"), res[1], res[0], strict=True)}
    assert max(errors.values()) <= TOL["bfloat16"], errors
    assert res[1][2].dtype == torch.float32


if __name__ == "__main__":
    _subprocess_main()
