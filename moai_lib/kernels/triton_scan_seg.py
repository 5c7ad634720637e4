"""Selective scan split over L for small batches (Triton; used by `triton_scan.selective_scan_triton`).

Why. The scan kernels (`triton_scan`) give each program a (batch row, block of channels) and walk all of L in
it, carrying the state. At batch 1 with D=4096 that is 512 single-warp programs, ~4 warps per SM of the H200's 132:
the forward moves 150-200 GB/s (3-5% of HBM, against 17% at batch 8). Batch 1 is the prefill of a prompt and the
long-context training regime, so it needs parallelism over L.

How (exact, no approximation). The recurrence h_t = a_t h_{t-1} + x_t is affine in the state, so over a segment
s of Ls steps it is h_end = P_s h_start + h_end^0, with P_s = prod_t a_t = exp(A * sum_t delta_t) (per channel and
state: A is diagonal) and h_end^0 the segment's final state from a zero start. Three passes:
  1. every segment but the last runs the forward kernel from a zero state (no D skip, no gate: only its final
     state is kept) while a small kernel sums softplus(delta + bias) per segment (the exponent of P_s);
  2. one short sequential kernel over the S segments: h_in[s] = P_{s-1} h_in[s-1] + h_end^0[s-1];
  3. every segment runs the real forward kernel from h_in[s]: y, the final state and the backward's checkpoints.
The backward mirrors it: the adjoint of the state is linear too, dL/dh_start[s] = P_s dL/dh_end[s] + (the part
from the segment's own outputs). Pass 1b runs the backward kernel with a zero incoming adjoint to get that part;
pass 2b runs the carry backwards; pass 3b runs the real backward of every segment with its true incoming adjoint.
Each segment's gradients are then exactly the full scan's restricted to the segment (the same h_start, the same
incoming adjoint), so the sums over segments of dA, dD, d(delta_bias) and the dB, dC rows are exact.

Cost: passes 1 and 1b recompute work the unsplit kernel does once (the forward ~(2 - 1/S)x exponentials, the
backward up to 2x), traded for S times more programs. It pays where the unsplit kernel is latency-bound: when
B * D / BD programs are too few to fill the GPU (see `segment_len_for`), and gives each launch the shape of a large-batch one.

Segments are batch rows of the same kernels: a (D, S*Ls) slice of one batch row viewed as (S, D, Ls) with the time
stride as the batch stride (every input may have any strides, see `triton_scan`); a shorter tail is one more
launch of batch 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_scan as ts

# Split only sequences at least this long: below it the extra launches cost more host time than the scan saves
# (measured on the H200 at B=1, D=4096: no gain at L=2K, 1.4x forward / 1.6x forward+backward at 32K).
_MIN_SPLIT_LENGTH = 4096
_MIN_SEGMENT = 512
# Split until batch x segments x channels reach what the widest default launch needs to fill the GPU: then every
# launch has the shape of a large-batch scan (`default_configs` of batch x segments rows).
_WIDE_CHANNELS = ts._MIN_PROGRAMS * 32


def segment_len_for(batch: int, dim: int, length: int) -> int:
    """Steps per segment (a multiple of 64), or 0: do not split (the batch is wide enough, or L too short)."""
    if batch * dim >= _WIDE_CHANNELS or length < _MIN_SPLIT_LENGTH:
        return 0
    n_seg = min(triton.cdiv(_WIDE_CHANNELS, batch * dim), length // _MIN_SEGMENT)
    return triton.cdiv(triton.cdiv(length, n_seg), 64) * 64 if n_seg >= 2 else 0


@triton.jit
def _segment_delta_sum_kernel(
    delta_ptr, bias_ptr, out_ptr, dim, length, seg_len, n_seg, s_d, s_l,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # delta: one batch row (D, L) with strides s_d, s_l; out: (S, D) fp32, sum of softplus(delta + bias) over
    # each segment's steps (the exponent of the segment's decay P_s = exp(A * out)).
    seg = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for l0 in range(0, seg_len, BLOCK_L):
        step = l0 + tl.arange(0, BLOCK_L)
        t = seg * seg_len + step
        mask = mask_d[:, None] & ((step < seg_len) & (t < length))[None, :]
        v = tl.load(delta_ptr + offs_d.to(tl.int64)[:, None] * s_d + t.to(tl.int64)[None, :] * s_l, mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_BIAS:
            v = v + bias[:, None]
        if SOFTPLUS:
            v = ts._softplus(v)
        acc += tl.sum(tl.where(mask, v, 0.0), axis=1)
    tl.store(out_ptr + seg * dim + offs_d, acc, mask=mask_d)


@triton.jit
def _segment_carry_kernel(
    dsum_ptr, A_ptr, part_ptr, first_ptr, out_ptr, total_ptr, dim, dstate, n_seg,
    REVERSE: tl.constexpr, HAS_FIRST: tl.constexpr, BLOCK: tl.constexpr,
):
    # The affine carry over segments, per (channel, state) of one batch row; P_s = exp(A * dsum[s]).
    # Forward (states): out[0] = first; out[s] = P_{s-1} out[s-1] + part[s-1]; total = P_{S-1} out[S-1] + part[S-1]
    #   (part: each segment's final state from a zero start; total: the scan's final state).
    # Reverse (adjoints): out[S-1] = first; out[s] = P_{s+1} out[s+1] + part[s+1]; total = P_0 out[0] + part[0]
    #   (part: each segment's dL/dh_start with a zero incoming adjoint; out[s]: the adjoint entering segment s
    #   from its end; total: dL/dh0).
    # dsum: (S, D); A: (D, N); part, out: (S, D, N) fp32; first, total: (D, N).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim * dstate
    d = offs // dstate
    A2 = tl.load(A_ptr + offs, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_FIRST:
        h = tl.load(first_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n_seg):
        s = n_seg - 1 - i if REVERSE else i
        tl.store(out_ptr + s * dim * dstate + offs, h, mask=mask)
        decay = tl.exp2(A2 * tl.load(dsum_ptr + s * dim + d, mask=mask, other=0.0))
        h = decay * h + tl.load(part_ptr + s * dim * dstate + offs, mask=mask, other=0.0)
    tl.store(total_ptr + offs, h, mask=mask)


def _segments(t: torch.Tensor, b: int, n_seg: int, seg_len: int) -> torch.Tensor:
    """Batch row b's first n_seg * seg_len steps of a (B, X, L) tensor, viewed as (n_seg, X, seg_len)."""
    sb, sx, sl = t.stride()
    return t.as_strided((n_seg, t.shape[1], seg_len), (seg_len * sl, sx, sl), t.storage_offset() + b * sb)


