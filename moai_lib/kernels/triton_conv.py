"""Causal depthwise conv1d (+ bias, + SiLU) in Triton, forward and backward (backend ``triton``).

Same semantics as `reference.causal_conv1d_ref` (the spec): x (B, D, L), weight (D, W), bias (D,), optional
initial_states (B, D, W-1) (the inputs before x, e.g. from a decode cache),

    pre_t = bias + sum_{k<W} w_k * x_{t-W+1+k}        (x_{<0} = initial_states, or 0)
    out_t = silu(pre_t)  (or pre_t without the activation)

Why channels-last. In the mixer, x is the first E columns of in_proj's (B, L, 2E) output: viewed as (B, E, L) its
time stride is 2E and its channel stride 1. torch's depthwise conv wants (B, E, L) contiguous, so the reference
path pads and copies it, converts to fp32, convolves, slices, applies SiLU and converts back: ~30 bytes of HBM
traffic per element (bf16) and 5 launches, and x_proj then needs its (B, L, E) transpose copied once more.
Here a program owns a (T, BD) tile, time by channel, with the channels on the lanes: each time step of the tile
is one contiguous run of BD channels (256 B at BD = 128 in bf16), so every load is coalesced whatever the time
stride. The output is written in (B, L, D) memory (returned as its (B, D, L) view), which is what x_proj and the
channels-last scan read in place.

Napkin math, bytes per (b, d, t) element, s = bytes of the dtype (2 for bf16); 370m preset, B=8, L=2048, E=2048:
33.5M elements, HBM ~4 TB/s (copy bandwidth measured on the H200).
- forward: read x + write out = 2s = 4 B (134 MB, >= 34 us). The W shifted reads of a tile hit L1/L2.
- backward: read x, dout + write dx = 3s = 6 B (201 MB, >= 50 us; measured 0.24 ms, so it is bound by its
  ~40 instructions per element, not by HBM). The pre-activation is recomputed (W loads and FMAs per element)
  instead of stored (which would cost another 2s written and read), once per element plus the tile's halo:
  dx_t needs dpre_{t..t+W-1}, gathered from the tile's registers. dweight and dbias are reduced over the tile in
  registers and written as fp32 partial sums per (batch row, time block) (B * L/116 * D * W * 4 bytes: 4.6 MB at
  370m, ~2% of the traffic), summed by torch.
- the torch path (pad, fp32 copy, conv, slice, SiLU, cast; and its backward in fp32) moves ~5x more.

The final states (`return_final_states`: the last W-1 inputs, the decode cache) are a (B, D, W-1) slice taken by
torch. The gradient w.r.t. initial_states (only its W-1 first outputs depend on it) is computed by the reference
on those W-1 steps: exact and O(B*D*W) work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import MoaiError
from .reference import causal_conv1d_ref
from .triton_scan import _on_device, _strides, empty_in_layout

MAX_WIDTH = 4  # the kernels unroll W shifted loads per tile; mamba's conv is W = 4
# Forward: tiles of 128 channels by 16 steps, 4 warps (Triton 3.6 on sm_90, `cuobjdump -res-usage`: 64 registers,
# no spills, ~720 SASS instructions per tile; 2.5 TB/s on the H200). Backward: tiles of 32 channels by 32 steps
# (29 owned at W = 4), one warp, 4 tiles per program. Measured on the H200 (seventh session, ad-hoc sweeps,
# BENCHMARKS.md section 2; bf16, W = 4, SiLU, channels-last x and dout), B=1, E=4096, L=32K / B=8, E=2048, L=2K
# (the 370m training shape): 0.86 / 0.24 ms. The earlier backward, which recomputed the pre-activation at each of
# the W shifts (4 sigmoids per element), took 3.71 / 1.00 ms in the forward's shape (128 channels, 4 warps: the
# dweight sums over time crossed warps, through shared memory) and 1.23 / 0.34 ms in one warp of 32 channels.
_BLOCK_D = 128
_FWD_BLOCK_L = 16
_NUM_WARPS = 4
_BWD_BLOCK_D = 32
_BWD_BLOCK_L = 32
_BWD_TILES = 4  # tiles per backward program (116 steps at W = 4)
_BWD_NUM_WARPS = 1


class ConvArgumentError(MoaiError, ValueError):
    """Arguments the Triton causal conv cannot take."""


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why `causal_conv1d_triton` cannot run these shapes (then use torch's conv), or None. Offsets inside one
    batch row are 32-bit in the kernels (fewer instructions per load)."""
    if weight.shape[-1] > MAX_WIDTH:
        return f"the Triton causal conv supports widths 1..{MAX_WIDTH}, got W={weight.shape[-1]}"
    span = (x.shape[1] - 1) * abs(x.stride(1)) + (x.shape[2] - 1) * abs(x.stride(2))
    if max(span, x.shape[1] * x.shape[2]) >= 2 ** 31:
        return f"a batch row of x spans {span} elements, over the kernels' 32-bit offsets"
    return None


