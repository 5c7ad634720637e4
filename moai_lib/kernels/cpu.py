"""Fast pure-torch selective scan (backend ``torch``): a chunked, cache-blocked scan with a hand-written
backward that recomputes the states chunk by chunk, the way the CUDA kernel of state-spaces/mamba does.

Same signature and semantics as `reference.selective_scan_ref` (the spec); shapes use the paper's letters:
B batch, D channels, L length, N state size, and T the chunk length.

The math (Mamba-1, S6, eq. (2a)-(2b) with ZOH for A), per (b, d, n):

    a_t = exp(delta_t * A)        x_t = delta_t * u_t * B_t
    h_t = a_t * h_{t-1} + x_t     y_t = sum_n C_t * h_t

A Mamba-1 decay depends on (d, n) *and* t, so the Mamba-2 SSD chunked form ("ssd_minimal", Dao & Gu 2024,
sec. 6), whose T x T decay matrix exp(segsum) is shared by all N states of a head, would here need N x T x T
exponentials per channel and chunk, T/2 times more than the N x T the recurrence needs. The log-space
shortcut h_t = P_t * (h_0 + sum_s x_s / P_s) with P_t = exp(cumsum(delta * A)) overflows fp32 as soon as a
chunk decays by more than e^88 (delta = 20, A = -16 does that in one step). And measured on a 2-core CPU, a
log-depth (Hillis-Steele or Blelloch) scan costs several extra memory passes per level, more than it saves
in Python steps. So the recurrence itself stays sequential (in the multiplicative domain: a_t lies in [0, 1],
nothing can overflow), and the speed comes from the layout:

- time-major tensors, so that the state of one step, (B, N, D), is one contiguous slab and one step of the
  recurrence is a single in-place `addcmul_` over B*N*D numbers;
- the sequence is cut into chunks of T steps whose (T, B, N, D) work tensors fit in cache: decays
  (one `exp2` pass; A is pre-scaled by log2(e), exp2 is about twice as fast as exp on CPU), inputs x_t
  (one outer product), the T recurrence steps, and y (one batched mat-vec) all read the chunk from cache,
  and no tensor of size B*D*L*N is ever allocated (fresh large allocations cost page faults on CPU);
- the backward pass (an `autograd.Function`) keeps only the O(B*D*L) inputs and the state entering each
  chunk, (L/T, B, N, D), and walks the chunks backwards: it recomputes the chunk's states, runs the
  adjoint recurrence g_t = C_t * dy_t + a_{t+1} * g_{t+1}, and reduces the gradients chunk by chunk.

Peak memory is O(B*D*L + B*D*N*L/T + B*D*N*T) floats, never O(B*D*L*N).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Chunk length from the working set: (T, B, N, D) fp32 work tensors of about this many elements (1 MiB
# each; forward uses 2, backward 4), so the chunk stays in L2/L3. Measured on a 2-core AMD EPYC (1 MiB L2
# per core, 32 MiB L3) at B=1, D=1536, N=16: T = 8/16/32/64/128 gave fwd+bwd within 10% for T in 8..32 and
# slower above (the working set leaves the cache); see benchmarks/bench_cpu_scan.py.
DEFAULT_CHUNK_ELEMS = 1 << 18
_LOG2E = math.log2(math.e)


def default_chunk_size(batch: int, dim: int, dstate: int, length: int) -> int:
    """Chunk length T for a scan of this size (see `DEFAULT_CHUNK_ELEMS`)."""
    return max(1, min(length, DEFAULT_CHUNK_ELEMS // max(1, batch * dim * dstate)))


def _chunk_states(delta_c, du_c, B_c, A2, h_in):
    """States of one chunk. delta_c, du_c: (T, B, D); B_c: (T, B, N); A2 = log2(e) * A^T: (N, D);
    h_in: (B, N, D) state before the chunk. Returns (h, a): states h_t and decays a_t, both (T, B, N, D)."""
    a = (delta_c[:, :, None, :] * A2).exp2_()  # (T, B, N, D) = exp(delta_t * A)
    h = du_c[:, :, None, :] * B_c[:, :, :, None]  # (T, B, N, D) = x_t, overwritten with h_t below
    hs, as_ = h.unbind(0), a.unbind(0)
    hs[0].addcmul_(as_[0], h_in)
    for t in range(1, len(hs)):
        hs[t].addcmul_(as_[t], hs[t - 1])
    return h, a


class _ChunkedScan(torch.autograd.Function):
    """Core scan y_t = C_t . h_t on fp32 inputs; D, z, delta_bias and softplus are applied outside with
    ordinary autograd ops."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk):
        # u, delta: (B, D, L); A: (D, N); B, C: (B, N, L); h0: (B, D, N) or None.
        batch, dim, length = u.shape
        dstate = A.shape[1]
        delta_t = delta.permute(2, 0, 1).contiguous()  # (L, B, D)
        du_t = (delta * u).permute(2, 0, 1).contiguous()  # (L, B, D)
        B_t = B.permute(2, 0, 1).contiguous()  # (L, B, N)
        C_t = C.permute(2, 0, 1).contiguous()  # (L, B, N)
        A_T = A.t().contiguous()  # (N, D)
        A2 = A_T * _LOG2E
        h = (
            h0.transpose(1, 2).clone(memory_format=torch.contiguous_format)
            if h0 is not None
            else u.new_zeros((batch, dstate, dim))
        )  # (B, N, D)
        bounds = [(t0, min(t0 + chunk, length)) for t0 in range(0, length, chunk)]
        starts = u.new_empty((len(bounds), batch, dstate, dim))  # state entering each chunk, for backward
        y_t = u.new_empty((length, batch, dim))  # (L, B, D)
        for c, (t0, t1) in enumerate(bounds):
            starts[c] = h
            hc, _ = _chunk_states(delta_t[t0:t1], du_t[t0:t1], B_t[t0:t1], A2, h)
            rows = (t1 - t0) * batch
            torch.bmm(C_t[t0:t1].reshape(rows, 1, dstate), hc.view(rows, dstate, dim), out=y_t[t0:t1].view(rows, 1, dim))
            h = hc[-1]
        ctx.save_for_backward(u, delta, delta_t, du_t, B_t, C_t, A_T, A2, starts)
        ctx.chunk, ctx.bounds, ctx.has_h0 = chunk, bounds, h0 is not None
        return y_t.permute(1, 2, 0).contiguous(), h.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, gy, glast):
        # gy: (B, D, L); glast: (B, D, N). Adjoint of h_t = a_t h_{t-1} + x_t, y_t = C_t . h_t:
        #   g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}            (g_{L-1} also gets glast)
        #   dL/dx_t = g_t;  dL/da_t = g_t h_{t-1};  dL/dC_t = sum_d dy_t h_t;  dL/dh0 = a_0 g_0
        # and through a_t = exp(delta_t A): dL/d(delta_t A) = g_t h_{t-1} a_t =: z_t.
        u, delta, delta_t, du_t, B_t, C_t, A_T, A2, starts = ctx.saved_tensors
        batch, dim, length = u.shape
        dstate = A_T.shape[0]
        gy_t = gy.permute(2, 0, 1).contiguous()  # (L, B, D)
        g_carry = glast.transpose(1, 2).contiguous()  # (B, N, D): a_{t+1} g_{t+1} entering the chunk's end
        g_du = torch.empty_like(du_t)  # (L, B, D)
        g_delta = torch.empty_like(delta_t)  # (L, B, D), the part through the decays
        g_B = torch.empty_like(B_t)  # (L, B, N)
        g_C = torch.empty_like(C_t)  # (L, B, N)
        g_A_T = torch.zeros_like(A2)  # (N, D)
        for c in range(len(ctx.bounds) - 1, -1, -1):
            t0, t1 = ctx.bounds[c]
            rows = (t1 - t0) * batch
            delta_c, du_c, B_c, C_c, gy_c = delta_t[t0:t1], du_t[t0:t1], B_t[t0:t1], C_t[t0:t1], gy_t[t0:t1]
            h, a = _chunk_states(delta_c, du_c, B_c, A2, starts[c])
            g = C_c[:, :, :, None] * gy_c[:, :, None, :]  # (T, B, N, D)
            gs, as_ = g.unbind(0), a.unbind(0)
            gs[-1].add_(g_carry)
            for t in range(len(gs) - 2, -1, -1):
                gs[t].addcmul_(as_[t + 1], gs[t + 1])
            g_carry = as_[0] * gs[0]
            g3, h3 = g.view(rows, dstate, dim), h.view(rows, dstate, dim)
            torch.bmm(gy_c.reshape(rows, 1, dim), h3.transpose(1, 2), out=g_C[t0:t1].view(rows, 1, dstate))
            torch.bmm(du_c.reshape(rows, 1, dim), g3.transpose(1, 2), out=g_B[t0:t1].view(rows, 1, dstate))
            torch.bmm(B_c.reshape(rows, 1, dstate), g3, out=g_du[t0:t1].view(rows, 1, dim))
            # z_t = g_t * h_{t-1} * a_t, built in place in `a`; `g` is then free to hold z_t * delta_t.
            a[1:].mul_(h[:-1])
            a[0].mul_(starts[c])
            z = a.mul_(g)
            g_A_T.add_(torch.mul(z, delta_c[:, :, None, :], out=g).sum((0, 1)))
            torch.sum(z.mul_(A_T), dim=2, out=g_delta[t0:t1])
        g_du_bdl = g_du.permute(1, 2, 0)  # (B, D, L)
        g_u = g_du_bdl * delta
        g_delta_bdl = g_delta.permute(1, 2, 0) + g_du_bdl * u
        g_h0 = g_carry.transpose(1, 2).contiguous() if ctx.has_h0 else None
        return g_u, g_delta_bdl, g_A_T.t(), g_B.permute(1, 2, 0), g_C.permute(1, 2, 0), g_h0, None


def selective_scan_chunked(
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
    chunk_size: int | None = None,
):
    """Selective scan with exactly the semantics of `reference.selective_scan_ref`, fast on CPU.

    u, delta, z: (B, D, L); A: (D, N) real; B, C: (B, N, L); D, delta_bias: (D,); initial_state: (B, D, N).
    Computes in fp32; returns y (B, D, L) in u's dtype and, if `return_last_state`, the final state
    (B, D, N) fp32. Differentiable w.r.t. every tensor argument. `chunk_size` (T) only trades speed; by
    default it is picked from the problem size (`default_chunk_size`). Peak memory is
    O(B*D*L + B*D*N*(L/T + T)) floats: nothing of size B*D*L*N is materialized (see the module docstring).
    """
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"A must be real with shape (D, N) = ({dim}, N), got {tuple(A.shape)} {A.dtype}")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, dstate, length):
            raise ValueError(f"{name} must have shape (B, N, L) = {(batch, dstate, length)}, got {tuple(t.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(batch, dim, dstate, length)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    h0 = initial_state.float() if initial_state is not None else None
    y, last_state = _ChunkedScan.apply(u, delta, A.float(), B.float(), C.float(), h0, chunk_size)
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, last_state) if return_last_state else out