class _Split:
    """Where the segments of one batch row lie: `pieces` are (first segment, count, view) for the equal-length
    segments and for a shorter tail; `view(t)` maps a (B, X, L) tensor to that piece's (count, X, len) view."""

    def __init__(self, length: int, seg_len: int):
        self.seg_len = seg_len
        self.n_full, self.tail = divmod(length, seg_len)
        self.n_seg = self.n_full + (self.tail > 0)

    def pieces(self, b: int):
        out = []
        if self.n_full:
            out.append((0, self.n_full, lambda t: None if t is None else _segments(t, b, self.n_full, self.seg_len)))
        if self.tail:
            start = self.n_full * self.seg_len
            out.append((self.n_full, 1, lambda t: None if t is None else t[b:b + 1, :, start:]))
        return out

    def leading(self, b: int):
        """The view of every segment but the last (pass 1), as (count, view)."""
        k = self.n_seg - 1
        return k, (lambda t: None if t is None else _segments(t, b, k, self.seg_len))


def _delta_sums(delta_row: torch.Tensor, delta_bias, out: torch.Tensor, seg_len: int, softplus: bool) -> None:
    """out (S, D) fp32 = per segment, the sum over its steps of softplus(delta + bias) for one batch row (D, L)."""
    dim, length = delta_row.shape
    block_d = 64
    _segment_delta_sum_kernel[(out.shape[0], triton.cdiv(dim, block_d))](
        delta_row, delta_bias, out, dim, length, seg_len, out.shape[0], delta_row.stride(0), delta_row.stride(1),
        HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, BLOCK_D=block_d, BLOCK_L=32,
    )


def _carry(dsum, A32, part, first, out, total, reverse: bool) -> None:
    """The affine carry over segments (`_segment_carry_kernel`) for one batch row."""
    dim, dstate = A32.shape
    block = 256
    _segment_carry_kernel[(triton.cdiv(dim * dstate, block),)](
        dsum, A32, part, first, out, total, dim, dstate, part.shape[0],
        REVERSE=reverse, HAS_FIRST=first is not None, BLOCK=block,
    )


