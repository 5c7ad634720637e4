"""Fast pure-torch selective scan (backend ``torch``): a chunked, cache-blocked scan with a hand-written
backward that recomputes the states chunk by chunk, as the CUDA kernel of state-spaces/mamba does.

Same signature and semantics as `reference.selective_scan_ref` (the spec). Shape letters: B batch,
D channels, L length, N state size; T is the chunk length, S the span length (below).

The math (Mamba-1 / S6, eq. (2a)-(2b): ZOH for A, Euler for B), independently for every (b, d, n):

    a_t = exp(delta_t * A)        x_t = delta_t * u_t * B_t
    h_t = a_t * h_{t-1} + x_t     y_t = sum_n C_t * h_t   (+ D * u_t, times silu(z_t))

Why the recurrence stays sequential inside a chunk:
- The Mamba-2 SSD chunked form ("ssd_minimal", Dao & Gu 2024, sec. 6) multiplies by a T x T decay matrix
  exp(segsum(delta * A)) shared by a head's N states. A Mamba-1 decay depends on n as well, so that matrix
  would cost N * T * T exponentials per channel and chunk, (T + 1) / 2 times the N * T of the recurrence.
- The log-space shortcut h_t = P_t * (h_0 + sum_{s<=t} x_s / P_s), P_t = exp(cumsum(delta * A)), overflows
  fp32 once a chunk decays by more than e^88 (softplus(delta) = 20 with A = -16 does that in one step).
- A log-depth scan (Hillis-Steele, Blelloch) trades the T sequential steps for several extra passes over
  the chunk per level; measured on a 2-core CPU that is slower, not faster.
So each step is one in-place multiply-add over a contiguous (B, N, D) slab, in the multiplicative domain
(a_t in [0, 1]: nothing can overflow; huge decays underflow to exactly 0).

Where the time goes (B=1, D=1536, N=16, L=2048 forward on 2 cores: roughly a sixth each in the two items
below, a fifth in transposes; `benchmarks/bench_cpu_scan.py` prints the floor), and what the layout does:
- exp: one `exp2` per (b, d, l, n) (A is pre-scaled by log2 e; exp2 runs ~2x faster than exp on CPU).
- The L recurrence steps, each a single `addcmul` over the B*N*D numbers of a step (single-threaded below
  32K elements, and bound by the cache bandwidth).
- Transposes: the inputs are (B, D, L) but a step needs time-major data. They are transposed span by
  span (S ~ 256 steps) with 2-D `copy_`s, which are cache-blocked; reading rows of >= 128 floats runs at
  copy speed, while 32-float rows (a per-chunk transpose) cost 4x more.
- Allocation: a fresh CPU tensor of a few MB page-faults on first touch (up to +50% on the op that
  writes it), so every span- and chunk-sized buffer is allocated once per call (`_Workspace`).

Memory: the forward keeps its inputs and the state entering each chunk, (L/T, B, N, D); scratch is
O(B*D*S + B*N*D*T). Nothing of size B*D*L*N is ever materialized (peak O(B*D*L + B*D*N*L/T) floats).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Chunk length T from the working set: the (T, B, N, D) fp32 work buffers (two in forward, three in
# backward) hold about this many elements (3 MiB each), so a chunk stays in L3. On the 2-core EPYC dev VM
# (B=1, D=1536, N=16, L=2048; interleaved runs) T = 16 and 32 were within noise of each other, T = 8 and
# 64 10-30% slower (benchmarks/bench_cpu_scan.py --sweep-chunks).
DEFAULT_CHUNK_ELEMS = 3 << 18
# Time steps per span, the unit in which the (B, D, L) inputs are read, transposed and written back.
SPAN_STEPS = 256
_LOG2E = math.log2(math.e)


def default_chunk_size(batch: int, dim: int, dstate: int, length: int) -> int:
    """Chunk length T for a scan of this size: `DEFAULT_CHUNK_ELEMS` // (B*N*D), at least 1, at most L."""
    return max(1, min(length, DEFAULT_CHUNK_ELEMS // max(1, batch * dim * dstate)))


class _Workspace:
    """fp32 scratch tensors by name, allocated once per call and reused by every span and chunk (only a
    shorter last span or chunk allocates again)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape:
            buf = self._buffers[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
        return buf


def _swap_last(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (B, Y, X) = x (B, X, Y) transposed. One 2-D transpose per batch row: `copy_` does exactly those
    cache-blocked, while a strided 3-D copy runs several times slower."""
    for b in range(x.shape[0]):
        out[b].copy_(x[b].t())
    return out


def _plan(length: int, chunk: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Spans (s0, s1, chunks) covering [0, length); chunks are (i0, i1) relative to s0."""
    span = chunk * max(1, SPAN_STEPS // chunk)
    plan = []
    for s0 in range(0, length, span):
        s1 = min(s0 + span, length)
        plan.append((s0, s1, [(i0, min(i0 + chunk, s1 - s0)) for i0 in range(0, s1 - s0, chunk)]))
    return plan


class _Span:
    """The inputs of time steps [s0, s1) in fp32: (B, D, S) in the caller's layout, and the time-major
    (B, S, D) copies that the chunks read."""

    def __init__(self, ws, u, delta, delta_bias, delta_softplus, s0, s1):
        batch, dim = u.shape[:2]
        bds, bsd = (batch, dim, s1 - s0), (batch, s1 - s0, dim)
        self.u = u[:, :, s0:s1]  # view, caller's dtype
        d = delta[:, :, s0:s1]
        self.delta_pre = ws.get("delta_pre", bds)  # with the bias, before softplus
        if delta_bias is None:
            self.delta_pre.copy_(d)
        else:
            torch.add(d, delta_bias[:, None], out=self.delta_pre)
        self.delta = F.softplus(self.delta_pre, out=ws.get("delta", bds)) if delta_softplus else self.delta_pre
        du = torch.mul(self.delta, self.u, out=ws.get("du", bds))
        self.delta_bt = _swap_last(self.delta, ws.get("delta_bt", bsd))
        self.du_bt = _swap_last(du, ws.get("du_bt", bsd))

    def chunk(self, i0: int, i1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """delta_t and (delta * u)_t of span steps [i0, i1), as (T, B, D) views."""
        return self.delta_bt[:, i0:i1].transpose(0, 1), self.du_bt[:, i0:i1].transpose(0, 1)


def _chunk_states(a, h, delta_t, du_t, B_t, A2, h_in):
    """Fill the work buffers a, h (T, B, N, D) with the decays a_t = exp(delta_t * A) and the states h_t
    of one chunk. delta_t, du_t: (T, B, D); B_t: (T, B, N); A2 = log2(e) * A^T (N, D); h_in (B, N, D) is
    the state before the chunk (not aliasing h)."""
    torch.mul(delta_t[:, :, None, :], A2, out=a).exp2_()
    torch.mul(du_t[:, :, None, :], B_t[:, :, :, None], out=h)  # x_t, overwritten with h_t below
    hs, as_ = h.unbind(0), a.unbind(0)
    torch.addcmul(hs[0], as_[0], h_in, out=hs[0])
    for t in range(1, len(hs)):  # h_t = a_t * h_{t-1} + x_t, in place
        torch.addcmul(hs[t], as_[t], hs[t - 1], out=hs[t])


def _rows_to_span(rows: torch.Tensor, span_bt: torch.Tensor, i0: int, i1: int) -> None:
    """Store a chunk's (T, B, X) rows at steps [i0, i1) of a (B, S, X) span buffer."""
    span_bt[:, i0:i1] = rows.transpose(0, 1)


def _bmm_rows(vec, mat, span_bt, i0, i1, ws, name):
    """(T, B, K) x (T, B, K, X) -> rows (T, B, X) = sum_k vec * mat, stored at steps [i0, i1) of span_bt
    (B, S, X): one batched mat-vec over the T * B rows, written in place when B = 1."""
    n_t, batch, k = vec.shape
    x = mat.shape[-1]
    rows = n_t * batch
    if batch == 1:
        torch.bmm(vec.reshape(rows, 1, k), mat.view(rows, k, x), out=span_bt[0, i0:i1].view(rows, 1, x))
    else:
        out = torch.bmm(vec.reshape(rows, 1, k), mat.view(rows, k, x), out=ws.get(name, (rows, 1, x)))
        _rows_to_span(out.view(n_t, batch, x), span_bt, i0, i1)


class _SelectiveScanFn(torch.autograd.Function):
    """The whole selective scan (delta_bias, softplus, D and the z gate included) with a hand-written
    backward that recomputes each chunk's states from the saved chunk-entry states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, chunk):
        # u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L); D, delta_bias: (D,); h0: (B, D, N) or None.
        batch, dim, length = u.shape
        dstate = A.shape[1]
        ws = _Workspace(u.device)
        A2 = (A.float().t() * _LOG2E).contiguous()  # (N, D): exp2(delta * A2) = exp(delta * A)
        D32 = D.float()[:, None] if D is not None else None
        bias = delta_bias.float() if delta_bias is not None else None
        B_t = B.float().permute(2, 0, 1).contiguous()  # (L, B, N): small, transposed once
        C_t = C.float().permute(2, 0, 1).contiguous()
        plan = _plan(length, chunk)
        n_chunks = sum(len(chunks) for _, _, chunks in plan)
        starts = A2.new_empty((max(1, n_chunks), batch, dstate, dim))  # (B, N, D) state entering each chunk
        if h0 is not None:
            starts[0] = h0.transpose(1, 2)
        else:
            starts[0].zero_()
        out = u.new_empty((batch, dim, length))
        h, c = starts[0], 0
        for s0, s1, chunks in plan:
            sp = _Span(ws, u, delta, bias, delta_softplus, s0, s1)
            y_bt = ws.get("y_bt", (batch, s1 - s0, dim))
            for i0, i1 in chunks:
                a, h = ws.get("a", (i1 - i0, batch, dstate, dim)), ws.get("h", (i1 - i0, batch, dstate, dim))
                _chunk_states(a, h, *sp.chunk(i0, i1), B_t[s0 + i0 : s0 + i1], A2, starts[c])
                _bmm_rows(C_t[s0 + i0 : s0 + i1], h, y_bt, i0, i1, ws, "y_rows")  # y_t = C_t . h_t
                h, c = h[-1], c + 1
                if c < n_chunks:
                    starts[c] = h
            y = _swap_last(y_bt, ws.get("y", (batch, dim, s1 - s0)))
            if D32 is not None:
                y.addcmul_(sp.u, D32)
            if z is not None:
                z_s = z[:, :, s0:s1].float()
                y.mul_(torch.sigmoid(z_s, out=ws.get("gate", y.shape)).mul_(z_s))  # silu(z)
            out[:, :, s0:s1] = y
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts)
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        return out, h.transpose(1, 2).clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, g_out, g_last):
        # g_out: (B, D, L); g_last: (B, D, N). Adjoint of h_t = a_t h_{t-1} + x_t, y_t = C_t . h_t:
        #   g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}       (the last g_t also gets g_last)
        #   dL/dx_t = g_t;  dL/dC_t = sum_d dy_t h_t;  dL/dh0 = a_0 g_0;
        #   through a_t = exp(delta_t A):  s_t := dL/d(delta_t A) = g_t h_{t-1} a_t,
        #   dL/dA = sum_t s_t delta_t;  dL/ddelta_t = sum_n s_t A + (x_t = delta_t u_t B_t terms).
        u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        batch, dim, length = u.shape
        dstate = A.shape[1]
        ws = _Workspace(u.device)
        A_T = A.float().t().contiguous()  # (N, D)
        A2 = A_T * _LOG2E
        D32 = D.float()[:, None] if D is not None else None
        bias = delta_bias.float() if delta_bias is not None else None
        B_t = B.float().permute(2, 0, 1).contiguous()  # (L, B, N)
        C_t = C.float().permute(2, 0, 1).contiguous()
        g_u = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        g_delta = torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)
        g_z = torch.empty(z.shape, dtype=z.dtype, device=z.device) if z is not None else None
        g_B_t, g_C_t = torch.empty_like(B_t), torch.empty_like(C_t)  # (L, B, N)
        g_A_T = torch.zeros_like(A_T)  # (N, D)
        g_D = torch.zeros(dim, device=u.device) if D is not None else None
        g_bias = torch.zeros(dim, device=u.device) if delta_bias is not None else None
        g_carry = g_last.float().transpose(1, 2).contiguous()  # (B, N, D): a_{t+1} g_{t+1} at a chunk's end
        plan = _plan(length, ctx.chunk)
        c = sum(len(chunks) for _, _, chunks in plan)
        for s0, s1, chunks in reversed(plan):
            bds, bsd = (batch, dim, s1 - s0), (batch, s1 - s0, dim)
            sp = _Span(ws, u, delta, bias, ctx.delta_softplus, s0, s1)
            g_y = ws.get("g_y", bds).copy_(g_out[:, :, s0:s1])  # dL/d(output); becomes dL/d(y + D u)
            if z is not None:
                z_s = z[:, :, s0:s1].float()
                sig = torch.sigmoid(z_s, out=ws.get("sig", bds))
                silu = torch.mul(z_s, sig, out=ws.get("silu", bds))
                # silu'(z) = sig * (1 + z * (1 - sig)) = sig + silu - silu * sig
                g_gate = torch.mul(silu, sig, out=ws.get("g_gate", bds)).neg_().add_(silu).add_(sig).mul_(g_y)
                g_y.mul_(silu)
                y_bt = ws.get("y_bt", bsd)  # y before D and the gate, for dL/dz
            if D32 is not None:
                g_D.add_(torch.mul(g_y, sp.u, out=ws.get("tmp", bds)).sum((0, 2)))
            gy_bt = _swap_last(g_y, ws.get("gy_bt", bsd))
            g_du_bt, g_dec_bt = ws.get("g_du_bt", bsd), ws.get("g_dec_bt", bsd)
            for i0, i1 in reversed(chunks):
                c -= 1
                n_t, rows = i1 - i0, (i1 - i0) * batch
                delta_t, du_t = sp.chunk(i0, i1)
                B_c, C_c = B_t[s0 + i0 : s0 + i1], C_t[s0 + i0 : s0 + i1]
                shape = (n_t, batch, dstate, dim)
                a, h, g = ws.get("a", shape), ws.get("h", shape), ws.get("g", shape)
                _chunk_states(a, h, delta_t, du_t, B_c, A2, starts[c])
                if z is not None:
                    _bmm_rows(C_c, h, y_bt, i0, i1, ws, "y_rows")
                gy_t = gy_bt[:, i0:i1].transpose(0, 1)  # (T, B, D)
                torch.mul(C_c[:, :, :, None], gy_t[:, :, None, :], out=g)  # C_t dy_t
                gs, as_ = g.unbind(0), a.unbind(0)
                gs[-1].add_(g_carry)
                for t in range(n_t - 2, -1, -1):  # g_t += a_{t+1} g_{t+1}, in place
                    torch.addcmul(gs[t], as_[t + 1], gs[t + 1], out=gs[t])
                g_carry = as_[0] * gs[0]
                g3, h3 = g.view(rows, dstate, dim), h.view(rows, dstate, dim)
                g_C_c, g_B_c = (x[s0 + i0 : s0 + i1].view(rows, 1, dstate) for x in (g_C_t, g_B_t))
                torch.bmm(gy_t.reshape(rows, 1, dim), h3.transpose(1, 2), out=g_C_c)  # sum_d dy_t h_t
                torch.bmm(du_t.reshape(rows, 1, dim), g3.transpose(1, 2), out=g_B_c)  # sum_d (delta u)_t g_t
                _bmm_rows(B_c, g, g_du_bt, i0, i1, ws, "g_du_rows")  # dL/d(delta u)_t = B_t . g_t
                # s_t = g_t * h_{t-1} * a_t, built in place in `a`; `g` is then free to hold s_t * delta_t.
                a[1:].mul_(h[:-1])
                a[0].mul_(starts[c])
                s = a.mul_(g)
                g_A_T.add_(torch.mul(s, delta_t[:, :, None, :], out=g).sum((0, 1)))
                _rows_to_span(s.mul_(A_T).sum(2), g_dec_bt, i0, i1)  # sum_n s_t A
            if z is not None:
                pre_gate = _swap_last(y_bt, ws.get("pre_gate", bds))
                if D32 is not None:
                    pre_gate.addcmul_(sp.u, D32)
                g_z[:, :, s0:s1] = g_gate.mul_(pre_gate)
            g_du = _swap_last(g_du_bt, ws.get("g_du", bds))
            g_u_s = torch.mul(g_du, sp.delta, out=ws.get("g_u", bds))
            if D32 is not None:
                g_u_s.addcmul_(g_y, D32)
            g_delta_s = _swap_last(g_dec_bt, ws.get("g_delta", bds)).addcmul_(g_du, sp.u)
            if ctx.delta_softplus:
                g_delta_s.mul_(torch.sigmoid(sp.delta_pre, out=ws.get("tmp", bds)))  # softplus' = sigmoid
            if g_bias is not None:
                g_bias.add_(g_delta_s.sum((0, 2)))
            g_u[:, :, s0:s1] = g_u_s
            g_delta[:, :, s0:s1] = g_delta_s
        g_h0 = g_carry.transpose(1, 2).to(ctx.h0_dtype) if ctx.h0_dtype is not None else None
        return (
            g_u, g_delta, g_A_T.t().to(A.dtype), g_B_t.permute(1, 2, 0).to(B.dtype),
            g_C_t.permute(1, 2, 0).to(C.dtype), g_D.to(D.dtype) if D is not None else None, g_z,
            g_bias.to(delta_bias.dtype) if delta_bias is not None else None, g_h0, None, None,
        )


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
    out, last_state = _SelectiveScanFn.apply(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size
    )
    return (out, last_state) if return_last_state else out
