"""Weight-only GEMV / skinny GEMM for decoding (M = 1..16 rows): y = x · Ŵᵀ (+ b), Ŵ dequantized in registers.

Two weight formats:
- INT4 (`QuantizedLinear`, bits=4), in the GEMV's column-major layout `Int4Columns` built from the stored one:
  `words` (K/8, N) int32 (word w of column n holds the nibbles of input columns 8w..8w+7, nibble i = column
  8w + i: the stored `qweight` (N, K/2) uint8 bytes, transposed), `scales` (K/g, N), `zeros` (K/g, N) uint8;
  Ŵ = (q − z)·s per group of g input columns (symmetric layers store z = 8). `QuantizedLinear` keeps this layout
  instead of `qweight` on the GPU (one copy; `Int4Columns.to_rows` gives the bytes back exactly).
- FP8 E4M3 (`Float8Linear`): `qweight` (N, K) uint8 holding E4M3 bits, `weight_scale` (N, 1) fp32; Ŵ = e4m3·s.
  Weight-only: the activations stay in bf16/fp16 (no per-token FP8 quantization), accumulation in fp32.

Why a GEMV: at batch 1 a linear layer is a pure weight stream (2·N·K flops over N·K/2 bytes at INT4: 4 flop/B,
while the H200 offers ~240 flop/B). torch's tinygemm (`_weight_int4pack_mm`) is an MMA kernel tiled for M ≥ 16.

INT4 kernel: each program owns BLOCK_N output columns × a slice of K and streams (GPT groups × BLOCK_N) tiles of
words as 16-byte vectors along N, so that every x value a thread loads serves the 4 columns of its vector.
Dequantization without int→float conversions (quarter-rate on the GPU): nibble i of a word is shifted to the top
of the mantissa of 1.0 and read as fp32 f = 1 + q/16, exactly; the group's scale comes after the dot product:
Σ (q − z)·s·x = 16s·Σ f·x − (16 + z)·s·Σ x, so a weight costs a shift, an AND-OR and one FMA, and each word of 8
two more FMAs. FP8 uses the hardware E4M3 → fp32 conversion (sm_89+) in row-major (BLOCK_N rows, BLOCK_K) tiles.

Split-K (when N alone gives too few programs for 132 SMs) without a second kernel: every program stores its fp32
partial sums, and the last program of a column block to arrive (an atomic counter per block, reset by that
program) adds them in split order and writes the output: deterministic, one launch. With `pdl=True` (on sm_90+,
`kernels.pdl`) the launch may overlap the previous kernel: the first weight tile is loaded before `gdc_wait`.

Measured (H200, BENCHMARKS.md §5; each call reading its weights from HBM): at 1 row the INT4 GEMV runs the 2b
preset's layers in 1.04–1.15× tinygemm's time (in_proj 2048→8192: 7.9 µs vs 7.4, 1.1 TB/s against a 2.2 µs read
floor): small matrices are latency-bound (first-load latency, ramp, the split-K fix-up), and at 3 instructions per
weight the issue rate is the next limit (the LM head, 137 MB, streams at 1.8 TB/s where FP8 reaches 3.5). Several
rows per pass are slower still (each row re-dequantizes; `QuantizedLinear` runs dequantize + matmul from 2 rows).

Napkin math (`2b` preset: d=2048, E=4096, I=6144, 24 layers): INT4 g128 bytes per weight 0.5 + 3/128; per layer
in_proj 8.8 MB, x_proj 0.34, out_proj 4.4, fc1 13.2, fc2 6.6: 33.3 MB, 10.1 µs at 3.3 TB/s, 0.24 ms for 24 layers
(FP8: 0.46 ms; bf16: 0.92 ms); the bf16 LM head (0.52 GB) adds 0.16 ms to every variant.

Entry points: `int4_gemv(x, Int4Columns, ...)`, `fp8_gemv` (x (M, K), M ≤ `GEMV_MAX_ROWS`),
`int4_dequantize_t` (Ŵᵀ in one kernel, for inputs that then run a dense matmul) and the fp32 references
`*_ref`. Launch shapes come from `default_config` unless a `GemvConfig` is given (the benchmark sweeps them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch_dependents, gdc_wait, launch_kwargs, pdl_capable
from .triton_scan import _on_device

GEMV_MAX_ROWS = 16  # rows of x (tokens) up to which the GEMV kernels apply; above, a dequantize + dense matmul
INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape. block_n: output columns per program; block_k: input columns per tile (a power of two; for
    INT4 a multiple of the group size); split_k: programs along K (> 1: partial sums added by the last program
    of each column block); num_warps: warps per program; prefetch: double-buffer the weight tiles in registers."""

    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    prefetch: bool = True  # load tile k+1 before using tile k (Triton pipelines only loads that feed tl.dot)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # Triton's interpreter on the CPU: mirror an H200 so the same split-K choices are exercised