class _SegmentedScanFn(torch.autograd.Function):
    """`triton_scan._SelectiveScanTritonFn` with L split into segments (module docstring): the same inputs,
    outputs and gradients. Saves the inputs, the backward's checkpoints, each segment's entering state and the
    per-segment delta sums."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, fwd_cfg, bwd_cfg, seg_len):
        batch, dim, length = u.shape
        dstate = A.shape[1]
        D, delta_bias = (t.contiguous() if t is not None else None for t in (D, delta_bias))
        h0 = h0.contiguous() if h0 is not None else None
        A32 = A.float().contiguous()
        softplus = bool(delta_softplus)
        split = _Split(length, seg_len)
        save = any(ctx.needs_input_grad)
        f32 = dict(dtype=torch.float32, device=u.device)
        out = ts.empty_in_layout(u)
        last = torch.empty((batch, dim, dstate), **f32)
        # The backward's checkpoints, per batch row and segment (each segment is a batch row of the kernels).
        states = [torch.empty((batch, n, dim, triton.cdiv(view_len, bwd_cfg.block_l) if save else 0, dstate),
                              **f32) for n, view_len in ((split.n_full, seg_len), (int(split.tail > 0), split.tail)) if n]
        h_in = torch.empty((batch, split.n_seg, dim, dstate), **f32)
        dsum = torch.empty((batch, split.n_seg, dim), **f32)
        part = torch.empty((split.n_seg, dim, dstate), **f32)
        with ts._on_device(u):
            for b in range(batch):
                _delta_sums(delta[b], delta_bias, dsum[b], seg_len, softplus)
                # Pass 1: every segment but the last from a zero state; only its final state is kept (the outputs
                # it writes into `out` are overwritten by pass 3).
                k, view = split.leading(b)
                if k:
                    ts.launch_fwd(view(u), view(delta), A32, view(B), view(C), None, None, delta_bias, None,
                                  view(out), part[:k], None, softplus, fwd_cfg, bwd_cfg)
                # Pass 2: the state entering every segment (h_in[b, k] is the last segment's).
                _carry(dsum[b], A32, part[:k], h0[b] if h0 is not None else None, h_in[b, :k], h_in[b, k],
                       reverse=False)
                # Pass 3: the real forward of every segment from its entering state.
                for (first, n, view), st in zip(split.pieces(b), states):
                    seg_last = torch.empty((n, dim, dstate), **f32)
                    ts.launch_fwd(view(u), view(delta), A32, view(B), view(C), D, view(z), delta_bias,
                                  h_in[b, first:first + n], view(out), seg_last, st[b] if save else None, softplus,
                                  fwd_cfg, bwd_cfg)
                last[b].copy_(seg_last[-1])
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, h_in, dsum, *states)
            ctx.cfg = (softplus, bwd_cfg, seg_len)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, h0, h_in, dsum, *states = ctx.saved_tensors
        softplus, cfg, seg_len = ctx.cfg
        batch, dim, length = u.shape
        dstate = A.shape[1]
        split = _Split(length, seg_len)
        A32 = A.float().contiguous()
        f32 = dict(dtype=torch.float32, device=u.device)
        dlast = dlast.float().contiguous() if dlast is not None else torch.zeros((batch, dim, dstate), **f32)
        du, ddelta = ts.empty_in_layout(u), ts.empty_in_layout(delta)
        dz = ts.empty_in_layout(z) if z is not None else None
        dB, dC = ts._zeros_in_layout(B, torch.float32), ts._zeros_in_layout(B, torch.float32)
        # Per-segment partial sums of dA, dD, d(delta_bias), added up below.
        dA = torch.zeros((batch, split.n_seg, dim, dstate), **f32)
        dD = torch.zeros((batch, split.n_seg, dim), **f32) if D is not None else None
        dbias = torch.zeros((batch, split.n_seg, dim), **f32) if delta_bias is not None else None
        dh0 = torch.empty((batch, dim, dstate), **f32) if h0 is not None else None
        zeros = torch.zeros((split.n_seg, dim, dstate), **f32)
        part = torch.empty((split.n_seg, dim, dstate), **f32)
        g = torch.empty((split.n_seg, dim, dstate), **f32)
        dh0_row = torch.empty((dim, dstate), **f32)
        with ts._on_device(u):
            for b in range(batch):
                # Pass 1b: each segment's dL/dh_start with a zero incoming adjoint (its own outputs' part).
                for first, n, view in split.pieces(b):
                    ts.launch_bwd(None, view(delta), A32, None, view(C), D, view(z), delta_bias, None, view(dout),
                                  zeros[first:first + n], None, None, None, None, None, None, None, None,
                                  part[first:first + n], softplus, cfg, adjoint_only=True)
                # Pass 2b: the adjoint entering every segment from its end; dh0_row = dL/dh0.
                _carry(dsum[b], A32, part, dlast[b], g, dh0_row, reverse=True)
                if dh0 is not None:
                    dh0[b].copy_(dh0_row)
                # Pass 3b: the real backward of every segment.
                for (first, n, view), st in zip(split.pieces(b), states):
                    sl = slice(first, first + n)
                    ts.launch_bwd(view(u), view(delta), A32, view(B), view(C), D, view(z), delta_bias, st[b],
                                  view(dout), g[sl], view(du), view(ddelta), dA[b, sl], view(dB), view(dC),
                                  dD[b, sl] if D is not None else None, view(dz),
                                  dbias[b, sl] if delta_bias is not None else None, None, softplus, cfg)
        return (
            du, ddelta, dA.sum((0, 1)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum((0, 1)).to(D.dtype) if D is not None else None, dz,
            dbias.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None,
            dh0.to(h0.dtype) if h0 is not None else None,
            None, None, None, None,
        )
