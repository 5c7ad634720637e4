"""Weight-only GEMV / skinny GEMM for decoding (M = 1..16 rows): y = x · Ŵᵀ (+ b), Ŵ dequantized in registers.

Two weight formats, exactly the storage of `moai_lib.quant`:
- INT4 (`QuantizedLinear`, bits=4): `qweight` (N, K/2) uint8, byte j = q[2j] | q[2j+1] << 4; `scales` (N, K/g)
  and `zeros` (N, K/g) uint8; Ŵ = (q − z)·s per group of g input columns (symmetric layers store z = 8).
- FP8 E4M3 (`Float8Linear`): `qweight` (N, K) uint8 holding E4M3 bits, `weight_scale` (N, 1) fp32; Ŵ = e4m3·s.
  Weight-only: the activations stay in bf16/fp16 (no per-token FP8 quantization), accumulation in fp32.

Why a GEMV: at batch 1 a linear layer is a pure weight stream (2·N·K flops over N·K/2 bytes at INT4: 4 flop/B,
while the H200 offers ~240 flop/B). torch's tinygemm (`_weight_int4pack_mm`) is an MMA kernel tiled for M ≥ 16
and measured 3.6× above its weight-read floor in the decode step (BENCHMARKS.md §5). Here each program owns
BLOCK_N output rows × a slice of K (split-K when N alone gives too few programs for 132 SMs; the SPLIT_K fp32
partials are summed by a second small kernel, deterministic, no atomics), streams the packed weight in
(BLOCK_N, BLOCK_K) tiles with 16-byte vector loads (INT4: int32 words of 8 nibbles), loads each group's
scale/zero once per tile, dequantizes and multiplies every row of x against the same registers.

Dequantization without int→float conversions (quarter-rate on the GPU): nibble i of a word is shifted to the top of
the mantissa of 1.0, read as fp32 f = 1 + q/16 exactly, and one FMA with per-group constants gives f·16s − (16 +
z)·s = (q − z)·s, every step exact in fp32 for bf16/fp16 scales: the same values as `primitives.dequantize`, so
kernel and reference differ only in summation order. The 8 nibbles of a word are interleaved back into column order
by `tl.join` (in registers) so that x is read contiguously. FP8 uses the hardware E4M3 → fp32 conversion (sm_89+).

Napkin math (H200, ~3.3 TB/s achievable of 4 TB/s copy; `2b` preset: d=2048, E=4096, I=6144, 24 layers):
- INT4 g128 bytes per weight: 0.5 (nibble) + (2 B bf16 scale + 1 B zero)/128 = 0.523 B; FP8: 1 + 4/K B.
- Per layer N×K: in_proj 8192×2048 (8.8 MB INT4 → 2.7 µs), x_proj 160×4096 (0.34 MB → 0.1 µs), out_proj
  2048×4096 (4.4 MB → 1.3 µs), fc1 12288×2048 (13.2 MB → 4.0 µs), fc2 2048×6144 (6.6 MB → 2.0 µs): 33.3 MB,
  10.1 µs per layer, 0.24 ms for 24 layers (FP8: 63.6 MB, 0.46 ms; bf16: 127 MB, 0.92 ms). The bf16 LM head
  (2048×128K, 0.52 GB) adds 0.16 ms to every variant.
- Work per weight at M=1: 2 integer ops + 1 FMA (dequant) + 1 FMA per row of x (+ the bf16 → fp32 of x); streaming
  0.52 B/weight at 3.3 TB/s is ~24 weights per SM per clock (132 SMs, 1.98 GHz): ~100 of the 128 instructions an
  SM issues per clock, so the instruction count, not only the bytes, sets the pace (the sweep's job).
  At M=16 the FMAs (16 per weight, 384 per SM-clock at that rate) make it compute-bound near ~3× the read floor,
  still below a bf16 read of the same layer.

Entry points: `int4_gemv`, `fp8_gemv` (x (M, K), M ≤ `GEMV_MAX_ROWS`), `int4_dequantize` (the whole Ŵ in one
kernel, for prefill-sized M that then runs a dense matmul) and their fp32 references `*_ref`. Launch shapes come
from `default_config` unless a `GemvConfig` is given (the benchmark sweeps them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_scan import _on_device

GEMV_MAX_ROWS = 16  # rows of x (tokens) up to which the GEMV kernels apply; above, a dequantize + dense matmul
INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape. block_n: output rows per program; block_k: input columns per tile (a power of two; for INT4
    a multiple or divisor of the group size); split_k: programs along K (> 1 adds the partial-sum kernel);
    num_warps: warps per program; int4_layout: how the 8 nibbles of a word meet their x values (both exact);
    prefetch: double-buffer the weight tiles in registers."""

    block_n: int = 16
    block_k: int = 512
    split_k: int = 1
    num_warps: int = 4
    int4_layout: str = "join"  # INT4: "join" (nibbles interleaved in registers) or "planes" (x read at stride 8)
    prefetch: bool = True  # load tile k+1 before using tile k (Triton pipelines only loads that feed tl.dot)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # Triton's interpreter on the CPU: mirror an H200 so the same split-K choices are exercised


