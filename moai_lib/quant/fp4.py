"""FP4 (E2M1) weight-only quantization with per-group scales, MXFP4 and NVFP4 layouts, emulated matmul.

E2M1 codes (sign bit 3, magnitude index bits 0-2) stand for ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}. Encoding rounds to
the nearest value, ties to the even code (OCP MX spec v1.0), and saturates at ±6.

- MXFP4 (OCP Microscaling): groups of 32 along the input dim, one E8M0 scale 2^e per group with
  e = floor(log2 amax) − 2 (2 = E2M1's largest exponent), stored as the biased byte e + 127.
- NVFP4 (NVIDIA Blackwell): groups of 16, an E4M3 scale per group times one fp32 scale per tensor:
  s_tensor = amax(W) / (448·6), s_group = e4m3(amax_group / 6 / s_tensor).

Codes are stored packed two per byte (`primitives.pack_int4`), scales as bytes (E8M0 exponent or E4M3 bits).
The matmul dequantizes to the activation dtype and runs dense: FP4 tensor cores exist only on Blackwell
(not on H100/H200), so here FP4 saves memory (4.25-4.5 bits/weight) and computes in bf16/fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import primitives as P
from .api import QuantConfig, register_module_kind, register_quant_method

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
# Midpoints between consecutive magnitudes; at a tie the even index wins (its mantissa bit is 0).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)
FP4_FORMATS = {"mxfp4": 32, "nvfp4": 16}  # format → group size


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (uint8 in [0, 15]) of each value, ties to even, saturating at ±6."""
    a = x.float().abs()
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for k, mid in enumerate(_MIDPOINTS):
        idx += (a > mid if k % 2 == 0 else a >= mid).to(torch.uint8)
    negative = torch.signbit(x) & (idx > 0)  # no negative zero: code 8 is never produced
    return idx | (negative.to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes → fp32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -mag, mag)


def _group_scales(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group scale bytes (out, in/g), their fp32 values (out, in/g) and the tensor scale (1,) for w (out, in)."""
    g = FP4_FORMATS[fmt]
    amax = w.float().abs().reshape(w.shape[0], -1, g).amax(dim=-1)
    if fmt == "mxfp4":
        e = torch.floor(torch.log2(amax.clamp(min=2.0 ** -127))) - 2
        e = e.clamp(-127, 127)
        return (e + 127).to(torch.uint8), torch.exp2(e), torch.ones(1, device=w.device)
    tensor_amax = amax.max()
    tensor_scale = (tensor_amax / (E4M3_MAX * E2M1_MAX)) if tensor_amax > 0 else torch.ones((), device=w.device)
    group = (amax / E2M1_MAX / tensor_scale).clamp(max=E4M3_MAX).to(E4M3)
    return group.view(torch.uint8), group.float() * tensor_scale, tensor_scale.reshape(1).float()


def quantize_fp4(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (out, in) → (codes (out, in) uint8, scale bytes (out, in/g), tensor scale (1,))."""
    g = FP4_FORMATS[fmt]
    scale_bytes, scale, tensor_scale = _group_scales(w, fmt)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = encode_e2m1(w.float().reshape(w.shape[0], -1, g) / safe[..., None]).reshape(w.shape)
    return codes, scale_bytes, tensor_scale


def scale_values(scale_bytes: torch.Tensor, tensor_scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Decode scale bytes to fp32 group scales."""
    if fmt == "mxfp4":
        return torch.exp2(scale_bytes.float() - 127)
    return scale_bytes.view(E4M3).float() * tensor_scale.float()


@register_module_kind
class FP4Linear(nn.Module):
    """Weight-only E2M1 linear: buffers qweight (out, in/2) uint8 (two codes per byte), scales (out, in/g) uint8,
    tensor_scale (1,) fp32 (NVFP4; 1 for MXFP4)."""

    kind = "fp4"

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        g = FP4_FORMATS[fmt]
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // g, dtype=torch.uint8, device=device))
        self.register_buffer("tensor_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, fmt: str) -> FP4Linear:
        module = cls(linear.in_features, linear.out_features, fmt, bias=linear.bias is not None,
                     dtype=linear.weight.dtype, device=linear.weight.device)
        codes, scale_bytes, tensor_scale = quantize_fp4(linear.weight.detach(), fmt)
        with torch.no_grad():
            module.qweight.copy_(P.pack_int4(codes))
            module.scales.copy_(scale_bytes)
            module.tensor_scale.copy_(tensor_scale)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def layout(self) -> dict:
        return {"kind": self.kind, "format": self.fmt}

    @classmethod
    def empty(cls, in_features, out_features, bias, layout, dtype, device=None) -> FP4Linear:
        return cls(in_features, out_features, layout["format"], bias=bias, dtype=dtype, device=device)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = FP4_FORMATS[self.fmt]
        values = decode_e2m1(P.unpack_int4(self.qweight)).reshape(self.out_features, -1, g)
        scale = scale_values(self.scales, self.tensor_scale, self.fmt)
        return (values * scale[..., None]).reshape(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in) fp32 (read-only; not a parameter)."""
        return self.dequantize_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"


@dataclass
class FP4Config(QuantConfig):
    """FP4 E2M1 weight-only. format: "nvfp4" (groups of 16, E4M3 scales + fp32 tensor scale) or "mxfp4"
    (groups of 32, E8M0 power-of-two scales)."""

    method = "fp4"
    format: str = "nvfp4"

    def __post_init__(self):
        if self.format not in FP4_FORMATS:
            self.fail(f"unknown format {self.format!r}", f"choose one of {', '.join(FP4_FORMATS)}")

    def check_layer(self, fqn: str, linear: nn.Linear) -> None:
        g = FP4_FORMATS[self.format]
        if linear.in_features % g:
            other = [f for f, size in FP4_FORMATS.items() if linear.in_features % size == 0]
            self.fail(f"layer {fqn} has input width {linear.in_features}, not a multiple of {self.format}'s group "
                      f"size {g}", (f"use format={other[0]!r} or " if other else "") + "leave it out with filter_fn")


def _apply_fp4(model: nn.Module, config: FP4Config, targets: dict[str, nn.Linear]) -> dict:
    return {fqn: FP4Linear.from_float(linear, config.format) for fqn, linear in targets.items()}


register_quant_method(FP4Config, apply=_apply_fp4)
