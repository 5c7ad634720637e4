"""Mamba-1 selective scan in Triton (backend ``triton``): a fused forward and a state-recomputing backward.

Same signature and semantics as `reference.selective_scan_ref` (the spec). Shape letters: B batch, D channels,
L length, N state size; T is the chunk length (`ScanConfig.block_l`) and BD the channels per program
(`ScanConfig.block_d`).

The math (Mamba-1, S6, eq. (2a)-(2b), ZOH for A and Euler for B), per (b, d, n):

    delta_t = softplus(delta_t + delta_bias)      a_t = exp(delta_t * A)      x_t = delta_t * u_t * B_t
    h_t = a_t * h_{t-1} + x_t                     y_t = (sum_n C_t * h_t + D * u_t) * silu(z_t)

Design. One program per (batch row, block of BD channels[, segment of L]); it walks L in chunks of T steps and
carries the fp32 state h (N, BD) in registers from chunk to chunk, so any L works and nothing of size B*D*L*N
exists in memory. Inside a chunk, a_t and x_t form one (T, N, BD) register tile and `tl.associative_scan` over T
with the combine (a1, b1), (a2, b2) -> (a1*a2, b1*a2 + b2) (the composition of the maps h -> a*h + b) gives the
chunk's states; the carried state enters as x_0 + a_0 * h. B_t and C_t, (T, N), are loaded once per program and
shared by its BD channels. delta_bias, softplus, the D skip and the z gate are fused; inputs are read in their
dtype (fp32, bf16, fp16), all arithmetic and the state are fp32, and exp(delta*A) is one MUFU `exp2` (A pre-scaled
by log2 e).

Register layout. Triton lays out a tensor built by broadcasting with the 32 lanes of a warp along its last
dimension. With time last, the scan over T runs across lanes in log2(32) shuffle rounds, about 10 warp shuffles
per element (found by compiling the kernels for sm_90 with Triton 3.6 and counting SASS instructions of the hot
loop: a predicted ~2.9 ms floor at L=2048, slower than mamba-ssm). So the tiles are channel-last: each thread
owns a channel and holds the chunk's T steps and its N states in registers; the scan is then a plain FMA chain
inside the thread and y = sum_n C h an in-thread sum. The backward also needs sums over channels (dB_t, dC_t),
which cost log2(lanes) shuffles per value, so its tiles are (T, D2, N, D1): BD = D2 * D1 channels with D2 groups
in registers (`ScanConfig.d_regs`) and D1 on lanes, and the remaining 32/D1 lanes on N. The channel sum is then
D2-1 in-thread adds followed by log2(D1) shuffle rounds on D2 times fewer values. And `associative_scan(...,
reverse=True)` costs ~12 shuffles per element in Triton 3.6 even when T lies within a thread, so the adjoint scan
flips the tile in time (`_flip_time`: one-hot selects that compile to register moves) and scans forward.
Static estimates from those SASS counts (B=8, D=4096, N=16, bf16, L=2048, 132 SMs at 1.98 GHz, perfect
overlap): forward >= 0.41 ms, backward >= 1.4 ms (mamba-ssm, measured on the H200: 1.17 ms and ~4.5 ms).

Segments (parallelism over L). B * D / BD programs are too few to fill the GPU at small batch (B=1, D=4096:
512 single-warp programs on 132 SMs, latency-bound). So L is cut into n_seg segments of seg_len steps and the
grid gets a third axis over them. The recurrence restricted to a segment is the affine map h -> P h + h_loc,
P = prod_t a_t = exp(A * sum_t delta_t) (per d, n), h_loc = the segment's end state from a zero start; so:
(1) `_scan_fwd_kernel` with LOCAL scans segments 0..n_seg-2 from zero, storing h_loc and sum_t delta_t;
(2) `_segment_combine_kernel` walks the segments in order, h_in[s+1] = P_s h_in[s] + h_loc[s] (n_seg steps on
(B, D, N), negligible); (3) `_scan_fwd_kernel` rescans every segment from h_in[s], writing y. The backward has
the same structure in reverse: the adjoint carry q (below) leaving a segment is affine in the carry entering it,
q_out = P_s q_in + q_loc, with the same P_s; pass 1 (`_scan_bwd_kernel` with ADJ_ONLY) computes q_loc of
segments 1..n_seg-1 from the adjoint alone (no states), pass 2 combines in reverse from dL/dh_last, pass 3 is
the full backward per segment. Segmenting costs one extra scan of the inputs per direction; `default_segments`
only segments when the unsegmented grid is short of programs (B=8 at D=4096 is not segmented).

Backward (recomputation instead of stored B*D*L*N intermediates): when a gradient is needed, the forward also
writes the state entering every `save_every` steps (default `SAVE_EVERY` = 64), (B, ceil(L/64), D, N) fp32:
4*N/64 = 1 byte per element at N=16, half of bf16 u (checkpointing every 4 steps, as before, cost 16 bytes per
element: 2 GiB for one layer at B=1, D=4096, L=32K). The backward program walks its segment in reverse in blocks
of save_every steps; per block it first recomputes the block's forward from the checkpoint, keeping the state
entering each of its chunks of T_bwd steps in a per-program scratch buffer (B, n_seg, save_every/T_bwd, D, N),
which stays in L2; then it walks the block's chunks in reverse: per chunk it reloads the inputs, recomputes a_t,
x_t and h_t with the forward scan, and solves the adjoint recurrence

    g_t = dL/dh_t = C_t * dy_t + a_{t+1} * g_{t+1}

as a scan over the time-flipped chunk. The multiplier a_{t+1} sits one step away from the element that needs
it; instead of a shifted copy (a second exp, or a register shift Triton lacks) each scan element carries
(P, Q, a_first): segment [s, e] means g_s = Q + P * q_{e+1} with q_{e+1} = a_{e+1} g_{e+1}, and a_first = a_s is
what an earlier segment needs to attach to it. Combining a later segment (P1, Q1, a1) with an earlier one
(P2, Q2, a2) gives (P2*a1*P1, Q2 + P2*a1*Q1, a2), associative as a composition of affine maps; so the backward
needs one exp per element, like the forward. The carry q = a_{t0} g_{t0} goes to the chunk before; after the
first chunk it is dL/dh_init. With s_t = g_t * a_t * h_{t-1} = g_t * (h_t - x_t) (the trick of the CUDA kernel
of state-spaces/mamba, which avoids a shifted state):

    dA = sum_{b,t} s_t * delta_t      d(delta_t) += sum_n s_t * A     dB_t = sum_d g_t * delta_t * u_t
    d(delta_t * u_t) = sum_n g_t * B_t                                dC_t = sum_d dy_t * h_t

dB and dC are summed over the program's BD channels in registers and added across the D/BD programs with fp32
`atomic_add` (so they are not bitwise deterministic, like mamba-ssm's); dA, dD and d(delta_bias) are summed over
L in registers and written per batch row, then summed over B by torch.

Strides: u, delta, z, y, B, C and the gradients are read and written through their strides, so the mixer's
transposed views ((B, L, D) activations seen as (B, D, L)) need no copies. With channel-last tensors the lanes
of a warp read consecutive channels (coalesced); the per-chunk offsets are int32, the chunk base int64.

Memory traffic napkin math, bytes per (b, d, t) element, s = bytes of the input dtype (2 for bf16):
- forward: read u, delta, z + write y = 4s (8 B in bf16); B and C are (B, N, L), shared by the D channels:
  2*N*s/D per element (0.016 B at D=4096, N=16), negligible.
- backward: read u, delta, z, dy + write du, ddelta, dz = 7s (14 B in bf16).
- fwd+bwd: 11s (22 B in bf16). `essential_bytes` computes these; the benchmark divides them by the time to
  report achieved GB/s against the ~4 TB/s HBM copy bandwidth of the H200.
- on top of that, training writes and rereads the checkpoints, 4*N/save_every bytes each way (1 B at N=16),
  and the backward rereads u, delta, B to recompute each block (4s more, from L2 or HBM); segmenting adds one
  read pass per direction (forward: u, delta, B; backward: delta, C, dy, z).
- L2 only: every program rereads B and C (4*N*s/BD bytes per element) and the backward adds 8*N/BD bytes of
  dB/dC atomics per element.

The exp throughput bound: each pass needs B*D*L*N exponentials. The H200's SFU issues 16 ex2 per clock per SM:
132 SMs * 16 * 1.98 GHz ~ 4.2e12 exp/s. At B=8, D=4096, N=16, L=2048 the forward's 1.07e9 exps take >= 0.26 ms
while its 8 B/element (0.54 GB) take >= 0.13 ms at 4 TB/s: the forward is bound by exp and by the ~10 other fp32
instructions per element (4 warp-instructions issue per clock per SM), not by HBM. The backward recomputes the
exps (one more B*D*L*N) and issues ~3x the instructions of the forward. The benchmark reports the exp floor.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import MoaiError


class ScanConfigError(MoaiError, ValueError):
    """A launch setting of the Triton scan (`ScanConfig`, n_segments, save_every) that cannot work."""


@dataclass(frozen=True)
class ScanConfig:
    """Launch shape of one scan kernel (forward or backward); every field is a power of two.

    block_d: channels per program (BD); they share the B/C loads, and in the backward the dB/dC reduction.
    block_l: chunk length (T), the steps held in registers; the state is carried between chunks.
    num_warps: warps per program.
    d_regs: backward only: channel groups per thread (D2); block_d / d_regs channels go on lanes.
    """

    block_d: int
    block_l: int
    num_warps: int = 1
    d_regs: int = 1

    def __post_init__(self):
        for name in ("block_d", "block_l", "num_warps", "d_regs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ScanConfigError(f"ScanConfig.{name} must be a power of two, got {value!r}")
        if self.d_regs > self.block_d:
            raise ScanConfigError(f"ScanConfig.d_regs ({self.d_regs}) cannot exceed block_d ({self.block_d})")


# Fewer programs than this leaves the H200's 132 SMs short of warps (~8 single-warp programs per SM).
_MIN_PROGRAMS = 1024


def default_configs(batch: int, dim: int, dstate: int = 16) -> tuple[ScanConfig, ScanConfig]:
    """(forward, backward) launch shapes for the H200. Chosen from static SASS counts (Triton 3.6, sm_90; see the
    module docstring), not yet from timings: `benchmarks/bench_scan_gpu.py --sweep` times alternatives.
    Narrower blocks for small batch*dim keep enough programs in flight. N <= 16: chunks of T = 64/N steps
    (T*N = 64 values per channel); N > 16: proportionally fewer channels per program, so that the freed lanes
    take the extra states and each thread keeps at most 16."""
    n = max(2, triton.next_power_of_2(dstate))
    shrink = max(1, n // 16)
    block_l = 64 // min(n, 16)
    channels = batch * dim
    fwd_bd = next((bd for bd in (32, 16) if channels // bd >= _MIN_PROGRAMS), 8)
    fwd = ScanConfig(max(1, fwd_bd // shrink), block_l)
    if channels // 16 >= _MIN_PROGRAMS:
        bwd = ScanConfig(max(2, 16 // shrink), block_l, d_regs=2)
    else:
        bwd = ScanConfig(max(1, 8 // shrink), block_l)
    return fwd, bwd


# Steps between the fp32 state checkpoints the forward keeps for the backward (see the module docstring).
SAVE_EVERY = 64
# Segments shorter than this cost more in the extra passes than their parallelism gains.
_MIN_SEGMENT = 256


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the tensors' GPU (132 on an H200; the interpreter pretends to be one)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132


def default_segments(batch: int, dim: int, length: int, fwd_cfg: ScanConfig, sms: int = 132) -> int:
    """How many segments of L to scan in parallel (the heuristic; `benchmarks/gpu_scan.sh` times alternatives).

    The unsegmented forward runs batch * ceil(dim / block_d) single-warp programs. With at least 8 per SM
    (1056 on an H200: B=8 at D=4096 with block_d 32 has 1024, ~8/SM, and reaches 17% of HBM) it stays
    unsegmented: segmenting adds an input pass per direction. Below that (B=1: 512 programs, 4% of HBM), segments
    raise the grid to ~16 programs per SM, each segment at least `_MIN_SEGMENT` steps long."""
    programs = batch * triton.cdiv(dim, fwd_cfg.block_d)
    if programs >= 8 * sms - sms // 4:  # 8 per SM, with slack: 1024 programs count as filling 132 SMs
        return 1
    return max(1, min(triton.cdiv(16 * sms, programs), length // _MIN_SEGMENT))


def essential_bytes(batch: int, dim: int, dstate: int, length: int, itemsize: int, backward: bool) -> int:
    """The HBM bytes any implementation must move (see the module docstring): forward reads u, delta, z, B, C
    and writes y; the backward also reads dy and writes du, ddelta, dz, dB, dC."""
    per_elem = 4 * itemsize + (7 * itemsize if backward else 0)
    per_bn = 2 * itemsize + (4 * itemsize if backward else 0)  # B, C (+ dy-side reads of B, C and dB, dC)
    return batch * dim * length * per_elem + batch * dstate * length * per_bn


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier segment: h -> a2 * (a1 * h + b1) + b2.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _adjoint_combine(p1, q1, a1, p2, q2, a2):
    # The adjoint, scanned over the time-flipped chunk: (p1, q1, a1) is the later segment in time, (p2, q2, a2)
    # the earlier one (see the module docstring).
    w = p2 * a1
    return w * p1, q2 + w * q1, a2


@triton.jit
def _flip_time(x, offs_l, BLOCK_L: tl.constexpr):
    # x[T - 1 - t] for a (T, D2, N, D1) tile. A reverse scan is a forward scan of the time-flipped tile; flipping
    # this way (select + one-hot sum per step) folds into register moves when T lies within each thread, whereas
    # `associative_scan(..., reverse=True)` costs ~12 warp shuffles per element in Triton 3.6 (static SASS
    # count, sm_90). -0.0 is the additive identity LLVM may fold without fast-math flags.
    t4 = offs_l[:, None, None, None]
    out = x
    for k in tl.static_range(BLOCK_L):
        xk = tl.sum(tl.where(t4 == BLOCK_L - 1 - k, x, -0.0), axis=0)
        out = tl.where(t4 == k, xk[None, :, :, :], out)
    return out


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20: x itself above it) = max(x, 0) + log1p(w), w = exp(-|x|) in (0, 1].
    # log1p(w) = 2 atanh(s), s = w / (2 + w) in (0, 1/3]: the odd series to s^15 is accurate to ~1e-9 relative,
    # where log(1 + w) with the GPU's approximate log would lose the small w (libdevice's log1p is not
    # available in the interpreter).
    w = tl.exp(-tl.abs(x))
    s = w / (2.0 + w)
    s2 = s * s
    p = 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + 2.0 * s * p)


@triton.jit
def _row_offsets(t, d_own, s_l, o_u, o_dl, LAY: tl.constexpr):
    # In-row offsets of a (B, D, L) tensor for a chunk: t (T, 1[, 1]) steps, d_own its channels' offsets. LAY 1
    # or 2: the tensor has u's or delta's strides (known at launch), so it reuses their offsets (one pointer tile
    # per distinct layout, as few registers as the contiguous-only kernels had).
    if LAY == 1:
        o = o_u
    elif LAY == 2:
        o = o_dl
    else:
        o = t * s_l + d_own
    return o


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hin_ptr,
    out_ptr, last_ptr, states_ptr, hend_ptr, dsum_ptr,
    dim, length, dstate, n_seg, seg_len, n_saved,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, LOCAL: tl.constexpr, SAVE_STATES: tl.constexpr, SAVE_EVERY: tl.constexpr,
    LAY_DL: tl.constexpr, LAY_Z: tl.constexpr, LAY_O: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # One program per (batch row, block of BD channels, segment of seg_len steps); seg_len is a multiple of
    # BLOCK_L and SAVE_EVERY. u, delta, z, out: (B, D, L) with strides s_*; A: (D, N); B, C: (B, N, L) strided;
    # D, bias: (D,); hin: (B, D, n_seg, N), the state entering each segment; last: (B, D, N).
    # LOCAL (pass 1 of the segmented forward): scan the segment from a zero state, write no y, store the
    # segment's end state in hend (B, D, n_seg, N) and its sum of delta in dsum (B, D, n_seg).
    # Otherwise write y, the state entering every SAVE_EVERY steps into states (B, n_saved, D, N) when
    # SAVE_STATES, and the final state from the last segment.
    # Tiles are (T, N, BD): time, state, channel (see "Register layout" in the module docstring).
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_nd = mask_n[:, None] & mask_d[None, :]

    A = tl.load(A_ptr + offs_d[None, :] * dstate + offs_n[:, None], mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634  # (N, BD); exp(delta * A) = exp2(delta * A * log2(e))
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    # Offsets within a batch row are int32 (the wrapper checks they fit), computed per chunk from per-channel
    # parts: hoisted (T, BD) offset tiles would hold T registers each, and the B=8 shapes have none to spare.
    u_row, dl_row, o_row = u_ptr + pid_b * s_ub, delta_ptr + pid_b * s_db, out_ptr + pid_b * s_ob
    if HAS_Z:
        z_row = z_ptr + pid_b * s_zb
    b_row, c_row = B_ptr + pid_b * s_bb, C_ptr + pid_b * s_cb
    d_u, d_dl, d_z, d_o = offs_d * s_ud, offs_d * s_dd, offs_d * s_zd, offs_d * s_od  # (BD,)
    n_b, n_c = offs_n * s_bn, offs_n * s_cn  # (N,)
    nd = offs_d[None, :] * dstate + offs_n[:, None]  # (N, BD) into a (D, N) slice
    st_row = states_ptr + pid_b * n_saved * dim * dstate  # states (B, n_saved, D, N): slices of (D, N)
    first = offs_l[:, None, None] == 0
    last = offs_l[:, None, None] == BLOCK_L - 1

    if LOCAL or not HAS_H0:
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    else:
        h = tl.load(hin_ptr + ((pid_b * dim + offs_d[None, :]) * n_seg + pid_s) * dstate + offs_n[:, None],
                    mask=mask_nd, other=0.0).to(tl.float32)
    dsum = tl.zeros([BLOCK_D], dtype=tl.float32)

    seg_start = pid_s * seg_len
    n_chunks = tl.minimum(seg_len // BLOCK_L, tl.cdiv(length - seg_start, BLOCK_L))
    for c in range(n_chunks):
        t0 = seg_start + c * BLOCK_L
        t = t0 + offs_l
        mask_l = t < length
        mask_ld = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        if SAVE_STATES:
            if SAVE_EVERY >= BLOCK_L:
                if t0 % SAVE_EVERY == 0:
                    tl.store(st_row + (t0 // SAVE_EVERY) * dim * dstate + nd, h, mask=mask_nd)
            else:
                tl.store(st_row + (t0 // SAVE_EVERY) * dim * dstate + nd, h, mask=mask_nd)

        t2 = t[:, None]
        o_u = t2 * s_ul + d_u[None, :]  # (T, BD)
        o_dl = _row_offsets(t2, d_dl[None, :], s_dl, o_u, o_u, LAY_DL)
        u = tl.load(u_row + o_u, mask=mask_ld, other=0.0).to(tl.float32)
        dl = tl.load(dl_row + o_dl, mask=mask_ld, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dl = dl + bias[None, :]
        if SOFTPLUS:
            dl = _softplus(dl)
        dl = tl.where(mask_ld, dl, 0.0)  # padded steps: a = 1, x = 0, the state passes through
        Bt = tl.load(b_row + t[:, None] * s_bl + n_b[None, :], mask=mask_ln, other=0.0).to(tl.float32)  # (T, N)

        a = tl.exp2(dl[:, None, :] * A2[None, :, :])  # (T, N, BD)
        x = Bt[:, :, None] * (dl * u)[:, None, :]
        # The carried state enters as part of the first step (x_0 + a_0 h); `first` is known per register at
        # compile time, so this costs one FMA per (n, d), and the scan's running product a1*a2 becomes dead code.
        x = tl.where(first, x + a * h[None, :, :], x)
        _, hs = tl.associative_scan((a, x), axis=0, combine_fn=_affine_combine)  # h_t of the chunk
        if LOCAL:
            dsum += tl.sum(dl, axis=0)
        else:
            Ct = tl.load(c_row + t[:, None] * s_cl + n_c[None, :], mask=mask_ln, other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct[:, :, None], axis=1)  # (T, BD)
            if HAS_D:
                y += Dv[None, :] * u
            if HAS_Z:
                o_z = _row_offsets(t2, d_z[None, :], s_zl, o_u, o_dl, LAY_Z)
                zv = tl.load(z_row + o_z, mask=mask_ld, other=0.0).to(tl.float32)
                y *= zv * tl.sigmoid(zv)
            o_o = _row_offsets(t2, d_o[None, :], s_ol, o_u, o_dl, LAY_O)
            tl.store(o_row + o_o, y.to(out_ptr.dtype.element_ty), mask=mask_ld)
            if SAVE_STATES:
                if SAVE_EVERY < BLOCK_L:
                    for k in tl.static_range(1, BLOCK_L // SAVE_EVERY):
                        if t0 + k * SAVE_EVERY < length:
                            hk = tl.sum(tl.where(offs_l[:, None, None] == k * SAVE_EVERY - 1, hs, -0.0), axis=0)
                            tl.store(st_row + ((t0 + k * SAVE_EVERY) // SAVE_EVERY) * dim * dstate + nd, hk,
                                     mask=mask_nd)
        h = tl.sum(tl.where(last, hs, -0.0), axis=0)  # padded steps kept the state of step L-1

    if LOCAL:
        # Pass 1 runs segments 0..n_seg-2 (the last one's end state is never needed): n_seg - 1 entries.
        tl.store(hend_ptr + ((pid_b * dim + offs_d[None, :]) * (n_seg - 1) + pid_s) * dstate + offs_n[:, None], h,
                 mask=mask_nd)
        tl.store(dsum_ptr + (pid_b * dim + offs_d) * (n_seg - 1) + pid_s, dsum, mask=mask_d)
    elif pid_s == n_seg - 1:
        tl.store(last_ptr + (pid_b * dim + offs_d[None, :]) * dstate + offs_n[:, None], h, mask=mask_nd)


@triton.jit
def _segment_combine_kernel(
    A_ptr, dsum_ptr, add_ptr, init_ptr, out_ptr,
    dim, dstate, n_seg,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The short sequential pass over segments, per (b, d, n): out[s] = carry entering segment s, with
    # carry <- exp(A * dsum[s]) * carry + add[s] after segment s (exp(A dsum) = the segment's product of a_t).
    # Forward: s = 0, 1, ..., carry starts at h0, add = the segments' end states from a zero start.
    # REVERSE (the adjoint): s = n_seg-1, ..., 0, carry starts at dL/dh_last, add = each segment's
    # a_{t0} g_{t0} from a zero carry. add, out: (B, D, n_seg, N); dsum: (B, D, n_seg); init: (B, D, N).
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_nd = (offs_n[:, None] < dstate) & mask_d[None, :]
    A2 = tl.load(A_ptr + offs_d[None, :] * dstate + offs_n[:, None], mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A2 * 1.4426950408889634
    row = (pid_b * dim + offs_d[None, :]) * n_seg  # (1, BD)
    if HAS_INIT:
        carry = tl.load(init_ptr + (pid_b * dim + offs_d[None, :]) * dstate + offs_n[:, None], mask=mask_nd,
                        other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(n_seg - 1):
        s = n_seg - 1 - i if REVERSE else i
        tl.store(out_ptr + (row + s) * dstate + offs_n[:, None], carry, mask=mask_nd)
        # dsum/add hold n_seg - 1 entries: segments 0..n_seg-2 (forward) or 1..n_seg-1 (reverse).
        k = s - 1 if REVERSE else s
        ds = tl.load(dsum_ptr + (pid_b * dim + offs_d) * (n_seg - 1) + k, mask=mask_d, other=0.0)
        add = tl.load(add_ptr + ((pid_b * dim + offs_d[None, :]) * (n_seg - 1) + k) * dstate + offs_n[:, None],
                      mask=mask_nd, other=0.0)
        carry = tl.exp2(A2 * ds[None, :]) * carry + add
    tl.store(out_ptr + (row + (0 if REVERSE else n_seg - 1)) * dstate + offs_n[:, None], carry, mask=mask_nd)


@triton.jit
def _adjoint_chunk(cdy, a, q, first, last, offs_l, BLOCK_L: tl.constexpr):
    # g_t = C_t dy_t + a_{t+1} g_{t+1} over one chunk (T, D2, N, D1), the carry q = a_{t1} g_{t1} from the later
    # chunk entering through the last step (padded steps have a = 1 and pass it on). Returns g and the carry
    # a_{t0} g_{t0} for the chunk before.
    cdy = tl.where(last, cdy + q[None, :, :, :], cdy)
    ones = tl.full(cdy.shape, 1.0, tl.float32)
    _, g, _ = tl.associative_scan((ones, _flip_time(cdy, offs_l, BLOCK_L), _flip_time(a, offs_l, BLOCK_L)),
                                  axis=0, combine_fn=_adjoint_combine)
    g = _flip_time(g, offs_l, BLOCK_L)
    return g, tl.sum(tl.where(first, a * g, -0.0), axis=0)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, qin_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr, qloc_ptr, dsum_ptr,
    scratch_ptr,
    dim, length, dstate, n_seg, seg_len, n_saved,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
    s_hb, s_hd, s_hl, s_eb, s_ed, s_el, s_wb, s_wd, s_wl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, ADJ_ONLY: tl.constexpr, RECOMPUTE: tl.constexpr, SAVE_EVERY: tl.constexpr,
    SUB: tl.constexpr, LAY_DL: tl.constexpr, LAY_Z: tl.constexpr, LAY_G: tl.constexpr, LAY_H: tl.constexpr,
    LAY_E: tl.constexpr, LAY_W: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # One program per (batch row, block of channels, segment); it walks its segment backwards in blocks of
    # SAVE_EVERY steps (a multiple of BLOCK_L), and each block backwards in chunks of BLOCK_L.
    # Inputs as in the forward (strides s_u*, s_d*, s_z*, s_b*, s_c*); dout (s_g*); states: (B, n_saved, D, N),
    # the state entering every SAVE_EVERY steps; qin: (B, D, n_seg, N), a_{t1} g_{t1} after each segment's last
    # step t1 (dL/dh_last for the last segment).
    # ADJ_ONLY (pass 1 of the segmented backward, segments 1..n_seg-1): only the adjoint, from a zero carry;
    # writes each segment's carry a_{t0} g_{t0} into qloc and its sum of delta into dsum, (B, D, n_seg-1[, N]).
    # Otherwise: du, ddelta, dz (B, D, L) with strides s_h*, s_e*, s_w*; dB, dC (B, N, L) contiguous fp32,
    # accumulated atomically; dA (B, n_seg, D, N), dD and dbias (B, n_seg, D) fp32 per batch row and segment;
    # dh0 (B, D, N) fp32. When SAVE_EVERY > BLOCK_L, each block first recomputes its forward from the saved
    # state and keeps the state entering each of its chunks in scratch (B, n_seg, SAVE_EVERY / BLOCK_L, D, N),
    # a per-program buffer small enough to stay in L2.
    # Tiles are (T, D2, N, D1): the program's BLOCK_D2 * BLOCK_D1 channels are split into D2 groups held in
    # registers and D1 channels along the lanes (see "Register layout" in the module docstring).
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(2) + (1 if ADJ_ONLY else 0)
    offs_d = (tl.program_id(1) * (BLOCK_D2 * BLOCK_D1) + tl.arange(0, BLOCK_D2)[:, None] * BLOCK_D1
              + tl.arange(0, BLOCK_D1)[None, :])  # (D2, D1) channel index
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dnd = mask_d[:, None, :] & mask_n[None, :, None]  # (D2, N, D1)

    dnd = offs_d[:, None, :] * dstate + offs_n[None, :, None]  # (D2, N, D1) into (D, N)
    A = tl.load(A_ptr + dnd, mask=mask_dnd, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    # Offsets within a batch row: int32, computed per chunk from per-channel parts (as in the forward).
    u_row, dl_row = u_ptr + pid_b * s_ub, delta_ptr + pid_b * s_db
    if HAS_Z:
        z_row = z_ptr + pid_b * s_zb
    g_row, b_row, c_row = dout_ptr + pid_b * s_gb, B_ptr + pid_b * s_bb, C_ptr + pid_b * s_cb
    d_u, d_dl, d_z, d_g = offs_d * s_ud, offs_d * s_dd, offs_d * s_zd, offs_d * s_gd  # (D2, D1)
    n_b, n_c = offs_n * s_bn, offs_n * s_cn
    chan = pid_b * dim + offs_d[:, None, :]  # (D2, 1, D1)
    # Checkpoints and scratch are stacks of (D, N) slices: their offsets reuse dnd (no extra offset tiles).
    st_row = states_ptr + pid_b * n_saved * dim * dstate
    sc_row = scratch_ptr + (pid_b * n_seg + pid_s) * SUB * dim * dstate
    first = offs_l[:, None, None, None] == 0
    last = offs_l[:, None, None, None] == BLOCK_L - 1

    if ADJ_ONLY:
        q = tl.zeros([BLOCK_D2, BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dsum = tl.zeros([BLOCK_D2, BLOCK_D1], dtype=tl.float32)
    else:
        q = tl.load(qin_ptr + (chan * n_seg + pid_s) * dstate + offs_n[None, :, None], mask=mask_dnd, other=0.0)
        dA_acc = tl.zeros([BLOCK_D2, BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_D2, BLOCK_D1], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D2, BLOCK_D1], dtype=tl.float32)

    seg_start = pid_s * seg_len
    n_sub = tl.cdiv(tl.minimum(seg_len, length - seg_start), SAVE_EVERY)
    for j in range(n_sub):
        sub_start = seg_start + (n_sub - 1 - j) * SAVE_EVERY
        n_ch = tl.minimum(SUB, tl.cdiv(length - sub_start, BLOCK_L))
        if RECOMPUTE:
            # This block's forward again, from its saved state: the state entering each chunk, into scratch.
            h = tl.load(st_row + (sub_start // SAVE_EVERY) * dim * dstate + dnd, mask=mask_dnd, other=0.0)
            for k in range(n_ch):
                tl.store(sc_row + k * dim * dstate + dnd, h, mask=mask_dnd)
                t = sub_start + k * BLOCK_L + offs_l
                mask_ld = (t < length)[:, None, None] & mask_d[None, :, :]
                mask_ln = (t < length)[:, None] & mask_n[None, :]
                t3 = t[:, None, None]
                o_u = t3 * s_ul + d_u[None, :, :]  # (T, D2, D1)
                o_dl = _row_offsets(t3, d_dl[None, :, :], s_dl, o_u, o_u, LAY_DL)
                u = tl.load(u_row + o_u, mask=mask_ld, other=0.0).to(tl.float32)
                dl = tl.load(dl_row + o_dl, mask=mask_ld, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    dl = dl + bias[None, :, :]
                if SOFTPLUS:
                    dl = _softplus(dl)
                dl = tl.where(mask_ld, dl, 0.0)
                Bt = tl.load(b_row + t[:, None] * s_bl + n_b[None, :], mask=mask_ln,
                             other=0.0).to(tl.float32)[:, None, :, None]
                a = tl.exp2(dl[:, :, None, :] * A2[None, :, :, :])
                x = Bt * (dl * u)[:, :, None, :]
                _, hs = tl.associative_scan((a, tl.where(first, x + a * h[None, :, :, :], x)), axis=0,
                                            combine_fn=_affine_combine)
                h = tl.sum(tl.where(last, hs, -0.0), axis=0)
            tl.debug_barrier()  # the scratch writes are visible to the loads below

        for i in range(n_ch):
            t0 = sub_start + (n_ch - 1 - i) * BLOCK_L
            t = t0 + offs_l
            mask_l = t < length
            mask_ld = mask_l[:, None, None] & mask_d[None, :, :]  # (T, D2, D1)
            mask_ln = mask_l[:, None] & mask_n[None, :]  # (T, N)
            t3 = t[:, None, None]
            o_u = t3 * s_ul + d_u[None, :, :]  # (T, D2, D1)
            o_dl = _row_offsets(t3, d_dl[None, :, :], s_dl, o_u, o_u, LAY_DL)
            pre = tl.load(dl_row + o_dl, mask=mask_ld, other=0.0).to(tl.float32)
            if HAS_BIAS:
                pre = pre + bias[None, :, :]
            if SOFTPLUS:
                dl = _softplus(pre)
            else:
                dl = pre
            dl = tl.where(mask_ld, dl, 0.0)
            Ct = tl.load(c_row + t[:, None] * s_cl + n_c[None, :], mask=mask_ln,
                         other=0.0).to(tl.float32)[:, None, :, None]  # (T, 1, N, 1)
            a = tl.exp2(dl[:, :, None, :] * A2[None, :, :, :])  # (T, D2, N, D1)
            dy = tl.load(g_row + _row_offsets(t3, d_g[None, :, :], s_gl, o_u, o_dl, LAY_G), mask=mask_ld,
                         other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z_row + _row_offsets(t3, d_z[None, :, :], s_zl, o_u, o_dl, LAY_Z), mask=mask_ld,
                             other=0.0).to(tl.float32)
                sz = tl.sigmoid(zv)
            if ADJ_ONLY:
                if HAS_Z:
                    dy = dy * zv * sz
                g, q = _adjoint_chunk(Ct * dy[:, :, None, :], a, q, first, last, offs_l, BLOCK_L)
                dsum += tl.sum(dl, axis=0)
            else:
                if RECOMPUTE:
                    h_start = tl.load(sc_row + (n_ch - 1 - i) * dim * dstate + dnd, mask=mask_dnd, other=0.0)
                else:
                    h_start = tl.load(st_row + (t0 // SAVE_EVERY) * dim * dstate + dnd, mask=mask_dnd, other=0.0)
                # Recompute the chunk's forward: x_t and h_t (and y_t when the gate needs it).
                u = tl.load(u_row + o_u, mask=mask_ld, other=0.0).to(tl.float32)
                Bt = tl.load(b_row + t[:, None] * s_bl + n_b[None, :], mask=mask_ln,
                             other=0.0).to(tl.float32)[:, None, :, None]
                du_ = (dl * u)[:, :, None, :]
                x = Bt * du_
                _, hs = tl.associative_scan((a, tl.where(first, x + a * h_start[None, :, :, :], x)), axis=0,
                                            combine_fn=_affine_combine)
                # dy: gradient w.r.t. the scan output sum_n C h (before the D skip and the gate).
                if HAS_Z:
                    y = tl.sum(hs * Ct, axis=2)
                    if HAS_D:
                        y += Dv[None, :, :] * u
                    dz = dy * y * sz * (1.0 + zv * (1.0 - sz))  # d silu(z)/dz = sig(z) (1 + z (1 - sig(z)))
                    o_w = _row_offsets(t3, (offs_d * s_wd)[None, :, :], s_wl, o_u, o_dl, LAY_W)
                    tl.store(dz_ptr + pid_b * s_wb + o_w, dz.to(dz_ptr.dtype.element_ty), mask=mask_ld)
                    dy = dy * zv * sz
                if HAS_D:
                    dD_acc += tl.sum(dy * u, axis=0)
                    du = dy * Dv[None, :, :]
                else:
                    du = tl.zeros([BLOCK_L, BLOCK_D2, BLOCK_D1], dtype=tl.float32)
                dy4 = dy[:, :, None, :]
                g, q = _adjoint_chunk(Ct * dy4, a, q, first, last, offs_l, BLOCK_L)

                # (T, N), summed over this program's channels: first over the D2 groups in registers, then lanes.
                ptr_ln = pid_b * dstate * length + offs_n[None, :] * length + t[:, None]
                dC = tl.sum(tl.sum(hs * dy4, axis=1), axis=2)
                dB = tl.sum(tl.sum(g * du_, axis=1), axis=2)
                tl.atomic_add(dC_ptr + ptr_ln, dC, mask=mask_ln, sem="relaxed")
                tl.atomic_add(dB_ptr + ptr_ln, dB, mask=mask_ln, sem="relaxed")
                s = g * (hs - x)  # g_t a_t h_{t-1}: the gradient w.r.t. delta_t * A (padded steps: times delta = 0)
                dA_acc += tl.sum(s * dl[:, :, None, :], axis=0)
                gdu = tl.sum(g * Bt, axis=2)  # dL/d(delta_t u_t), (T, D2, D1)
                ddl = tl.sum(s * A[None, :, :, :], axis=2) + gdu * u
                du += gdu * dl
                if SOFTPLUS:
                    ddl = ddl * tl.sigmoid(pre)  # softplus'(x) = sigmoid(x)
                if HAS_BIAS:
                    dbias_acc += tl.sum(tl.where(mask_ld, ddl, 0.0), axis=0)
                o_h = _row_offsets(t3, (offs_d * s_hd)[None, :, :], s_hl, o_u, o_dl, LAY_H)
                tl.store(du_ptr + pid_b * s_hb + o_h, du.to(du_ptr.dtype.element_ty), mask=mask_ld)
                o_e = _row_offsets(t3, (offs_d * s_ed)[None, :, :], s_el, o_u, o_dl, LAY_E)
                tl.store(ddelta_ptr + pid_b * s_eb + o_e, ddl.to(ddelta_ptr.dtype.element_ty), mask=mask_ld)
        if RECOMPUTE:
            tl.debug_barrier()  # this block's scratch reads are done before the next block overwrites it

    if ADJ_ONLY:
        tl.store(qloc_ptr + (chan * (n_seg - 1) + pid_s - 1) * dstate + offs_n[None, :, None], q, mask=mask_dnd)
        tl.store(dsum_ptr + (pid_b * dim + offs_d) * (n_seg - 1) + pid_s - 1, dsum, mask=mask_d)
    else:
        part = (pid_b * n_seg + pid_s) * dim  # row of the per-(batch, segment) partial sums
        tl.store(dA_ptr + part * dstate + dnd, dA_acc, mask=mask_dnd)
        if HAS_D:
            tl.store(dD_ptr + part + offs_d, dD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_ptr + part + offs_d, dbias_acc, mask=mask_d)
        if HAS_H0:
            if pid_s == 0:
                tl.store(dh0_ptr + pid_b * dim * dstate + dnd, q, mask=mask_dnd)


def _block_n(dstate: int) -> int:
    return max(2, triton.next_power_of_2(dstate))


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_COMBINE_BLOCK_D = 32


def _combine(A32, dsum, add, init, n_seg, reverse):
    """The sequential pass over segments (`_segment_combine_kernel`): (B, D, n_seg, N) fp32 carries."""
    batch, dim, _, dstate = add.shape
    out = add.new_empty((batch, dim, n_seg, dstate))
    _segment_combine_kernel[(batch, triton.cdiv(dim, _COMBINE_BLOCK_D))](
        A32, dsum, add, init, out, dim, dstate, n_seg,
        HAS_INIT=init is not None, REVERSE=reverse, BLOCK_D=_COMBINE_BLOCK_D, BLOCK_N=_block_n(dstate),
        num_warps=1,
    )
    return out


def _layout(t, *refs) -> int:
    """1 + the index of the first of `refs` with t's strides (the kernel then reuses its offsets), else 0."""
    if t is not None:
        for i, ref in enumerate(refs):
            if ref is not None and ref.stride() == t.stride():
                return i + 1
    return 0


