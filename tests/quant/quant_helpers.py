"""Helpers for the quantization tests: tiny models, Markov-chain data, and per-block error measurement.

The `tiny` preset has d=64 (in_proj, fc1: 64 inputs; x_proj, out_proj, fc2: 128), so group sizes 32 and 64 fit
every default layer. `dt_rank=8` makes x_proj's output width 8 + 2·16 = 40, a multiple of 8, as the GPTQ/AWQ
packed formats need (the default ceil(64/16) = 4 gives 36).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from moai_lib import MoaiMambaForCausalLM, get_mamba_config

MARKOV_VOCAB = 64


def tiny_config(**overrides):
    return get_mamba_config("tiny", **{"dt_rank": 8, "kernel_backend": "torch", **overrides})


def tiny_model(seed: int = 0, **overrides) -> MoaiMambaForCausalLM:
    torch.manual_seed(seed)
    return MoaiMambaForCausalLM(tiny_config(**overrides)).eval()


def markov_tokens(n: int, length: int, seed: int) -> torch.Tensor:
    """Token ids (n, length) from a fixed sparse Markov chain: each token has 3 successors with probabilities
    0.6/0.3/0.1 (chain fixed by seed 1234; `seed` draws the sequences). A tiny model learns it in ~100 steps,
    which gives its layers the skewed, correlated activations real LMs have."""
    chain = torch.Generator().manual_seed(1234)
    successors = torch.randint(0, MARKOV_VOCAB, (MARKOV_VOCAB, 3), generator=chain)
    probs = torch.tensor([0.6, 0.3, 0.1])
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, MARKOV_VOCAB, (n,), generator=gen)
    choice = torch.multinomial(probs, n * length, replacement=True, generator=gen).reshape(n, length)
    for t in range(1, length):
        x[:, t] = successors[x[:, t - 1], choice[:, t]]
    return x


@dataclass
class Trained:
    model: MoaiMambaForCausalLM
    calib: torch.Tensor    # (32, 64) calibration token ids
    heldout: torch.Tensor  # (16, 64) held-out token ids from the same chain
    final_loss: float

    def fresh(self) -> MoaiMambaForCausalLM:
        return copy.deepcopy(self.model)


def block_errors(trained: Trained, quantized: MoaiMambaForCausalLM) -> list[float]:
    """Per block, the relative MSE of its residual update (block(h) − h) when quantized, on held-out inputs h
    taken from the float model."""
    with torch.no_grad():
        hidden = trained.model(trained.heldout, use_cache=False, output_hidden_states=True).hidden_states
        errs = []
        pairs = zip(trained.model.backbone.layers, quantized.backbone.layers, strict=True)
        for i, (ref_block, q_block) in enumerate(pairs):
            ref = ref_block(hidden[i]) - hidden[i]
            errs.append(float((q_block(hidden[i]) - hidden[i] - ref).pow(2).mean() / ref.pow(2).mean()))
    return errs


