"""The fused LM-head loss inside the models: for the Mamba LM (padded vocabulary: 509 real rows of 512) and the
attention baseline, the loss and every parameter's gradient with `chunked_causal_lm_loss`'s fused path equal
those of its checkpointed torch path (padding, ignored labels, several chunks with a partial last one).

The models do not take a switch: they call `lm_head_outputs`, which resolves `fused=None` through
`loss.use_fused_loss`; the comparison sets that function to answer True, then False. On the CPU the fused path
runs under Triton's interpreter in a fresh process (this file run as a script, printing the errors as JSON);
the GPU test runs the compiled kernel and skips without CUDA.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # fp32 on both sides: summation order only (scaled by the largest reference magnitude)


def scaled_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def model_errors(device: str = "cpu") -> dict:
    """model name -> {"loss": error, "grads": largest scaled error over parameters, "worst": its name}."""
    from moai_lib.config import get_mamba_config
    from moai_lib.model import loss as loss_module
    from moai_lib.model.mamba import MoaiMambaForCausalLM
    from moai_lib.model.transformer import MoaiTransformerForCausalLM, get_transformer_config

    builders = {
        "mamba": lambda: MoaiMambaForCausalLM(get_mamba_config("tiny", vocab_size=509)),
        "transformer": lambda: MoaiTransformerForCausalLM(get_transformer_config("tiny", vocab_size=509)),
    }
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 509, (2, 33), generator=g).to(device)
    labels = ids.clone()
    labels[0, 3:9] = -100
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    original = loss_module.use_fused_loss
    out = {}
    try:
        for name, build in builders.items():
            torch.manual_seed(0)
            model = build().to(device)
            model.loss_chunk_size = 7  # 64 counted positions: several chunks on both paths, the last partial
            results = []
            for fused in (False, True):
                loss_module.use_fused_loss = lambda _fused, _device, fused=fused: fused
                model.zero_grad(set_to_none=True)
                loss = model(ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None}))
            (ref_loss, ref_grads), (loss, grads) = results
            assert set(grads) == set(ref_grads)
            errors = {n: scaled_error(grads[n], ref_grads[n]) for n in ref_grads}
            worst = max(errors, key=errors.get)
            out[name] = {"loss": scaled_error(loss, ref_loss), "grads": errors[worst], "worst": worst,
                         "n_grads": len(errors)}
    finally:
        loss_module.use_fused_loss = original
    return out


@pytest.fixture(scope="module")
def interpreted(run_interpreted) -> dict:
    return run_interpreted(__file__)


@pytest.mark.parametrize("model", ["mamba", "transformer"])
def test_interpreted_fused_loss_in_model_matches_torch_path(interpreted, model):
    errors = interpreted[model]
    assert errors["n_grads"] > 5
    assert errors["loss"] <= TOL and errors["grads"] <= TOL, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine)")
def test_gpu_fused_loss_in_model_matches_torch_path():
    for model, errors in model_errors("cuda").items():
        assert errors["loss"] <= TOL and errors["grads"] <= TOL, (model, errors)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1 in a fresh process")
    print(json.dumps(model_errors("cpu")))
