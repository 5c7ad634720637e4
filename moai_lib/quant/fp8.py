"""FP8 (E4M3) weights with dynamically scaled FP8 activations, and the FP8 training recipe.

`Float8Linear` stores W as E4M3 with one fp32 scale per output row (torchao's `PerRow` granularity) and, at
each call, scales every input token (row) by its own amax / 448 before casting it to E4M3:

    y = (x̂ · Ŵᵀ) ⊙ (s_x · s_wᵀ),   x̂ = e4m3(x / s_x),   Ŵ = e4m3(W / s_w),   s = amax(|row|) / 448

Backends (`FP8_BACKENDS`, chosen here and only here):
- "scaled_mm": `torch._scaled_mm` row-wise FP8 GEMM on GPUs with FP8 tensor cores (compute capability ≥ 8.9:
  Ada, Hopper H100/H200, Blackwell); in/out widths must be multiples of 16.
- "emulated": the same arithmetic with the E4M3 values upcast to fp32 (any device; what CPU tests run).
- "triton": for inputs of ≤ 16 rows (decoding), a weight-only Triton GEMV (`moai_lib.kernels.triton_gemv`): the
  E4M3 weight is converted in registers and multiplies the bf16/fp16 activations unquantized, fp32 accumulation
  (y = x · (e4m3 · s_w)ᵀ: no activation rounding, so closer to the bf16 layer than the FP8 GEMM). At M = 1 the
  FP8 GEMM path is ~10 small kernels per layer (row amax, divide, clamp, cast, `_scaled_mm`); the GEMV is one
  weight stream. Larger inputs take the "auto" path below. Needs a CUDA GPU with FP8 (sm_89+) or Triton's CPU
  interpreter.
- "auto": the Triton GEMV for bf16/fp16 inputs of ≤ 4 rows on an FP8 GPU (on the H200 at one row 4x faster than
  `_scaled_mm` with its activation quantization, at 16 rows 1.8x slower: BENCHMARKS.md, "Quantized decoding");
  otherwise "scaled_mm" where it can run, else "emulated" (warning once on a CUDA GPU without FP8).
Asking for "scaled_mm" or "triton" where it cannot run is an error naming the problem.

The E4M3 bytes are stored as uint8 (`qweight`), so `model.to(dtype)` and checkpoint loading never cast them.

`enable_fp8_training(model)` applies torchao's `convert_to_float8_training` (dynamic tensor-wise scaling) to
the default layers, for the pretrain stage; it runs on CPU too (torch 2.13), FP8 GEMMs only on FP8 GPUs.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .api import (
    FilterFn,
    QuantConfig,
    QuantizationError,
    default_filter,
    import_optional,
    quantize_,
    register_module_kind,
    register_quant_method,
)

logger = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
FP8_BACKENDS = ("auto", "emulated", "scaled_mm", "triton")
FP8_MIN_CAPABILITY = (8, 9)
FP8_GEMV_MAX_ROWS = 16  # = triton_gemv.GEMV_MAX_ROWS (not imported here: quant must import without triton)
FP8_GEMV_AUTO_MAX_ROWS = 4  # "auto" takes the GEMV up to here (its time grows ~linearly with the rows)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def fp8_gpu_problem(name: str, capability: tuple[int, int]) -> str | None:
    """Why a GPU (name, compute capability) cannot run FP8 GEMMs, or None if it can."""
    if tuple(capability) >= FP8_MIN_CAPABILITY:
        return None
    return (f"{name} (sm_{capability[0]}{capability[1]}) has no FP8 tensor cores; FP8 GEMMs need compute capability "
            "≥ 8.9 (Ada L4/L40, Hopper H100/H200, Blackwell)")


@functools.cache
def _device_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "FP8 GEMMs need a CUDA GPU"
    return fp8_gpu_problem(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def fp8_triton_problem(device: torch.device | str) -> str | None:
    """Why the weight-only FP8 Triton GEMV cannot run on `device`, or None if it can."""
    from moai_lib.kernels.dispatch import _triton_unavailable_reason

    device = torch.device(device)
    problem = _triton_unavailable_reason(device)
    if problem is None and device.type == "cuda":
        problem = _device_problem(device)  # Triton converts E4M3 only on FP8 GPUs (sm_89+)
    return problem


def resolve_fp8_backend(backend: str, device: torch.device | str, shape_ok: bool = True, rows: int | None = None,
                        dtype: torch.dtype | None = None) -> str:
    """The concrete FP8 backend for `device` (and, to choose the Triton GEMV, an input of `rows` rows of
    `dtype`); raises `QuantizationError` for an explicit one that cannot run."""
    if backend not in FP8_BACKENDS:
        raise QuantizationError(f"fp8: unknown backend {backend!r}; choose one of {', '.join(FP8_BACKENDS)}")
    small = rows is not None and rows <= FP8_GEMV_MAX_ROWS
    if backend == "triton":
        problem = fp8_triton_problem(device)
        if problem:
            raise QuantizationError(f"fp8: backend 'triton' cannot run here: {problem}; use backend='emulated' "
                                    "(no speedup) or a CUDA GPU with FP8")
        if small:
            return "triton"
        backend = "auto"
    elif (backend == "auto" and small and rows <= FP8_GEMV_AUTO_MAX_ROWS and dtype in (torch.bfloat16, torch.float16)
          and torch.device(device).type == "cuda" and fp8_triton_problem(device) is None):
        return "triton"
    problem = _device_problem(torch.device(device))
    if backend == "emulated":
        return backend
    if backend == "scaled_mm":
        if problem:
            raise QuantizationError(f"fp8: backend 'scaled_mm' cannot run here: {problem}; use backend='emulated' "
                                    "(same numerics, no speedup) or an FP8-capable GPU")
        return backend
    if problem or not shape_ok:
        if torch.device(device).type == "cuda":
            _warn_once(f"fp8: falling back to the emulated FP8 matmul on {device}: "
                       + (problem or "layer widths are not multiples of 16"))
        return "emulated"
    return "scaled_mm"


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) → (E4M3 (M, K), fp32 scales (M, 1)) with scale = amax(|row|) / 448 (1 for an all-zero row)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


@register_module_kind
class Float8Linear(nn.Module):
    """FP8 E4M3 weight (per-row scales) × dynamically quantized FP8 activations (per-token scales); with backend
    "triton" (or "auto" on an FP8 GPU) inputs of ≤ 16 rows take the weight-only GEMV (bf16 activations).

    Buffers: qweight (out, in) uint8 holding E4M3 bits; weight_scale (out, 1) fp32.
    """

    kind = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, backend: str = "auto",
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if backend not in FP8_BACKENDS:
            raise QuantizationError(f"fp8: unknown backend {backend!r}; choose one of {', '.join(FP8_BACKENDS)}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._gemv_read: tuple | None = None  # the weights a GEMV last read (PDL from the second call on)
        self._split_k_counters: torch.Tensor | None = None  # this layer's own (never shared with another layer)

    @classmethod
    def from_float(cls, linear: nn.Linear, backend: str = "auto") -> Float8Linear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, backend=backend,
                     dtype=linear.weight.dtype, device=linear.weight.device)
        wq, scale = quantize_rows_fp8(linear.weight)
        with torch.no_grad():
            module.qweight.copy_(wq.view(torch.uint8))
            module.weight_scale.copy_(scale)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def layout(self) -> dict:
        return {"kind": self.kind, "backend": self.backend}

    @classmethod
    def empty(cls, in_features, out_features, bias, layout, dtype, device=None) -> Float8Linear:
        return cls(in_features, out_features, bias=bias, backend=layout["backend"], dtype=dtype, device=device)

    def weight_fp8(self) -> torch.Tensor:
        return self.qweight.view(E4M3)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in) fp32 (read-only; not a parameter)."""
        return self.weight_fp8().float() * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out) in x's dtype."""
        shape_ok = self.in_features % 16 == 0 and self.out_features % 16 == 0
        # The mixer hands x_proj/out_proj transposed (strided) views; the FP8 GEMM needs row-major rows.
        x2 = x.reshape(-1, self.in_features).contiguous()
        backend = resolve_fp8_backend(self.backend, x.device, shape_ok, rows=x2.shape[0], dtype=x.dtype)
        if backend == "triton":
            from moai_lib.kernels.triton_gemv import fp8_gemv, split_k_counters

            # PDL (the launch overlaps the previous kernel, `kernels.pdl`) once an ordinary launch has read these
            # weights: whatever wrote them has then finished. (Inference tensors have no version counter: their
            # in-place writes are seen only through a new storage.)
            key = (self.qweight.data_ptr(), self.weight_scale.data_ptr(),
                   *(-1 if t.is_inference() else t._version for t in (self.qweight, self.weight_scale)))
            if self._split_k_counters is None or self._split_k_counters.device != x.device:
                self._split_k_counters = split_k_counters(self.out_features, x.device)
            y = fp8_gemv(x2, self.qweight, self.weight_scale, self.bias, pdl=key == self._gemv_read,
                         counters=self._split_k_counters)
            self._gemv_read = key
            return y.reshape(*x.shape[:-1], self.out_features)
        xq, x_scale = quantize_rows_fp8(x2)
        w_scale = self.weight_scale.float()
        if backend == "scaled_mm":
            # Row-wise scaled FP8 GEMMs write bf16 only.
            y = torch._scaled_mm(xq, self.weight_fp8().t(), scale_a=x_scale, scale_b=w_scale.t(),
                                 out_dtype=torch.bfloat16)
        else:
            y = (xq.float() @ self.weight_fp8().float().t()) * x_scale * w_scale.t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-row, " \
               f"backend={self.backend}"


