"""Validation of model inputs shared by the Mamba LM and the attention baseline."""

from __future__ import annotations

import torch


def check_input_ids(input_ids: torch.Tensor, vocab: int) -> None:
    """Raise `ValueError` unless `input_ids` is (B, L) with L ≥ 1 and every id in [0, vocab).

    `vocab` is the number of embedding rows (the padded vocabulary). The range check reads the tensor's
    min and max (a device sync), so it is skipped while `torch.compile` traces the model and while a CUDA graph
    is captured (`CudaGraphPrefill` checks each prompt before its replay instead).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (sequence length 0); give at least one token")
    if torch.compiler.is_compiling() or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"input id {bad} is outside the model's vocabulary [0, {vocab}); the tokenizer does not match "
            f"this model (resize the embeddings with `model.resize_token_embeddings(len(tokenizer))`)"
        )
