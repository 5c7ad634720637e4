"""AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware per-input-channel scaling, then clipping, then RTN.

For a layer W (out, in) with calibration inputs X (tokens, in), AWQ multiplies W's input channels by s > 0 and
divides the inputs by s: Q(W·diag(s))·(X·diag(1/s))ᵀ. Channels with large activations get larger s, so their
weights are quantized with relatively finer steps. Per layer:

1. scale search: s = x̄^α / w̄^(1−α) (`duo_scaling`, AutoAWQ) or s = x̄^α (llm-awq), with x̄ the mean |x|
   per input channel and w̄ the mean of |w| / max|w| of its group; α on a grid of `n_grid` points in [0, 1),
   s normalised by sqrt(max·min). The α (or s = 1, plain RTN) with the smallest layer-output MSE
   ‖Q(W·s)(X/s)ᵀ − WXᵀ‖² wins.
2. clipping search: per output channel and group, the weights are clamped to ±(1 − i/n_grid)·max|w|
   (i < max_shrink·n_grid) and the clamp with the smallest error of that group's partial output is kept.
3. RTN of the scaled, clipped weights (`primitives`), stored in a `QuantizedLinear`.

Where 1/s goes: `in_proj` and MLP `fc1` read an RMSNorm output, which is linear in the norm's weight, so 1/s
is folded into `norm.weight` / `norm2.weight` (free at run time). `x_proj` reads silu(conv(x)), `out_proj`
reads y·silu(z), `fc2` reads y·silu(gate): after nonlinearities, so those layers keep 1/s as their
`input_scale` and multiply it in at run time.

Calibration is block-sequential as in GPTQ (`calibration.py`): each layer's search sees the outputs of the
already-quantized layers before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import primitives as P
from .api import (
    SteppedQuantConfig,
    check_bits,
    check_group_divides,
    check_group_size,
    register_quant_method,
)
from .calibration import Capture, LayerQuantizer, calibrate, check_targets_in_blocks, run_sequential, start_capture
from .linear import QuantizedLinear

# Layers whose input is an RMSNorm output: the norm (by name inside a MambaBlock) absorbs 1/s.
FOLD_INTO_NORM = {"mixer.in_proj": "norm", "mlp.fc1": "norm2"}


def _weight_stat(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w̄ (in,): mean over output channels of |w| / max|w| of its group (AutoAWQ `get_weight_scale`)."""
    out_features, n = w.shape
    g = P.resolve_group_size(n, group_size)
    wg = w.abs().reshape(out_features, n // g, g)
    wg = wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return wg.reshape(out_features, n).mean(0)


def search_scales(W: torch.Tensor, X: torch.Tensor, bits: int, group_size: int, symmetric: bool, n_grid: int,
                  duo_scaling: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    """The per-input-channel scale s (in,) that minimises the layer-output MSE after RTN (step 1)."""
    W, X = W.float(), X.float()
    reference = X @ W.T
    x_mean = X.abs().mean(0)
    w_mean = _weight_stat(W, group_size)

    def error(s: torch.Tensor) -> float:
        wq = P.fake_quantize(W * s, bits, group_size, symmetric, scale_dtype).float() / s
        return float((X @ wq.T - reference).pow(2).mean())

    best_s, best = torch.ones_like(x_mean), error(torch.ones_like(x_mean))
    for r in range(n_grid):
        alpha = r / n_grid
        s = x_mean.pow(alpha) / w_mean.pow(1 - alpha) if duo_scaling else x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if not torch.isfinite(s).all():
            continue
        e = error(s)
        if e < best:
            best, best_s = e, s
    return best_s


def search_clip(W: torch.Tensor, X: torch.Tensor, bits: int, group_size: int, symmetric: bool, n_grid: int,
                max_shrink: float, scale_dtype: torch.dtype, chunk: int = 256) -> torch.Tensor:
    """Per (output channel, group) clamp bound (out, n_groups, 1) minimising that group's partial-output MSE."""
    out_features, n = W.shape
    g = P.resolve_group_size(n, group_size)
    xg = X.float().reshape(-1, n // g, g)  # (T, G, g)
    bounds = []
    for o in range(0, out_features, chunk):
        wg = W[o:o + chunk].float().reshape(-1, n // g, g)  # (C, G, g)
        reference = torch.einsum("tkj,ckj->ctk", xg, wg)  # (C, T, G) partial outputs per group
        org_max = wg.abs().amax(dim=-1, keepdim=True)  # (C, G, 1)
        best_max = org_max.clone()
        best_err = torch.full(org_max.shape, math.inf, device=W.device)
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(wg, -max_val, max_val).reshape(-1, n)
            q = P.fake_quantize(cur, bits, group_size, symmetric, scale_dtype).float().reshape(wg.shape)
            err = (torch.einsum("tkj,ckj->ctk", xg, q) - reference).pow(2).mean(dim=1)[..., None]  # (C, G, 1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        bounds.append(best_max)
    return torch.cat(bounds)


@dataclass
class AWQConfig(SteppedQuantConfig):
    """AWQ settings (AutoAWQ names where they exist).

    bits: 4 (the AWQ GEMM format and kernels are 4-bit). group_size: 32, 64, 128. zero_point: asymmetric
    (AutoAWQ default) or symmetric. n_grid: α grid points. duo_scaling: use weight statistics in s.
    clip: run the clipping search; max_shrink: largest clamp reduction tried. max_tokens: calibration tokens
    per layer kept for the searches (evenly strided subsample). step: "prepare" → calibration → "convert".
    """

    method = "awq"
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    max_shrink: float = 0.5
    max_tokens: int = 4096

    def __post_init__(self):
        super().__post_init__()
        check_bits(self, self.bits, (4,))
        check_group_size(self, self.group_size, per_channel=False)
        if self.n_grid < 1 or not 0 <= self.max_shrink < 1 or self.max_tokens < 1:
            self.fail(f"n_grid={self.n_grid}, max_shrink={self.max_shrink}, max_tokens={self.max_tokens} out of range",
                      "use n_grid ≥ 1, 0 ≤ max_shrink < 1, max_tokens ≥ 1 (defaults 20, 0.5, 4096)")

    def check_layer(self, fqn: str, linear: nn.Linear) -> None:
        check_group_divides(self, fqn, linear.in_features, self.group_size)


class _AWQLayer(LayerQuantizer):
    def __init__(self, config: AWQConfig, linear: nn.Linear):
        self.config = config
        self.inputs: list[torch.Tensor] = []

    def collect(self, x: torch.Tensor) -> None:
        self.inputs.append(x.float())

    def finish(self, block: nn.Module, name: str, linear: nn.Linear) -> nn.Module:
        c = self.config
        X = torch.cat(self.inputs)
        if X.shape[0] > c.max_tokens:
            X = X[torch.linspace(0, X.shape[0] - 1, c.max_tokens, device=X.device).long()]
        symmetric, dtype = not c.zero_point, linear.weight.dtype
        W = linear.weight.detach().float()
        s = search_scales(W, X, c.bits, c.group_size, symmetric, c.n_grid, c.duo_scaling, dtype)
        norm_name = FOLD_INTO_NORM.get(name)
        if norm_name is not None:
            # The stored scale is what the norm will divide by: round it to the norm's dtype first so the
            # weights are scaled by exactly the value that is folded.
            norm = block.get_submodule(norm_name)
            s = s.to(norm.weight.dtype).float()
        else:
            s = s.to(dtype).float()
        Ws = W * s
        if c.clip:
            bound = search_clip(Ws, X / s, c.bits, c.group_size, symmetric, c.n_grid, c.max_shrink, dtype)
            Ws = torch.clamp(Ws.reshape(bound.shape[0], bound.shape[1], -1), -bound, bound).reshape(W.shape)
        if norm_name is not None:
            with torch.no_grad():
                norm.weight.div_(s.to(norm.weight.dtype))
            return QuantizedLinear.from_float(linear, c.bits, c.group_size, symmetric, weight=Ws)
        return QuantizedLinear.from_float(linear, c.bits, c.group_size, symmetric, weight=Ws, input_scale=1 / s)


def _prepare(model: nn.Module, config: AWQConfig, targets: dict[str, nn.Linear]) -> Capture:
    check_targets_in_blocks(model, config, targets)
    return start_capture(model, config, targets)


def _convert(model: nn.Module, config: AWQConfig, capture: Capture) -> dict[str, nn.Module]:
    return run_sequential(model, config, capture, lambda fqn, linear: _AWQLayer(config, linear))


register_quant_method(AWQConfig, prepare=_prepare, convert=_convert)


def quantize_awq(model: nn.Module, calib_data, w_bit: int = 4, group_size: int = 128) -> nn.Module:
    """Compatibility name: AWQ of the default layers on `calib_data` (token ids (N, L) or a list of them)."""
    return calibrate(model, AWQConfig(bits=w_bit, group_size=group_size), calib_data)
