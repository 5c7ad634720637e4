"""Quantization-aware training (weight-only INT4/INT8) with a straight-through estimator.

prepare swaps each target `nn.Linear` for a `FakeQuantLinear` that keeps the float weight (the same
`nn.Parameter`, so an optimizer built before prepare keeps updating it) and computes with
ŵ = `primitives.fake_quantize(w)`: exactly the values `QuantizedLinear.from_float(w)` will store, because both
call the same qparams/rounding code with the scales in the weight's dtype. The backward pass is the identity
(Bengio et al. 2013 STE): dL/dw = dL/dŵ. convert then applies RTN to the trained weights, so convert after
QAT equals `IntWeightOnlyConfig` RTN of the same weights bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import primitives as P
from .api import (
    QuantizationError,
    SteppedQuantConfig,
    check_bits,
    check_group_divides,
    check_group_size,
    register_quant_method,
    set_submodule,
)
from .linear import INT_BITS, QuantizedLinear


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: RTN fake quantization; backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, w, bits, group_size, symmetric):
        return P.fake_quantize(w, bits, group_size, symmetric)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_quantize_ste(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """RTN fake quantization of w (out, in) with a straight-through gradient."""
    return _FakeQuantSTE.apply(w, bits, group_size, symmetric)


class FakeQuantLinear(nn.Linear):
    """nn.Linear that trains its float weight while computing with its RTN-quantized version."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool) -> FakeQuantLinear:
        module = cls(linear.in_features, linear.out_features, bits, group_size, symmetric, bias=False,
                     device="meta")
        module.weight = linear.weight  # the same Parameter: optimizer state and tying survive
        module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize_ste(self.weight, self.bits, self.group_size, self.symmetric), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fake_quant=int{self.bits} g{self.group_size} symmetric={self.symmetric}"


@dataclass
class QATConfig(SteppedQuantConfig):
    """QAT for group-wise INT4/INT8 weights; same fields and numerics as `IntWeightOnlyConfig`.

    step="prepare" inserts fake quantization; train; step="convert" stores the trained weights quantized.
    """

    method = "qat"
    between_steps = "train the model"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_bits(self, self.bits, INT_BITS)
        check_group_size(self, self.group_size)

    def check_layer(self, fqn: str, linear: nn.Linear) -> None:
        check_group_divides(self, fqn, linear.in_features, self.group_size)


def _prepare(model: nn.Module, config: QATConfig, targets: dict[str, nn.Linear]) -> list[str]:
    for fqn, linear in targets.items():
        set_submodule(model, fqn, FakeQuantLinear.from_linear(linear, config.bits, config.group_size,
                                                              config.symmetric))
    return list(targets)


def _convert(model: nn.Module, config: QATConfig, targets: list[str]) -> dict[str, nn.Module]:
    out = {}
    for fqn in targets:
        module = model.get_submodule(fqn)
        if not isinstance(module, FakeQuantLinear):
            raise QuantizationError(f"qat: {fqn} is no longer a FakeQuantLinear ({type(module).__name__}); was it "
                                    "replaced after prepare?")
        out[fqn] = QuantizedLinear.from_float(module, config.bits, config.group_size, config.symmetric)
    return out


register_quant_method(QATConfig, prepare=_prepare, convert=_convert)