def use_pdl(device: torch.device, pdl: bool) -> bool:
    """Whether to launch a GEMV with programmatic dependent launch (`kernels.pdl`): asked for, and supported on
    `device`. The launch may then begin while the previous kernel on the stream is still running: the GEMV loads
    its first weight tile, then waits for that kernel (`gdc_wait`) before it reads x or writes anything. So the
    weights must not have been written by a kernel still running: a layer asks for it only once an earlier call
    has read its current weights."""
    return bool(pdl) and pdl_capable(device)


def default_config(kind: str, m: int, n: int, k: int, device: torch.device, group_size: int = 128) -> GemvConfig:
    """Launch shape for `kind` ("int4" or "fp8") at x (m, k) → (m, n). INT4: 64 columns (32 for N ≤ 256) × 512
    input columns per tile (16 KiB of words, 16-byte vectors along N), split along K until there are ~2 programs
    per SM: within a few % of the best of a 20-shape sweep on each of the 2b preset's layers (H200, weights read
    from HBM, BENCHMARKS.md). FP8: 16 rows × 256 columns, ~4 programs per SM."""
    if kind == "int4":
        block_n = 64 if n > 256 else 32
        block_k = max(group_size, min(512, triton.next_power_of_2(k)))
        return GemvConfig(block_n=block_n, block_k=block_k,
                          split_k=split_k_for(n, k, block_n, block_k, device, per_sm=2), num_warps=4)
    block_n, block_k = 16, min(256, max(32, triton.next_power_of_2(k)))
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k_for(n, k, block_n, block_k, device),
                      num_warps=4)


def split_k_for(n: int, k: int, block_n: int, block_k: int, device: torch.device, per_sm: int = 4) -> int:
    """Programs along K so that there are ~`per_sm` programs per SM (1 when N alone gives that many)."""
    k_tiles = triton.cdiv(k, block_k)
    split = max(1, min(k_tiles, round(per_sm * _sm_count(device) / triton.cdiv(n, block_n))))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))  # no empty split


# ---------------------------------------------------------------------------------------------------------
# Shared


