"""AdamW parameter groups (selected by name), the warmup + cosine schedule, and vocabulary resizing."""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import nn

from .params import TrainParams

logger = logging.getLogger(__name__)

# Parameters that get no weight decay, by the last component of their name: the SSM's A_log and D (decaying
# them pulls A towards -1 and the skip towards 0, i.e. changes the dynamics, not the scale), and all biases.
_NO_DECAY_LEAVES = ("A_log", "D", "bias")


def no_weight_decay(name: str) -> bool:
    """True for A_log, D, biases and norm weights (any module whose name contains "norm", e.g. `norm`,
    `norm2`, `norm_f`, `input_layernorm`).

    Decided by name, not by the `_no_weight_decay` attribute that state-spaces/mamba sets on A_log and D:
    attributes on Parameters do not survive `from_pretrained`, names do.
    """
    parts = name.split(".")
    return parts[-1] in _NO_DECAY_LEAVES or any("norm" in part for part in parts[:-1])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed and not decayed (see `no_weight_decay`). Order follows `named_parameters`,
    so a resumed optimizer maps its state onto the same parameters. Tied weights appear once."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    logger.debug("weight decay on %d tensors, none on %d: %s", len(decay), len(no_decay), no_decay_names)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.AdamW:
    groups = param_groups(model, params.weight_decay)
    for group in groups:
        group.pop("names")
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=params.learning_rate, betas=(params.adam_beta1, params.adam_beta2),
                             eps=params.adam_eps, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based): linear warmup from 1/(warmup+1), then a
    half cosine from 1 down to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    # A partial of a module-level function: the scheduler's state_dict then holds only numbers.
    fn = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


@torch.no_grad()
def resize_token_embeddings(model: nn.Module, vocab_size: int) -> None:
    """Grow a MOAI model's vocabulary to `vocab_size` (e.g. after `load_tokenizer(..., added_tokens=...)`).

    The embedding keeps the padded layout (`config.padded_vocab_size` rows). New rows start at the mean of
    the old embeddings, which keeps the initial output distribution close to the old one (Hewitt, 2021,
    "Initializing new word embeddings for pretrained language models"). A tied LM head follows the embedding.
    """
    config = model.config
    old_vocab = config.vocab_size
    if vocab_size <= old_vocab:
        return
    config.vocab_size = vocab_size
    rows = config.padded_vocab_size

    def grown(weight: torch.Tensor) -> torch.Tensor:
        new = weight.new_empty(rows, weight.shape[1])
        new[:old_vocab] = weight[:old_vocab]
        new[old_vocab:] = weight[:old_vocab].mean(0, keepdim=True)
        return new

    embedding = model.get_input_embeddings()
    new_embedding = nn.Embedding(rows, embedding.weight.shape[1], device=embedding.weight.device,
                                 dtype=embedding.weight.dtype)
    new_embedding.weight.copy_(grown(embedding.weight))
    model.set_input_embeddings(new_embedding)
    head = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False):
        head.weight = new_embedding.weight
    else:
        new_head = nn.Linear(head.weight.shape[1], rows, bias=False, device=head.weight.device,
                             dtype=head.weight.dtype)
        new_head.weight.copy_(grown(head.weight))
        model.set_output_embeddings(new_head)
    logger.info("resized the vocabulary from %d to %d tokens (%d embedding rows)", old_vocab, vocab_size, rows)
