"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): second-order weight quantization, one layer at a time.

For a layer with weight W (out, in) and calibration inputs X (tokens, in), GPTQ quantizes the input columns
one by one and spreads each column's rounding error over the not-yet-quantized columns so as to minimise
‖(W − Ŵ)Xᵀ‖², using the inverse Hessian H⁻¹ of that objective (H = 2XᵀX/n):

- dampening: H += λ·mean(diag H)·I (λ = damp_percent) so that H is positive definite;
- H⁻¹ through its Cholesky factor: the upper factor U of H⁻¹ = UᵀU holds, in row i, exactly the update
  coefficients for column i once columns < i are fixed (Alg. 1 of the paper);
- lazy batch updates: errors are applied inside a block of `block_size` columns immediately and to the
  rest of the matrix once per block (one matmul), which is what makes GPTQ fast;
- groups: a group's scale/zero are fitted to the *updated* weights when the loop reaches its first column;
- act-order (desc_act): columns are processed in decreasing diag(H) order. With `static_groups` the groups'
  qparams are fitted on the original weights before any update, so groups stay contiguous in the original
  order (g_idx = j // g). Without it (AutoGPTQ's desc_act=True, static_groups=False) groups are formed in the
  permuted order, each fitted when the loop reaches it: input column j belongs to group
  g_idx[j] = (position of j in the permutation) // g, which the layer stores and computes with
  (ŵ[:, j] = (q[:, j] − z[:, g_idx[j]])·s[:, g_idx[j]]) and the GPTQ export writes as its `g_idx`.

Calibration runs block by block through the model (`calibration.py`), in_proj → x_proj → out_proj → fc1 →
fc2, each layer seeing inputs produced by the already-quantized layers before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import primitives as P
from .api import (
    QuantizationError,
    SteppedQuantConfig,
    check_bits,
    check_group_divides,
    check_group_size,
    register_quant_method,
)
from .calibration import Capture, LayerQuantizer, calibrate, check_targets_in_blocks, run_sequential, start_capture
from .linear import INT_BITS, QuantizedLinear


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                         damp_percent: float = 0.01, block_size: int = 128, act_order: bool = False,
                         static_groups: bool = False, scale_dtype: torch.dtype | None = None,
                         ) -> tuple[torch.Tensor, P.QParams]:
    """GPTQ of W (out, in) given the Hessian H (in, in) of its inputs. Returns integers (out, in) uint8 and
    their qparams, in the `primitives` conventions (so `dequantize(q, qp)` is the quantized weight)."""
    scale_dtype = scale_dtype or W.dtype
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    out_features, n = W.shape
    g = P.resolve_group_size(n, group_size)
    if group_size != -1 and block_size % g:
        raise QuantizationError(f"gptq: block_size={block_size} must be a multiple of group_size={g}")
    qmax = (1 << bits) - 1
    dead = H.diagonal() == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    fixed_groups = static_groups or group_size == -1
    if fixed_groups:
        qp = P.compute_qparams(W, bits, group_size, symmetric, scale_dtype)
        scales, zeros = qp.scale.clone(), qp.zero.clone()
    else:
        scales = torch.empty(out_features, n // g, dtype=scale_dtype, device=W.device)
        zeros = torch.empty(out_features, n // g, dtype=torch.uint8, device=W.device)
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp_percent * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        raise QuantizationError(f"gptq: the calibration Hessian is not positive definite even after dampening "
                                f"(damp_percent={damp_percent}); increase damp_percent (e.g. 0.1) or use more "
                                "calibration tokens")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.empty(out_features, n, dtype=torch.uint8, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            # Static groups are contiguous in the original order; dynamic ones in the processing order.
            k = (int(perm[col]) if perm is not None and fixed_groups else col) // g
            if not fixed_groups and col % g == 0:
                # The group's qparams from the weights as updated so far (columns col … col+g−1, in this block).
                qp = P.compute_qparams(W1[:, i:i + g], bits, -1, symmetric, scale_dtype)
                scales[:, k], zeros[:, k] = qp.scale[:, 0], qp.zero[:, 0]
            s, z = scales[:, k].float(), zeros[:, k].float()
            w = W1[:, i]
            q = (torch.round(w / s) + z).clamp_(0, qmax)
            Q[:, col] = q.to(torch.uint8)
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)  # invperm[j] = position of input column j in the processing order
        Q = Q[:, invperm]
        if not fixed_groups:
            g_idx = (invperm // g).to(torch.int32)  # AutoGPTQ: g_idx = [i // g for i in range(n)][invperm]
    return Q, P.QParams(scale=scales, zero=zeros, bits=bits, group_size=group_size, g_idx=g_idx)


@dataclass
class GPTQConfig(SteppedQuantConfig):
    """GPTQ settings (names as in AutoGPTQ's `BaseQuantizeConfig`).

    bits: 4 or 8. group_size: 32, 64, 128 or -1. symmetric: GPTQ `sym`. damp_percent: λ of the dampening.
    block_size: columns per lazy batch update (a multiple of group_size). act_order: GPTQ `desc_act`.
    static_groups: with act_order, fit the groups' qparams on the original weights before reordering, so
    groups stay contiguous in the original order; without it (AutoGPTQ's default), groups are formed in the
    act-order permutation and each layer stores its `g_idx`. step: "prepare" → forward calibration batches →
    "convert".
    """

    method = "gptq"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_bits(self, self.bits, INT_BITS)
        check_group_size(self, self.group_size)
        if not 0 < self.damp_percent < 1:
            self.fail(f"damp_percent={self.damp_percent} is outside (0, 1)", "use e.g. 0.01 (1% of mean diag H)")
        if self.block_size <= 0 or (self.group_size != -1 and self.block_size % self.group_size):
            self.fail(f"block_size={self.block_size} is not a positive multiple of group_size={self.group_size}",
                      "use block_size=128")

    def check_layer(self, fqn: str, linear: nn.Linear) -> None:
        check_group_divides(self, fqn, linear.in_features, self.group_size)


class _HessianCollector(LayerQuantizer):
    def __init__(self, config: GPTQConfig, linear: nn.Linear):
        self.config = config
        self.H = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float32,
                             device=linear.weight.device)
        self.n = 0

    def collect(self, x: torch.Tensor) -> None:
        x = x.float()
        self.H.addmm_(x.T, x)
        self.n += x.shape[0]

    def finish(self, block: nn.Module, name: str, linear: nn.Linear) -> nn.Module:
        c = self.config
        q, qp = gptq_quantize_weight(linear.weight, self.H * (2 / self.n), c.bits, c.group_size, c.symmetric,
                                     damp_percent=c.damp_percent, block_size=c.block_size, act_order=c.act_order,
                                     static_groups=c.static_groups, scale_dtype=linear.weight.dtype)
        return QuantizedLinear.from_integers(linear, q, qp, c.symmetric)


def _prepare(model: nn.Module, config: GPTQConfig, targets: dict[str, nn.Linear]) -> Capture:
    check_targets_in_blocks(model, config, targets)
    return start_capture(model, config, targets)


def _convert(model: nn.Module, config: GPTQConfig, capture: Capture) -> dict[str, nn.Module]:
    return run_sequential(model, config, capture, lambda fqn, linear: _HessianCollector(config, linear))


register_quant_method(GPTQConfig, prepare=_prepare, convert=_convert)


def quantize_gptq(model: nn.Module, calib_data, bits: int = 4, group_size: int = 128) -> nn.Module:
    """Compatibility name: GPTQ of the default layers on `calib_data` (token ids (N, L) or a list of them)."""
    return calibrate(model, GPTQConfig(bits=bits, group_size=group_size), calib_data)
