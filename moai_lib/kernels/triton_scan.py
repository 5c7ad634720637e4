"""Mamba-1 selective scan in Triton (backend ``triton``): a fused forward and a state-recomputing backward.

Same signature and semantics as `reference.selective_scan_ref` (the spec). Shape letters: B batch, D channels,
L length, N state size; T is the chunk length (`ScanConfig.block_l`) and BD the channels per program
(`ScanConfig.block_d`).

The math (Mamba-1, S6, eq. (2a)-(2b), ZOH for A and Euler for B), per (b, d, n):

    delta_t = softplus(delta_t + delta_bias)      a_t = exp(delta_t * A)      x_t = delta_t * u_t * B_t
    h_t = a_t * h_{t-1} + x_t                     y_t = (sum_n C_t * h_t + D * u_t) * silu(z_t)

Design. One program per (batch row, block of BD channels); it walks L in chunks of T steps and carries the fp32
state h (N, BD) in registers from chunk to chunk, so any L works and nothing of size B*D*L*N exists in memory.
Inside a chunk, a_t and x_t form one (T, N, BD) register tile and `tl.associative_scan` over T with the combine
(a1, b1), (a2, b2) -> (a1*a2, b1*a2 + b2) (the composition of the maps h -> a*h + b) gives the chunk's states;
the carried state enters as x_0 + a_0 * h. B_t and C_t, (T, N), are loaded once per program and shared by its
BD channels. delta_bias, softplus, the D skip and the z gate are fused; inputs are read in their dtype (fp32,
bf16, fp16), all arithmetic and the state are fp32, and exp(delta*A) is one MUFU `exp2` (A pre-scaled by log2 e).

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

Strides (channels-last). Every (B, D, L) tensor (u, delta, z, y, dy and the gradients) and B, C (B, N, L) are
addressed through their own (batch, channel or state, time) strides, so the mixer passes views of its (B, L, ·)
activations without copies: u and delta as `x.transpose(1, 2)` of (B, L, E) tensors, z as the second half of
in_proj's (B, L, 2E) output, B and C as column slices of x_proj's (B, L, R + 2N) output. The output and each
gradient are allocated dense in their input's order (`empty_in_layout`): y as (B, L, E) memory, which out_proj
reads in place; du, ddelta, dz as (B, L, E), which autograd hands to x_proj's / dt_proj's backward and
concatenates into in_proj's (B, L, 2E) output gradient (one `cat`, no transposes); dB, dC as (B, L, N) fp32.
Triton specializes integer arguments equal to 1 into constants, so contiguous (B, D, L) inputs compile to the
same unit-stride time addressing as before (compiled offline for sm_90 with Triton 3.6, the GPU machine's, bf16,
default launch shapes: forward 1496 SASS instructions vs 1552 before strides, backward 1920 vs 1896, no spills;
channels-last: 1560 and 1880); channels-last inputs get unit-stride channels instead: a warp's load of one time
step is 32 consecutive channels (64 B in bf16) rather than 32 rows of 4 steps.
What channels-last saves is outside the kernel. Per (b, e, t) element, bf16 autocast, the (B, E, L) mixer's
forward copied delta and z (`.contiguous()`, 4 B each: 2 read + 2 written), x for x_proj and y for out_proj
(the matmul's copy of a transposed operand, 4 B each) and cast y to fp32 and back (12 B): 28 B, plus ~30 B in
torch's conv (pad, fp32 copy, conv, SiLU, cast); its backward mirrored most of it. Against the scan's own 22 B
forward + backward, those copies were ~31% of a 370m training step's GPU time (BENCHMARKS.md section 3).

Backward (recomputation instead of stored B*D*L*N intermediates): when a gradient is needed, the forward also
writes the state entering each backward chunk, (B, D, ceil(L/T_bwd), N) fp32 (or every K steps only: "Sparse
checkpoints" below). The backward program walks its chunks in reverse; per chunk it reloads the inputs,
recomputes a_t, x_t and h_t with the forward scan, and solves the adjoint recurrence

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

Sparse checkpoints (opt-in, `ScanConfig.checkpoint_every` = K, a power of two multiple of T_bwd; the model's
`scan_checkpoint_every`). Dense checkpoints cost 4*N/T_bwd bytes per (b, d, t) element: 16 B at N=16, T=4, 8x the
bf16 input u itself; at B=1, E=4096, L=32K that is 2.0 GiB per layer, held from the forward to the backward (the
largest part of a Mamba block's 4.90 GiB peak on the H200, BENCHMARKS.md section 2; mamba-ssm saves its chunk
states every 2048 steps). With K the forward saves the state every K steps only, 4*N/K bytes per element (0.25 B at
K=256: 32 MiB at that shape, 64x less). The backward walks its chunks in reverse as before; on entering a group of
G = K/T_bwd chunks (at its last chunk) it recomputes the forward over the group's first G-1 chunks from the
group's checkpoint and writes their entering states to a per-program scratch in global memory, (programs, G, N, BD)
fp32 = 4*N*K/T_bwd bytes per (row, channel) = 16 KiB per channel at K=256 (16 MiB at B=1, E=4096; times S rows
when `triton_scan_seg` splits L into S segments: 128 MiB at 32K steps in 8 segments), allocated only during the
backward. Each program touches its own 16*K*BD bytes (64 KiB at BD=16), written and reread within one group,
so the resident programs' working set (~132 SMs x a few programs) is about the H200's 50 MiB L2; if it spills,
the HBM traffic is what the dense checkpoints cost (4*N/T_bwd bytes written and read per element), moved into the
backward. Extra backward cost: one more forward over (G-1)/G of the steps, without y: per (b, d, t, n) one exp2
and ~3 FMAs (delta*A, B*delta*u, the scan's a*h + x), per (b, d, t) the softplus (~20 instructions, shared by the
N states) and a second read of u and delta (2s bytes, likely L2 hits: the group's K steps were just read). The
backward issues ~3x the forward's instructions, so expect ~+30% backward time (~+20% forward + backward) at
K=256; `benchmarks/bench_scan_gpu.py --checkpoint-every` measures it.

In-place gradients (opt-in, `grad_in_place`; the mixer's default). The backward's outputs du, d(delta), dz are
three (B, D, L) tensors allocated while its inputs u, delta, z, dout are all alive: at B=1, E=4096, L=32K 768 MiB
of a block's peak. With `grad_in_place` d(delta) is written over delta and du over dout (the output's gradient),
element for element: every program reads its (b, d, t) elements of delta and dout in a chunk's iteration before it
stores that chunk's gradients to the same addresses (the stores depend on the loads through the reductions over
N, which order any threads holding a replicated copy); no other program touches them (programs own disjoint
channels, segments disjoint times), the sparse-checkpoint recompute reads only chunks the walk has not reached,
and the segmented scan's adjoint-only pass ends before the launch that writes. Its cost is that delta and dout
are gone after the backward: delta's version counter is bumped, so a second backward through the same graph
raises torch's in-place error.

Memory traffic napkin math, bytes per (b, d, t) element, s = bytes of the input dtype (2 for bf16):
- forward: read u, delta, z + write y = 4s (8 B in bf16); B and C are (B, N, L), shared by the D channels:
  2*N*s/D per element (0.016 B at D=4096, N=16), negligible.
- backward: read u, delta, z, dy + write du, ddelta, dz = 7s (14 B in bf16).
- fwd+bwd: 11s (22 B in bf16). `essential_bytes` computes these; the benchmark divides them by the time to
  report achieved GB/s against the ~4 TB/s HBM copy bandwidth of the H200.
- on top of that, training writes and rereads the chunk states, 4*N/T_bwd bytes each way (16 B at N=16, T=4):
  the price of small backward chunks, which keep the backward's registers in bounds (`ScanConfig`).
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
import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import MoaiError


class ScanConfigError(MoaiError, ValueError):
    """A launch shape or checkpoint interval the scan kernels cannot take."""


@dataclass(frozen=True)
class ScanConfig:
    """Launch shape of one scan kernel (forward or backward); every field is a power of two.

    block_d: channels per program (BD); they share the B/C loads, and in the backward the dB/dC reduction.
    block_l: chunk length (T), the steps held in registers; the state is carried between chunks. The backward's
        block_l also sets how often the forward checkpoints the state (4*N/T bytes per element), unless
        `checkpoint_every` says otherwise.
    num_warps: warps per program.
    d_regs: backward only: channel groups per thread (D2); block_d / d_regs channels go on lanes.
    checkpoint_every: backward only, opt-in sparse checkpoints for long contexts. 0 (default): the forward saves
        the state entering every backward chunk. Else a power of two multiple of block_l (e.g. 256): the forward
        saves it every `checkpoint_every` steps only (block_l / checkpoint_every of the memory), and the backward
        recomputes the forward over each group of checkpoint_every / block_l chunks before walking it in reverse
        (see "Sparse checkpoints" in the module docstring). Exact up to fp32 rounding; costs one more forward.
    """

    block_d: int
    block_l: int
    num_warps: int = 1
    d_regs: int = 1
    checkpoint_every: int = 0

    def __post_init__(self):
        for name in ("block_d", "block_l", "num_warps", "d_regs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"ScanConfig.{name} must be a power of two, got {value!r}")
        if self.d_regs > self.block_d:
            raise ValueError(f"ScanConfig.d_regs ({self.d_regs}) cannot exceed block_d ({self.block_d})")
        every = self.checkpoint_every
        if (isinstance(every, bool) or not isinstance(every, int) or every < 0 or every & (every - 1)
                or 0 < every < self.block_l):
            raise ScanConfigError(
                f"ScanConfig.checkpoint_every must be 0 (a checkpoint per backward chunk) or a power of two "
                f">= block_l ({self.block_l}), e.g. 256; got {every!r}")

    @property
    def save_every(self) -> int:
        """Steps between the forward's checkpoints of the state (backward configs)."""
        return self.checkpoint_every or self.block_l

    @property
    def ckpt_group(self) -> int:
        """Backward chunks per checkpoint: 1, or the chunks the backward recomputes from one checkpoint."""
        return self.save_every // self.block_l

    def n_checkpoints(self, length: int) -> int:
        """States the forward saves per (row, channel) for a scan of `length` steps (backward configs)."""
        return triton.cdiv(length, self.save_every)