@triton.jit
def _load_x(ptrs, mask, EVEN_K: tl.constexpr):
    """x values in fp32; masked (zero past K) only when K is not a multiple of the tile."""
    if EVEN_K:
        return tl.load(ptrs).to(tl.float32)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _write_out(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, cols, col_mask, m_idx, M, N, pid_n, pid_k, n_splits, s_om,
               HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """out[m, cols] = acc (BLOCK_M, BLOCK_N) (+ bias), or with split-K, without a second kernel: every program
    stores its fp32 partial sums in `part` (n_splits, M, N); the last of a column block's programs to arrive (a
    counter per block in `cnt`, zero between launches: it resets its own) adds them in split order, so the
    result does not depend on the programs' timing."""
    mask = (m_idx[:, None] < M) & col_mask[None, :]
    if SPLIT:
        offs = m_idx[:, None] * N + cols[None, :]
        tl.store(part_ptr + pid_k * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # all of this program's partials are written before its arrival is counted
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == n_splits - 1:
            acc = tl.zeros(acc.shape, dtype=tl.float32)
            for sk in range(0, n_splits):
                acc += tl.load(part_ptr + sk * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + m_idx[:, None] * s_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m_idx[:, None] * s_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# INT4


@triton.jit
def _plane(words, SHIFT: tl.constexpr):
    """f = 1 + q/16 in fp32 for the nibble q at bit SHIFT of each int32 word: q goes to the top four bits of the
    mantissa of 1.0 (one shift and one AND-OR), exactly."""
    if SHIFT <= 19:
        bits = words << (19 - SHIFT)
    else:
        bits = words >> (SHIFT - 19)
    return ((bits & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _int4_words(w_ptr, s_ptr, z_ptr, cols, col_mask, kt, N, n_groups, GROUP: tl.constexpr, GPT: tl.constexpr,
                EVEN_K: tl.constexpr):
    """Tile kt (GPT groups of GROUP input columns) as loaded: words (GPT, GROUP/8, BLOCK_N) int32 of the
    column-major word matrix (K/8, N), scales and zeros (GPT, BLOCK_N), the word rows (GPT, GROUP/8) and the
    group mask (GPT,); zeros where masked."""
    g = kt * GPT + tl.arange(0, GPT)
    wr = g[:, None] * (GROUP // 8) + tl.arange(0, GROUP // 8)[None, :]
    if EVEN_K:  # no group mask: the loads stay 16-byte vectors along N
        gmask = g >= 0
        wmask = col_mask[None, None, :]
    else:
        gmask = g < n_groups
        wmask = col_mask[None, None, :] & gmask[:, None, None]
    words = tl.load(w_ptr + wr[:, :, None] * N + cols[None, None, :], mask=wmask, other=0)
    smask = gmask[:, None] & col_mask[None, :]
    s = tl.load(s_ptr + g[:, None] * N + cols[None, :], mask=smask, other=0.0)
    z = tl.load(z_ptr + g[:, None] * N + cols[None, :], mask=smask, other=0)
    return words, s, z, wr, gmask


@triton.jit
def _int4_tile_dot(words, s, z, wr, gmask, x_row_ptr):
    """Σ over the tile's input columns of Ŵ·x for one row of x, as (GPT, GROUP/8, BLOCK_N) fp32 word partials,
    with the group's scale applied after the dot product: per word, c = Σ_i f_i·x_i with f_i = 1 + q_i/16
    (`_plane`), and Σ_i (q_i − z)·s·x_i = 16s·c − (16 + z)·s·Σ_i x_i. Three instructions per weight (shift,
    AND-OR, FMA) and two FMAs per word of eight."""
    xp = x_row_ptr + wr * 8  # (GPT, GROUP/8): x of nibble 0 of each word row
    m = gmask[:, None]
    x0 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    x1 = tl.load(xp + 1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + 2, mask=m, other=0.0).to(tl.float32)
    x3 = tl.load(xp + 3, mask=m, other=0.0).to(tl.float32)
    x4 = tl.load(xp + 4, mask=m, other=0.0).to(tl.float32)
    x5 = tl.load(xp + 5, mask=m, other=0.0).to(tl.float32)
    x6 = tl.load(xp + 6, mask=m, other=0.0).to(tl.float32)
    x7 = tl.load(xp + 7, mask=m, other=0.0).to(tl.float32)
    c = _plane(words, 0) * x0[:, :, None]
    c += _plane(words, 4) * x1[:, :, None]
    c += _plane(words, 8) * x2[:, :, None]
    c += _plane(words, 12) * x3[:, :, None]
    c += _plane(words, 16) * x4[:, :, None]
    c += _plane(words, 20) * x5[:, :, None]
    c += _plane(words, 24) * x6[:, :, None]
    c += _plane(words, 28) * x7[:, :, None]
    xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    s = s.to(tl.float32)
    a = (16.0 * s)[:, None, :]
    b = (-(z.to(tl.float32) + 16.0) * s)[:, None, :]
    return a * c + b * xs[:, :, None]


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, n_groups, tiles_per_split, n_splits, s_xm, s_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GPT: tl.constexpr,
):
    # x: (M, K); w: (K/8, N) int32 words; s, z: (K/g, N); out: (M, N); part: (n_splits, M, N) fp32 scratch;
    # cnt: (cdiv(N, BLOCK_N),) int32, zero between launches.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    m_idx = tl.arange(0, BLOCK_M)
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n_groups, GPT))
    acc3 = tl.zeros((GPT, GROUP // 8, BLOCK_N), dtype=tl.float32)  # one row of x: word partials, summed once
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # several rows: summed per tile
    if PREFETCH:
        words, s, z, wr, gmask = _int4_words(w_ptr, s_ptr, z_ptr, cols, col_mask, first, N, n_groups,
                                             GROUP, GPT, EVEN_K)
    if PDL:  # the first tile's weights are in flight; x and every store come after the previous kernel
        gdc_wait()
        gdc_launch_dependents()
    for kt in range(first, last):
        if PREFETCH:  # registers double-buffer the weight stream: tile kt+1 is in flight while tile kt is used
            next_mask = cols < tl.where(kt + 1 < last, N, 0)  # past the split's last tile: load nothing
            nwords, ns, nz, nwr, ngmask = _int4_words(w_ptr, s_ptr, z_ptr, cols, next_mask, kt + 1, N, n_groups,
                                                      GROUP, GPT, EVEN_K)
        else:
            words, s, z, wr, gmask = _int4_words(w_ptr, s_ptr, z_ptr, cols, col_mask, kt, N, n_groups,
                                                 GROUP, GPT, EVEN_K)
        if BLOCK_M == 1:
            acc3 += _int4_tile_dot(words, s, z, wr, gmask, x_ptr)
        else:  # (measured slow on the H200: `QuantizedLinear` sends several rows to dequantize + matmul)
            for m in tl.static_range(BLOCK_M):
                # Rows of the power-of-two BLOCK_M beyond M re-read row M − 1; the store drops them.
                t = _int4_tile_dot(words, s, z, wr, gmask, x_ptr + tl.minimum(m, M - 1) * s_xm)
                part = tl.sum(tl.sum(t, axis=1), axis=0)  # (BLOCK_N,)
                acc += tl.where(m_idx[:, None] == m, part[None, :], 0.0)
        if PREFETCH:
            words, s, z, wr, gmask = nwords, ns, nz, nwr, ngmask
    if BLOCK_M == 1:
        acc += tl.sum(tl.sum(acc3, axis=1), axis=0)[None, :]
    _write_out(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, cols, col_mask, m_idx, M, N, pid_n, pid_k, n_splits, s_om,
               HAS_BIAS, SPLIT)


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, n_groups,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GPT: tl.constexpr, EVEN_K: tl.constexpr):
    # out: Ŵᵀ (K, N), row 8·w + i from nibble i of word row w.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    words, s, z, wr, gmask = _int4_words(w_ptr, s_ptr, z_ptr, cols, col_mask, tl.program_id(1), N, n_groups,
                                         GROUP, GPT, EVEN_K)
    s = s.to(tl.float32)
    a = (16.0 * s)[:, None, :]
    b = (-(z.to(tl.float32) + 16.0) * s)[:, None, :]
    op = out_ptr + (wr * 8)[:, :, None] * N + cols[None, None, :]
    mask = gmask[:, None, None] & col_mask[None, None, :]
    ty = out_ptr.dtype.element_ty
    # f·16s − (16 + z)·s = (q − z)·s, exact in fp32 for bf16/fp16 scales (as `primitives.dequantize`)
    tl.store(op, (_plane(words, 0) * a + b).to(ty), mask=mask)
    tl.store(op + N, (_plane(words, 4) * a + b).to(ty), mask=mask)
    tl.store(op + 2 * N, (_plane(words, 8) * a + b).to(ty), mask=mask)
    tl.store(op + 3 * N, (_plane(words, 12) * a + b).to(ty), mask=mask)
    tl.store(op + 4 * N, (_plane(words, 16) * a + b).to(ty), mask=mask)
    tl.store(op + 5 * N, (_plane(words, 20) * a + b).to(ty), mask=mask)
    tl.store(op + 6 * N, (_plane(words, 24) * a + b).to(ty), mask=mask)
    tl.store(op + 7 * N, (_plane(words, 28) * a + b).to(ty), mask=mask)


@dataclass(frozen=True)
class Int4Columns:
    """An INT4 layer in the GEMV's layout, column-major: `words` (K/8, N) int32 (word w of column n holds the
    nibbles of input columns 8w..8w+7, nibble i = column 8w + i, as in `qweight`'s bytes), `scales` (K/g, N)
    and `zeros` (K/g, N) uint8. A program's tile is then 16-byte vectors along N, and every x value it loads
    serves all the columns of the vector. Exactly the integers of `qweight` (`to_rows` inverts it)."""

    words: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @classmethod
    def from_rows(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> Int4Columns:
        """From the stored layout: qweight (N, K/2) uint8 (byte j = q[2j] | q[2j+1] << 4), scales/zeros (N, K/g)."""
        n, half_k = qweight.shape
        k = 2 * half_k
        if qweight.dtype != torch.uint8 or group_size not in INT4_GROUP_SIZES or k % group_size:
            raise ValueError(f"int4 GEMV: needs uint8 (N, K/2) packed weights and a group size in "
                             f"{INT4_GROUP_SIZES} dividing K; got {qweight.dtype} {tuple(qweight.shape)}, "
                             f"group_size={group_size}")
        if scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
            raise ValueError(f"int4 GEMV: scales/zeros must be (N, K/g) = {(n, k // group_size)}, got "
                             f"{tuple(scales.shape)} / {tuple(zeros.shape)}")
        return cls(qweight.contiguous().view(torch.int32).T.contiguous(), scales.T.contiguous(),
                   zeros.T.contiguous(), group_size)

    def to_rows(self) -> torch.Tensor:
        """qweight (N, K/2) uint8, exactly."""
        return self.words.T.contiguous().view(torch.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight."""
        return self.words.shape[1], 8 * self.words.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.words, self.scales, self.zeros


MAX_COLUMN_BLOCKS = 1 << 16


@functools.cache
def _counter_buffer(device: torch.device) -> torch.Tensor:
    return torch.zeros(MAX_COLUMN_BLOCKS, dtype=torch.int32, device=device)


def split_k_counters(n: int, device: torch.device) -> torch.Tensor:
    """Split-K arrival counters for a layer of N outputs (enough for any block_n ≥ 8), zero: give a layer its own
    (`counters=`) so that GEMVs of different layers or models never share them."""
    return torch.zeros(triton.cdiv(n, 8), dtype=torch.int32, device=device)


def _counters(device: torch.device, n_blocks: int, counters: torch.Tensor | None) -> torch.Tensor:
    """Split-K arrival counters, one per column block (zero between launches: the last program of a block resets
    its own). `counters` (a layer's own, `split_k_counters`) or one shared buffer per device. Launches that share
    counters must not run concurrently (one stream: they run one after another, as in a decode step); two CUDA
    graphs replayed concurrently on two streams must not share them: the modules pass their own."""
    if counters is None:
        if n_blocks > MAX_COLUMN_BLOCKS:
            raise ValueError(f"GEMV: {n_blocks} column blocks exceed the {MAX_COLUMN_BLOCKS} split-K counters; use "
                             f"a larger block_n")
        return _counter_buffer(device)
    if counters.dtype != torch.int32 or counters.device != device or counters.numel() < n_blocks:
        raise ValueError(f"GEMV: counters must be ≥ {n_blocks} int32 zeros on {device} (`split_k_counters`), got "
                         f"{counters.numel()} {counters.dtype} on {counters.device}")
    return counters


def int4_gemv(x: torch.Tensor, w: Int4Columns, bias: torch.Tensor | None = None,
              config: GemvConfig | None = None, pdl: bool = False,
              counters: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Ŵᵀ + bias, Ŵ = (q − z)·s: x (M, K) with M ≤ GEMV_MAX_ROWS, `w` the layer in `Int4Columns`, bias
    (N,) or None → y (M, N) in x's dtype (fp32 accumulation). pdl: see `use_pdl`; counters: see `_counters`."""
    n, k = w.shape
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k or not 1 <= m <= GEMV_MAX_ROWS:
        raise ValueError(f"int4 GEMV: x must be (M ≤ {GEMV_MAX_ROWS}, {k}), got {tuple(x.shape)}")
    cfg = config or default_config("int4", m, n, k, x.device, w.group_size)
    group = w.group_size
    if cfg.block_k % group or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"int4 GEMV: block_k must be a power-of-two multiple of the group size {group}, got "
                         f"{cfg.block_k}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    gpt = cfg.block_k // group
    n_groups = k // group
    k_tiles = triton.cdiv(n_groups, gpt)
    tiles_per_split = triton.cdiv(k_tiles, cfg.split_k)
    split_k = triton.cdiv(k_tiles, tiles_per_split)
    n_blocks = triton.cdiv(n, cfg.block_n)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    part = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32) if split_k > 1 else out
    pdl = use_pdl(x.device, pdl)
    with _on_device(x):
        _int4_gemv_kernel[(n_blocks, split_k)](
            x, *w.tensors(), bias if bias is not None else out, out, part, _counters(x.device, n_blocks, counters),
            m, n, n_groups, tiles_per_split, split_k, x.stride(0), n,
            GROUP=group, HAS_BIAS=bias is not None, SPLIT=split_k > 1, EVEN_K=n_groups % gpt == 0,
            PREFETCH=cfg.prefetch, PDL=pdl, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, GPT=gpt,
            num_warps=cfg.num_warps, **launch_kwargs(pdl))
    return out


def int4_dequantize_t(w: Int4Columns, dtype: torch.dtype) -> torch.Tensor:
    """Ŵᵀ (K, N) in `dtype`, computed in fp32 exactly as `primitives.dequantize`, in one kernel (prefill-sized
    inputs then run a dense matmul x · Ŵᵀ)."""
    n, k = w.shape
    block_n = 64
    gpt = max(1, 128 // w.group_size)
    n_groups = k // w.group_size
    out = torch.empty(k, n, device=w.words.device, dtype=dtype)
    with _on_device(w.words):
        _int4_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(n_groups, gpt))](
            *w.tensors(), out, n, n_groups, GROUP=w.group_size, BLOCK_N=block_n, GPT=gpt,
            EVEN_K=n_groups % gpt == 0, num_warps=4)
    return out


def int4_gemv_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The spec: fp32 matmul with the `primitives.dequantize` weight (stored row layout), fp32 result."""
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
    x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K, tiles_per_split, n_splits, s_xm, s_wn, s_om,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # x: (M, K); w: (N, K) uint8 E4M3 bits; ws: (N,) fp32 row scales; out, part, cnt as in the INT4 kernel.
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
    if PDL:  # as in the INT4 kernel
        gdc_wait()
        gdc_launch_dependents()
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
    _write_out(tl.trans(acc), b_ptr, out_ptr, part_ptr, cnt_ptr, rows, row_mask, m_idx, M, N, pid_n, pid_k, n_splits,
               s_om, HAS_BIAS, SPLIT)


def fp8_gemv(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: GemvConfig | None = None, pdl: bool = False,
             counters: torch.Tensor | None = None) -> torch.Tensor:
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
    part = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32) if split_k > 1 else out
    n_blocks = triton.cdiv(n, cfg.block_n)
    pdl = use_pdl(x.device, pdl)
    with _on_device(x):
        _fp8_gemv_kernel[(n_blocks, split_k)](
            x, qweight, weight_scale.reshape(n).float(), bias if bias is not None else out, out, part,
            _counters(x.device, n_blocks, counters),
            m, n, k, tiles_per_split, split_k, x.stride(0), k, n,
            HAS_BIAS=bias is not None, SPLIT=split_k > 1, EVEN_K=k % cfg.block_k == 0,
            PREFETCH=cfg.prefetch, PDL=pdl, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, **launch_kwargs(pdl))
    return out


def fp8_gemv_ref(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """The spec: fp32 matmul with Ŵ = e4m3 · scale (as `Float8Linear.weight`), fp32 result."""
    w = qweight.view(torch.float8_e4m3fn).float() * weight_scale.reshape(-1, 1).float()
    y = x.float() @ w.T
    return y + bias.float() if bias is not None else y
