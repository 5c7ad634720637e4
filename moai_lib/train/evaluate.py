"""Validation perplexity (overall and per language) and the unigram baseline it must beat."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.shards import PackedDataset


def _eval_indices(n: int, batch_size: int, max_batches: int | None) -> np.ndarray:
    if max_batches is None or max_batches * batch_size >= n:
        return np.arange(n)
    # Evenly spread over the split, so every language keeps its share.
    return np.unique(np.linspace(0, n - 1, max_batches * batch_size).round().astype(np.int64))


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: PackedDataset, batch_size: int, max_batches: int | None = None,
             accelerator=None, lockstep: bool = False) -> dict[str, float]:
    """Mean next-token loss and perplexity over `dataset` (each sequence predicts its tokens 1..L-1).

    Batches hold one language each, so the per-language figures (``val_loss_<lang>``, ``val_ppl_<lang>``)
    are exact; with several processes each takes every P-th batch and the sums are reduced. `lockstep`
    (FSDP2, where every forward is a collective): every process runs the same number of forwards, a process
    without a batch in the last round repeating one whose result it discards.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    idx = _eval_indices(len(dataset), batch_size, max_batches)
    codes = dataset.langs[idx] if dataset.langs is not None else np.zeros(len(idx), dtype=np.int64)
    n_codes = max(len(dataset.languages), 1)
    batches = [(int(c), chunk) for c in np.unique(codes) for sel in [idx[codes == c]]
               for chunk in np.array_split(sel, math.ceil(len(sel) / batch_size))]
    sums = torch.zeros(n_codes, dtype=torch.float64, device=device)
    counts = torch.zeros(n_codes, dtype=torch.float64, device=device)
    rounds = math.ceil(len(batches) / world) if lockstep else None
    for b, (code, sel) in enumerate(batches):
        if b % world != rank:
            continue
        x = dataset.batch(sel).to(device)
        # num_items_in_batch=1: the model returns the summed loss over the batch's tokens.
        out = model(input_ids=x, labels=x, num_items_in_batch=1, use_cache=False)
        sums[code] += out.loss.double()
        counts[code] += x.shape[0] * (x.shape[1] - 1)
    if lockstep and rank + (rounds - 1) * world >= len(batches):
        x = dataset.batch(batches[0][1]).to(device)
        model(input_ids=x, labels=x, num_items_in_batch=1, use_cache=False)
    if accelerator is not None and world > 1:
        sums, counts = accelerator.reduce(sums, "sum"), accelerator.reduce(counts, "sum")
    if was_training:
        model.train()
    total_loss = (sums.sum() / counts.sum().clamp(min=1)).item()
    metrics = {"val_loss": total_loss, "val_ppl": math.exp(min(total_loss, 700.0)),
               "val_tokens": int(counts.sum().item())}
    if dataset.langs is not None:
        for code, name in enumerate(dataset.languages):
            if counts[code] > 0:
                loss = (sums[code] / counts[code]).item()
                metrics[f"val_loss_{name}"] = loss
                metrics[f"val_ppl_{name}"] = math.exp(min(loss, 700.0))
    return metrics


def unigram_perplexity(train: PackedDataset, valid: PackedDataset, max_train_tokens: int = 1 << 28,
                       chunk_tokens: int = 1 << 24) -> float:
    """Perplexity on `valid`'s predicted tokens (positions 1..L-1 of each sequence) of the unigram model of
    `train`'s token frequencies, add-one smoothed over the vocabulary: the baseline a trained LM must beat.

    Counts at most `max_train_tokens` training tokens (from the start of the split, where the packer
    interleaves languages batch by batch), so the baseline stays a few seconds on a large corpus."""
    vocab = max(train.vocab_size, valid.vocab_size)
    counts = np.zeros(vocab, dtype=np.int64)
    for flat in train.shard_tokens():
        for start in range(0, len(flat), chunk_tokens):
            if counts.sum() >= max_train_tokens:
                break
            counts += np.bincount(flat[start:start + chunk_tokens], minlength=vocab)[:vocab]
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab)
    nll, n = 0.0, 0
    for i in range(len(valid)):
        targets = valid[i][1:]
        nll -= float(log_p[targets].sum())
        n += len(targets)
    return math.exp(nll / n)
