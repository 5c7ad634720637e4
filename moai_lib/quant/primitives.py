"""Shared quantization math: group-wise qparams, round-to-nearest, int4 packing, GPTQ/AWQ word packing, SQNR.

Conventions (every method in `moai_lib.quant` uses these, so that their integers agree bit for bit):

- A weight W is (out, in) as in `nn.Linear`. Groups run along the input dimension: group k of row o is
  W[o, k·g : (k+1)·g]. `group_size = -1` means one group per row (per-channel).
- Integers are stored unsigned, q ∈ [0, 2^b − 1], with a per-group zero point z ∈ [0, 2^b − 1]:
      q = clamp(round(w / s) + z, 0, 2^b − 1),     ŵ = (q − z) · s
  `torch.round` rounds half to even.
- Asymmetric: the group's range is widened to include 0 (so 0 is exact, as GPTQ does):
      lo = min(min w, 0), hi = max(max w, 0),  s = (hi − lo) / (2^b − 1),  z = clamp(round(−lo / s), 0, 2^b − 1).
- Symmetric: s = 2·max|w| / (2^b − 1), z = 2^(b−1) (GPTQ's `sym=True`; the grid is [−2^(b−1), 2^(b−1) − 1]·s,
  so +max|w| rounds to the top level, losing at most s/2).
- The scale is cast to its storage dtype (`scale_dtype`) *before* the integers are computed, so that
  quantize → store → dequantize reproduces exactly the values the quantizer saw (QAT relies on this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Column order of the 8 nibbles inside an AWQ GEMM int32 word (AutoAWQ `AWQ_ORDER`): nibble i holds column
# AWQ_PACK_ORDER[i] of each block of 8 output columns.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class QParams:
    """Per-group quantization parameters of a weight (out, in).

    scale: (out, n_groups) in the storage dtype. zero: (out, n_groups) uint8. bits, group_size as used.
    g_idx: None for contiguous groups (input column j is in group j // g); else (in,) int32, the group of each
    input column (GPTQ act-order without static groups: groups are contiguous in the permuted order, so
    g_idx[j] = position of j in the permutation // g).
    """

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def resolve_group_size(in_features: int, group_size: int) -> int:
    """The effective group length: `in_features` for per-channel (-1), else `group_size`."""
    return in_features if group_size == -1 else group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) → (out, n_groups, g) view; the caller has checked that g divides in."""
    out, inp = w.shape
    g = resolve_group_size(inp, group_size)
    if inp % g:
        raise ValueError(f"group size {g} does not divide the input width {inp}")
    return w.reshape(out, inp // g, g)


def compute_qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    scale_dtype: torch.dtype | None = None) -> QParams:
    """Round-to-nearest qparams of w (out, in) for `bits`-bit unsigned storage, groups along `in`.

    Min/max are taken in fp32. `scale_dtype` (default: w's dtype) is the dtype the scales are stored in.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    scale_dtype = scale_dtype or w.dtype
    wg = _grouped(w.detach().float(), group_size)
    qmax = (1 << bits) - 1
    if symmetric:
        amax = wg.abs().amax(dim=-1)
        scale = 2 * amax / qmax
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo = wg.amin(dim=-1).clamp(max=0)
        hi = wg.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / qmax
    # An all-zero group has scale 0: any positive scale represents it exactly (q = z).
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    if not symmetric:
        zero = torch.round(-lo / scale.float()).clamp(0, qmax)
    return QParams(scale=scale, zero=zero.to(torch.uint8), bits=bits, group_size=group_size)


def quantize_rtn(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Round-to-nearest integers (out, in) uint8 of w under qp."""
    wg = _grouped(w.detach().float(), qp.group_size)
    q = torch.round(wg / qp.scale.float()[..., None]) + qp.zero.float()[..., None]
    return q.clamp_(0, qp.qmax).to(torch.uint8).reshape(w.shape)


def dequantize(q: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = (q − z) · s for q (out, in) integers; computed in fp32, returned in `dtype`.

    With `qp.g_idx`, column j uses group g_idx[j]: ŵ[:, j] = (q[:, j] − z[:, g_idx[j]]) · s[:, g_idx[j]].
    """
    if qp.g_idx is not None:
        g_idx = qp.g_idx.long()
        return ((q.float() - qp.zero.float()[:, g_idx]) * qp.scale.float()[:, g_idx]).to(dtype)
    qg = _grouped(q.float(), qp.group_size)
    w = (qg - qp.zero.float()[..., None]) * qp.scale.float()[..., None]
    return w.reshape(q.shape).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequantize(quantize_rtn(w)) in w's dtype: the values an RTN-quantized layer computes with (no gradient)."""
    qp = compute_qparams(w, bits, group_size, symmetric, scale_dtype)
    return dequantize(quantize_rtn(w, qp), qp, dtype=w.dtype)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """RTN of one input column w (out,) with that column's group scale/zero (out,): returns ŵ in fp32.

    The same arithmetic as `quantize_rtn` → `dequantize`, one column at a time (GPTQ's inner loop).
    """
    q = (torch.round(w.float() / scale.float()) + zero.float()).clamp_(0, qmax)
    return (q - zero.float()) * scale.float()


# Packing ---------------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit integers per byte along the last dim: byte j = q[..., 2j] | q[..., 2j+1] << 4.

    q: (..., K) integers in [0, 15], K even → (..., K/2) uint8.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (..., K/2) uint8 → (..., K) uint8 in [0, 15]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_int32(q: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack `32 // bits` integers along `dim` into one int32 word: element j of a block goes to bits
    `bits·i` where `order[i] = j` (sequential order when `order` is None: element j at bits `bits·j`).

    q: integers in [0, 2^bits − 1]; the size along `dim` must be a multiple of 32 // bits.
    Returns int32 with that dim divided by 32 // bits (bit patterns ≥ 2^31 wrap to negative, as in GPTQ/AWQ).
    """
    per_word = 32 // bits
    q = q.movedim(dim, -1).to(torch.int64)
    if q.shape[-1] % per_word:
        raise ValueError(f"packing {per_word} values per int32 word needs a multiple of {per_word}, got {q.shape[-1]}")
    order = tuple(range(per_word)) if order is None else order
    blocks = q.reshape(*q.shape[:-1], q.shape[-1] // per_word, per_word)
    word = torch.zeros(blocks.shape[:-1], dtype=torch.int64, device=q.device)
    for i, j in enumerate(order):
        word |= blocks[..., j] << (bits * i)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # reinterpret as signed int32
    return word.to(torch.int32).movedim(-1, dim)


def unpack_int32(words: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words → integers (int32) with `dim` multiplied by 32 // bits."""
    per_word = 32 // bits
    order = tuple(range(per_word)) if order is None else order
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*w.shape, per_word, dtype=torch.int64, device=w.device)
    mask = (1 << bits) - 1
    for i, j in enumerate(order):
        out[..., j] = (w >> (bits * i)) & mask
    return out.reshape(*w.shape[:-1], w.shape[-1] * per_word).to(torch.int32).movedim(-1, dim)


# Metrics ---------------------------------------------------------------------------------------------------
def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖x‖² / ‖x − x̂‖²) (inf when equal)."""
    x = reference.detach().double()
    err = (x - approx.detach().double()).pow(2).sum()
    if err == 0:
        return float("inf")
    return float(10 * torch.log10(x.pow(2).sum() / err))
