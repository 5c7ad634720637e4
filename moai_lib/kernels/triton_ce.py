"""Fused LM head + cross-entropy: the loss and both gradients in the forward, one Triton kernel per chunk.

    loss = Σ_rows [ logsumexp(h W^T) − (h W^T)[y] ]      (rows with y = ignore_index count 0)
    G    = softmax(h W^T) − onehot(y)                     (the gradient of the summed loss w.r.t. the logits)
    dh   = G W          dW = G^T h

`linear_cross_entropy_ref` is the spec (fp32 logits, `F.cross_entropy`, summed). `fused_linear_cross_entropy`
computes the same sum over chunks of T token rows (the idea of Liger-Kernel's fused linear cross-entropy and of
Apple's "Cut Your Losses" / cut cross-entropy): per chunk

    1. logits = h_chunk W^T in the compute dtype (bf16 under autocast; cuBLAS, fp32 accumulation)  (T, V)
    2. `_ce_rows_kernel`, one program per row: pass 1 streams the row once for its fp32 log-sum-exp (online max
       and rescaled sum over blocks of the vocabulary) and reads the target's logit → the row's loss; pass 2
       streams the row again and writes G = exp(x − lse) − [col = y] IN PLACE over the logits (ignored rows: zeros)
    3. dh_chunk = G W (cuBLAS)      dW += G^T h_chunk (cuBLAS, accumulated in fp32: `_accumulate_fp32`)

The backward only scales the stored dh and dW by the incoming gradient (the caller's 1/denominator). So a
training step does 3 LM-head matmuls instead of the 4 of checkpointed chunks (forward, recompute, two for the
backward), never materialises fp32 logits, and keeps no logits between forward and backward. The price: dW (fp32,
V×d) and dh exist from the loss forward to its backward, which in a training step is the moment between the
end of the model's forward and the first op of its backward (dW is what autograd would allocate for the weight's
gradient a moment later anyway; it becomes that gradient without a copy when `weight.grad` is None).

Padded vocabularies: the caller passes `weight[:vocab_size]`; the padding rows then take no softmax mass and
get no gradient, exactly as in the torch path.

Napkin math, N tokens, V vocabulary, d channels, compute dtype of s bytes (2 for bf16); the H200 runs a bf16
matmul at ~792 TFLOP/s and copies at ~4 TB/s (shared/NOTES.md). At the 370m training shape (N = 16384, d = 1024,
V = 128000, bf16):
- matmul FLOPs: 3 · 2NVd = 12.9 TFLOP (~16.3 ms at 792 TFLOP/s); the checkpointed torch path does 4 · 2NVd =
  17.2 TFLOP (~21.7 ms).
- the row kernel moves 3·s bytes per logit (read, read again, write G): 6 · N · V = 12.6 GB (~3.1 ms at 4 TB/s;
  a 256 KB row does not stay in L2 between the passes when ~1000 rows are in flight), and computes 2 exps per
  logit (2 · 2.1e9 at ~4.2e12 exp/s ≈ 1 ms, hidden under the memory time).
- the checkpointed torch path, by contrast (estimated): its forward and its recompute each write bf16 logits,
  cast them to fp32 and run log_softmax over them (~20 B per logit each); its backward writes the NLL gradient,
  runs log_softmax's backward and casts the gradient back to bf16 (~22 B): ~60 B per logit, ~130 GB (~33 ms at
  copy speed; the profile shows ~29 ms in the NLL backward alone). And since `weight[:vocab_size]` is a view,
  autocast does not cache its bf16 copy: every chunk casts the fp32 weight twice (forward, recompute) and casts
  and accumulates its gradient in fp32, ~4 GB per chunk. The fused path casts the weight once per call.
- dW accumulation: each chunk's G^T h has K = T and writes a V×d fp32 output, which cuBLAS reads and rewrites
  (8·V·d = 1 GB per chunk; 0.26 ms at 4 TB/s) while its FLOPs are 2·T·V·d (0.17 ms at T = 512). Small chunks
  make this pass memory-bound: N/T · 1 GB in total, 8 GB at T = 2048, 32 GB at T = 512. Chunks of T rows also
  hold a T×V logits buffer (T·V·s bytes: 0.5 GB at T = 2048 in bf16), so `chunked_causal_lm_loss` gives this
  path 8/s times its `chunk_size` rows (the same bytes as the torch path's chunk of fp32 logits + gradient).
- grad/loss bookkeeping: dh (N×d, 64 MB fp32) and the backward's scaling of dW (1 GB read+write, 0.26 ms).

Shape letters: N token rows, V vocabulary (rows of the weight), d channels, T rows per chunk.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import MoaiError
from .triton_scan import _on_device

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 2048  # see the napkin math: dW accumulation is memory-bound below ~2K rows per chunk


class LinearCrossEntropyError(MoaiError, ValueError):
    """Inputs of the fused LM head + cross-entropy that do not fit together."""


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int = -100) -> torch.Tensor:
    """The spec: Σ over rows of the cross-entropy of fp32 logits. hidden (N, d), weight (V, d), targets (N,)
    → fp32 scalar (0 when every target is ignored)."""
    logits = F.linear(hidden, weight).float()  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


@triton.jit
def _ce_rows_kernel(logits_ptr, targets_ptr, loss_ptr, n_cols, stride, ignore_index,
                    STORE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row: loss = lse − x[y]; with STORE_GRAD the row becomes softmax − onehot(y), in place.
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    y = tl.load(targets_ptr + row)
    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if STORE_GRAD:  # the row feeds the dh and dW matmuls: it must hold zeros, not its logits
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(ptr + cols, tl.zeros((BLOCK,), dtype=logits_ptr.dtype.element_ty), mask=cols < n_cols)
        return
    # Pass 1: online log-sum-exp. m is the running max, s = Σ exp(x − m), rescaled when m grows.
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    x_y = tl.load(ptr + y).to(tl.float32)
    tl.store(loss_ptr + row, lse - x_y)
    if STORE_GRAD:
        # Pass 2: G = softmax − onehot, rounded once to the buffer's dtype (as torch rounds the fp32 gradient
        # of `.float()` back to bf16 before the LM head's backward matmuls).
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse)
            g = tl.where(cols == y, g - 1.0, g)
            tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, store_grad: bool,
                        block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Per-row fp32 cross-entropy of `logits` (T, V) (unit stride along V) against `targets` (T,) → (T,).
    With `store_grad`, overwrites `logits` with softmax − onehot(target) (zeros on ignored rows)."""
    rows, n_cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return losses
    if logits.stride(1) != 1:
        raise LinearCrossEntropyError("cross_entropy_rows_ needs logits with unit stride along the vocabulary")
    block = block or min(4096, triton.next_power_of_2(n_cols))
    with _on_device(logits):
        _ce_rows_kernel[(rows,)](
            logits, targets, losses, n_cols, logits.stride(0), ignore_index,
            STORE_GRAD=store_grad, BLOCK=block, num_warps=num_warps or (8 if block >= 2048 else 4),
        )
    return losses