@triton.jit
def _x_shifted(x_ptr, x_row, init_ptr, init_row, t, shift, length, mask_d, sx_l, si_l,
               WIDTH: tl.constexpr, HAS_INIT: tl.constexpr):
    # x_{t - shift} for a (T, BD) tile of times t, fp32; before step 0 from initial_states (the W-1 inputs before
    # x, cast to x's dtype first, as the reference does), else 0.
    pos = t - shift
    m = ((pos >= 0) & (pos < length))[:, None] & mask_d[None, :]
    xv = tl.load(x_ptr + x_row[None, :] + pos[:, None] * sx_l, mask=m, other=0.0).to(tl.float32)
    if HAS_INIT:
        mi = ((pos < 0) & (t < length))[:, None] & mask_d[None, :]
        iv = tl.load(init_ptr + init_row[None, :] + (pos + WIDTH - 1)[:, None] * si_l, mask=mi, other=0.0)
        xv += iv.to(x_ptr.dtype.element_ty).to(tl.float32)
    return xv


@triton.jit
def _pre_activation(x_ptr, x_row, init_ptr, init_row, w_ptr, offs_d, mask_d, bias, t, length, sx_l, si_l,
                    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # pre_t = bias + sum_k w_k x_{t-W+1+k} for a (T, BD) tile of times t (`_x_shifted`). Returns it in fp32.
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += bias[None, :]
    for k in tl.static_range(WIDTH):
        wk = tl.load(w_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[None, :] * _x_shifted(x_ptr, x_row, init_ptr, init_row, t, WIDTH - 1 - k, length, mask_d,
                                        sx_l, si_l, WIDTH, HAS_INIT)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, out_ptr,
    dim, length,
    sx_b, sx_d, sx_l, si_b, si_d, si_l, so_b, so_d, so_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # x: (B, D, L) strides sx_*; w: (D, W) contiguous; bias: (D,); init: (B, D, W-1) strides si_*;
    # out: (B, D, L) strides so_* (channels-last in practice: so_d = 1). Grid: (L / T, D / BD, B).
    pid_b = tl.program_id(2).to(tl.int64)
    x_ptr += pid_b * sx_b  # 64-bit batch offsets in the base pointers; offsets inside a batch row are 32-bit
    if HAS_INIT:
        init_ptr += pid_b * si_b
    out_ptr += pid_b * so_b
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    pre = _pre_activation(x_ptr, offs_d * sx_d, init_ptr, offs_d * si_d, w_ptr, offs_d,
                          mask_d, bias, t, length, sx_l, si_l, WIDTH, HAS_BIAS, HAS_INIT, BLOCK_L, BLOCK_D)
    out = pre * tl.sigmoid(pre) if SILU else pre
    mask = (t < length)[:, None] & mask_d[None, :]
    o_ptr = out_ptr + (offs_d * so_d)[None, :] + t[:, None] * so_l
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr,
    dim, length, n_lblocks,
    sx_b, sx_d, sx_l, si_b, si_d, si_l, sg_b, sg_d, sg_l, sdx_b, sdx_d, sdx_l,
    WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr,
):
    # dout: (B, D, L) strides sg_*; dx: strides sdx_*; dw: (B * n_lblocks, D, WIDTH_P2) fp32 partial sums;
    # dbias: (B * n_lblocks, D) fp32 partial sums. A program walks TILES tiles.
    #   dpre_t = dout_t * silu'(pre_t);  dx_t = sum_j w_{W-1-j} dpre_{t+j};  dw_k = sum_t dpre_t x_{t-W+1+k}
    # Each pre-activation gradient is computed once: a tile covers T steps and owns (writes dx for, sums dweight
    # over) its first S = T - (W-1); the rest is the halo its owned steps read, taken from the tile itself by
    # `tl.gather` along time. Tiles advance by S steps (the next tile recomputes the halo: T/S of the work, 1.10x
    # at T=32, W=4), and the W shifted inputs are loaded once for both the pre-activation and dweight.
    # Grid: (L / (TILES * S), D / BD, B).
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(2).to(tl.int64)
    x_ptr += pid_b * sx_b  # 64-bit batch offsets in the base pointers; offsets inside a batch row are 32-bit
    if HAS_INIT:
        init_ptr += pid_b * si_b
    dout_ptr += pid_b * sg_b
    dx_ptr += pid_b * sdx_b
    S: tl.constexpr = BLOCK_L - (WIDTH - 1)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_L)
    offs_w = tl.arange(0, WIDTH_P2)
    mask_d = offs_d < dim
    d64 = offs_d.to(tl.int64)
    x_row, init_row = offs_d * sx_d, offs_d * si_d
    g_row, dx_row = offs_d * sg_d, offs_d * sdx_d
    # w_k for the W taps (k = 0 reads the oldest input), fp32
    w0 = tl.load(w_ptr + offs_d * WIDTH, mask=mask_d, other=0.0).to(tl.float32)
    if WIDTH > 1:
        w1 = tl.load(w_ptr + offs_d * WIDTH + 1, mask=mask_d, other=0.0).to(tl.float32)
    if WIDTH > 2:
        w2 = tl.load(w_ptr + offs_d * WIDTH + 2, mask=mask_d, other=0.0).to(tl.float32)
    if WIDTH > 3:
        w3 = tl.load(w_ptr + offs_d * WIDTH + 3, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    dw = tl.zeros([BLOCK_D, WIDTH_P2], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = pid_l * TILES * S
    for i in range(tl.cdiv(tl.minimum(length - start, TILES * S), S)):  # the tiles inside L
        t = start + i * S + offs_t
        # inputs at the W shifts: xk = x_{t-(W-1)+k}; pre = bias + sum_k w_k xk
        x0 = _x_shifted(x_ptr, x_row, init_ptr, init_row, t, WIDTH - 1, length, mask_d, sx_l, si_l, WIDTH, HAS_INIT)
        pre = bias[None, :] + w0[None, :] * x0
        if WIDTH > 1:
            x1 = _x_shifted(x_ptr, x_row, init_ptr, init_row, t, WIDTH - 2, length, mask_d, sx_l, si_l, WIDTH, HAS_INIT)
            pre += w1[None, :] * x1
        if WIDTH > 2:
            x2 = _x_shifted(x_ptr, x_row, init_ptr, init_row, t, WIDTH - 3, length, mask_d, sx_l, si_l, WIDTH, HAS_INIT)
            pre += w2[None, :] * x2
        if WIDTH > 3:
            x3 = _x_shifted(x_ptr, x_row, init_ptr, init_row, t, WIDTH - 4, length, mask_d, sx_l, si_l, WIDTH, HAS_INIT)
            pre += w3[None, :] * x3
        in_l = (t < length)[:, None] & mask_d[None, :]
        dpre = tl.load(dout_ptr + g_row[None, :] + t[:, None] * sg_l, mask=in_l, other=0.0).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))  # silu'(p) = sig(p) (1 + p (1 - sig(p))); 0 past L
        # dx_t = sum_j w_{W-1-j} dpre_{t+j}: w_{W-1} dpre_t, then the later steps gathered from the tile
        if WIDTH == 1:
            dx = w0[None, :] * dpre
        elif WIDTH == 2:
            dx = w1[None, :] * dpre + w0[None, :] * _later(dpre, offs_t, 1, BLOCK_L, BLOCK_D)
        elif WIDTH == 3:
            dx = (w2[None, :] * dpre + w1[None, :] * _later(dpre, offs_t, 1, BLOCK_L, BLOCK_D)
                  + w0[None, :] * _later(dpre, offs_t, 2, BLOCK_L, BLOCK_D))
        else:
            dx = (w3[None, :] * dpre + w2[None, :] * _later(dpre, offs_t, 1, BLOCK_L, BLOCK_D)
                  + w1[None, :] * _later(dpre, offs_t, 2, BLOCK_L, BLOCK_D)
                  + w0[None, :] * _later(dpre, offs_t, 3, BLOCK_L, BLOCK_D))
        owned = (offs_t < S)[:, None] & in_l
        tl.store(dx_ptr + dx_row[None, :] + t[:, None] * sdx_l, dx.to(dx_ptr.dtype.element_ty), mask=owned)
        # this tile's share of dweight and dbias: its owned steps
        dpre = tl.where(owned, dpre, 0.0)
        if HAS_BIAS:
            dbias += tl.sum(dpre, axis=0)
        dw += tl.where(offs_w[None, :] == 0, tl.sum(dpre * x0, axis=0)[:, None], 0.0)
        if WIDTH > 1:
            dw += tl.where(offs_w[None, :] == 1, tl.sum(dpre * x1, axis=0)[:, None], 0.0)
        if WIDTH > 2:
            dw += tl.where(offs_w[None, :] == 2, tl.sum(dpre * x2, axis=0)[:, None], 0.0)
        if WIDTH > 3:
            dw += tl.where(offs_w[None, :] == 3, tl.sum(dpre * x3, axis=0)[:, None], 0.0)

    part = pid_b * n_lblocks + pid_l  # this program's row of partial sums
    tl.store(dw_ptr + (part * dim + d64)[:, None] * WIDTH_P2 + offs_w[None, :], dw, mask=mask_d[:, None])
    if HAS_BIAS:
        tl.store(dbias_ptr + part * dim + d64, dbias, mask=mask_d)


