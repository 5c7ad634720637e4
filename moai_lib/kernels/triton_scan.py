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

from ..errors import MoaiError
from .triton_scan_kernels import (  # noqa: F401  (_softplus: shared with triton_decode)
    _scan_bwd_kernel,
    _scan_fwd_kernel,
    _segment_combine_kernel,
    _softplus,
)


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


def _compact(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, or a contiguous copy when t is a view into a larger storage (what saving it would keep alive)."""
    if t is None or t.untyped_storage().nbytes() <= t.numel() * t.element_size():
        return t
    return t.contiguous()


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
            # A saved view pins its whole storage: the mixer's z is half of in_proj's output (B, L, 2E), so keep
            # a compact copy instead (2 bytes per element once, where saving the view would keep 4).
            u, delta, z = (_compact(t) for t in (u, delta, z))
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
