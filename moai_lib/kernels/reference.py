"""Pure-torch reference kernels: the numerical spec every fast path is tested against.

Signatures and semantics follow state-spaces/mamba (`selective_scan_ref`, `selective_state_update_ref`,
`causal_conv1d_ref`, `causal_conv1d_update_ref`) so the two can be swapped in tests. Everything is computed
in fp32 and cast back to the input dtype at the end; the recurrent state is always fp32.

Shape letters follow the Mamba paper: B batch, D channels (d_inner), L sequence length, N state size,
W conv width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(
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
):
    """Sequential selective scan (Mamba-1, S6), eq. (2a)-(2b) with ZOH for A and Euler for B.

    u, delta, z: (B, D, L); A: (D, N) real; B, C: (B, N, L) input-dependent; D, delta_bias: (D,);
    initial_state: (B, D, N) fp32 or None.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t;   y_t = C_t . h_t + D * u_t;   y *= silu(z).

    Returns y (B, D, L) in u's dtype, and the final state (B, D, N) fp32 if `return_last_state`.
    """
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.float()
    B = B.float()
    C = C.float()
    batch, dim, length = u.shape
    x = (
        initial_state.float().clone()
        if initial_state is not None
        else u.new_zeros((batch, dim, A.shape[1]), dtype=torch.float32)
    )
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # (B, D, L, N)
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)  # (B, D, L, N)
    ys = []
    for i in range(length):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros((batch, dim, 0))  # (B, D, L)
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def selective_state_update_ref(
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
    """One decoding step of the selective scan; updates `state` in place.

    state: (B, D, N) fp32; x, dt, z: (B, D); A: (D, N); B, C: (B, N); D, dt_bias: (D,).
    Returns y (B, D) in x's dtype.
    """
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt[..., None] * A.float())  # (B, D, N)
    dBx = (dt * x.float())[..., None] * B.float()[:, None, :]  # (B, D, N)
    new_state = state.float() * dA + dBx
    state.copy_(new_state)
    y = torch.einsum("bdn,bn->bd", new_state, C.float())
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """Depthwise causal conv1d. x: (B, D, L); weight: (D, W); bias: (D,); initial_states: (B, D, W-1).

    Returns out (B, D, L) and, if `return_final_states`, the last W-1 inputs (B, D, W-1): the decode
    cache for `causal_conv1d_update_ref`.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    dtype_in = x.dtype
    dim, width = weight.shape
    length = x.shape[-1]
    if initial_states is None:
        xp = F.pad(x, (width - 1, 0))
    else:
        xp = torch.cat([initial_states.to(x.dtype), x], dim=-1)
    out = F.conv1d(xp.float(), weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=dim)
    out = out[..., :length]
    if activation is not None:
        out = F.silu(out)
    out = out.to(dtype_in)
    if not return_final_states:
        return out
    return out, xp[..., -(width - 1):].to(dtype_in) if width > 1 else xp[..., :0]


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decoding step of the causal conv. x: (B, D); conv_state: (B, D, W-1) holding the previous
    inputs, updated in place (shifted left, x appended). Returns (B, D) in x's dtype."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=-1)  # (B, D, W)
    out = (window.float() * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    if activation is not None:
        out = F.silu(out)
    conv_state.copy_(window[..., 1:])
    return out.to(x.dtype)