@triton.jit
def _later(v, offs_t, j: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # v[t + j] along the tile's time axis (clamped at its end: only halo rows read past it, and they are not owned)
    idx = tl.minimum(offs_t + j, BLOCK_L - 1)
    return tl.gather(v, tl.broadcast_to(idx[:, None], (BLOCK_L, BLOCK_D)), axis=0)


def _grid(batch: int, dim: int, length: int, block_l: int, block_d: int):
    return (triton.cdiv(length, block_l), triton.cdiv(dim, block_d), batch)


class _CausalConv1dTritonFn(torch.autograd.Function):
    """Conv forward/backward; saves only its inputs (the backward recomputes the pre-activation)."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, activation):
        batch, dim, length = x.shape
        width = weight.shape[1]
        w = weight.contiguous()
        b = bias.contiguous() if bias is not None else None
        out = x.new_empty((batch, length, dim)).transpose(1, 2)  # (B, D, L) view of (B, L, D) memory
        silu = activation is not None
        with _on_device(x):
            _conv_fwd_kernel[_grid(batch, dim, length, _FWD_BLOCK_L, _BLOCK_D)](
                x, w, b, initial_states, out, dim, length, *_strides(x, initial_states, out),
                WIDTH=width, HAS_BIAS=b is not None, HAS_INIT=initial_states is not None, SILU=silu,
                BLOCK_L=_FWD_BLOCK_L, BLOCK_D=_BLOCK_D, num_warps=_NUM_WARPS,
            )
        ctx.save_for_backward(x, w, b, initial_states)
        ctx.activation, ctx.weight_dtype = activation, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, b, init = ctx.saved_tensors
        batch, dim, length = x.shape
        width = w.shape[1]
        width_p2 = triton.next_power_of_2(width)
        steps = _BWD_BLOCK_L - (width - 1)  # steps a tile owns
        n_lblocks = triton.cdiv(length, steps * _BWD_TILES)
        dx = empty_in_layout(x)
        dw = x.new_empty((batch * n_lblocks, dim, width_p2), dtype=torch.float32)
        db = x.new_empty((batch * n_lblocks, dim), dtype=torch.float32) if b is not None else None
        with _on_device(x):
            _conv_bwd_kernel[_grid(batch, dim, length, steps * _BWD_TILES, _BWD_BLOCK_D)](
                x, w, b, init, dout, dx, dw, db, dim, length, n_lblocks, *_strides(x, init, dout, dx),
                WIDTH=width, WIDTH_P2=width_p2, HAS_BIAS=b is not None, HAS_INIT=init is not None,
                SILU=ctx.activation is not None, BLOCK_L=_BWD_BLOCK_L, BLOCK_D=_BWD_BLOCK_D, TILES=_BWD_TILES,
                num_warps=_BWD_NUM_WARPS,
            )
        dinit = None
        if init is not None and ctx.needs_input_grad[3]:
            # Only the first W-1 outputs read initial_states: differentiate the reference on those steps.
            steps = min(width - 1, length)
            with torch.enable_grad():
                init_ = init.detach().requires_grad_()
                head = causal_conv1d_ref(x[..., :steps].detach(), w, b, init_, activation=ctx.activation)
                (dinit,) = torch.autograd.grad(head, init_, dout[..., :steps])
        return (dx, dw.sum(0)[:, :width].to(ctx.weight_dtype),
                db.sum(0).to(ctx.bias_dtype) if db is not None else None, dinit, None)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """`reference.causal_conv1d_ref` as Triton kernels, differentiable w.r.t. x, weight, bias, initial_states.

    x: (B, D, L), any strides (channels-last views, e.g. a column slice of in_proj's (B, L, 2E) output viewed as
    (B, E, L), are read in place); weight: (D, W), W <= 4; bias: (D,); initial_states: (B, D, W-1).
    Returns out (B, D, L) in x's dtype as a view of (B, L, D) memory (channels-last), and, if
    `return_final_states`, the last W-1 inputs (B, D, W-1). Tensors must be on a CUDA GPU, or on the CPU with
    TRITON_INTERPRET=1 set before triton was first imported.
    """
    if activation not in (None, "silu", "swish"):
        raise ConvArgumentError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ConvArgumentError(f"x must be (B, D, L) and weight (D, W) with the same D, got {tuple(x.shape)} "
                                f"and {tuple(weight.shape)}")
    batch, dim, length = x.shape
    width = weight.shape[1]
    reason = unsupported_reason(x, weight)
    if reason is not None:
        raise ConvArgumentError(f"{reason}; use backend='torch' (dispatch.causal_conv1d falls back by itself)")
    if initial_states is not None and tuple(initial_states.shape) != (batch, dim, width - 1):
        raise ConvArgumentError(f"initial_states must have shape (B, D, W-1) = {(batch, dim, width - 1)}, "
                                f"got {tuple(initial_states.shape)}")
    if initial_states is not None and width == 1:
        initial_states = None  # nothing to read from it
    out = _CausalConv1dTritonFn.apply(x, weight, bias, initial_states, activation)
    if not return_final_states:
        return out
    if width == 1:
        return out, x[..., :0]
    prefix = (initial_states.to(x.dtype) if initial_states is not None
              else x.new_zeros((batch, dim, width - 1)))
    return out, torch.cat([prefix, x[..., -(width - 1):]], dim=-1)[..., -(width - 1):]
