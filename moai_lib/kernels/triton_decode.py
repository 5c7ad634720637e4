"""Decode-step kernels in Triton (backend ``triton``): one token of the selective scan and of the causal conv,
and `ssm_step_triton`, the model's fused step (dt projection + softplus + state update + D skip + SiLU(z) gate).

Same signatures and semantics as `reference.selective_state_update_ref` and `reference.causal_conv1d_update_ref`
(the spec); both update their state in place. Shape letters: B batch, D channels, N state size, W conv width.

A decode step is launch- and bandwidth-bound: per channel it reads the (N,) fp32 state once and writes it once
(8*N bytes, 128 B at N=16) and the conv state (W-1 values) likewise; one program handles a block of channels
of one batch row, with B_t and C_t, (N,), loaded once and shared by the block. Inputs may be strided views (the
model passes column slices of the in_proj/x_proj outputs), so every tensor goes in with its strides and
nothing is copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch_dependents, trigger_dependents
from .reference import selective_state_update_ref
from .triton_scan import _on_device, _softplus

_BLOCK_D = 64  # channels per program: (64, 16) fp32 state tile = 4 KiB, 8 values per thread at 4 warps


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dim, dstate,
    s_state_b, s_state_d, s_state_n, s_x_b, s_x_d, s_dt_b, s_dt_d, s_A_d, s_A_n,
    s_B_b, s_B_n, s_C_b, s_C_n, s_z_b, s_z_d, s_D, s_bias, s_out_b, s_out_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # state: (B, D, N); x, dt, z, out: (B, D); A: (D, N); B, C: (B, N); D, bias: (D,).
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]

    state_ptrs = state_ptr + pid_b * s_state_b + offs_d[:, None] * s_state_d + offs_n[None, :] * s_state_n
    h = tl.load(state_ptrs, mask=mask_dn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * s_dt_b + offs_d * s_dt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + pid_b * s_B_b + offs_n * s_B_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * s_C_b + offs_n * s_C_n, mask=mask_n, other=0.0).to(tl.float32)

    h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask_dn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + offs_d * s_D, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_z_b + offs_d * s_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + pid_b * s_out_b + offs_d * s_out_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _ssm_step_kernel(
    state_ptr, x_ptr, xdbl_ptr, wdt_ptr, bias_ptr, A_ptr, D_ptr, z_ptr, out_ptr,
    dim, dstate, rank,
    s_state_b, s_state_d, s_state_n, s_x_b, s_x_d, s_xdbl_b, s_xdbl_c, s_w_d, s_w_r, s_A_d, s_A_n,
    s_z_b, s_z_d, s_out_b, s_out_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, TRIGGER: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # state: (B, D, N) fp32; x, z, out: (B, D); x_dbl: (B, R + 2N) = [dt_low; B; C]; W_dt: (D, R); A: (D, N).
    if TRIGGER:  # the next kernel (out_proj's GEMV) may launch and start loading its weights (`kernels.pdl`)
        gdc_launch_dependents()
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_r = offs_r < rank
    mask_dn = mask_d[:, None] & mask_n[None, :]
    row = xdbl_ptr + pid_b * s_xdbl_b

    # Δ = softplus(W_dt · dt_low + bias): the (BLOCK_D, R) slice of dt_proj's weight, read once per step. The
    # product is rounded to x_proj's output dtype, as the unfused `F.linear` would return it.
    dt_low = tl.load(row + offs_r * s_xdbl_c, mask=mask_r, other=0.0).to(tl.float32)
    w = tl.load(wdt_ptr + offs_d[:, None] * s_w_d + offs_r[None, :] * s_w_r,
                mask=mask_d[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    dt = tl.sum(w * dt_low[None, :], axis=1).to(xdbl_ptr.dtype.element_ty).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = _softplus(dt)
    Bv = tl.load(row + (rank + offs_n) * s_xdbl_c, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(row + (rank + dstate + offs_n) * s_xdbl_c, mask=mask_n, other=0.0).to(tl.float32)

    state_ptrs = state_ptr + pid_b * s_state_b + offs_d[:, None] * s_state_d + offs_n[None, :] * s_state_n
    h = tl.load(state_ptrs, mask=mask_dn, other=0.0)
    x = tl.load(x_ptr + pid_b * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0)
    h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptrs, h, mask=mask_dn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_z_b + offs_d * s_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + pid_b * s_out_b + offs_d * s_out_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr,
    dim, width,
    s_x_b, s_x_d, s_state_b, s_state_d, s_state_w, s_w_d, s_w_w, s_bias, s_out_b, s_out_d,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, TRIGGER: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # x, out: (B, D); state: (B, D, W-1); weight: (D, W); bias: (D,).
    if TRIGGER:  # the next kernel (x_proj's GEMV) may launch and start loading its weights (`kernels.pdl`)
        gdc_launch_dependents()
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    mask_d = offs_d < dim
    in_state = offs_w < width - 1
    row = state_ptr + pid_b * s_state_b + offs_d[:, None] * s_state_d

    # The window (x_{t-W+1}, ..., x_t): the W-1 cached inputs, then x rounded to the cache's dtype (as the
    # reference's torch.cat does), all read before anything is written.
    x = tl.load(x_ptr + pid_b * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(state_ptr.dtype.element_ty)
    cached = tl.load(row + offs_w[None, :] * s_state_w, mask=mask_d[:, None] & in_state[None, :], other=0.0)
    window = tl.where(offs_w[None, :] == width - 1, x[:, None], cached)  # (BD, BLOCK_W), zero beyond W
    shifted = tl.load(row + (offs_w[None, :] + 1) * s_state_w,
                      mask=mask_d[:, None] & (offs_w[None, :] + 1 < width - 1), other=0.0)
    new_state = tl.where(offs_w[None, :] == width - 2, x[:, None], shifted)  # window[1:]

    w = tl.load(w_ptr + offs_d[:, None] * s_w_d + offs_w[None, :] * s_w_w,
                mask=mask_d[:, None] & (offs_w[None, :] < width), other=0.0).to(tl.float32)
    y = tl.sum(window.to(tl.float32) * w, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.debug_barrier()  # every thread has read the old state before any thread overwrites it
    tl.store(row + offs_w[None, :] * s_state_w, new_state, mask=mask_d[:, None] & in_state[None, :])
    tl.store(out_ptr + pid_b * s_out_b + offs_d * s_out_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


def selective_state_update_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One decoding step of the selective scan; updates `state` in place (see `reference`).

    state: (B, D, N) (fp32 recommended); x, dt, z: (B, D); A: (D, N); B, C: (B, N); D, dt_bias: (D,).
    Returns y (B, D) in x's dtype.
    """
    batch, dim = x.shape
    dstate = A.shape[1]
    if tuple(state.shape) != (batch, dim, dstate):
        raise ValueError(f"state must have shape (B, D, N) = {(batch, dim, dstate)}, got {tuple(state.shape)}")
    out = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    zero2 = (0, 0)
    with _on_device(x):
        _state_update_kernel[(batch, triton.cdiv(dim, _BLOCK_D))](
            state, x, dt, A, B, C, D, z, dt_bias, out,
            dim, dstate,
            *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
            *(z.stride() if z is not None else zero2), D.stride(0) if D is not None else 0,
            dt_bias.stride(0) if dt_bias is not None else 0, *out.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
            BLOCK_D=_BLOCK_D, BLOCK_N=max(2, triton.next_power_of_2(dstate)), num_warps=4,
        )
    return out


