"""Causal LM loss without materialising the full fp32 (B, L, V) logits.

With a 128K vocabulary, B=8 and L=2048, full fp32 logits are 8.4 GB (and as much again for their
gradient). `chunked_causal_lm_loss` has two paths that give the same loss and gradients:

- fused (CUDA with Triton; the default there): `kernels.triton_ce.fused_linear_cross_entropy`. Per chunk of
  tokens, the logits in the compute dtype (bf16 under autocast), one Triton kernel for the fp32 log-sum-exp and
  the logits' gradient written in place, then the hidden and weight gradients, all in the forward; the backward
  only scales them. 3 LM-head matmuls instead of 4, no fp32 logits (napkin math in that module).
- torch (every device): each chunk under activation checkpointing, so at most one chunk's logits
  (chunk_size × V fp32) live at a time in the forward and in the backward; the price is one extra LM-head matmul
  per chunk in the backward, and fp32 logits written and read several times.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import MoaiError
from ..kernels.dispatch import BackendUnavailableError, resolve_backend

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class LossInputError(MoaiError, ValueError):
    """Labels that do not fit the hidden states or the vocabulary."""


@functools.cache
def _warn_no_fused_loss(reason: str) -> None:
    logger.warning("the fused LM-head loss is unavailable (%s); using the checkpointed torch loss", reason)


def use_fused_loss(fused: bool | None, device: torch.device) -> bool:
    """Resolve `chunked_causal_lm_loss`'s `fused` switch for tensors on `device`. None: on CUDA when Triton
    imports (else a warning, once); never on other devices. True: the Triton kernel is required (on the CPU
    under TRITON_INTERPRET=1), else `BackendUnavailableError` with the reason. False: the torch path."""
    if fused is None:
        if device.type != "cuda":
            return False
        try:
            resolve_backend("triton", device)
        except BackendUnavailableError as exc:
            _warn_no_fused_loss(str(exc))
            return False
        return True
    if fused:
        resolve_backend("triton", device)
    return bool(fused)


def _chunk_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    logits = F.linear(hidden, weight).float()  # (T, V)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def shift_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels (B, L) → targets (B, L-1) for positions 0..L-2, with padding (mask == 0) ignored."""
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, ignore_index)
    return labels[:, 1:]


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 512,
    num_items_in_batch: int | torch.Tensor | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy.

    hidden_states: (B, L, d) final-norm outputs; lm_head_weight: (V, d); labels: (B, L) token ids or
    `ignore_index` (the model shifts them: position t predicts labels[t+1]). attention_mask (B, L) marks
    padding to ignore. `num_items_in_batch`, when given (gradient accumulation), replaces the number of
    counted tokens in the mean. Returns a scalar fp32 tensor (0 when no token counts).

    `fused` picks the path (module docstring; `use_fused_loss`): None = the fused Triton loss on CUDA for a
    plain floating-point weight, the torch path otherwise. `chunk_size` is the torch path's tokens per chunk; the
    fused path keeps the same bytes of logits per chunk (one buffer in the compute dtype instead of fp32 logits
    and their fp32 gradient), so it takes 8 / itemsize times as many tokens per chunk (4× in bf16): larger
    chunks, fewer passes over dW.
    """
    if labels.shape != hidden_states.shape[:2]:
        raise LossInputError(
            f"labels shape {tuple(labels.shape)} does not match input shape {tuple(hidden_states.shape[:2])}"
        )
    targets = shift_labels(labels, attention_mask, ignore_index).reshape(-1)
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= lm_head_weight.shape[0]))
    if bad.any():
        raise LossInputError(
            f"labels contain ids outside [0, {lm_head_weight.shape[0]}) (e.g. {targets[bad][0].item()}); "
            f"use {ignore_index} for positions that should not count"
        )
    # A tensor subclass (a torchao-quantized or sharded weight) keeps the torch path unless asked: F.linear
    # dispatches it to its own kernels, the fused path would need it as a plain matrix.
    plain = type(lm_head_weight) in (torch.Tensor, torch.nn.Parameter) and lm_head_weight.is_floating_point()
    if (plain or fused is not None) and use_fused_loss(fused, hidden.device):
        from ..kernels.triton_ce import compute_dtype, fused_linear_cross_entropy

        rows = chunk_size * 8 // compute_dtype(hidden, lm_head_weight).itemsize
        total = fused_linear_cross_entropy(hidden, lm_head_weight, targets, ignore_index, chunk_rows=rows)
    else:
        total = _checkpointed_nll_sum(hidden, lm_head_weight, targets, ignore_index, chunk_size)
    denom = num_items_in_batch if num_items_in_batch is not None else valid.sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device).clamp(min=1)
    else:
        denom = max(int(denom), 1)
    return total / denom


def _checkpointed_nll_sum(hidden, lm_head_weight, targets, ignore_index, chunk_size):
    """Σ of the cross-entropy over (N, d) hidden rows, chunk by chunk under activation checkpointing."""
    total = hidden.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if not bool((y != ignore_index).any()):
            continue
        if needs_grad:
            total = total + checkpoint(_chunk_nll_sum, h, lm_head_weight, y, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_nll_sum(h, lm_head_weight, y, ignore_index)
    return total


def lm_head_outputs(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Linear,
    vocab_size: int,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 512,
    num_items_in_batch: int | torch.Tensor | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    return_logits: bool | None = None,
    fused_loss: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The LM-head end of a causal LM's forward, shared by the Mamba LM and the attention baseline.

    hidden_states (B, L, d) → (loss, logits). With labels: the chunked loss over the real vocabulary rows
    (padding rows of a padded vocabulary take no softmax mass); logits only if `return_logits`. Logits are fp32,
    for the last `logits_to_keep` positions (0 = all, or an index tensor), with padding rows never predicted.
    `fused_loss` is `chunked_causal_lm_loss`'s `fused` switch.
    """
    dtype = head_dtype(lm_head, hidden_states)
    loss = logits = None
    if labels is not None:
        weight = lm_head.weight  # the chunked loss multiplies by the (V, d) matrix itself
        loss = chunked_causal_lm_loss(
            hidden_states.to(dtype), weight[:vocab_size], labels, attention_mask,
            chunk_size=chunk_size, num_items_in_batch=num_items_in_batch, fused=fused_loss,
        )
    if labels is None or return_logits:
        if isinstance(logits_to_keep, int):
            kept = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            kept = hidden_states[:, logits_to_keep]
        logits = lm_head(kept.to(dtype)).float()
        if lm_head.out_features > vocab_size:
            logits[..., vocab_size:] = torch.finfo(logits.dtype).min
    return loss, logits


def head_dtype(lm_head: torch.nn.Module, hidden_states: torch.Tensor) -> torch.dtype:
    """The dtype the LM head takes its input in, read without touching `lm_head.weight`: on a quantized head
    that property dequantizes the whole (V, d) matrix (and on CUDA re-expands an INT4 head whose uint8 copy was
    released), a full-size matmul's worth of work per decoded token.

    The layer's declared `compute_dtype` (bitsandbytes 4-bit), else the dtype of its first floating-point buffer
    (a quantized layer's scales: the dtype its `weight` dequantizes to), else of its first floating-point
    parameter (a plain Linear's weight, a quantized layer's bias), else the input's dtype.
    """
    dtype = getattr(lm_head, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    own = [*lm_head.buffers(recurse=False), *lm_head.parameters(recurse=False)]
    return next((t.dtype for t in own if t.is_floating_point()), hidden_states.dtype)
