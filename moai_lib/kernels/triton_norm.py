"""Fused residual-add + RMSNorm, and the gated MLP's SiLU·mul, in Triton (the block's elementwise glue).

    residual_out = residual + x            (x optional; computed in fp32, stored in residual's dtype)
    out          = residual_out / sqrt(mean(residual_out²) + eps) · weight      (stored in weight's dtype)

`rms_norm_ref` / `silu_mul_ref` are the specs, written exactly as the model's torch path computes them
(`model.mamba.RMSNorm`, `GatedMLP`): the kernels compute the same fp32 expressions and round where torch rounds,
so that the fused and the torch model differ only by fp32 summation order. Each row (of D channels) is one
program; D ≤ 16K fits in registers as one block. The backward (`_AddRMSNormFn`) recomputes r̂ = r·rstd from the
saved residual_out and the (M,) rstd, and reduces dweight over row blocks in a (programs, D) fp32 buffer.

Shape letters: M rows (B·L tokens), D channels, I the MLP's hidden width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch_dependents, trigger_dependents
from .triton_scan import _on_device

_MAX_COLS = 16384
_BWD_ROWS = 16  # rows per backward program: the dweight partials are (ceil(M/16), D) fp32


def rms_norm_ref(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(out, residual_out): out = RMSNorm(residual + x) in weight's dtype, residual_out in residual's dtype.
    x, residual: (..., D); x may be None (no add; residual_out is residual itself)."""
    r = residual if x is None else residual + x
    r32 = r.float()
    y = r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(weight.dtype), r


def silu_mul_ref(h: torch.Tensor) -> torch.Tensor:
    """h (..., 2I) = [y; gate] → y · silu(gate) (..., I), as `GatedMLP` computes it in torch."""
    y, gate = h.chunk(2, dim=-1)
    return y * torch.nn.functional.silu(gate)


