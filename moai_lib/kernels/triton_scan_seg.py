"""Selective scan split over L for small batches (Triton; used by `triton_scan.selective_scan_triton`).

Why. The scan kernels (`triton_scan`) give each program a (batch row, block of channels) and walk all of L in
it, carrying the state. At batch 1 with D=4096 that is 512 single-warp programs, ~4 warps per SM of the H200's 132:
the forward moves 150-200 GB/s (3-5% of HBM, against 17% at batch 8). Batch 1 is the prefill of a prompt and the
long-context training regime, so it needs parallelism over L.

How (exact, no approximation). The recurrence h_t = a_t h_{t-1} + x_t is affine in the state, so over a segment
s of Ls steps it is h_end = P_s h_start + h_end^0, with P_s = prod_t a_t = exp(A * sum_t delta_t) (per channel and
state: A is diagonal) and h_end^0 the segment's final state from a zero start. Two launches:
  1. every segment but the last runs the forward kernel from a zero state (no D skip, no gate), keeping its final
     state h_end^0 and its sum of softplus(delta + bias) (the exponent of P_s);
  2. every segment runs the real forward kernel (y, the final state, the backward's checkpoints) from the state
     entering it, which each program first carries in from pass 1's results (`SEG_CARRY` in the kernel):
     h = P_r h + h_end^0[r] for the segments r before its own, S-1 steps on (N, BD) tiles.
The backward mirrors it: the adjoint of the state is linear too, dL/dh_start[s] = P_s dL/dh_end[s] + (the part
from the segment's own outputs). Pass 1b runs the backward kernel in its adjoint-only mode with a zero incoming
adjoint to get that part; pass 2b runs the real backward of every segment, its incoming adjoint carried in from
the later segments. Each segment's gradients are then exactly the full scan's restricted to the segment (the same
h_start, the same incoming adjoint), so the sums over segments of dA, dD, d(delta_bias) and the dB, dC rows are
exact.

Cost: pass 1 recomputes work the unsplit kernel does once (~(2 - 1/S)x the forward's exponentials) and pass 1b
costs the adjoint alone (no recomputed state, no dB/dC reductions), traded for S times more programs. It pays
where the unsplit kernel is latency-bound: when B * D / BD programs are too few to fill the GPU (see
`segment_len_for`), and gives each launch the shape of a large-batch one.

Segments are batch rows of the same kernels: a (D, S*Ls) slice of one batch row viewed as (S, D, Ls) with the time
stride as the batch stride (every input may have any strides, see `triton_scan`); a shorter tail is one more
launch of batch 1.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from . import triton_scan as ts

# Split only sequences at least this long, into segments at least _MIN_SEGMENT long. Measured on the H200 (370m,
# B=1, 2K prompt): splitting from L=2048 halves the layers' GPU time under a CUDA graph (8.2 vs 16.5 ms) but the
# eager prefill is host-bound and the two extra launches per layer made it slower (19-24 vs 18-19 ms): so from
# 2048 while a CUDA graph is being captured (launches then cost nothing at replay), from 4096 otherwise.
_MIN_SPLIT_LENGTH = 4096
_MIN_SPLIT_LENGTH_GRAPHED = 2048
_graph_launches = False
_MIN_SEGMENT = 512
# Split only batches too narrow for the unsplit launches (fewer than `_MIN_PROGRAMS` programs of 16 channels: the
# regime where `default_configs` narrows its blocks), and until batch x segments x channels reach what the widest
# default launch needs: every launch then has the shape of a large-batch scan.
_NARROW_CHANNELS = ts._MIN_PROGRAMS * 16
_WIDE_CHANNELS = ts._MIN_PROGRAMS * 32


@contextlib.contextmanager
def graph_launches():
    """Inside: choose launch shapes for a CUDA graph (its launches cost nothing at replay), as during a capture:
    the scan splits from L = 2048. For the warm-up before a capture, so that it compiles the captured kernels."""
    global _graph_launches
    previous, _graph_launches = _graph_launches, True
    try:
        yield
    finally:
        _graph_launches = previous


def segment_len_for(batch: int, dim: int, length: int) -> int:
    """Steps per segment (a multiple of 64), or 0: do not split (the batch is wide enough, or L too short)."""
    graphed = _graph_launches or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    if batch * dim >= _NARROW_CHANNELS or length < (_MIN_SPLIT_LENGTH_GRAPHED if graphed else _MIN_SPLIT_LENGTH):
        return 0
    n_seg = min(triton.cdiv(_WIDE_CHANNELS, batch * dim), length // _MIN_SEGMENT)
    return triton.cdiv(triton.cdiv(length, n_seg), 64) * 64 if n_seg >= 2 else 0


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


class _SegmentedScanFn(torch.autograd.Function):
    """`triton_scan._SelectiveScanTritonFn` with L split into segments (module docstring): the same inputs,
    outputs and gradients. Saves the inputs, the backward's checkpoints and the per-segment delta sums."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, fwd_cfg, bwd_cfg, seg_len,
                grad_in_place):
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
        states = [torch.empty((batch, n, dim, bwd_cfg.n_checkpoints(view_len) if save else 0, dstate), **f32)
                  for n, view_len in ((split.n_full, seg_len), (int(split.tail > 0), split.tail)) if n]
        # Pass 1's per-segment delta sums and zero-start final states (all but the last segment), and pass 2's
        # delta sums of every segment (the backward's carry).
        dsum1 = torch.empty((split.n_seg, dim), **f32)
        part = torch.empty((split.n_seg, dim, dstate), **f32)
        dsum = torch.empty((batch, split.n_seg, dim), **f32)
        with ts._on_device(u):
            for b in range(batch):
                # Pass 1: every segment but the last from a zero state, keeping its final state and delta sum
                # (the outputs it writes into `out` are overwritten by pass 2).
                k, view = split.leading(b)
                ts.launch_fwd(view(u), view(delta), A32, view(B), view(C), None, None, delta_bias, None, view(out),
                              part[:k], None, softplus, fwd_cfg, bwd_cfg, dsum=dsum1[:k])
                # Pass 2: every segment from the state entering it, carried in-kernel from pass 1's results.
                for (first, n, view), st in zip(split.pieces(b), states, strict=True):
                    seg_last = torch.empty((n, dim, dstate), **f32)
                    ts.launch_fwd(view(u), view(delta), A32, view(B), view(C), D, view(z), delta_bias,
                                  h0[b] if h0 is not None else None, view(out), seg_last, st[b] if save else None,
                                  softplus, fwd_cfg, bwd_cfg, dsum=dsum[b, first:first + n], carry=(dsum1, part),
                                  seg_first=first)
                last[b].copy_(seg_last[-1])
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, dsum, *states)
            ctx.cfg = (softplus, bwd_cfg, seg_len, grad_in_place)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, h0, dsum, *states = ctx.saved_tensors
        softplus, cfg, seg_len, grad_in_place = ctx.cfg
        batch, dim, length = u.shape
        dstate = A.shape[1]
        split = _Split(length, seg_len)
        A32 = A.float().contiguous()
        f32 = dict(dtype=torch.float32, device=u.device)
        dlast = dlast.float().contiguous() if dlast is not None else None
        du, ddelta = ts.grad_buffers(u, delta, dout, grad_in_place)
        dz = ts.empty_in_layout(z) if z is not None else None
        dB, dC = ts._zeros_in_layout(B, torch.float32), ts._zeros_in_layout(B, torch.float32)
        # Per-segment partial sums of dA, dD, d(delta_bias), added up below.
        dA = torch.empty((batch, split.n_seg, dim, dstate), **f32)
        dD = torch.empty((batch, split.n_seg, dim), **f32) if D is not None else None
        dbias = torch.empty((batch, split.n_seg, dim), **f32) if delta_bias is not None else None
        dh0 = torch.empty((batch, split.n_seg, dim, dstate), **f32) if h0 is not None else None
        part = torch.empty((split.n_seg, dim, dstate), **f32)
        # Sparse checkpoints: one scratch for every pass-2b launch (stream-ordered), sized for the largest.
        scratch = ts.bwd_scratch(max(split.n_full, 1), dim, dstate, cfg, u.device)
        with ts._on_device(u):
            for b in range(batch):
                pieces = split.pieces(b)
                # Pass 1b: each segment's dL/dh_start from its own outputs (a zero incoming adjoint).
                for first, n, view in pieces:
                    ts.launch_bwd(None, view(delta), A32, None, view(C), D, view(z), delta_bias, None, view(dout),
                                  None, None, None, None, None, None, None, None, None, part[first:first + n],
                                  softplus, cfg, adjoint_only=True)
                # Pass 2b: the real backward of every segment, its incoming adjoint carried in-kernel from pass 1b's
                # results of the later segments. Segment 0's dL/dh_start is dL/dh0.
                for (first, n, view), st in zip(pieces, states, strict=True):
                    sl = slice(first, first + n)
                    ts.launch_bwd(view(u), view(delta), A32, view(B), view(C), D, view(z), delta_bias, st[b],
                                  view(dout), dlast[b] if dlast is not None else None, view(du), view(ddelta),
                                  dA[b, sl], view(dB), view(dC), dD[b, sl] if D is not None else None, view(dz),
                                  dbias[b, sl] if delta_bias is not None else None,
                                  dh0[b, sl] if h0 is not None else None, softplus, cfg, carry=(dsum[b], part),
                                  seg_first=first, n_seg=split.n_seg, scratch=scratch)
        ts.mark_overwritten(delta, ddelta)
        return (
            du, ddelta, dA.sum((0, 1)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum((0, 1)).to(D.dtype) if D is not None else None, dz,
            dbias.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None,
            dh0[:, 0].to(h0.dtype) if h0 is not None else None,
            None, None, None, None, None,
        )