def _check_offsets(*tensors) -> None:
    # Offsets within a batch row are int32 in the kernels (the batch row's base is int64).
    for t in tensors:
        span = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:], strict=True)) if t is not None else 0
        if span >= 2 ** 31:
            raise ScanConfigError(
                f"selective_scan_triton: a batch row of a {tuple(t.shape)} tensor with strides {t.stride()} spans "
                "2^31 elements or more (the kernels' offsets are int32); scan shorter pieces and carry the state "
                "between them with initial_state / return_last_state")


class _SelectiveScanTritonFn(torch.autograd.Function):
    """The fused selective scan; saves its inputs and the (B, ceil(L/save_every), D, N) fp32 checkpoints."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, fwd_cfg, bwd_cfg, plan):
        # u, delta, z: (B, D, L) any strides; A: (D, N); B, C: (B, N, L) any strides; D, delta_bias: (D,);
        # h0: (B, D, N) or None. plan: (n_seg, seg_len, save_every) from `_plan`.
        batch, dim, length = u.shape
        dstate = A.shape[1]
        n_seg, seg_len, save_every = plan
        D, delta_bias = (t.contiguous() if t is not None else None for t in (D, delta_bias))
        A32 = A.float().contiguous()
        h0c = h0.float().contiguous() if h0 is not None else None
        save = any(ctx.needs_input_grad)
        n_saved = triton.cdiv(length, save_every)
        states = u.new_empty((batch, n_saved if save else 0, dim, dstate), dtype=torch.float32)
        out = torch.empty_like(delta, dtype=u.dtype)  # delta's layout (the mixer's: channel-last, for out_proj)
        last = u.new_empty((batch, dim, dstate), dtype=torch.float32)
        strides = (*u.stride(), *delta.stride(), *(z.stride() if z is not None else (0, 0, 0)), *out.stride(),
                   *B.stride(), *C.stride())
        flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                     SOFTPLUS=bool(delta_softplus), SAVE_EVERY=save_every, LAY_DL=_layout(delta, u),
                     LAY_Z=_layout(z, u, delta), LAY_O=_layout(out, u, delta), BLOCK_D=fwd_cfg.block_d,
                     BLOCK_N=_block_n(dstate), BLOCK_L=fwd_cfg.block_l, num_warps=fwd_cfg.num_warps)
        grid = (batch, triton.cdiv(dim, fwd_cfg.block_d))
        with _on_device(u):
            hin = h0c
            if n_seg > 1:  # pass 1: segment-local end states and delta sums; pass 2: the state entering each
                hend = u.new_empty((batch, dim, n_seg - 1, dstate), dtype=torch.float32)
                dsum = u.new_empty((batch, dim, n_seg - 1), dtype=torch.float32)
                _scan_fwd_kernel[(*grid, n_seg - 1)](
                    u, delta, A32, B, C, D, z, delta_bias, None, out, last, states, hend, dsum,
                    dim, length, dstate, n_seg, seg_len, n_saved, *strides,
                    HAS_H0=False, LOCAL=True, SAVE_STATES=False, **flags)
                hin = _combine(A32, dsum, hend, h0c, n_seg, reverse=False)
            _scan_fwd_kernel[(*grid, n_seg)](
                u, delta, A32, B, C, D, z, delta_bias, hin, out, last, states, None, None,
                dim, length, dstate, n_seg, seg_len, n_saved, *strides,
                HAS_H0=hin is not None, LOCAL=False, SAVE_STATES=save, **flags)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, states)
            ctx.delta_softplus, ctx.bwd_cfg, ctx.plan = bool(delta_softplus), bwd_cfg, plan
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, h0, states = ctx.saved_tensors
        cfg = ctx.bwd_cfg
        n_seg, seg_len, save_every = ctx.plan
        batch, dim, length = u.shape
        dstate = A.shape[1]
        _check_offsets(dout)
        A32 = A.float().contiguous()
        dlast = dlast.float().contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dB = torch.zeros(B.shape, dtype=torch.float32, device=u.device)
        dC = torch.zeros(C.shape, dtype=torch.float32, device=u.device)
        dA = u.new_empty((batch, n_seg, dim, dstate), dtype=torch.float32)
        dD = u.new_empty((batch, n_seg, dim), dtype=torch.float32) if D is not None else None
        dbias = u.new_empty((batch, n_seg, dim), dtype=torch.float32) if delta_bias is not None else None
        dh0 = u.new_empty((batch, dim, dstate), dtype=torch.float32) if h0 is not None else None
        sub = save_every // cfg.block_l
        recompute = sub > 1
        scratch = u.new_empty((batch, n_seg, sub if recompute else 0, dim, dstate), dtype=torch.float32)
        none3 = (0, 0, 0)
        strides = (*u.stride(), *delta.stride(), *(z.stride() if z is not None else none3), *dout.stride(),
                   *B.stride(), *C.stride(), *du.stride(), *ddelta.stride(),
                   *(dz.stride() if dz is not None else none3))
        flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                     HAS_H0=h0 is not None, SOFTPLUS=ctx.delta_softplus, SAVE_EVERY=save_every, SUB=sub,
                     LAY_DL=_layout(delta, u), LAY_Z=_layout(z, u, delta), LAY_G=_layout(dout, u, delta),
                     LAY_H=_layout(du, u, delta), LAY_E=_layout(ddelta, u, delta), LAY_W=_layout(dz, u, delta),
                     BLOCK_D2=cfg.d_regs, BLOCK_D1=cfg.block_d // cfg.d_regs, BLOCK_N=_block_n(dstate),
                     BLOCK_L=cfg.block_l, num_warps=cfg.num_warps)
        grid = (batch, triton.cdiv(dim, cfg.block_d))
        with _on_device(u):
            qin = dlast
            if n_seg > 1:  # pass 1: each later segment's adjoint carry from a zero start; pass 2: combine
                qloc = u.new_empty((batch, dim, n_seg - 1, dstate), dtype=torch.float32)
                dsum = u.new_empty((batch, dim, n_seg - 1), dtype=torch.float32)
                _scan_bwd_kernel[(*grid, n_seg - 1)](
                    u, delta, A32, B, C, D, z, delta_bias, states, None, dout,
                    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, qloc, dsum, scratch,
                    dim, length, dstate, n_seg, seg_len, states.shape[1], *strides,
                    ADJ_ONLY=True, RECOMPUTE=False, **flags)
                qin = _combine(A32, dsum, qloc, dlast, n_seg, reverse=True)
            _scan_bwd_kernel[(*grid, n_seg)](
                u, delta, A32, B, C, D, z, delta_bias, states, qin, dout,
                du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, None, None, scratch,
                dim, length, dstate, n_seg, seg_len, states.shape[1], *strides,
                ADJ_ONLY=False, RECOMPUTE=recompute, **flags)
        return (
            du, ddelta, dA.sum((0, 1)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum((0, 1)).to(D.dtype) if D is not None else None, dz,
            dbias.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None,
            dh0.to(h0.dtype) if h0 is not None else None,
            None, None, None, None,
        )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ScanConfigError(f"{name}={value!r} is not an integer; unset it or give a positive integer") from None


def _plan(length: int, n_segments: int, save_every: int, fwd_cfg: ScanConfig, bwd_cfg: ScanConfig):
    """(n_seg, seg_len, save_every): segments of seg_len steps, a multiple of the checkpoint interval and of the
    forward's chunk; the last segment may be shorter, and n_seg may come out below the request."""
    if n_segments < 1:
        raise ScanConfigError(f"n_segments must be >= 1, got {n_segments}")
    if save_every < bwd_cfg.block_l or save_every & (save_every - 1):
        raise ScanConfigError(f"save_every must be a power of two >= the backward's block_l ({bwd_cfg.block_l}), "
                              f"got {save_every}")
    unit = max(save_every, fwd_cfg.block_l)
    seg_len = max(unit, triton.cdiv(triton.cdiv(length, n_segments), unit) * unit)
    return max(1, triton.cdiv(length, seg_len)), seg_len, save_every


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    *,
    fwd_config: ScanConfig | None = None,
    bwd_config: ScanConfig | None = None,
    n_segments: int | None = None,
    save_every: int | None = None,
):
    """Selective scan with exactly the semantics of `reference.selective_scan_ref`, as Triton kernels.

    u, delta, z: (B, D, L); A: (D, N) real; B, C: (B, N, L); D, delta_bias: (D,); initial_state: (B, D, N).
    Any strides (the mixer passes transposed views without copying). Returns y (B, D, L) in u's dtype, laid out
    like delta, and, if `return_last_state`, the final state (B, D, N) fp32. Differentiable w.r.t. every tensor
    argument. The keywords only trade speed and memory: `fwd_config` / `bwd_config` (default `default_configs`),
    `n_segments` (segments of L scanned in parallel; default env MOAI_SCAN_SEGMENTS, else `default_segments`)
    and `save_every` (steps between the fp32 state checkpoints kept for the backward; default env
    MOAI_SCAN_SAVE_EVERY, else `SAVE_EVERY`). `n_segments=1, save_every=bwd_config.block_l` is the
    unsegmented scan that checkpoints every backward chunk (no recomputation). Tensors must be on a CUDA GPU,
    or on the CPU with TRITON_INTERPRET=1 set before triton was first imported.
    """
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"A must be real with shape (D, N) = ({dim}, N), got {tuple(A.shape)} {A.dtype}")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, dstate, length):
            raise ValueError(f"{name} must have shape (B, N, L) = {(batch, dstate, length)}, got {tuple(t.shape)}")
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, dstate):
        raise ValueError(f"initial_state must have shape (B, D, N) = {(batch, dim, dstate)}, "
                         f"got {tuple(initial_state.shape)}")
    _check_offsets(u, delta, z, B, C)
    default_fwd, default_bwd = default_configs(batch, dim, dstate)
    fwd_config, bwd_config = fwd_config or default_fwd, bwd_config or default_bwd
    if n_segments is None:
        n_segments = _env_int("MOAI_SCAN_SEGMENTS") or default_segments(batch, dim, length, fwd_config,
                                                                         _sm_count(u.device))
    if save_every is None:
        save_every = _env_int("MOAI_SCAN_SAVE_EVERY") or max(SAVE_EVERY, bwd_config.block_l)
    plan = _plan(length, n_segments, save_every, fwd_config, bwd_config)
    out, last = _SelectiveScanTritonFn.apply(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, fwd_config, bwd_config, plan,
    )
    return (out, last) if return_last_state else out