def causal_conv1d_update_triton(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decoding step of the depthwise causal conv (see `reference.causal_conv1d_update_ref`).

    x: (B, D); conv_state: (B, D, W-1), updated in place (shifted left, x appended); weight: (D, W);
    bias: (D,). Returns (B, D) in x's dtype.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    batch, dim = x.shape
    width = weight.shape[1]
    if tuple(conv_state.shape) != (batch, dim, width - 1):
        raise ValueError(f"conv_state must have shape (B, D, W-1) = {(batch, dim, width - 1)}, "
                         f"got {tuple(conv_state.shape)}")
    out = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    with _on_device(x):
        _conv_update_kernel[(batch, triton.cdiv(dim, _BLOCK_D))](
            x, conv_state, weight, bias, out,
            dim, width,
            *x.stride(), *conv_state.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
            *out.stride(),
            HAS_BIAS=bias is not None, SILU=activation is not None, TRIGGER=trigger_dependents(x.device, batch),
            BLOCK_D=_BLOCK_D, BLOCK_W=max(2, triton.next_power_of_2(width)), num_warps=4,
        )
    return out


def ssm_step_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    x_dbl: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mixer's decode step after x_proj, unfused (the spec of `ssm_step_triton`): split x_dbl (B, R + 2N)
    into [dt_low; B; C], Δ = softplus(dt_low · W_dtᵀ + dt_bias), then `selective_state_update_ref`."""
    rank, dstate = dt_weight.shape[1], A.shape[1]
    dt_low, B, C = torch.split(x_dbl, [rank, dstate, dstate], dim=-1)
    dt = torch.nn.functional.linear(dt_low, dt_weight)  # (B, D)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)


def ssm_step_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    x_dbl: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """`ssm_step_ref` in one kernel; updates `state` in place.

    state: (B, D, N) fp32 (contiguous in N is not required); x, z: (B, D) (strided views are fine); x_dbl:
    (B, R + 2N), x_proj's output; dt_weight: (D, R); dt_bias, D: (D,) unit stride; A: (D, N) fp32, -exp(A_log)
    (the caller caches it). Returns y (B, D) in x's dtype.
    """
    batch, dim = x.shape
    rank, dstate = dt_weight.shape[1], A.shape[1]
    if tuple(state.shape) != (batch, dim, dstate) or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 of shape (B, D, N) = {(batch, dim, dstate)}, got "
                         f"{state.dtype} {tuple(state.shape)}")
    if x_dbl.shape != (batch, rank + 2 * dstate):
        raise ValueError(f"x_dbl must have shape (B, R + 2N) = {(batch, rank + 2 * dstate)}, got {tuple(x_dbl.shape)}")
    if A.dtype != torch.float32:
        raise ValueError(f"A must be fp32 (-exp(A_log)), got {A.dtype}")
    for name, t in (("dt_bias", dt_bias), ("D", D)):
        if t is not None and t.stride(0) != 1:
            raise ValueError(f"{name} must have unit stride")
    out = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    zero2 = (0, 0)
    # Few programs at small batch: narrower channel blocks spread one token's work over more SMs.
    block_d = 32 if batch * triton.cdiv(dim, 64) < 256 else 64
    with _on_device(x):
        _ssm_step_kernel[(batch, triton.cdiv(dim, block_d))](
            state, x, x_dbl, dt_weight, dt_bias, A, D, z, out,
            dim, dstate, rank,
            *state.stride(), *x.stride(), *x_dbl.stride(), *dt_weight.stride(), *A.stride(),
            *(z.stride() if z is not None else zero2), *out.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
            TRIGGER=trigger_dependents(x.device, batch), BLOCK_D=block_d,
            BLOCK_N=max(2, triton.next_power_of_2(dstate)), BLOCK_R=max(2, triton.next_power_of_2(rank)),
            num_warps=4,
        )
    return out