@triton.jit
def _add_rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, rstd_ptr,
    n_cols, eps, s_x, s_res, s_out, s_res_out,
    HAS_X: tl.constexpr, STORE_RES: tl.constexpr, STORE_RSTD: tl.constexpr, TRIGGER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if TRIGGER:  # decode: the next kernel (a GEMV) may launch and start loading its weights (`kernels.pdl`)
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    r = tl.load(res_ptr + row * s_res + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X:
        r += tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
        # The sum is rounded to the residual's dtype before the norm reads it, as torch's `residual + x`.
        r = r.to(res_out_ptr.dtype.element_ty).to(tl.float32)
    if STORE_RES:
        tl.store(res_out_ptr + row * s_res_out + cols, r.to(res_out_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / n_cols + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_out + cols, (r * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_bwd_kernel(
    dout_ptr, dres_out_ptr, r_ptr, rstd_ptr, w_ptr, dr_ptr, dw_ptr,
    n_rows, n_cols, s_dout, s_dres_out, s_r, s_dr,
    HAS_DRES_OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # dr = rstd·(dy·w − r̂·mean(dy·w·r̂)) (+ the residual_out gradient); dweight = Σ_rows dy·r̂.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS):
        row = pid.to(tl.int64) * ROWS + i
        if row < n_rows:
            dy = tl.load(dout_ptr + row * s_dout + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            r_hat = tl.load(r_ptr + row * s_r + cols, mask=mask, other=0.0).to(tl.float32) * rstd
            wdy = dy * w
            c = tl.sum(wdy * r_hat, axis=0) / n_cols
            dr = (wdy - r_hat * c) * rstd
            if HAS_DRES_OUT:
                dr += tl.load(dres_out_ptr + row * s_dres_out + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dr_ptr + row * s_dr + cols, dr, mask=mask)
            dw += dy * r_hat
    tl.store(dw_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


@triton.jit
def _silu_mul_kernel(h_ptr, out_ptr, n_cols, s_h, s_out, TRIGGER: tl.constexpr, BLOCK: tl.constexpr):
    if TRIGGER:  # as in the norm
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = tl.load(h_ptr + row * s_h + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(h_ptr + row * s_h + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # torch rounds silu(gate) to the tensor dtype before the product: so do we (same bits as the torch path).
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * s_out + cols, (y * s).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) → (M, D) with unit stride along D (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_cols(n_cols: int) -> int:
    if n_cols > _MAX_COLS:
        raise ValueError(f"the fused RMSNorm keeps a row in registers: at most {_MAX_COLS} channels, got {n_cols}")
    return max(16, triton.next_power_of_2(n_cols))


def _add_rms_norm_fwd(x, residual, weight, eps, need_rstd):
    shape, n_cols = residual.shape, residual.shape[-1]
    res2 = _rows(residual)
    x2 = _rows(x) if x is not None else None
    out = torch.empty(res2.shape, dtype=weight.dtype, device=residual.device)
    res_out = torch.empty_like(res2) if x is not None else res2
    rstd = torch.empty(res2.shape[0], dtype=torch.float32, device=residual.device) if need_rstd else None
    with _on_device(residual):
        _add_rms_norm_fwd_kernel[(res2.shape[0],)](
            x2, res2, weight, out, res_out, rstd, n_cols, eps,
            x2.stride(0) if x2 is not None else 0, res2.stride(0), out.stride(0), res_out.stride(0),
            HAS_X=x is not None, STORE_RES=x is not None, STORE_RSTD=need_rstd,
            TRIGGER=trigger_dependents(residual.device, res2.shape[0]), BLOCK=_check_cols(n_cols),
            num_warps=4 if n_cols <= 4096 else 8,
        )
    return out.view(shape), res_out.view(shape), rstd


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        out, res_out, rstd = _add_rms_norm_fwd(x, residual, weight, eps, need_rstd=True)
        ctx.save_for_backward(res_out, rstd, weight)
        ctx.has_x, ctx.x_dtype, ctx.res_dtype = x is not None, x.dtype if x is not None else None, residual.dtype
        return (out, res_out) if x is not None else out  # without x, residual_out is the input itself

    @staticmethod
    def backward(ctx, dout, dres_out=None):
        res_out, rstd, weight = ctx.saved_tensors
        r2, n_cols = _rows(res_out), res_out.shape[-1]
        n_rows = r2.shape[0]
        dout2 = _rows(dout)
        has_dres = ctx.has_x and dres_out is not None
        dres2 = _rows(dres_out) if has_dres else None
        dr = torch.empty(r2.shape, dtype=torch.float32, device=r2.device)
        programs = triton.cdiv(n_rows, _BWD_ROWS)
        dw = torch.empty(programs, n_cols, dtype=torch.float32, device=r2.device)
        with _on_device(r2):
            _add_rms_norm_bwd_kernel[(programs,)](
                dout2, dres2, r2, rstd, weight, dr, dw, n_rows, n_cols,
                dout2.stride(0), dres2.stride(0) if has_dres else 0, r2.stride(0), dr.stride(0),
                HAS_DRES_OUT=has_dres, ROWS=_BWD_ROWS, BLOCK=_check_cols(n_cols),
                num_warps=4 if n_cols <= 4096 else 8,
            )
        dr = dr.view(res_out.shape)
        dx = dr.to(ctx.x_dtype) if ctx.has_x and ctx.needs_input_grad[0] else None
        dres = dr.to(ctx.res_dtype) if ctx.needs_input_grad[1] else None
        dweight = dw.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, dres, dweight, None


def add_rms_norm_triton(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(out, residual_out) as `rms_norm_ref`, in one kernel; differentiable in x, residual and weight.

    x, residual: (..., D) (x may be None: a plain RMSNorm of residual); weight: (D,). Without autograd (no input
    requires grad, or under no_grad/inference_mode) the kernel is launched directly, saving nothing.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight)):
        out = _AddRMSNormFn.apply(x, residual, weight, eps)
        return out if x is not None else (out, residual)
    out, res_out, _ = _add_rms_norm_fwd(x, residual, weight, eps, need_rstd=False)
    return out, res_out


def silu_mul_triton(h: torch.Tensor) -> torch.Tensor:
    """h (..., 2I) = [y; gate] → y · silu(gate) (..., I) in h's dtype, in one kernel (inference only)."""
    n_cols = h.shape[-1] // 2
    h2 = _rows(h)
    out = torch.empty(h2.shape[0], n_cols, dtype=h.dtype, device=h.device)
    block = min(1024, max(16, triton.next_power_of_2(n_cols)))
    with _on_device(h):
        _silu_mul_kernel[(h2.shape[0], triton.cdiv(n_cols, block))](
            h2, out, n_cols, h2.stride(0), out.stride(0), TRIGGER=trigger_dependents(h.device, h2.shape[0]),
            BLOCK=block, num_warps=4,
        )
    return out.view(*h.shape[:-1], n_cols)
