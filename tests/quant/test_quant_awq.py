"""AWQ: scale and clip searches, where the scales go (norms vs run time), and the gain over RTN."""

import dataclasses

import pytest
import torch
from quant_helpers import block_errors, tiny_model

from moai_lib.quant import AWQConfig, QuantizationError, QuantizedLinear, quantize_, quantize_awq
from moai_lib.quant import primitives as P
from moai_lib.quant.awq import search_clip, search_scales


def outlier_inputs(n: int, seed: int) -> torch.Tensor:
    """Inputs (n, 128) whose channels 0-7 are 20× larger than the rest (a fixed set, as in LMs)."""
    x = torch.randn(n, 128, generator=torch.Generator().manual_seed(seed))
    x[:, :8] *= 20
    return x


def test_scale_search_protects_salient_channels_on_held_out_inputs():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    s = search_scales(W, outlier_inputs(512, 1), 4, 32, False, n_grid=20, duo_scaling=True,
                      scale_dtype=torch.float32)
    assert bool(s[:8].mean() > 2 * s[8:].mean())  # the large-activation channels get larger scales
    X = outlier_inputs(512, 2)
    reference = X @ W.T
    rtn = (X @ P.fake_quantize(W, 4, 32, False).T - reference).pow(2).mean()
    awq = ((X / s) @ P.fake_quantize(W * s, 4, 32, False).T - reference).pow(2).mean()
    assert awq < 0.8 * rtn


def test_clip_search_never_loosens_and_lowers_the_group_error():
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    W[:, 3] *= 6  # one large weight per row widens its group's range
    X = torch.randn(256, 64)
    bound = search_clip(W, X, 4, 32, False, n_grid=20, max_shrink=0.5, scale_dtype=torch.float32)
    amax = W.abs().reshape(16, 2, 32).amax(-1, keepdim=True)
    assert bound.shape == (16, 2, 1) and bool((bound <= amax).all()) and bool((bound >= 0.5 * amax).all())
    clipped = torch.clamp(W.reshape(16, 2, 32), -bound, bound).reshape(16, 64)
    err = lambda w: float((X @ (P.fake_quantize(w, 4, 32, False) - W).T).pow(2).mean())  # noqa: E731
    assert err(clipped) < err(W)


def test_awq_scales_fold_into_norms_before_in_proj_and_fc1_and_apply_at_run_time_elsewhere(trained_tiny):
    model = trained_tiny.fresh()
    norms = {i: (b.norm.weight.clone(), b.norm2.weight.clone()) for i, b in enumerate(model.backbone.layers)}
    quantize_awq(model, trained_tiny.calib, w_bit=4, group_size=32)
    for i, block in enumerate(model.backbone.layers):
        for layer in (block.mixer.in_proj, block.mlp.fc1):
            assert isinstance(layer, QuantizedLinear) and layer.input_scale is None
        for layer in (block.mixer.x_proj, block.mixer.out_proj, block.mlp.fc2):
            assert isinstance(layer, QuantizedLinear) and layer.input_scale is not None
            assert not torch.equal(layer.input_scale, torch.ones_like(layer.input_scale))
        assert not torch.equal(block.norm.weight, norms[i][0]) and not torch.equal(block.norm2.weight, norms[i][1])
    assert model.config.quantization_config.modules["backbone.layers.0.mixer.out_proj"]["input_scale"] is True


def test_awq_lowers_the_block_output_error_of_rtn_on_a_trained_model(trained_tiny, rtn_block_errors):
    assert trained_tiny.final_loss < 1.3  # the fixture did learn the chain (ln 64 = 4.16 untrained)
    config = AWQConfig(group_size=32)
    model = trained_tiny.fresh()
    quantize_(model, config)
    for batch in trained_tiny.calib.split(8):
        model(batch, use_cache=False)
    quantize_(model, dataclasses.replace(config, step="convert"))
    # Measured ratios AWQ / RTN ≈ 0.8 per block.
    for awq, rtn in zip(block_errors(trained_tiny, model), rtn_block_errors, strict=True):
        assert awq < 0.9 * rtn


def test_awq_saved_and_loaded_keeps_run_time_scales(tmp_path, trained_tiny):
    from moai_lib.quant import load_quantized

    model = quantize_awq(trained_tiny.fresh(), trained_tiny.calib[:8], w_bit=4, group_size=64)
    logits = model(trained_tiny.heldout, use_cache=False).logits
    model.save_pretrained(tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.backbone.layers[1].mlp.fc2.input_scale is not None
    assert torch.equal(loaded(trained_tiny.heldout, use_cache=False).logits, logits)


def test_awq_refuses_other_bit_widths_with_the_fix():
    with pytest.raises(QuantizationError, match=r"awq: bits=8 is not supported; use bits in \(4,\)"):
        quantize_awq(tiny_model(), torch.randint(0, 512, (2, 8)), w_bit=8, group_size=32)
