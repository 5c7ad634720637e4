"""The Triton kernels of the selective scan: the JIT functions behind `triton_scan.py`, whose docstring describes
the design (register layout, segments, checkpoints and the adjoint) that these implement. Nothing here is public;
`triton_scan.selective_scan_triton` launches them."""

from __future__ import annotations

import triton
import triton.language as tl


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
def _row_offsets(t, d_own, s_l, o_u, o_dl, LAY: tl.constexpr):
    # In-row offsets of a (B, D, L) tensor for a chunk: t (T, 1[, 1]) steps, d_own its channels' offsets. LAY 1
    # or 2: the tensor has u's or delta's strides (known at launch), so it reuses their offsets (one pointer tile
    # per distinct layout, as few registers as the contiguous-only kernels had).
    if LAY == 1:
        o = o_u
    elif LAY == 2:
        o = o_dl
    else:
        o = t * s_l + d_own
    return o


# Sizes are not specialized on (Triton would compile a variant per divisibility of L, seg_len, ...); strides are,
# so that unit strides become compile-time constants.
_SIZES = ["dim", "length", "dstate", "n_seg", "seg_len", "n_saved"]


@triton.jit(do_not_specialize=_SIZES)
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hin_ptr,
    out_ptr, last_ptr, states_ptr, hend_ptr, dsum_ptr,
    dim, length, dstate, n_seg, seg_len, n_saved,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, LOCAL: tl.constexpr, SAVE_STATES: tl.constexpr, SAVE_EVERY: tl.constexpr,
    LAY_DL: tl.constexpr, LAY_Z: tl.constexpr, LAY_O: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # One program per (batch row, block of BD channels, segment of seg_len steps); seg_len is a multiple of
    # BLOCK_L and SAVE_EVERY. u, delta, z, out: (B, D, L) with strides s_*; A: (D, N); B, C: (B, N, L) strided;
    # D, bias: (D,); hin: (B, D, n_seg, N), the state entering each segment; last: (B, D, N).
    # LOCAL (pass 1 of the segmented forward): scan the segment from a zero state, write no y, store the
    # segment's end state in hend (B, D, n_seg, N) and its sum of delta in dsum (B, D, n_seg).
    # Otherwise write y, the state entering every SAVE_EVERY steps into states (B, n_saved, D, N) when
    # SAVE_STATES, and the final state from the last segment.
    # Tiles are (T, N, BD): time, state, channel (see "Register layout" in the module docstring).
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(2)
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
    # Offsets within a batch row are int32 (the wrapper checks they fit), computed per chunk from per-channel
    # parts: hoisted (T, BD) offset tiles would hold T registers each, and the B=8 shapes have none to spare.
    u_row, dl_row, o_row = u_ptr + pid_b * s_ub, delta_ptr + pid_b * s_db, out_ptr + pid_b * s_ob
    if HAS_Z:
        z_row = z_ptr + pid_b * s_zb
    b_row, c_row = B_ptr + pid_b * s_bb, C_ptr + pid_b * s_cb
    d_u, d_dl, d_z, d_o = offs_d * s_ud, offs_d * s_dd, offs_d * s_zd, offs_d * s_od  # (BD,)
    n_b, n_c = offs_n * s_bn, offs_n * s_cn  # (N,)
    nd = offs_d[None, :] * dstate + offs_n[:, None]  # (N, BD) into a (D, N) slice
    st_row = states_ptr + pid_b * n_saved * dim * dstate  # states (B, n_saved, D, N): slices of (D, N)
    first = offs_l[:, None, None] == 0
    last = offs_l[:, None, None] == BLOCK_L - 1

    if LOCAL or not HAS_H0:
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    else:
        h = tl.load(hin_ptr + ((pid_b * dim + offs_d[None, :]) * n_seg + pid_s) * dstate + offs_n[:, None],
                    mask=mask_nd, other=0.0).to(tl.float32)
    dsum = tl.zeros([BLOCK_D], dtype=tl.float32)

    seg_start = pid_s * seg_len
    n_chunks = tl.minimum(seg_len // BLOCK_L, tl.cdiv(length - seg_start, BLOCK_L))
    for c in range(n_chunks):
        t0 = seg_start + c * BLOCK_L
        t = t0 + offs_l
        mask_l = t < length
        mask_ld = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        if SAVE_STATES:
            if SAVE_EVERY >= BLOCK_L:
                if t0 % SAVE_EVERY == 0:
                    tl.store(st_row + (t0 // SAVE_EVERY) * dim * dstate + nd, h, mask=mask_nd)
            else:
                tl.store(st_row + (t0 // SAVE_EVERY) * dim * dstate + nd, h, mask=mask_nd)

        t2 = t[:, None]
        o_u = t2 * s_ul + d_u[None, :]  # (T, BD)
        o_dl = _row_offsets(t2, d_dl[None, :], s_dl, o_u, o_u, LAY_DL)
        u = tl.load(u_row + o_u, mask=mask_ld, other=0.0).to(tl.float32)
        dl = tl.load(dl_row + o_dl, mask=mask_ld, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dl = dl + bias[None, :]
        if SOFTPLUS:
            dl = _softplus(dl)
        dl = tl.where(mask_ld, dl, 0.0)  # padded steps: a = 1, x = 0, the state passes through
        Bt = tl.load(b_row + t[:, None] * s_bl + n_b[None, :], mask=mask_ln, other=0.0).to(tl.float32)  # (T, N)

        a = tl.exp2(dl[:, None, :] * A2[None, :, :])  # (T, N, BD)
        x = Bt[:, :, None] * (dl * u)[:, None, :]
        # The carried state enters as part of the first step (x_0 + a_0 h); `first` is known per register at
        # compile time, so this costs one FMA per (n, d), and the scan's running product a1*a2 becomes dead code.
        x = tl.where(first, x + a * h[None, :, :], x)
        _, hs = tl.associative_scan((a, x), axis=0, combine_fn=_affine_combine)  # h_t of the chunk
        if LOCAL:
            dsum += tl.sum(dl, axis=0)
        else:
            Ct = tl.load(c_row + t[:, None] * s_cl + n_c[None, :], mask=mask_ln, other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct[:, :, None], axis=1)  # (T, BD)
            if HAS_D:
                y += Dv[None, :] * u
            if HAS_Z:
                o_z = _row_offsets(t2, d_z[None, :], s_zl, o_u, o_dl, LAY_Z)
                zv = tl.load(z_row + o_z, mask=mask_ld, other=0.0).to(tl.float32)
                y *= zv * tl.sigmoid(zv)
            o_o = _row_offsets(t2, d_o[None, :], s_ol, o_u, o_dl, LAY_O)
            tl.store(o_row + o_o, y.to(out_ptr.dtype.element_ty), mask=mask_ld)
            if SAVE_STATES:
                if SAVE_EVERY < BLOCK_L:
                    for k in tl.static_range(1, BLOCK_L // SAVE_EVERY):
                        if t0 + k * SAVE_EVERY < length:
                            hk = tl.sum(tl.where(offs_l[:, None, None] == k * SAVE_EVERY - 1, hs, -0.0), axis=0)
                            tl.store(st_row + ((t0 + k * SAVE_EVERY) // SAVE_EVERY) * dim * dstate + nd, hk,
                                     mask=mask_nd)
        h = tl.sum(tl.where(last, hs, -0.0), axis=0)  # padded steps kept the state of step L-1

    if LOCAL:
        # Pass 1 runs segments 0..n_seg-2 (the last one's end state is never needed): n_seg - 1 entries.
        tl.store(hend_ptr + ((pid_b * dim + offs_d[None, :]) * (n_seg - 1) + pid_s) * dstate + offs_n[:, None], h,
                 mask=mask_nd)
        tl.store(dsum_ptr + (pid_b * dim + offs_d) * (n_seg - 1) + pid_s, dsum, mask=mask_d)
    elif pid_s == n_seg - 1:
        tl.store(last_ptr + (pid_b * dim + offs_d[None, :]) * dstate + offs_n[:, None], h, mask=mask_nd)


@triton.jit(do_not_specialize=["dim", "dstate", "n_seg"])
def _segment_combine_kernel(
    A_ptr, dsum_ptr, add_ptr, init_ptr, out_ptr,
    dim, dstate, n_seg,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The short sequential pass over segments, per (b, d, n): out[s] = carry entering segment s, with
    # carry <- exp(A * dsum[s]) * carry + add[s] after segment s (exp(A dsum) = the segment's product of a_t).
    # Forward: s = 0, 1, ..., carry starts at h0, add = the segments' end states from a zero start.
    # REVERSE (the adjoint): s = n_seg-1, ..., 0, carry starts at dL/dh_last, add = each segment's
    # a_{t0} g_{t0} from a zero carry. add, out: (B, D, n_seg, N); dsum: (B, D, n_seg); init: (B, D, N).
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_nd = (offs_n[:, None] < dstate) & mask_d[None, :]
    A2 = tl.load(A_ptr + offs_d[None, :] * dstate + offs_n[:, None], mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A2 * 1.4426950408889634
    row = (pid_b * dim + offs_d[None, :]) * n_seg  # (1, BD)
    if HAS_INIT:
        carry = tl.load(init_ptr + (pid_b * dim + offs_d[None, :]) * dstate + offs_n[:, None], mask=mask_nd,
                        other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(n_seg - 1):
        s = n_seg - 1 - i if REVERSE else i
        tl.store(out_ptr + (row + s) * dstate + offs_n[:, None], carry, mask=mask_nd)
        # dsum/add hold n_seg - 1 entries: segments 0..n_seg-2 (forward) or 1..n_seg-1 (reverse).
        k = s - 1 if REVERSE else s
        ds = tl.load(dsum_ptr + (pid_b * dim + offs_d) * (n_seg - 1) + k, mask=mask_d, other=0.0)
        add = tl.load(add_ptr + ((pid_b * dim + offs_d[None, :]) * (n_seg - 1) + k) * dstate + offs_n[:, None],
                      mask=mask_nd, other=0.0)
        carry = tl.exp2(A2 * ds[None, :]) * carry + add
    tl.store(out_ptr + (row + (0 if REVERSE else n_seg - 1)) * dstate + offs_n[:, None], carry, mask=mask_nd)


@triton.jit
def _adjoint_chunk(cdy, a, q, first, last, offs_l, BLOCK_L: tl.constexpr):
    # g_t = C_t dy_t + a_{t+1} g_{t+1} over one chunk (T, D2, N, D1), the carry q = a_{t1} g_{t1} from the later
    # chunk entering through the last step (padded steps have a = 1 and pass it on). Returns g and the carry
    # a_{t0} g_{t0} for the chunk before.
    cdy = tl.where(last, cdy + q[None, :, :, :], cdy)
    ones = tl.full(cdy.shape, 1.0, tl.float32)
    _, g, _ = tl.associative_scan((ones, _flip_time(cdy, offs_l, BLOCK_L), _flip_time(a, offs_l, BLOCK_L)),
                                  axis=0, combine_fn=_adjoint_combine)
    g = _flip_time(g, offs_l, BLOCK_L)
    return g, tl.sum(tl.where(first, a * g, -0.0), axis=0)


@triton.jit(do_not_specialize=_SIZES)
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, qin_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr, qloc_ptr, dsum_ptr,
    scratch_ptr,
    dim, length, dstate, n_seg, seg_len, n_saved,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
    s_hb, s_hd, s_hl, s_eb, s_ed, s_el, s_wb, s_wd, s_wl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, ADJ_ONLY: tl.constexpr, RECOMPUTE: tl.constexpr, SAVE_EVERY: tl.constexpr,
    SUB: tl.constexpr, LAY_DL: tl.constexpr, LAY_Z: tl.constexpr, LAY_G: tl.constexpr, LAY_H: tl.constexpr,
    LAY_E: tl.constexpr, LAY_W: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # One program per (batch row, block of channels, segment); it walks its segment backwards in blocks of
    # SAVE_EVERY steps (a multiple of BLOCK_L), and each block backwards in chunks of BLOCK_L.
    # Inputs as in the forward (strides s_u*, s_d*, s_z*, s_b*, s_c*); dout (s_g*); states: (B, n_saved, D, N),
    # the state entering every SAVE_EVERY steps; qin: (B, D, n_seg, N), a_{t1} g_{t1} after each segment's last
    # step t1 (dL/dh_last for the last segment).
    # ADJ_ONLY (pass 1 of the segmented backward, segments 1..n_seg-1): only the adjoint, from a zero carry;
    # writes each segment's carry a_{t0} g_{t0} into qloc and its sum of delta into dsum, (B, D, n_seg-1[, N]).
    # Otherwise: du, ddelta, dz (B, D, L) with strides s_h*, s_e*, s_w*; dB, dC (B, N, L) contiguous fp32,
    # accumulated atomically; dA (B, n_seg, D, N), dD and dbias (B, n_seg, D) fp32 per batch row and segment;
    # dh0 (B, D, N) fp32. When SAVE_EVERY > BLOCK_L, each block first recomputes its forward from the saved
    # state and keeps the state entering each of its chunks in scratch (B, n_seg, SAVE_EVERY / BLOCK_L, D, N),
    # a per-program buffer small enough to stay in L2.
    # Tiles are (T, D2, N, D1): the program's BLOCK_D2 * BLOCK_D1 channels are split into D2 groups held in
    # registers and D1 channels along the lanes (see "Register layout" in the module docstring).
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(2) + (1 if ADJ_ONLY else 0)
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
    # Offsets within a batch row: int32, computed per chunk from per-channel parts (as in the forward).
    u_row, dl_row = u_ptr + pid_b * s_ub, delta_ptr + pid_b * s_db
    if HAS_Z:
        z_row = z_ptr + pid_b * s_zb
    g_row, b_row, c_row = dout_ptr + pid_b * s_gb, B_ptr + pid_b * s_bb, C_ptr + pid_b * s_cb
    d_u, d_dl, d_z, d_g = offs_d * s_ud, offs_d * s_dd, offs_d * s_zd, offs_d * s_gd  # (D2, D1)
    n_b, n_c = offs_n * s_bn, offs_n * s_cn
    chan = pid_b * dim + offs_d[:, None, :]  # (D2, 1, D1)
    # Checkpoints and scratch are stacks of (D, N) slices: their offsets reuse dnd (no extra offset tiles).
    st_row = states_ptr + pid_b * n_saved * dim * dstate
    sc_row = scratch_ptr + (pid_b * n_seg + pid_s) * SUB * dim * dstate
    first = offs_l[:, None, None, None] == 0
    last = offs_l[:, None, None, None] == BLOCK_L - 1

    if ADJ_ONLY:
        q = tl.zeros([BLOCK_D2, BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dsum = tl.zeros([BLOCK_D2, BLOCK_D1], dtype=tl.float32)
    else:
        q = tl.load(qin_ptr + (chan * n_seg + pid_s) * dstate + offs_n[None, :, None], mask=mask_dnd, other=0.0)
        dA_acc = tl.zeros([BLOCK_D2, BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_D2, BLOCK_D1], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D2, BLOCK_D1], dtype=tl.float32)

    seg_start = pid_s * seg_len
    n_sub = tl.cdiv(tl.minimum(seg_len, length - seg_start), SAVE_EVERY)
    for j in range(n_sub):
        sub_start = seg_start + (n_sub - 1 - j) * SAVE_EVERY
        n_ch = tl.minimum(SUB, tl.cdiv(length - sub_start, BLOCK_L))
        if RECOMPUTE:
            # This block's forward again, from its saved state: the state entering each chunk, into scratch.
            h = tl.load(st_row + (sub_start // SAVE_EVERY) * dim * dstate + dnd, mask=mask_dnd, other=0.0)
            for k in range(n_ch):
                tl.store(sc_row + k * dim * dstate + dnd, h, mask=mask_dnd)
                t = sub_start + k * BLOCK_L + offs_l
                mask_ld = (t < length)[:, None, None] & mask_d[None, :, :]
                mask_ln = (t < length)[:, None] & mask_n[None, :]
                t3 = t[:, None, None]
                o_u = t3 * s_ul + d_u[None, :, :]  # (T, D2, D1)
                o_dl = _row_offsets(t3, d_dl[None, :, :], s_dl, o_u, o_u, LAY_DL)
                u = tl.load(u_row + o_u, mask=mask_ld, other=0.0).to(tl.float32)
                dl = tl.load(dl_row + o_dl, mask=mask_ld, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    dl = dl + bias[None, :, :]
                if SOFTPLUS:
                    dl = _softplus(dl)
                dl = tl.where(mask_ld, dl, 0.0)
                Bt = tl.load(b_row + t[:, None] * s_bl + n_b[None, :], mask=mask_ln,
                             other=0.0).to(tl.float32)[:, None, :, None]
                a = tl.exp2(dl[:, :, None, :] * A2[None, :, :, :])
                x = Bt * (dl * u)[:, :, None, :]
                _, hs = tl.associative_scan((a, tl.where(first, x + a * h[None, :, :, :], x)), axis=0,
                                            combine_fn=_affine_combine)
                h = tl.sum(tl.where(last, hs, -0.0), axis=0)
            tl.debug_barrier()  # the scratch writes are visible to the loads below

        for i in range(n_ch):
            t0 = sub_start + (n_ch - 1 - i) * BLOCK_L
            t = t0 + offs_l
            mask_l = t < length
            mask_ld = mask_l[:, None, None] & mask_d[None, :, :]  # (T, D2, D1)
            mask_ln = mask_l[:, None] & mask_n[None, :]  # (T, N)
            t3 = t[:, None, None]
            o_u = t3 * s_ul + d_u[None, :, :]  # (T, D2, D1)
            o_dl = _row_offsets(t3, d_dl[None, :, :], s_dl, o_u, o_u, LAY_DL)
            pre = tl.load(dl_row + o_dl, mask=mask_ld, other=0.0).to(tl.float32)
            if HAS_BIAS:
                pre = pre + bias[None, :, :]
            if SOFTPLUS:
                dl = _softplus(pre)
            else:
                dl = pre
            dl = tl.where(mask_ld, dl, 0.0)
            Ct = tl.load(c_row + t[:, None] * s_cl + n_c[None, :], mask=mask_ln,
                         other=0.0).to(tl.float32)[:, None, :, None]  # (T, 1, N, 1)
            a = tl.exp2(dl[:, :, None, :] * A2[None, :, :, :])  # (T, D2, N, D1)
            dy = tl.load(g_row + _row_offsets(t3, d_g[None, :, :], s_gl, o_u, o_dl, LAY_G), mask=mask_ld,
                         other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z_row + _row_offsets(t3, d_z[None, :, :], s_zl, o_u, o_dl, LAY_Z), mask=mask_ld,
                             other=0.0).to(tl.float32)
                sz = tl.sigmoid(zv)
            if ADJ_ONLY:
                if HAS_Z:
                    dy = dy * zv * sz
                g, q = _adjoint_chunk(Ct * dy[:, :, None, :], a, q, first, last, offs_l, BLOCK_L)
                dsum += tl.sum(dl, axis=0)
            else:
                if RECOMPUTE:
                    h_start = tl.load(sc_row + (n_ch - 1 - i) * dim * dstate + dnd, mask=mask_dnd, other=0.0)
                else:
                    h_start = tl.load(st_row + (t0 // SAVE_EVERY) * dim * dstate + dnd, mask=mask_dnd, other=0.0)
                # Recompute the chunk's forward: x_t and h_t (and y_t when the gate needs it).
                u = tl.load(u_row + o_u, mask=mask_ld, other=0.0).to(tl.float32)
                Bt = tl.load(b_row + t[:, None] * s_bl + n_b[None, :], mask=mask_ln,
                             other=0.0).to(tl.float32)[:, None, :, None]
                du_ = (dl * u)[:, :, None, :]
                x = Bt * du_
                _, hs = tl.associative_scan((a, tl.where(first, x + a * h_start[None, :, :, :], x)), axis=0,
                                            combine_fn=_affine_combine)
                # dy: gradient w.r.t. the scan output sum_n C h (before the D skip and the gate).
                if HAS_Z:
                    y = tl.sum(hs * Ct, axis=2)
                    if HAS_D:
                        y += Dv[None, :, :] * u
                    dz = dy * y * sz * (1.0 + zv * (1.0 - sz))  # d silu(z)/dz = sig(z) (1 + z (1 - sig(z)))
                    o_w = _row_offsets(t3, (offs_d * s_wd)[None, :, :], s_wl, o_u, o_dl, LAY_W)
                    tl.store(dz_ptr + pid_b * s_wb + o_w, dz.to(dz_ptr.dtype.element_ty), mask=mask_ld)
                    dy = dy * zv * sz
                if HAS_D:
                    dD_acc += tl.sum(dy * u, axis=0)
                    du = dy * Dv[None, :, :]
                else:
                    du = tl.zeros([BLOCK_L, BLOCK_D2, BLOCK_D1], dtype=tl.float32)
                dy4 = dy[:, :, None, :]
                g, q = _adjoint_chunk(Ct * dy4, a, q, first, last, offs_l, BLOCK_L)

                # (T, N), summed over this program's channels: first over the D2 groups in registers, then lanes.
                ptr_ln = pid_b * dstate * length + offs_n[None, :] * length + t[:, None]
                dC = tl.sum(tl.sum(hs * dy4, axis=1), axis=2)
                dB = tl.sum(tl.sum(g * du_, axis=1), axis=2)
                tl.atomic_add(dC_ptr + ptr_ln, dC, mask=mask_ln, sem="relaxed")
                tl.atomic_add(dB_ptr + ptr_ln, dB, mask=mask_ln, sem="relaxed")
                s = g * (hs - x)  # g_t a_t h_{t-1}: the gradient w.r.t. delta_t * A (padded steps: times delta = 0)
                dA_acc += tl.sum(s * dl[:, :, None, :], axis=0)
                gdu = tl.sum(g * Bt, axis=2)  # dL/d(delta_t u_t), (T, D2, D1)
                ddl = tl.sum(s * A[None, :, :, :], axis=2) + gdu * u
                du += gdu * dl
                if SOFTPLUS:
                    ddl = ddl * tl.sigmoid(pre)  # softplus'(x) = sigmoid(x)
                if HAS_BIAS:
                    dbias_acc += tl.sum(tl.where(mask_ld, ddl, 0.0), axis=0)
                o_h = _row_offsets(t3, (offs_d * s_hd)[None, :, :], s_hl, o_u, o_dl, LAY_H)
                tl.store(du_ptr + pid_b * s_hb + o_h, du.to(du_ptr.dtype.element_ty), mask=mask_ld)
                o_e = _row_offsets(t3, (offs_d * s_ed)[None, :, :], s_el, o_u, o_dl, LAY_E)
                tl.store(ddelta_ptr + pid_b * s_eb + o_e, ddl.to(ddelta_ptr.dtype.element_ty), mask=mask_ld)
        if RECOMPUTE:
            tl.debug_barrier()  # this block's scratch reads are done before the next block overwrites it

    if ADJ_ONLY:
        tl.store(qloc_ptr + (chan * (n_seg - 1) + pid_s - 1) * dstate + offs_n[None, :, None], q, mask=mask_dnd)
        tl.store(dsum_ptr + (pid_b * dim + offs_d) * (n_seg - 1) + pid_s - 1, dsum, mask=mask_d)
    else:
        part = (pid_b * n_seg + pid_s) * dim  # row of the per-(batch, segment) partial sums
        tl.store(dA_ptr + part * dstate + dnd, dA_acc, mask=mask_dnd)
        if HAS_D:
            tl.store(dD_ptr + part + offs_d, dD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_ptr + part + offs_d, dbias_acc, mask=mask_d)
        if HAS_H0:
            if pid_s == 0:
                tl.store(dh0_ptr + pid_b * dim * dstate + dnd, q, mask=mask_dnd)
