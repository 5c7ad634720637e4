"""INT4 / INT8 group-wise weight-only quantization: the `QuantizedLinear` module and round-to-nearest (RTN).

`QuantizedLinear` is the storage every integer method ends in (RTN, QAT's convert, GPTQ, AWQ): unsigned
integers with per-group scales and zero points (`primitives.py` conventions), INT4 packed two per byte.
AWQ's run-time activation scales live here too (`input_scale`, multiplied into the input before the matmul).

Matmul backends (`INT_BACKENDS`, chosen in `QuantizedLinear.resolve_backend` and nowhere else):
- "dequant": dequantize the weight to the activation dtype, then a dense matmul (any device, any layout).
- "int4mm": torch's built-in INT4 kernels, which read the packed weight directly and compute in bf16:
  `aten._weight_int4pack_mm` on CUDA (tinygemm, the kernel behind torchao's `tile_packed_to_4d` int4 format)
  and `aten._weight_int4pack_mm_for_cpu` on CPU (the edge-CPU path). They need 4 bits, group size 32-256,
  out_features % 8 == 0 and in_features % 32 == 0 on CUDA, out_features % 16 == 0 on CPU. Their
  dequantization is (q − 8)·s + m with m = (8 − z)·s, which is ours exactly up to rounding s and m to bf16.
  The kernel layout is built from the stored integers on first use (per device) and cached. On CUDA the uint8
  copy is then released: the GPU holds each 4-bit weight once (save, load and device moves still see it).
- "triton": our Triton kernels (`moai_lib.kernels.triton_gemv`) on the column-major `Int4Columns` layout (the
  `qweight` bytes transposed, built on first use): a weight-streaming GEMV for one row (a batch-1 decode step;
  launched with programmatic dependent launch from its second call, `kernels.pdl`), and for more rows one kernel
  that dequantizes Ŵᵀ followed by a dense matmul. 4 bits, group_size 32-256, no permuted g_idx; CUDA (or Triton's
  CPU interpreter). The dequantization is exactly ours ((q − z)·s in fp32), accumulation in fp32.
- "auto": "int4mm" for bf16 activations where it applies, else "dequant": the automatic choice never lowers the
  activation precision (fp32 models keep fp32 matmuls; QAT's bit-exactness relies on this). Not "triton": on the
  H200 its GEMV takes 1.0–1.2× tinygemm's time at one row of the 2b preset's layers, and its batch-1 decode step
  1.15× (BENCHMARKS.md, "Quantized decoding"); ask for it explicitly.

One copy of the integers on the GPU: "int4mm" keeps them in tinygemm's layout, "triton" in `Int4Columns` (the
uint8 `qweight` released in both cases); switching a layer's backend converts (exactly) from one to the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import primitives as P
from .api import (
    QuantConfig,
    QuantizationError,
    check_bits,
    check_group_divides,
    check_group_size,
    quantize_,
    register_module_kind,
    register_quant_method,
)

INT_BITS = (4, 8)
INT_BACKENDS = ("auto", "dequant", "int4mm", "triton")
INT4MM_GROUP_SIZES = (32, 64, 128, 256)
INT4_GEMV_ROWS = 1  # backend "triton": inputs of up to this many rows take the GEMV, more dequantize + matmul


@register_module_kind
class QuantizedLinear(nn.Module):
    """y = x·diag(input_scale) · Ŵᵀ + b with Ŵ = (q − z)·s group-wise; q stored as uint8 (INT4: two per byte).

    Buffers: qweight (out, in/2) uint8 for 4 bits [byte j = q[2j] | q[2j+1] << 4], (out, in) uint8 for 8 bits;
    scales (out, in/g) in the model dtype; zeros (out, in/g) uint8; input_scale (in,) only for AWQ layers whose
    scales cannot be folded into a preceding norm; g_idx (in,) int32 only for GPTQ act-order layers without
    static groups: input column j uses scale/zero group g_idx[j] instead of j // g.
    """

    kind = "int"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool = False, has_input_scale: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, backend: str = "auto", has_g_idx: bool = False):
        super().__init__()
        if bits not in INT_BITS:
            raise QuantizationError(f"int: QuantizedLinear stores 4 or 8 bits, got {bits}")
        if backend not in INT_BACKENDS:
            raise QuantizationError(f"int: unknown backend {backend!r}; choose one of {', '.join(INT_BACKENDS)}")
        self.backend = backend
        self._int4mm_cache: tuple | None = None  # (key, tinygemm's packed weight, scales-and-offsets)
        self._columns_cache: tuple | None = None  # (key, the Triton GEMV's `Int4Columns`)
        self._columns_read = False  # a GEMV has read the cached columns: later GEMVs may use PDL (kernels.pdl)
        self._split_k_counters: torch.Tensor | None = None  # this layer's own (never shared with another layer)
        # CUDA: qweight released, the integers live only in the "int4pack" or "columns" layout (one copy)
        self._released: str | None = None
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = in_features // P.resolve_group_size(in_features, group_size)
        packed = in_features // 2 if bits == 4 else in_features
        self.register_buffer("qweight", torch.empty(out_features, packed, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, n_groups, dtype=torch.uint8, device=device))
        if has_input_scale:
            self.register_buffer("input_scale", torch.empty(in_features, dtype=dtype, device=device))
        else:
            self.input_scale = None
        if has_g_idx:
            if group_size == -1:
                raise QuantizationError("int: g_idx needs group-wise scales (group_size != -1); per-channel layers "
                                        "have a single group")
            self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        else:
            self.g_idx = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    # Construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool,
                   weight: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> QuantizedLinear:
        """RTN-quantize `weight` (default: linear.weight), scales in linear's dtype."""
        w = linear.weight if weight is None else weight
        qp = P.compute_qparams(w, bits, group_size, symmetric, scale_dtype=linear.weight.dtype)
        return cls.from_integers(linear, P.quantize_rtn(w, qp), qp, symmetric, input_scale=input_scale)

    @classmethod
    def from_integers(cls, linear: nn.Linear, q: torch.Tensor, qp: P.QParams, symmetric: bool,
                      input_scale: torch.Tensor | None = None) -> QuantizedLinear:
        """Wrap integers q (out, in) uint8 with their qparams (GPTQ and AWQ build their own integers)."""
        dtype, device = linear.weight.dtype, linear.weight.device
        module = cls(linear.in_features, linear.out_features, qp.bits, qp.group_size, symmetric,
                     bias=linear.bias is not None, has_input_scale=input_scale is not None, dtype=dtype,
                     device=device, has_g_idx=qp.g_idx is not None)
        with torch.no_grad():
            module.qweight.copy_(P.pack_int4(q) if qp.bits == 4 else q)
            module.scales.copy_(qp.scale)
            module.zeros.copy_(qp.zero)
            if input_scale is not None:
                module.input_scale.copy_(input_scale)
            if qp.g_idx is not None:
                module.g_idx.copy_(qp.g_idx)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    # Serialization ---------------------------------------------------------------------------------------------
    def layout(self) -> dict:
        out = {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
               "input_scale": self.input_scale is not None}
        if self.g_idx is not None:
            out["g_idx"] = True  # absent in checkpoints written before act-order g_idx existed
        return out

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, layout: dict, dtype: torch.dtype,
              device=None) -> QuantizedLinear:
        return cls(in_features, out_features, layout["bits"], layout["group_size"], layout["symmetric"], bias=bias,
                   has_input_scale=layout["input_scale"], dtype=dtype, device=device,
                   has_g_idx=layout.get("g_idx", False))

    # Compute ------------------------------------------------------------------------------------------------
    def integers(self) -> torch.Tensor:
        """q (out, in) uint8."""
        if self._released == "int4pack":
            return self._integers_from_int4pack()
        if self._released:
            return P.unpack_int4(self._packed_from_layout())
        return P.unpack_int4(self.qweight) if self.bits == 4 else self.qweight

    def qparams(self) -> P.QParams:
        return P.QParams(scale=self.scales, zero=self.zeros, bits=self.bits, group_size=self.group_size,
                         g_idx=self.g_idx)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ (out, in) in `dtype` (default: the scales' dtype)."""
        return P.dequantize(self.integers(), self.qparams(), dtype=dtype or self.scales.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read-only view of what the layer computes with; not a parameter)."""
        return self.dequantize_weight()

    def int4mm_problem(self, device: torch.device) -> str | None:
        """Why torch's INT4 kernels cannot run this layer on `device`, or None if they can."""
        if device.type not in ("cuda", "cpu"):
            return f"torch's INT4 kernels run on CUDA and CPU, not {device.type}"
        if self.g_idx is not None:
            return "int4mm reads contiguous groups; this GPTQ act-order layer has a permuted g_idx"
        if self.bits != 4 or self.group_size not in INT4MM_GROUP_SIZES:
            return f"int4mm needs 4 bits and group_size in {INT4MM_GROUP_SIZES}, this layer has {self.bits} " \
                   f"bits, group_size={self.group_size}"
        if device.type == "cuda" and (self.in_features % 32 or self.out_features % 8):
            return f"int4mm on CUDA needs in_features % 32 == 0 and out_features % 8 == 0, got " \
                   f"{self.in_features}→{self.out_features}"
        if device.type == "cpu" and self.out_features % 16:
            return f"int4mm on CPU needs out_features % 16 == 0, got {self.out_features}"
        return None

    def triton_problem(self, device: torch.device) -> str | None:
        """Why the Triton kernels cannot run this layer on `device`, or None if they can."""
        from moai_lib.kernels.dispatch import _triton_unavailable_reason

        if self.g_idx is not None:
            return "the Triton GEMV reads contiguous groups; this GPTQ act-order layer has a permuted g_idx"
        if self.bits != 4 or self.group_size not in INT4MM_GROUP_SIZES:
            return f"the Triton GEMV needs 4 bits and group_size in {INT4MM_GROUP_SIZES}, this layer has " \
                   f"{self.bits} bits, group_size={self.group_size}"
        return _triton_unavailable_reason(device)

    def resolve_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        """The matmul backend for activations of `dtype` on `device`; an explicit backend that cannot run is
        an error."""
        if self.backend == "dequant":
            return "dequant"
        if self.backend == "triton":
            problem = self.triton_problem(device)
            if problem:
                raise QuantizationError(f"int: backend 'triton' cannot run here: {problem}; use backend='dequant'")
            return "triton"
        problem = self.int4mm_problem(device)
        if self.backend == "int4mm":
            if problem:
                raise QuantizationError(f"int: backend 'int4mm' cannot run here: {problem}; use backend='dequant'")
            return "int4mm"
        return "int4mm" if problem is None and dtype == torch.bfloat16 else "dequant"

    def read_tensors(self) -> list[torch.Tensor]:
        """The tensors a forward reads now (for bandwidth accounting): after a release, the layout that holds the
        integers (tinygemm's packed weight and its bf16 scales-and-offsets, or the GEMV's words, scales and
        zeros) and the bias; otherwise the buffers and the bias."""
        if self._released == "int4pack":
            tensors = list(self._int4mm_cache[1:])
        elif self._released == "columns":
            tensors = list(self._columns_cache[1].tensors())
        else:
            tensors = [t for t in self.buffers(recurse=False) if t is not None]
        return tensors + ([self.bias] if self.bias is not None else [])

    def _int4mm_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed weight, scales-and-offsets (in/g, out, 2) bf16) in the kernel's layout for the buffers'
        device, cached while the buffers are unchanged.

        On CUDA the uint8 `qweight` is then released (replaced by an empty placeholder), so the GPU holds the
        4-bit weight once, in tinygemm's layout; `integers()`, `state_dict()` and moving the module off the GPU
        recover the exact integers from that layout (`_integers_from_int4pack`)."""
        if self._released == "columns":
            self._restore_qweight()
        key = self._cache_key("int4pack")
        if self._int4mm_cache is None or self._int4mm_cache[0] != key:
            if self._released == "int4pack":
                packed = self._int4mm_cache[1]  # the packed weight stays; only the scales and offsets are rebuilt
            elif self.qweight.is_cuda:
                # The CUDA packer reads the even column from the high nibble; ours stores it in the low one.
                swapped = (self.qweight << 4) | (self.qweight >> 4)
                inner_k_tiles = next(t for t in (8, 4, 2) if (self.in_features // 16) % t == 0)
                packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.integers().to(torch.int32), 2)
            scale = self.scales.float()
            offset = (8 - self.zeros.float()) * scale  # (q − z)·s = (q − 8)·s + (8 − z)·s
            scales_and_offsets = torch.stack((scale, offset), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._int4mm_cache = (key, packed, scales_and_offsets)
            if packed.is_cuda and self._released is None:
                self._release_qweight("int4pack")
        return self._int4mm_cache[1], self._int4mm_cache[2]

    def _columns(self):
        """The layer in the Triton GEMV's column-major layout (`triton_gemv.Int4Columns`), cached while the buffers
        are unchanged; on CUDA the uint8 `qweight` is then released, as for "int4mm" (the words are the same
        bytes, transposed: `to_rows` gives them back exactly)."""
        from moai_lib.kernels.triton_gemv import Int4Columns

        if self._released == "int4pack":
            self._restore_qweight()
        key = self._cache_key("columns")
        if self._columns_cache is None or self._columns_cache[0] != key:
            if self._released == "columns":  # the words stay; only the scales and zeros are transposed again
                words = self._columns_cache[1].words
                cols = Int4Columns(words, self.scales.T.contiguous(), self.zeros.T.contiguous(), self.group_size)
            else:
                cols = Int4Columns.from_rows(self.qweight, self.scales, self.zeros, self.group_size)
            self._columns_cache = (key, cols)
            self._columns_read = False
            if cols.words.is_cuda and self._released is None:
                self._release_qweight("columns")
        return self._columns_cache[1]

    def _cache_key(self, layout: str) -> tuple:
        """What a cached kernel layout was built from: the uint8 buffer (device, address, versions) and the scales'
        and zeros' versions; once released into `layout`, the integers cannot change, only the scales and zeros."""
        if self._released == layout:
            return (self._layout_device(), layout, _version(self.scales), _version(self.zeros))
        return (self.qweight.device, self.qweight.data_ptr(), *map(_version, (self.qweight, self.scales, self.zeros)))

    def _layout_device(self) -> torch.device:
        return self._int4mm_cache[1].device if self._released == "int4pack" else self._columns_cache[1].words.device

    def _release_qweight(self, layout: str = "int4pack") -> None:
        """Drop the uint8 `qweight` (an empty placeholder stays registered): from now on the integers live only in
        the cached `layout` ("int4pack": tinygemm's, "columns": the Triton GEMV's). Done automatically on CUDA
        once that layout exists."""
        versions = (_version(self.scales), _version(self.zeros))
        if layout == "int4pack":
            device = self._int4mm_cache[1].device
            self._int4mm_cache = ((device, "int4pack", *versions), *self._int4mm_cache[1:])
        else:
            device = self._columns_cache[1].words.device
            self._columns_cache = ((device, "columns", *versions), self._columns_cache[1])
        self._buffers["qweight"] = torch.empty(0, dtype=torch.uint8, device=device)
        self._released = layout

    def _integers_from_int4pack(self) -> torch.Tensor:
        """q (out, in) uint8 read back from the int4mm layout, exactly: the kernel with scale 1 and offset 8
        computes (q − 8)·1 + 8 = q, and an identity matrix as the input selects each q (small integers, exact in
        bf16 with fp32 accumulation)."""
        packed = self._int4mm_cache[1]
        kernel = torch.ops.aten._weight_int4pack_mm if packed.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        n_groups = self.in_features // self.group_size
        ones = torch.ones(n_groups, self.out_features, 1, dtype=torch.bfloat16, device=packed.device)
        unit = torch.cat((ones, 8 * ones), dim=-1)
        q = torch.empty(self.out_features, self.in_features, dtype=torch.uint8, device=packed.device)
        # Bounded scratch: identity blocks of `block` rows, whose (block, out) bf16 products stay under ~256 MiB.
        block = max(32, min(4096, (2 ** 27 // self.out_features) // 32 * 32))
        for start in range(0, self.in_features, block):
            rows = min(block, self.in_features - start)
            eye = torch.zeros(rows, self.in_features, dtype=torch.bfloat16, device=packed.device)
            idx = torch.arange(rows, device=packed.device)
            eye[idx, start + idx] = 1
            q[:, start:start + rows] = kernel(eye, packed, self.group_size, unit).T.to(torch.uint8)
        return q

    def _packed_from_layout(self) -> torch.Tensor:
        """The uint8 `qweight` (out, in/2), exactly, from the layout it was released into."""
        if self._released == "int4pack":
            return P.pack_int4(self._integers_from_int4pack())
        return self._columns_cache[1].to_rows()

    def _restore_qweight(self) -> None:
        """Bring back the uint8 `qweight` buffer (packed two per byte) from the layout it was released into."""
        if self._released:
            self._buffers["qweight"] = self._packed_from_layout()
            self._released, self._int4mm_cache, self._columns_cache = None, None, None

    def _apply(self, fn, recurse=True):
        self._restore_qweight()  # a device or dtype move works on the plain buffers, as before any forward
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._released:
            destination[prefix + "qweight"] = self._packed_from_layout()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self._released:  # loading replaces the integers: back to a full-size buffer to copy into
            self._buffers["qweight"] = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8,
                                                   device=self._layout_device())
            self._released, self._int4mm_cache, self._columns_cache = None, None, None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out) in x's dtype (see the module docstring for the backends)."""
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        backend = self.resolve_backend(x.device, x.dtype)
        if backend == "triton":
            return self._triton_forward(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if backend == "int4mm":
            packed, scales_and_offsets = self._int4mm_weights()
            kernel = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
            # contiguous: the mixer hands x_proj/out_proj transposed (strided) views, which the kernel rejects.
            y = kernel(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(), packed, self.group_size,
                       scales_and_offsets)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
            return y + bias if bias is not None else y
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The "triton" backend: the GEMV for one row (a batch-1 decode step), else dequantize (one kernel) +
        dense matmul (on the H200 the GEMV's cost grows with each row: from 2 rows on the dense matmul is as fast
        or faster, BENCHMARKS.md)."""
        from moai_lib.kernels import triton_gemv

        cols = self._columns()
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= INT4_GEMV_ROWS:
            # PDL (the launch overlaps the previous kernel) once a first, ordinary launch has read the columns:
            # whatever wrote them has then finished.
            if self._split_k_counters is None or self._split_k_counters.device != x.device:
                self._split_k_counters = triton_gemv.split_k_counters(self.out_features, x.device)
            y = triton_gemv.int4_gemv(x2, cols, self.bias, pdl=self._columns_read, counters=self._split_k_counters)
            self._columns_read = True
        else:
            w_t = triton_gemv.int4_dequantize_t(cols, x.dtype)  # Ŵᵀ (in, out)
            y = F.linear(x2, w_t.T, self.bias.to(x.dtype) if self.bias is not None else None)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {g}, "
                f"symmetric={self.symmetric}, backend={self.backend}"
                + (", input_scale" if self.input_scale is not None else "")
                + (", g_idx" if self.g_idx is not None else ""))


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place version counter; inference tensors (made under `torch.inference_mode`) have none and
    cannot be modified in place outside it, so a constant is exact for them."""
    return -1 if t.is_inference() else t._version


@dataclass
class IntWeightOnlyConfig(QuantConfig):
    """Group-wise round-to-nearest weight-only quantization.

    bits: 4 (packed two per byte) or 8. group_size: 32, 64, 128 input channels per scale, or -1 for one scale
    per output channel. symmetric: zero point fixed at 2^(bits−1) (GPTQ `sym=True`) instead of fitted.
    """

    method = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        check_bits(self, self.bits, INT_BITS)
        check_group_size(self, self.group_size)

    def check_layer(self, fqn: str, linear: nn.Linear) -> None:
        check_group_divides(self, fqn, linear.in_features, self.group_size)


def _apply_rtn(model: nn.Module, config: IntWeightOnlyConfig, targets: dict[str, nn.Linear]) -> dict:
    return {fqn: QuantizedLinear.from_float(lin, config.bits, config.group_size, config.symmetric)
            for fqn, lin in targets.items()}


register_quant_method(IntWeightOnlyConfig, apply=_apply_rtn)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128) -> nn.Module:
    """Compatibility name: group-wise RTN of the default layers (`IntWeightOnlyConfig`), in place."""
    return quantize_(model, IntWeightOnlyConfig(bits=bits, group_size=group_size))
