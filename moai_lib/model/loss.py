"""Causal LM loss without materialising the full fp32 (B, L, V) logits.

With a 128K vocabulary, B=8 and L=2048, full fp32 logits are 8.4 GB (and as much again for their
gradient). `chunked_causal_lm_loss` computes the LM head and cross-entropy over chunks of tokens, each
under activation checkpointing, so at most one chunk's logits (chunk_size × V fp32) live at a time in the
forward and in the backward. The price is one extra LM-head matmul per chunk in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


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
) -> torch.Tensor:
    """Mean next-token cross-entropy.

    hidden_states: (B, L, d) final-norm outputs; lm_head_weight: (V, d); labels: (B, L) token ids or
    `ignore_index` (the model shifts them: position t predicts labels[t+1]). attention_mask (B, L) marks
    padding to ignore. `num_items_in_batch`, when given (gradient accumulation), replaces the number of
    counted tokens in the mean. Returns a scalar fp32 tensor (0 when no token counts).
    """
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match input shape {tuple(hidden_states.shape[:2])}"
        )
    targets = shift_labels(labels, attention_mask, ignore_index).reshape(-1)
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= lm_head_weight.shape[0]))
    if bad.any():
        raise ValueError(
            f"labels contain ids outside [0, {lm_head_weight.shape[0]}) (e.g. {targets[bad][0].item()}); "
            f"use {ignore_index} for positions that should not count"
        )
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
    denom = num_items_in_batch if num_items_in_batch is not None else valid.sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device).clamp(min=1)
    else:
        denom = max(int(denom), 1)
    return total / denom


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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The LM-head end of a causal LM's forward, shared by the Mamba LM and the attention baseline.

    hidden_states (B, L, d) → (loss, logits). With labels: the chunked loss over the real vocabulary rows
    (padding rows of a padded vocabulary take no softmax mass); logits only if `return_logits`. Logits are fp32,
    for the last `logits_to_keep` positions (0 = all, or an index tensor), with padding rows never predicted.
    """
    dtype = head_dtype(lm_head, hidden_states)
    loss = logits = None
    if labels is not None:
        weight = lm_head.weight  # the chunked loss multiplies by the (V, d) matrix itself
        loss = chunked_causal_lm_loss(
            hidden_states.to(dtype), weight[:vocab_size], labels, attention_mask,
            chunk_size=chunk_size, num_items_in_batch=num_items_in_batch,
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