@dataclass
class Float8Config(QuantConfig):
    """FP8 E4M3 weights (per-row scales) and dynamic per-token FP8 activations (at decode sizes on an FP8 GPU the
    weight-only Triton GEMV keeps the activations in bf16 instead).

    backend: "auto", "emulated", "scaled_mm" or "triton" (see the module docstring).
    """

    method = "fp8"
    backend: str = "auto"

    def __post_init__(self):
        if self.backend not in FP8_BACKENDS:
            self.fail(f"unknown backend {self.backend!r}", f"choose one of {', '.join(FP8_BACKENDS)}")

    def check_layer(self, fqn: str, linear: nn.Linear) -> None:
        if self.backend == "scaled_mm":
            resolve_fp8_backend("scaled_mm", linear.weight.device)
            if linear.in_features % 16 or linear.out_features % 16:
                self.fail(f"layer {fqn} is {linear.in_features}→{linear.out_features}; torch._scaled_mm needs "
                          "widths that are multiples of 16", "use backend='auto' (emulates such layers) or leave "
                          "the layer out with filter_fn")


def _apply_fp8(model: nn.Module, config: Float8Config, targets: dict[str, nn.Linear]) -> dict:
    return {fqn: Float8Linear.from_float(linear, config.backend) for fqn, linear in targets.items()}