@functools.cache
def _addmm_out_dtype_works(device: torch.device) -> bool:
    """Whether `torch.addmm(acc_fp32, a_bf16, b_bf16, out_dtype=float32, out=acc)` runs here (cuBLAS with bf16
    inputs accumulating into an fp32 C; recent torch on CUDA only) and gives the fp32 product. Probed once."""
    if device.type != "cuda":
        return False
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(64, 32, device=device, generator=g).to(torch.bfloat16)
    b = torch.randn(32, 48, device=device, generator=g).to(torch.bfloat16)
    acc = torch.ones(64, 48, device=device)
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError) as exc:  # older torch: no fp32 `self` for bf16 inputs, or no out_dtype
        logger.info("fp32-output addmm unavailable (%s): dW accumulates via a bf16 product", exc)
        return False
    expected = 1 + a.float() @ b.float()
    return bool(torch.allclose(acc, expected, rtol=1e-4, atol=1e-3))


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (fp32) = (0 if first else acc) + a @ b, with a and b in the compute dtype."""
    if a.dtype == torch.float32:
        torch.addmm(acc, a, b, beta=0 if first else 1, out=acc)
    elif _addmm_out_dtype_works(a.device):
        torch.addmm(acc, a, b, beta=0 if first else 1, out_dtype=torch.float32, out=acc)
    elif a.is_cuda:  # a bf16 product rounded once per chunk, as autograd does in the torch path
        prod = a @ b
        if first:
            acc.copy_(prod)
        else:
            acc.add_(prod)
    else:  # CPU (Triton's interpreter, tests): exact fp32 products
        torch.addmm(acc, a.float(), b.float(), beta=0 if first else 1, out=acc)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's when it is on for the device (what F.linear would use), else the
    promoted dtype of the inputs."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _fused_forward(hidden, weight, targets, ignore_index, chunk_rows, dtype, need_dh, need_dw,
                   block=None, num_warps=None):
    """(loss sum fp32, dh in hidden's dtype or None, dW in weight's dtype or None) of the summed loss."""
    n_rows, V = hidden.shape[0], weight.shape[0]
    device = hidden.device
    with torch.autocast(device.type, enabled=False):
        h = hidden.to(dtype).contiguous()  # (N, d)
        w = weight.to(dtype).contiguous()  # (V, d): one cast per call (autocast casts per chunk)
        losses = torch.zeros(n_rows, dtype=torch.float32, device=device)
        dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device) if need_dh else None
        dw = torch.empty(weight.shape, dtype=torch.float32, device=device) if need_dw else None
        store_grad = need_dh or need_dw
        # Which chunks hold a counted token: one host sync for all of them.
        n_chunks = triton.cdiv(n_rows, chunk_rows)
        valid = F.pad(targets != ignore_index, (0, n_chunks * chunk_rows - n_rows))
        active = valid.view(n_chunks, chunk_rows).any(1).tolist() if n_rows else []
        buf = torch.empty(min(chunk_rows, n_rows), V, dtype=dtype, device=device)  # (T, V), reused
        first = True
        for c, start in enumerate(range(0, n_rows, chunk_rows)):
            if not active[c]:
                continue  # nothing counted: zero loss, zero gradient
            end = min(start + chunk_rows, n_rows)
            logits = buf[: end - start]
            torch.mm(h[start:end], w.t(), out=logits)  # (T, V)
            losses[start:end] = cross_entropy_rows_(logits, targets[start:end], ignore_index, store_grad,
                                                    block, num_warps)
            if need_dh:
                dh[start:end] = logits @ w  # (T, d)
            if need_dw:
                _accumulate_fp32(dw, logits.t(), h[start:end], first)  # (V, d) += (V, T) @ (T, d)
            first = False
        if need_dw and first:
            dw.zero_()  # no chunk counted
        if dw is not None and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
    return losses.sum(), dh, dw


class _FusedLinearCrossEntropyFn(torch.autograd.Function):
    """Forward computes the summed loss and both gradients; backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, dtype, block, num_warps):
        loss, dh, dw = _fused_forward(hidden, weight, targets, ignore_index, chunk_rows, dtype,
                                      ctx.needs_input_grad[0], ctx.needs_input_grad[1], block, num_warps)
        # In-place scaling in backward bumps their version: a second backward (retain_graph) raises instead of
        # scaling twice.
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        if dh is not None:
            dh = dh.mul_(grad_loss.to(dh.dtype))
        if dw is not None:
            dw = dw.mul_(grad_loss.to(dw.dtype))
        return dh, dw, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    chunk_rows: int = DEFAULT_CHUNK_ROWS, block: int | None = None, num_warps: int | None = None,
) -> torch.Tensor:
    """Σ over rows of cross_entropy(hidden @ weight^T, targets), as `linear_cross_entropy_ref`; differentiable
    in hidden and weight.

    hidden (N, d); weight (V, d) (pass `weight[:vocab_size]` for a padded vocabulary); targets (N,) int64 ids in
    [0, V) or `ignore_index` (not checked here: `chunked_causal_lm_loss` checks them). The matmuls run in
    autocast's dtype when autocast is on, else in the inputs' dtype; the log-sum-exp in fp32. Returns an fp32
    scalar. `chunk_rows` bounds the (chunk_rows, V) logits buffer; `block`/`num_warps` tune the row kernel.
    Without autograd (no_grad, or neither input requires grad) only the loss is computed.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise LinearCrossEntropyError(f"hidden (N, d) and weight (V, d) do not match: {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise LinearCrossEntropyError(f"targets {tuple(targets.shape)} must be (N,) = ({hidden.shape[0]},)")
    if chunk_rows < 1:
        raise LinearCrossEntropyError(f"chunk_rows must be ≥ 1, got {chunk_rows}")
    dtype = compute_dtype(hidden, weight)
    targets = targets.contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropyFn.apply(hidden, weight, targets, ignore_index, chunk_rows, dtype,
                                                block, num_warps)
    loss, _, _ = _fused_forward(hidden, weight, targets, ignore_index, chunk_rows, dtype, False, False,
                                block, num_warps)
    return loss
