"""QAT: the straight-through estimator, and convert after training == RTN of the trained weights, bit for bit."""

import dataclasses

import pytest
import torch
from quant_helpers import tiny_model
from torch import nn

from moai_lib.quant import (
    FakeQuantLinear,
    IntWeightOnlyConfig,
    QATConfig,
    QuantizedLinear,
    quantize_,
    quantized_modules,
)
from moai_lib.quant import primitives as P


def test_ste_forward_is_rtn_and_gradient_passes_straight_through():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    fq = FakeQuantLinear.from_linear(linear, 4, 32, symmetric=False)
    assert fq.weight is linear.weight  # same Parameter: an existing optimizer keeps training it
    x = torch.randn(10, 64)
    y = fq(x)
    w_hat = P.fake_quantize(linear.weight.detach(), 4, 32, False)
    assert torch.equal(y, x @ w_hat.T)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    # STE: dL/dW = dL/dŴ = grad_outᵀ x, as if the quantizer were the identity.
    torch.testing.assert_close(linear.weight.grad, grad_out.T @ x)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 64, True), (8, 32, False)])
def test_convert_after_training_equals_rtn_bit_for_bit(bits, group_size, symmetric):
    model = tiny_model(seed=1)
    cfg = QATConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    quantize_(model, cfg)
    assert isinstance(model.backbone.layers[0].mixer.in_proj, FakeQuantLinear)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    start = model.backbone.layers[0].mlp.fc1.weight.detach().clone()
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.backbone.layers[0].mlp.fc1.weight, start)  # the float weights did train
    model.eval()
    qat_logits = model(ids, use_cache=False).logits

    # RTN applied to the trained float weights, loaded into a fresh float model (FakeQuantLinear keeps
    # nn.Linear's state-dict names).
    reference = tiny_model(seed=2)
    reference.load_state_dict(model.state_dict())
    quantize_(reference, IntWeightOnlyConfig(bits=bits, group_size=group_size, symmetric=symmetric))

    quantize_(model, dataclasses.replace(cfg, step="convert"))
    converted, rtn = quantized_modules(model), quantized_modules(reference)
    assert set(converted) == set(rtn) and len(converted) == 10
    for fqn, module in converted.items():
        assert isinstance(module, QuantizedLinear)
        for name in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(module, name), getattr(rtn[fqn], name)), (fqn, name)
    # What QAT trained against is exactly what the converted model computes.
    assert torch.equal(model(ids, use_cache=False).logits, qat_logits)
    assert model.config.quantization_config.methods[-1]["method"] == "qat"