register_quant_method(Float8Config, apply=_apply_fp8)


def quantize_fp8(model: nn.Module) -> nn.Module:
    """Compatibility name: FP8 E4M3 weights + dynamic activations on the default layers (backend "auto")."""
    return quantize_(model, Float8Config())


def enable_fp8_training(model: nn.Module, filter_fn: FilterFn | None = None) -> nn.Module:
    """FP8 training (torchao `convert_to_float8_training`, dynamic tensor-wise scaling) of the layers that
    `filter_fn` (default: the quantization default policy) selects and whose widths are multiples of 16
    (FP8 GEMM shape rule); other layers stay in high precision. In place; returns the model."""
    import_optional("torchao", "fp8-training")
    from torchao.float8 import convert_to_float8_training

    select = filter_fn or default_filter
    chosen = []

    def module_filter(module: nn.Module, fqn: str) -> bool:
        ok = (select(module, fqn) and isinstance(module, nn.Linear) and module.in_features % 16 == 0
              and module.out_features % 16 == 0)
        if ok:
            chosen.append(fqn)
        return ok

    convert_to_float8_training(model, module_filter_fn=module_filter)
    if not chosen:
        raise QuantizationError("fp8-training: no selected nn.Linear layer has widths that are multiples of 16")
    logger.info("fp8-training: %d layers train in FP8", len(chosen))
    return model
