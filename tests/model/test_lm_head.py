"""The LM-head end of the forward (`lm_head_outputs`) on a quantized head: it never reads `lm_head.weight`
(which dequantizes the whole head) and computes the logits it computed when it did."""

from __future__ import annotations

import pytest
import torch

from moai_lib import MoaiMambaForCausalLM, get_mamba_config
from moai_lib.quant import IntWeightOnlyConfig, QuantizedLinear, layer_filter, quantize_

VOCAB = 250  # padded to 256 rows (pad_vocab_size_multiple 8): the padding rows must never be predicted


class NoWeightRead(QuantizedLinear):
    """A QuantizedLinear whose dequantized `weight` may not be read."""

    @property
    def weight(self) -> torch.Tensor:
        raise AssertionError("lm_head.weight was read (a full dequantization of the head)")


def int4_head_model(dtype: torch.dtype) -> MoaiMambaForCausalLM:
    torch.manual_seed(0)
    config = get_mamba_config("tiny", vocab_size=VOCAB, tie_word_embeddings=False, kernel_backend="torch")
    model = MoaiMambaForCausalLM(config).eval().to(dtype)
    quantize_(model, IntWeightOnlyConfig(bits=4, group_size=32), layer_filter("lm_head"))
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.out_features == 256
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 takes the CPU int4mm kernel
def test_quantized_head_gives_the_same_logits_without_reading_its_weight(dtype):
    model = int4_head_model(dtype)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.backbone(input_ids=ids).last_hidden_state
        # What the head computed when lm_head_outputs cast its input to `lm_head.weight.dtype` (the dequantized
        # weight's dtype, i.e. the scales').
        dtype_before = model.lm_head.weight.dtype
        expected, expected_last = (model.lm_head(h.to(dtype_before)).float() for h in (hidden, hidden[:, -1:]))
        for e in (expected, expected_last):
            e[..., VOCAB:] = torch.finfo(e.dtype).min
        model.lm_head.__class__ = NoWeightRead
        with pytest.raises(AssertionError, match="was read"):
            model.lm_head.weight  # noqa: B018  (the guard works)
        logits = model(input_ids=ids, use_cache=False).logits
        last = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    assert logits.dtype == torch.float32 and torch.equal(logits, expected)
    assert torch.equal(last, expected_last)
    assert (logits[..., VOCAB:] == torch.finfo(torch.float32).min).all()


def test_bitsandbytes_head_computes_in_its_compute_dtype():
    """A bitsandbytes NF4 head stores packed uint8 (its `weight` is that parameter): the input is cast to the
    layer's compute_dtype, and the width comes from out_features, not the packed weight's shape."""
    pytest.importorskip("bitsandbytes")
    from moai_lib.quant import BnbConfig

    torch.manual_seed(0)
    config = get_mamba_config("tiny", vocab_size=VOCAB, tie_word_embeddings=False, kernel_backend="torch")
    model = MoaiMambaForCausalLM(config).eval()
    quantize_(model, BnbConfig(quant_type="nf4"), layer_filter("lm_head"))
    assert model.lm_head.weight.dtype == torch.uint8
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.backbone(input_ids=ids).last_hidden_state
        expected = model.lm_head(hidden.to(torch.float32)).float()
        logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (2, 12, 256)
    assert torch.equal(logits[..., :VOCAB], expected[..., :VOCAB])
    assert (logits[..., VOCAB:] == torch.finfo(torch.float32).min).all()