# Fewer programs than this leaves the H200's 132 SMs short of warps (~8 single-warp programs per SM).
_MIN_PROGRAMS = 1024


def default_configs(batch: int, dim: int, dstate: int = 16,
                    channels_last: bool = False) -> tuple[ScanConfig, ScanConfig]:
    """(forward, backward) launch shapes for the H200. Chosen from static SASS counts (Triton 3.6, sm_90; see the
    module docstring) and the sweeps of `benchmarks/bench_scan_gpu.py --sweep`.
    Narrower blocks for small batch*dim keep enough programs in flight. N <= 16: chunks of T = 64/N steps
    (T*N = 64 values per channel); N > 16: proportionally fewer channels per program, so that the freed lanes
    take the extra states and each thread keeps at most 16. One exception, measured: channels-last inputs (the
    mixer's layout) in the wide regime at N=16 take chunks of 8 steps, forward and backward: twice the loads in
    flight per thread on the strided time axis. H200, L=2K (BENCHMARKS.md section 1): forward alone B=8, D=4096
    1.05 instead of 1.49 ms, B=8, D=2048 0.90 instead of 1.18 ms; at the 370m training shape (B=8, D=2048,
    seventh session) forward+backward 2.95 instead of 3.16 ms with the forward at T=8 and 3.23 instead of 3.31
    with the backward at T=8, which also halves the saved states (4*N/T bytes per element)."""
    n = max(2, triton.next_power_of_2(dstate))
    shrink = max(1, n // 16)
    block_l = 64 // min(n, 16)
    channels = batch * dim
    fwd_bd = next((bd for bd in (32, 16) if channels // bd >= _MIN_PROGRAMS), 8)
    long_chunks = channels_last and fwd_bd >= 16 and n == 16
    fwd = ScanConfig(max(1, fwd_bd // shrink), 2 * block_l if long_chunks else block_l)
    if channels // 16 >= _MIN_PROGRAMS:
        bwd = ScanConfig(max(2, 16 // shrink), 2 * block_l if long_chunks else block_l, d_regs=2)
    else:
        bwd = ScanConfig(max(1, 8 // shrink), block_l)
    return fwd, bwd


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
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, last_ptr, states_ptr, dsum_ptr, carry_dsum_ptr, carry_part_ptr,
    dim, length, dstate, n_chunks, n_saved, seg_first,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
    sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr, SAVE_EVERY: tl.constexpr,
    STORE_DSUM: tl.constexpr, SEG_CARRY: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # u, delta, z, out: (B, D, L) with strides s*_b, s*_d, s*_l (channels-last: s*_d = 1); A: (D, N) contiguous;
    # B, C: (B, N, L) with strides s*_b, s*_n, s*_l; D, bias: (D,); h0, last: (B, D, N) contiguous;
    # states: (B, D, n_saved, N), the state entering every SAVE_EVERY-step chunk of the backward.
    # Segments of L as the batch (`triton_scan_seg`; row b is segment seg_first + b): STORE_DSUM writes each row's
    # sum over its steps of softplus(delta + bias) to dsum (rows, D); SEG_CARRY starts row b from the state that
    # enters its segment, carried in here from the earlier segments' (carry_dsum, carry_part) (S, D), (S, D, N):
    # h = exp(A * dsum[s]) h + part[s] for s < seg_first + b, from the one h0 (D, N) of the sequence (or zero).
    # Tiles are (T, N, BD): time, state, channel (see "Register layout" in the module docstring).
    pid_b = tl.program_id(0).to(tl.int64)
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
    d64 = offs_d.to(tl.int64)
    u_row, dl_row = pid_b * su_b + d64 * su_d, pid_b * sdl_b + d64 * sdl_d  # (BD,) start of each channel's row
    z_row, o_row = pid_b * sz_b + d64 * sz_d, pid_b * so_b + d64 * so_d
    B_row, C_row = pid_b * sB_b + offs_n * sB_n, pid_b * sC_b + offs_n * sC_n  # (N,) rows of B and C
    nd_off = (pid_b * dim + offs_d[None, :]) * dstate + offs_n[:, None]  # (N, BD) into (B, D, N)
    st_off = (pid_b * dim + offs_d[None, :]) * n_saved * dstate + offs_n[:, None]  # (N, BD) into states
    first = offs_l[:, None, None] == 0
    last = offs_l[:, None, None] == BLOCK_L - 1

    dn_off = offs_d[None, :] * dstate + offs_n[:, None]  # (N, BD) into (D, N)
    if SEG_CARRY:
        if HAS_H0:
            h = tl.load(h0_ptr + dn_off, mask=mask_nd, other=0.0).to(tl.float32)
        else:
            h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for s in range(seg_first + pid_b):
            dsum_s = tl.load(carry_dsum_ptr + s * dim + offs_d, mask=mask_d, other=0.0)
            part_s = tl.load(carry_part_ptr + s * dim * dstate + dn_off, mask=mask_nd, other=0.0)
            h = tl.exp2(A2 * dsum_s[None, :]) * h + part_s
    elif HAS_H0:
        h = tl.load(h0_ptr + nd_off, mask=mask_nd, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if STORE_DSUM:
        dsum = tl.zeros([BLOCK_D], dtype=tl.float32)

    for c in range(n_chunks):
        t = c * BLOCK_L + offs_l
        mask_l = t < length
        mask_ld = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        if SAVE_STATES:
            if SAVE_EVERY >= BLOCK_L:
                if (c * BLOCK_L) % SAVE_EVERY == 0:
                    tl.store(states_ptr + st_off + ((c * BLOCK_L) // SAVE_EVERY) * dstate, h, mask=mask_nd)
            else:
                tl.store(states_ptr + st_off + (c * (BLOCK_L // SAVE_EVERY)) * dstate, h, mask=mask_nd)

        t64 = t.to(tl.int64)[:, None]
        u = tl.load(u_ptr + u_row[None, :] + t64 * su_l, mask=mask_ld, other=0.0).to(tl.float32)  # (T, BD)
        dl = tl.load(delta_ptr + dl_row[None, :] + t64 * sdl_l, mask=mask_ld, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dl = dl + bias[None, :]
        if SOFTPLUS:
            dl = _softplus(dl)
        dl = tl.where(mask_ld, dl, 0.0)  # padded steps: a = 1, x = 0, the state passes through
        if STORE_DSUM:
            dsum += tl.sum(dl, axis=0)
        Bt = tl.load(B_ptr + B_row[None, :] + t64 * sB_l, mask=mask_ln, other=0.0).to(tl.float32)  # (T, N)
        Ct = tl.load(C_ptr + C_row[None, :] + t64 * sC_l, mask=mask_ln, other=0.0).to(tl.float32)

        a = tl.exp2(dl[:, None, :] * A2[None, :, :])  # (T, N, BD)
        x = Bt[:, :, None] * (dl * u)[:, None, :]
        # The carried state enters as part of the first step (x_0 + a_0 h); `first` is known per register at
        # compile time, so this costs one FMA per (n, d), and the scan's running product a1*a2 becomes dead code.
        x = tl.where(first, x + a * h[None, :, :], x)
        _, hs = tl.associative_scan((a, x), axis=0, combine_fn=_affine_combine)  # h_t of the chunk
        y = tl.sum(hs * Ct[:, :, None], axis=1)  # (T, BD)
        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            zv = tl.load(z_ptr + z_row[None, :] + t64 * sz_l, mask=mask_ld, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(out_ptr + o_row[None, :] + t64 * so_l, y.to(out_ptr.dtype.element_ty), mask=mask_ld)

        if SAVE_STATES:
            if SAVE_EVERY < BLOCK_L:
                for k in tl.static_range(1, BLOCK_L // SAVE_EVERY):
                    if c * BLOCK_L + k * SAVE_EVERY < length:
                        hk = tl.sum(tl.where(offs_l[:, None, None] == k * SAVE_EVERY - 1, hs, -0.0), axis=0)
                        tl.store(states_ptr + st_off + (c * (BLOCK_L // SAVE_EVERY) + k) * dstate, hk, mask=mask_nd)
        h = tl.sum(tl.where(last, hs, -0.0), axis=0)  # padded steps kept the state of step L-1

    tl.store(last_ptr + nd_off, h, mask=mask_nd)
    if STORE_DSUM:
        tl.store(dsum_ptr + pid_b * dim + offs_d, dsum, mask=mask_d)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr, carry_dsum_ptr, carry_part_ptr,
    scratch_ptr, dim, length, dstate, n_chunks, seg_first, n_seg,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sz_b, sz_d, sz_l, sg_b, sg_d, sg_l,
    sdu_b, sdu_d, sdu_l, sddl_b, sddl_d, sddl_l, sdz_b, sdz_d, sdz_l,
    sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sdB_b, sdB_n, sdB_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, ADJOINT_ONLY: tl.constexpr, HAS_DLAST: tl.constexpr, SEG_CARRY: tl.constexpr,
    CKPT_GROUP: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # Inputs as in the forward; states: (B, D, ceil(n_chunks / CKPT_GROUP), N), the state entering every
    # CKPT_GROUP-th chunk (CKPT_GROUP > 1: sparse checkpoints, the chunk-start states of a group are recomputed
    # into scratch: (programs, CKPT_GROUP, BLOCK_N, BD) fp32, one slice per program); dout: (B, D, L) with
    # strides sg_*; dlast: (B, D, N).
    # Outputs: du, ddelta, dz (B, D, L) in the inputs' dtypes, strides sdu_*, sddl_*, sdz_*; dB, dC (B, N, L)
    # fp32, both with strides sdB_*, accumulated atomically;
    # dA (B, D, N), dD and dbias (B, D) fp32 per batch row; dh0 (B, D, N) fp32.
    # ADJOINT_ONLY: only dh0 (the adjoint carried through the whole row), nothing else read or written but delta,
    # C, z, dout, dlast: what `triton_scan_seg` needs of each segment before the real backward.
    # HAS_DLAST false: a zero incoming adjoint. SEG_CARRY (segments as rows, see the forward): the adjoint entering
    # row b from its end is carried in from the later segments: q = exp(A * dsum[s]) q + part[s] for s from
    # n_seg - 1 down to seg_first + b + 1, starting from the sequence's one dlast (D, N).
    # Tiles are (T, D2, N, D1): the program's BLOCK_D2 * BLOCK_D1 channels are split into D2 groups held in
    # registers and D1 channels along the lanes (see "Register layout" in the module docstring).
    pid_b = tl.program_id(0).to(tl.int64)
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
    d64 = offs_d.to(tl.int64)  # (D2, D1): start of each channel's row in every (B, D, L) tensor
    u_row, dl_row, z_row = pid_b * su_b + d64 * su_d, pid_b * sdl_b + d64 * sdl_d, pid_b * sz_b + d64 * sz_d
    g_row, du_row = pid_b * sg_b + d64 * sg_d, pid_b * sdu_b + d64 * sdu_d
    ddl_row, dz_row = pid_b * sddl_b + d64 * sddl_d, pid_b * sdz_b + d64 * sdz_d
    B_row, C_row = pid_b * sB_b + offs_n * sB_n, pid_b * sC_b + offs_n * sC_n  # (N,)
    dBC_row = pid_b * sdB_b + offs_n * sdB_n
    bdn_off = pid_b * dim * dstate + dnd  # (D2, N, D1) into (B, D, N)
    n_saved = (n_chunks + CKPT_GROUP - 1) // CKPT_GROUP
    st_off = (pid_b * dim + offs_d[:, None, :]) * n_saved * dstate + offs_n[None, :, None]
    if CKPT_GROUP > 1:
        # This program's scratch: CKPT_GROUP slots of (BLOCK_N, BD) fp32, slot k the state entering the group's
        # chunk k. Channels on the fastest axis: a warp's store of one state is consecutive channels.
        pid = pid_b * tl.num_programs(1) + tl.program_id(1)
        d_loc = tl.arange(0, BLOCK_D2)[:, None] * BLOCK_D1 + tl.arange(0, BLOCK_D1)[None, :]  # (D2, D1)
        slot = BLOCK_N * BLOCK_D2 * BLOCK_D1
        scr_off = pid * CKPT_GROUP * slot + offs_n[None, :, None] * (BLOCK_D2 * BLOCK_D1) + d_loc[:, None, :]
    first = offs_l[:, None, None, None] == 0
    last = offs_l[:, None, None, None] == BLOCK_L - 1

    # q: a_{t1} g_{t1}, the adjoint handed in from after the chunk
    if not HAS_DLAST:
        q = tl.zeros([BLOCK_D2, BLOCK_N, BLOCK_D1], dtype=tl.float32)
    elif SEG_CARRY:
        q = tl.load(dlast_ptr + dnd, mask=mask_dnd, other=0.0).to(tl.float32)
    else:
        q = tl.load(dlast_ptr + bdn_off, mask=mask_dnd, other=0.0).to(tl.float32)
    if SEG_CARRY:
        for i in range(n_seg - 1 - seg_first - pid_b):
            s = n_seg - 1 - i
            dsum_s = tl.load(carry_dsum_ptr + s * dim + offs_d, mask=mask_d, other=0.0)[:, None, :]
            part_s = tl.load(carry_part_ptr + s * dim * dstate + dnd, mask=mask_dnd, other=0.0)
            q = tl.exp2(A2 * dsum_s) * q + part_s
    dA_acc = tl.zeros([BLOCK_D2, BLOCK_N, BLOCK_D1], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D2, BLOCK_D1], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D2, BLOCK_D1], dtype=tl.float32)
    ones = tl.full([BLOCK_L, BLOCK_D2, BLOCK_N, BLOCK_D1], 1.0, tl.float32)

    for i in range(n_chunks):
        c = n_chunks - 1 - i
        if CKPT_GROUP > 1 and not ADJOINT_ONLY:
            c0 = (c // CKPT_GROUP) * CKPT_GROUP  # the group's first chunk, whose entering state was saved
            if (c == n_chunks - 1) | (c - c0 == CKPT_GROUP - 1):
                # The reverse walk enters a group (at its last chunk, or at the tail's): recompute the forward
                # over the group's chunks c0 .. c-1 from its checkpoint, into the scratch slots 0 .. c-c0.
                # Memory ordering: the scratch is written and read by different threads of the program (the
                # (D2, N, D1) state of a scan reduction and that of a load need not share a layout), so a
                # barrier (bar.sync, which also orders global memory within the CTA) separates the previous
                # group's last reads of the slots from these writes (WAR) and these writes from the reads below
                # (RAW). The branch condition is uniform over the program.
                tl.debug_barrier()
                hg = tl.load(states_ptr + st_off + (c // CKPT_GROUP) * dstate, mask=mask_dnd, other=0.0)
                for k in range(c - c0):
                    tl.store(scratch_ptr + scr_off + k * slot, hg)
                    tk = (c0 + k) * BLOCK_L + offs_l  # a full chunk: only the walk's first chunk has a tail
                    tk64 = tk.to(tl.int64)[:, None, None]
                    dk = tl.load(delta_ptr + dl_row[None, :, :] + tk64 * sdl_l, mask=mask_d[None, :, :],
                                 other=0.0).to(tl.float32)
                    if HAS_BIAS:
                        dk = dk + bias[None, :, :]
                    if SOFTPLUS:
                        dk = _softplus(dk)
                    uk = tl.load(u_ptr + u_row[None, :, :] + tk64 * su_l, mask=mask_d[None, :, :],
                                 other=0.0).to(tl.float32)
                    Bk = tl.load(B_ptr + B_row[None, :] + tk.to(tl.int64)[:, None] * sB_l, mask=mask_n[None, :],
                                 other=0.0).to(tl.float32)[:, None, :, None]
                    ak = tl.exp2(dk[:, :, None, :] * A2[None, :, :, :])
                    xk = Bk * (dk * uk)[:, :, None, :]
                    xk = tl.where(first, xk + ak * hg[None, :, :, :], xk)
                    _, hk = tl.associative_scan((ak, xk), axis=0, combine_fn=_affine_combine)
                    hg = tl.sum(tl.where(last, hk, -0.0), axis=0)
                tl.store(scratch_ptr + scr_off + (c - c0) * slot, hg)
                tl.debug_barrier()
        t = c * BLOCK_L + offs_l
        mask_l = t < length
        mask_ld = mask_l[:, None, None] & mask_d[None, :, :]  # (T, D2, D1)
        mask_ln = mask_l[:, None] & mask_n[None, :]  # (T, N)
        t64 = t.to(tl.int64)[:, None, None]  # (T, 1, 1)
        # Recompute the chunk's forward: a_t, x_t, h_t (and y_t when the gate needs it).
        pre = tl.load(delta_ptr + dl_row[None, :, :] + t64 * sdl_l, mask=mask_ld, other=0.0).to(tl.float32)
        if HAS_BIAS:
            pre = pre + bias[None, :, :]
        if SOFTPLUS:
            dl = _softplus(pre)
        else:
            dl = pre
        dl = tl.where(mask_ld, dl, 0.0)
        tn64 = t.to(tl.int64)[:, None]  # (T, 1)
        Ct = tl.load(C_ptr + C_row[None, :] + tn64 * sC_l, mask=mask_ln, other=0.0).to(tl.float32)[:, None, :, None]
        a = tl.exp2(dl[:, :, None, :] * A2[None, :, :, :])  # (T, D2, N, D1)
        if not ADJOINT_ONLY:
            if CKPT_GROUP > 1:
                h_start = tl.load(scratch_ptr + scr_off + (c % CKPT_GROUP) * slot)
            else:
                h_start = tl.load(states_ptr + st_off + c * dstate, mask=mask_dnd, other=0.0)
            u = tl.load(u_ptr + u_row[None, :, :] + t64 * su_l, mask=mask_ld, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + B_row[None, :] + tn64 * sB_l, mask=mask_ln,
                         other=0.0).to(tl.float32)[:, None, :, None]  # (T, 1, N, 1)
            du_ = (dl * u)[:, :, None, :]
            x = Bt * du_
            _, hs = tl.associative_scan((a, tl.where(first, x + a * h_start[None, :, :, :], x)), axis=0,
                                        combine_fn=_affine_combine)

        # dy: gradient w.r.t. the scan output sum_n C h (before the D skip and the gate).
        dy = tl.load(dout_ptr + g_row[None, :, :] + t64 * sg_l, mask=mask_ld, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + z_row[None, :, :] + t64 * sz_l, mask=mask_ld, other=0.0).to(tl.float32)
            sz = tl.sigmoid(zv)
            if not ADJOINT_ONLY:
                y = tl.sum(hs * Ct, axis=2)
                if HAS_D:
                    y += Dv[None, :, :] * u
                dz = dy * y * sz * (1.0 + zv * (1.0 - sz))  # d silu(z)/dz = sig(z) (1 + z (1 - sig(z)))
                tl.store(dz_ptr + dz_row[None, :, :] + t64 * sdz_l, dz.to(dz_ptr.dtype.element_ty), mask=mask_ld)
            dy = dy * zv * sz
        if not ADJOINT_ONLY:
            if HAS_D:
                dD_acc += tl.sum(dy * u, axis=0)
                du = dy * Dv[None, :, :]
            else:
                du = tl.zeros([BLOCK_L, BLOCK_D2, BLOCK_D1], dtype=tl.float32)

        # Adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}: a reverse scan of (P, Q, a_first) segments, with the carry q
        # from the later chunk entering through the last step (padded steps have a = 1 and pass it on).
        dy4 = dy[:, :, None, :]
        cdy = Ct * dy4
        cdy = tl.where(last, cdy + q[None, :, :, :], cdy)
        _, g, _ = tl.associative_scan((ones, _flip_time(cdy, offs_l, BLOCK_L), _flip_time(a, offs_l, BLOCK_L)),
                                      axis=0, combine_fn=_adjoint_combine)
        g = _flip_time(g, offs_l, BLOCK_L)
        q = tl.sum(tl.where(first, a * g, -0.0), axis=0)  # a_{t0} g_{t0}, handed to the chunk before

        if not ADJOINT_ONLY:
            # (T, N), summed over this program's channels: first over the D2 groups in registers, then over lanes.
            dC = tl.sum(tl.sum(hs * dy4, axis=1), axis=2)
            dB = tl.sum(tl.sum(g * du_, axis=1), axis=2)
            ptr_dbc = dBC_row[None, :] + tn64 * sdB_l
            tl.atomic_add(dC_ptr + ptr_dbc, dC, mask=mask_ln, sem="relaxed")
            tl.atomic_add(dB_ptr + ptr_dbc, dB, mask=mask_ln, sem="relaxed")
            s = g * (hs - x)  # g_t a_t h_{t-1}: the gradient w.r.t. delta_t * A (padded steps: times delta = 0)
            dA_acc += tl.sum(s * dl[:, :, None, :], axis=0)
            gdu = tl.sum(g * Bt, axis=2)  # dL/d(delta_t u_t), (T, D2, D1)
            ddl = tl.sum(s * A[None, :, :, :], axis=2) + gdu * u
            du += gdu * dl
            if SOFTPLUS:
                ddl = ddl * tl.sigmoid(pre)  # softplus'(x) = sigmoid(x)
            if HAS_BIAS:
                dbias_acc += tl.sum(tl.where(mask_ld, ddl, 0.0), axis=0)
            tl.store(du_ptr + du_row[None, :, :] + t64 * sdu_l, du.to(du_ptr.dtype.element_ty), mask=mask_ld)
            tl.store(ddelta_ptr + ddl_row[None, :, :] + t64 * sddl_l, ddl.to(ddelta_ptr.dtype.element_ty),
                     mask=mask_ld)

    if not ADJOINT_ONLY:
        tl.store(dA_ptr + bdn_off, dA_acc, mask=mask_dnd)
        bd_off = pid_b * dim + offs_d
        if HAS_D:
            tl.store(dD_ptr + bd_off, dD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_ptr + bd_off, dbias_acc, mask=mask_d)
    if HAS_H0:
        tl.store(dh0_ptr + bdn_off, q, mask=mask_dnd)


def _block_n(dstate: int) -> int:
    return max(2, triton.next_power_of_2(dstate))


def _grid(batch: int, dim: int, cfg: ScanConfig):
    return (batch, triton.cdiv(dim, cfg.block_d))


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _channels_last(t: torch.Tensor) -> bool:
    """Whether a (B, D, L) tensor steps faster along D than along L (a (B, L, D) tensor viewed transposed)."""
    return t.stride(1) < t.stride(2)


def empty_in_layout(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense tensor of t's (B, X, L) shape whose memory is laid out in t's order: (B, L, X) memory viewed as
    (B, X, L) when t is channels-last, else contiguous. A gradient in its input's layout is what autograd
    scatters back into the producer (e.g. dz into in_proj's (B, L, 2E) output gradient) without a transpose."""
    batch, dim, length = t.shape
    dtype = dtype or t.dtype
    if _channels_last(t):
        return t.new_empty((batch, length, dim), dtype=dtype).transpose(1, 2)
    return t.new_empty((batch, dim, length), dtype=dtype)


def _dense(t: torch.Tensor) -> bool:
    """Whether a (B, X, L) tensor is dense in one of the two layouts `empty_in_layout` makes."""
    return t.is_contiguous() or t.transpose(1, 2).is_contiguous()


def grad_buffers(u: torch.Tensor, delta: torch.Tensor, dout: torch.Tensor, in_place: bool):
    """(du, ddelta) for the backward: new tensors in their inputs' layouts, or with `in_place` ("In-place
    gradients" in the module docstring) ddelta in delta's own memory and du in dout's, where they are dense (du in
    dout's memory also needs u's dtype: a gradient has its input's dtype)."""
    ddelta = delta if in_place and _dense(delta) else empty_in_layout(delta)
    reuse_dout = (in_place and _dense(dout) and dout.dtype == u.dtype
                  and dout.untyped_storage().data_ptr() != delta.untyped_storage().data_ptr())
    return (dout if reuse_dout else empty_in_layout(u)), ddelta


def mark_overwritten(delta: torch.Tensor, ddelta: torch.Tensor) -> None:
    """After a backward that wrote ddelta over delta: bump delta's version counter, so that a second backward
    through the same graph (retain_graph=True) fails with torch's "modified by an inplace operation" error
    instead of reading a gradient as delta."""
    if ddelta is delta:
        torch.autograd.graph.increment_version(delta)


def _zeros_in_layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return empty_in_layout(t, dtype).zero_()


def _strides(*tensors) -> list[int]:
    """(batch, channel or state, time) strides of each (B, X, L) tensor, flattened; 0s for None."""
    return [s for t in tensors for s in (t.stride() if t is not None else (0, 0, 0))]


def launch_fwd(u, delta, A32, B, C, D, z, delta_bias, h0, out, last, states, softplus: bool,
               fwd_cfg: ScanConfig, bwd_cfg: ScanConfig, dsum=None, carry=None, seg_first: int = 0) -> None:
    """One forward launch over (B', D, L') views of any strides (the batch may be a set of segments of L, see
    `triton_scan_seg`): writes out, last (B', D, N) fp32 and, if `states` is given, the backward's checkpoints
    (B', D, bwd_cfg.n_checkpoints(L'), N) fp32. h0, last and states are contiguous. Segments: `dsum` (B', D)
    receives each row's sum of softplus(delta + bias); `carry` = (dsum, part) of all segments makes row b start
    from the state entering segment seg_first + b, h0 then being the sequence's (D, N) initial state."""
    batch, dim, length = u.shape
    dstate = A32.shape[1]
    save = states is not None
    carry_dsum, carry_part = carry if carry is not None else (None, None)
    _scan_fwd_kernel[_grid(batch, dim, fwd_cfg)](
        u, delta, A32, B, C, D, z, delta_bias, h0, out, last, states, dsum, carry_dsum, carry_part,
        dim, length, dstate, triton.cdiv(length, fwd_cfg.block_l), states.shape[2] if save else 0, seg_first,
        *_strides(u, delta, z, out, B, C),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=h0 is not None,
        SOFTPLUS=softplus, SAVE_STATES=save, SAVE_EVERY=bwd_cfg.save_every,
        STORE_DSUM=dsum is not None, SEG_CARRY=carry is not None,
        BLOCK_D=fwd_cfg.block_d, BLOCK_N=_block_n(dstate), BLOCK_L=fwd_cfg.block_l, num_warps=fwd_cfg.num_warps,
    )


def bwd_scratch(batch: int, dim: int, dstate: int, cfg: ScanConfig, device) -> torch.Tensor | None:
    """The backward's scratch for sparse checkpoints (`cfg.checkpoint_every`): the chunk-start states of one group
    per program, (programs, checkpoint_every / block_l, N, BD) fp32, for a launch over `batch` rows; None when
    every chunk has its checkpoint."""
    if cfg.ckpt_group == 1:
        return None
    programs = batch * triton.cdiv(dim, cfg.block_d)
    return torch.empty((programs, cfg.ckpt_group, _block_n(dstate), cfg.block_d), dtype=torch.float32,
                       device=device)


def launch_bwd(u, delta, A32, B, C, D, z, delta_bias, states, dout, dlast, du, ddelta, dA, dB, dC, dD, dz, dbias,
               dh0, softplus: bool, cfg: ScanConfig, adjoint_only: bool = False, carry=None, seg_first: int = 0,
               n_seg: int = 0, scratch: torch.Tensor | None = None) -> None:
    """One backward launch over (B', D, L') views (as `launch_fwd`). dB and dC are fp32, zeroed by the caller,
    accumulated atomically, with B's strides. dlast None: a zero incoming adjoint. `adjoint_only`: write dh0 only
    (u, B, states and the other outputs are not touched and may be None). `carry` = (dsum, part) of all n_seg
    segments: row b's incoming adjoint is carried in from the segments after seg_first + b, dlast then being the
    sequence's (D, N) final-state gradient. `states` holds cfg.n_checkpoints(L') states per row; with sparse
    checkpoints (cfg.checkpoint_every) `scratch` is `bwd_scratch` of at least this launch's size (allocated here
    when None; callers launching repeatedly pass one)."""
    batch, dim, length = delta.shape
    dstate = A32.shape[1]
    carry_dsum, carry_part = carry if carry is not None else (None, None)
    group = 1 if adjoint_only else cfg.ckpt_group  # the adjoint alone reads no states
    if group > 1 and scratch is None:
        scratch = bwd_scratch(batch, dim, dstate, cfg, delta.device)
    _scan_bwd_kernel[_grid(batch, dim, cfg)](
        u, delta, A32, B, C, D, z, delta_bias, states, dout, dlast,
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, carry_dsum, carry_part, scratch if group > 1 else None,
        dim, length, dstate, triton.cdiv(length, cfg.block_l), seg_first, n_seg,
        *_strides(u, delta, z, dout, du, ddelta, dz, B, C, dB),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=dh0 is not None,
        SOFTPLUS=softplus, ADJOINT_ONLY=adjoint_only, HAS_DLAST=dlast is not None, SEG_CARRY=carry is not None,
        CKPT_GROUP=group, BLOCK_D2=cfg.d_regs, BLOCK_D1=cfg.block_d // cfg.d_regs,
        BLOCK_N=_block_n(dstate), BLOCK_L=cfg.block_l, num_warps=cfg.num_warps,
    )


class _SelectiveScanTritonFn(torch.autograd.Function):
    """The fused selective scan; saves only its inputs and the (B, D, bwd_cfg.n_checkpoints(L), N) chunk states.

    u, delta, z, B, C may have any strides (channels-last views in the model: no copies); the output and every
    (B, X, L) gradient is dense in the layout of its input (`empty_in_layout`)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, fwd_cfg, bwd_cfg, grad_in_place):
        # u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L); D, delta_bias: (D,); h0: (B, D, N) or None.
        batch, dim, length = u.shape
        dstate = A.shape[1]
        D, delta_bias = (t.contiguous() if t is not None else None for t in (D, delta_bias))
        A32 = A.float().contiguous()
        save = any(ctx.needs_input_grad)
        n_saved = bwd_cfg.n_checkpoints(length)
        states = u.new_empty((batch, dim, n_saved if save else 0, dstate), dtype=torch.float32)
        out = empty_in_layout(u)
        last = u.new_empty((batch, dim, dstate), dtype=torch.float32)
        h0c = h0.contiguous() if h0 is not None else None
        with _on_device(u):
            launch_fwd(u, delta, A32, B, C, D, z, delta_bias, h0c, out, last, states if save else None,
                       bool(delta_softplus), fwd_cfg, bwd_cfg)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, states)
            ctx.delta_softplus, ctx.bwd_cfg, ctx.grad_in_place = bool(delta_softplus), bwd_cfg, grad_in_place
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, h0, states = ctx.saved_tensors
        cfg = ctx.bwd_cfg
        batch, dim, length = u.shape
        dstate = A.shape[1]
        dlast = dlast.float().contiguous()
        du, ddelta = grad_buffers(u, delta, dout, ctx.grad_in_place)
        dz = empty_in_layout(z) if z is not None else None
        # dB and dC share one layout (strides) in the kernel: B's.
        dB, dC = _zeros_in_layout(B, torch.float32), _zeros_in_layout(B, torch.float32)
        dA = u.new_empty((batch, dim, dstate), dtype=torch.float32)
        dD = u.new_empty((batch, dim), dtype=torch.float32) if D is not None else None
        dbias = u.new_empty((batch, dim), dtype=torch.float32) if delta_bias is not None else None
        dh0 = u.new_empty((batch, dim, dstate), dtype=torch.float32) if h0 is not None else None
        with _on_device(u):
            launch_bwd(u, delta, A.float().contiguous(), B, C, D, z, delta_bias, states, dout, dlast,
                       du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, ctx.delta_softplus, cfg)
        mark_overwritten(delta, ddelta)
        return (
            du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            dh0.to(h0.dtype) if h0 is not None else None,
            None, None, None, None,
        )


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
    segment_len: int | None = None,
    checkpoint_every: int | None = None,
    grad_in_place: bool = False,
):
    """Selective scan with exactly the semantics of `reference.selective_scan_ref`, as Triton kernels.

    u, delta, z: (B, D, L); A: (D, N) real; B, C: (B, N, L); D, delta_bias: (D,); initial_state: (B, D, N).
    u, delta, z, B, C may have any strides: channels-last views ((B, L, D) memory viewed as (B, D, L), e.g.
    `x.transpose(1, 2)`, or B/C as column slices of x_proj's (B, L, R + 2N) output) are read in place.
    Returns y (B, D, L) in u's dtype, dense in u's layout (channels-last u: y is a (B, L, D) tensor viewed
    transposed), and, if `return_last_state`, the final state (B, D, N) fp32. Gradients come back in the layout
    of their inputs.
    Differentiable w.r.t. every tensor argument. `fwd_config` / `bwd_config` only trade speed
    (defaults: `default_configs`), and so does `segment_len`: split L into segments of that many steps, scanned
    in parallel (`triton_scan_seg`; exact); None chooses (`triton_scan_seg.segment_len_for`: only long sequences of
    small batches), 0 never splits. `checkpoint_every` (None: the backward config's, 0 by default) trades backward
    time for memory: the forward saves the state every that many steps instead of every backward chunk
    (`ScanConfig.checkpoint_every`; a power of two >= the backward's block_l, e.g. 256). Tensors must be on a
    CUDA GPU, or on the CPU with TRITON_INTERPRET=1 set before triton was first imported.
    `grad_in_place` (memory): the backward writes d(delta) into delta's memory and du into the output gradient's
    (module docstring, "In-place gradients"). Only for callers that own both: nothing reads delta after the scan,
    and the output's gradient is a tensor nothing else reads (the mixer's case: delta is dt_proj's output, the
    gradient comes from out_proj). A second backward through the graph then raises instead of reading garbage.
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
    from . import triton_scan_seg

    if segment_len is None:
        segment_len = triton_scan_seg.segment_len_for(batch, dim, length)
    elif not isinstance(segment_len, int) or segment_len < 0:
        raise ValueError(f"segment_len must be an int >= 0 (0: do not split L), got {segment_len!r}")
    split = 0 < segment_len < length
    # Split: each launch scans batch x segments rows, and gets the launch shape of that many rows.
    default_fwd, default_bwd = default_configs(batch * (triton.cdiv(length, segment_len) if split else 1), dim,
                                               dstate, channels_last=_channels_last(u))
    fwd_config, bwd_config = fwd_config or default_fwd, bwd_config or default_bwd
    if checkpoint_every is not None:
        bwd_config = dataclasses.replace(bwd_config, checkpoint_every=checkpoint_every)
    if split:
        out, last = triton_scan_seg._SegmentedScanFn.apply(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, fwd_config, bwd_config,
            segment_len, grad_in_place,
        )
    else:
        out, last = _SelectiveScanTritonFn.apply(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, fwd_config, bwd_config,
            grad_in_place,
        )
    return (out, last) if return_last_state else out