def default_config(kind: str, m: int, n: int, k: int, device: torch.device) -> GemvConfig:
    """Launch shape for `kind` ("int4" or "fp8") at x (m, k) → (m, n): tiles of 16 rows × 512 (INT4) or 256 (FP8)
    columns (4 KiB of weight per program and iteration, 32 B per thread at 4 warps), split along K until there
    are ~4 programs per SM (enough loads in flight per SM to cover HBM latency)."""
    block_n = 16
    block_k = min(512 if kind == "int4" else 256, max(32, triton.next_power_of_2(k)))
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k_for(n, k, block_n, block_k, device),
                      num_warps=4)


def split_k_for(n: int, k: int, block_n: int, block_k: int, device: torch.device, per_sm: int = 4) -> int:
    """Programs along K so that there are ~`per_sm` programs per SM (1 when N alone gives that many)."""
    k_tiles = triton.cdiv(k, block_k)
    split = max(1, min(k_tiles, round(per_sm * _sm_count(device) / triton.cdiv(n, block_n))))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))  # no empty split


# ---------------------------------------------------------------------------------------------------------
# INT4


@triton.jit
def _nibble(words, SHIFT: tl.constexpr, a, b):
    """(q − z)·s in fp32 for the nibble q at bit SHIFT of each int32 word, given a = 16·s and b = −(16 + z)·s.

    q goes to the top of the fp32 mantissa of 1.0: f = 1 + q/16 exactly (a shift and one AND-OR), and
    f·a + b = (16 + q)·s − (16 + z)·s = (q − z)·s. With bf16/fp16 scales every intermediate is exact in fp32
    (≤ 16 significant bits), so this is bit for bit `primitives.dequantize`, with one FMA per weight."""
    if SHIFT <= 19:
        bits = words << (19 - SHIFT)
    else:
        bits = words >> (SHIFT - 19)
    f = ((bits & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
    return f * a + b


@triton.jit
def _scale_terms(s, z):
    """(a, b) = (16·s, −(16 + z)·s) (BLOCK_N, GPT, 1) fp32 from a tile's scales and zeros (BLOCK_N, GPT)."""
    s = s.to(tl.float32)
    return (16.0 * s)[:, :, None], (-(z.to(tl.float32) + 16.0) * s)[:, :, None]


@triton.jit
def _load_x(ptrs, mask, EVEN_K: tl.constexpr):
    """x values in fp32; masked (zero past K) only when K is not a multiple of the tile."""
    if EVEN_K:
        return tl.load(ptrs).to(tl.float32)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _int4_load(w_ptr, s_ptr, z_ptr, rows, row_mask, kt, K, n_groups, s_wn, s_sn, s_zn,
               GROUP: tl.constexpr, BLOCK_K: tl.constexpr, GS: tl.constexpr, GPT: tl.constexpr,
               EVEN_K: tl.constexpr):
    """The packed tile of columns kt·BLOCK_K : (kt+1)·BLOCK_K, as loaded: words (BLOCK_N, GPT, GS/8) int32, scales
    and zeros (BLOCK_N, GPT) in their storage dtypes; GPT groups (or part of one) of GS columns; zeros where masked
    (a row_mask of all False loads nothing)."""
    g = tl.arange(0, GPT)
    wi = tl.arange(0, GS // 8)
    word = kt * (BLOCK_K // 8) + g[:, None] * (GS // 8) + wi[None, :]  # (GPT, GW) word index along the row
    if EVEN_K:  # no column mask: a mask constant along the row keeps the loads 16-byte vectors
        mask = row_mask[:, None, None]
    else:
        mask = row_mask[:, None, None] & (word < K // 8)[None, :, :]
    words = tl.load(w_ptr + rows[:, None, None] * s_wn + word[None, :, :], mask=mask, other=0)
    grp = (kt * BLOCK_K + g * GS) // GROUP  # (GPT,)
    gmask = row_mask[:, None] & (grp < n_groups)[None, :]
    s = tl.load(s_ptr + rows[:, None] * s_sn + grp[None, :], mask=gmask, other=0.0)
    z = tl.load(z_ptr + rows[:, None] * s_zn + grp[None, :], mask=gmask, other=0)
    return words, s, z


@triton.jit
def _int4_tile(words, s, z, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized tile (BLOCK_N, BLOCK_K) fp32 in column order from `_int4_load`'s words, scales and zeros."""
    a, b = _scale_terms(s, z)
    # Nibble i of word w is column 8w + i: join the eight (BLOCK_N, GPT, GW) planes so that the flattened
    # (…, 2, 2, 2) index 4a + 2b + c is nibble 4a + 2b + c (the outermost join's operand is the last index).
    lo = tl.join(tl.join(_nibble(words, 0, a, b), _nibble(words, 16, a, b)),
                 tl.join(_nibble(words, 8, a, b), _nibble(words, 24, a, b)))
    hi = tl.join(tl.join(_nibble(words, 4, a, b), _nibble(words, 20, a, b)),
                 tl.join(_nibble(words, 12, a, b), _nibble(words, 28, a, b)))
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, n_groups, tiles_per_split, s_xm, s_wn, s_sn, s_zn, s_om, s_os,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, JOIN: tl.constexpr, EVEN_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GS: tl.constexpr, GPT: tl.constexpr,
):
    # x: (M, K); w: (N, K/8) int32 words; s, z: (N, K/g); out: (M, N), or (SPLIT_K, M, N) fp32 partials.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    m_idx = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # rows first: the layout of the tile's row sums
    # (GPT, GW): the column of nibble 0 of each word in the tile (the "planes" layout reads x at +0..7 from it)
    col8 = tl.arange(0, GPT)[:, None] * GS + 8 * tl.arange(0, GS // 8)[None, :]
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    if PREFETCH:  # registers double-buffer the weight stream: tile kt+1 is in flight while tile kt is used
        words, s, z = _int4_load(w_ptr, s_ptr, z_ptr, rows, row_mask, first, K, n_groups, s_wn, s_sn, s_zn,
                                 GROUP, BLOCK_K, GS, GPT, EVEN_K)
    for kt in range(first, last):
        if PREFETCH:
            next_mask = rows < tl.where(kt + 1 < last, N, 0)  # past the split's last tile: load nothing
            next_words, next_s, next_z = _int4_load(w_ptr, s_ptr, z_ptr, rows, next_mask, kt + 1, K, n_groups,
                                                    s_wn, s_sn, s_zn, GROUP, BLOCK_K, GS, GPT, EVEN_K)
        else:
            words, s, z = _int4_load(w_ptr, s_ptr, z_ptr, rows, row_mask, kt, K, n_groups, s_wn, s_sn, s_zn,
                                     GROUP, BLOCK_K, GS, GPT, EVEN_K)
        if JOIN:  # dequantize into column order, read x contiguously
            w = _int4_tile(words, s, z, BLOCK_N, BLOCK_K)
            k = kt * BLOCK_K + cols
            for m in tl.static_range(BLOCK_M):
                # Rows of the power-of-two BLOCK_M beyond M re-read row M − 1; the store drops them.
                x = _load_x(x_ptr + tl.minimum(m, M - 1) * s_xm + k, k < K, EVEN_K)
                part = tl.sum(w * x[None, :], axis=1)  # (BLOCK_N,)
                acc += tl.where(m_idx[None, :] == m, part[:, None], 0.0)
        else:  # eight nibble planes, each against x at stride 8 (no in-register interleave)
            a, b = _scale_terms(s, z)
            p0 = _nibble(words, 0, a, b)
            p1 = _nibble(words, 4, a, b)
            p2 = _nibble(words, 8, a, b)
            p3 = _nibble(words, 12, a, b)
            p4 = _nibble(words, 16, a, b)
            p5 = _nibble(words, 20, a, b)
            p6 = _nibble(words, 24, a, b)
            p7 = _nibble(words, 28, a, b)
            k = kt * BLOCK_K + col8
            for m in tl.static_range(BLOCK_M):
                xp = x_ptr + tl.minimum(m, M - 1) * s_xm + k
                msk = k < K
                prod = p0 * _load_x(xp, msk, EVEN_K)[None]
                prod += p1 * _load_x(xp + 1, msk, EVEN_K)[None]
                prod += p2 * _load_x(xp + 2, msk, EVEN_K)[None]
                prod += p3 * _load_x(xp + 3, msk, EVEN_K)[None]
                prod += p4 * _load_x(xp + 4, msk, EVEN_K)[None]
                prod += p5 * _load_x(xp + 5, msk, EVEN_K)[None]
                prod += p6 * _load_x(xp + 6, msk, EVEN_K)[None]
                prod += p7 * _load_x(xp + 7, msk, EVEN_K)[None]
                part = tl.sum(tl.sum(prod, axis=2), axis=1)
                acc += tl.where(m_idx[None, :] == m, part[:, None], 0.0)
        if PREFETCH:
            words, s, z = next_words, next_s, next_z
    _store(acc, b_ptr, out_ptr, rows, row_mask, m_idx, M, pid_k, s_om, s_os, HAS_BIAS, PARTIAL)


@triton.jit
def _store(acc, b_ptr, out_ptr, rows, row_mask, m_idx, M, pid_k, s_om, s_os,
           HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    # acc: (BLOCK_N, BLOCK_M) → out[m, rows] (or the split's partials).
    mask = row_mask[:, None] & (m_idx[None, :] < M)
    if PARTIAL:
        tl.store(out_ptr + pid_k * s_os + m_idx[None, :] * s_om + rows[:, None], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + m_idx[None, :] * s_om + rows[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_sum_kernel(part_ptr, b_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK: tl.constexpr):
    # part: (SPLIT_K, M, N) fp32 contiguous; out: (M, N) contiguous.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, n_groups, s_wn, s_sn, s_zn, s_on,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GS: tl.constexpr,
                         GPT: tl.constexpr, EVEN_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    kt = tl.program_id(1)
    words, s, z = _int4_load(w_ptr, s_ptr, z_ptr, rows, row_mask, kt, K, n_groups, s_wn, s_sn, s_zn,
                             GROUP, BLOCK_K, GS, GPT, EVEN_K)
    w = _int4_tile(words, s, z, BLOCK_N, BLOCK_K)
    k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * s_on + k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (k < K)[None, :])


def _check_int4(qweight, scales, zeros, group_size: int, block_k: int, layout: str = "join") -> tuple[int, int]:
    n, half_k = qweight.shape
    k = 2 * half_k
    if qweight.dtype != torch.uint8 or group_size not in INT4_GROUP_SIZES or k % group_size:
        raise ValueError(f"int4 GEMV: needs uint8 (N, K/2) packed weights and a group size in {INT4_GROUP_SIZES} "
                         f"dividing K; got {qweight.dtype} {tuple(qweight.shape)}, group_size={group_size}")
    if scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"int4 GEMV: scales/zeros must be (N, K/g) = {(n, k // group_size)}, got "
                         f"{tuple(scales.shape)} / {tuple(zeros.shape)}")
    if block_k & (block_k - 1) or block_k < 8 or layout not in ("join", "planes"):
        raise ValueError(f"int4 GEMV: block_k must be a power of two ≥ 8 and the layout 'join' or 'planes', got "
                         f"{block_k}, {layout!r}")
    return n, k


def _words(qweight: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 → (N, K/8) int32 view (little-endian: nibble i of word w is column 8w + i)."""
    return qweight.contiguous().view(torch.int32)


def _finish(partial: torch.Tensor | None, out: torch.Tensor, bias: torch.Tensor | None, split_k: int) -> None:
    if partial is None:
        return
    mn, n = out.numel(), out.shape[1]
    block = 1024
    _split_k_sum_kernel[(triton.cdiv(mn, block),)](
        partial, bias if bias is not None else out, out, mn, n,
        SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """y = x · Ŵᵀ + bias, Ŵ = (q − z)·s: x (M, K) with M ≤ GEMV_MAX_ROWS, qweight (N, K/2) uint8, scales
    (N, K/g), zeros (N, K/g) uint8, bias (N,) or None → y (M, N) in x's dtype (fp32 accumulation)."""
    m = x.shape[0]
    cfg = config or default_config("int4", m, qweight.shape[0], 2 * qweight.shape[1], x.device)
    n, k = _check_int4(qweight, scales, zeros, group_size, cfg.block_k, cfg.int4_layout)
    if x.dim() != 2 or x.shape[1] != k or not 1 <= m <= GEMV_MAX_ROWS:
        raise ValueError(f"int4 GEMV: x must be (M ≤ {GEMV_MAX_ROWS}, {k}), got {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    gs = min(group_size, cfg.block_k)
    k_tiles = triton.cdiv(k, cfg.block_k)
    tiles_per_split = triton.cdiv(k_tiles, cfg.split_k)
    split_k = triton.cdiv(k_tiles, tiles_per_split)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    partial = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32) if split_k > 1 else None
    target = partial if partial is not None else out
    with _on_device(x):
        _int4_gemv_kernel[(triton.cdiv(n, cfg.block_n), split_k)](
            x, _words(qweight), scales, zeros, bias if bias is not None else out, target,
            m, n, k, k // group_size, tiles_per_split, x.stride(0), k // 8, scales.stride(0), zeros.stride(0),
            n, m * n,
            GROUP=group_size, HAS_BIAS=bias is not None and partial is None, PARTIAL=partial is not None,
            JOIN=cfg.int4_layout == "join", EVEN_K=k % cfg.block_k == 0, PREFETCH=cfg.prefetch,
            BLOCK_M=triton.next_power_of_2(m),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GS=gs, GPT=cfg.block_k // gs, num_warps=cfg.num_warps)
        _finish(partial, out, bias, split_k)
    return out


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Ŵ (N, K) in `dtype`, computed in fp32 exactly as `primitives.dequantize`, in one kernel (prefill-sized
    inputs then run a dense matmul: tinygemm's layout is not kept alongside ours)."""
    block_n, block_k = 32, 128
    n, k = _check_int4(qweight, scales, zeros, group_size, block_k)
    gs = min(group_size, block_k)
    out = torch.empty(n, k, device=qweight.device, dtype=dtype)
    with _on_device(qweight):
        _int4_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            _words(qweight), scales, zeros, out, n, k, k // group_size, k // 8, scales.stride(0), zeros.stride(0),
            k, GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k, GS=gs, GPT=block_k // gs, EVEN_K=k % block_k == 0,
            num_warps=4)
    return out


def int4_gemv_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The spec: fp32 matmul with the `primitives.dequantize` weight, fp32 result."""
    lo, hi = qweight & 0x0F, qweight >> 4
    q = torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], -1).float()
    n, k = q.shape
    w = (q.reshape(n, k // group_size, group_size) - zeros.float()[..., None]) * scales.float()[..., None]
    y = x.float() @ w.reshape(n, k).T
    return y + bias.float() if bias is not None else y


# ---------------------------------------------------------------------------------------------------------
# FP8 E4M3


@triton.jit
def _fp8_load(w_ptr, rows, row_mask, kt, K, s_wn, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """E4M3 bits (BLOCK_N, BLOCK_K) uint8 of columns kt·BLOCK_K : (kt+1)·BLOCK_K; zeros where masked."""
    k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    wp = w_ptr + rows[:, None] * s_wn + k[None, :]
    if EVEN_K:  # a mask constant along the row keeps the loads 16-byte vectors
        return tl.load(wp, mask=row_mask[:, None], other=0)
    else:
        return tl.load(wp, mask=row_mask[:, None] & (k < K)[None, :], other=0)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,
    M, N, K, tiles_per_split, s_xm, s_wn, s_om, s_os,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # x: (M, K); w: (N, K) uint8 E4M3 bits; ws: (N,) fp32 row scales; out as in the INT4 kernel.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    m_idx = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # rows first: the layout of the tile's row sums
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    if PREFETCH:
        bits = _fp8_load(w_ptr, rows, row_mask, first, K, s_wn, BLOCK_K, EVEN_K)
    for kt in range(first, last):
        if PREFETCH:
            next_mask = rows < tl.where(kt + 1 < last, N, 0)
            next_bits = _fp8_load(w_ptr, rows, next_mask, kt + 1, K, s_wn, BLOCK_K, EVEN_K)
        else:
            bits = _fp8_load(w_ptr, rows, row_mask, kt, K, s_wn, BLOCK_K, EVEN_K)
        w = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        k = kt * BLOCK_K + cols
        for m in tl.static_range(BLOCK_M):
            x = _load_x(x_ptr + tl.minimum(m, M - 1) * s_xm + k, k < K, EVEN_K)
            part = tl.sum(w * x[None, :], axis=1)
            acc += tl.where(m_idx[None, :] == m, part[:, None], 0.0)
        if PREFETCH:
            bits = next_bits
    # The row scale is applied once per output (scale · Σ e4m3·x), including to split-K partials (linear).
    acc *= tl.load(ws_ptr + rows, mask=row_mask, other=0.0)[:, None]
    _store(acc, b_ptr, out_ptr, rows, row_mask, m_idx, M, pid_k, s_om, s_os, HAS_BIAS, PARTIAL)


def fp8_gemv(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: GemvConfig | None = None) -> torch.Tensor:
    """y = x · (e4m3(qweight) · weight_scale)ᵀ + bias: x (M, K) with M ≤ GEMV_MAX_ROWS, qweight (N, K) uint8 E4M3
    bits, weight_scale (N, 1) or (N,) fp32, bias (N,) or None → y (M, N) in x's dtype (fp32 accumulation)."""
    n, k = qweight.shape
    m = x.shape[0]
    if qweight.dtype != torch.uint8 or weight_scale.numel() != n:
        raise ValueError(f"fp8 GEMV: needs (N, K) uint8 E4M3 bits and N row scales, got {qweight.dtype} "
                         f"{tuple(qweight.shape)} and {weight_scale.numel()} scales")
    if x.dim() != 2 or x.shape[1] != k or not 1 <= m <= GEMV_MAX_ROWS:
        raise ValueError(f"fp8 GEMV: x must be (M ≤ {GEMV_MAX_ROWS}, {k}), got {tuple(x.shape)}")
    cfg = config or default_config("fp8", m, n, k, x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    qweight = qweight.contiguous()
    k_tiles = triton.cdiv(k, cfg.block_k)
    tiles_per_split = triton.cdiv(k_tiles, cfg.split_k)
    split_k = triton.cdiv(k_tiles, tiles_per_split)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    partial = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32) if split_k > 1 else None
    with _on_device(x):
        _fp8_gemv_kernel[(triton.cdiv(n, cfg.block_n), split_k)](
            x, qweight, weight_scale.reshape(n).float(), bias if bias is not None else out,
            partial if partial is not None else out,
            m, n, k, tiles_per_split, x.stride(0), k, n, m * n,
            HAS_BIAS=bias is not None and partial is None, PARTIAL=partial is not None, EVEN_K=k % cfg.block_k == 0,
            PREFETCH=cfg.prefetch, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps)
        _finish(partial, out, bias, split_k)
    return out


def fp8_gemv_ref(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """The spec: fp32 matmul with Ŵ = e4m3 · scale (as `Float8Linear.weight`), fp32 result."""
    w = qweight.view(torch.float8_e4m3fn).float() * weight_scale.reshape(-1, 1).float()
    y = x.float() @ w.T
    return y + bias.float() if bias is not None else y
