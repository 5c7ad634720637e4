"""Fixtures for the quantization tests (helpers live in quant_helpers.py, importable by test modules)."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import MARKOV_VOCAB, Trained, block_errors, markov_tokens, tiny_config

from moai_lib import MoaiMambaForCausalLM


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are tiny: one intra-op thread is fastest, and with 2 threads on a 2-core machine that is
    busy with anything else, OpenMP spinning made a 5-step training loop 100× slower (12.6 s vs 0.13 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_tiny() -> Trained:
    """The tiny preset (vocab 64) trained for 60 AdamW steps of 16 × 32 tokens on `markov_tokens` (~5 s; loss
    ln 64 = 4.16 → 1.02 nats; the chain's entropy rate is at most 0.90)."""
    torch.manual_seed(0)
    model = MoaiMambaForCausalLM(tiny_config(vocab_size=MARKOV_VOCAB))
    data = markov_tokens(60 * 16, 32, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(60):
        batch = data[step * 16:(step + 1) * 16]
        loss = model(batch, labels=batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return Trained(model=model, calib=markov_tokens(32, 64, seed=1), heldout=markov_tokens(16, 64, seed=2),
                   final_loss=loss.item())


@pytest.fixture(scope="session")
def rtn_block_errors(trained_tiny) -> list[float]:
    """`block_errors` of INT4 g32 asymmetric RTN of the trained model: the baseline GPTQ and AWQ must beat."""
    from moai_lib.quant import IntWeightOnlyConfig, quantize_

    rtn = trained_tiny.fresh()
    quantize_(rtn, IntWeightOnlyConfig(bits=4, group_size=32))
    return block_errors(trained_tiny, rtn)
